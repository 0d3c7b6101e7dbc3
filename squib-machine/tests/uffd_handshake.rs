//! `squib_machine::uffd` without a VM: the handshake reaches a handler as Firecracker's does,
//! and a thread of this process that touches guest memory reads exactly the bytes the handler
//! copied in from the memory file.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;

use squib_machine::uffd::{GuestRegionUffdMapping, HANDSHAKE_TIMEOUT, UffdMemory};
use squib_snapshot::snapshot::RegionLayout;
use userfaultfd::{Event, Uffd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[test]
fn test_should_hand_guest_memory_to_a_handler_that_serves_it_from_the_memory_file() {
    // The userfaultfd is as available here as on any host that runs the KVM tests.
    if !squib_kvm::kvm_or_skip("uffd_handshake") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // A "memory file" of two regions, back to back, each page stamped with its file offset.
    let layout = [
        RegionLayout {
            gpa: 0,
            len: 1 << 20,
            file_offset: 0,
        },
        RegionLayout {
            gpa: 4 << 20,
            len: 2 << 20,
            file_offset: 1 << 20,
        },
    ];
    let mem_path = dir.path().join("memory");
    let file = std::fs::File::create(&mem_path).expect("memory file");
    file.set_len(3 << 20).expect("size");
    for off in (0..3u64 << 20).step_by(4096) {
        file.write_all_at(&(off ^ 0x5a5a_0000).to_le_bytes(), off)
            .expect("stamp");
    }
    let socket = dir.path().join("h.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let handler = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1024];
        let (n, fd) = stream.recv_with_fd(&mut buf).expect("recv");
        let mappings: Vec<GuestRegionUffdMapping> = serde_json::from_slice(&buf[..n]).expect("json");
        // SAFETY: the descriptor that came with the handshake is the userfaultfd.
        let uffd = unsafe { Uffd::from_raw_fd(fd.expect("an fd").into_raw_fd()) };
        let mem = std::fs::File::open(&mem_path).expect("open memory file");
        let mut page = vec![0u8; 4096];
        let mut served = 0;
        while served < 3 {
            let mut p = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&raw mut p, 1, 60_000) };
            assert!(ready > 0, "no fault within 60 s");
            let Some(Event::Pagefault { addr, .. }) = uffd.read_event().expect("read event") else {
                continue;
            };
            let a = addr as u64 & !4095;
            let m = mappings
                .iter()
                .find(|m| (m.base_host_virt_addr..m.base_host_virt_addr + m.size).contains(&a))
                .expect("fault inside a mapping");
            mem.read_exact_at(&mut page, m.offset + (a - m.base_host_virt_addr))
                .expect("read page");
            // SAFETY: `page` is one page; `a` is the faulting page of a registered range.
            unsafe { uffd.copy(page.as_ptr().cast(), a as *mut libc::c_void, 4096, true) }.expect("copy");
            served += 1;
        }
        (mappings, stream)
    });
    let memory = UffdMemory::new(&layout).expect("uffd memory");
    let expected: Vec<GuestRegionUffdMapping> = memory.mappings().to_vec();
    let served = memory.handshake(&socket, HANDSHAKE_TIMEOUT).expect("handshake");
    // Three first touches, from a thread of this process: each blocks until the handler serves.
    let reads = std::thread::spawn(move || {
        let mut got = Vec::new();
        for gpa in [0x3000u64, 4 << 20, (6 << 20) - 4096] {
            got.push(served.memory.read_obj::<u64>(GuestAddress(gpa)).expect("read"));
        }
        (got, served)
    });
    let (mappings, _stream) = handler.join().expect("handler");
    let (got, _served) = reads.join().expect("reader");
    // File offsets: region 0 at 0, region 1 at 1 MiB.
    assert_eq!(
        got,
        vec![
            0x3000 ^ 0x5a5a_0000,
            (1 << 20) ^ 0x5a5a_0000,
            ((3 << 20) - 4096) ^ 0x5a5a_0000
        ]
    );
    assert_eq!(mappings, expected);
    assert_eq!(mappings[1].offset, 1 << 20);
    assert_eq!(mappings[1].size, 2 << 20);
    assert!(
        mappings
            .iter()
            .all(|m| m.page_size == 4096 && m.page_size_kib == 4096)
    );
}

#[test]
fn test_should_name_the_socket_when_nothing_listens_there() {
    if !squib_kvm::kvm_or_skip("uffd_handshake") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = [RegionLayout {
        gpa: 0,
        len: 1 << 20,
        file_offset: 0,
    }];
    let memory = UffdMemory::new(&layout).expect("uffd memory");
    let e = memory
        .handshake(&dir.path().join("none.sock"), HANDSHAKE_TIMEOUT)
        .expect_err("nothing listens");
    let text = squib_snapshot::report::error_chain(&e);
    assert!(
        text.contains("none.sock") && text.contains("cannot connect"),
        "{text}"
    );
}
