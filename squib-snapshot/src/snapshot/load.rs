//! Opening snapshots and following chains, validating everything before use.
//!
//! A snapshot is named by its state file, or by a directory holding one called `state` (squib's
//! own layout). The state file records where its memory file and its parent's state file are,
//! relative to its own directory or absolute; a caller may name the memory file instead (as
//! Firecracker's load does), and the file found there must still carry the snapshot's id.
//!
//! Why the memory file is checked here too: an extent is only meaningful if its bytes exist, so
//! a snapshot is not "open" until its memory file is known to be exactly as long as its layout
//! plus the identity trailer, and that trailer names this snapshot (one small read, so a swapped
//! file or one an in-place merge has overwritten is refused even by a lazy load). Checksums are
//! checked later, as bytes are read (eager restore, verify, merge), because reading a whole
//! memory file up front would defeat lazy restore.
//!
//! Why a loaded snapshot holds no open file: a chain can have thousands of members, more than a
//! process may have descriptors open. Loading checks each memory file by `stat`; a reader opens
//! one member's memory file at a time ([`LoadedSnapshot::open_memory`]) and checks it again on
//! the descriptor it reads from (the file may have been replaced in between).

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use squib_arch::PageGeometry;
use xxhash_rust::xxh3::Xxh3;

use super::format::{
    Extent, HEADER_LEN, MAX_STATE_FILE, MEMORY_TRAILER_USED, MemoryTrailer, SnapshotKind, SnapshotState,
};
use super::save::CHUNK;
use super::{MAX_CHAIN_LEN, STATE_FILE, SnapshotError};

/// Receives each chunk of an extent as it is read: its guest address and bytes.
pub type ChunkSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), SnapshotError> + 'a;

/// One snapshot, validated: its state decoded and checked, its memory file a regular file of
/// the right length whose trailer names this snapshot. No file stays open (see the module docs).
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// What names the snapshot: its directory (squib's layout, a state file called `state`) or
    /// its state file.
    pub path: PathBuf,
    /// Its state file.
    pub state_path: PathBuf,
    /// Its memory file.
    pub memory_path: PathBuf,
    /// The decoded, validated state.
    pub state: SnapshotState,
}

/// A snapshot's memory file, open for reading and checked against its layout again.
#[derive(Debug)]
pub struct MemoryFile<'a> {
    snapshot: &'a LoadedSnapshot,
    file: File,
}

/// The state file `path` names: `path/state` when `path` is a directory (squib's layout),
/// otherwise `path` itself.
#[must_use]
pub fn state_file_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(STATE_FILE)
    } else {
        path.to_path_buf()
    }
}

/// What names the snapshot whose state file is `state_path`: the directory for squib's layout
/// (a state file called `state`), otherwise the state file.
#[must_use]
pub fn snapshot_name(state_path: &Path) -> PathBuf {
    match (state_path.file_name(), state_path.parent()) {
        (Some(n), Some(dir)) if n == STATE_FILE && !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => state_path.to_path_buf(),
    }
}

