//! The `squib run --backend hvf` runner end to end on any host: the guest program the Mac runs,
//! interpreted over the stand-in, with vCPU threads, live checkpoints, kicks, verification, and
//! the snapshot chain written through the same `ChainSink` the soft and KVM runs use.

use std::time::Duration;

use squib_arch::PageGeometry;
use squib_hvf::workload::{RunReport, StoreLoopRun, layout, run_on_stand_in};
use squib_snapshot::report::error_chain;
use squib_snapshot::shadow::ShadowSink;
use squib_snapshot::snapshot::RestoreMode;
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::{ChainSink, CountingSink, Policy};
use vm_memory::{Bytes, GuestAddress};

/// A generous deadline for runs that end on an event (every pass done, N checkpoints).
const DEADLINE: Duration = Duration::from_secs(60);

fn cfg(policy: Policy, passes: u64, run_for: Duration) -> StoreLoopRun {
    StoreLoopRun {
        mem: 2 << 20,
        vcpus: 2,
        policy,
        stride: 512,
        passes,
        checkpoint_every: Duration::from_millis(2),
        run_for,
        stop_after_checkpoints: None,
    }
}

#[test]
fn test_should_run_every_pass_and_find_base_plus_diffs_equal_to_guest_memory() {
    for policy in [Policy::Fine, Policy::Adaptive] {
        let run = cfg(policy, 40, DEADLINE);
        let mut seen = Vec::new();
        let report = run_on_stand_in(&run, &mut CountingSink, &mut |c| seen.push(*c)).unwrap();
        assert!(
            report.vcpus.iter().all(|v| v.finished),
            "{policy}: not every vCPU finished within {DEADLINE:?}: {:?}",
            report.vcpus
        );
        assert_eq!(report.verified_bytes, run.mem);
        assert_eq!(seen, report.checkpoints);
        let faults: u64 = report.vcpus.iter().map(|v| v.tracking_faults).sum();
        assert_eq!(faults, report.counters.faults);
        assert!(
            faults >= 2 * 64,
            "{policy}: every data page faults at least once, got {faults}"
        );
        // Under `fine` each diff holds only pages written (the loops', and the code the VMM
        // wrote before the run), so none is all of RAM. (Under `adaptive` an epoch dense enough
        // to escalate saves the whole block, which is all of this 2 MiB RAM.)
        if policy == Policy::Fine {
            assert!(report.checkpoints.iter().all(|c| c.dirty_bytes < run.mem));
        }
    }
}

#[test]
fn test_should_stop_a_guest_that_never_ends_when_the_time_is_up() {
    let run = cfg(Policy::Adaptive, 0, Duration::from_millis(150));
    let report = run_on_stand_in(&run, &mut CountingSink, &mut |_| {}).unwrap();
    assert!(report.vcpus.iter().all(|v| !v.finished), "{:?}", report.vcpus);
    assert!(report.elapsed >= Duration::from_millis(150));
    assert_eq!(report.verified_bytes, run.mem);
    let faults: u64 = report.vcpus.iter().map(|v| v.tracking_faults).sum();
    assert_eq!(faults, report.counters.faults);
}

/// Guest RAM of the restored chain ending at `leaf`, as one buffer.
fn restored(leaf: &std::path::Path, mode: RestoreMode, gpa: u64, len: usize) -> Vec<u8> {
    let r = restore(leaf, mode).unwrap();
    assert_eq!(r.state.backend, "hvf");
    let mut out = vec![0u8; len];
    r.memory.read_slice(&mut out, GuestAddress(gpa)).unwrap();
    out
}

/// Runs `run` over the stand-in into a chain in a fresh directory; returns the report, the
/// restored chain (eager and lazy) and guest memory at the closing checkpoint.
fn run_into_chain(run: &StoreLoopRun) -> (RunReport, [Vec<u8>; 2], Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSink::create(dir.path(), "hvf", PageGeometry::APPLE_SILICON).unwrap();
    let mut sink = ShadowSink::new(chain);
    let report =
        run_on_stand_in(run, &mut sink, &mut |_| {}).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(sink.inner.saved().len(), report.checkpoints.len());
    // Ground truth: guest memory when the closing checkpoint was taken (vCPUs stopped).
    let image = sink.final_image.clone().expect("finish ran");
    assert_eq!(image.len(), 1);
    let (gpa, truth) = image.into_iter().next().unwrap();
    let leaf = sink.inner.saved().last().unwrap().path.clone();
    let eager = restored(&leaf, RestoreMode::Eager, gpa, truth.len());
    let lazy = restored(&leaf, RestoreMode::Lazy, gpa, truth.len());
    (report, [eager, lazy], truth)
}

#[test]
fn test_should_write_a_chain_that_restores_to_guest_memory_while_the_guest_keeps_writing() {
    let mut run = cfg(Policy::Adaptive, 0, DEADLINE);
    run.stop_after_checkpoints = Some(3);
    let (report, [eager, lazy], truth) = run_into_chain(&run);
    let live = &report.checkpoints[..report.checkpoints.len() - 1];
    assert_eq!(
        live.iter().filter(|c| c.dirty_bytes > 0).count(),
        3,
        "3 live checkpoints with writes did not happen within {DEADLINE:?}"
    );
    assert!(
        eager == truth,
        "the chain restores to other bytes than guest memory held"
    );
    assert!(
        lazy == truth,
        "the chain restored lazily differs from guest memory"
    );
}

#[test]
fn test_should_write_a_chain_holding_every_store_of_a_finished_guest() {
    let run = cfg(Policy::Fine, 25, DEADLINE);
    let (report, [eager, _], truth) = run_into_chain(&run);
    assert!(report.vcpus.iter().all(|v| v.finished), "{:?}", report.vcpus);
    assert!(eager == truth);
    // An independent model: each slot holds what the program's last pass stores there.
    for plan in layout(&run).unwrap() {
        for (gpa, want) in plan.program.expected(plan.program.passes) {
            let off = usize::try_from(gpa - squib_hvf::workload::RAM_BASE).unwrap();
            assert_eq!(&eager[off..off + want.len()], &want[..], "slot at {gpa:#x}");
        }
    }
}
