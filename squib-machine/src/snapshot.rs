//! Snapshots of a booted machine in squib's one snapshot format
//! (`squib_snapshot::snapshot`, `specs/17-snapshot-files.md`; the machine's
//! sections are in `specs/18-machine-snapshots.md`).
//!
//! Why no format of its own: a machine snapshot is memory plus opaque state,
//! exactly what the core's directories hold. Each vCPU's registers, XSAVE,
//! LAPIC, MSRs and events go in that vCPU's opaque section; the irqchips, PIT,
//! clock and RAM size in the device section `kvm-machine`; COM1 in `com1`. So
//! `squib snapshot inspect/verify/merge` work on machine snapshots unchanged,
//! a chain restores like any other, and a full snapshot can be mapped
//! `MAP_PRIVATE` for a lazy load.
//!
//! Why every save goes through the tracker: a full save is a checkpoint whose
//! writer ignores the dirty ranges, so the dirty set restarts at the base; a
//! diff is a checkpoint whose writer saves exactly those ranges. The tracker
//! owns the order (harvest KVM's log and vm-memory's bitmap, drain, re-protect,
//! then write) and folds the ranges back if the write fails, so a failed diff
//! loses nothing. Saves here run with the vCPUs paused, so memory and vCPU
//! state are from the same instant.
//!
//! # Live diffs: paused only while the dirty pages are copied
//!
//! [`save_live_diff`] keeps the guest paused for capture, harvest, drain,
//! re-protect and a `memcpy` of the dirty pages into a [`Staging`] copy, then
//! resumes it and writes, hashes and syncs the diff from the copy. Writing
//! straight from guest memory after the resume would not do: a page the guest
//! writes between the resume and the copy would be newer than the vCPU state
//! the diff carries (its re-protection only puts it in the *next* diff). The
//! copy makes memory and state one instant again. If the write fails, the
//! ranges are marked dirty again, so the next diff holds them.

use std::path::{Path, PathBuf};

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::restore::restore_chain;
use squib_snapshot::snapshot::save::{save_diff, save_full};
use squib_snapshot::snapshot::{
    Chain, ChainWriter, DirectIo, LoadedSnapshot, ParentLink, Placement, RestoreMode, SavedSnapshot,
    SnapshotError, SnapshotKind, SnapshotMeta, SnapshotState, merge_in_place,
};
use squib_snapshot::{BackendError, CheckpointError};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, VolatileSlice};

use super::state::{MachineState, StateCodecError};
use super::{GuestMemory, Machine, MachineError};

/// The backend name machine snapshots carry (as the KVM workload runs do).
pub const BACKEND: &str = "kvm";