/// The directory holding `file` (`.` for a bare name).
pub(crate) fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A path recorded in the state file at `state_path`, resolved: absolute as it is, relative
/// against the directory holding the state file, with `..` taken lexically (as the writer
/// computed it: `../000000-full/state` beside `SNAPS/000001-diff/state` is
/// `SNAPS/000000-full/state`, whatever symlinks are on the way).
#[must_use]
pub fn resolve_recorded(state_path: &Path, recorded: &str) -> PathBuf {
    use std::path::Component;
    let p = Path::new(recorded);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = dir_of(state_path).to_path_buf();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl LoadedSnapshot {
    /// Open and validate the snapshot `path` names (a directory holding `state`, or a state
    /// file), its memory file where the state file says.
    ///
    /// # Errors
    /// A [`SnapshotError`] naming the file and the reason.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        Self::open_with_memory(path, None)
    }

    /// Open and validate the snapshot `path` names, its memory file at `memory` when given (a
    /// moved memory file, or Firecracker's `mem_file_path`), else where the state file says.
    ///
    /// # Errors
    /// A [`SnapshotError`] naming the file and the reason: a missing memory file, one of the
    /// wrong length, or one holding another snapshot's memory among them.
    pub fn open_with_memory(path: &Path, memory: Option<&Path>) -> Result<Self, SnapshotError> {
        Self::open_state_file(state_file_of(path), memory)
    }

    /// [`LoadedSnapshot::open_with_memory`] of exactly this state file (a recorded parent path
    /// names a state file, never a directory).
    fn open_state_file(state_path: PathBuf, memory: Option<&Path>) -> Result<Self, SnapshotError> {
        let state = read_state(&state_path)?;
        let memory_path =
            memory.map_or_else(|| resolve_recorded(&state_path, &state.memory), Path::to_path_buf);
        let snap = Self {
            path: snapshot_name(&state_path),
            state_path,
            memory_path,
            state,
        };
        snap.check_memory()?;
        Ok(snap)
    }

    /// Open the memory file and check it; the open file is dropped, or kept by the caller.
    fn check_memory(&self) -> Result<File, SnapshotError> {
        let path = &self.memory_path;
        let md = match std::fs::metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::MissingMemory {
                    path: path.clone(),
                    state: self.state_path.clone(),
                });
            }
            Err(e) => return Err(SnapshotError::io(path, "open")(e)),
        };
        if !md.is_file() {
            return Err(SnapshotError::NotRegularFile { path: path.clone() });
        }
        let file = File::open(path).map_err(SnapshotError::io(path, "open"))?;
        let md = file.metadata().map_err(SnapshotError::io(path, "stat"))?;
        if !md.is_file() {
            return Err(SnapshotError::NotRegularFile { path: path.clone() });
        }
        check_memory_len(&self.state, path, md.len())?;
        let trailer = read_trailer(&file, path, self.state.layout_bytes())?;
        if trailer.id != self.state.id {
            return Err(SnapshotError::MemoryMismatch {
                path: path.clone(),
                state: self.state_path.clone(),
                found: trailer.id,
                expected: self.state.id,
            });
        }
        Ok(file)
    }

    /// Open the memory file for reading, checking it again on the open descriptor (regular, of
    /// the layout's length, its trailer naming this snapshot).
    ///
    /// # Errors
    /// [`SnapshotError::Io`], [`SnapshotError::NotRegularFile`], a length error, or
    /// [`SnapshotError::MemoryMismatch`], naming the memory file.
    pub fn open_memory(&self) -> Result<MemoryFile<'_>, SnapshotError> {
        let file = self.check_memory()?;
        Ok(MemoryFile { snapshot: self, file })
    }
}

/// Read and decode the identity trailer at `offset` of the memory file `file`.
///
/// # Errors
/// [`SnapshotError::Io`] or [`SnapshotError::BadMemoryIdentity`] naming the file.
pub fn read_trailer(file: &File, path: &Path, offset: u64) -> Result<MemoryTrailer, SnapshotError> {
    let mut bytes = [0u8; MEMORY_TRAILER_USED];
    file.read_exact_at(&mut bytes, offset)
        .map_err(SnapshotError::io(path, "read identity trailer"))?;
    let bad = |source| SnapshotError::BadMemoryIdentity {
        path: path.to_path_buf(),
        offset,
        source,
    };
    let trailer = MemoryTrailer::decode(&bytes).map_err(bad)?;
    if trailer.layout_bytes != offset {
        return Err(bad(super::FormatError::Trailer(
            "written for a memory layout of another size",
        )));
    }
    Ok(trailer)
}

/// Every extent inside the memory file, and the file exactly the layout's size plus the
/// identity trailer.
fn check_memory_len(state: &SnapshotState, memory_path: &Path, file_len: u64) -> Result<(), SnapshotError> {
    for e in &state.extents {
        // validate() has placed every extent inside one region, so this cannot fail.
        let offset = state.file_offset_of(e.gpa).unwrap_or(u64::MAX);
        if offset.saturating_add(e.len) > file_len {
            return Err(SnapshotError::ExtentPastMemoryFile {
                path: memory_path.to_path_buf(),
                gpa: e.gpa,
                len: e.len,
                offset,
                file_len,
            });
        }
    }
    let expected = state.memory_file_len();
    if file_len != expected {
        return Err(SnapshotError::MemoryFileLength {
            path: memory_path.to_path_buf(),
            expected,
            actual: file_len,
            reason: if file_len < expected {
                "shorter than its layout and identity trailer"
            } else {
                "longer than its layout and identity trailer"
            },
        });
    }
    Ok(())
}

