//! Write seed corpora: for the snapshot targets from real snapshots (a full, two diffs), for
//! `machine_state` from the sections of a machine state with one and two vCPUs, for
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
    std::fs::create_dir_all(out.join("machine_state")).expect("corpus");
    for n in 1..=2 {
        let (vcpus, devices) = machine_state(n).into_sections();
        let mut parts = vcpus;
        parts.extend(devices.into_iter().map(|s| s.data));
        std::fs::write(
            out.join("machine_state").join(format!("seed-{n}")),
            squib_fuzz::join_parts(&parts),
        )
        .expect("seed");
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

/// A machine state with `n` vCPUs, registers and MSRs set as a booted kernel's would be.
fn machine_state(n: u32) -> squib_machine::MachineState {
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, kvm_regs};
    use squib_machine::state::{MachineState, STATE_VERSION, VcpuState};
    let vcpu = |i: u32| VcpuState {
        cpuid: vec![kvm_cpuid_entry2 { function: 1, eax: i, ..Default::default() }; 2],
        mp_state: Default::default(),
        regs: kvm_regs { rip: 0x10_0000, rsp: 0x8000, ..Default::default() },
        sregs: Default::default(),
        xsave: vec![0; 1024],
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_msr_entry { index: 0x10, data: 1 << 40, ..Default::default() }; 3],
        events: Default::default(),
        tsc_khz: Some(2_596_138),
    };
    MachineState {
        version: STATE_VERSION,
        mem_size: 64 << 20,
        vcpus: (0..n).map(vcpu).collect(),
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
        serial: squib_machine::serial::SerialSnapshot {
            baud_divisor_low: 1,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: Vec::new(),
        },
    }
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