/// What a machine snapshot save or load can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MachineSnapshotError {
    /// The machine refused (not paused, a KVM call failed).
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Writing or reading the snapshot directory failed.
    #[error(transparent)]
    Files(#[from] SnapshotError),
    /// KVM's dirty log could not be read or cleared.
    #[error("dirty-page tracking")]
    Track(#[from] BackendError),
    /// A diff of a machine that does not track dirty pages.
    #[error("{0}: needs a machine that tracks dirty pages")]
    NotTracking(&'static str),
    /// The snapshot's machine sections are missing or unreadable.
    #[error("{path}")]
    State {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: StateCodecError,
    },
    /// The snapshot's memory layout is not a machine's (one RAM region at 0 of the state's size).
    #[error("{path}: {reason}")]
    Layout {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A diff was to be loaded over memory a page-fault handler serves.
    #[error(
        "{path}: a Diff snapshot; its memory is spread over its chain's memory files, and a \
         page-fault handler is told about one file (load it with backend_type File, which \
         applies the chain, or merge the chain into a Full snapshot first)"
    )]
    NeedsChain {
        /// The state file.
        path: PathBuf,
    },
    /// The machine failed while the snapshot was being written (its page-fault handler died,
    /// say): memory read after the failure may not be the guest's, so the snapshot was removed.
    #[error("the guest failed during the save, which was discarded: {0}")]
    FailedDuring(String),
    /// The machine has failed: its memory or state can no longer be trusted.
    #[error("the guest has failed: {0}")]
    Failed(String),
}

/// Where a save goes.
#[derive(Debug)]
pub enum Target<'a> {
    /// A full snapshot: a new directory (squib's layout), or a state file and a memory file
    /// anywhere (Firecracker's).
    Full(Placement<'a>),
    /// A diff, chained to the snapshot whose state file `ParentLink` names.
    Diff(Placement<'a>, ParentLink),
    /// A diff merged into the memory file of its full parent (the loaded snapshot), giving a
    /// full snapshot whose state file is at the path (Firecracker's in-place merge). On success
    /// the loaded snapshot describes the merge.
    MergeInPlace(&'a Path, &'a mut LoadedSnapshot),
    /// The next member of a chain: full if the chain is empty, else a diff.
    Chain(&'a mut ChainWriter),
}

/// The machine's state as the core's [`SnapshotMeta`]: capture (the machine must be paused).
///
/// # Errors
/// [`MachineError::NotPaused`] or the KVM call that failed.
pub fn meta(machine: &Machine) -> Result<SnapshotMeta, MachineError> {
    let (vcpus, devices) = machine.capture()?.into_sections();
    Ok(SnapshotMeta {
        backend: BACKEND.to_owned(),
        geometry: PageGeometry::X86_64,
        vcpus,
        devices,
    })
}

fn write(
    target: &mut Target<'_>,
    mem: &GuestMemory,
    ranges: &[GpaRange],
    meta: &SnapshotMeta,
) -> Result<SavedSnapshot, SnapshotError> {
    match target {
        Target::Full(dest) => save_full(*dest, mem, meta, &DirectIo),
        Target::Diff(dest, parent) => save_diff(*dest, parent, mem, ranges, meta, &DirectIo),
        Target::MergeInPlace(state, base) => merge_in_place(state, base, mem, ranges, meta, &DirectIo),
        Target::Chain(chain) => chain.save(mem, ranges, meta),
    }
}

/// Save a paused machine to `target`.
///
/// # Errors
/// [`MachineSnapshotError`]: not paused, a diff without tracking, the tracker or the files.
/// Nothing appears at the destination on error, and a failed diff's pages stay dirty.
pub fn save(machine: &Machine, target: Target<'_>) -> Result<SavedSnapshot, MachineSnapshotError> {
    if let Some(why) = machine.failure() {
        return Err(MachineSnapshotError::Failed(why));
    }
    // What a save at `target` writes: a directory, or files (the state file first: it is what
    // makes the snapshot loadable).
    let dest: Vec<(PathBuf, bool)> = match &target {
        Target::Full(Placement::Dir(d)) | Target::Diff(Placement::Dir(d), _) => vec![(d.to_path_buf(), true)],
        Target::Full(Placement::Files { state, memory })
        | Target::Diff(Placement::Files { state, memory }, _) => {
            vec![(state.to_path_buf(), false), (memory.to_path_buf(), false)]
        }
        // The base's memory file is the user's; its trailer already names the merge, so the old
        // state is refused, and without the new state file nothing names what it now holds.
        Target::MergeInPlace(state, _) => vec![(state.to_path_buf(), false)],
        Target::Chain(_) => Vec::new(),
    };
    let saved = save_paused(machine, target)?;
    // A failure recorded while the memory was being copied may mean the copy read pages that were
    // never the guest's (a page server's memory released after its server died): discard it.
    // (A chain's member stays: the writer counts it; the error says what happened.)
    if let Some(why) = machine.failure() {
        for (written, is_dir) in dest {
            let removed = if is_dir {
                std::fs::remove_dir_all(&written)
            } else {
                std::fs::remove_file(&written)
            };
            if let Err(e) = removed {
                tracing::error!(path = %written.display(), error = %e, "cannot remove a snapshot taken across a guest failure");
            }
        }
        return Err(MachineSnapshotError::FailedDuring(why));
    }
    Ok(saved)
}

fn save_paused(machine: &Machine, mut target: Target<'_>) -> Result<SavedSnapshot, MachineSnapshotError> {
    let meta = meta(machine)?;
    let mem = machine.memory();
    let Some(tracker) = machine.tracker() else {
        let diff = match &target {
            Target::Full(_) => false,
            Target::Diff(..) | Target::MergeInPlace(..) => true,
            Target::Chain(c) => c.leaf().is_some(),
        };
        if diff {
            return Err(MachineSnapshotError::NotTracking("a diff snapshot"));
        }
        return Ok(write(&mut target, mem, &[], &meta)?);
    };
    let mut saved = None;
    tracker
        .checkpoint(Some(mem), |ranges| {
            saved = Some(write(&mut target, mem, ranges, &meta)?);
            Ok::<(), SnapshotError>(())
        })
        .map_err(|e| match e {
            CheckpointError::Backend(b) => MachineSnapshotError::Track(b),
            CheckpointError::Writer(w) => MachineSnapshotError::Files(w),
        })?;
    saved.ok_or(MachineSnapshotError::NotTracking(
        "a checkpoint that wrote nothing",
    ))
}

/// A machine snapshot brought back: its state, guest memory and the leaf's snapshot state.
#[derive(Debug)]
pub struct LoadedMachine {
    /// vCPUs and devices, ready for [`Machine::restore`].
    pub state: MachineState,
    /// Guest RAM (bitmaps clear).
    pub memory: GuestMemory,
    /// The leaf snapshot's state (its id is what the next diff chains to).
    pub snapshot: SnapshotState,
    /// What names the leaf: its directory (squib's layout) or its state file.
    pub dir: PathBuf,
    /// The leaf's state file.
    pub state_path: PathBuf,
    /// The leaf's memory file.
    pub memory_path: PathBuf,
}

/// Load the chain ending at `dir` (a full snapshot, or a diff with its parents where it says;
/// a directory holding `state`, or a state file). `Lazy` maps the base's memory file
/// copy-on-write and applies the diffs on top.
///
/// # Errors
/// [`MachineSnapshotError`] naming the file: not a machine snapshot, another backend or
/// geometry, a broken chain, a corrupt extent (diffs; the base too when `Eager`).
pub fn load(dir: &Path, mode: RestoreMode) -> Result<LoadedMachine, MachineSnapshotError> {
    load_files(dir, None, mode)
}

/// [`load`], the leaf's memory file at `memory` when given (Firecracker's `mem_file_path`); it
/// must still carry the leaf's id.
///
/// # Errors
/// As [`load`].
pub fn load_files(
    state: &Path,
    memory: Option<&Path>,
    mode: RestoreMode,
) -> Result<LoadedMachine, MachineSnapshotError> {
    let chain = Chain::load_with_memory(state, memory)?;
    chain.check_target(Some(BACKEND), Some(&PageGeometry::X86_64))?;
    let leaf = chain.leaf();
    let state = machine_state(&leaf.state, &leaf.state_path)?;
    let restored = restore_chain(&chain, mode)?;
    Ok(LoadedMachine {
        state,
        memory: restored.memory,
        snapshot: restored.state,
        dir: leaf.path.clone(),
        state_path: leaf.state_path.clone(),
        memory_path: leaf.memory_path.clone(),
    })
}

/// The machine state in `snap`'s sections, checked against its memory layout (spec 18 §1).
fn machine_state(snap: &SnapshotState, path: &Path) -> Result<MachineState, MachineSnapshotError> {
    let state = MachineState::from_sections(&snap.vcpus, &snap.devices).map_err(|source| {
        MachineSnapshotError::State {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let layout = &snap.layout;
    if layout.len() != 1 || layout[0].gpa != 0 || layout[0].len != state.mem_size {
        return Err(MachineSnapshotError::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "memory layout {:?} is not one RAM region at 0 of the {} bytes the machine state has",
                layout
                    .iter()
                    .map(|r| format!("{:#x}+{:#x}", r.gpa, r.len))
                    .collect::<Vec<_>>(),
                state.mem_size
            ),
        });
    }
    Ok(state)
}

/// A full machine snapshot's state file alone, for a restore whose memory another process serves
/// (a page-fault handler, [`crate::uffd`]): its memory file is not opened, since the handler
/// reads it. Returns the machine state and the snapshot's state (its layout gives the handler's
/// file offsets).
///
/// # Errors
/// [`MachineSnapshotError`] naming the state file: unreadable, not a `kvm`/x86-64 machine
/// snapshot, or a diff. A diff's memory is spread over its chain's memory files, and
/// Firecracker's handshake tells a handler about one file: such a load is refused with the
/// reason (load it from its files, or merge the chain first).
pub fn load_state(state_path: &Path) -> Result<(MachineState, SnapshotState), MachineSnapshotError> {
    let snap = squib_snapshot::snapshot::load::read_state(state_path)?;
    let mismatch = |what: String| MachineSnapshotError::Layout {
        path: state_path.to_path_buf(),
        reason: what,
    };
    if snap.backend != BACKEND {
        return Err(mismatch(format!(
            "written by backend {:?}, not a {BACKEND:?} machine snapshot",
            snap.backend
        )));
    }
    if snap.geometry != PageGeometry::X86_64 {
        return Err(mismatch("not an x86-64 snapshot".to_owned()));
    }
    if snap.kind != SnapshotKind::Full {
        return Err(MachineSnapshotError::NeedsChain {
            path: state_path.to_path_buf(),
        });
    }
    let state = machine_state(&snap, state_path)?;
    Ok((state, snap))
}

/// A copy of guest RAM's layout that holds dirty pages between the pause and the write.
///
/// Anonymous and `MAP_NORESERVE`: only the pages ever copied into it take host memory.
#[derive(Debug)]
pub struct Staging {
    memory: GuestMemory,
}

impl Staging {
    /// Staging memory with `machine`'s RAM layout.
    ///
    /// # Errors
    /// [`MachineError::Memory`] if it cannot be mapped.
    pub fn for_machine(machine: &Machine) -> Result<Self, MachineError> {
        let ranges: Vec<(GuestAddress, usize)> = machine
            .memory()
            .iter()
            .map(|r| {
                usize::try_from(r.len())
                    .map(|len| (r.start_addr(), len))
                    .map_err(|e| MachineError::Memory {
                        size: r.len(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let memory = GuestMemory::from_ranges(&ranges).map_err(|e| MachineError::Memory {
            size: ranges.iter().map(|r| r.1 as u64).sum(),
            reason: e.to_string(),
        })?;
        Ok(Self { memory })
    }

    /// Copy `ranges` of `from` into the staging memory (the same guest addresses).
    fn copy(&self, from: &GuestMemory, ranges: &[GpaRange]) -> Result<(), SnapshotError> {
        for r in ranges {
            let fail = |e: vm_memory::GuestMemoryError| {
                SnapshotError::GuestMemory(format!("staging {:#x}+{:#x}: {e}", r.start(), r.len()))
            };
            let len = usize::try_from(r.len()).map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            let src: VolatileSlice<'_, _> = from.get_slice(GuestAddress(r.start()), len).map_err(fail)?;
            let dst = self
                .memory
                .get_slice(GuestAddress(r.start()), len)
                .map_err(fail)?;
            src.copy_to_volatile_slice(dst);
        }
        Ok(())
    }
}

/// What [`save_live_diff`] did and how long the guest stood still.
#[derive(Debug)]
pub struct LiveSave {
    /// The snapshot written.
    pub saved: SavedSnapshot,
    /// From the pause request to the resume (capture, harvest, re-protect, copy).
    pub paused: std::time::Duration,
}

/// Append the next member to `chain` while the guest runs: pause, capture, checkpoint into
/// `staging`, resume, then write. The first member (an empty chain) is a full snapshot, written
/// with the guest paused throughout. `at_pause` runs while the guest is paused (a caller reads
/// its console there, for instance).
///
/// # Errors
/// As [`save`]; the guest is resumed whatever happens.
pub fn save_live_diff(
    machine: &Machine,
    chain: &mut ChainWriter,
    staging: &Staging,
    at_pause: impl FnOnce(),
) -> Result<LiveSave, MachineSnapshotError> {
    let t = std::time::Instant::now();
    if let Err(e) = machine.pause() {
        machine.resume();
        return Err(e.into());
    }
    at_pause();
    if chain.leaf().is_none() {
        let saved = save(machine, Target::Chain(chain));
        let paused = t.elapsed();
        machine.resume();
        return Ok(LiveSave {
            saved: saved?,
            paused,
        });
    }
    let Some(tracker) = machine.tracker() else {
        machine.resume();
        return Err(MachineSnapshotError::NotTracking("a diff snapshot"));
    };
    let staged = meta(machine)
        .map_err(MachineSnapshotError::from)
        .and_then(|meta| {
            let mut ranges = Vec::new();
            tracker
                .checkpoint(Some(machine.memory()), |dirty| {
                    staging.copy(machine.memory(), dirty)?;
                    ranges.extend_from_slice(dirty);
                    Ok::<(), SnapshotError>(())
                })
                .map_err(|e| match e {
                    CheckpointError::Backend(b) => MachineSnapshotError::Track(b),
                    CheckpointError::Writer(w) => MachineSnapshotError::Files(w),
                })?;
            Ok((meta, ranges))
        });
    let paused = t.elapsed();
    machine.resume();
    let (meta, ranges) = staged?;
    match chain.save_diff(&staging.memory, &ranges, &meta) {
        Ok(saved) => Ok(LiveSave { saved, paused }),
        Err(e) => {
            // The tracker handed these over and forgot them: mark them again.
            for r in &ranges {
                tracker.mark_range(*r);
            }
            Err(e.into())
        }
    }
}
