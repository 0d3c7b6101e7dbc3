//! Firecracker's snapshot shape: a VM-state file and a memory file, at paths
//! the caller chooses; full or diff, and a merge that squashes a base and its
//! diffs into one full snapshot.
//!
//! Why this shape: it is what Firecracker's API clients hand over
//! (`snapshot_path`, `mem_file_path`), so squib's API can take the same calls.
//! The memory file is guest RAM at its guest offsets, the full size of RAM;
//! a diff writes only the pages written since the previous snapshot and
//! leaves holes elsewhere. Unlike Firecracker, correctness never depends on
//! the holes: the state file lists the extents the memory file holds, and a
//! merge copies exactly those. Every file is written under a temporary name,
//! synced and renamed, so a failed snapshot never leaves a half-written file
//! under the requested name; a diff that fails hands its pages back to the
//! dirty set so the next diff still holds them. A load or merge checks the
//! tag, version, sizes and extents before touching guest memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use squib_arch::GpaRange;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::state::{MachineState, STATE_VERSION};
use super::{GuestMemory, Machine, new_memory};

/// First bytes of a squib KVM VM-state file.
pub const STATE_MAGIC: &[u8; 8] = b"SQBKVMST";

const CHUNK: usize = 4 << 20;

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// The pages written since the previous snapshot of the same machine.
    Diff,
}

/// What a VM-state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmStateFile {
    /// Full or diff.
    pub snapshot_type: SnapshotType,
    /// The guest ranges the memory file holds, sorted and disjoint.
    pub extents: Vec<GpaRange>,
    /// vCPUs and devices.
    pub machine: MachineState,
}

/// A snapshot file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// An I/O error on a named file.
    #[error("{path}: cannot {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not what it should be, or the machine cannot provide it.
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

