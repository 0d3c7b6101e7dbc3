//! Firecracker's metrics for `PUT /metrics` and `FlushMetrics`: one JSON object per line, with
//! at least the snapshot latencies Firecracker users watch.
//!
//! Why these names: tools built on Firecracker read `latencies_us.full_create_snapshot` and its
//! siblings from the metrics file; squib writes the same keys with the same meaning, so those
//! tools keep working. Each latency is the duration of the last successful operation of its kind
//! in microseconds (0 until one has run), measured twice as Firecracker does: from the moment the
//! API server has the request until the reply is ready (`full_create_snapshot`, ...), and inside
//! the VMM only (`vmm_full_create_snapshot`, ...).
//!
//! Why the file is opened non-blocking (create, read-write, `O_NONBLOCK`, as Firecracker opens
//! it): a FIFO nobody reads must never stall the API. Opened read-write, a FIFO opens without a
//! reader; a line that does not fit is dropped and counted (`logger.missed_metrics_count`), and
//! the flush that dropped it answers with an error. A line is far below `PIPE_BUF`, so a FIFO
//! reader never sees half of one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What the metrics system can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `PUT /metrics` came twice.
    #[error(
        "the metrics system is already initialized (metrics_path {0}); Firecracker allows one PUT /metrics"
    )]
    AlreadyInitialized(PathBuf),
    /// The metrics file could not be opened.
    #[error("metrics_path {path}: cannot open")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line could not be written.
    #[error("writing metrics to {path}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Why (`WouldBlock`: a FIFO whose reader is not keeping up).
        #[source]
        source: std::io::Error,
    },
}

/// An operation whose latency is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `PUT /snapshot/create` with `snapshot_type` `Full`.
    FullCreate,
    /// `PUT /snapshot/create` with `snapshot_type` `Diff`.
    DiffCreate,
    /// `PUT /snapshot/load`.
    Load,
    /// `PATCH /vm` `Paused`.
    Pause,
    /// `PATCH /vm` `Resumed`.
    Resume,
}

/// Firecracker's `latencies_us`: the last duration of each operation, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latencies {
    /// Full snapshot create, at the API.
    pub full_create_snapshot: u64,
    /// Diff snapshot create, at the API.
    pub diff_create_snapshot: u64,
    /// Snapshot load (and resume, with `resume_vm`), at the API.
    pub load_snapshot: u64,
    /// Pause, at the API.
    pub pause_vm: u64,
    /// Resume, at the API.
    pub resume_vm: u64,
    /// Full snapshot create, inside the VMM.
    pub vmm_full_create_snapshot: u64,
    /// Diff snapshot create, inside the VMM.
    pub vmm_diff_create_snapshot: u64,
    /// Snapshot load, inside the VMM.
    pub vmm_load_snapshot: u64,
    /// Pause, inside the VMM.
    pub vmm_pause_vm: u64,
    /// Resume, inside the VMM.
    pub vmm_resume_vm: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Latencies {
    /// Record one successful `op`: `api` from request to reply, `vmm` inside the VMM.
    pub fn record(&mut self, op: Op, api: Duration, vmm: Duration) {
        let (a, v) = match op {
            Op::FullCreate => (&mut self.full_create_snapshot, &mut self.vmm_full_create_snapshot),
            Op::DiffCreate => (&mut self.diff_create_snapshot, &mut self.vmm_diff_create_snapshot),
            Op::Load => (&mut self.load_snapshot, &mut self.vmm_load_snapshot),
            Op::Pause => (&mut self.pause_vm, &mut self.vmm_pause_vm),
            Op::Resume => (&mut self.resume_vm, &mut self.vmm_resume_vm),
        };
        *a = micros(api);
        *v = micros(vmm);
    }
}

/// `PUT /metrics`'s body, as Firecracker's `Metrics` definition has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe the lines go to.
    pub metrics_path: PathBuf,
    /// Emit the instance id as a top-level `id` on every line.
    #[serde(default)]
    pub emit_id: bool,
    /// Operator-defined pairs emitted under `properties` on every line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// The metrics destination once `PUT /metrics` has configured it.
#[derive(Debug)]
pub struct Metrics {
    config: MetricsConfig,
    file: File,
    /// Lines that could not be written.
    missed: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    utc_timestamp_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a BTreeMap<String, String>>,
    latencies_us: &'a Latencies,
    logger: LoggerCounts,
}

#[derive(Serialize)]
struct LoggerCounts {
    missed_metrics_count: u64,
    missed_log_count: u64,
}

