//! Where COM1's bytes go: the terminal, a file, and (for tests) memory.
//!
//! The guest writes COM1 from a vCPU thread, with the serial device locked. A sink that can block
//! (standard output into a pipe nobody reads, a terminal stopped with XOFF) must therefore never
//! be written from that thread: the vCPU would never get back to its run loop, never park, and
//! pause, snapshot, stop and every later API call would wait on it forever. Such sinks go behind
//! a [`Drained`]: a bounded buffer filled without blocking by the vCPU and emptied by a thread of
//! its own into the real writer. What does not fit is dropped and counted, never waited for, and
//! when the reader comes back the guest has gone on all along.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
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

/// How much console output a [`Drained`] sink holds while its writer is blocked (1 MiB).
pub const DRAINED_CAPACITY: usize = 1 << 20;

/// A sink that never blocks its writer: bytes go into a buffer of at most `capacity` bytes
/// that a thread of its own writes to the real sink; what does not fit is dropped and counted.
///
/// ```
/// use std::io::Write;
/// use std::time::Duration;
/// use squib_machine::console::{Capture, Drained};
///
/// let capture = Capture::default();
/// let mut sink = Drained::new(Box::new(capture.clone()), 4096).unwrap();
/// sink.write_all(b"COUNTER 1\n").unwrap();
/// assert!(capture.wait_until(Duration::from_secs(10), |t| t == "COUNTER 1\n"));
/// assert_eq!(sink.dropped(), 0);
/// ```
pub struct Drained {
    shared: Arc<DrainShared>,
    thread: Option<JoinHandle<()>>,
}

struct DrainShared {
    state: Mutex<DrainState>,
    cv: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct DrainState {
    pending: Vec<u8>,
    /// The drain thread is writing a batch (taken out of `pending`).
    busy: bool,
    closed: bool,
}

impl Drained {
    /// Start draining into `inner` with a buffer of `capacity` bytes.
    ///
    /// # Errors
    /// When the drain thread cannot start.
    pub fn new(mut inner: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(DrainShared {
            state: Mutex::new(DrainState::default()),
            cv: Condvar::new(),
            capacity,
            dropped: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("squib-console".into())
            .spawn(move || {
                let mut batch = Vec::new();
                let mut reported = 0;
                loop {
                    {
                        let mut st = s.state.lock();
                        st.busy = false;
                        s.cv.notify_all();
                        while st.pending.is_empty() && !st.closed {
                            s.cv.wait(&mut st);
                        }
                        if st.pending.is_empty() {
                            return;
                        }
                        std::mem::swap(&mut st.pending, &mut batch);
                        st.busy = true;
                    }
                    // Outside the lock: this is the write that may block for as long as nobody
                    // reads; the vCPU meanwhile keeps filling (or dropping into) `pending`.
                    let ok = inner.write_all(&batch).and_then(|()| inner.flush());
                    batch.clear();
                    let dropped = s.dropped.load(Ordering::Relaxed);
                    if dropped > reported {
                        tracing::warn!(dropped, "console output dropped: nobody read it in time");
                        reported = dropped;
                    }
                    if let Err(e) = ok {
                        // The reader has gone for good (a closed pipe): keep consuming, so the
                        // guest never notices, and count what is lost.
                        tracing::warn!(error = %e, "console sink failed; dropping its output from now on");
                        let mut st = s.state.lock();
                        st.closed = true;
                        let n = st.pending.len() as u64;
                        st.pending = Vec::new();
                        s.dropped.fetch_add(n, Ordering::Relaxed);
                        st.busy = false;
                        s.cv.notify_all();
                        return;
                    }
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Bytes dropped so far because the buffer was full (or the sink had failed).
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Wait up to `timeout` until everything accepted so far has been handed to the sink;
    /// returns whether it was.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        while !st.pending.is_empty() || st.busy {
            if self.shared.cv.wait_until(&mut st, deadline).timed_out() {
                return st.pending.is_empty() && !st.busy;
            }
        }
        true
    }
}

impl std::fmt::Debug for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drained")
            .field("capacity", &self.shared.capacity)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Write for Drained {
    /// Never blocks: takes what fits, drops the rest (counted), and always reports the whole
    /// buffer written, so the guest's UART never stalls on a slow reader.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.shared.state.lock();
        if st.closed {
            self.shared.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
            return Ok(buf.len());
        }
        let room = self.shared.capacity.saturating_sub(st.pending.len());
        let take = room.min(buf.len());
        st.pending.extend_from_slice(&buf[..take]);
        if take < buf.len() {
            self.shared
                .dropped
                .fetch_add((buf.len() - take) as u64, Ordering::Relaxed);
        }
        if take > 0 {
            self.shared.cv.notify_all();
        }
        Ok(buf.len())
    }

    /// Does not wait for the sink (that could block); see [`Drained::drain`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Drained {
    /// Give the sink a moment to take what is pending, then let the thread go: a sink nobody
    /// reads must not keep the VMM from stopping.
    fn drop(&mut self) {
        self.drain(Duration::from_millis(200));
        self.shared.state.lock().closed = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe whose buffer is already full, as when nobody reads standard output.
    fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
        use std::os::fd::AsRawFd;
        let (r, mut w) = std::io::pipe().unwrap();
        let fd = w.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a pipe descriptor this function owns.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let chunk = [b'.'; 4096];
        while w.write(&chunk).is_ok() {}
        // SAFETY: as above; back to blocking, as standard output is.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        (r, w)
    }

    #[test]
    fn test_should_never_block_the_writer_on_a_full_pipe_and_count_what_it_drops() {
        let (mut r, w) = full_pipe();
        let mut sink = Drained::new(Box::new(w), 1024).unwrap();
        // 64 KiB into a full pipe through a 1 KiB buffer: returns at once, drops most of it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..1024u32 {
                sink.write_all(format!("line {i:058}\n").as_bytes()).unwrap();
            }
            tx.send(sink).unwrap();
        });
        let sink = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("writing to a full pipe through Drained blocked");
        assert!(
            // At most two buffers' worth is accepted: one batch the drain thread holds while
            // it blocks on the pipe, and one refilled behind it.
            sink.dropped() >= 64 * 1024 - 2 * 1024,
            "dropped only {}",
            sink.dropped()
        );
        // The reader comes back: what was buffered arrives after the old pipe contents.
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&got).contains("line 0") {
            assert!(
                Instant::now() < deadline,
                "buffered output never reached the reader"
            );
            let n = r.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        let first = text.find("line ").unwrap();
        assert!(
            text[..first].bytes().all(|b| b == b'.'),
            "old pipe contents were not first"
        );
        assert!(
            text[first..].starts_with("line 000"),
            "{}",
            &text[first..first + 20]
        );
        drop(sink);
    }

    #[test]
    fn test_should_deliver_everything_that_fits_in_order() {
        let capture = Capture::default();
        let mut sink = Drained::new(Box::new(capture.clone()), 1 << 20).unwrap();
        let mut expected = String::new();
        for i in 0..1000 {
            let line = format!("COUNTER {i}\n");
            sink.write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        assert!(sink.drain(Duration::from_secs(30)));
        assert_eq!(capture.text(), expected);
        assert_eq!(sink.dropped(), 0);
    }
}
