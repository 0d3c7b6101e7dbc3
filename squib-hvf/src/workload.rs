//! The store-loop guest on real vCPUs, with live dirty tracking and periodic checkpoints.
//!
//! This is what `squib run --backend hvf` runs, and it checks itself the way a snapshot user
//! would: the RAM as loaded is the base snapshot, every checkpoint's dirty ranges are copied over
//! it as a diff is, and after the last checkpoint base + diffs must equal guest memory byte for
//! byte. A write the tracking missed shows up as a mismatch with its address. Each checkpoint
//! also goes to a [`CheckpointSink`], the same one the soft and KVM runs use (`squib run
//! --snapshot-dir` writes a snapshot chain through `ChainSink`), which reads guest memory as the
//! vm-memory `GuestMemoryMmap` the VM maps ([`crate::vm::guest_ram`]).
//!
//! The run itself is written once, over guest memory and one small trait ([`VcpuFactory`]): on
//! Apple Silicon applevisor's vCPUs ([`run`]); on any host the stand-in and an interpreter
//! executing the same guest bytes (`run_on_stand_in`, feature `stand-in`), so the code a Mac runs
//! is the code the Linux tests run, down to the platform layer.
//!
//! Layout: vCPU `i`'s code is the 16 KiB page at `RAM_BASE + i * 16 KiB`, inside tracked RAM (so
//! the run also shows that write-protecting RAM keeps it executable); the rest of RAM is split
//! into one granule-aligned slice per vCPU, which that vCPU's loop stores over.

use std::time::Duration;

use squib_arch::GpaRange;
use squib_snapshot::{CheckpointSink, Policy, TrackError, TrackerCounters};

use crate::a64::{ProgramError, StoreLoop};
use crate::exit::VmmExit;
use crate::hv::GRANULE;
use crate::vcpu::{VcpuError, VcpuOps};
#[cfg(any(hvf, test, feature = "stand-in"))]
use crate::vm::GuestRam;
use crate::vm::VmError;

/// Where guest RAM starts.
pub const RAM_BASE: u64 = 0x4000_0000;

/// How to run the store loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLoopRun {
    /// Guest RAM in bytes (granule-aligned).
    pub mem: u64,
    /// vCPUs, each with its own loop over its own slice.
    pub vcpus: u32,
    /// Tracking policy.
    pub policy: Policy,
    /// Bytes between slots (a multiple of 16, at least 32).
    pub stride: u64,
    /// Passes before each vCPU stops by itself; 0 runs until `run_for`.
    pub passes: u64,
    /// Time between checkpoints.
    pub checkpoint_every: Duration,
    /// The longest the guest runs.
    pub run_for: Duration,
    /// End the run once this many live checkpoints have saved guest writes (if every vCPU has
    /// not finished and `run_for` has not passed first).
    pub stop_after_checkpoints: Option<u64>,
}

/// One checkpoint taken while the guest ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// Time since the vCPUs started.
    pub at: Duration,
    /// Coalesced dirty ranges.
    pub ranges: usize,
    /// Bytes in them.
    pub dirty_bytes: u64,
}

/// What one vCPU did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuReport {
    /// Tracking faults it took.
    pub tracking_faults: u64,
    /// It completed its passes and made its `hvc #0`.
    pub finished: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The tracker's counters at the end.
    pub counters: TrackerCounters,
    /// Each checkpoint, the last one taken after the vCPUs stopped.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// Bytes of guest memory found equal to base + diffs.
    pub verified_bytes: u64,
    /// Time the vCPUs ran.
    pub elapsed: Duration,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// RAM is too small for the vCPUs and stride asked for.
    #[error(
        "--mem {mem:#x} is too small for {vcpus} vCPU(s): each needs a 16 KiB code page and a data slice of at least one {stride}-byte slot"
    )]
    TooSmall {
        /// RAM bytes.
        mem: u64,
        /// vCPUs.
        vcpus: u32,
        /// Stride.
        stride: u64,
    },
    /// Guest RAM of this size cannot be placed.
    #[error("--mem {0:#x} is not a non-zero multiple of 16 KiB that fits above {RAM_BASE:#x}")]
    BadMem(u64),
    /// The guest program cannot be built.
    #[error(transparent)]
    Program(#[from] ProgramError),
    /// VM setup or guest memory access failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Tracking failed to start or stop.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A checkpoint failed (the tracker, or the sink).
    #[error("checkpoint {index} failed")]
    Checkpoint {
        /// Which checkpoint (0 is the first).
        index: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A vCPU stopped on an exit this guest never causes.
    #[error("vCPU {vcpu} stopped with an unexpected exit: {exit:?}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit.
        exit: VmmExit,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {0} thread panicked")]
    Panicked(u32),
    /// Base + diffs differ from guest memory: a write was lost.
    #[error("base + diffs differ from guest memory at IPA {gpa:#x}: a write was lost")]
    LostWrite {
        /// The first differing byte.
        gpa: u64,
    },
    /// A vCPU that finished left memory other than its program says.
    #[error("vCPU {vcpu}'s slot at IPA {gpa:#x} does not hold what its {passes} passes stored")]
    WrongBytes {
        /// The vCPU.
        vcpu: u32,
        /// The slot.
        gpa: u64,
        /// Passes made.
        passes: u64,
    },
}

/// One vCPU's part: its code page and its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPlan {
    /// IPA of its code (its first PC).
    pub code: u64,
    /// Its store loop.
    pub program: StoreLoop,
}

