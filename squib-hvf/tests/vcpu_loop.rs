//! The vCPU loop and exit handling, driven by the simulated vCPU over the stand-in: what a guest
//! sees (its stores land, its code keeps running) and what a snapshot user sees (the diffs hold
//! every byte written, even with checkpoints racing the vCPUs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use applevisor_sys::{HV_MEMORY_EXEC, hv_memory_flags_t};
use squib_arch::GpaRange;
use squib_arch::esr::ec;
use squib_hvf::hv::{Hv, HvError};
use squib_hvf::stand_in::{SimOp, SimVcpu, StandIn, syndrome};
use squib_hvf::{HvfBackend, VcpuError, VmmExit, run_until_vmm_exit};
use squib_snapshot::{DirtyTracker, Policy, TrackError, TrackingConfig};

const RAM: u64 = 0x4000_0000;
const RAM_LEN: u64 = 8 << 20;
const CODE: u64 = RAM + RAM_LEN - 0x4000;

fn ram() -> [GpaRange; 1] {
    [GpaRange::new(RAM, RAM_LEN).unwrap()]
}

fn tracker(policy: Policy) -> (DirtyTracker<HvfBackend<Arc<StandIn>>>, Arc<StandIn>) {
    let hv = Arc::new(StandIn::new(&ram()));
    let backend = HvfBackend::new(Arc::clone(&hv), &ram()).unwrap();
    let t = DirtyTracker::new(backend, &ram(), TrackingConfig::new(policy)).unwrap();
    t.start().unwrap();
    (t, hv)
}

fn is_hvc(exit: VmmExit) -> bool {
    matches!(exit, VmmExit::Exception { esr, .. } if esr.ec() == ec::HVC64)
}

fn read(hv: &StandIn, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    hv.read(gpa, &mut buf);
    buf
}

#[test]
fn test_should_retry_the_faulting_store_at_the_same_pc_until_it_lands() {
    let (t, hv) = tracker(Policy::Fine);
    let a = RAM + 0x4010;
    let b = RAM + 0x2_0008;
    let mut cpu = SimVcpu::new(
        &hv,
        CODE,
        vec![
            SimOp::Store {
                gpa: a,
                data: vec![0xA1; 8],
            },
            SimOp::StorePair {
                gpa: b,
                data: [0xB2; 16],
            },
            SimOp::Hvc,
        ],
    );
    let out = run_until_vmm_exit(&mut cpu, 3, &t).unwrap();
    assert!(is_hvc(out.exit), "{:?}", out.exit);
    assert_eq!(out.tracking_faults, 2);
    // Each faulting instruction is run again from its own PC: never skipped.
    assert_eq!(cpu.entry_pcs(), &[CODE, CODE, CODE + 4]);
    assert_eq!(read(&hv, a, 8), vec![0xA1; 8]);
    assert_eq!(read(&hv, b, 16), vec![0xB2; 16]);
    assert!(t.is_marked(a) && t.is_marked(b));
    assert!(hv.violations().is_empty(), "{:?}", hv.violations());
}

#[test]
fn test_should_hand_an_mmio_store_to_the_vmm_without_marking_anything() {
    let (t, hv) = tracker(Policy::Fine);
    let uart = 0x0900_0000;
    let mut cpu = SimVcpu::new(
        &hv,
        CODE,
        vec![
            SimOp::Store {
                gpa: uart,
                data: vec![b'A'],
            },
            SimOp::Hvc,
        ],
    );
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert_eq!(out.tracking_faults, 0);
    match out.exit {
        VmmExit::DataAbort { esr, ipa, .. } => {
            assert_eq!((esr.0, ipa), (syndrome::STORE_UNMAPPED, uart));
        }
        other => panic!("expected the MMIO store for the VMM, got {other:?}"),
    }
    assert_eq!(
        cpu.pc(),
        CODE,
        "the VMM gets the PC of the access, to emulate and step"
    );
    assert_eq!(t.counters().faults, 0);
    let mut diff = Vec::new();
    t.checkpoint(None, |r| -> Result<(), std::io::Error> {
        diff.extend_from_slice(r);
        Ok(())
    })
    .unwrap();
    assert!(diff.is_empty(), "{diff:?}");
}

/// An `Hv` with applevisor 1.0's bug: it sends READ only when asked to protect, dropping EXEC.
struct DropsExec(Arc<StandIn>);

impl Hv for DropsExec {
    fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError> {
        self.0.protect(ipa, size, flags & !HV_MEMORY_EXEC)
    }
}

#[test]
fn test_should_catch_a_backend_that_drops_exec() {
    let hv = Arc::new(StandIn::new(&ram()));
    let backend = HvfBackend::new(DropsExec(Arc::clone(&hv)), &ram()).unwrap();
    let t = DirtyTracker::new(backend, &ram(), TrackingConfig::new(Policy::Fine)).unwrap();
    let e = t.start().unwrap_err();
    assert!(matches!(e, TrackError::Backend(_)), "{e}");
    let v = hv.violations();
    assert_eq!(v.len(), 1);
    assert!(v[0].contains("EXEC dropped"), "{v:?}");
}

