//! Benches of snapshot files against bare-I/O baselines from the same run:
//! `save/diff_1GiB_1pct` vs `save/raw_pwrite_1GiB_1pct` (bar: ≤ 1.5×), `save/full_1GiB` vs
//! `save/raw_write_1GiB` (bar: ≤ 1.2×), `restore/eager_1GiB`, `restore/lazy_1GiB` (bar: ≤ 5 ms).
//!
//! Both sides of each comparison end with an fsync of what they wrote: durability is part of a
//! snapshot's contract, so the baseline pays for it too. Files go to `SQUIB_BENCH_DIR` (default:
//! the system temp dir); point it at a tmpfs to measure CPU overhead without the disk.
//! Under `cargo test --benches` (one pass per bench, no `--bench` flag) the guest is 64 MiB so
//! CI stays fast; ids stay the same.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use squib_arch::{GpaRange, PageGeometry};
use squib_benches::{bench_dir, raw_pwrite, scattered};
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::save::{save_diff, save_full};
use squib_snapshot::snapshot::{DirectIo, ParentLink, Placement, RestoreMode, SnapshotMeta};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, WriteVolatile};

fn guest_bytes() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1 << 30
    } else {
        64 << 20
    }
}

/// Guest memory with every page non-zero (no holes to skip: the honest case for a full save).
fn guest(size: u64) -> GuestMemoryMmap<AtomicBitmap> {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(
        GuestAddress(0),
        usize::try_from(size).expect("fits"),
    )])
    .expect("guest memory");
    let chunk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1] | 1)
        .collect();
    let mut at = 0;
    while at < size {
        mem.write_slice(&chunk, GuestAddress(at)).expect("fill");
        at += chunk.len() as u64;
    }
    mem
}

/// 1% of the guest's 16 KiB units, scattered.
fn dirty_ranges(size: u64) -> Vec<GpaRange> {
    let unit = 16 << 10;
    scattered(size / unit / 100, size / unit)
        .into_iter()
        .map(|u| GpaRange::new(u * unit, unit).expect("range"))
        .collect()
}

fn save(c: &mut Criterion) {
    let size = guest_bytes();
    let mem = guest(size);
    let meta = SnapshotMeta::new("soft", PageGeometry::APPLE_SILICON);
    let ranges = dirty_ranges(size);
    let dir = bench_dir();
    let mut g = c.benchmark_group("save");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2));
    let mut n = 0u64;
    let mut fresh = |what: &str| {
        n += 1;
        dir.path().join(format!("{what}-{n}"))
    };
    let parent = ParentLink {
        id: squib_snapshot::snapshot::SnapshotId(1),
        state: dir.path().join("base").join("state"),
    };

    g.bench_function("diff_1GiB_1pct", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dest = fresh("diff");
                let t = Instant::now();
                save_diff(Placement::Dir(&dest), &parent, &mem, &ranges, &meta, &DirectIo).expect("diff");
                total += t.elapsed();
                std::fs::remove_dir_all(&dest).expect("cleanup");
            }
            total
        });
    });
    g.bench_function("raw_pwrite_1GiB_1pct", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dest = fresh("raw-pwrite");
                let t = Instant::now();
                raw_pwrite(&dest, &mem, &ranges, size);
                total += t.elapsed();
                std::fs::remove_file(&dest).expect("cleanup");
            }
            total
        });
    });
    g.bench_function("full_1GiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dest = fresh("full");
                let t = Instant::now();
                save_full(Placement::Dir(&dest), &mem, &meta, &DirectIo).expect("full");
                total += t.elapsed();
                std::fs::remove_dir_all(&dest).expect("cleanup");
            }
            total
        });
    });
    g.bench_function("raw_write_1GiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dest = fresh("raw-write");
                let t = Instant::now();
                let mut f = std::fs::File::create(&dest).expect("create");
                let s = mem
                    .get_slice(GuestAddress(0), usize::try_from(size).expect("fits"))
                    .expect("slice");
                f.write_all_volatile(&s).expect("write");
                f.sync_all().expect("fsync");
                total += t.elapsed();
                std::fs::remove_file(&dest).expect("cleanup");
            }
            total
        });
    });
    g.finish();
}

fn restore_benches(c: &mut Criterion) {
    let size = guest_bytes();
    let dir = bench_dir();
    let snap = dir.path().join("full");
    {
        let mem = guest(size);
        save_full(
            Placement::Dir(&snap),
            &mem,
            &SnapshotMeta::new("soft", PageGeometry::APPLE_SILICON),
            &DirectIo,
        )
        .expect("full");
    }
    let mut g = c.benchmark_group("restore");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("eager_1GiB", |b| {
        b.iter(|| restore(&snap, RestoreMode::Eager).expect("eager"));
    });
    g.bench_function("lazy_1GiB", |b| {
        b.iter(|| restore(&snap, RestoreMode::Lazy).expect("lazy"));
    });
    g.finish();
}

criterion_group!(benches, save, restore_benches);
criterion_main!(benches);
