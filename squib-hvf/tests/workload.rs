//! The `squib run --backend hvf` runner end to end on any host: the guest program the Mac runs,
//! interpreted over the stand-in, with vCPU threads, live checkpoints, kicks and verification.

use std::time::Duration;

use squib_hvf::workload::{StoreLoopRun, run_on_stand_in};
use squib_snapshot::Policy;

fn cfg(policy: Policy, passes: u64, run_for: Duration) -> StoreLoopRun {
    StoreLoopRun {
        mem: 2 << 20,
        vcpus: 2,
        policy,
        stride: 512,
        passes,
        checkpoint_every: Duration::from_millis(2),
        run_for,
    }
}

#[test]
fn test_should_run_every_pass_and_find_base_plus_diffs_equal_to_guest_memory() {
    for policy in [Policy::Fine, Policy::Adaptive] {
        let run = cfg(policy, 40, Duration::from_secs(60));
        let mut seen = Vec::new();
        let report = run_on_stand_in(&run, &mut |c| seen.push(*c)).unwrap();
        assert!(
            report.vcpus.iter().all(|v| v.finished),
            "{policy}: {:?}",
            report.vcpus
        );
        assert_eq!(report.verified_bytes, run.mem);
        assert_eq!(seen, report.checkpoints);
        assert!(
            report.checkpoints.len() > 2,
            "{policy}: {} checkpoints",
            report.checkpoints.len()
        );
        let faults: u64 = report.vcpus.iter().map(|v| v.tracking_faults).sum();
        assert_eq!(faults, report.counters.faults);
        assert!(
            faults >= 2 * 64,
            "{policy}: every data page faults at least once, got {faults}"
        );
        // Each diff holds only pages the loops write (not the code pages), so none is all of RAM.
        assert!(report.checkpoints.iter().all(|c| c.dirty_bytes < run.mem));
    }
}

#[test]
fn test_should_stop_a_guest_that_never_ends_when_the_time_is_up() {
    let run = cfg(Policy::Adaptive, 0, Duration::from_millis(150));
    let report = run_on_stand_in(&run, &mut |_| {}).unwrap();
    assert!(report.vcpus.iter().all(|v| !v.finished), "{:?}", report.vcpus);
    assert!(report.elapsed >= Duration::from_millis(150));
    assert_eq!(report.verified_bytes, run.mem);
    assert!(report.counters.faults > 0);
}
