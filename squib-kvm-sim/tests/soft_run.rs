//! A simulated guest run end to end: vCPU threads, live checkpoints, the report, and the chain
//! the checkpoints make, checked against the guest's memory.

use std::time::Duration;

use squib_arch::{GpaRange, PageGeometry};
use squib_kvm_sim::soft::GuestMem;
use squib_kvm_sim::soft::runner::{CheckpointSink, CountingSink, DEFAULT_RAM_BASE, RunConfig, run};
use squib_snapshot::report::error_chain;
use squib_snapshot::shadow::ShadowSink;
use squib_snapshot::snapshot::RestoreMode;
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::{ChainSink, Policy, TrackingConfig};
use vm_memory::{Bytes, GuestAddress};

/// Live checkpoints with guest writes each run waits for.
const CHECKPOINTS: u64 = 4;
/// The deadline for them: generous, so a loaded machine only makes the test slower.
const DEADLINE: Duration = Duration::from_secs(60);

fn config(workload: &str, policy: Policy) -> RunConfig {
    RunConfig {
        geometry: PageGeometry::APPLE_SILICON,
        ram_base: DEFAULT_RAM_BASE,
        mem: 32 << 20,
        vcpus: 2,
        workload: workload.parse().unwrap(),
        tracking: TrackingConfig::new(policy),
        run_for: DEADLINE,
        checkpoint_every: Duration::from_millis(20),
        stop_after_checkpoints: Some(CHECKPOINTS),
    }
}

/// Checkpoints of the run that saved guest writes, the closing one excluded.
fn live_with_writes(r: &squib_kvm_sim::soft::runner::RunReport) -> u64 {
    let live = &r.checkpoints[..r.checkpoints.len() - 1];
    live.iter().filter(|c| c.dirty_bytes > 0).count() as u64
}

/// Guest memory as one buffer per region, from a restored chain.
fn restored_image(
    leaf: &std::path::Path,
    mode: RestoreMode,
    regions: &[(u64, Vec<u8>)],
) -> Vec<(u64, Vec<u8>)> {
    let r = restore(leaf, mode).unwrap();
    regions
        .iter()
        .map(|(gpa, bytes)| {
            let mut got = vec![0u8; bytes.len()];
            r.memory.read_slice(&mut got, GuestAddress(*gpa)).unwrap();
            (*gpa, got)
        })
        .collect()
}

#[test]
fn test_should_restore_the_chain_of_a_run_to_the_guest_memory_at_its_closing_checkpoint() {
    for policy in Policy::ALL {
        let dir = tempfile::tempdir().unwrap();
        let chain = ChainSink::create(dir.path(), "soft", PageGeometry::APPLE_SILICON).unwrap();
        let mut sink = ShadowSink::new(chain);
        let r = run(&config("hotspot:seed=5", policy), &mut sink)
            .unwrap_or_else(|e| panic!("{policy}: {}", error_chain(&e)));
        assert_eq!(
            live_with_writes(&r),
            CHECKPOINTS,
            "{policy}: {CHECKPOINTS} live checkpoints with writes did not happen within {DEADLINE:?}"
        );
        // Ground truth: the guest's memory when the closing checkpoint was taken (vCPUs
        // stopped), read by the sink's `finish`; it already matched base + diffs there.
        let image = sink.final_image.clone().expect("finish ran");
        assert_eq!(sink.verified_bytes(), 32 << 20);
        let saved = sink.inner.saved();
        assert_eq!(
            saved.len(),
            r.checkpoints.len(),
            "{policy}: one snapshot per checkpoint"
        );
        let leaf = &saved.last().unwrap().path;
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            assert!(
                restored_image(leaf, mode, &image) == image,
                "{policy}: the chain restored {mode:?} differs from guest memory"
            );
        }
        // Counted on both sides of the seam: every exit a vCPU took reached the tracker, and
        // every protect or re-grant the tracker made reached the stage-2 (plus the one grant of
        // the region when tracking stops).
        let t = &r.tracker;
        assert_eq!(
            r.vcpu_faults, t.faults,
            "{policy}: every exit reached the tracker"
        );
        assert_eq!(
            r.mmu.tlb_invalidations,
            t.protect_calls + t.regrants + 1,
            "{policy}: the stage-2 saw every call the tracker counted"
        );
        assert_eq!(r.checkpoints.len() as u64, t.checkpoints);
        assert!(r.writes > 0, "{policy}");
    }
}

#[test]
fn test_should_write_nothing_when_idle() {
    let mut cfg = config("idle", Policy::Adaptive);
    // Nothing is ever dirty, so no checkpoint counts: end by time (short, since nothing runs).
    cfg.run_for = Duration::from_millis(100);
    let mut sink = ShadowSink::new(CountingSink);
    let r = run(&cfg, &mut sink).unwrap();
    assert_eq!((r.writes, r.tracker.faults, r.tracker.dirty_bytes), (0, 0, 0));
    assert!(sink.seen.iter().all(|(_, ranges)| ranges.is_empty()));
    assert_eq!(sink.verified_bytes(), 32 << 20);
}

/// A sink that fails checkpoint `fail_at` once.
struct FailOnce {
    fail_at: u64,
    failed: bool,
}

impl CheckpointSink for FailOnce {
    type Error = std::io::Error;
    fn write(&mut self, index: u64, _: &[GpaRange], _: &GuestMem) -> Result<(), std::io::Error> {
        if index == self.fail_at && !self.failed {
            self.failed = true;
            return Err(std::io::Error::other("disk full"));
        }
        Ok(())
    }
}

#[test]
fn test_should_name_a_failed_checkpoint_and_close_the_run_with_its_units() {
    let mut sink = ShadowSink::new(FailOnce {
        fail_at: 2,
        failed: false,
    });
    let err = run(&config("seq:size=4096", Policy::Fine), &mut sink).unwrap_err();
    let msg = error_chain(&err);
    assert!(msg.contains("checkpoint 2") && msg.contains("disk full"), "{msg}");
    // The failed checkpoint's units were folded back: the closing checkpoint holds each of them.
    let (index, failed) = sink.refused.first().expect("checkpoint 2 was refused");
    assert_eq!(*index, 2);
    let (_, closing) = sink.seen.last().unwrap();
    for r in failed {
        assert!(
            closing.iter().any(|c| c.contains_range(r)),
            "{r} of the failed checkpoint is missing from the closing one: {closing:?}"
        );
    }
    // And nothing was lost: base + diffs equal guest memory at the end.
    assert_eq!(sink.verified_bytes(), 32 << 20, "finish compared all of RAM");
}

#[test]
fn test_should_refuse_a_workload_that_does_not_fit() {
    let mut cfg = config("random:start=30M,len=4M", Policy::Fine);
    assert!(
        run(&cfg, &mut CountingSink)
            .unwrap_err()
            .to_string()
            .contains("start/len")
    );
    cfg.workload = "seq".parse().unwrap();
    cfg.vcpus = 0;
    assert!(run(&cfg, &mut CountingSink).is_err());
}
