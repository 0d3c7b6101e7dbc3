//! The dirty tracker: one per VM, over every RAM region.
//!
//! Three rules keep it from losing a write while vCPUs run:
//!
//! 1. **Grant, then mark.** The fault path re-grants write permission *before* it sets the dirty
//!    bit. A checkpoint drains bits and then re-protects; if the fault path marked first, a drain
//!    could consume the bit, the re-protect could run, and the late grant would leave the unit
//!    writable with no bit set: every later write to it lost. Granting first, the bit always lands
//!    after the grant, so a unit that is writable has a bit set or about to be set for the epoch
//!    in which it is written.
//! 2. **Drain, re-protect, copy.** A checkpoint swaps the bits out, then write-protects, then hands
//!    the drained units to the writer, which copies them. A write that lands between the drain and
//!    the re-protect is in memory before the copy; one after the re-protect faults into the next
//!    epoch.
//! 3. **Bitmaps are never replaced.** Each region has a fine map (one bit per hot unit) and a
//!    coarse map (one bit per block) for its whole life; a block's mode only says which one the
//!    fault path marks, and every drain reads both. A mode change racing with a fault can put a bit
//!    in the "wrong" map, never in a discarded one (the original's lost-bit race).
//!
//! Writes the VMM itself makes never fault; the vm-memory bitmap that records them is OR-ed into
//! every checkpoint. If the writer fails, every drained unit is marked again, so the next
//! checkpoint still holds it.

use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use squib_arch::{GeometryError, GpaRange, PageGeometry};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, bitmap::AtomicBitmap};

use crate::backend::{BackendError, GuestFault, Stage2Backend};
use crate::bitmap::DirtyBitmap;
use crate::policy::{
    BlockHistory, BlockMode, ConfigError, EpochObservation, FRESH_EXPLORE, FRESH_WINDOW, FreshPrior,
    HoldLimits, Policy, ProbeEvidence, TrackingConfig, adaptive_next,
};
use crate::sync::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// What tracking can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The tracking configuration was rejected.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The backend's geometry was rejected.
    #[error(transparent)]
    InvalidGeometry(#[from] GeometryError),
    /// A RAM region is unusable for tracking.
    #[error("RAM region {range} is not usable for tracking: {reason}")]
    InvalidRegion {
        /// The region.
        range: GpaRange,
        /// Why.
        reason: &'static str,
    },
    /// The fault is a read, not a write: not a tracking fault.
    #[error("fault at {gpa:#x} on vCPU {vcpu} is not a write")]
    NotAWrite {
        /// Faulting address.
        gpa: u64,
        /// The vCPU.
        vcpu: u32,
    },
    /// The fault is outside every tracked RAM region (MMIO, or a bad address).
    #[error("fault at {gpa:#x} on vCPU {vcpu} is outside tracked guest RAM")]
    OutsideTrackedRam {
        /// Faulting address.
        gpa: u64,
        /// The vCPU.
        vcpu: u32,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Why a checkpoint failed. In every case the drained units were marked again.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError<E: std::error::Error + 'static> {
    /// The backend failed to harvest or re-protect.
    #[error("checkpoint failed in the backend")]
    Backend(#[from] BackendError),
    /// The writer failed; the units it was given will be in the next checkpoint.
    #[error("checkpoint writer failed")]
    Writer(#[source] E),
}

/// What a tracking fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultOutcome {
    /// The unit that was marked dirty and re-granted.
    pub unit: GpaRange,
    /// The block is tracked coarsely (the unit is the whole block).
    pub coarse: bool,
}

/// Counters a user can read. Monotonic over the tracker's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrackerCounters {
    /// Write faults handled.
    pub faults: u64,
    /// `grant_write` calls made (one per fault).
    pub regrants: u64,
    /// `write_protect` calls made (start and checkpoints).
    pub protect_calls: u64,
    /// Blocks (or, under `region`, regions) that moved to the fine unit.
    pub step_downs: u64,
    /// Blocks that moved to the coarse unit.
    pub step_ups: u64,
    /// Bytes handed to checkpoint writers that succeeded.
    pub dirty_bytes: u64,
    /// Checkpoints whose writer succeeded.
    pub checkpoints: u64,
    /// Checkpoints that failed (their units were folded back).
    pub failed_checkpoints: u64,
}

/// What one successful checkpoint produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointStats {
    /// Coalesced ranges handed to the writer.
    pub ranges: usize,
    /// Bytes in them.
    pub dirty_bytes: u64,
    /// `write_protect` calls this checkpoint made.
    pub protect_calls: u64,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    regrants: AtomicU64,
    protect_calls: AtomicU64,
    step_downs: AtomicU64,
    step_ups: AtomicU64,
    dirty_bytes: AtomicU64,
    checkpoints: AtomicU64,
    failed_checkpoints: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug)]
