//! No lost write: the hazards of design.md, each pinned by a test that fails on the naive code.
//!
//! The fixture here models guest memory faithfully enough for races to matter: each granule page
//! is one atomic word holding a writable flag and the last value written, so a guest write is an
//! atomic "check permission and store" (as the MMU makes it), a protect clears the flag, and a
//! copy reads the value. Writer threads play vCPUs; a checkpoint thread takes live checkpoints
//! and applies each diff to an image; quiescent checkpoints (writers parked) must make the image
//! equal to memory exactly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{
    BackendError, CheckpointError, CostModel, DirtyTracker, GuestFault, Policy, Stage2Backend, TrackingConfig,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

const WRITABLE: u64 = 1 << 63;

/// Pages as atomic words: bit 63 = writable, the rest = the last value stored.
struct AtomicPages {
    geometry: PageGeometry,
    ram: GpaRange,
    pages: Box<[AtomicU64]>,
    fail_protect: AtomicBool,
}

impl AtomicPages {
    fn new(geometry: PageGeometry, ram: GpaRange) -> Self {
        let n = ram.len() / geometry.granule;
        Self {
            geometry,
            ram,
            pages: (0..n).map(|_| AtomicU64::new(WRITABLE)).collect(),
            fail_protect: AtomicBool::new(false),
        }
    }

    fn page(&self, gpa: u64) -> &AtomicU64 {
        &self.pages[usize::try_from((gpa - self.ram.start()) / self.geometry.granule).unwrap()]
    }

    fn each(&self, range: GpaRange, f: impl Fn(&AtomicU64)) -> Result<(), BackendError> {
        if !range.is_aligned(self.geometry.granule) {
            return Err(BackendError::Misaligned {
                range,
                granule: self.geometry.granule,
            });
        }
        if !self.ram.contains_range(&range) {
            return Err(BackendError::NotGuestMemory { range });
        }
        for gpa in (range.start()..range.end()).step_by(usize::try_from(self.geometry.granule).unwrap()) {
            f(self.page(gpa));
        }
        Ok(())
    }

    /// A vCPU store of `value` (< 2^63) to the page holding `gpa`: atomic check-and-store; a
    /// denied store exits to the tracker and is retried. Returns the faults taken.
    fn guest_store<B: Stage2Backend>(&self, t: &DirtyTracker<B>, gpa: u64, value: u64, vcpu: u32) -> u32 {
        let page = self.page(gpa);
        let mut faults = 0;
        loop {
            let cur = page.load(Ordering::Acquire);
            if cur & WRITABLE == 0 {
                faults += 1;
                // A grant that never takes effect would retry for ever; a tracking bug must
                // fail the test instead.
                assert!(
                    faults < 1_000_000,
                    "a store to {gpa:#x} keeps faulting after re-grants"
                );
                t.on_write_fault(GuestFault {
                    gpa,
                    write: true,
                    vcpu,
                })
                .unwrap();
                continue;
            }
            if page
                .compare_exchange(cur, WRITABLE | value, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return faults;
            }
        }
    }

    fn value(&self, gpa: u64) -> u64 {
        self.page(gpa).load(Ordering::Acquire) & !WRITABLE
    }
}

impl Stage2Backend for AtomicPages {
    fn geometry(&self) -> PageGeometry {
        self.geometry
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        if self.fail_protect.swap(false, Ordering::SeqCst) {
            return Err(BackendError::Hypervisor {
                op: "write_protect",
                range,
                reason: "injected".into(),
            });
        }
        self.each(range, |p| {
            p.fetch_and(!WRITABLE, Ordering::AcqRel);
        })
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.each(range, |p| {
            p.fetch_or(WRITABLE, Ordering::AcqRel);
        })
    }
}

fn nested_cost() -> CostModel {
    // Expensive faults, fast disk: the adaptive policy escalates after a handful of faults, so
    // mode changes race with faults often.
    CostModel {
        fault_us: 50.0,
        protect_us: 120.0,
        write_bytes_per_us: 5000.0,
    }
}

/// Take a checkpoint whose writer applies the diff to `image`.
fn checkpoint_into(tracker: &DirtyTracker<Arc<AtomicPages>>, image: &Mutex<Vec<u64>>, mem: &AtomicPages) {
    tracker
        .checkpoint(None, |r| -> Result<(), std::io::Error> {
            apply(image, mem, r);
            Ok(())
        })
        .unwrap();
}

/// Apply one diff to the image: copy each dirty page's current value (the writer's copy step).
fn apply(image: &Mutex<Vec<u64>>, mem: &AtomicPages, ranges: &[GpaRange]) {
    let mut img = image.lock();
    let g = mem.geometry.granule;
    for r in ranges {
        for gpa in (r.start()..r.end()).step_by(usize::try_from(g).unwrap()) {
            img[usize::try_from((gpa - mem.ram.start()) / g).unwrap()] = mem.value(gpa);
        }
    }
}

