//! The TLB-invalidation barrier: `write_protect` returns only once every guest store that may
//! have used the old (writable) translation has landed, so a store after it always faults and
//! one before it is in memory before the checkpoint copies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use squib_arch::{GpaRange, PageGeometry};
use squib_kvm_sim::soft::SoftStage2;
use squib_snapshot::Stage2Backend;

#[test]
fn test_should_not_return_from_write_protect_while_a_store_is_in_flight() {
    let ram = GpaRange::new(0x8000_0000, 4 << 20).unwrap();
    let mmu = SoftStage2::new(PageGeometry::APPLE_SILICON, &[ram], 1).unwrap();
    let slot = mmu.claim_vcpu().unwrap();
    let landed = AtomicBool::new(false);
    let (entered_tx, entered_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            mmu.write_access(&slot, ram.start() + 0x10, || {
                entered_tx.send(()).unwrap();
                // A store the vCPU has begun but not finished when the protect starts.
                std::thread::sleep(Duration::from_millis(100));
                landed.store(true, Ordering::SeqCst);
            })
            .unwrap();
        });
        entered_rx.recv().unwrap();
        mmu.write_protect(ram).unwrap();
        assert!(
            landed.load(Ordering::SeqCst),
            "write_protect returned while a store through the old translation was still in flight"
        );
    });
    // And every later store faults.
    assert!(mmu.write_access(&slot, ram.start() + 0x10, || ()).is_err());
}