struct Region {
    range: GpaRange,
    /// Absolute number of the first block (`start >> block_shift`).
    first_block: u64,
    fine: DirtyBitmap,
    coarse: DirtyBitmap,
    modes: Box<[AtomicU8]>,
    epoch_faults: Box<[AtomicU32]>,
    window_faults: Box<[AtomicU32]>,
    /// Adaptive: the fault count at which each block escalates (its history raises it), in the
    /// low bits, with the [`FRESH`] and [`MEASURING`] flags above them.
    escalate_at: Box<[AtomicU32]>,
}

/// In a block's `escalate_at`: the block has never been written. Its first fault consults the
/// adaptive policy's [`FreshPrior`].
const FRESH: u32 = 1 << 31;
/// In a block's `escalate_at`: the block's first written epoch is being measured; if it escalates,
/// it counts as dense in the prior.
const MEASURING: u32 = 1 << 30;
/// The escalation point, without the flags.
const THRESHOLD: u32 = MEASURING - 1;

/// What the adaptive policy has seen of blocks' first written epochs (the [`FreshPrior`]'s data).
/// Statistics only: a lost update costs a slightly different estimate, never a write.
#[derive(Debug, Default)]
struct FreshCounts {
    /// Blocks written for the first time so far (picks which ones are measured regardless).
    seen: AtomicU32,
    /// First epochs measured (counted at the first fault, so one still running counts as sparse).
    measured: AtomicU32,
    /// Of those, the ones that escalated.
    dense: AtomicU32,
}

fn atomics<T>(n: u64, f: impl Fn() -> T) -> Box<[T]> {
    (0..n).map(|_| f()).collect()
}

/// Index of a block, unit or word: bounded by slices allocated at construction, so it fits.
#[inline]
#[allow(clippy::cast_possible_truncation)]
const fn idx(i: u64) -> usize {
    i as usize
}

impl Region {
    fn blocks(&self) -> u64 {
        self.coarse.len()
    }

    fn block_range(&self, block: u64, shift: u32) -> GpaRange {
        let base = (self.first_block + block) << shift;
        let start = base.max(self.range.start());
        let end = (base + (1 << shift)).min(self.range.end());
        // Non-empty: the block intersects the region by construction.
        GpaRange::from_bounds(start, end).unwrap_or(self.range)
    }

    /// Fine units `[first, first + count)` of `block`, clamped to the region.
    fn block_units(&self, block: u64, block_shift: u32, unit_shift: u32) -> (u64, u64) {
        let r = self.block_range(block, block_shift);
        let first = (r.start() - self.range.start()) >> unit_shift;
        (first, r.len() >> unit_shift)
    }
}

/// Where the tracker is in its life. `Stopped` differs from `Idle`: a stopped tracker has seen
/// writes before, and the guest may write anywhere unseen until tracking runs again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Constructed, never started: the first epoch begins at [`DirtyTracker::start`].
    #[default]
    Idle,
    /// Started: every write faults (or is logged) and is marked.
    Running,
    /// Stopped after running: all of guest RAM is writable and every unit is marked.
    Stopped,
}

