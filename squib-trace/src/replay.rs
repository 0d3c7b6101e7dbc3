//! Replaying a trace through the soft stage-2 and the real tracker.
//!
//! Replay uses the very fault path a running guest takes (store, stage-2 exit, syndrome decode,
//! `on_write_fault`, retry), single-threaded and on trace time, so `fine` and `coarse` results are
//! exact: faults are the distinct units written per epoch, summed.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};

use super::TraceError;
use super::parse::{Event, EventReader, TraceFormat};
use squib_kvm_sim::soft::mmu::{SoftStage2, VcpuSlot};
use squib_kvm_sim::soft::vcpu::deliver;

/// Empty epochs replayed for real after the last write before the rest of a long gap is only
/// counted. Every policy reaches a fixed point within `max_probe_interval + 1` clean epochs (the
/// adaptive policy holds a clean coarse block at most its probe interval, then releases it;
/// nothing else changes without writes), so replaying at least this many is exact.
const REAL_EMPTY_EPOCHS: u64 = 256;

/// How to replay a trace.
#[derive(Debug, Clone, Copy)]
pub struct ReplayConfig {
    /// Trace format.
    pub format: TraceFormat,
    /// Policy and costs.
    pub tracking: TrackingConfig,
    /// Soft stage-2 geometry.
    pub geometry: PageGeometry,
    /// Periodic checkpoint interval of trace time.
    pub checkpoint_every: Duration,
    /// Lackey: trace time each instruction takes, ns.
    pub ns_per_instr: f64,
}

impl ReplayConfig {
    /// design.md's defaults with `policy`: squib format, Apple Silicon geometry, 100 ms
    /// checkpoints, 0.5 ns per instruction.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self {
            format: TraceFormat::Squib,
            tracking: TrackingConfig::new(policy),
            geometry: PageGeometry::APPLE_SILICON,
            checkpoint_every: Duration::from_millis(100),
            ns_per_instr: 0.5,
        }
    }

    /// Check the fields a trace does not.
    ///
    /// # Errors
    /// [`TraceError::Config`] naming the field.
    pub fn validate(&self) -> Result<(), TraceError> {
        self.tracking
            .validate()
            .map_err(|e| TraceError::Config(e.to_string()))?;
        self.geometry
            .validate()
            .map_err(|e| TraceError::Config(e.to_string()))?;
        if self.checkpoint_every.is_zero() {
            return Err(TraceError::Config("--checkpoint-every must be above zero".into()));
        }
        if !self.ns_per_instr.is_finite() || self.ns_per_instr < 0.0 {
            return Err(TraceError::Config(format!(
                "--ns-per-instr {}: must be a finite, non-negative number",
                self.ns_per_instr
            )));
        }
        Ok(())
    }
}

/// What a replay measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplayReport {
    /// Policy replayed.
    pub policy: String,
    /// Geometry replayed.
    pub geometry: String,
    /// Guest RAM the replay used, bytes.
    pub mem_bytes: u64,
    /// Write records (lackey writes that cross a process block count once per part).
    pub writes: u64,
    /// Bytes those writes wrote.
    pub bytes_written: u64,
    /// Tracking faults.
    pub faults: u64,
    /// Re-grants.
    pub regrants: u64,
    /// `write_protect` calls (the start's included).
    pub protect_calls: u64,
    /// Bytes the diffs hold.
    pub dirty_bytes: u64,
    /// Checkpoints (epochs closed), the one closing the trace included.
    pub checkpoints: u64,
    /// Blocks (or regions) stepped down to the fine unit.
    pub step_downs: u64,
    /// Blocks stepped up to the coarse unit.
    pub step_ups: u64,
    /// `faults × fault_us + protect_calls × protect_us + dirty_bytes / write_bytes_per_us`.
    pub modelled_cost_us: f64,
    /// Time of the last trace event, ns.
    pub trace_ns: u64,
}

