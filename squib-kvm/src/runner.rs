//! A VM together with its tracker and, in `uffd-wp` mode, the thread that serves its faults.
//!
//! The ownership knot: the tracker owns the backend, and the fault handler needs the tracker.
//! So the tracker lives in an `Arc`, built after the VM, and the handler thread gets a clone; the
//! handler reaches the userfaultfd through `tracker.backend()`. Nothing holds the VM from the
//! handler, so the VM can be paused, stopped and read while faults are served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use squib_arch::GpaRange;
use squib_snapshot::{BackendError, DirtyTracker, GuestFault, Stage2Backend, TrackError, TrackingConfig};

use super::guest::Workload;
use super::uffd::UffdWpBackend;
use super::vm::{KvmBackend, KvmError, KvmVm, VmConfig};

/// Resolve one userfaultfd write-protect fault at `gpa`: the tracker's fault path re-grants the
/// unit and marks it, and only then is the writer woken (see [`super::uffd`] for why the order
/// matters). A fault the tracker refuses is still un-protected and woken, so no thread is left
/// blocked; the refusal is logged.
pub fn resolve_fault<B: Stage2Backend>(tracker: &DirtyTracker<B>, uffd: &UffdWpBackend, gpa: u64) {
    let fault = GuestFault {
        gpa,
        write: true,
        vcpu: 0,
    };
    let page = GpaRange::new(gpa & !4095, 4096);
    let woken = match tracker.on_write_fault(fault) {
        Ok(out) => uffd.wake(out.unit),
        Err(e) => {
            tracing::error!(gpa, error = %e, "uffd-wp fault not tracked; un-protecting the page");
            match page {
                Ok(p) => uffd.grant_write(p).and_then(|()| uffd.wake(p)),
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = woken {
        tracing::error!(gpa, error = %e, "waking a uffd-wp writer failed");
    }
}

/// Wait up to `timeout` for userfaultfd write-protect faults and resolve each with
/// [`resolve_fault`]. Returns the faults served.
///
/// # Errors
/// [`BackendError`] when the descriptor cannot be polled or read.
pub fn serve_faults<B: Stage2Backend>(
    tracker: &DirtyTracker<B>,
    uffd: &UffdWpBackend,
    timeout: Duration,
) -> Result<usize, BackendError> {
    uffd.serve(timeout, &mut |gpa| resolve_fault(tracker, uffd, gpa))
}

/// The thread serving a `uffd-wp` VM's write-protect faults.
#[derive(Debug)]
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), BackendError>>>,
}

impl FaultServer {
    /// Start serving `tracker`'s faults; `None` when its backend does not fault.
    ///
    /// # Errors
    /// [`KvmError::Thread`] when the thread cannot start.
    pub fn spawn(tracker: &Arc<DirtyTracker<KvmBackend>>) -> Result<Option<Self>, KvmError> {
        if tracker.backend().uffd().is_none() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (t, s, n) = (Arc::clone(tracker), Arc::clone(&stop), Arc::clone(&served));
        let thread = std::thread::Builder::new()
            .name("squib-uffd".into())
            .spawn(move || {
                let Some(uffd) = t.backend().uffd() else {
                    return Ok(());
                };
                while !s.load(Ordering::Acquire) {
                    // Counted before the writer is woken, so a writer that resumed is counted.
                    uffd.serve(Duration::from_millis(20), &mut |gpa| {
                        n.fetch_add(1, Ordering::Relaxed);
                        resolve_fault(&t, uffd, gpa);
                    })?;
                }
                Ok(())
            })
            .map_err(|e| KvmError::Thread(e.to_string()))?;
        Ok(Some(Self {
            stop,
            served,
            thread: Some(thread),
        }))
    }

    /// Faults served so far.
    #[must_use]
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stop serving and join the thread. Call only when nothing can fault any more.
    ///
    /// # Errors
    /// The thread's failure.
    pub fn stop(mut self) -> Result<u64, KvmError> {
        self.halt()?;
        Ok(self.served())
    }

    fn halt(&mut self) -> Result<(), KvmError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map_err(KvmError::from),
            Some(Err(_)) => Err(KvmError::Thread("the uffd handler thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// A KVM VM, its tracker, and its fault server: what `squib run --backend kvm`, the end-to-end
/// tests and the benches drive.
#[derive(Debug)]
pub struct Machine {
    /// The VM.
    pub vm: KvmVm,
    /// Its tracker (not started).
    pub tracker: Arc<DirtyTracker<KvmBackend>>,
    server: Option<FaultServer>,
}

impl Machine {
    /// Build the VM, a tracker over its RAM with `tracking`, and (in `uffd-wp` mode) start
    /// serving faults. Tracking starts with `machine.tracker.start()`.
    ///
    /// # Errors
    /// [`KvmError`] from building the VM, [`KvmError::Track`] from the tracker.
    pub fn new(cfg: &VmConfig, tracking: TrackingConfig) -> Result<Self, KvmError> {
        let (vm, backend) = KvmVm::new(cfg)?;
        let tracker =
            Arc::new(DirtyTracker::new(backend, vm.layout().ram(), tracking).map_err(KvmError::Track)?);
        let server = FaultServer::spawn(&tracker)?;
        Ok(Self { vm, tracker, server })
    }

    /// Faults the server has handled (0 in `dirty-log` mode).
    #[must_use]
    pub fn faults_served(&self) -> u64 {
        self.server.as_ref().map_or(0, FaultServer::served)
    }

    /// Stop tracking (grant everything back), then stop the fault server.
    ///
    /// # Errors
    /// [`KvmError::Track`] or the server's failure.
    pub fn shutdown(mut self) -> Result<(), KvmError> {
        if self.tracker.is_started() {
            self.tracker.stop().map_err(|e: TrackError| KvmError::Track(e))?;
        }
        if let Some(s) = self.server.take() {
            s.stop()?;
        }
        Ok(())
    }
}

pub use squib_snapshot::{CheckpointSink, CountingSink};

/// How to run a KVM guest.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The VM.
    pub vm: VmConfig,
    /// The workload every vCPU runs.
    pub workload: Workload,
    /// Tracking policy and its parameters.
    pub tracking: TrackingConfig,
    /// How long the guest runs.
    pub run_for: Duration,
    /// Live checkpoint interval.
    pub checkpoint_every: Duration,
}

/// One checkpoint of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointRecord {
    /// 0 for the first.
    pub index: u64,
    /// When it started, from the start of the run.
    pub at_ms: f64,
    /// Bytes handed to the sink.
    pub dirty_bytes: u64,
    /// Ranges handed to the sink.
    pub ranges: usize,
    /// How long the checkpoint took (harvest, drain, re-protect, sink).
    pub took_us: f64,
    /// Whether the vCPUs were paused (only the last one).
    pub paused: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Guest writes made.
    pub writes: u64,
    /// Progress exits taken.
    pub progress_exits: u64,
    /// Faults the uffd handler served (0 under `dirty-log`).
    pub faults_served: u64,
    /// Wall time of the guest's run.
    pub elapsed: Duration,
    /// The tracker's counters at the end.
    pub tracker: squib_snapshot::TrackerCounters,
    /// Every checkpoint, in order; the last closes the run with the vCPUs paused.
    pub checkpoints: Vec<CheckpointRecord>,
}

fn checkpoint<S: CheckpointSink>(
    m: &Machine,
    index: u64,
    started: Instant,
    paused: bool,
    sink: &mut S,
) -> Result<CheckpointRecord, KvmError> {
    let t = Instant::now();
    let mem = m.vm.ram();
    let stats = m
        .tracker
        .checkpoint(Some(mem), |ranges| sink.write(index, ranges, mem))
        .map_err(|e| KvmError::Checkpoint(format!("checkpoint {index}: {e}")))?;
    Ok(CheckpointRecord {
        index,
        at_ms: (t - started).as_secs_f64() * 1e3,
        dirty_bytes: stats.dirty_bytes,
        ranges: stats.ranges,
        took_us: t.elapsed().as_secs_f64() * 1e6,
        paused,
    })
}

/// Run `cfg.workload` on a fresh KVM VM for `cfg.run_for`, with live checkpoints every
/// `cfg.checkpoint_every` handed to `sink`, and a last one with the vCPUs paused.
///
/// # Errors
/// [`KvmError`] from building the VM, the workload, a checkpoint or a vCPU.
pub fn run<S: CheckpointSink>(cfg: &RunConfig, sink: &mut S) -> Result<RunReport, KvmError> {
    if cfg.checkpoint_every.is_zero() {
        return Err(KvmError::Config(
            "the checkpoint interval must be above zero".into(),
        ));
    }
    let mut m = Machine::new(&cfg.vm, cfg.tracking)?;
    let started = Instant::now();
    let workers = m.vm.start(&cfg.workload)?;
    let result = (|| {
        m.tracker.start()?;
        let mut records = Vec::new();
        let end = started + cfg.run_for;
        let mut next = started + cfg.checkpoint_every;
        while next < end && !workers.any_exited() {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let index = u64::try_from(records.len()).unwrap_or(u64::MAX);
            records.push(checkpoint(&m, index, started, false, sink)?);
            next += cfg.checkpoint_every;
        }
        if !workers.any_exited() {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
        }
        workers.pause(Duration::from_secs(30))?;
        let index = u64::try_from(records.len()).unwrap_or(u64::MAX);
        records.push(checkpoint(&m, index, started, true, sink)?);
        Ok::<_, KvmError>(records)
    })();
    let elapsed = started.elapsed();
    let progress_exits = workers.progress_exits();
    workers.resume();
    let stats = m.vm.stop(workers);
    let checkpoints = result?;
    let stats = stats?;
    let report = RunReport {
        writes: stats.writes,
        progress_exits,
        faults_served: m.faults_served(),
        elapsed,
        tracker: m.tracker.counters(),
        checkpoints,
    };
    m.shutdown()?;
    Ok(report)
}