/// Per-checkpoint working state, kept between checkpoints so a checkpoint allocates nothing once
/// it has run.
#[derive(Debug, Default)]
struct CheckpointState {
    phase: Phase,
    history: Vec<Vec<BlockHistory>>,
    /// The adaptive policy's probe outcomes across blocks.
    probes: ProbeEvidence,
    /// Mode each block started the current epoch in.
    epoch_start: Vec<Vec<BlockMode>>,
    fine_units: Vec<u64>,
    coarse_blocks: Vec<u64>,
    ranges: Vec<GpaRange>,
    window_start: Option<Duration>,
    region_stepped_down: Vec<bool>,
}

/// Tracks which guest units are written, over every RAM region of a VM, through a
/// [`Stage2Backend`].
///
/// ```
/// # use squib_snapshot::*;
/// # use squib_arch::*;
/// # struct Nop;
/// # impl Stage2Backend for Nop {
/// #     fn geometry(&self) -> PageGeometry { PageGeometry::APPLE_SILICON }
/// #     fn write_protect(&self, _: GpaRange) -> Result<(), BackendError> { Ok(()) }
/// #     fn grant_write(&self, _: GpaRange) -> Result<(), BackendError> { Ok(()) }
/// # }
/// let ram = GpaRange::new(0x8000_0000, 64 << 20).unwrap();
/// let tracker = DirtyTracker::new(Nop, &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
/// tracker.start().unwrap();
/// let fault = GuestFault { gpa: 0x8000_4010, write: true, vcpu: 0 };
/// let out = tracker.on_write_fault(fault).unwrap();
/// assert_eq!(out.unit, GpaRange::new(0x8000_4000, 0x4000).unwrap());
/// let mut diff = Vec::new();
/// tracker.checkpoint(None, |ranges| -> Result<(), std::io::Error> {
///     diff.extend_from_slice(ranges);
///     Ok(())
/// }).unwrap();
/// assert_eq!(diff, vec![out.unit]);
/// ```
#[derive(Debug)]
pub struct DirtyTracker<B> {
    backend: B,
    geometry: PageGeometry,
    config: TrackingConfig,
    block_shift: u32,
    unit_shift: u32,
    escalate_at: u32,
    /// The adaptive policy's probe spacing, from the cost model.
    hold: HoldLimits,
    /// The adaptive policy's prior for never-written blocks, and its data.
    prior: FreshPrior,
    fresh: FreshCounts,
    regions: Box<[Region]>,
    counters: Counters,
    state: Mutex<CheckpointState>,
}

