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

use parking_lot::Mutex;
use squib_snapshot::report::ErrorChain;
use squib_snapshot::{BackendError, DirtyTracker, GuestFault, Stage2Backend, TrackError, TrackingConfig};

use super::guest::Workload;
use super::uffd::UffdWpBackend;
use super::vm::{KvmBackend, KvmError, KvmVm, VmConfig};

/// A write-protect fault the tracker could not take. Serving stops at it: the writer stays
/// blocked (its page protected) rather than resume unmarked, and the VM must stop.
#[derive(Debug, thiserror::Error)]
#[error("uffd-wp write fault at {gpa:#x} by {}: not tracked; the VM is stopped so that no write goes missing from a snapshot", who(*.vcpu))]
pub struct UntrackedFault {
    /// The faulting address.
    pub gpa: u64,
    /// The vCPU ([`GuestFault::NOT_A_VCPU`] for a VMM thread).
    pub vcpu: u32,
    /// Why the tracker refused it.
    #[source]
    pub source: TrackError,
}

fn who(vcpu: u32) -> String {
    if vcpu == GuestFault::NOT_A_VCPU {
        "a VMM thread".into()
    } else {
        format!("vCPU {vcpu}")
    }
}

impl From<BackendError> for UntrackedFault {
    /// The descriptor itself failed: no fault can be served any more.
    fn from(e: BackendError) -> Self {
        Self {
            gpa: 0,
            vcpu: GuestFault::NOT_A_VCPU,
            source: TrackError::Backend(e),
        }
    }
}

/// Resolve one userfaultfd write-protect fault at `gpa` taken by `vcpu`: the tracker's fault
/// path re-grants the unit and marks it, and only then is the writer woken (see [`super::uffd`]
/// for why the order matters).
///
/// # Errors
/// [`UntrackedFault`] when the tracker refuses the fault (its re-grant failed, or the address is
/// not tracked RAM). Nothing is made writable and the writer is not woken: no path may make a
/// page writable without marking it, so the caller must stop the VM.
pub fn resolve_fault<B: Stage2Backend>(
    tracker: &DirtyTracker<B>,
    uffd: &UffdWpBackend,
    gpa: u64,
    vcpu: u32,
) -> Result<(), UntrackedFault> {
    let out = tracker
        .on_write_fault(GuestFault {
            gpa,
            write: true,
            vcpu,
        })
        .map_err(|source| UntrackedFault { gpa, vcpu, source })?;
    // The unit is writable and marked: waking can only fail for a range that is not RAM, which
    // the tracker has just accepted; the writer would stay blocked, so say so.
    uffd.wake(out.unit).map_err(|e| UntrackedFault {
        gpa,
        vcpu,
        source: TrackError::Backend(e),
    })
}

/// Wait up to `timeout` for userfaultfd write-protect faults and resolve each with
/// [`resolve_fault`]. Returns the faults served.
///
/// # Errors
/// [`UntrackedFault`] for the first fault the tracker refuses, or when the descriptor cannot be
/// polled or read.
pub fn serve_faults<B: Stage2Backend>(
    tracker: &DirtyTracker<B>,
    uffd: &UffdWpBackend,
    timeout: Duration,
) -> Result<usize, UntrackedFault> {
    uffd.serve(timeout, &mut |gpa, vcpu| resolve_fault(tracker, uffd, gpa, vcpu))
}

/// A tracking backend that may fault through a userfaultfd (the KVM backend in `uffd-wp` mode,
/// or a test's wrapper around it).
pub trait UffdSource: Stage2Backend + 'static {
    /// The userfaultfd whose faults must be served, if this backend faults.
    fn uffd(&self) -> Option<&UffdWpBackend>;
}

impl UffdSource for KvmBackend {
    fn uffd(&self) -> Option<&UffdWpBackend> {
        KvmBackend::uffd(self)
    }
}

/// The thread serving a `uffd-wp` VM's write-protect faults.
///
/// If the tracker refuses a fault the thread stops serving and records why
/// ([`failure`](Self::failure)); every writer that faults from then on stays blocked, so no
/// write escapes tracking. The owner must then stop the VM: [`release_writers`](Self::release_writers)
/// lets the blocked vCPUs finish so their threads can be joined, after which no snapshot of that
/// VM may be taken.
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<Arc<UntrackedFault>>>>,
    release: Box<dyn Fn() -> Result<(), BackendError> + Send + Sync>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultServer")
            .field("served", &self.served())
            .field("failure", &self.failure())
            .finish_non_exhaustive()
    }
}

impl FaultServer {
    /// Start serving `tracker`'s faults; `None` when its backend does not fault.
    ///
    /// # Errors
    /// [`KvmError::Thread`] when the thread cannot start.
    pub fn spawn<B: UffdSource>(tracker: &Arc<DirtyTracker<B>>) -> Result<Option<Self>, KvmError> {
        if tracker.backend().uffd().is_none() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (t, s, n, f) = (
            Arc::clone(tracker),
            Arc::clone(&stop),
            Arc::clone(&served),
            Arc::clone(&failure),
        );
        let thread = std::thread::Builder::new()
            .name("squib-uffd".into())
            .spawn(move || {
                let Some(uffd) = t.backend().uffd() else {
                    return;
                };
                while !s.load(Ordering::Acquire) {
                    // Counted before the writer is woken, so a writer that resumed is counted.
                    let r = uffd.serve(Duration::from_millis(20), &mut |gpa, vcpu| {
                        n.fetch_add(1, Ordering::Relaxed);
                        resolve_fault(&t, uffd, gpa, vcpu)
                    });
                    if let Err(e) = r {
                        tracing::error!(error = %ErrorChain(&e), "uffd-wp tracking failed; the VM must stop");
                        *f.lock() = Some(Arc::new(e));
                        return;
                    }
                }
            })
            .map_err(|e| KvmError::Thread(e.to_string()))?;
        let t = Arc::clone(tracker);
        let release = Box::new(move || t.backend().uffd().map_or(Ok(()), UffdWpBackend::release_all));
        Ok(Some(Self {
            stop,
            served,
            failure,
            release,
            thread: Some(thread),
        }))
    }

