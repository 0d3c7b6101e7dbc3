//! Opening snapshot directories and following chains, validating everything before use.
//!
//! Why the memory file is checked here too: an extent is only meaningful if its bytes exist, so
//! a snapshot is not "open" until its memory file is known to be exactly as long as its layout.
//! Checksums are checked later, as bytes are read (eager restore, verify, merge), because reading
//! a whole memory file up front would defeat lazy restore.
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

use super::format::{Extent, HEADER_LEN, MAX_STATE_FILE, SnapshotKind, SnapshotState};
use super::save::CHUNK;
use super::{MAX_CHAIN_LEN, MEMORY_FILE, STATE_FILE, SnapshotError};

/// Receives each chunk of an extent as it is read: its guest address and bytes.
pub type ChunkSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), SnapshotError> + 'a;

/// One snapshot directory, validated: its state decoded and checked, its memory file a regular
/// file of the right length. No file stays open (see the module docs).
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The directory.
    pub dir: PathBuf,
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

impl LoadedSnapshot {
    /// Open and validate the snapshot in `dir`.
    ///
    /// # Errors
    /// A [`SnapshotError`] naming the file and the reason.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        let state = read_state(&state_path)?;
        let memory_path = dir.join(MEMORY_FILE);
        let md = std::fs::metadata(&memory_path).map_err(SnapshotError::io(&memory_path, "open"))?;
        if !md.is_file() {
            return Err(SnapshotError::NotRegularFile { path: memory_path });
        }
        check_memory_len(&state, &memory_path, md.len())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            state_path,
            memory_path,
            state,
        })
    }

    /// Open the memory file for reading, checking it again on the open descriptor (regular, of
    /// the layout's length).
    ///
    /// # Errors
    /// [`SnapshotError::Io`], [`SnapshotError::NotRegularFile`], or a length error naming the
    /// memory file.
    pub fn open_memory(&self) -> Result<MemoryFile<'_>, SnapshotError> {
        let file = open_regular(&self.memory_path)?;
        let md = file
            .metadata()
            .map_err(SnapshotError::io(&self.memory_path, "stat"))?;
        if !md.is_file() {
            return Err(SnapshotError::NotRegularFile {
                path: self.memory_path.clone(),
            });
        }
        check_memory_len(&self.state, &self.memory_path, md.len())?;
        Ok(MemoryFile { snapshot: self, file })
    }
}

/// Every extent inside the memory file, and the file exactly the layout's size.
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
    let expected = state.layout_bytes();
    if file_len != expected {
        return Err(SnapshotError::MemoryFileLength {
            path: memory_path.to_path_buf(),
            expected,
            actual: file_len,
            reason: if file_len < expected {
                "shorter than its layout"
            } else {
                "longer than its layout"
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
    /// Load the chain ending at `leaf`, following parent references back to a full base.
    ///
    /// Checks: every state file and memory file (see [`LoadedSnapshot::open`]); each parent
    /// exists and has the id the child names; no snapshot is reached twice; every member has the
    /// base's backend, geometry and layout.
    ///
    /// # Errors
    /// The first [`SnapshotError`] found, naming the file.
    pub fn load(leaf: &Path) -> Result<Self, SnapshotError> {
        let mut members: Vec<LoadedSnapshot> = Vec::new();
        let mut ids = HashSet::new();
        let mut dirs = HashSet::new();
        let mut cur = LoadedSnapshot::open(leaf)?;
        loop {
            if members.len() >= MAX_CHAIN_LEN {
                return Err(SnapshotError::ChainTooLong { path: cur.state_path });
            }
            let canonical = std::fs::canonicalize(&cur.dir).unwrap_or_else(|_| cur.dir.clone());
            if !ids.insert(cur.state.id) || !dirs.insert(canonical) {
                return Err(SnapshotError::Cycle {
                    id: cur.state.id,
                    path: cur.state_path,
                });
            }
            let Some(parent) = cur.state.parent.clone() else {
                members.push(cur);
                break;
            };
            // A path without a final name ("." or "..") has no usable parent: resolve it first.
            let here = if cur.dir.file_name().is_some() {
                cur.dir.clone()
            } else {
                std::fs::canonicalize(&cur.dir).map_err(SnapshotError::io(&cur.dir, "resolve"))?
            };
            let parent_dir = here
                .parent()
                .map_or_else(|| PathBuf::from(&parent.dir), |p| p.join(&parent.dir));
            if !parent_dir.join(STATE_FILE).exists() {
                return Err(SnapshotError::MissingParent {
                    path: cur.state_path,
                    parent: parent_dir,
                    id: parent.id,
                });
            }
            let next = LoadedSnapshot::open(&parent_dir)?;
            if next.state.id != parent.id {
                return Err(SnapshotError::ParentMismatch {
                    path: cur.state_path,
                    parent: parent_dir,
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
