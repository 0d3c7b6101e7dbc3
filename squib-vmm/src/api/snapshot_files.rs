//! Firecracker's snapshot shape: a VM-state file and a memory file, at paths
//! the API client chooses.
//!
//! The state file is a magic tag followed by the machine state's bytes (which
//! carry their own version); the memory file is guest RAM, byte for byte from
//! guest address 0, as Firecracker writes it. Both are written under a
//! temporary name, synced and renamed, so a failed snapshot never leaves a
//! half-written file under the requested name. A load checks the tag, the
//! version and the memory file's size before it touches guest memory.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use squib_kvm_sim::machine::{GuestMemory, Machine, MachineState, new_memory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// First bytes of a squib KVM VM-state file.
pub const STATE_MAGIC: &[u8; 8] = b"SQBKVMST";

const CHUNK: usize = 4 << 20;

/// A snapshot file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// An I/O error on a named file.
    #[error("{path}: {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not what it should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotFileError {
    let path = path.to_owned();
    move |source| SnapshotFileError::Io { path, what, source }
}

/// Write `fill`'s output to `path` atomically (temporary name, fsync, rename, fsync dir).
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<(), SnapshotFileError>,
) -> Result<(), SnapshotFileError> {
    let name = path
        .file_name()
        .ok_or_else(|| SnapshotFileError::Invalid {
            path: path.to_owned(),
            reason: "not a file path".to_owned(),
        })?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp, "create"))?;
        fill(&mut f)?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "rename into place"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "fsync directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Save a paused machine: its state to `state_path`, its RAM to `mem_path`.
///
/// # Errors
/// [`SnapshotFileError`] naming the file; the machine's own capture error as
/// [`SnapshotFileError::Invalid`].
pub fn save(machine: &Machine, state_path: &Path, mem_path: &Path) -> Result<(), SnapshotFileError> {
    let state = machine.capture().map_err(|e| SnapshotFileError::Invalid {
        path: state_path.to_owned(),
        reason: e.to_string(),
    })?;
    let memory = machine.memory();
    write_atomically(mem_path, |f| {
        let size = memory.last_addr().0 + 1;
        let mut buf = vec![0u8; CHUNK];
        let mut addr = 0u64;
        while addr < size {
            let n = usize::try_from((size - addr).min(CHUNK as u64)).unwrap_or(CHUNK);
            memory
                .read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| SnapshotFileError::Invalid {
                    path: mem_path.to_owned(),
                    reason: format!("reading guest memory at {addr:#x}: {e}"),
                })?;
            f.write_all(&buf[..n]).map_err(io(mem_path, "write"))?;
            addr += n as u64;
        }
        Ok(())
    })?;
    write_atomically(state_path, |f| {
        f.write_all(STATE_MAGIC).map_err(io(state_path, "write"))?;
        f.write_all(&state.to_bytes()).map_err(io(state_path, "write"))
    })
}

/// Read a snapshot written by [`save`]: the state, and guest RAM filled from `mem_path`.
///
/// # Errors
/// [`SnapshotFileError`] naming the file and what is wrong with it, before any
/// guest memory is allocated or written.
pub fn load(state_path: &Path, mem_path: &Path) -> Result<(MachineState, GuestMemory), SnapshotFileError> {
    let bytes = std::fs::read(state_path).map_err(io(state_path, "read"))?;
    let body = bytes
        .strip_prefix(STATE_MAGIC)
        .ok_or_else(|| SnapshotFileError::Invalid {
            path: state_path.to_owned(),
            reason: "not a squib KVM VM-state file (bad magic)".to_owned(),
        })?;
    let state = MachineState::from_bytes(body).map_err(|e| SnapshotFileError::Invalid {
        path: state_path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut f = File::open(mem_path).map_err(io(mem_path, "open"))?;
    let len = f.metadata().map_err(io(mem_path, "stat"))?.len();
    if len != state.mem_size {
        return Err(SnapshotFileError::Invalid {
            path: mem_path.to_owned(),
            reason: format!(
                "{len} bytes, but the VM state is for {} bytes of guest memory",
                state.mem_size
            ),
        });
    }
    let memory = new_memory(state.mem_size).map_err(|e| SnapshotFileError::Invalid {
        path: mem_path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut buf = vec![0u8; CHUNK];
    let mut addr = 0u64;
    while addr < len {
        let n = usize::try_from((len - addr).min(CHUNK as u64)).unwrap_or(CHUNK);
        f.read_exact(&mut buf[..n]).map_err(io(mem_path, "read"))?;
        memory
            .write_slice(&buf[..n], GuestAddress(addr))
            .map_err(|e| SnapshotFileError::Invalid {
                path: mem_path.to_owned(),
                reason: format!("filling guest memory at {addr:#x}: {e}"),
            })?;
        addr += n as u64;
    }
    Ok((state, memory))
}
