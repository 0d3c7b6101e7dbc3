//! The log `PUT /logger` turns on: squib's `tracing` events as lines in a file or named pipe,
//! at a level, as Firecracker's logger writes them.
//!
//! Why a layer of its own beside the standard-error one: `SQUIB_LOG` keeps deciding what reaches
//! standard error, while the API decides at run time what reaches the file the Firecracker user
//! named; neither setting hides events from the other. Why not a reloadable `fmt` layer:
//! Firecracker's options (`show_level`, `show_log_origin`, `module`) change the line format and
//! the filter at run time, which a custom layer does in a few lines, and tracing-subscriber's
//! reload handle does not support for per-layer filtered layers.
//!
//! Lines look like Firecracker's: `TIME [ID:THREAD(:LEVEL)(:FILE:LINE)] MESSAGE key=value...`.
//! The file is opened like Firecracker's (created if missing, read-write so a FIFO opens without
//! a reader, `O_NONBLOCK`) but appended to: a line that would block is dropped and counted
//! (`missed_log_count` in the metrics), so a reader that stops reading never stalls squib.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};

/// The instance id on every line (Firecracker's default, without a jailer `--id`).
pub const INSTANCE_ID: &str = "anonymous-instance";

/// What the log writes and where.
#[derive(Debug)]
struct Settings {
    file: File,
    level: LevelFilter,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

static SETTINGS: RwLock<Option<Settings>> = parking_lot::const_rwlock(None);
static MISSED: AtomicU64 = AtomicU64::new(0);

/// `PUT /logger`'s settings, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// File or named pipe the lines go to.
    pub path: PathBuf,
    /// Most verbose level written.
    pub level: LevelFilter,
    /// Write each event's level.
    pub show_level: bool,
    /// Write each event's source file and line.
    pub show_origin: bool,
    /// Write only events whose target (the module path, unless the event names another) starts
    /// with this.
    pub module: Option<String>,
}

/// Parse a level the way Firecracker does (case-insensitive; `Warning` or `Warn`).
///
/// # Errors
/// A message naming the value and the accepted ones.
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::OFF),
        "error" => Ok(LevelFilter::ERROR),
        "warn" | "warning" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        _ => Err(format!(
            "level {s:?}: expected one of Error, Warning, Info, Debug, Trace, Off (any case)"
        )),
    }
}

/// A level as Firecracker's API spells it (`Error`, `Warning`, `Info`, `Debug`, `Trace`, `Off`).
#[must_use]
pub fn level_name(level: LevelFilter) -> &'static str {
    match level {
        LevelFilter::OFF => "Off",
        LevelFilter::ERROR => "Error",
        LevelFilter::WARN => "Warning",
        LevelFilter::INFO => "Info",
        LevelFilter::DEBUG => "Debug",
        _ => "Trace",
    }
}

/// Open `config.path` and send the log there from now on (replacing an earlier target).
///
/// # Errors
/// The file cannot be opened (the message names it).
pub fn configure(config: &LogConfig) -> Result<(), String> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&config.path)
        .map_err(|e| format!("log_path {}: cannot open: {e}", config.path.display()))?;
    *SETTINGS.write() = Some(Settings {
        file,
        level: config.level,
        show_level: config.show_level,
        show_origin: config.show_origin,
        module: config.module.clone(),
    });
    // Callsites cached as disabled for every layer must be asked again.
    tracing::callsite::rebuild_interest_cache();
    Ok(())
}

/// Lines dropped because the target would have blocked or failed.
#[must_use]
pub fn missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// The layer that writes the API's log (install it with [`ApiLogFilter`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiLog;

/// Lets through what the configured level and module allow, nothing before `PUT /logger`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiLogFilter;

fn allowed(meta: &Metadata<'_>, s: &Settings) -> bool {
    s.level >= *meta.level() && s.module.as_deref().is_none_or(|m| meta.target().starts_with(m))
}

impl<S: Subscriber> Filter<S> for ApiLogFilter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        SETTINGS.read().as_ref().is_some_and(|s| allowed(meta, s))
    }

    fn callsite_enabled(&self, _meta: &'static Metadata<'static>) -> Interest {
        // The settings change at run time: decide per event.
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(SETTINGS.read().as_ref().map_or(LevelFilter::OFF, |s| s.level))
    }
}

/// Collects an event's message and fields into one string.
struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// One line for `event` under `s` (no trailing newline).
fn format_line(event: &Event<'_>, s: &Settings, thread: &str) -> String {
    let meta = event.metadata();
    let mut line = format!(
        "{} [{INSTANCE_ID}:{thread}",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
    if s.show_level {
        let _ = write!(line, ":{}", meta.level());
    }
    if s.show_origin {
        let _ = write!(
            line,
            ":{}:{}",
            meta.file().unwrap_or("?"),
            meta.line().map_or_else(|| "?".to_owned(), |l| l.to_string())
        );
    }
    line.push_str("] ");
    let mut fields = Fields(String::new());
    event.record(&mut fields);
    line.push_str(fields.0.trim_start());
    line
}

impl<S: Subscriber> Layer<S> for ApiLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let guard = SETTINGS.read();
        let Some(s) = guard.as_ref() else {
            return;
        };
        if !allowed(event.metadata(), s) {
            return;
        }
        let current = std::thread::current();
        let mut line = format_line(event, s, current.name().unwrap_or("-"));
        line.push('\n');
        // One write: a FIFO takes a line of less than PIPE_BUF whole or not at all.
        match (&s.file).write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => {
                MISSED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_parse_firecrackers_levels_in_any_case() {
        assert_eq!(parse_level("Warning"), Ok(LevelFilter::WARN));
        assert_eq!(parse_level("warn"), Ok(LevelFilter::WARN));
        assert_eq!(parse_level("DEBUG"), Ok(LevelFilter::DEBUG));
        assert_eq!(parse_level("Off"), Ok(LevelFilter::OFF));
        let e = parse_level("loud").unwrap_err();
        assert!(e.contains("\"loud\"") && e.contains("Warning"), "{e}");
    }

    #[test]
    fn test_should_write_lines_at_the_level_and_in_the_module_configured() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api.log");
        let subscriber = tracing_subscriber::registry().with(ApiLog.with_filter(ApiLogFilter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("before PUT /logger: nowhere");
            configure(&LogConfig {
                path: path.clone(),
                level: LevelFilter::INFO,
                show_level: true,
                show_origin: true,
                module: Some("squib::log".to_owned()),
            })
            .expect("configure");
            tracing::info!(answer = 42, "kept");
            tracing::debug!("below the level");
            tracing::info!(target: "elsewhere", "outside the module");
            configure(&LogConfig {
                path: path.clone(),
                level: LevelFilter::WARN,
                show_level: false,
                show_origin: false,
                module: None,
            })
            .expect("configure again");
            tracing::info!("below the new level");
            tracing::warn!(target: "elsewhere", "any module now");
        });
        let text = std::fs::read_to_string(&path).expect("read log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(&format!("[{INSTANCE_ID}:"))
                && lines[0].contains(":INFO:squib-vmm/src/log.rs:")
                && lines[0].ends_with("] kept answer=42"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("] any module now") && !lines[1].contains("WARN"),
            "{text}"
        );
    }
}
