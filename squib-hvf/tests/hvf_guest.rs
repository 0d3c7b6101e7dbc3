//! A real aarch64 guest under Hypervisor.framework: faults, dirty bits and diff bytes.
//!
//! These run on Apple Silicon only (`cfg(hvf)`, set by the build script on aarch64 macOS); the
//! test binary needs the `com.apple.security.hypervisor` entitlement (or SIP's developer mode) to
//! create a VM. Elsewhere they type-check with `SQUIB_HVF_TYPECHECK=1 cargo check --all-targets`.
//! Hypervisor.framework allows one VM per process, so the tests take turns.
#![cfg(hvf)]

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use applevisor::vcpu::{Reg, Vcpu};
use squib_arch::GpaRange;
use squib_arch::esr::{FaultClass, ec};
use squib_hvf::a64::{StoreLoop, to_bytes};
use squib_hvf::vm::HvfVm;
use squib_hvf::workload::{self, RAM_BASE, StoreLoopRun};
use squib_hvf::{Framework, HvfBackend, VmmExit, run_until_vmm_exit};
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};

static ONE_VM: Mutex<()> = Mutex::new(());

fn one_vm() -> MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(PoisonError::into_inner)
}

const RAM_LEN: u64 = 4 << 20;
const CODE: u64 = RAM_BASE;

type Tracker = DirtyTracker<HvfBackend<Framework>>;

/// A VM whose code page (the first page of RAM, tracked like the rest) holds `program`.
fn setup(program: &StoreLoop, policy: Policy) -> (HvfVm, Tracker) {
    let ram = GpaRange::new(RAM_BASE, RAM_LEN).unwrap();
    let mut vm = HvfVm::new(ram).expect("create the VM (is the test binary entitled?)");
    vm.write(CODE, &to_bytes(&program.program().unwrap())).unwrap();
    let tracker = DirtyTracker::new(vm.backend().unwrap(), &[ram], TrackingConfig::new(policy)).unwrap();
    tracker.start().unwrap();
    (vm, tracker)
}

fn vcpu(vm: &HvfVm) -> Vcpu {
    let vcpu = vm.instance().vcpu_create().unwrap();
    vcpu.set_reg(Reg::PC, CODE).unwrap();
    vcpu.set_reg(Reg::CPSR, 0x3C5).unwrap(); // EL1h, DAIF masked
    vcpu
}

fn diff(t: &Tracker) -> Vec<GpaRange> {
    let mut out = Vec::new();
    t.checkpoint(None, |r| -> Result<(), std::io::Error> {
        out.extend_from_slice(r);
        Ok(())
    })
    .unwrap();
    out
}

/// Eight slots, one every other 16 KiB page, one pass.
fn eight_pages() -> StoreLoop {
    StoreLoop {
        base: RAM_BASE + 0x10_0000,
        stride: 0x8000,
        count: 8,
        passes: 1,
        first_value: 0x5157_1B00_0000_0001,
    }
}

fn is_hvc(exit: VmmExit) -> bool {
    matches!(exit, VmmExit::Exception { esr, .. } if esr.ec() == ec::HVC64)
}

#[test]
fn test_should_fault_once_per_written_page_and_diff_exactly_those_pages_with_their_bytes() {
    let _one = one_vm();
    let program = eight_pages();
    let (vm, t) = setup(&program, Policy::Fine);
    let mut cpu = vcpu(&vm);
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    // The code page was write-protected too: reaching the hvc proves EXEC stayed set.
    assert!(is_hvc(out.exit), "{:?}", out.exit);
    assert_eq!(
        out.tracking_faults, 8,
        "one fault per page: the stp faults, the str lands"
    );
    assert_eq!(t.counters().faults, 8);
    let d = diff(&t);
    let pages: Vec<GpaRange> = (0..8)
        .map(|i| GpaRange::new(program.base + i * 0x8000, 0x4000).unwrap())
        .collect();
    assert_eq!(d, pages);
    for (gpa, want) in program.expected(1) {
        let mut got = [0u8; 32];
        vm.read(gpa, &mut got).unwrap();
        assert_eq!(got, want, "slot at {gpa:#x}");
        assert!(
            d.iter().any(|r| r.contains(gpa)),
            "{gpa:#x} written but not in the diff"
        );
    }
}

