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
    // A set of a clean bit, cache-hot, as the fault path does it: consecutive bits, so one in 64
    // also flags its word in the summary level. The map is drained outside the timed region.
    let big = DirtyBitmap::new(1 << 20);
    g.bench_function("set", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(big.len());
                let t0 = std::time::Instant::now();
                for bit in 0..n {
                    big.set(std::hint::black_box(bit));
                }
                total += t0.elapsed();
                big.drain(|_| {});
                left -= n;
            }
            total
        });
    });
    // The physical floor of `set`: one bare atomic fetch_or per bit on the same words.
    let raw: Vec<std::sync::atomic::AtomicU64> = (0..(1 << 14))
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    g.bench_function("raw_fetch_or", |b| {
        b.iter_custom(|iters| {
            let t0 = std::time::Instant::now();
            for i in 0..iters {
                let bit = std::hint::black_box(i) & ((1 << 20) - 1);
                raw[usize::try_from(bit >> 6).unwrap()]
                    .fetch_or(1 << (bit & 63), std::sync::atomic::Ordering::AcqRel);
            }
            let t = t0.elapsed();
            for w in &raw {
                w.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            t
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
            BatchSize::PerIteration,
        );
    });
    // The physical floor of that drain: one bare atomic swap of each word holding a dirty bit.
    let words: Vec<std::sync::atomic::AtomicU64> = (0..units / 64)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let mut dirty_words: Vec<usize> = dirty.iter().map(|&d| usize::try_from(d / 64).unwrap()).collect();
    dirty_words.dedup();
    g.bench_function("raw_swap_1GiB_16K", |b| {
        b.iter_batched(
            || {
                for &w in &dirty_words {
                    words[w].store(1, std::sync::atomic::Ordering::Relaxed);
                }
            },
            |()| {
                let mut n = 0u64;
                for &w in &dirty_words {
                    n += words[w].swap(0, std::sync::atomic::Ordering::AcqRel);
                }
                n
            },
            BatchSize::PerIteration,
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