fn live_checkpoint_stress(policy: Policy) {
    // One tick per checkpoint, 1 ms apart, 5 ms windows: a coarse block faults at most once per
    // epoch, so a hot block shows up to five faults per window, over the threshold of two.
    let geometry = PageGeometry::APPLE_SILICON;
    let ram = GpaRange::new(0x4000_0000, 16 << 20).unwrap();
    let pages = ram.len() / geometry.granule;
    let mem = Arc::new(AtomicPages::new(geometry, ram));
    let config = TrackingConfig {
        cost: nested_cost(),
        window: Duration::from_millis(5),
        step_down_threshold: 2,
        ..TrackingConfig::new(policy)
    };
    let tracker = Arc::new(DirtyTracker::new(Arc::clone(&mem), &[ram], config).unwrap());
    let image = Arc::new(Mutex::new(vec![0u64; usize::try_from(pages).unwrap()]));
    // Writers hold the read side per store; a quiescent checkpoint takes the write side.
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let stores = Arc::new(AtomicU64::new(0));
    tracker.start().unwrap();
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (mem, tracker, gate, stop) = (
                Arc::clone(&mem),
                Arc::clone(&tracker),
                Arc::clone(&gate),
                Arc::clone(&stop),
            );
            let stores = Arc::clone(&stores);
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(t + 1);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Half the stores go to a hot block, half anywhere.
                    let page = if x & 1 == 0 {
                        (x >> 8) % 128
                    } else {
                        (x >> 8) % pages
                    };
                    seq += 1;
                    let _g = gate.read();
                    mem.guest_store(
                        &tracker,
                        ram.start() + page * geometry.granule + 8,
                        (t << 40) | seq,
                        u32::try_from(t).unwrap(),
                    );
                    stores.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut quiescent_checks = 0;
    for round in 0..300u64 {
        // Let the vCPUs make progress in every epoch (a few hundred stores), whatever the
        // scheduler does on a loaded machine.
        let target = stores.load(Ordering::Relaxed) + 300;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while stores.load(Ordering::Relaxed) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the vCPUs made no 300 stores within 60 s"
            );
            std::thread::yield_now();
        }
        tracker.tick(Duration::from_millis(round));
        if round % 10 == 9 {
            let _g = gate.write();
            checkpoint_into(&tracker, &image, &mem);
            let img = image.lock();
            for p in 0..pages {
                let gpa = ram.start() + p * geometry.granule;
                assert_eq!(
                    img[usize::try_from(p).unwrap()],
                    mem.value(gpa),
                    "{policy}: page {p} lost a write (round {round})"
                );
            }
            quiescent_checks += 1;
        } else {
            checkpoint_into(&tracker, &image, &mem);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    checkpoint_into(&tracker, &image, &mem);
    let img = image.lock();
    for p in 0..pages {
        assert_eq!(
            img[usize::try_from(p).unwrap()],
            mem.value(ram.start() + p * geometry.granule),
            "{policy}: page {p}"
        );
    }
    assert_eq!(quiescent_checks, 30);
    let c = tracker.counters();
    assert!(c.faults > 0 && c.checkpoints == 301, "{c:?}");
    if policy == Policy::Adaptive {
        assert!(
            c.step_ups > 0,
            "the stress must exercise mid-epoch escalation: {c:?}"
        );
    }
    if policy == Policy::Region {
        assert!(
            c.step_downs > 0,
            "the stress must exercise the region step-down: {c:?}"
        );
    }
}

#[test]
fn test_should_lose_no_write_across_live_checkpoints_fine() {
    live_checkpoint_stress(Policy::Fine);
}

#[test]
fn test_should_lose_no_write_across_live_checkpoints_coarse() {
    live_checkpoint_stress(Policy::Coarse);
}

#[test]
fn test_should_lose_no_write_while_the_region_policy_steps_down() {
    live_checkpoint_stress(Policy::Region);
}

#[test]
fn test_should_lose_no_write_while_adaptive_blocks_change_mode() {
    live_checkpoint_stress(Policy::Adaptive);
}