impl Metrics {
    /// Open `config.metrics_path` (created if missing; a FIFO opens without a reader).
    ///
    /// # Errors
    /// [`MetricsError::Open`] naming the path.
    pub fn open(config: MetricsConfig) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&config.metrics_path)
            .map_err(|source| MetricsError::Open {
                path: config.metrics_path.clone(),
                source,
            })?;
        Ok(Self {
            config,
            file,
            missed: 0,
        })
    }

    /// The configuration it was opened with (for `GET /vm/config`).
    #[must_use]
    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    /// Where the lines go.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.config.metrics_path
    }

    /// Write one line: the time, the latencies and the loss counters.
    ///
    /// # Errors
    /// [`MetricsError::Write`]: the line was dropped (and counted).
    pub fn flush(&mut self, id: &str, latencies: &Latencies, missed_log: u64) -> Result<(), MetricsError> {
        let utc_timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let line = Line {
            utc_timestamp_ms,
            id: self.config.emit_id.then_some(id),
            properties: self.config.properties.as_ref(),
            latencies_us: latencies,
            logger: LoggerCounts {
                missed_metrics_count: self.missed,
                missed_log_count: missed_log,
            },
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| MetricsError::Write {
            path: self.config.metrics_path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        // One write: a FIFO takes a line of less than PIPE_BUF whole or not at all.
        match self.file.write(&bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => {
                self.missed += 1;
                Err(MetricsError::Write {
                    path: self.config.metrics_path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("wrote {n} of {} bytes", bytes.len()),
                    ),
                })
            }
            Err(source) => {
                self.missed += 1;
                Err(MetricsError::Write {
                    path: self.config.metrics_path.clone(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_keep_the_last_latency_of_each_operation_apart() {
        let mut l = Latencies::default();
        l.record(
            Op::FullCreate,
            Duration::from_micros(900),
            Duration::from_micros(700),
        );
        l.record(
            Op::DiffCreate,
            Duration::from_micros(50),
            Duration::from_micros(40),
        );
        l.record(
            Op::FullCreate,
            Duration::from_micros(800),
            Duration::from_micros(600),
        );
        assert_eq!((l.full_create_snapshot, l.vmm_full_create_snapshot), (800, 600));
        assert_eq!((l.diff_create_snapshot, l.vmm_diff_create_snapshot), (50, 40));
        assert_eq!(l.load_snapshot, 0);
    }

    #[test]
    fn test_should_write_one_json_line_per_flush_with_firecrackers_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.json");
        let mut props = BTreeMap::new();
        props.insert("host".to_owned(), "h1".to_owned());
        let mut m = Metrics::open(MetricsConfig {
            metrics_path: path.clone(),
            emit_id: true,
            properties: Some(props),
        })
        .expect("open");
        let mut l = Latencies::default();
        l.record(Op::Load, Duration::from_micros(1234), Duration::from_micros(1000));
        m.flush("vm-7", &l, 0).expect("flush");
        m.flush("vm-7", &l, 2).expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|s| serde_json::from_str(s).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["latencies_us"]["load_snapshot"], 1234);
        assert_eq!(lines[0]["latencies_us"]["vmm_load_snapshot"], 1000);
        assert_eq!(lines[0]["id"], "vm-7");
        assert_eq!(lines[0]["properties"]["host"], "h1");
        assert_eq!(lines[1]["logger"]["missed_log_count"], 2);
        assert!(
            lines[0]["utc_timestamp_ms"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000)
        );
    }

    #[test]
    fn test_should_drop_and_count_a_line_a_full_fifo_cannot_take_without_blocking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("m.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Opens without a reader (read-write), as Firecracker's does.
        let mut m = Metrics::open(MetricsConfig {
            metrics_path: fifo.clone(),
            emit_id: false,
            properties: None,
        })
        .expect("open fifo");
        let l = Latencies::default();
        let mut failed = None;
        // Nobody reads: the pipe (64 KiB) fills within a few hundred lines, then a flush fails
        // at once instead of blocking.
        for i in 0..100_000 {
            if let Err(e) = m.flush("x", &l, 0) {
                failed = Some((i, e));
                break;
            }
        }
        let (i, e) = failed.expect("a full FIFO refuses a line");
        assert!(i > 10, "the first lines fit");
        assert!(e.to_string().contains("m.fifo"), "{e}");
        let again = m.flush("x", &l, 0).expect_err("still full");
        assert!(matches!(again, MetricsError::Write { .. }));
        assert_eq!(m.missed, 2);
    }
}