/// Place the code pages and data slices of `run`'s vCPUs in RAM.
///
/// ```
/// use squib_hvf::workload::{RAM_BASE, StoreLoopRun, layout};
/// use squib_snapshot::Policy;
/// use std::time::Duration;
/// let run = StoreLoopRun {
///     mem: 1 << 20, vcpus: 2, policy: Policy::Adaptive, stride: 4096, passes: 0,
///     checkpoint_every: Duration::from_millis(100), run_for: Duration::from_secs(1),
///     stop_after_checkpoints: None,
/// };
/// let plan = layout(&run).unwrap();
/// assert_eq!(plan[1].code, RAM_BASE + 0x4000);
/// assert_eq!(plan[0].program.base, RAM_BASE + 0x8000);
/// ```
///
/// # Errors
/// [`RunError::BadMem`], [`RunError::TooSmall`] or [`RunError::Program`].
pub fn layout(run: &StoreLoopRun) -> Result<Vec<VcpuPlan>, RunError> {
    let ram = GpaRange::new(RAM_BASE, run.mem).map_err(|_| RunError::BadMem(run.mem))?;
    if !ram.is_aligned(GRANULE) {
        return Err(RunError::BadMem(run.mem));
    }
    let too_small = RunError::TooSmall {
        mem: run.mem,
        vcpus: run.vcpus,
        stride: run.stride,
    };
    let n = u64::from(run.vcpus);
    let code_bytes = n.checked_mul(GRANULE).ok_or(RunError::BadMem(run.mem))?;
    let data = run
        .mem
        .checked_sub(code_bytes)
        .filter(|_| n > 0)
        .ok_or(too_small)?;
    let slice = data / n.max(1) / GRANULE * GRANULE;
    let count = slice.checked_div(run.stride).unwrap_or(0);
    if count == 0 && run.stride >= StoreLoop::SLOT_BYTES {
        return Err(RunError::TooSmall {
            mem: run.mem,
            vcpus: run.vcpus,
            stride: run.stride,
        });
    }
    (0..n)
        .map(|i| {
            let program = StoreLoop {
                base: RAM_BASE + code_bytes + i * slice,
                stride: run.stride,
                count,
                passes: run.passes,
                first_value: (i + 1) << 32,
            };
            program.validate()?;
            Ok(VcpuPlan {
                code: RAM_BASE + i * GRANULE,
                program,
            })
        })
        .collect()
}

/// Makes the vCPUs a run drives: over Hypervisor.framework, or over the stand-in.
///
/// `create` is called on the vCPU's own thread (Hypervisor.framework binds a vCPU to the thread
/// that created it); the handle it returns goes to the host thread, which passes it to `kick` to
/// make running vCPUs exit.
pub trait VcpuFactory: Sync {
    /// The vCPU.
    type Vcpu: VcpuOps;
    /// What the host thread holds to stop it.
    type Handle: Send;

    /// Create vCPU `id`, ready to run at `pc`.
    ///
    /// # Errors
    /// [`RunError`] when the vCPU cannot be created or set up.
    fn create(&self, id: u32, pc: u64) -> Result<(Self::Vcpu, Self::Handle), RunError>;

    /// Ask the vCPUs behind `handles` to exit (with an exit of reason CANCELED).
    fn kick(&self, handles: &[Self::Handle]);
}

