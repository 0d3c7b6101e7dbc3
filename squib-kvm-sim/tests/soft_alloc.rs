//! The fault path allocates nothing: a guest write that faults, the decode, the tracker's
//! re-grant (which may split a block) and the retry run without touching the allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use squib_arch::{GpaRange, PageGeometry};
use squib_kvm_sim::soft::{GuestMem, SoftVm};
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
use vm_memory::GuestAddress;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers every call to the system allocator; only counts calls on armed threads.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn test_should_take_faults_without_allocating() {
    let ram = GpaRange::new(0x8000_0000, 8 << 20).unwrap();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(ram.start()), 8 << 20)]).unwrap());
    for policy in [Policy::Fine, Policy::Coarse, Policy::Adaptive] {
        let vm = SoftVm::new(PageGeometry::APPLE_SILICON, Arc::clone(&mem), 1).unwrap();
        let vcpu = vm.vcpu(0).unwrap();
        let tracker = DirtyTracker::new(Arc::clone(vm.mmu()), &[ram], TrackingConfig::new(policy)).unwrap();
        tracker.start().unwrap();
        let data = [3u8; 32];
        ARMED.with(|a| a.set(true));
        let mut faults = 0;
        for i in 0..400u64 {
            // Page-spanning writes over every block: faults, splits, escalations, folds.
            faults += vcpu
                .write(&tracker, ram.start() + i * 0x4000 + 0x3FF0, &data)
                .unwrap();
        }
        ARMED.with(|a| a.set(false));
        assert!(faults > 0, "{policy}: the writes must have faulted");
        assert_eq!(COUNT.with(Cell::get), 0, "{policy}: the fault path allocated");
    }
}
