//! Shared by the Firecracker-API tests: a `squib run --api-sock` process with a client whose
//! every call has a read timeout, and a page-fault handler written the way Firecracker's users
//! write theirs (a thread here: it accepts on a socket, receives the mappings and the
//! userfaultfd, and copies pages in from the memory file).
#![allow(dead_code, missing_docs)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long anything may take before the test fails saying what did not happen.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A `squib run --api-sock` process, killed (SIGKILL) when dropped.
pub struct Squib {
    pub child: Child,
    pub sock: PathBuf,
    pub serial: PathBuf,
}

impl Squib {
    pub fn spawn(dir: &Path, name: &str) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.com1"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_squib"))
            .args(["run", "--backend", "kvm", "--api-sock"])
            .arg(&sock)
            .arg("--serial-file")
            .arg(&serial)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn squib");
        let deadline = Instant::now() + TIMEOUT;
        while !sock.exists() {
            if let Some(status) = child.try_wait().expect("poll squib") {
                panic!("squib ended before serving {}: {status}", sock.display());
            }
            assert!(Instant::now() < deadline, "no API socket {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, sock, serial }
    }

    /// Send one request; returns the status and the body.
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        // A call that hangs fails the test with a message instead of hanging it.
        s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        let head = if body.is_empty() {
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
        } else {
            format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
        };
        s.write_all(head.as_bytes()).expect("send");
        s.write_all(body.as_bytes()).expect("send body");
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status)
            .unwrap_or_else(|e| panic!("{method} {path}: no reply within {TIMEOUT:?}: {e}"));
        let code: u16 = status
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: status line {status:?}"));
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, v)) = h.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("body");
        (code, String::from_utf8(body).expect("utf-8"))
    }

    /// A call that must answer 204.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, reply) = self.call(method, path, body);
        assert_eq!(code, 204, "{method} {path} {body}: {reply}");
    }

    /// A call that must answer 200 with JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (code, reply) = self.call("GET", path, "");
        assert_eq!(code, 200, "GET {path}: {reply}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("GET {path}: {e}: {reply}"))
    }

    /// A call that must answer 400; returns the `fault_message`.
    pub fn fault(&self, method: &str, path: &str, body: &str) -> String {
        let (code, reply) = self.call(method, path, body);
        assert_eq!(
            code, 400,
            "{method} {path} {body}: expected 400, got {code}: {reply}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{method} {path}: {e}: {reply}"));
        v["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no fault_message in {reply}"))
            .to_owned()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn wait_console(&self, mut done: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.console();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "console of {} never got there:\n{text}",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll `GET /` until `done` holds on its body.
    pub fn wait_info(
        &self,
        what: &str,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.get("/");
            if done(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "{what}: GET / never showed it: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Squib {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Firecracker's `GuestRegionUffdMapping`, as a handler written for Firecracker declares it
/// (its own copy: the test checks squib's JSON against Firecracker's names, not squib's type).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Mapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
}

/// What a handler saw and did.
#[derive(Debug, Default)]
pub struct HandlerReport {
    /// The handshake's JSON body as received.
    pub handshake: Option<serde_json::Value>,
    /// Whether a file descriptor came with it.
    pub got_fd: bool,
    /// Distinct pages copied in.
    pub pages: BTreeSet<u64>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// How the handler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Copy every faulting page in from the memory file.
    Pages,
    /// Accept and read the handshake, keep the connection, never resolve a fault.
    Nothing,
}

/// A page-fault handler thread listening on a socket.
pub struct Handler {
    thread: Option<JoinHandle<HandlerReport>>,
    die: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
}

impl Handler {
    /// Listen on `sock` (bound before this returns) and serve faults from `mem_file`.
    pub fn spawn(sock: &Path, mem_file: &Path, serve: Serve) -> Self {
        let listener = UnixListener::bind(sock).expect("bind handler socket");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let mem = File::open(mem_file).expect("open memory file");
        let die = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let thread = {
            let (die, served, connected) = (Arc::clone(&die), Arc::clone(&served), Arc::clone(&connected));
            std::thread::spawn(move || {
                let mut report = HandlerReport::default();
                if let Err(e) = run_handler(&listener, &mem, serve, &die, &served, &connected, &mut report) {
                    report.error = Some(e);
                }
                report
            })
        };
        Self {
            thread: Some(thread),
            die,
            served,
            connected,
        }
    }

    /// Pages copied in so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether squib has connected and the handshake was read.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Stop: close the connection and the handler's copy of the userfaultfd, as a handler
    /// process that dies would. Returns what it saw.
    pub fn die(mut self) -> HandlerReport {
        self.die.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("handler thread")
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.die.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&raw mut p, 1, ms) };
    n > 0
}

fn run_handler(
    listener: &UnixListener,
    mem: &File,
    serve: Serve,
    die: &AtomicBool,
    served: &AtomicU64,
    connected: &AtomicBool,
    report: &mut HandlerReport,
) -> Result<(), String> {
    // Accept, waiting in slices so that `die` is seen.
    let stream = loop {
        if die.load(Ordering::Relaxed) {
            return Ok(());
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), 10);
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    // Firecracker's example handlers read the handshake into 1 KiB.
    let mut buf = vec![0u8; 1024];
    let (n, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("recv_with_fd: {e}"))?;
    let body: serde_json::Value =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("handshake is not JSON: {e}"))?;
    report.handshake = Some(body.clone());
    report.got_fd = file.is_some();
    let file = file.ok_or("no file descriptor with the handshake")?;
    let mappings: Vec<Mapping> = serde_json::from_value(body).map_err(|e| format!("mappings: {e}"))?;
    // SAFETY: the descriptor came with the handshake and is a userfaultfd; the Uffd takes it over.
    let uffd = unsafe { Uffd::from_raw_fd(file.into_raw_fd()) };
    connected.store(true, Ordering::Relaxed);
    let mut page = vec![0u8; 4096];
    while !die.load(Ordering::Relaxed) {
        if !wait_readable(uffd.as_raw_fd(), 10) || serve == Serve::Nothing {
            continue;
        }
        let event = match uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => return Err(format!("read_event: {e}")),
        };
        let Event::Pagefault { addr, .. } = event else {
            continue;
        };
        let fault = addr as u64;
        let m = mappings
            .iter()
            .find(|m| (m.base_host_virt_addr..m.base_host_virt_addr + m.size).contains(&fault))
            .ok_or_else(|| format!("fault at {fault:#x} outside every mapping"))?;
        let start = fault & !(m.page_size - 1);
        page.resize(usize::try_from(m.page_size).map_err(|e| e.to_string())?, 0);
        mem.read_exact_at(&mut page, m.offset + (start - m.base_host_virt_addr))
            .map_err(|e| format!("reading the memory file: {e}"))?;
        // SAFETY: `page` holds page_size bytes; `start` is a page of the registered range the
        // fault named, in squib's address space (UFFDIO_COPY writes it there).
        let r = unsafe { uffd.copy(page.as_ptr().cast(), start as *mut libc::c_void, page.len(), true) };
        match r {
            Ok(_) => {
                report.pages.insert(start);
                served.fetch_add(1, Ordering::Relaxed);
            }
            // Another fault on the same page was resolved first.
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {}
            Err(e) => return Err(format!("UFFDIO_COPY at {start:#x}: {e}")),
        }
    }
    // Dying: the stream and the userfaultfd close here.
    drop(uffd);
    drop(stream);
    Ok(())
}
