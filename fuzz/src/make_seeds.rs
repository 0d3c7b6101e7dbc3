//! Write seed corpora: for the snapshot targets from real snapshots (a full, two diffs), for
//! `http_request` from the requests squib's API clients send (curl, the tests) and the framing
//! defects the reader refuses.
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
    let mut dirs = vec![w.save(&mem, &[], &meta).expect("full").dir];
    mem.write_slice(&[0xA5; 0x10], GuestAddress(0x3000)).expect("write");
    dirs.push(w.save(&mem, &[GpaRange::new(0x3000, 0x1000).unwrap()], &meta).expect("diff").dir);
    mem.write_slice(&[0x11; 0x10], GuestAddress(0x10_1000)).expect("write");
    dirs.push(w.save(&mem, &[GpaRange::new(0x10_1000, 0x1000).unwrap()], &meta).expect("diff").dir);

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
    std::fs::create_dir_all(out.join("http_request")).expect("corpus");
    for (i, request) in HTTP_SEEDS.iter().enumerate() {
        // The first byte picks the reader's buffer size (see the target).
        let mut seed = vec![u8::try_from(i * 7 % 64).expect("small")];
        seed.extend_from_slice(request);
        std::fs::write(out.join("http_request").join(format!("seed-{i}")), seed).expect("seed");
    }
    println!("seeds written to {}", out.display());
}

/// Requests as squib's API clients send them, and one of each framing defect.
const HTTP_SEEDS: [&[u8]; 10] = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 65\r\n\r\n{\"vcpu_count\": 2, \"mem_size_mib\": 512, \"track_dirty_pages\": true}",
    b"PUT /snapshot/create HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 57\r\n\r\n{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"/s/d1/state\"}",
    b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}GET /machine-config?x=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET http://localhost/ HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"PUT /vm HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}",
    b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 2\r\n\r\n{}",
    b"PUT /vm HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
    b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"GET /vm\r\n\r\n",
    b"PUT /vm HTTP/1.1\nContent-Length: 2\nX-Folded: a\n b\n\n{}",
];