/// Scan a trace without replaying it: the RAM it needs (the end of its highest write, rounded up
/// to the block), or `None` when it writes nothing. Validates every line.
///
/// # Errors
/// Whatever parsing finds.
pub fn ram_needed<R: BufRead>(input: R, cfg: &ReplayConfig) -> Result<Option<u64>, TraceError> {
    let mut events = EventReader::new(input, cfg.format, cfg.ns_per_instr);
    let mut end: Option<u64> = None;
    while let Some(e) = events.next_event()? {
        if let Event::Write { gpa, len, .. } = e {
            let e = gpa + len;
            end = Some(end.map_or(e, |m| m.max(e)));
        }
    }
    let block = cfg.geometry.tracking_default;
    Ok(end.map(|e| e.div_ceil(block).saturating_mul(block)))
}

struct Engine {
    cfg: ReplayConfig,
    mmu: Arc<SoftStage2>,
    slot: VcpuSlot,
    tracker: DirtyTracker<Arc<SoftStage2>>,
    mem: u64,
    every_ns: u64,
    next_cp: u64,
    last_cp: Option<u64>,
    writes_since_cp: u64,
    empty_run: u64,
    skipped: u64,
    next_tick: u64,
    window_ns: u64,
    /// Empty epochs replayed for real before a gap is only counted.
    real_empty: u64,
}

impl Engine {
    fn checkpoint(&mut self, at: u64) -> Result<(), TraceError> {
        if self.writes_since_cp == 0 {
            self.empty_run += 1;
        } else {
            self.empty_run = 0;
        }
        self.writes_since_cp = 0;
        self.last_cp = Some(at);
        if self.empty_run > self.real_empty {
            self.skipped += 1;
            return Ok(());
        }
        self.tracker
            .checkpoint(None, |_| Ok::<(), std::convert::Infallible>(()))
            .map_err(TraceError::Checkpoint)?;
        Ok(())
    }

    /// Close every periodic epoch whose boundary is at or before `t`.
    fn advance(&mut self, t: u64) -> Result<(), TraceError> {
        while self.next_cp <= t {
            let at = self.next_cp;
            if self.empty_run >= self.real_empty && self.writes_since_cp == 0 {
                // A long gap: count the remaining boundaries up to `t` without replaying them.
                let n = (t - at) / self.every_ns + 1;
                self.skipped += n;
                self.empty_run += n;
                self.last_cp = Some(at + (n - 1) * self.every_ns);
                self.next_cp = self.next_cp.saturating_add(n.saturating_mul(self.every_ns));
                break;
            }
            self.checkpoint(at)?;
            self.next_cp = self.next_cp.saturating_add(self.every_ns);
        }
        if self.cfg.tracking.policy == Policy::Region && t >= self.next_tick {
            self.tracker.tick(Duration::from_nanos(t));
            self.next_tick = t.saturating_add(self.window_ns);
        }
        Ok(())
    }

    #[inline]
    fn write(&mut self, line: u64, gpa: u64, len: u64) -> Result<(), TraceError> {
        if gpa.checked_add(len).is_none_or(|e| e > self.mem) {
            return Err(TraceError::OutsideRam {
                line,
                gpa,
                len,
                mem: self.mem,
            });
        }
        let g = self.cfg.geometry.granule;
        let mut page = gpa & !(g - 1);
        let end = gpa + len;
        while page < end {
            let at = page.max(gpa);
            while let Err(exit) = self.mmu.write_access(&self.slot, at, || ()) {
                deliver(&self.tracker, exit, 0)?;
            }
            page += g;
        }
        self.writes_since_cp += 1;
        Ok(())
    }
}