/// Run the store loop on Hypervisor.framework: not on this host.
///
/// # Errors
/// [`RunError::Vm`] with [`HvError::Unavailable`](crate::hv::HvError::Unavailable), after the
/// layout is checked.
#[cfg(not(hvf))]
pub fn run<S: CheckpointSink>(
    run: &StoreLoopRun,
    sink: &mut S,
    on_checkpoint: &mut dyn FnMut(&CheckpointRecord),
) -> Result<RunReport, RunError> {
    let _ = (layout(run)?, sink, on_checkpoint);
    Err(VmError::Hv(crate::hv::HvError::Unavailable).into())
}

/// Run the store loop on Hypervisor.framework with live tracking, checkpointing into `sink`
/// every `run.checkpoint_every` until every vCPU finished or `run.run_for` passed, then verify.
///
/// # Errors
/// [`RunError`]: setup, a vCPU, a checkpoint, or the final verification failed.
#[cfg(hvf)]
pub fn run<S: CheckpointSink>(
    run: &StoreLoopRun,
    sink: &mut S,
    on_checkpoint: &mut dyn FnMut(&CheckpointRecord),
) -> Result<RunReport, RunError> {
    native::run(run, sink, on_checkpoint)
}

/// Run the store loop exactly as [`run`] does, with the stand-in for the framework and an
/// interpreter for the vCPUs executing the same guest code: the runner, the guest program, the
/// tracking and the sink are exercised on any host.
///
/// # Errors
/// As [`run`].
#[cfg(any(test, feature = "stand-in"))]
pub fn run_on_stand_in<S: CheckpointSink>(
    run: &StoreLoopRun,
    sink: &mut S,
    on_checkpoint: &mut dyn FnMut(&CheckpointRecord),
) -> Result<RunReport, RunError> {
    use std::sync::Arc;

    use squib_snapshot::{DirtyTracker, TrackingConfig};

    use crate::a64_sim::SimFactory;
    use crate::backend::HvfBackend;
    use crate::stand_in::StandIn;

    let plans = layout(run)?;
    let ram = GpaRange::new(RAM_BASE, run.mem).map_err(|_| RunError::BadMem(run.mem))?;
    let hv = Arc::new(StandIn::new(&[ram]));
    for p in &plans {
        hv.write(p.code, &crate::a64::to_bytes(&p.program.program()?));
    }
    let backend = HvfBackend::new(Arc::clone(&hv), &[ram]).map_err(VmError::from)?;
    let tracker = DirtyTracker::new(backend, &[ram], TrackingConfig::new(run.policy))?;
    drive(
        run,
        &plans,
        hv.memory(),
        &SimFactory::new(&hv),
        &tracker,
        sink,
        on_checkpoint,
    )
}

/// The run itself, shared by every platform (compiled where a platform exists).
#[cfg(any(hvf, test, feature = "stand-in"))]
mod driver {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    use squib_arch::esr::ec;
    use squib_snapshot::{CheckpointError, DirtyTracker, Stage2Backend};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vcpu::run_until_vmm_exit;

    /// One vCPU, on its own thread from creation to destruction: run until its `hvc #0`, or until
    /// the host kicks it after setting `stop`.
    fn vcpu_thread<F: VcpuFactory, B: Stage2Backend>(
        factory: &F,
        id: u32,
        pc: u64,
        tracker: &DirtyTracker<B>,
        stop: &AtomicBool,
        handles: mpsc::Sender<F::Handle>,
    ) -> Result<VcpuReport, RunError> {
        let (mut vcpu, handle) = factory.create(id, pc)?;
        // The host stops the vCPU through its handle; nothing else leaves this thread.
        let _ = handles.send(handle);
        drop(handles);
        let mut report = VcpuReport::default();
        loop {
            let out = run_until_vmm_exit(&mut vcpu, id, tracker)?;
            report.tracking_faults += out.tracking_faults;
            match out.exit {
                VmmExit::Canceled if stop.load(Ordering::Acquire) => return Ok(report),
                // A stray cancel or a timer the guest never armed: keep running.
                VmmExit::Canceled | VmmExit::VtimerActivated => {}
                VmmExit::Exception { esr, .. } if esr.ec() == ec::HVC64 => {
                    report.finished = true;
                    return Ok(report);
                }
                exit => return Err(RunError::UnexpectedExit { vcpu: id, exit }),
            }
        }
    }

