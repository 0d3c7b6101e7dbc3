//! Firecracker's HTTP API on a Unix socket, for what squib's KVM machine has.
//!
//! Endpoints: `GET /`, `GET /version`, `GET /vm/config`,
//! `GET|PUT|PATCH /machine-config`, `PUT /boot-source`, `PUT /logger`,
//! `PUT /metrics`, `PUT /serial`, `PUT /actions` (`InstanceStart`,
//! `FlushMetrics`), `PATCH /vm` (`Paused`/`Resumed`), `PUT /snapshot/create`
//! and `PUT /snapshot/load` (`mem_backend` `File` or `Uffd`), with
//! Firecracker's body shapes and `{"fault_message": ...}` errors; the devices
//! squib lacks answer 400 saying so (`specs/19-firecracker-api.md`). A few connections are served at
//! once, each on a thread of its own and each with a deadline ([`server`] says
//! why and how many); requests are applied one at a time against one
//! [`vmm::Vmm`], as in Firecracker, so a client never sees a half-applied change.

pub use squib_vmm::api::http;
pub mod metrics;
pub mod server;
pub mod vmm;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;

use server::Limits;
use vmm::Vmm;

/// Removes the socket file when the server ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bind `sock` so that its path appears only once it accepts connections.
///
/// Why: clients (Firecracker's SDKs, curl scripts, our tests) wait for the socket file to exist
/// and then connect. `bind(2)` creates the file before `listen(2)` runs, so a client can find it
/// and get "connection refused". Binding under a temporary name in the same directory and
/// renaming it into place after `listen` closes that window; the rename also refuses to run
/// if `sock` appeared meanwhile (link, then unlink the temporary name).
fn bind_listening(sock: &Path) -> anyhow::Result<UnixListener> {
    let name = sock
        .file_name()
        .with_context(|| format!("--api-sock {}: not a file path", sock.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".squib-bind-{}", std::process::id()));
    let tmp = sock.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).with_context(|| format!("--api-sock {}", sock.display()))?;
    // link(2) fails if `sock` exists: never replace a socket someone else made meanwhile.
    let linked = std::fs::hard_link(&tmp, sock);
    let _ = std::fs::remove_file(&tmp);
    linked.with_context(|| format!("--api-sock {}", sock.display()))?;
    Ok(listener)
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
    let listener = bind_listening(sock)?;
    let _cleanup = SocketFile(sock.to_owned());
    let vmm = Arc::new(Mutex::new(vmm));
    let acceptor = {
        let vmm = Arc::clone(&vmm);
        server::spawn(listener, Limits::default(), move |req| vmm.lock().handle(req))
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