/// Replay `input` on `mem` bytes of guest RAM (starting at address 0).
///
/// # Errors
/// [`TraceError`]: a malformed line, time going backwards, a write outside RAM, a tracker failure.
pub fn replay<R: BufRead>(input: R, cfg: &ReplayConfig, mem: u64) -> Result<ReplayReport, TraceError> {
    cfg.validate()?;
    let ram = GpaRange::new(0, mem)
        .ok()
        .filter(|r| r.is_aligned(cfg.geometry.granule))
        .ok_or_else(|| {
            TraceError::Config(format!(
                "--mem {mem}: must be a non-zero multiple of the {}-byte granule",
                cfg.geometry.granule
            ))
        })?;
    let mmu =
        Arc::new(SoftStage2::new(cfg.geometry, &[ram], 1).map_err(|e| TraceError::Config(e.to_string()))?);
    let slot = mmu.claim_vcpu().map_err(|e| TraceError::Config(e.to_string()))?;
    let tracker = DirtyTracker::new(Arc::clone(&mmu), &[ram], cfg.tracking)?;
    tracker.start()?;
    let every_ns = u64::try_from(cfg.checkpoint_every.as_nanos()).unwrap_or(u64::MAX);
    let window_ns = u64::try_from(cfg.tracking.window.as_nanos()).unwrap_or(u64::MAX);
    let mut e = Engine {
        cfg: *cfg,
        mmu,
        slot,
        tracker,
        mem,
        every_ns,
        next_cp: every_ns,
        last_cp: None,
        writes_since_cp: 0,
        empty_run: 0,
        skipped: 0,
        next_tick: 0,
        window_ns,
        real_empty: REAL_EMPTY_EPOCHS.max(u64::from(cfg.tracking.max_probe_interval) + 2),
    };
    let mut events = EventReader::new(input, cfg.format, cfg.ns_per_instr);
    let (mut writes, mut bytes, mut last_t) = (0u64, 0u64, 0u64);
    while let Some(ev) = events.next_event()? {
        match ev {
            Event::Write { t_ns, gpa, len } => {
                e.advance(t_ns)?;
                e.write(events.line(), gpa, len)?;
                writes += 1;
                // Each write fits guest RAM, but their sum need not fit a u64.
                bytes = bytes.saturating_add(len);
                last_t = t_ns;
            }
            Event::Checkpoint { t_ns } => {
                e.advance(t_ns)?;
                // A `checkpoint` line at a periodic boundary just taken is that same checkpoint.
                if e.last_cp != Some(t_ns) || e.writes_since_cp > 0 {
                    e.checkpoint(t_ns)?;
                }
                last_t = t_ns;
            }
        }
    }
    if writes == 0 {
        return Ok(empty_report(cfg, last_t));
    }
    // The end of the trace closes the last epoch (unless a checkpoint just closed it).
    if e.writes_since_cp > 0 || e.last_cp.is_none() {
        e.checkpoint(last_t)?;
    }
    let c = e.tracker.counters();
    let checkpoints = c.checkpoints + e.skipped;
    Ok(ReplayReport {
        policy: cfg.tracking.policy.name().into(),
        geometry: cfg.geometry.name().into(),
        mem_bytes: mem,
        writes,
        bytes_written: bytes,
        faults: c.faults,
        regrants: c.regrants,
        protect_calls: c.protect_calls,
        dirty_bytes: c.dirty_bytes,
        checkpoints,
        step_downs: c.step_downs,
        step_ups: c.step_ups,
        modelled_cost_us: cfg
            .tracking
            .cost
            .cost_us(c.faults, c.protect_calls, c.dirty_bytes),
        trace_ns: last_t,
    })
}

/// The result of a trace that writes nothing: nothing protected, nothing faulted, nothing saved.
#[must_use]
pub fn empty_report(cfg: &ReplayConfig, trace_ns: u64) -> ReplayReport {
    ReplayReport {
        policy: cfg.tracking.policy.name().into(),
        geometry: cfg.geometry.name().into(),
        mem_bytes: 0,
        writes: 0,
        bytes_written: 0,
        faults: 0,
        regrants: 0,
        protect_calls: 0,
        dirty_bytes: 0,
        checkpoints: 0,
        step_downs: 0,
        step_ups: 0,
        modelled_cost_us: 0.0,
        trace_ns,
    }
}
