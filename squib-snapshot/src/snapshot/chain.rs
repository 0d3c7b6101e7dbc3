//! Writing chains (what a run loop calls at each checkpoint) and squashing them (merge).
//!
//! Why sibling directories with numbered names: `ls` shows a chain in order (`000000-full`,
//! `000001-diff`, ...), and a diff records its parent's state file relative to its own
//! (`../000000-full/state`) plus its id, so a chain keeps working after the whole directory is
//! moved or copied; the id catches a sibling that was replaced by another snapshot.

use std::path::{Path, PathBuf};

use squib_arch::GpaRange;
use vm_memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;

use super::format::{SnapshotId, SnapshotKind};
use super::io::{DirectIo, SnapshotIo};
use super::load::{Chain, LoadedSnapshot};
use super::restore::{RestoreMode, bytes_to_read, restore_chain_with};
use super::save::{self, ParentLink, SavedSnapshot, SnapshotMeta};
use super::{Progress, STATE_FILE, SnapshotError};

/// Appends snapshots to a chain directory: the first full, later ones diffs of the one before.
///
/// Use it as the tracker's checkpoint writer:
///
/// ```
/// use squib_snapshot::snapshot::{ChainWriter, SnapshotMeta};
/// use squib_arch::{GpaRange, PageGeometry};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};
///
/// let dir = tempfile::tempdir().unwrap();
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let meta = SnapshotMeta::new("soft", PageGeometry::X86_64);
/// let mut chain = ChainWriter::create(dir.path()).unwrap();
/// // In a run loop: tracker.checkpoint(Some(&mem), |ranges| chain.save(&mem, ranges, &meta).map(drop))
/// chain.save(&mem, &[], &meta).unwrap(); // first: full
/// mem.write_slice(b"hello", GuestAddress(0x3000)).unwrap();
/// let ranges = [GpaRange::new(0x3000, 0x1000).unwrap()];
/// let diff = chain.save(&mem, &ranges, &meta).unwrap(); // then: diffs
/// assert!(diff.path.ends_with("000001-diff"));
/// ```
#[derive(Debug)]
pub struct ChainWriter {
    dir: PathBuf,
    next: u64,
    last: Option<(SnapshotId, String)>,
    io: Box<dyn SnapshotIo>,
}

/// Parse a member directory name: `NNNNNN-full` or `NNNNNN-diff`.
fn member_index(name: &str) -> Option<u64> {
    let (n, kind) = name.split_once('-')?;
    if (kind == "full" || kind == "diff") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
        n.parse().ok()
    } else {
        None
    }
}

