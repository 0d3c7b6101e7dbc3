//! Sweeps around the bars: diff save at 0.1%, 1%, 10% and 50% dirty of 1 GiB, with the dirty
//! 16 KiB units clustered (runs of 2 MiB blocks) or scattered, each beside a bare `pwrite` of the
//! same bytes at the same offsets in the same group (`save_sweep/diff_<pct>_<shape>` vs
//! `save_sweep/raw_pwrite_<pct>_<shape>`); and eager and lazy restore of a sparse full snapshot
//! of 256 MiB, 1 GiB and 4 GiB (`restore_sweep/{eager,lazy}_<size>`).
//!
//! Before the timed runs it prints, per diff shape, the hardware-independent figures: bytes
//! written against dirty bytes, and write calls per diff (counted through the `SnapshotIo` hook).
//! Under `cargo test --benches` (one pass, no `--bench`) sizes shrink to 64 MiB; ids stay.
#![allow(missing_docs)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use squib_arch::{GpaRange, PageGeometry};
use squib_benches::{bench_dir, raw_pwrite, scattered};
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::save::{save_diff, save_full};
use squib_snapshot::snapshot::{
    DirectIo, ParentLink, Placement, RestoreMode, SnapshotId, SnapshotIo, SnapshotMeta,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const UNIT: u64 = 16 << 10;
const BLOCK: u64 = 2 << 20;

fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn guest(size: u64, fill_every: u64) -> GuestMemoryMmap<AtomicBitmap> {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(
        GuestAddress(0),
        usize::try_from(size).expect("fits"),
    )])
    .expect("guest memory");
    let page: Vec<u8> = (0..UNIT)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
        .collect();
    let mut at = 0;
    while at < size {
        mem.write_slice(&page, GuestAddress(at)).expect("fill");
        at += UNIT * fill_every;
    }
    mem
}

/// `permille`/1000 of the guest's units: scattered uniformly, or clustered as whole 2 MiB blocks.
fn dirty(size: u64, permille: u64, clustered: bool) -> Vec<GpaRange> {
    let units = size / UNIT;
    let n = (units * permille / 1000).max(1);
    if clustered {
        let per_block = BLOCK / UNIT;
        let blocks = n.div_ceil(per_block);
        scattered(blocks, size / BLOCK)
            .into_iter()
            .map(|b| GpaRange::new(b * BLOCK, BLOCK).expect("range"))
            .collect()
    } else {
        scattered(n, units)
            .into_iter()
            .map(|u| GpaRange::new(u * UNIT, UNIT).expect("range"))
            .collect()
    }
}

/// Counts the save's write calls and bytes.
#[derive(Debug, Default)]
struct CountingIo {
    calls: AtomicU64,
    bytes: AtomicU64,
}

impl SnapshotIo for CountingIo {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        file.write_all_at(buf, offset)
    }
}

#[allow(clippy::cast_precision_loss)] // display only
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

const SHAPES: [(u64, &str); 4] = [(1, "0.1pct"), (10, "1pct"), (100, "10pct"), (500, "50pct")];

fn save_sweep(c: &mut Criterion) {
    let size = if full_size() { 1 << 30 } else { 64 << 20 };
    let mem = guest(size, 1);
    let meta = SnapshotMeta::new("soft", PageGeometry::APPLE_SILICON);
    let dir = bench_dir();
    let parent = ParentLink {
        id: SnapshotId(1),
        state: dir.path().join("base").join("state"),
    };
    let mut n = 0u64;
    let mut fresh = |what: &str| {
        n += 1;
        dir.path().join(format!("{what}-{n}"))
    };
    let mut g = c.benchmark_group("save_sweep");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2));
    for (permille, pct) in SHAPES {
        for clustered in [true, false] {
            let shape = if clustered { "clustered" } else { "scattered" };
            let ranges = dirty(size, permille, clustered);
            let dirty_bytes: u64 = ranges.iter().map(GpaRange::len).sum();
            let io = CountingIo::default();
            let probe = fresh("probe");
            save_diff(Placement::Dir(&probe), &parent, &mem, &ranges, &meta, &io).expect("diff");
            std::fs::remove_dir_all(&probe).expect("cleanup");
            println!(
                "figures diff_{pct}_{shape}: dirty {dirty_bytes} B in {} ranges; wrote {} B ({:.4}x dirty) in {} write calls",
                ranges.len(),
                io.bytes.load(Ordering::Relaxed),
                ratio(io.bytes.load(Ordering::Relaxed), dirty_bytes),
                io.calls.load(Ordering::Relaxed),
            );
            g.bench_function(format!("diff_{pct}_{shape}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dest = fresh("diff");
                        let t = Instant::now();
                        save_diff(Placement::Dir(&dest), &parent, &mem, &ranges, &meta, &DirectIo)
                            .expect("diff");
                        total += t.elapsed();
                        std::fs::remove_dir_all(&dest).expect("cleanup");
                    }
                    total
                });
            });
            g.bench_function(format!("raw_pwrite_{pct}_{shape}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dest = fresh("raw");
                        let t = Instant::now();
                        raw_pwrite(&dest, &mem, &ranges, size);
                        total += t.elapsed();
                        std::fs::remove_file(&dest).expect("cleanup");
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

fn restore_sweep(c: &mut Criterion) {
    let sizes: &[(u64, &str)] = if full_size() {
        &[(256 << 20, "256MiB"), (1 << 30, "1GiB"), (4 << 30, "4GiB")]
    } else {
        &[(64 << 20, "256MiB")]
    };
    let dir = bench_dir();
    let mut g = c.benchmark_group("restore_sweep");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(3));
    for &(size, name) in sizes {
        let snap = dir.path().join(format!("full-{name}"));
        {
            // Sparse: one 16 KiB unit in 64 holds data; the rest are holes in the memory file.
            let mem = guest(size, 64);
            save_full(
                Placement::Dir(&snap),
                &mem,
                &SnapshotMeta::new("soft", PageGeometry::APPLE_SILICON),
                &DirectIo,
            )
            .expect("full");
        }
        g.bench_function(format!("eager_{name}"), |b| {
            b.iter(|| restore(&snap, RestoreMode::Eager).expect("eager"));
        });
        g.bench_function(format!("lazy_{name}"), |b| {
            b.iter(|| restore(&snap, RestoreMode::Lazy).expect("lazy"));
        });
        std::fs::remove_dir_all(&snap).expect("cleanup");
    }
    g.finish();
}

criterion_group!(benches, save_sweep, restore_sweep);
criterion_main!(benches);
