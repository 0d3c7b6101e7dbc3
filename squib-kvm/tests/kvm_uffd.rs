//! The uffd-wp fault path's ordering on real hardware: a writer resumes only after the tracker
//! has marked its unit, however slow the re-grant is.
#![cfg(target_os = "linux")]
mod kvm_support;

use std::time::Duration;

use kvm_support::{kvm_or_skip, split_layout};
use squib_arch::{GpaRange, PageGeometry};
use squib_kvm::runner::serve_faults;
use squib_kvm::{KvmBackend, KvmVm, Tracking, VmConfig};
use squib_snapshot::{BackendError, DirtyTracker, Policy, Stage2Backend, TrackingConfig, TrackingMechanism};

/// The KVM backend with a re-grant that takes its time after un-protecting: the window in which
/// a writer woken by the un-protect would run ahead of the mark.
struct SlowGrant(KvmBackend);

impl Stage2Backend for SlowGrant {
    fn geometry(&self) -> PageGeometry {
        self.0.geometry()
    }
    fn mechanism(&self) -> TrackingMechanism {
        self.0.mechanism()
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.0.write_protect(range)
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        let r = self.0.grant_write(range);
        std::thread::sleep(Duration::from_millis(50));
        r
    }
}

#[test]
fn test_should_resume_a_uffd_wp_writer_only_after_its_unit_is_marked() {
    if !kvm_or_skip("test_should_resume_a_uffd_wp_writer_only_after_its_unit_is_marked") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 1,
        tracking: Tracking::UffdWp,
    };
    let (mut vm, backend) = KvmVm::new(&cfg).unwrap();
    let ram = vm.layout().ram().to_vec();
    let tracker = DirtyTracker::new(SlowGrant(backend), &ram, TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    let uffd = tracker.backend().0.uffd().unwrap();
    let gpa = ram[1].start() + 5 * 4096 + 16;
    std::thread::scope(|s| {
        let vcpu = s.spawn(|| {
            vm.poke(0, gpa, 8, 0x42).unwrap();
            // The write is done: the checkpoint a paused VM would take now must hold it.
            tracker.is_marked(gpa)
        });
        while !vcpu.is_finished() {
            serve_faults(&tracker, uffd, Duration::from_millis(2)).unwrap();
        }
        assert!(
            vcpu.join().unwrap(),
            "the guest's write completed before its unit was marked"
        );
    });
    assert_eq!(tracker.counters().faults, 1);
}