#[test]
fn test_should_keep_guest_code_in_protected_ram_executable() {
    let (t, hv) = tracker(Policy::Fine);
    assert_eq!(hv.flags_at(CODE), Some(0b101));
    let mut cpu = SimVcpu::new(
        &hv,
        CODE,
        vec![
            SimOp::Store {
                gpa: RAM,
                data: vec![1; 8],
            },
            SimOp::Hvc,
        ],
    );
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert!(is_hvc(out.exit), "{:?}", out.exit);
}

#[test]
fn test_should_stop_a_vcpu_whose_code_lost_exec() {
    // What a dropped EXEC does to the guest, in case a framework ever accepted it.
    let (t, hv) = tracker(Policy::Fine);
    let mut cpu = SimVcpu::new(&hv, 0x7000_0000, vec![SimOp::Hvc]);
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert!(
        matches!(out.exit, VmmExit::Exception { esr, .. } if esr.0 == syndrome::FETCH_UNMAPPED),
        "{:?}",
        out.exit
    );
}

#[test]
fn test_should_report_a_regrant_that_never_takes_effect() {
    /// Grants silently do nothing.
    struct NoGrant(Arc<StandIn>);
    impl Hv for NoGrant {
        fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError> {
            if flags == 0b111 {
                return Ok(());
            }
            self.0.protect(ipa, size, flags)
        }
    }
    let hv = Arc::new(StandIn::new(&ram()));
    let backend = HvfBackend::new(NoGrant(Arc::clone(&hv)), &ram()).unwrap();
    let t = DirtyTracker::new(backend, &ram(), TrackingConfig::new(Policy::Fine)).unwrap();
    t.start().unwrap();
    let mut cpu = SimVcpu::new(
        &hv,
        CODE,
        vec![SimOp::Store {
            gpa: RAM + 8,
            data: vec![7; 8],
        }],
    );
    let e = run_until_vmm_exit(&mut cpu, 5, &t).unwrap_err();
    assert!(
        matches!(e, VcpuError::NoProgress { vcpu: 5, ipa, .. } if ipa == RAM + 8),
        "{e}"
    );
}

/// Sets the flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Deterministic pseudo-random numbers (xorshift64*), so a failure reproduces.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn test_should_lose_no_write_while_checkpoints_race_the_vcpus() {
    for policy in [Policy::Fine, Policy::Adaptive, Policy::Coarse] {
        let (t, hv) = tracker(policy);
        // The base snapshot: all zeroes, like fresh RAM.
        let mut shadow = vec![0u8; usize::try_from(RAM_LEN).unwrap()];
        let take_diff = |shadow: &mut [u8]| {
            t.checkpoint(None, |ranges| -> Result<(), std::io::Error> {
                for r in ranges {
                    let off = usize::try_from(r.start() - RAM).unwrap();
                    let len = usize::try_from(r.len()).unwrap();
                    hv.read(r.start(), &mut shadow[off..off + len]);
                }
                Ok(())
            })
            .unwrap()
        };
        let done = AtomicBool::new(false);
        let mut dirty_diffs = 0;
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..3u32)
                .map(|id| {
                    let (t, hv, done) = (&t, &hv, &done);
                    s.spawn(move || {
                        let mut rng = u64::from(id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let mut faults = 0;
                        let mut round = 0u64;
                        while !done.load(Ordering::Acquire) {
                            let ops = (0..25)
                                .map(|_| {
                                    // A hot 256 KiB and the rest of RAM (minus the code page).
                                    let span = if next(&mut rng).is_multiple_of(4) {
                                        RAM_LEN - 0x4000
                                    } else {
                                        256 << 10
                                    };
                                    let gpa = RAM + (next(&mut rng) % (span / 16)) * 16;
                                    let byte = u8::try_from((round + u64::from(id) * 64) % 251).unwrap();
                                    SimOp::StorePair {
                                        gpa,
                                        data: [byte; 16],
                                    }
                                })
                                .chain([SimOp::Hvc])
                                .collect();
                            let mut cpu = SimVcpu::new(hv, CODE, ops);
                            let out = run_until_vmm_exit(&mut cpu, id, t).unwrap();
                            assert!(is_hvc(out.exit), "{:?}", out.exit);
                            faults += out.tracking_faults;
                            round += 1;
                        }
                        faults
                    })
                })
                .collect();
            // Checkpoints while the vCPUs write, until six of them raced writes (a generous
            // deadline fails the test instead); a panicking worker must not leave them spinning.
            let guard = StopOnDrop(&done);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while dirty_diffs < 6 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{policy:?}: only {dirty_diffs} diffs held writes within 60 s"
                );
                if take_diff(&mut shadow).dirty_bytes > 0 {
                    dirty_diffs += 1;
                }
            }
            drop(guard);
            let faults: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            assert!(faults > 0, "{policy:?}: no fault taken");
        });
        // The last epoch closes after the vCPUs stop.
        take_diff(&mut shadow);
        // Base + every diff, applied in order, must be exactly guest memory.
        let mut actual = vec![0u8; shadow.len()];
        hv.read(RAM, &mut actual);
        let first_bad = shadow.iter().zip(&actual).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "{policy:?}: a write is missing from the diffs");
        assert!(hv.violations().is_empty(), "{:?}", hv.violations());
    }
}
