//! Running a simulated guest: vCPU threads executing a workload while the VMM takes live
//! checkpoints.
//!
//! The point is to exercise the tracker under the conditions that lose writes in practice:
//! vCPUs keep writing while a checkpoint drains, re-protects and copies. Checkpoints therefore
//! run on the main thread while the vCPU threads never pause, and what a checkpoint produces goes
//! to a [`CheckpointSink`], so a snapshot writer plugs in without changing the runner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{CheckpointError, DirtyTracker, TrackError, TrackerCounters, TrackingConfig};
use vm_memory::GuestAddress;

use super::mmu::{MmuCounters, SoftStage2};
use super::vcpu::{GuestMem, SoftVm, SoftVmError, VcpuError};
use crate::workload::{WorkloadError, WorkloadSpec};

/// Where a simulated guest's RAM starts (as under Hypervisor.framework's usual layout).
pub const DEFAULT_RAM_BASE: u64 = 0x8000_0000;

pub use squib_snapshot::{CheckpointSink, CountingSink};

/// How to run a simulated guest.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Geometry of the soft stage-2.
    pub geometry: PageGeometry,
    /// Guest-physical address of the first byte of RAM.
    pub ram_base: u64,
    /// RAM size in bytes (a multiple of the granule).
    pub mem: u64,
    /// Number of vCPU threads.
    pub vcpus: u32,
    /// What each vCPU runs.
    pub workload: WorkloadSpec,
    /// Tracking policy and costs.
    pub tracking: TrackingConfig,
    /// How long the vCPUs run.
    pub run_for: Duration,
    /// Time between live checkpoints.
    pub checkpoint_every: Duration,
    /// End the run once this many live checkpoints have saved guest writes (checkpoints that
    /// found nothing dirty do not count, nor does the closing one), if `run_for` has not ended it
    /// first. Lets a caller wait for the guest's writes to be checkpointed rather than for time.
    pub stop_after_checkpoints: Option<u64>,
}

