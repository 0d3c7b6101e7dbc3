//! Firecracker's HTTP API on a Unix socket, for what squib's KVM machine has.
//!
//! Endpoints: `GET /`, `GET|PUT /machine-config`, `PUT /boot-source`,
//! `PUT /actions` (`InstanceStart`), `PATCH /vm` (`Paused`/`Resumed`),
//! `PUT /snapshot/create` and `PUT /snapshot/load`, with Firecracker's body
//! shapes and `{"fault_message": ...}` errors. Each connection gets a thread;
//! requests are served one at a time against one [`vmm::Vmm`], as in
//! Firecracker, so a client never sees a half-applied change.

pub use squib_vmm::api::http;
pub mod vmm;

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;

use http::{Connection, HttpError, Response, read_request_answering};
use vmm::Vmm;

/// Removes the socket file when the server ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn serve_connection(stream: UnixStream, vmm: &Mutex<Vmm>) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(stream);
    loop {
        let response = match read_request_answering(&mut reader, &mut writer) {
            Ok(req) if req.keep_alive => vmm.lock().handle(&req),
            Ok(req) => {
                let _ = vmm.lock().handle(&req).write_to(&mut writer, Connection::Close);
                return;
            }
            Err(HttpError::Closed | HttpError::Idle | HttpError::TimedOut | HttpError::Io(_)) => return,
            Err(e @ HttpError::Bad(_)) => {
                let _ = Response::fault(400, &e.to_string()).write_to(&mut writer, Connection::Close);
                return;
            }
        };
        if response.write_to(&mut writer, Connection::KeepAlive).is_err() {
            return;
        }
    }
}

/// Serve the API on `sock` until `run_for` has passed (forever without it) or the
/// guest fails.
///
/// # Errors
/// The socket cannot be created (it exists already, or the directory is
/// missing), or the guest failed.
pub fn serve(sock: &Path, vmm: Vmm, run_for: Option<Duration>) -> anyhow::Result<()> {
    if sock.exists() {
        bail!("--api-sock {}: already exists", sock.display());
    }
    let listener = UnixListener::bind(sock).with_context(|| format!("--api-sock {}", sock.display()))?;
    let _cleanup = SocketFile(sock.to_owned());
    let vmm = Arc::new(Mutex::new(vmm));
    // Accept on a thread of its own, blocking: a polling accept would add its polling period to
    // every API call (a snapshot create is a few milliseconds).
    let acceptor = {
        let vmm = Arc::clone(&vmm);
        std::thread::Builder::new()
            .name("squib-api-accept".to_owned())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else {
                        // EMFILE and the like: do not spin.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let vmm = Arc::clone(&vmm);
                    let _ = std::thread::Builder::new()
                        .name("squib-api".to_owned())
                        .spawn(move || serve_connection(stream, &vmm));
                }
            })
            .context("starting the API accept thread")?
    };
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(10));
        if acceptor.is_finished() {
            bail!("--api-sock {}: the accept thread ended", sock.display());
        }
        if let Some(why) = vmm.lock().failure() {
            bail!("guest failed: {why}");
        }
        if run_for.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
    }
}