    /// Guest memory at `gpa` into `buf`.
    fn read(mem: &GuestRam, gpa: u64, buf: &mut [u8]) -> Result<(), RunError> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| {
            let ram = mem
                .iter()
                .next()
                .and_then(|r| GpaRange::new(r.start_addr().0, r.len()).ok());
            match ram {
                Some(ram) => RunError::Vm(VmError::OutOfRange {
                    gpa,
                    len: buf.len(),
                    ram,
                }),
                None => RunError::BadMem(0),
            }
        })
    }

    fn copy_diff(mem: &GuestRam, shadow: &mut [u8], ranges: &[GpaRange]) -> Result<(), RunError> {
        for r in ranges {
            let off = usize::try_from(r.start() - RAM_BASE).map_err(|_| RunError::BadMem(r.start()))?;
            let len = usize::try_from(r.len()).map_err(|_| RunError::BadMem(r.len()))?;
            read(mem, r.start(), &mut shadow[off..off + len])?;
        }
        Ok(())
    }

    /// What a checkpoint's writer can fail with: the run's own diff copy, or the sink.
    #[derive(Debug, thiserror::Error)]
    enum WriteError<E: std::error::Error + 'static> {
        #[error("copying the diff for verification")]
        Copy(#[source] Box<RunError>),
        #[error("the snapshot sink failed")]
        Sink(#[source] E),
    }

    /// One checkpoint: the diff goes into the run's shadow (for the final verification) and to
    /// `sink`.
    fn checkpoint<B: Stage2Backend, S: CheckpointSink>(
        tracker: &DirtyTracker<B>,
        mem: &GuestRam,
        shadow: &mut [u8],
        sink: &mut S,
        index: u64,
        at: Duration,
    ) -> Result<CheckpointRecord, RunError> {
        let stats = tracker
            .checkpoint(Some(mem), |ranges| {
                copy_diff(mem, shadow, ranges).map_err(|e| WriteError::Copy(Box::new(e)))?;
                sink.write(index, ranges, mem).map_err(WriteError::Sink)
            })
            .map_err(|e: CheckpointError<WriteError<S::Error>>| RunError::Checkpoint {
                index,
                source: Box::new(e),
            })?;
        Ok(CheckpointRecord {
            at,
            ranges: stats.ranges,
            dirty_bytes: stats.dirty_bytes,
        })
    }

    /// The run itself, the same over every platform: base snapshot, start tracking, one thread per
    /// vCPU, checkpoints on the host thread while they run, stop, the closing checkpoint (also
    /// after a failed one, whose units the tracker folded back), the sink's `finish`,
    /// verification.
    pub(super) fn drive<F, B, S>(
        cfg: &StoreLoopRun,
        plans: &[VcpuPlan],
        mem: &GuestRam,
        factory: &F,
        tracker: &DirtyTracker<B>,
        sink: &mut S,
        on_checkpoint: &mut dyn FnMut(&CheckpointRecord),
    ) -> Result<RunReport, RunError>
    where
        F: VcpuFactory,
        B: Stage2Backend,
        S: CheckpointSink,
    {
        // The base snapshot: RAM as loaded, before the guest runs.
        let mut shadow = vec![0u8; usize::try_from(cfg.mem).map_err(|_| RunError::BadMem(cfg.mem))?];
        read(mem, RAM_BASE, &mut shadow)?;
        tracker.start()?;
        let stop = AtomicBool::new(false);
        let mut checkpoints: Vec<CheckpointRecord> = Vec::new();
        let started = Instant::now();
        let enough = |records: &[CheckpointRecord]| {
            let saved = records.iter().filter(|c| c.dirty_bytes > 0).count() as u64;
            cfg.stop_after_checkpoints.is_some_and(|n| saved >= n)
        };
        let (results, failure) = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let threads: Vec<_> = plans
                .iter()
                .zip(0u32..)
                .map(|(p, id)| {
                    let (tx, stop, pc) = (tx.clone(), &stop, p.code);
                    s.spawn(move || vcpu_thread(factory, id, pc, tracker, stop, tx))
                })
                .collect();
            drop(tx);
            // Every thread sends its handle or dies, so this ends.
            let handles: Vec<F::Handle> = rx.iter().collect();
            let all_done = || threads.iter().all(std::thread::ScopedJoinHandle::is_finished);
            let mut next = cfg.checkpoint_every;
            let mut failure = None;
            while !all_done() && started.elapsed() < cfg.run_for && !enough(&checkpoints) {
                let now = started.elapsed();
                if now >= next {
                    let index = checkpoints.len() as u64;
                    match checkpoint(tracker, mem, &mut shadow, sink, index, now) {
                        Ok(c) => {
                            on_checkpoint(&c);
                            checkpoints.push(c);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    next += cfg.checkpoint_every;
                } else {
                    std::thread::sleep((next - now).min(Duration::from_millis(5)));
                }
            }
            stop.store(true, Ordering::Release);
            while !all_done() {
                // A vCPU between two runs may miss a kick: keep kicking until all have stopped.
                factory.kick(&handles);
                std::thread::sleep(Duration::from_millis(1));
            }
            let results: Vec<_> = threads
                .into_iter()
                .zip(0u32..)
                .map(|(t, id)| t.join().unwrap_or(Err(RunError::Panicked(id))))
                .collect();
            (results, failure)
        });
        let elapsed = started.elapsed();
        // The last epoch closes with the vCPUs stopped; the sink then sees the memory it saved.
        let index = checkpoints.len() as u64;
        let closing = checkpoint(tracker, mem, &mut shadow, sink, index, elapsed).and_then(|last| {
            on_checkpoint(&last);
            checkpoints.push(last);
            sink.finish(mem).map_err(|e| RunError::Checkpoint {
                index,
                source: Box::new(e),
            })
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let vcpus = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        closing?;
        tracker.stop()?;

        let verified_bytes = verify(mem, &shadow)?;
        for ((p, r), id) in plans.iter().zip(&vcpus).zip(0u32..) {
            if r.finished {
                check_slots(mem, id, &p.program)?;
            }
        }
        Ok(RunReport {
            counters: tracker.counters(),
            checkpoints,
            vcpus,
            verified_bytes,
            elapsed,
        })
    }

    /// Base + diffs against guest memory, 1 MiB at a time.
    fn verify(mem: &GuestRam, shadow: &[u8]) -> Result<u64, RunError> {
        let mut chunk = vec![0u8; 1 << 20];
        let mut gpa = RAM_BASE;
        for expected in shadow.chunks(chunk.len()) {
            let actual = &mut chunk[..expected.len()];
            read(mem, gpa, actual)?;
            if let Some(i) = expected.iter().zip(actual.iter()).position(|(a, b)| a != b) {
                return Err(RunError::LostWrite {
                    gpa: gpa + u64::try_from(i).unwrap_or(0),
                });
            }
            gpa += u64::try_from(expected.len()).map_err(|_| RunError::BadMem(gpa))?;
        }
        Ok(gpa - RAM_BASE)
    }

    /// A finished vCPU's slots hold its last pass's value.
    fn check_slots(mem: &GuestRam, id: u32, program: &StoreLoop) -> Result<(), RunError> {
        let mut got = [0u8; 32];
        for (gpa, want) in program.expected(program.passes) {
            read(mem, gpa, &mut got)?;
            if got != want {
                return Err(RunError::WrongBytes {
                    vcpu: id,
                    gpa,
                    passes: program.passes,
                });
            }
        }
        Ok(())
    }
}

#[cfg(any(hvf, test, feature = "stand-in"))]
use driver::drive;

#[cfg(hvf)]
mod native {
    use applevisor::vcpu::{Reg, Vcpu, VcpuHandle};
    use applevisor::vm::{GicDisabled, VirtualMachineInstance};
    use squib_snapshot::{DirtyTracker, TrackingConfig};

    use super::*;
    use crate::a64::to_bytes;
    use crate::hv::HvError;
    use crate::vm::HvfVm;

    /// EL1h with D, A, I and F masked: where the guest starts.
    const CPSR_EL1H_DAIF_MASKED: u64 = 0x3C5;

    fn hv(call: &'static str) -> impl Fn(applevisor::error::HypervisorError) -> RunError {
        move |e| RunError::Vm(VmError::Hv(HvError::from_applevisor(call, e)))
    }

    /// vCPUs of the process's VM.
    struct HvfFactory(VirtualMachineInstance<GicDisabled>);

    impl VcpuFactory for HvfFactory {
        type Vcpu = Vcpu;
        type Handle = VcpuHandle;

        fn create(&self, _id: u32, pc: u64) -> Result<(Vcpu, VcpuHandle), RunError> {
            let vcpu = self.0.vcpu_create().map_err(hv("hv_vcpu_create"))?;
            vcpu.set_reg(Reg::PC, pc).map_err(hv("hv_vcpu_set_reg(PC)"))?;
            vcpu.set_reg(Reg::CPSR, CPSR_EL1H_DAIF_MASKED)
                .map_err(hv("hv_vcpu_set_reg(CPSR)"))?;
            let handle = vcpu.get_handle();
            Ok((vcpu, handle))
        }

        fn kick(&self, handles: &[VcpuHandle]) {
            // A vCPU already destroyed makes the call fail, harmlessly: the rest are asked again.
            if let Err(e) = self.0.vcpus_exit(handles) {
                tracing::debug!(error = %e, "hv_vcpus_exit");
            }
        }
    }

    pub(super) fn run<S: CheckpointSink>(
        cfg: &StoreLoopRun,
        sink: &mut S,
        on_checkpoint: &mut dyn FnMut(&CheckpointRecord),
    ) -> Result<RunReport, RunError> {
        let plans = layout(cfg)?;
        let ram = GpaRange::new(RAM_BASE, cfg.mem).map_err(|_| RunError::BadMem(cfg.mem))?;
        let mut vm = HvfVm::new(ram)?;
        for p in &plans {
            vm.write(p.code, &to_bytes(&p.program.program()?))?;
        }
        let backend = vm.backend().map_err(VmError::from)?;
        let tracker = DirtyTracker::new(backend, &[ram], TrackingConfig::new(cfg.policy))?;
        let factory = HvfFactory(vm.instance().clone());
        drive(cfg, &plans, vm.memory(), &factory, &tracker, sink, on_checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(hvf))]
    use squib_snapshot::CountingSink;

    fn cfg(mem: u64, vcpus: u32, stride: u64) -> StoreLoopRun {
        StoreLoopRun {
            mem,
            vcpus,
            policy: Policy::Fine,
            stride,
            passes: 2,
            checkpoint_every: Duration::from_millis(10),
            run_for: Duration::from_secs(1),
            stop_after_checkpoints: None,
        }
    }

    #[test]
    fn test_should_give_each_vcpu_its_own_code_page_and_slice() {
        let plan = layout(&cfg(4 << 20, 3, 4096)).unwrap();
        assert_eq!(plan.len(), 3);
        let data_start = RAM_BASE + 3 * GRANULE;
        let slice = ((4 << 20) - 3 * GRANULE) / 3 / GRANULE * GRANULE;
        for (i, p) in (0u64..).zip(&plan) {
            assert_eq!(p.code, RAM_BASE + i * GRANULE);
            assert_eq!(p.program.base, data_start + i * slice);
            assert_eq!(p.program.count, slice / 4096);
            assert!(
                p.program.end().unwrap() <= data_start + (i + 1) * slice,
                "slices overlap"
            );
            assert_eq!(p.program.first_value, (i + 1) << 32);
        }
        assert!(plan[2].program.end().unwrap() <= RAM_BASE + (4 << 20));
    }

    #[test]
    fn test_should_refuse_ram_too_small_or_misaligned() {
        assert!(matches!(
            layout(&cfg(GRANULE, 1, 64)),
            Err(RunError::TooSmall { vcpus: 1, .. })
        ));
        assert!(matches!(
            layout(&cfg(2 * GRANULE, 2, 64)),
            Err(RunError::TooSmall { .. })
        ));
        assert!(matches!(layout(&cfg(3 << 10, 1, 64)), Err(RunError::BadMem(_))));
        assert!(matches!(
            layout(&cfg(1 << 20, 0, 64)),
            Err(RunError::TooSmall { vcpus: 0, .. })
        ));
        assert!(matches!(
            layout(&cfg(1 << 20, 1, 24)),
            Err(RunError::Program(ProgramError::Stride(24)))
        ));
    }

    #[cfg(not(hvf))]
    #[test]
    fn test_should_say_hvf_is_unavailable_here_after_checking_the_layout() {
        let e = run(&cfg(1 << 20, 1, 64), &mut CountingSink, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("macOS on Apple Silicon"), "{e}");
        let e = run(&cfg(1 << 20, 1, 8), &mut CountingSink, &mut |_| {}).unwrap_err();
        assert!(matches!(e, RunError::Program(_)), "{e}");
    }
}
