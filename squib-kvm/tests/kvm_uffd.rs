//! The uffd-wp fault path on real hardware: a writer resumes only after the tracker has marked
//! its unit, however slow the re-grant is; a fault the tracker refuses stops the VM instead of
//! letting the page go writable unmarked; and every fault names the vCPU that took it.
#![cfg(target_os = "linux")]
mod kvm_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_support::{DEADLINE, kvm_or_skip, serve_until, split_layout};
use squib_arch::{GpaRange, PageGeometry};
use squib_kvm::runner::{FaultServer, UffdSource, serve_faults};
use squib_kvm::{KvmBackend, KvmVm, Tracking, VmConfig};
use squib_kvm::{KvmError, UffdWpBackend};
use squib_snapshot::{
    BackendError, DirtyTracker, GuestFault, Policy, Stage2Backend, TrackError, TrackingConfig,
    TrackingMechanism,
};
use vm_memory::{Bytes, GuestAddress};

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
        let late = serve_until(
            || vcpu.is_finished(),
            || {
                serve_faults(&tracker, uffd, Duration::from_millis(2)).unwrap();
            },
            "the guest's write",
        );
        assert!(!late, "the guest's write did not complete within {DEADLINE:?}");
        assert!(
            vcpu.join().unwrap(),
            "the guest's write completed before its unit was marked"
        );
    });
    assert_eq!(tracker.counters().faults, 1);
}

/// The KVM backend with a re-grant that fails over one range: a tracker that cannot take a fault.
struct FailGrant {
    inner: KvmBackend,
    refuse: GpaRange,
}

impl Stage2Backend for FailGrant {
    fn geometry(&self) -> PageGeometry {
        self.inner.geometry()
    }
    fn mechanism(&self) -> TrackingMechanism {
        self.inner.mechanism()
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.inner.write_protect(range)
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        if range.overlaps(&self.refuse) {
            return Err(BackendError::Hypervisor {
                op: "grant_write",
                range,
                reason: "injected failure".into(),
            });
        }
        self.inner.grant_write(range)
    }
}

impl UffdSource for FailGrant {
    fn uffd(&self) -> Option<&UffdWpBackend> {
        self.inner.uffd()
    }
}

/// Lets blocked writers go when dropped, so a failing assertion inside a thread scope cannot leave
/// the scope waiting forever on a writer held by its refused fault.
struct ReleaseOnDrop<'a>(&'a FaultServer);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.release_writers();
    }
}

/// Wait (generously) for the server to record a failure.
fn wait_failure(server: &FaultServer) -> Arc<squib_kvm::runner::UntrackedFault> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = server.failure() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "the fault server never reported the refused fault within 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn test_should_stop_the_vm_rather_than_let_a_refused_fault_write_unmarked() {
    if !kvm_or_skip("test_should_stop_the_vm_rather_than_let_a_refused_fault_write_unmarked") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 2,
        tracking: Tracking::UffdWp,
    };
    let (mut vm, backend) = KvmVm::new(&cfg).unwrap();
    let ram = vm.layout().ram().to_vec();
    let gpa = ram[1].start() + 9 * 4096 + 8;
    let refuse = GpaRange::new(gpa & !4095, 4096).unwrap();
    let failing = FailGrant {
        inner: backend,
        refuse,
    };
    let tracker = Arc::new(DirtyTracker::new(failing, &ram, TrackingConfig::new(Policy::Fine)).unwrap());
    tracker.start().unwrap();
    let server = FaultServer::spawn(&tracker).unwrap().unwrap();
    let mem = Arc::clone(vm.ram());
    std::thread::scope(|s| {
        let _release = ReleaseOnDrop(&server);
        // vCPU 1 writes the page whose re-grant fails.
        let writer = s.spawn(|| vm.poke(1, gpa, 8, 0x42));
        let e = wait_failure(&server);
        assert_eq!((e.gpa, e.vcpu), (gpa & !4095, 1), "{e}");
        assert!(matches!(e.source, TrackError::Backend(_)), "{e}");
        assert!(e.to_string().contains("vCPU 1"), "{e}");
        // The writer is held, its page still protected and unmarked: nothing was written.
        assert!(!writer.is_finished(), "the writer resumed after a refused fault");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(), 0);
        assert!(!tracker.is_marked(gpa));
        // Stopping the VM: the blocked writer is let go so its thread can be joined.
        server.release_writers().unwrap();
        writer.join().unwrap().unwrap();
    });
    assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(), 0x42);
    match server.stop() {
        Err(KvmError::UntrackedFault(e)) => assert_eq!(e.gpa, gpa & !4095),
        other => panic!("stop after a refused fault must report it, got {other:?}"),
    }
}

#[test]
fn test_should_name_the_vcpu_or_the_vmm_thread_that_faulted() {
    if !kvm_or_skip("test_should_name_the_vcpu_or_the_vmm_thread_that_faulted") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 2,
        tracking: Tracking::UffdWp,
    };
    let (vm, backend) = KvmVm::new(&cfg).unwrap();
    let ram = vm.layout().ram().to_vec();
    // A write by a thread that runs no vCPU (the VMM writing guest memory).
    let gpa = ram[0].start() + 3 * 4096;
    let failing = FailGrant {
        inner: backend,
        refuse: GpaRange::new(gpa, 4096).unwrap(),
    };
    let tracker = Arc::new(DirtyTracker::new(failing, &ram, TrackingConfig::new(Policy::Fine)).unwrap());
    tracker.start().unwrap();
    let server = FaultServer::spawn(&tracker).unwrap().unwrap();
    let mem = Arc::clone(vm.ram());
    std::thread::scope(|s| {
        let _release = ReleaseOnDrop(&server);
        let writer = s.spawn(|| mem.write_obj(7u64, GuestAddress(gpa)));
        let e = wait_failure(&server);
        assert_eq!((e.gpa, e.vcpu), (gpa & !4095, GuestFault::NOT_A_VCPU), "{e}");
        assert!(e.to_string().contains("a VMM thread"), "{e}");
        server.release_writers().unwrap();
        writer.join().unwrap().unwrap();
    });
}