impl MemoryFile<'_> {
    /// The open file.
    #[must_use]
    pub const fn file(&self) -> &File {
        &self.file
    }

    /// Read one extent in chunks, handing each chunk (with its guest address) to `sink`, and
    /// check the extent's xxh3 at the end. `sink` may see bytes of an extent that then fails its
    /// checksum: callers write only into memory they discard on error.
    ///
    /// # Errors
    /// [`SnapshotError::Io`] or [`SnapshotError::Checksum`] naming the memory file.
    pub fn read_extent(
        &self,
        extent: &Extent,
        buf: &mut Vec<u8>,
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), SnapshotError> {
        buf.resize(CHUNK, 0);
        let base = self
            .snapshot
            .state
            .file_offset_of(extent.gpa)
            .ok_or_else(|| SnapshotError::Format {
                path: self.snapshot.state_path.clone(),
                source: super::FormatError::Invalid("extent outside the layout".into()),
            })?;
        let mut hasher = Xxh3::new();
        let mut done = 0u64;
        while done < extent.len {
            let n = usize::try_from((extent.len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..n];
            self.file
                .read_exact_at(chunk, base + done)
                .map_err(SnapshotError::io(&self.snapshot.memory_path, "read"))?;
            hasher.update(chunk);
            sink(extent.gpa + done, chunk)?;
            done += n as u64;
        }
        let found = hasher.digest();
        if found != extent.xxh3 {
            return Err(SnapshotError::Checksum {
                path: self.snapshot.memory_path.clone(),
                gpa: extent.gpa,
                len: extent.len,
                expected: extent.xxh3,
                found,
            });
        }
        Ok(())
    }
}