fn invalid(path: &Path, reason: impl Into<String>) -> SnapshotFileError {
    SnapshotFileError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Write `fill`'s output to `path` atomically (temporary name, fsync, rename, fsync dir).
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File, &Path) -> Result<(), SnapshotFileError>,
) -> Result<(), SnapshotFileError> {
    let name = path
        .file_name()
        .ok_or_else(|| invalid(path, "not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp, "create"))?;
        fill(&mut f, &tmp)?;
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

fn mem_size(memory: &GuestMemory) -> u64 {
    memory.last_addr().0 + 1
}

/// Write `ranges` of `memory` into `f` at their guest offsets.
fn write_ranges(
    memory: &GuestMemory,
    ranges: &[GpaRange],
    f: &File,
    path: &Path,
) -> Result<(), SnapshotFileError> {
    let mut buf = vec![0u8; CHUNK];
    for r in ranges {
        let mut addr = r.start();
        while addr < r.end() {
            let n = usize::try_from((r.end() - addr).min(CHUNK as u64)).unwrap_or(CHUNK);
            memory
                .read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| invalid(path, format!("reading guest memory at {addr:#x}: {e}")))?;
            f.write_all_at(&buf[..n], addr).map_err(io(path, "write"))?;
            addr += n as u64;
        }
    }
    Ok(())
}

fn write_state(path: &Path, file: &VmStateFile) -> Result<(), SnapshotFileError> {
    let body = serde_json::to_vec(file).map_err(|e| invalid(path, e.to_string()))?;
    write_atomically(path, |f, tmp| {
        f.write_all(STATE_MAGIC).map_err(io(tmp, "write"))?;
        f.write_all(&body).map_err(io(tmp, "write"))
    })
}

/// Save a paused machine, all of its memory (`Full`) or the pages written since
/// its previous snapshot (`Diff`, which needs `track_dirty_pages`).
///
/// A full snapshot of a tracking machine clears the dirty set, so the next
/// diff is relative to it.
///
/// # Errors
/// [`SnapshotFileError`] naming the file; a machine that is not paused or
/// does not track dirty pages is [`SnapshotFileError::Invalid`]. A diff that
/// fails returns its pages to the dirty set.
pub fn save(
    machine: &Machine,
    kind: SnapshotType,
    state_path: &Path,
    mem_path: &Path,
) -> Result<(), SnapshotFileError> {
    let state = machine
        .capture()
        .map_err(|e| invalid(state_path, e.to_string()))?;
    let memory = machine.memory();
    let size = mem_size(memory);
    let extents = match kind {
        SnapshotType::Full => {
            if machine.tracks_dirty_pages() {
                machine
                    .take_dirty()
                    .map_err(|e| invalid(mem_path, e.to_string()))?;
            }
            vec![GpaRange::new(0, size).map_err(|e| invalid(mem_path, e.to_string()))?]
        }
        SnapshotType::Diff => machine
            .take_dirty()
            .map_err(|e| invalid(mem_path, format!("diff snapshot: {e}")))?,
    };
    let result = write_atomically(mem_path, |f, tmp| {
        f.set_len(size).map_err(io(tmp, "size"))?;
        write_ranges(memory, &extents, f, tmp)
    })
    .and_then(|()| {
        write_state(
            state_path,
            &VmStateFile {
                snapshot_type: kind,
                extents: extents.clone(),
                machine: state,
            },
        )
    });
    if result.is_err() && kind == SnapshotType::Diff {
        machine.mark_dirty(&extents);
    }
    result
}

/// Read and validate a VM-state file.
///
/// # Errors
/// [`SnapshotFileError`] naming the file and what is wrong with it.
pub fn read_state(path: &Path) -> Result<VmStateFile, SnapshotFileError> {
    let bytes = std::fs::read(path).map_err(io(path, "read"))?;
    let body = bytes
        .strip_prefix(STATE_MAGIC)
        .ok_or_else(|| invalid(path, "not a squib KVM VM-state file (bad magic)"))?;
    let file: VmStateFile =
        serde_json::from_slice(body).map_err(|e| invalid(path, format!("cannot decode: {e}")))?;
    if file.machine.version != STATE_VERSION {
        return Err(invalid(
            path,
            format!(
                "machine state version {}, this squib reads {STATE_VERSION}",
                file.machine.version
            ),
        ));
    }
    let size = file.machine.mem_size;
    let mut end = 0;
    for e in &file.extents {
        if e.start() < end || e.end() > size {
            return Err(invalid(
                path,
                format!("extent {e:?} overlaps, is out of order or lies beyond {size} bytes of RAM"),
            ));
        }
        end = e.end();
    }
    Ok(file)
}

fn check_mem_file(path: &Path, size: u64) -> Result<File, SnapshotFileError> {
    let f = File::open(path).map_err(io(path, "open"))?;
    let len = f.metadata().map_err(io(path, "stat"))?.len();
    if len != size {
        return Err(invalid(
            path,
            format!("{len} bytes, but the VM state is for {size} bytes of guest memory"),
        ));
    }
    Ok(f)
}

/// Load a full snapshot: the machine state, and guest RAM filled from `mem_path`.
///
/// # Errors
/// [`SnapshotFileError`] naming the file and what is wrong with it (a diff
/// must be merged onto its base first), before any guest memory is allocated.
pub fn load(state_path: &Path, mem_path: &Path) -> Result<(MachineState, GuestMemory), SnapshotFileError> {
    let file = read_state(state_path)?;
    if file.snapshot_type != SnapshotType::Full {
        return Err(invalid(
            state_path,
            "a Diff snapshot: merge it onto its base first",
        ));
    }
    let size = file.machine.mem_size;
    let mut f = check_mem_file(mem_path, size)?;
    let memory = new_memory(size).map_err(|e| invalid(mem_path, e.to_string()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut addr = 0u64;
    while addr < size {
        let n = usize::try_from((size - addr).min(CHUNK as u64)).unwrap_or(CHUNK);
        f.read_exact(&mut buf[..n]).map_err(io(mem_path, "read"))?;
        memory
            .write_slice(&buf[..n], GuestAddress(addr))
            .map_err(|e| invalid(mem_path, format!("filling guest memory at {addr:#x}: {e}")))?;
        addr += n as u64;
    }
    Ok((file.machine, memory))
}

/// One snapshot's two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The VM-state file.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
}

/// Squash a full `base` and its `diffs` (oldest first) into one full snapshot
/// at `out`: the memory of the base with each diff's extents laid over it in
/// order, and the machine state of the last diff.
///
/// # Errors
/// [`SnapshotFileError`] naming the file: a base that is not full, a diff that
/// is not a diff, sizes that do not agree, or any I/O failure. Nothing is
/// written under `out`'s names unless the whole merge succeeds.
pub fn merge(
    base: &SnapshotPaths,
    diffs: &[SnapshotPaths],
    out: &SnapshotPaths,
) -> Result<(), SnapshotFileError> {
    let base_state = read_state(&base.state)?;
    if base_state.snapshot_type != SnapshotType::Full {
        return Err(invalid(
            &base.state,
            "the base of a merge must be a Full snapshot",
        ));
    }
    let size = base_state.machine.mem_size;
    let base_mem = check_mem_file(&base.mem, size)?;
    let mut layers = Vec::new();
    for d in diffs {
        let s = read_state(&d.state)?;
        if s.snapshot_type != SnapshotType::Diff {
            return Err(invalid(&d.state, "expected a Diff snapshot after the base"));
        }
        if s.machine.mem_size != size {
            return Err(invalid(
                &d.state,
                format!("{} bytes of RAM, the base has {size}", s.machine.mem_size),
            ));
        }
        let f = check_mem_file(&d.mem, size)?;
        layers.push((s, f, &d.mem));
    }
    let mut buf = vec![0u8; CHUNK];
    let copy = |from: &File, from_path: &Path, to: &File, to_path: &Path, r: GpaRange, buf: &mut [u8]| {
        let mut addr = r.start();
        while addr < r.end() {
            let n = usize::try_from((r.end() - addr).min(CHUNK as u64)).unwrap_or(CHUNK);
            from.read_exact_at(&mut buf[..n], addr)
                .map_err(io(from_path, "read"))?;
            to.write_all_at(&buf[..n], addr).map_err(io(to_path, "write"))?;
            addr += n as u64;
        }
        Ok::<(), SnapshotFileError>(())
    };
    write_atomically(&out.mem, |f, tmp| {
        f.set_len(size).map_err(io(tmp, "size"))?;
        let whole = GpaRange::new(0, size).map_err(|e| invalid(&base.state, e.to_string()))?;
        copy(&base_mem, &base.mem, f, tmp, whole, &mut buf)?;
        for (s, layer, path) in &layers {
            for &r in &s.extents {
                copy(layer, path, f, tmp, r, &mut buf)?;
            }
        }
        Ok(())
    })?;
    let machine = match layers.pop() {
        Some((s, _, _)) => s.machine,
        None => base_state.machine,
    };
    write_state(
        &out.state,
        &VmStateFile {
            snapshot_type: SnapshotType::Full,
            extents: vec![GpaRange::new(0, size).map_err(|e| invalid(&out.state, e.to_string()))?],
            machine,
        },
    )
}
