//! Firecracker's HTTP API on a Unix socket, for what squib's KVM machine has.
//!
//! Endpoints: `GET /`, `GET /version`, `GET /vm/config`,
//! `GET|PUT|PATCH /machine-config`, `PUT /boot-source`, `PUT /logger`,
//! `PUT /metrics`, `PUT /serial`, `PUT /actions` (`InstanceStart`,
//! `FlushMetrics`), `PATCH /vm` (`Paused`/`Resumed`), `PUT /snapshot/create`
//! and `PUT /snapshot/load` (`mem_backend` `File` or `Uffd`), with
//! Firecracker's body shapes and `{"fault_message": ...}` errors; the devices
//! squib lacks answer 400 saying so (`specs/19-firecracker-api.md`). Each connection gets a thread;
//! requests are served one at a time against one [`vmm::Vmm`], as in
//! Firecracker, so a client never sees a half-applied change.

pub mod http;
pub mod metrics;
pub mod vmm;

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;

use http::{HttpError, Response, read_request_answering};
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
            Ok(req) => vmm.lock().handle(&req),
            Err(HttpError::Closed | HttpError::Io(_)) => return,
            Err(e @ HttpError::Bad(_)) => {
                let _ = Response::fault(400, &e.to_string()).write_to(&mut writer);
                return;
            }
        };
        if response.write_to(&mut writer).is_err() {
            return;
        }
    }
}

/// Serve the API on `sock` until `run_for` has passed (forever without it).
///
/// A guest that fails is stopped and the API keeps answering (saying why); the run then ends
/// with that failure as its error when `run_for` has passed.
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
        let mut vmm = vmm.lock();
        vmm.tick();
        if run_for.is_some_and(|d| started.elapsed() >= d) {
            if let Some(why) = vmm.failure() {
                bail!("guest failed: {why}");
            }
            return Ok(());
        }
    }
}
