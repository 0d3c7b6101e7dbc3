//! Fixtures for the snapshot-file tests: guest memory with known contents, a chain built from
//! it, a failing writer, and helpers that rewrite a state file with a valid CRC.

#![allow(dead_code, missing_docs)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::{ChainWriter, STATE_FILE, SnapshotIo, SnapshotMeta, SnapshotState};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Two regions with a gap: 4 MiB at 0, 2 MiB at 1 GiB.
pub fn regions() -> Vec<GpaRange> {
    vec![
        GpaRange::new(0, 4 << 20).unwrap(),
        GpaRange::new(1 << 30, 2 << 20).unwrap(),
    ]
}

pub fn memory(regions: &[GpaRange]) -> GuestMemoryMmap<AtomicBitmap> {
    let ranges: Vec<_> = regions
        .iter()
        .map(|r| (GuestAddress(r.start()), usize::try_from(r.len()).unwrap()))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

pub fn meta() -> SnapshotMeta {
    let mut m = SnapshotMeta::new("soft", PageGeometry::X86_64);
    m.vcpus = vec![vec![1, 2, 3, 4], vec![5, 6]];
    m.devices = vec![squib_snapshot::snapshot::Section {
        name: "uart0".into(),
        data: b"state".to_vec(),
    }];
    m
}

/// Fill `[gpa, gpa+len)` with a pattern derived from `seed`.
pub fn fill(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64, len: usize, seed: u8) {
    let bytes: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(u8::try_from(i % 251).unwrap()) | 1)
        .collect();
    mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
}

/// Fill every region with a non-zero pattern.
pub fn fill_all(mem: &GuestMemoryMmap<AtomicBitmap>, seed: u8) {
    let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    for (gpa, len) in regions {
        fill(mem, gpa, usize::try_from(len).unwrap(), seed);
    }
}

/// All of guest memory, regions in address order.
pub fn contents(mem: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u8> {
    let mut regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let mut out = Vec::new();
    for (gpa, len) in regions {
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// A chain of a full snapshot and two diffs in `dir`; returns the member dirs and the live
/// memory at the last checkpoint.
pub fn build_chain(dir: &Path) -> (Vec<PathBuf>, Vec<u8>) {
    let mem = memory(&regions());
    fill(&mem, 0x10_0000, 0x4_0000, 1);
    fill(&mem, (1 << 30) + 0x2000, 0x3000, 2);
    let meta = meta();
    let mut chain = ChainWriter::create(dir).unwrap();
    let full = chain.save(&mem, &[], &meta).unwrap();
    fill(&mem, 0x20_0000, 0x2000, 3);
    let d1 = chain
        .save(&mem, &[GpaRange::new(0x20_0000, 0x2000).unwrap()], &meta)
        .unwrap();
    fill(&mem, 0x1000, 0x1000, 4);
    fill(&mem, (1 << 30) + 0x10_0000, 0x4000, 5);
    let d2 = chain
        .save(
            &mem,
            &[
                GpaRange::new(0x1000, 0x1000).unwrap(),
                GpaRange::new((1 << 30) + 0x10_0000, 0x4000).unwrap(),
            ],
            &meta,
        )
        .unwrap();
    (vec![full.path, d1.path, d2.path], contents(&mem))
}

pub fn read_state(dir: &Path) -> SnapshotState {
    SnapshotState::decode(&std::fs::read(dir.join(STATE_FILE)).unwrap()).unwrap()
}

/// Rewrite a snapshot's state with `f`, with a correct CRC (a hostile but well-formed file).
pub fn rewrite_state(dir: &Path, f: impl FnOnce(&mut SnapshotState)) {
    let mut s = read_state(dir);
    f(&mut s);
    std::fs::write(dir.join(STATE_FILE), s.encode_unchecked().unwrap()).unwrap();
}

/// Copy a directory tree (snapshots are flat: dirs of files).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Every path under `dir`, sorted, with file sizes.
pub fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
                out.push((e.path(), 0));
            } else {
                out.push((e.path(), md.len()));
            }
        }
    }
    out.sort();
    out
}

/// A writer that fails with `errno` once `budget` bytes have been written.
#[derive(Debug, Clone)]
pub struct FailingIo {
    pub budget: Arc<AtomicI64>,
    pub errno: i32,
}

impl FailingIo {
    pub fn new(budget: i64, errno: i32) -> Self {
        Self {
            budget: Arc::new(AtomicI64::new(budget)),
            errno,
        }
    }
}

impl SnapshotIo for FailingIo {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let len = i64::try_from(buf.len()).unwrap();
        if self.budget.fetch_sub(len, Ordering::SeqCst) < len {
            return Err(std::io::Error::from_raw_os_error(self.errno));
        }
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
}
