//! Benches of the tracking core: `bitmap/set`, `bitmap/drain_1GiB_16K`, `fault/handle`.
#![allow(missing_docs)]

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use squib_arch::{GpaRange, PageGeometry};
use squib_benches::{NopBackend, scattered};
use squib_snapshot::{DirtyBitmap, DirtyTracker, GuestFault, Policy, TrackingConfig};

const GIB: u64 = 1 << 30;

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    let units = GIB / (16 << 10);
    let map = DirtyBitmap::new(units);
    let idx = scattered(4096, units);
    let mut i = 0usize;
    g.bench_function("set", |b| {
        b.iter(|| {
            // A clean bit each time: clear the word first outside the measured path is not
            // possible per-iteration, so cycle through 4096 bits and drain when they run out.
            let bit = idx[i];
            i += 1;
            if i == idx.len() {
                i = 0;
                map.drain(|_| {});
            }
            map.set(std::hint::black_box(bit))
        });
    });
    let dirty = scattered(units / 100, units);
    g.bench_function("drain_1GiB_16K", |b| {
        b.iter_batched(
            || {
                for &d in &dirty {
                    map.set(d);
                }
            },
            |()| {
                let mut n = 0u64;
                map.drain(|_| n += 1);
                n
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn fault(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault");
    let geometry = PageGeometry::APPLE_SILICON;
    let ram = GpaRange::new(0x8000_0000, GIB).unwrap();
    let t = DirtyTracker::new(NopBackend(geometry), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
    t.start().unwrap();
    let units = GIB / geometry.tracking_hot;
    let idx = scattered(4096, units);
    let mut i = 0usize;
    g.bench_function("handle", |b| {
        b.iter(|| {
            let gpa = ram.start() + idx[i] * geometry.tracking_hot;
            i = (i + 1) % idx.len();
            t.on_write_fault(GuestFault {
                gpa,
                write: true,
                vcpu: 0,
            })
            .unwrap()
        });
    });
    g.finish();
}

criterion_group!(benches, bitmap, fault);
criterion_main!(benches);
