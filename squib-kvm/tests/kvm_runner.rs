//! The KVM run loop: live checkpoints handed to a sink, the last one with the vCPUs paused.
#![cfg(target_os = "linux")]
mod kvm_support;

use std::time::Duration;

use kvm_support::{kvm_or_skip, split_layout};
use squib_arch::GpaRange;
use squib_kvm::runner::{self, CheckpointSink, RunConfig};
use squib_kvm::{Tracking, VmConfig};
use squib_snapshot::report::error_chain;
use squib_snapshot::shadow::ShadowSink;
use squib_snapshot::{Policy, TrackingConfig};
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

/// Fails checkpoint `fail_at` once.
struct FailAt(Option<u64>);

impl CheckpointSink for FailAt {
    type Error = std::io::Error;
    fn write(
        &mut self,
        index: u64,
        _: &[GpaRange],
        _: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), std::io::Error> {
        if self.0 == Some(index) {
            self.0 = None;
            return Err(std::io::Error::other("disk full"));
        }
        Ok(())
    }
}

/// Live checkpoints with guest writes each run waits for.
const CHECKPOINTS: u64 = 3;
/// The deadline for them: generous, so a loaded machine only makes the test slower.
const DEADLINE: Duration = Duration::from_secs(60);

fn cfg(tracking: Tracking) -> RunConfig {
    RunConfig {
        vm: VmConfig {
            layout: split_layout(),
            vcpus: 2,
            tracking,
        },
        workload: "random:len=12M,seed=8".parse().unwrap(),
        tracking: TrackingConfig::new(Policy::Adaptive),
        run_for: DEADLINE,
        checkpoint_every: Duration::from_millis(50),
        stop_after_checkpoints: Some(CHECKPOINTS),
    }
}

#[test]
fn test_should_hand_every_checkpoint_to_the_sink_and_close_with_a_paused_one() {
    if !kvm_or_skip("test_should_hand_every_checkpoint_to_the_sink_and_close_with_a_paused_one") {
        return;
    }
    for tracking in [Tracking::DirtyLog, Tracking::UffdWp] {
        let mut sink = ShadowSink::new(FailAt(None));
        let r = runner::run(&cfg(tracking), &mut sink)
            .unwrap_or_else(|e| panic!("{tracking:?}: {}", error_chain(&e)));
        let n = r.checkpoints.len();
        let live = r.checkpoints[..n - 1]
            .iter()
            .filter(|c| c.dirty_bytes > 0)
            .count() as u64;
        assert_eq!(
            live, CHECKPOINTS,
            "{tracking:?}: {CHECKPOINTS} live checkpoints with writes did not happen within {DEADLINE:?}"
        );
        assert!(r.checkpoints[n - 1].paused && r.checkpoints[..n - 1].iter().all(|c| !c.paused));
        assert_eq!(sink.seen.len(), n);
        assert_eq!(r.tracker.checkpoints, n as u64);
        for (i, (index, ranges)) in sink.seen.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert!(
                ranges.windows(2).all(|w| w[0].end() < w[1].start()),
                "sorted, coalesced"
            );
        }
        // Ground truth: guest memory at the closing (paused) checkpoint equals base + diffs.
        assert_eq!(
            sink.verified_bytes(),
            16 << 20,
            "{tracking:?}: all of RAM compared"
        );
        assert!(r.writes > 0 && r.tracker.dirty_bytes > 0, "{tracking:?}: {r:?}");
        if tracking == Tracking::UffdWp {
            assert_eq!(r.faults_served, r.tracker.faults);
        }
    }
}

#[test]
fn test_should_fail_the_run_naming_the_checkpoint_whose_sink_failed() {
    if !kvm_or_skip("test_should_fail_the_run_naming_the_checkpoint_whose_sink_failed") {
        return;
    }
    let mut sink = ShadowSink::new(FailAt(Some(1)));
    let e = error_chain(&runner::run(&cfg(Tracking::UffdWp), &mut sink).unwrap_err());
    assert!(e.contains("checkpoint 1") && e.contains("disk full"), "{e}");
    // Checkpoint 0, then the closing one, which holds the failed one's units (folded back).
    assert_eq!(sink.seen.len(), 2);
    let (_, failed) = &sink.refused[0];
    let (_, closing) = &sink.seen[1];
    for r in failed {
        assert!(
            closing.iter().any(|c| c.contains_range(r)),
            "{r} of the failed checkpoint is missing from the closing one"
        );
    }
    assert_eq!(sink.verified_bytes(), 16 << 20, "base + diffs equal guest memory");
}