#[test]
fn test_should_fault_again_after_a_checkpoint() {
    let _one = one_vm();
    let program = eight_pages();
    let (vm, t) = setup(&program, Policy::Fine);
    let mut cpu = vcpu(&vm);
    let first = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert_eq!(diff(&t).len(), 8);
    assert!(diff(&t).is_empty(), "no writes since the last checkpoint");
    cpu.set_reg(Reg::PC, CODE).unwrap();
    let second = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert!(is_hvc(first.exit) && is_hvc(second.exit));
    assert_eq!((first.tracking_faults, second.tracking_faults), (8, 8));
    assert_eq!(diff(&t).len(), 8);
}

#[test]
fn test_should_grant_a_whole_block_on_one_fault_under_coarse() {
    let _one = one_vm();
    let program = StoreLoop {
        base: RAM_BASE + (2 << 20),
        stride: 0x4000,
        count: 16,
        passes: 1,
        first_value: 3,
    };
    let (vm, t) = setup(&program, Policy::Coarse);
    let mut cpu = vcpu(&vm);
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    assert!(is_hvc(out.exit), "{:?}", out.exit);
    // The code page's block is not written; the data block faults once.
    assert_eq!(out.tracking_faults, 1);
    assert_eq!(
        diff(&t),
        vec![GpaRange::new(RAM_BASE + (2 << 20), 2 << 20).unwrap()]
    );
}

#[test]
fn test_should_hand_a_store_to_unmapped_space_to_the_vmm_unmarked() {
    let _one = one_vm();
    let mmio = StoreLoop {
        base: 0x0900_0000,
        stride: 32,
        count: 1,
        passes: 1,
        first_value: 1,
    };
    let (vm, t) = setup(&mmio, Policy::Fine);
    let mut cpu = vcpu(&vm);
    let out = run_until_vmm_exit(&mut cpu, 0, &t).unwrap();
    match out.exit {
        VmmExit::DataAbort { esr, ipa, .. } => {
            let da = esr.data_abort().unwrap();
            assert_eq!(da.dfsc.class(), FaultClass::Translation, "{esr:?}");
            assert!(da.wnr);
            // The stp at offset 16 is the loop's first store.
            assert_eq!(ipa, 0x0900_0010);
        }
        other => panic!("expected a data abort for the VMM, got {other:?}"),
    }
    assert_eq!(out.tracking_faults, 0);
    assert_eq!(t.counters().faults, 0);
    assert!(diff(&t).is_empty());
}

#[test]
fn test_should_run_the_workload_with_live_checkpoints_and_lose_no_write() {
    let _one = one_vm();
    let run = StoreLoopRun {
        mem: 8 << 20,
        vcpus: 2,
        policy: Policy::Adaptive,
        stride: 4096,
        passes: 2000,
        checkpoint_every: Duration::from_millis(2),
        run_for: Duration::from_secs(20),
        stop_after_checkpoints: None,
    };
    let mut seen = 0;
    let report = workload::run(&run, &mut squib_snapshot::CountingSink, &mut |_| seen += 1).unwrap();
    assert!(report.vcpus.iter().all(|v| v.finished), "{:?}", report.vcpus);
    assert_eq!(report.verified_bytes, run.mem);
    assert_eq!(seen, report.checkpoints.len());
    assert!(report.counters.faults > 0);
    assert_eq!(
        report.vcpus.iter().map(|v| v.tracking_faults).sum::<u64>(),
        report.counters.faults
    );
}
