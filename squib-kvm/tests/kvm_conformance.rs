//! The backend conformance suite against real KVM guests, in both tracking modes, over a layout
//! of two memslots with a hole between them.
#![cfg(target_os = "linux")]
mod kvm_support;

use std::time::Duration;

use kvm_support::{DEADLINE, kvm_or_skip, serve_until, split_layout};
use squib_arch::GpaRange;
use squib_kvm::runner::serve_faults;
use squib_kvm::{KvmBackend, KvmVm, MemoryLayout, Tracking, VmConfig};
use squib_snapshot::DirtyTracker;
use squib_snapshot::conformance::{Harness, run_all};

/// Guest writes are made by a real vCPU running the poke program; in `uffd-wp` mode this thread
/// serves the faults while the vCPU runs on another.
struct KvmHarness {
    tracking: Tracking,
    vm: Option<KvmVm>,
}

impl Harness for KvmHarness {
    type Backend = KvmBackend;

    fn regions(&self) -> Vec<GpaRange> {
        split_layout().ram().to_vec()
    }

    fn backend(&mut self, regions: &[GpaRange]) -> KvmBackend {
        let cfg = VmConfig {
            layout: MemoryLayout::new(regions.to_vec()).unwrap(),
            vcpus: 1,
            tracking: self.tracking,
        };
        let (vm, backend) = KvmVm::new(&cfg).unwrap();
        self.vm = Some(vm);
        backend
    }

    fn guest_write(&mut self, tracker: &DirtyTracker<KvmBackend>, gpa: u64, len: u64) -> Result<u64, String> {
        let before = tracker.counters().faults;
        let vm = self.vm.as_mut().ok_or("no VM")?;
        match tracker.backend().uffd() {
            None => vm.poke(0, gpa, len, 0x5A).map_err(|e| e.to_string())?,
            Some(uffd) => std::thread::scope(|s| {
                let h = s.spawn(|| vm.poke(0, gpa, len, 0x5A));
                let mut served = Ok(());
                let late = serve_until(
                    || h.is_finished(),
                    || {
                        if served.is_ok() {
                            served = serve_faults(tracker, uffd, Duration::from_millis(2)).map(drop);
                        }
                    },
                    "a poke",
                );
                served.map_err(|e| e.to_string())?;
                if late {
                    return Err(format!(
                        "a poke of {len} bytes at {gpa:#x} did not complete within {DEADLINE:?}"
                    ));
                }
                h.join()
                    .map_err(|_| "vCPU thread panicked".to_string())?
                    .map_err(|e| e.to_string())
            })?,
        }
        Ok(tracker.counters().faults - before)
    }
}

#[test]
fn test_should_pass_conformance_in_dirty_log_mode() {
    if !kvm_or_skip("test_should_pass_conformance_in_dirty_log_mode") {
        return;
    }
    run_all(&mut KvmHarness {
        tracking: Tracking::DirtyLog,
        vm: None,
    });
}

#[test]
fn test_should_pass_conformance_in_uffd_wp_mode() {
    if !kvm_or_skip("test_should_pass_conformance_in_uffd_wp_mode") {
        return;
    }
    run_all(&mut KvmHarness {
        tracking: Tracking::UffdWp,
        vm: None,
    });
}