/// What running a simulated guest can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error("invalid run configuration: {0}")]
    Config(String),
    /// The workload cannot run on this RAM.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Guest memory could not be mapped.
    #[error("cannot map {mem} bytes of guest memory: {reason}")]
    Memory {
        /// Requested size.
        mem: u64,
        /// Why.
        reason: String,
    },
    /// The soft VM could not be built.
    #[error(transparent)]
    Vm(#[from] SoftVmError),
    /// The tracker failed.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A checkpoint failed.
    #[error("checkpoint {index} failed")]
    Checkpoint {
        /// Which checkpoint.
        index: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One checkpoint of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CheckpointRecord {
    /// Index (0 is the first).
    pub index: u64,
    /// When it was taken, from the start of the run, in ms.
    pub at_ms: f64,
    /// Coalesced dirty ranges.
    pub ranges: usize,
    /// Bytes in them.
    pub dirty_bytes: u64,
    /// How long drain, re-protect and the sink took, in µs.
    pub took_us: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Policy name.
    pub policy: String,
    /// Geometry name.
    pub geometry: String,
    /// RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Wall time the vCPUs ran, in seconds.
    pub elapsed_s: f64,
    /// Guest writes made.
    pub writes: u64,
    /// Guest bytes written.
    pub bytes_written: u64,
    /// Tracking faults the vCPUs took (equals the tracker's count).
    pub vcpu_faults: u64,
    /// The tracker's counters.
    pub tracker: TrackerCounters,
    /// The stage-2 model's counters.
    pub mmu: MmuCounters,
    /// Every checkpoint, the final one (closing the last epoch after the vCPUs stop) included.
    pub checkpoints: Vec<CheckpointRecord>,
}

#[derive(Debug, Default)]
struct VcpuTotals {
    writes: u64,
    bytes: u64,
    faults: u64,
}

/// Run the guest: start tracking, run `cfg.vcpus` vCPU threads for `cfg.run_for` (or until
/// `cfg.stop_after_checkpoints` live checkpoints saved writes), checkpoint every `cfg.checkpoint_every` into `sink`
/// while they run, then stop them, take a closing checkpoint and call the sink's `finish`.
///
/// A failed live checkpoint ends the run early, but the run still stops the vCPUs and takes the
/// closing checkpoint (which holds the failed one's units, folded back by the tracker) before it
/// reports the failure: the sink ends holding the guest's final state.
///
/// # Errors
/// [`RunError`] naming what failed (the first failure, when several did).
pub fn run<S: CheckpointSink>(cfg: &RunConfig, sink: &mut S) -> Result<RunReport, RunError> {
    if cfg.vcpus == 0 {
        return Err(RunError::Config("--vcpus must be at least 1".into()));
    }
    if cfg.checkpoint_every.is_zero() {
        return Err(RunError::Config(
            "the checkpoint interval must be above zero".into(),
        ));
    }
    if !cfg.mem.is_multiple_of(cfg.geometry.tracking_default) {
        return Err(RunError::Config(format!(
            "--mem {} is not a multiple of the {} KiB block",
            cfg.mem,
            cfg.geometry.tracking_default >> 10
        )));
    }
    // Every workload is built before any thread starts, so a bad parameter fails the run cleanly.
    let workloads = (0..cfg.vcpus)
        .map(|i| crate::workload::stream(&cfg.workload, cfg.mem, i, cfg.vcpus))
        .collect::<Result<Vec<_>, _>>()?;
    let len = usize::try_from(cfg.mem).map_err(|_| RunError::Memory {
        mem: cfg.mem,
        reason: "larger than the address space".into(),
    })?;
    let mem = GuestMem::from_ranges(&[(GuestAddress(cfg.ram_base), len)]).map_err(|e| RunError::Memory {
        mem: cfg.mem,
        reason: e.to_string(),
    })?;
    let vm = SoftVm::new(
        cfg.geometry,
        Arc::new(mem),
        usize::try_from(cfg.vcpus).unwrap_or(usize::MAX),
    )?;
    let ram = GpaRange::new(cfg.ram_base, cfg.mem).map_err(|e| RunError::Config(e.to_string()))?;
    let tracker = DirtyTracker::new(Arc::clone(vm.mmu()), &[ram], cfg.tracking)?;
    tracker.start()?;
    let vcpus = (0..cfg.vcpus)
        .map(|i| vm.vcpu(i))
        .collect::<Result<Vec<_>, _>>()?;

    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut records = Vec::new();
    let (totals, main_result) = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .zip(workloads)
            .map(|(vcpu, mut workload)| {
                let (tracker, stop, size) = (&tracker, &stop, cfg.workload.size);
                s.spawn(move || -> Result<VcpuTotals, VcpuError> {
                    let mut t = VcpuTotals::default();
                    let mut data = vec![0u8; usize::try_from(size).unwrap_or(8)];
                    let id = u8::try_from(vcpu.id() & 0x7F).unwrap_or(0);
                    while !stop.load(Ordering::Relaxed) {
                        let Some((off, len)) = workload.next_write() else {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        };
                        let stamp = t.writes.to_le_bytes();
                        let n = data.len().min(8);
                        data[..n].copy_from_slice(&stamp[..n]);
                        data[0] = id;
                        let len = usize::try_from(len).unwrap_or(data.len()).min(data.len());
                        let r = vcpu.write(tracker, ram.start() + off, &data[..len]);
                        match r {
                            Ok(f) => t.faults += f,
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                        t.writes += 1;
                        t.bytes += len as u64;
                    }
                    Ok(t)
                })
            })
            .collect();
        let main_result = checkpoint_loop(cfg, &tracker, vm.memory(), &stop, started, sink, &mut records);
        stop.store(true, Ordering::Relaxed);
        let totals: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (totals, main_result)
    });
    let elapsed = started.elapsed();
    // The end of the run closes the last epoch, also after a failure, with the vCPUs stopped:
    // guest memory no longer changes, so the sink's `finish` sees what the closing one saved.
    let closing = take_checkpoint(&tracker, vm.memory(), started, sink, &mut records).and_then(|()| {
        sink.finish(vm.memory()).map_err(|e| RunError::Checkpoint {
            index: records.len() as u64 - 1,
            source: Box::new(e),
        })
    });
    main_result?;
    let mut sum = VcpuTotals::default();
    for t in totals {
        let t = t?;
        sum.writes += t.writes;
        sum.bytes += t.bytes;
        sum.faults += t.faults;
    }
    closing?;
    tracker.stop()?;
    Ok(RunReport {
        policy: cfg.tracking.policy.name().into(),
        geometry: cfg.geometry.name().into(),
        mem: cfg.mem,
        vcpus: cfg.vcpus,
        elapsed_s: elapsed.as_secs_f64(),
        writes: sum.writes,
        bytes_written: sum.bytes,
        vcpu_faults: sum.faults,
        tracker: tracker.counters(),
        mmu: vm.mmu().counters(),
        checkpoints: records,
    })
}

/// The VMM thread while the vCPUs run: policy ticks and live checkpoints until the deadline.
fn checkpoint_loop<S: CheckpointSink>(
    cfg: &RunConfig,
    tracker: &DirtyTracker<Arc<SoftStage2>>,
    mem: &GuestMem,
    stop: &AtomicBool,
    started: Instant,
    sink: &mut S,
    records: &mut Vec<CheckpointRecord>,
) -> Result<(), RunError> {
    let tick = Duration::from_millis(10);
    let deadline = started + cfg.run_for;
    let mut next_cp = started + cfg.checkpoint_every;
    loop {
        let now = Instant::now();
        let enough = cfg
            .stop_after_checkpoints
            .is_some_and(|n| saved_writes(records) >= n);
        if now >= deadline || enough || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        tracker.tick(now - started);
        if now >= next_cp {
            take_checkpoint(tracker, mem, started, sink, records)?;
            next_cp += cfg.checkpoint_every;
            continue;
        }
        let wake = next_cp.min(deadline).min(now + tick);
        std::thread::sleep(wake.saturating_duration_since(now));
    }
}

/// Checkpoints that saved guest writes.
fn saved_writes(records: &[CheckpointRecord]) -> u64 {
    records.iter().filter(|r| r.dirty_bytes > 0).count() as u64
}

fn take_checkpoint<S: CheckpointSink>(
    tracker: &DirtyTracker<Arc<SoftStage2>>,
    mem: &GuestMem,
    started: Instant,
    sink: &mut S,
    records: &mut Vec<CheckpointRecord>,
) -> Result<(), RunError> {
    let index = records.len() as u64;
    let t0 = Instant::now();
    let stats = tracker
        .checkpoint(Some(mem), |ranges| sink.write(index, ranges, mem))
        .map_err(|e: CheckpointError<S::Error>| RunError::Checkpoint {
            index,
            source: Box::new(e),
        })?;
    records.push(CheckpointRecord {
        index,
        at_ms: (t0 - started).as_secs_f64() * 1e3,
        ranges: stats.ranges,
        dirty_bytes: stats.dirty_bytes,
        took_us: t0.elapsed().as_secs_f64() * 1e6,
    });
    Ok(())
}