impl<B: Stage2Backend> DirtyTracker<B> {
    /// A tracker over `regions` (guest RAM, sorted or not, non-overlapping, each starting and
    /// ending on a hot-unit boundary). Nothing is protected until [`start`](Self::start).
    ///
    /// # Errors
    /// [`TrackError::InvalidConfig`], [`TrackError::InvalidGeometry`] or
    /// [`TrackError::InvalidRegion`] naming what was rejected.
    pub fn new(backend: B, regions: &[GpaRange], config: TrackingConfig) -> Result<Self, TrackError> {
        config.validate()?;
        let geometry = backend.geometry();
        geometry.validate()?;
        let block_shift = geometry.tracking_default.trailing_zeros();
        let unit_shift = geometry.tracking_hot.trailing_zeros();
        let mut sorted = regions.to_vec();
        sorted.sort();
        for pair in sorted.windows(2) {
            if pair[0].overlaps(&pair[1]) {
                return Err(TrackError::InvalidRegion {
                    range: pair[1],
                    reason: "overlaps another RAM region",
                });
            }
        }
        let mut built = Vec::with_capacity(sorted.len());
        for range in sorted {
            if !range.is_aligned(geometry.tracking_hot) {
                return Err(TrackError::InvalidRegion {
                    range,
                    reason: "start and length must be multiples of the hot tracking unit",
                });
            }
            let first_block = range.start() >> block_shift;
            let blocks = ((range.end() - 1) >> block_shift) - first_block + 1;
            let mode = match config.policy {
                Policy::Fine | Policy::Adaptive => BlockMode::Fine,
                Policy::Coarse | Policy::Region => BlockMode::Coarse,
            } as u8;
            built.push(Region {
                range,
                first_block,
                fine: DirtyBitmap::new(range.len() >> unit_shift),
                coarse: DirtyBitmap::new(blocks),
                modes: atomics(blocks, || AtomicU8::new(mode)),
                epoch_faults: atomics(blocks, || AtomicU32::new(0)),
                window_faults: atomics(blocks, || AtomicU32::new(0)),
                escalate_at: atomics(blocks, || AtomicU32::new(u32::MAX)),
            });
        }
        let escalate_at = match config.policy {
            Policy::Adaptive => config.cost.escalate_at(&geometry),
            _ => u32::MAX,
        };
        let initial = if config.policy == Policy::Adaptive {
            escalate_at.min(THRESHOLD) | FRESH
        } else {
            escalate_at
        };
        for r in &built {
            for t in r.escalate_at.iter() {
                t.store(initial, Ordering::Relaxed);
            }
        }
        let state = CheckpointState {
            history: built
                .iter()
                .map(|r| vec![BlockHistory::default(); idx(r.blocks())])
                .collect(),
            epoch_start: built
                .iter()
                .map(|r| {
                    r.modes
                        .iter()
                        .map(|m| BlockMode::from_u8(m.load(Ordering::Relaxed)))
                        .collect()
                })
                .collect(),
            region_stepped_down: vec![false; built.len()],
            ..CheckpointState::default()
        };
        Ok(Self {
            backend,
            geometry,
            config,
            block_shift,
            unit_shift,
            escalate_at,
            hold: HoldLimits::new(&config.cost, &geometry, config.max_probe_interval),
            prior: FreshPrior::new(&config.cost, &geometry),
            fresh: FreshCounts::default(),
            regions: built.into_boxed_slice(),
            counters: Counters::default(),
            state: Mutex::new(state),
        })
    }

    /// The backend.
    pub const fn backend(&self) -> &B {
        &self.backend
    }

    /// The geometry (the backend's).
    pub const fn geometry(&self) -> PageGeometry {
        self.geometry
    }

    /// The configuration.
    pub const fn config(&self) -> &TrackingConfig {
        &self.config
    }