impl ChainWriter {
    /// Start a new chain in `dir` (created if missing). Refuses a directory that already holds
    /// chain members; use [`ChainWriter::open`] to append to one. Removes the leftovers of
    /// interrupted saves from `dir` ([`save::remove_leftovers`]).
    ///
    /// # Errors
    /// [`SnapshotError::Io`], or [`SnapshotError::Usage`] when `dir` already holds a chain.
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir, "create directory"))?;
        save::remove_leftovers(dir);
        if let Some((_, name)) = Self::last_member(dir)? {
            return Err(SnapshotError::Usage {
                path: dir.to_path_buf(),
                reason: format!("already holds snapshot {name}; open it to append"),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            next: 0,
            last: None,
            io: Box::new(DirectIo),
        })
    }

    /// Append to the chain in `dir`, after checking it loads cleanly. Removes the leftovers of
    /// interrupted saves from `dir` ([`save::remove_leftovers`]).
    ///
    /// # Errors
    /// Any [`SnapshotError`] from loading the existing chain.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let Some((index, name)) = Self::last_member(dir)? else {
            return Self::create(dir);
        };
        save::remove_leftovers(dir);
        let chain = Chain::load(&dir.join(&name))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            next: index + 1,
            last: Some((chain.leaf().state.id, name)),
            io: Box::new(DirectIo),
        })
    }

    fn last_member(dir: &Path) -> Result<Option<(u64, String)>, SnapshotError> {
        let mut best: Option<(u64, String)> = None;
        for entry in std::fs::read_dir(dir).map_err(SnapshotError::io(dir, "read directory"))? {
            let entry = entry.map_err(SnapshotError::io(dir, "read directory"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(i) = member_index(&name)
                && best.as_ref().is_none_or(|(b, _)| i > *b)
            {
                best = Some((i, name));
            }
        }
        Ok(best)
    }

    /// Route every write through `io` (tests inject failures here).
    #[must_use]
    pub fn with_io(mut self, io: Box<dyn SnapshotIo>) -> Self {
        self.io = io;
        self
    }

    /// The chain directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest member's directory, if any.
    #[must_use]
    pub fn leaf(&self) -> Option<PathBuf> {
        self.last.as_ref().map(|(_, name)| self.dir.join(name))
    }

    fn dest(&self, kind: SnapshotKind) -> (PathBuf, String) {
        let name = format!("{:06}-{}", self.next, kind.name());
        (self.dir.join(&name), name)
    }

    /// Write a full snapshot of `mem` as the next member (a new base).
    ///
    /// # Errors
    /// Any [`SnapshotError`]; the chain is unchanged on error.
    pub fn save_full(
        &mut self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        meta: &SnapshotMeta,
    ) -> Result<SavedSnapshot, SnapshotError> {
        let (dest, name) = self.dest(SnapshotKind::Full);
        let saved = save::write_full(dest.as_path().into(), mem, meta, self.io.as_ref(), &mut |_| {})?;
        self.next += 1;
        self.last = Some((saved.id, name));
        Ok(saved)
    }

    /// Write a diff holding `ranges` of `mem`, chained to the newest member.
    ///
    /// # Errors
    /// [`SnapshotError::NoBase`] before the first full snapshot, or any save error; the chain is
    /// unchanged on error (and the tracker folds its drained units back).
    pub fn save_diff(
        &mut self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ranges: &[GpaRange],
        meta: &SnapshotMeta,
    ) -> Result<SavedSnapshot, SnapshotError> {
        let Some((parent_id, parent_name)) = self.last.clone() else {
            return Err(SnapshotError::NoBase {
                path: self.dir.clone(),
            });
        };
        let (dest, name) = self.dest(SnapshotKind::Diff);
        let parent = ParentLink {
            id: parent_id,
            state: self.dir.join(parent_name).join(STATE_FILE),
        };
        let saved = save::write_diff(
            dest.as_path().into(),
            &parent,
            mem,
            ranges,
            meta,
            self.io.as_ref(),
        )?;
        self.next += 1;
        self.last = Some((saved.id, name));
        Ok(saved)
    }

    /// The checkpoint writer: a full snapshot if the chain is empty, else a diff of `ranges`.
    ///
    /// # Errors
    /// As [`ChainWriter::save_full`] and [`ChainWriter::save_diff`].
    pub fn save(
        &mut self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ranges: &[GpaRange],
        meta: &SnapshotMeta,
    ) -> Result<SavedSnapshot, SnapshotError> {
        if self.last.is_none() {
            self.save_full(mem, meta)
        } else {
            self.save_diff(mem, ranges, meta)
        }
    }
}

/// Squash the chain ending at the last of `dirs` into one full snapshot at `out`. Earlier
/// entries of `dirs`, if given, must be members of that chain (a guard against merging the
/// wrong directories). Every extent's checksum is checked on the way.
///
/// # Errors
/// Any [`SnapshotError`]; nothing exists at `out` on error.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<SavedSnapshot, SnapshotError> {
    let Some(leaf) = dirs.last() else {
        return Err(SnapshotError::Usage {
            path: out.to_path_buf(),
            reason: "merge needs at least one snapshot directory".into(),
        });
    };
    let chain = Chain::load(leaf)?;
    merge_chain(&chain, &dirs[..dirs.len() - 1], out, &mut |_| {})
}

/// The bytes [`merge_chain`] reports to its progress hook: every extent read, then every byte of
/// guest memory written out.
#[must_use]
pub fn merge_bytes(chain: &Chain) -> u64 {
    bytes_to_read(chain, RestoreMode::Eager) + chain.base().state.layout_bytes()
}

/// Squash a loaded `chain` into one full snapshot at `out`, telling `progress` how many bytes
/// each step read or wrote (they add up to [`merge_bytes`]). `members`, if any, must be
/// directories of snapshots in the chain.
///
/// # Errors
/// Any [`SnapshotError`]; nothing exists at `out` on error.
pub fn merge_chain(
    chain: &Chain,
    members: &[PathBuf],
    out: &Path,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    if out.symlink_metadata().is_ok() {
        return Err(SnapshotError::DestinationExists {
            path: out.to_path_buf(),
        });
    }
    for d in members {
        let s = LoadedSnapshot::open(d)?;
        if !chain.members.iter().any(|m| m.state.id == s.state.id) {
            return Err(SnapshotError::Usage {
                path: d.clone(),
                reason: format!(
                    "is not a member of the chain ending at {}",
                    chain.leaf().path.display()
                ),
            });
        }
    }
    let restored = restore_chain_with(chain, RestoreMode::Eager, progress)?;
    let meta = SnapshotMeta {
        backend: restored.state.backend.clone(),
        geometry: restored.state.geometry,
        vcpus: restored.state.vcpus.clone(),
        devices: restored.state.devices.clone(),
    };
    save::save_full_with(out.into(), &restored.memory, &meta, &DirectIo, progress)
}
