//! Where COM1's bytes go: the terminal, a file, and (for tests) memory.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A fan-out writer: every byte the guest sends to COM1 goes to each sink.
///
/// ```
/// use std::io::Write;
/// use squib_machine::console::{Capture, Console};
///
/// let capture = Capture::default();
/// let mut console = Console::new().with_sink(Box::new(capture.clone()));
/// console.write_all(b"COUNTER 1\n").unwrap();
/// assert_eq!(capture.text(), "COUNTER 1\n");
/// ```
#[derive(Default)]
pub struct Console {
    sinks: Vec<Box<dyn Write + Send>>,
}

impl Console {
    /// A console with no sinks (output is dropped).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a sink.
    #[must_use]
    pub fn with_sink(mut self, sink: Box<dyn Write + Send>) -> Self {
        self.sinks.push(sink);
        self
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Console({} sinks)", self.sinks.len())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for sink in &mut self.sinks {
            sink.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        for sink in &mut self.sinks {
            sink.flush()?;
        }
        Ok(())
    }
}

/// Standard output, flushed at every newline so lines show as the guest prints them.
#[derive(Debug, Default)]
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        if buf.contains(&b'\n') {
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Console bytes kept in memory, shared between clones; readers can wait for a line.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl Capture {
    /// Everything captured so far (lossy UTF-8).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.0.lock()).into_owned()
    }

    /// Wait until `done(text so far)` holds, up to `timeout`; returns whether it did.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut bytes = lock.lock();
        loop {
            if done(&String::from_utf8_lossy(&bytes)) {
                return true;
            }
            if cv.wait_until(&mut bytes, deadline).timed_out() {
                return done(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (lock, cv) = &*self.inner;
        lock.lock().extend_from_slice(buf);
        cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
