//! Write seed corpora for both targets from real snapshots (a full, two diffs).
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::{ChainWriter, MEMORY_FILE, STATE_FILE, SnapshotMeta};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10_0000), 0x4000),
    ])
    .expect("memory");
    mem.write_slice(&[0x5A; 0x1800], GuestAddress(0x800)).expect("write");
    let mut meta = SnapshotMeta::new("soft", PageGeometry::X86_64);
    meta.vcpus = vec![vec![1, 2, 3]];
    let mut w = ChainWriter::create(tmp.path()).expect("chain");
    let mut dirs = vec![w.save(&mem, &[], &meta).expect("full").path];
    mem.write_slice(&[0xA5; 0x10], GuestAddress(0x3000)).expect("write");
    dirs.push(w.save(&mem, &[GpaRange::new(0x3000, 0x1000).unwrap()], &meta).expect("diff").path);
    mem.write_slice(&[0x11; 0x10], GuestAddress(0x10_1000)).expect("write");
    dirs.push(w.save(&mem, &[GpaRange::new(0x10_1000, 0x1000).unwrap()], &meta).expect("diff").path);

    let mut members = Vec::new();
    for d in &dirs {
        let state = std::fs::read(d.join(STATE_FILE)).expect("state");
        let memory = std::fs::read(d.join(MEMORY_FILE)).expect("memory");
        let len = u32::try_from(memory.len()).expect("small");
        let last = memory.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        members.push((state, len, memory[..last].to_vec()));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    std::fs::create_dir_all(out.join("state_file")).expect("corpus");
    std::fs::create_dir_all(out.join("chain_load")).expect("corpus");
    for (i, m) in members.iter().enumerate() {
        std::fs::write(out.join("state_file").join(format!("seed-{i}")), &m.0).expect("seed");
        let chain = squib_fuzz::encode(&members[..=i]);
        std::fs::write(out.join("chain_load").join(format!("seed-{i}")), chain).expect("seed");
    }
    println!("seeds written to {}", out.display());
}
