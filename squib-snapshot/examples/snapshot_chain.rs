//! Write a snapshot chain of a synthetic guest, for trying `squib snapshot ...` by hand and for
//! the save/restore figures in specs/17-snapshot-files.md:
//!
//! ```text
//! cargo run --release -p squib-snapshot --example snapshot_chain -- DIR [MiB] [DIFFS] [DIRTY_PERCENT]
//! ```
//!
//! Fills every page of a `MiB`-sized guest (default 1024) with non-zero bytes, saves a full
//! snapshot, then `DIFFS` (default 2) diffs, each after rewriting `DIRTY_PERCENT` (default 1) of
//! the 16 KiB units at pseudo-random places. Prints the time of each save.

use std::time::Instant;

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::{ChainWriter, SnapshotMeta};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .ok_or("usage: snapshot_chain DIR [MiB] [DIFFS] [DIRTY_PERCENT]")?;
    let mib: u64 = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let diffs: u32 = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let pct: u64 = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let size = mib << 20;
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), usize::try_from(size)?)])?;
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1] | 1)
        .collect();
    for at in (0..size).step_by(chunk.len()) {
        mem.write_slice(&chunk, GuestAddress(at))?;
    }
    let meta = SnapshotMeta::new("soft", PageGeometry::APPLE_SILICON);
    let mut chain = ChainWriter::create(std::path::Path::new(dir))?;
    let t = Instant::now();
    let full = chain.save(&mem, &[], &meta)?;
    println!(
        "{}: full, {} bytes, {:.1?}",
        full.path.display(),
        full.written_bytes,
        t.elapsed()
    );
    let unit = 16 << 10;
    let units = size / unit;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for d in 0..diffs {
        let mut ranges = Vec::new();
        for _ in 0..(units * pct / 100).max(1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = x % units;
            mem.write_slice(&[u8::try_from(d % 250)? + 1; 64], GuestAddress(u * unit))?;
            ranges.push(GpaRange::new(u * unit, unit)?);
        }
        let t = Instant::now();
        let saved = chain.save(&mem, &ranges, &meta)?;
        println!(
            "{}: diff, {} extents, {} bytes, {:.1?}",
            saved.path.display(),
            saved.extents,
            saved.written_bytes,
            t.elapsed()
        );
    }
    Ok(())
}