/// Open a file for reading, refusing anything but a regular file first (a FIFO would block the
/// open, a device could be endless).
fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    let md = std::fs::metadata(path).map_err(SnapshotError::io(path, "open"))?;
    if !md.is_file() {
        return Err(SnapshotError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    File::open(path).map_err(SnapshotError::io(path, "open"))
}

/// Read, decode and validate one state file alone (no memory file, no chain), refusing one above
/// the cap before reading it. For callers that hand the memory to someone else, such as a
/// page-fault handler.
///
/// # Errors
/// A [`SnapshotError`] naming the file: not a regular file, too large, or not a valid state.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(SnapshotError::io(path, "stat"))?.len();
    if len > MAX_STATE_FILE {
        return Err(SnapshotError::StateTooLarge {
            path: path.to_path_buf(),
            len,
            cap: MAX_STATE_FILE,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(HEADER_LEN));
    f.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(SnapshotError::io(path, "read"))?;
    SnapshotState::decode(&bytes).map_err(|source| SnapshotError::Format {
        path: path.to_path_buf(),
        source,
    })
}

/// A chain: a full base and the diffs on top of it, base first, every link checked.
#[derive(Debug)]
pub struct Chain {
    /// Base first, leaf last.
    pub members: Vec<LoadedSnapshot>,
}

impl Chain {
    /// Load the chain ending at `leaf` (a directory holding `state`, or a state file),
    /// following parent references back to a full base.
    ///
    /// Checks: every state file and memory file (see [`LoadedSnapshot::open`]); each parent
    /// exists and has the id the child names; no snapshot is reached twice; every member has the
    /// base's backend, geometry and layout.
    ///
    /// # Errors
    /// The first [`SnapshotError`] found, naming the file.
    pub fn load(leaf: &Path) -> Result<Self, SnapshotError> {
        Self::load_with_memory(leaf, None)
    }

    /// [`Chain::load`], the leaf's memory file at `memory` when given (Firecracker's
    /// `mem_file_path`) instead of where its state file says; its parents' are where theirs say.
    ///
    /// # Errors
    /// As [`Chain::load`].
    pub fn load_with_memory(leaf: &Path, memory: Option<&Path>) -> Result<Self, SnapshotError> {
        let mut members: Vec<LoadedSnapshot> = Vec::new();
        let mut ids = HashSet::new();
        let mut files = HashSet::new();
        let mut cur = LoadedSnapshot::open_with_memory(leaf, memory)?;
        loop {
            if members.len() >= MAX_CHAIN_LEN {
                return Err(SnapshotError::ChainTooLong { path: cur.state_path });
            }
            let canonical = std::fs::canonicalize(&cur.state_path).unwrap_or_else(|_| cur.state_path.clone());
            if !ids.insert(cur.state.id) || !files.insert(canonical) {
                return Err(SnapshotError::Cycle {
                    id: cur.state.id,
                    path: cur.state_path,
                });
            }
            let Some(parent) = cur.state.parent.clone() else {
                members.push(cur);
                break;
            };
            let parent_state = resolve_recorded(&cur.state_path, &parent.state);
            if parent_state.symlink_metadata().is_err() {
                return Err(SnapshotError::MissingParent {
                    path: cur.state_path,
                    parent: parent_state,
                    id: parent.id,
                });
            }
            let next = LoadedSnapshot::open_state_file(parent_state.clone(), None)?;
            if next.state.id != parent.id {
                return Err(SnapshotError::ParentMismatch {
                    path: cur.state_path,
                    parent: parent_state,
                    expected: parent.id,
                    found: next.state.id,
                });
            }
            members.push(cur);
            cur = next;
        }
        members.reverse();
        let chain = Self { members };
        debug_assert_eq!(chain.base().state.kind, SnapshotKind::Full);
        let base = &chain.base().state;
        for m in &chain.members[1..] {
            check_same(&m.state_path, "backend", &base.backend, &m.state.backend)?;
            check_same(
                &m.state_path,
                "geometry",
                &geometry_name(&base.geometry),
                &geometry_name(&m.state.geometry),
            )?;
            if m.state.layout != base.layout {
                return Err(SnapshotError::Incompatible {
                    path: m.state_path.clone(),
                    what: "memory layout",
                    expected: layout_name(&base.layout),
                    found: layout_name(&m.state.layout),
                });
            }
        }
        Ok(chain)
    }

    /// The full snapshot at the bottom.
    #[must_use]
    pub fn base(&self) -> &LoadedSnapshot {
        &self.members[0]
    }

    /// The newest snapshot (whose vCPU and device state a restore resumes from).
    #[must_use]
    pub fn leaf(&self) -> &LoadedSnapshot {
        &self.members[self.members.len() - 1]
    }

    /// Refuse the chain unless it was made by `backend` with `geometry` (each when given).
    ///
    /// # Errors
    /// [`SnapshotError::Incompatible`] naming the leaf's state file.
    pub fn check_target(
        &self,
        backend: Option<&str>,
        geometry: Option<&PageGeometry>,
    ) -> Result<(), SnapshotError> {
        let leaf = self.leaf();
        if let Some(b) = backend {
            check_same(&leaf.state_path, "backend", b, &leaf.state.backend)?;
        }
        if let Some(g) = geometry {
            check_same(
                &leaf.state_path,
                "geometry",
                &geometry_name(g),
                &geometry_name(&leaf.state.geometry),
            )?;
        }
        Ok(())
    }
}

fn check_same(path: &Path, what: &'static str, expected: &str, found: &str) -> Result<(), SnapshotError> {
    if expected == found {
        Ok(())
    } else {
        Err(SnapshotError::Incompatible {
            path: path.to_path_buf(),
            what,
            expected: expected.to_owned(),
            found: found.to_owned(),
        })
    }
}

/// A geometry as text: `name (granule G, hot H, block B, host page P)`.
#[must_use]
pub fn geometry_name(g: &PageGeometry) -> String {
    format!(
        "{} (granule {:#x}, hot {:#x}, block {:#x}, host page {:#x})",
        g.name(),
        g.granule,
        g.tracking_hot,
        g.tracking_default,
        g.host_page
    )
}

fn layout_name(layout: &[super::RegionLayout]) -> String {
    layout
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.gpa, r.len))
        .collect::<Vec<_>>()
        .join(", ")
}