    /// The tracked RAM regions, sorted.
    pub fn regions(&self) -> impl Iterator<Item = GpaRange> + '_ {
        self.regions.iter().map(|r| r.range)
    }

    /// The adaptive policy's in-epoch escalation point (`u32::MAX` for other policies).
    pub const fn escalate_at(&self) -> u32 {
        self.escalate_at
    }

    /// Write-protect every region (one backend call each) and begin an epoch. Units marked
    /// before `start` (VMM writes, say) stay marked, and so does every unit marked by
    /// [`stop`](Self::stop): after a stop, the first checkpoint holds all of guest RAM, because
    /// nothing saw the writes made while tracking was stopped.
    ///
    /// # Errors
    /// [`TrackError::Backend`] if a region cannot be protected; regions protected before it are
    /// granted back so a failed start leaves the guest writable.
    pub fn start(&self) -> Result<(), TrackError> {
        let mut st = self.state.lock();
        for (i, r) in self.regions.iter().enumerate() {
            bump(&self.counters.protect_calls, 1);
            if let Err(e) = self.backend.write_protect(r.range) {
                for undo in &self.regions[..i] {
                    let _ = self.backend.grant_write(undo.range);
                }
                return Err(e.into());
            }
        }
        st.phase = Phase::Running;
        Ok(())
    }

    /// Give write permission back to all of guest RAM and stop tracking.
    ///
    /// The guest may then write anywhere without being seen, so `stop` marks every unit of
    /// guest RAM: a checkpoint taken while stopped, or the first one after the next
    /// [`start`](Self::start), holds everything, and no write made in the gap is lost. (Keeping
    /// only the units marked so far would make `stop` then `start` silently drop those writes.)
    /// A checkpoint taken while stopped leaves guest RAM writable and every unit marked.
    ///
    /// # Errors
    /// [`TrackError::Backend`] if a region cannot be granted (every unit is marked regardless).
    pub fn stop(&self) -> Result<(), TrackError> {
        let mut st = self.state.lock();
        st.phase = Phase::Stopped;
        self.mark_everything();
        for r in &self.regions {
            self.backend.grant_write(r.range)?;
        }
        Ok(())
    }

    /// Whether [`start`](Self::start) has run (and [`stop`](Self::stop) has not since).
    pub fn is_started(&self) -> bool {
        self.state.lock().phase == Phase::Running
    }

    /// Mark every unit of every region (fine map).
    fn mark_everything(&self) {
        for r in self.regions.iter() {
            r.fine.set_range(0, r.fine.len());
        }
    }

    #[inline]
    fn region_of(&self, gpa: u64) -> Option<(usize, &Region)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.range.contains(gpa))
    }

    /// The fault path: a guest wrote to a protected unit. Re-grants the unit at the block's
    /// current mode (the whole block when coarse), then marks it; counts the fault. Lock-free and
    /// allocation-free; runs concurrently on every vCPU thread and with checkpoints. The vCPU
    /// resumes without advancing its PC, so the write is retried and lands.
    ///
    /// # Errors
    /// [`TrackError::NotAWrite`] and [`TrackError::OutsideTrackedRam`] for faults that are not
    /// tracking faults (the VMM handles those, as MMIO say); [`TrackError::Backend`] when the
    /// re-grant fails.
    #[inline]
    pub fn on_write_fault(&self, fault: GuestFault) -> Result<FaultOutcome, TrackError> {
        let GuestFault { gpa, write, vcpu } = fault;
        if !write {
            return Err(TrackError::NotAWrite { gpa, vcpu });
        }
        let Some((_, r)) = self.region_of(gpa) else {
            return Err(TrackError::OutsideTrackedRam { gpa, vcpu });
        };
        let block = (gpa >> self.block_shift) - r.first_block;
        let b = idx(block);
        bump(&self.counters.faults, 1);
        if self.config.policy == Policy::Region {
            r.window_faults[b].fetch_add(1, Ordering::Relaxed);
        }
        let mut coarse = r.modes[b].load(Ordering::Acquire) == BlockMode::Coarse as u8;
        if !coarse && self.escalate_at != u32::MAX {
            let n = r.epoch_faults[b].fetch_add(1, Ordering::Relaxed) + 1;
            let at = r.escalate_at[b].load(Ordering::Relaxed);
            let escalate = if at & FRESH != 0 {
                self.first_fault(&r.escalate_at[b], n)
            } else {
                n == at & THRESHOLD
            };
            if escalate
                && r.modes[b]
                    .compare_exchange(
                        BlockMode::Fine as u8,
                        BlockMode::Coarse as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                bump(&self.counters.step_ups, 1);
                if r.escalate_at[b].load(Ordering::Relaxed) & MEASURING != 0 {
                    self.fresh.dense.fetch_add(1, Ordering::Relaxed);
                }
                coarse = true;
            }
        }
        let unit = if coarse {
            r.block_range(block, self.block_shift)
        } else {
            let start = gpa & !(self.geometry.tracking_hot - 1);
            GpaRange::new(start, self.geometry.tracking_hot)
                .map_err(|_| TrackError::OutsideTrackedRam { gpa, vcpu })?
        };
        // Rule 1: grant, then mark.
        bump(&self.counters.regrants, 1);
        self.backend.grant_write(unit)?;
        if coarse {
            r.coarse.set(block);
        } else {
            r.fine.set((gpa - r.range.start()) >> self.unit_shift);
        }
        Ok(FaultOutcome { unit, coarse })
    }

    /// The first fault of a block never written before: whether the prior sends it coarse at
    /// once. Otherwise the block's first epoch is measured (one in [`FRESH_EXPLORE`] always is).
    #[inline]
    fn first_fault(&self, at: &AtomicU32, n: u32) -> bool {
        let old = at.fetch_and(!FRESH, Ordering::Relaxed);
        if old & FRESH == 0 {
            // Another vCPU took the first fault; this one counts toward the escalation point.
            return n == old & THRESHOLD;
        }
        let seen = self.fresh.seen.fetch_add(1, Ordering::Relaxed);
        let measured = self.fresh.measured.load(Ordering::Relaxed);
        let dense = self.fresh.dense.load(Ordering::Relaxed);
        if !seen.is_multiple_of(FRESH_EXPLORE) && self.prior.escalates_at_once(measured, dense) {
            return true;
        }
        self.fresh.measured.fetch_add(1, Ordering::Relaxed);
        at.fetch_or(MEASURING, Ordering::Relaxed);
        n == old & THRESHOLD
    }

    /// Mark `range` dirty without a fault (a write the VMM made, or a harvested range). Parts of
    /// `range` outside tracked RAM are ignored.
    pub fn mark_range(&self, range: GpaRange) {
        for r in self.regions.iter() {
            if let Some(part) = r.range.intersect(&range) {
                let first = (part.start() - r.range.start()) >> self.unit_shift;
                let last = (part.end() - 1 - r.range.start()) >> self.unit_shift;
                r.fine.set_range(first, last - first + 1);
            }
        }
    }

    /// Advance policy time to `now` (any monotonic origin). Under `region`, closes fault-rate
    /// windows and steps a region down when one of its blocks took more than the threshold in a
    /// window. Cheap; call it from a timer or between trace events.
    pub fn tick(&self, now: Duration) {
        if self.config.policy != Policy::Region {
            return;
        }
        let mut st = self.state.lock();
        let start = *st.window_start.get_or_insert(now);
        if now.saturating_sub(start) < self.config.window {
            return;
        }
        st.window_start = Some(now);
        for (i, r) in self.regions.iter().enumerate() {
            let hottest = r
                .window_faults
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            if hottest > self.config.step_down_threshold && !st.region_stepped_down[i] {
                st.region_stepped_down[i] = true;
                bump(&self.counters.step_downs, 1);
                tracing::info!(region = %r.range, hottest, "region policy: stepping the region down to the fine unit");
                // Blocks already granted whole stay writable with their coarse bit set, and are
                // saved whole at the next checkpoint: nothing is lost by switching now.
                for m in r.modes.iter() {
                    m.store(BlockMode::Fine as u8, Ordering::Release);
                }
            }
        }
    }

    /// Close the epoch: harvest kernel-logged pages, OR in the VMM's own writes recorded in
    /// `vmm_writes`' bitmap, drain, re-protect each region that had a dirty unit (one call per
    /// region), decide each block's mode for the next epoch, and hand the writer the dirty ranges,
    /// sorted and coalesced. Safe while vCPUs run. If the writer (or the backend) fails, every
    /// drained unit is marked again, so the next checkpoint holds it.
    ///
    /// # Errors
    /// [`CheckpointError`]; nothing is lost in either case.
    pub fn checkpoint<E, W>(
        &self,
        vmm_writes: Option<&GuestMemoryMmap<AtomicBitmap>>,
        write: W,
    ) -> Result<CheckpointStats, CheckpointError<E>>
    where
        E: std::error::Error + 'static,
        W: FnOnce(&[GpaRange]) -> Result<(), E>,
    {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        // Kernel-logged pages and the VMM's writes become fine bits, then drain like faults.
        self.backend.harvest(&mut |range| self.mark_range(range))?;
        if let Some(mem) = vmm_writes {
            self.or_in_vmm_writes(mem);
        }
        st.ranges.clear();
        st.probes.new_checkpoint();
        self.age_fresh_counts();
        let mut protect_calls = 0;
        let mut failure = None;
        for (ri, r) in self.regions.iter().enumerate() {
            st.fine_units.clear();
            st.coarse_blocks.clear();
            // Rule 2: drain first.
            r.coarse.drain(|b| st.coarse_blocks.push(b));
            r.fine.drain(|u| st.fine_units.push(u));
            let dirty = !st.coarse_blocks.is_empty() || !st.fine_units.is_empty();
            self.decide_modes(st, ri);
            if !dirty {
                continue;
            }
            let before = st.ranges.len();
            self.emit_ranges(r, &st.coarse_blocks, &st.fine_units, &mut st.ranges);
            debug_assert!(st.ranges.len() > before);
            if st.phase == Phase::Stopped {
                // Stopped: the guest keeps write access (as `stop` promised); every unit is
                // marked again below, since nothing sees the writes it makes meanwhile.
                continue;
            }
            // Then re-protect: one call for the whole region.
            protect_calls += 1;
            bump(&self.counters.protect_calls, 1);
            if let Err(e) = self.backend.write_protect(r.range) {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            // Fold back what was drained (including regions not yet reached: they still hold their
            // bits, since the loop stopped before draining them).
            self.fold_back(&st.ranges);
            bump(&self.counters.failed_checkpoints, 1);
            return Err(CheckpointError::Backend(e));
        }
        // Then copy.
        let dirty_bytes: u64 = st.ranges.iter().map(GpaRange::len).sum();
        let result = write(&st.ranges);
        if st.phase == Phase::Stopped {
            self.mark_everything();
        }
        if let Err(e) = result {
            self.fold_back(&st.ranges);
            bump(&self.counters.failed_checkpoints, 1);
            return Err(CheckpointError::Writer(e));
        }
        bump(&self.counters.dirty_bytes, dirty_bytes);
        bump(&self.counters.checkpoints, 1);
        Ok(CheckpointStats {
            ranges: st.ranges.len(),
            dirty_bytes,
            protect_calls,
        })
    }

    fn fold_back(&self, ranges: &[GpaRange]) {
        for r in ranges {
            self.mark_range(*r);
        }
        tracing::warn!(
            ranges = ranges.len(),
            "checkpoint failed: drained units folded back for the next one"
        );
    }

    fn or_in_vmm_writes(&self, mem: &GuestMemoryMmap<AtomicBitmap>) {
        for region in mem.iter() {
            let bitmap: &AtomicBitmap = (**region).bitmap();
            let bits = bitmap.len();
            if bits == 0 {
                continue;
            }
            let page = bitmap.byte_size().div_ceil(bits) as u64;
            let base = region.start_addr().0;
            for (w, word) in bitmap.get_and_reset().into_iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let bit = (w as u64) * 64 + u64::from(word.trailing_zeros());
                    word &= word - 1;
                    if let Ok(r) = GpaRange::new(base + bit * page, page) {
                        self.mark_range(r);
                    }
                }
            }
        }
    }

    /// Sorted, coalesced ranges from a region's drained coarse blocks and fine units.
    fn emit_ranges(&self, r: &Region, coarse: &[u64], fine: &[u64], out: &mut Vec<GpaRange>) {
        let unit = self.geometry.tracking_hot;
        let mut push = |start: u64, end: u64| {
            if let Some(last) = out.last_mut()
                && last.end() >= start
            {
                if end > last.end() {
                    *last = GpaRange::from_bounds(last.start(), end).unwrap_or(*last);
                }
                return;
            }
            if let Ok(range) = GpaRange::from_bounds(start, end) {
                out.push(range);
            }
        };
        let (mut c, mut f) = (coarse.iter().peekable(), fine.iter().peekable());
        loop {
            let next_coarse = c.peek().map(|&&b| r.block_range(b, self.block_shift));
            let next_fine = f.peek().map(|&&u| r.range.start() + u * unit);
            match (next_coarse, next_fine) {
                (None, None) => break,
                (Some(cr), nf) if nf.is_none_or(|s| cr.start() <= s) => {
                    c.next();
                    push(cr.start(), cr.end());
                }
                (_, Some(s)) => {
                    f.next();
                    push(s, s + unit);
                }
                (Some(_), None) => unreachable!("covered by the guarded arm"),
            }
        }
    }

    /// Halve the prior's counts once they cover more than [`FRESH_WINDOW`] first epochs, so it
    /// follows the guest's phases. Under the checkpoint lock; a racing first fault's increment may
    /// be lost, which only nudges the estimate.
    fn age_fresh_counts(&self) {
        let measured = self.fresh.measured.load(Ordering::Relaxed);
        if measured > FRESH_WINDOW {
            let dense = self.fresh.dense.load(Ordering::Relaxed);
            self.fresh.measured.store(measured / 2, Ordering::Relaxed);
            self.fresh.dense.store(dense.min(measured) / 2, Ordering::Relaxed);
        }
    }

    /// The policy's decision for region `ri`'s blocks, at the end of an epoch. Runs under the
    /// checkpoint lock, after the drain (so `coarse_blocks` and `fine_units` hold the epoch).
    fn decide_modes(&self, st: &mut CheckpointState, ri: usize) {
        let r = &self.regions[ri];
        for c in r.epoch_faults.iter() {
            c.store(0, Ordering::Relaxed);
        }
        if self.config.policy != Policy::Adaptive {
            return;
        }
        let (coarse, fine) = (&st.coarse_blocks, &st.fine_units);
        let mut ci = 0;
        let mut fi = 0;
        for block in 0..r.blocks() {
            let b = idx(block);
            let (first, count) = r.block_units(block, self.block_shift, self.unit_shift);
            let coarse_dirty = coarse.get(ci) == Some(&block);
            if coarse_dirty {
                ci += 1;
            }
            let mut fine_dirty = false;
            let mut units = 0u32;
            while fi < fine.len() && fine[fi] < first + count {
                fine_dirty = true;
                units = units.saturating_add(1);
                fi += 1;
            }
            let start = st.epoch_start[ri][b];
            let now = BlockMode::from_u8(r.modes[b].load(Ordering::Acquire));
            let obs = EpochObservation {
                start,
                escalated: start == BlockMode::Fine && now == BlockMode::Coarse,
                dirty: coarse_dirty || fine_dirty,
                units,
            };
            let next = adaptive_next(&mut st.history[ri][b], obs, self.hold, &mut st.probes);
            if obs.dirty || obs.escalated {
                // Only an epoch with writes changes a block's escalation point, and it ends the
                // block's first epoch: from now on its history judges it, without the flags. A
                // clean block's word is left alone, flags and all (a first fault racing this
                // checkpoint belongs to the next epoch and keeps its flags).
                let max_units = u32::try_from(self.geometry.hot_per_block()).unwrap_or(u32::MAX);
                let at = st.history[ri][b].escalate_at(self.escalate_at, max_units);
                r.escalate_at[b].store(at.min(THRESHOLD), Ordering::Relaxed);
            }
            if next != now {
                r.modes[b].store(next as u8, Ordering::Release);
                match next {
                    BlockMode::Fine => bump(&self.counters.step_downs, 1),
                    BlockMode::Coarse => bump(&self.counters.step_ups, 1),
                }
            }
            st.epoch_start[ri][b] = next;
        }
    }

    /// The mode of the block containing `gpa`, if it is tracked RAM.
    pub fn block_mode(&self, gpa: u64) -> Option<BlockMode> {
        let (_, r) = self.region_of(gpa)?;
        let b = idx((gpa >> self.block_shift) - r.first_block);
        Some(BlockMode::from_u8(r.modes[b].load(Ordering::Acquire)))
    }

    /// Whether the unit containing `gpa` is currently marked (in either map).
    pub fn is_marked(&self, gpa: u64) -> bool {
        self.region_of(gpa).is_some_and(|(_, r)| {
            r.coarse.get((gpa >> self.block_shift) - r.first_block)
                || r.fine.get((gpa - r.range.start()) >> self.unit_shift)
        })
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> TrackerCounters {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TrackerCounters {
            faults: l(&c.faults),
            regrants: l(&c.regrants),
            protect_calls: l(&c.protect_calls),
            step_downs: l(&c.step_downs),
            step_ups: l(&c.step_ups),
            dirty_bytes: l(&c.dirty_bytes),
            checkpoints: l(&c.checkpoints),
            failed_checkpoints: l(&c.failed_checkpoints),
        }
    }
}
