//! loom models of the lock-free protocols, run against the real `DirtyBitmap` and `DirtyTracker`
//! code (their atomics come from loom under `--cfg loom`):
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p squib-snapshot --release --test loom
//! ```
//!
//! Each model explores every interleaving (up to a preemption bound) of a vCPU taking a write
//! fault against a checkpoint running at the same time, and checks that a checkpoint taken after
//! both finish restores exactly the memory the vCPU left: no write lost.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicU64, Ordering};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{
    BackendError, CostModel, DirtyBitmap, DirtyTracker, GuestFault, Policy, Stage2Backend, TrackingConfig,
};

const WRITABLE: u64 = 1 << 63;
const UNIT: u64 = 4096;

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b
}

/// Two-level bitmap: a set racing a drain is reported by exactly one drain, never lost.
#[test]
fn test_should_never_lose_a_bit_between_the_summary_and_the_word() {
    builder().check(|| {
        let map = Arc::new(DirtyBitmap::new(128));
        let m = Arc::clone(&map);
        let setter = loom::thread::spawn(move || {
            let a = m.set(1);
            let b = m.set(2);
            let c = m.set(70);
            (a, b, c)
        });
        let mut seen = Vec::new();
        map.drain(|i| seen.push(i));
        let (a, b, c) = setter.join().unwrap();
        assert!(a && b && c);
        map.drain(|i| seen.push(i));
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 2, 70]);
    });
}

/// Guest memory as atomic page words (bit 63: writable; the rest: the value last stored), so a
/// store is an atomic permission check and write, as the MMU makes it.
struct Pages {
    pages: [AtomicU64; 4],
}

impl Pages {
    fn new() -> Self {
        Self {
            pages: [
                AtomicU64::new(WRITABLE),
                AtomicU64::new(WRITABLE),
                AtomicU64::new(WRITABLE),
                AtomicU64::new(WRITABLE),
            ],
        }
    }
    fn page(&self, gpa: u64) -> &AtomicU64 {
        &self.pages[usize::try_from(gpa / UNIT).unwrap()]
    }
    fn set(&self, range: GpaRange, writable: bool) {
        for gpa in (range.start()..range.end()).step_by(4096) {
            if writable {
                self.page(gpa).fetch_or(WRITABLE, Ordering::AcqRel);
            } else {
                self.page(gpa).fetch_and(!WRITABLE, Ordering::AcqRel);
            }
        }
    }
    fn store<B: Stage2Backend>(&self, t: &DirtyTracker<B>, gpa: u64, value: u64) {
        let page = self.page(gpa);
        loop {
            let cur = page.load(Ordering::Acquire);
            if cur & WRITABLE == 0 {
                t.on_write_fault(GuestFault {
                    gpa,
                    write: true,
                    vcpu: 0,
                })
                .unwrap();
                continue;
            }
            if page
                .compare_exchange(cur, WRITABLE | value, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }
    fn value(&self, i: usize) -> u64 {
        self.pages[i].load(Ordering::Acquire) & !WRITABLE
    }
}

struct Backend(Arc<Pages>);

impl Stage2Backend for Backend {
    fn geometry(&self) -> PageGeometry {
        // A 16 KiB "block" of four 4 KiB units keeps the model small.
        PageGeometry {
            host_page: UNIT,
            granule: UNIT,
            tracking_hot: UNIT,
            tracking_default: 4 * UNIT,
        }
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.0.set(range, false);
        Ok(())
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.0.set(range, true);
        Ok(())
    }
}

fn checkpoint_into(t: &DirtyTracker<Backend>, pages: &Pages, image: &mut [u64; 4]) {
    t.checkpoint(None, |ranges| -> Result<(), std::io::Error> {
        for r in ranges {
            for gpa in (r.start()..r.end()).step_by(4096) {
                let i = usize::try_from(gpa / UNIT).unwrap();
                image[i] = pages.value(i);
            }
        }
        Ok(())
    })
    .unwrap();
}

/// One vCPU stores while one live checkpoint runs; a final quiescent checkpoint must leave the
/// image equal to memory. Fails if the fault path marks before it grants, or if the checkpoint
/// re-protects before it drains.
fn model(policy: Policy, stores: &'static [(u64, u64)]) {
    builder().check(move || {
        let pages = Arc::new(Pages::new());
        // Expensive faults make the adaptive policy escalate at its minimum (2 faults).
        let config = TrackingConfig {
            cost: CostModel {
                fault_us: 1.0e6,
                protect_us: 0.0,
                write_bytes_per_us: 1.0e6,
            },
            ..TrackingConfig::new(policy)
        };
        let ram = GpaRange::new(0, 4 * UNIT).unwrap();
        let t = Arc::new(DirtyTracker::new(Backend(Arc::clone(&pages)), &[ram], config).unwrap());
        t.start().unwrap();
        let (tv, pv) = (Arc::clone(&t), Arc::clone(&pages));
        let vcpu = loom::thread::spawn(move || {
            for &(gpa, v) in stores {
                pv.store(&tv, gpa, v);
            }
        });
        let mut image = [0u64; 4];
        checkpoint_into(&t, &pages, &mut image);
        vcpu.join().unwrap();
        checkpoint_into(&t, &pages, &mut image);
        for i in 0..4 {
            assert_eq!(image[i], pages.value(i), "{policy}: unit {i} lost a write");
        }
    });
}

#[test]
fn test_should_lose_no_write_when_a_fault_races_a_live_checkpoint_fine() {
    model(Policy::Fine, &[(0, 1)]);
}

#[test]
fn test_should_lose_no_write_when_a_fault_races_a_live_checkpoint_coarse() {
    model(Policy::Coarse, &[(UNIT, 1)]);
}

#[test]
fn test_should_lose_no_write_when_an_escalation_races_a_live_checkpoint() {
    // The second fault escalates the block to coarse (grant the block, mark the coarse bit) while
    // the checkpoint drains both maps and decides the block's next mode.
    model(Policy::Adaptive, &[(0, 1), (2 * UNIT, 2)]);
}
