//! A simulated guest run end to end: vCPU threads, live checkpoints, the report.

use std::time::Duration;

use squib_arch::{GpaRange, PageGeometry};
use squib_kvm_sim::soft::GuestMem;
use squib_kvm_sim::soft::runner::{CheckpointSink, CountingSink, DEFAULT_RAM_BASE, RunConfig, run};
use squib_snapshot::{Policy, TrackingConfig};

fn config(workload: &str, policy: Policy) -> RunConfig {
    RunConfig {
        geometry: PageGeometry::APPLE_SILICON,
        ram_base: DEFAULT_RAM_BASE,
        mem: 32 << 20,
        vcpus: 2,
        workload: workload.parse().unwrap(),
        tracking: TrackingConfig::new(policy),
        // Generous against the interval: on a loaded 2-core machine one checkpoint of 32 MiB can
        // take a large part of a short run, and the test needs live checkpoints to have happened.
        run_for: Duration::from_millis(500),
        checkpoint_every: Duration::from_millis(20),
    }
}

#[test]
fn test_should_report_faults_and_dirty_bytes_consistently() {
    for policy in Policy::ALL {
        let r = run(&config("hotspot:seed=5", policy), &mut CountingSink).unwrap();
        assert!(r.writes > 0, "{policy}");
        assert_eq!(
            r.vcpu_faults, r.tracker.faults,
            "{policy}: every exit reached the tracker"
        );
        assert_eq!(r.tracker.faults, r.tracker.regrants);
        let per_cp: u64 = r.checkpoints.iter().map(|c| c.dirty_bytes).sum();
        assert_eq!(per_cp, r.tracker.dirty_bytes, "{policy}");
        assert_eq!(r.checkpoints.len() as u64, r.tracker.checkpoints);
        assert!(
            r.checkpoints.len() >= 2,
            "{policy}: live checkpoints must have run"
        );
        assert!(r.tracker.dirty_bytes > 0);
    }
}

#[test]
fn test_should_write_nothing_when_idle() {
    let r = run(&config("idle", Policy::Adaptive), &mut CountingSink).unwrap();
    assert_eq!((r.writes, r.tracker.faults, r.tracker.dirty_bytes), (0, 0, 0));
}

/// A sink that fails once: the tracker folds its ranges into the next checkpoint.
struct FailOnce(bool, Vec<Vec<GpaRange>>);

impl CheckpointSink for FailOnce {
    type Error = std::io::Error;
    fn write(&mut self, _: u64, ranges: &[GpaRange], _: &GuestMem) -> Result<(), std::io::Error> {
        if std::mem::take(&mut self.0) {
            return Err(std::io::Error::other("disk full"));
        }
        self.1.push(ranges.to_vec());
        Ok(())
    }
}

#[test]
fn test_should_name_a_failed_checkpoint() {
    let mut sink = FailOnce(true, Vec::new());
    let err = run(&config("seq:size=4096", Policy::Fine), &mut sink).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("checkpoint 0") && msg.contains("disk full"), "{msg}");
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
