//! The KVM run loop: live checkpoints handed to a sink, the last one with the vCPUs paused.
#![cfg(target_os = "linux")]
mod kvm_support;

use std::time::Duration;

use kvm_support::{kvm_or_skip, split_layout};
use squib_arch::GpaRange;
use squib_kvm::runner::{self, CheckpointSink, RunConfig};
use squib_kvm::{Tracking, VmConfig};
use squib_snapshot::{Policy, TrackingConfig};
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

/// Records what it is given; fails at checkpoint `fail_at`.
struct Recorder {
    seen: Vec<(u64, Vec<GpaRange>)>,
    fail_at: Option<u64>,
}

impl CheckpointSink for Recorder {
    type Error = std::io::Error;
    fn write(
        &mut self,
        index: u64,
        ranges: &[GpaRange],
        _: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), std::io::Error> {
        if self.fail_at == Some(index) {
            return Err(std::io::Error::other("disk full"));
        }
        self.seen.push((index, ranges.to_vec()));
        Ok(())
    }
}

fn cfg(tracking: Tracking) -> RunConfig {
    RunConfig {
        vm: VmConfig {
            layout: split_layout(),
            vcpus: 2,
            tracking,
        },
        workload: "random:len=12M,seed=8".parse().unwrap(),
        tracking: TrackingConfig::new(Policy::Adaptive),
        run_for: Duration::from_millis(200),
        checkpoint_every: Duration::from_millis(50),
    }
}

#[test]
fn test_should_hand_every_checkpoint_to_the_sink_and_close_with_a_paused_one() {
    if !kvm_or_skip("test_should_hand_every_checkpoint_to_the_sink_and_close_with_a_paused_one") {
        return;
    }
    for tracking in [Tracking::DirtyLog, Tracking::UffdWp] {
        let mut sink = Recorder {
            seen: Vec::new(),
            fail_at: None,
        };
        let r = runner::run(&cfg(tracking), &mut sink).unwrap();
        let n = r.checkpoints.len();
        assert!(n >= 2, "{tracking:?}: {n} checkpoints");
        assert!(r.checkpoints[n - 1].paused && r.checkpoints[..n - 1].iter().all(|c| !c.paused));
        assert_eq!(sink.seen.len(), n);
        assert_eq!(r.tracker.checkpoints, n as u64);
        let sum: u64 = r.checkpoints.iter().map(|c| c.dirty_bytes).sum();
        assert_eq!(sum, r.tracker.dirty_bytes);
        for (i, (index, ranges)) in sink.seen.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert!(
                ranges.windows(2).all(|w| w[0].end() < w[1].start()),
                "sorted, coalesced"
            );
        }
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
    let mut sink = Recorder {
        seen: Vec::new(),
        fail_at: Some(1),
    };
    let e = runner::run(&cfg(Tracking::UffdWp), &mut sink)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint 1") && e.contains("disk full"), "{e}");
    assert_eq!(sink.seen.len(), 1);
}