#[test]
fn test_should_lose_no_mark_while_blocks_are_promoted_concurrently() {
    // The original's race: a marker holding the old bitmap while a tick swaps in a new one. Here
    // eight threads fault while the main thread steps the region down (region policy) and
    // checkpoints; every unit any thread faulted on must come out of some diff.
    let geometry = PageGeometry::X86_64;
    let ram = GpaRange::new(0, 64 << 20).unwrap();
    let mem = Arc::new(AtomicPages::new(geometry, ram));
    for policy in [Policy::Region, Policy::Adaptive] {
        let config = TrackingConfig {
            cost: nested_cost(),
            window: Duration::from_millis(1),
            step_down_threshold: 1,
            ..TrackingConfig::new(policy)
        };
        let tracker = Arc::new(DirtyTracker::new(Arc::clone(&mem), &[ram], config).unwrap());
        tracker.start().unwrap();
        let start = Arc::new(Barrier::new(9));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (tracker, start) = (Arc::clone(&tracker), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    let mut written = Vec::new();
                    for i in 0..2_000u64 {
                        let unit = (i * 8 + t) * 7 % (ram.len() / geometry.tracking_hot);
                        let gpa = unit * geometry.tracking_hot;
                        tracker
                            .on_write_fault(GuestFault {
                                gpa,
                                write: true,
                                vcpu: 0,
                            })
                            .unwrap();
                        written.push(gpa);
                    }
                    written
                })
            })
            .collect();
        start.wait();
        let mut covered = std::collections::BTreeSet::new();
        let mut now = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while threads.iter().any(|h| !h.is_finished()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the marking threads did not finish within 60 s"
            );
            now += 1;
            tracker.tick(Duration::from_millis(now));
            tracker
                .checkpoint(None, |r| -> Result<(), std::io::Error> {
                    covered.extend(r.iter().copied());
                    Ok(())
                })
                .unwrap();
        }
        let written: Vec<u64> = threads.into_iter().flat_map(|h| h.join().unwrap()).collect();
        tracker
            .checkpoint(None, |r| -> Result<(), std::io::Error> {
                covered.extend(r.iter().copied());
                Ok(())
            })
            .unwrap();
        for gpa in written {
            assert!(
                covered.iter().any(|r| r.contains(gpa)),
                "{policy}: mark at {gpa:#x} was lost"
            );
        }
    }
}

#[test]
fn test_should_put_vmm_writes_made_through_vm_memory_in_the_next_diff() {
    let geometry = PageGeometry::X86_64;
    let ram = GpaRange::new(0x10_0000, 4 << 20).unwrap();
    let mem = Arc::new(AtomicPages::new(geometry, ram));
    let guest: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(ram.start()), usize::try_from(ram.len()).unwrap())])
            .unwrap();
    let tracker = DirtyTracker::new(Arc::clone(&mem), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    // Device emulation writes a descriptor spanning two pages; no fault is taken.
    guest
        .write_slice(&[0xAB; 64], GuestAddress(ram.start() + 0x3000 - 32))
        .unwrap();
    let mut diff = Vec::new();
    tracker
        .checkpoint(Some(&guest), |r| -> Result<(), std::io::Error> {
            diff.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
    assert_eq!(diff, vec![GpaRange::new(ram.start() + 0x2000, 0x2000).unwrap()]);
    assert_eq!(tracker.counters().faults, 0);
    // The vm-memory bitmap was consumed: the next diff is empty.
    let mut next = Vec::new();
    tracker
        .checkpoint(Some(&guest), |r| -> Result<(), std::io::Error> {
            next.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
    assert!(next.is_empty(), "{next:?}");
}

#[test]
fn test_should_keep_drained_units_for_the_next_diff_when_the_writer_fails() {
    let geometry = PageGeometry::APPLE_SILICON;
    let ram = GpaRange::new(0x8000_0000, 8 << 20).unwrap();
    let mem = Arc::new(AtomicPages::new(geometry, ram));
    for policy in Policy::ALL {
        let tracker = DirtyTracker::new(Arc::clone(&mem), &[ram], TrackingConfig::new(policy)).unwrap();
        tracker.start().unwrap();
        for p in [0u64, 1, 200, 511] {
            mem.guest_store(&tracker, ram.start() + p * geometry.granule, p + 1, 0);
        }
        let mut first = Vec::new();
        let err = tracker
            .checkpoint(None, |r| {
                first.extend_from_slice(r);
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device",
                ))
            })
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Writer(_)), "{err}");
        let chain = squib_snapshot::report::error_chain(&err);
        assert!(chain.contains("No space left"), "{chain}");
        let mut second = Vec::new();
        tracker
            .checkpoint(None, |r| -> Result<(), std::io::Error> {
                second.extend_from_slice(r);
                Ok(())
            })
            .unwrap();
        for r in &first {
            for gpa in (r.start()..r.end()).step_by(16 << 10) {
                assert!(
                    second.iter().any(|s| s.contains(gpa)),
                    "{policy}: {gpa:#x} dropped after a failed write"
                );
            }
        }
        assert_eq!(tracker.counters().failed_checkpoints, 1);
        // And the pages were re-protected: a new write faults again.
        assert_eq!(mem.guest_store(&tracker, ram.start(), 9, 0), 1, "{policy}");
    }
}

#[test]
fn test_should_keep_drained_units_when_the_reprotect_fails() {
    let geometry = PageGeometry::X86_64;
    let ram = GpaRange::new(0, 4 << 20).unwrap();
    let mem = Arc::new(AtomicPages::new(geometry, ram));
    let tracker = DirtyTracker::new(Arc::clone(&mem), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    mem.guest_store(&tracker, 0x5000, 1, 0);
    mem.fail_protect.store(true, Ordering::SeqCst);
    let mut called = false;
    let err = tracker
        .checkpoint(None, |_| -> Result<(), std::io::Error> {
            called = true;
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Backend(_)), "{err}");
    assert!(!called, "no diff may be written when re-protection failed");
    let mut next = Vec::new();
    tracker
        .checkpoint(None, |r| -> Result<(), std::io::Error> {
            next.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
    assert_eq!(next, vec![GpaRange::new(0x5000, 0x1000).unwrap()]);
}