    /// Faults served so far.
    #[must_use]
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Why the server stopped serving, if the tracker refused a fault.
    #[must_use]
    pub fn failure(&self) -> Option<Arc<UntrackedFault>> {
        self.failure.lock().clone()
    }

    /// After a [`failure`](Self::failure): unregister guest RAM so the writers still blocked on
    /// their faults finish and their threads can be stopped. Tracking is over; take no snapshot
    /// of this VM after this.
    ///
    /// # Errors
    /// [`KvmError::Backend`] when the userfaultfd refuses.
    pub fn release_writers(&self) -> Result<(), KvmError> {
        (self.release)().map_err(KvmError::Backend)
    }

    /// Stop serving and join the thread. Call only when nothing can fault any more.
    ///
    /// # Errors
    /// [`KvmError::UntrackedFault`] when the server had stopped on a fault the tracker refused.
    pub fn stop(mut self) -> Result<u64, KvmError> {
        self.halt()?;
        Ok(self.served())
    }

    fn halt(&mut self) -> Result<(), KvmError> {
        self.stop.store(true, Ordering::Release);
        if let Some(Err(_)) = self.thread.take().map(JoinHandle::join) {
            return Err(KvmError::Thread("the uffd handler thread panicked".into()));
        }
        self.failure()
            .map_or(Ok(()), |e| Err(KvmError::UntrackedFault(e)))
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

    /// Whether tracking still holds: `Err` once the fault server has met a fault the tracker
    /// refused. From then on the VM must stop and no snapshot of it may be taken.
    ///
    /// # Errors
    /// [`KvmError::UntrackedFault`] naming the fault.
    pub fn tracking_intact(&self) -> Result<(), KvmError> {
        match self.server.as_ref().and_then(FaultServer::failure) {
            Some(e) => Err(KvmError::UntrackedFault(e)),
            None => Ok(()),
        }
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
    /// End the run once this many live checkpoints have saved guest writes (checkpoints that
    /// found nothing dirty do not count, nor does the closing one), if `run_for` has not ended it
    /// first. Lets a caller wait for the guest's writes to be checkpointed rather than for time.
    pub stop_after_checkpoints: Option<u64>,
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
    // A checkpoint after a refused fault would be a snapshot missing a write.
    m.tracking_intact()?;
    let t = Instant::now();
    let mem = m.vm.ram();
    let stats = m
        .tracker
        .checkpoint(Some(mem), |ranges| sink.write(index, ranges, mem))
        .map_err(|e| KvmError::Checkpoint {
            index,
            source: Box::new(e),
        })?;
    Ok(CheckpointRecord {
        index,
        at_ms: (t - started).as_secs_f64() * 1e3,
        dirty_bytes: stats.dirty_bytes,
        ranges: stats.ranges,
        took_us: t.elapsed().as_secs_f64() * 1e6,
        paused,
    })
}

/// Run `cfg.workload` on a fresh KVM VM for `cfg.run_for` (or until `cfg.stop_after_checkpoints`
/// live checkpoints saved writes), with live checkpoints every `cfg.checkpoint_every` handed to `sink`, and a
/// closing one with the vCPUs paused, after which the sink's `finish` runs (still paused).
///
/// A failed live checkpoint ends the run early, but the vCPUs are still paused and the closing
/// checkpoint taken (it holds the failed one's units, folded back by the tracker) before the
/// failure is reported.
///
/// # Errors
/// [`KvmError`] from building the VM, the workload, a checkpoint or a vCPU (the first, when
/// several failed).
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
        let mut failed = None;
        let enough = |records: &[CheckpointRecord]| {
            let saved = records.iter().filter(|r| r.dirty_bytes > 0).count() as u64;
            cfg.stop_after_checkpoints.is_some_and(|max| saved >= max)
        };
        while next < end && !workers.any_exited() && !enough(&records) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let index = u64::try_from(records.len()).unwrap_or(u64::MAX);
            match checkpoint(&m, index, started, false, sink) {
                Ok(r) => records.push(r),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            next += cfg.checkpoint_every;
        }
        if failed.is_none() && !workers.any_exited() && !enough(&records) {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
        }
        m.tracking_intact()?;
        workers.pause(Duration::from_secs(30))?;
        // The closing checkpoint, also after a failed one (whose units were folded back).
        let index = u64::try_from(records.len()).unwrap_or(u64::MAX);
        let closing = checkpoint(&m, index, started, true, sink).and_then(|r| {
            records.push(r);
            sink.finish(m.vm.ram()).map_err(|e| KvmError::Checkpoint {
                index,
                source: Box::new(e),
            })
        });
        if let Some(e) = failed {
            return Err(e);
        }
        closing?;
        Ok::<_, KvmError>(records)
    })();
    let elapsed = started.elapsed();
    let progress_exits = workers.progress_exits();
    // A refused fault leaves its writer blocked: let it finish so the vCPUs can stop, and report
    // the refusal rather than what it caused (a pause that timed out, say).
    let lost = m.tracking_intact().err();
    if lost.is_some()
        && let Some(server) = &m.server
    {
        server.release_writers()?;
    }
    workers.resume();
    let stats = m.vm.stop(workers);
    if let Some(e) = lost {
        return Err(e);
    }
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
