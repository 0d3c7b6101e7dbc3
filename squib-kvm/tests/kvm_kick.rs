//! The signal kick sets `immediate_exit`: a kick that lands before the thread enters `KVM_RUN`
//! still takes it out at once, so one kick per pause is enough and none is lost.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod kvm_support;

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use kvm_support::kvm_or_skip;
use parking_lot::Mutex;
use squib_kvm::pause::Kick;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

#[test]
fn test_should_leave_kvm_run_at_once_for_a_kick_that_landed_before_it() {
    if !kvm_or_skip("test_should_leave_kvm_run_at_once_for_a_kick_that_landed_before_it") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    // Real mode at 0: `jmp $`, a guest that never exits on its own.
    mem.write_slice(&[0xeb, 0xfe], GuestAddress(0)).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps the page and outlives the VM (dropped after `vm`, which is moved into
    // the scope below and dropped at its end).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = 0;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    let fd = Arc::new(Mutex::new(fd));
    Kick::install();
    let (tx, rx) = std::sync::mpsc::channel();
    let vcpu = Arc::clone(&fd);
    let t = std::thread::spawn(move || {
        let _kick = Kick::enter(&vcpu);
        // The kick lands now, while this thread is outside KVM_RUN.
        // SAFETY: pthread_self names this live thread.
        Kick::kick(unsafe { libc::pthread_self() });
        let t = Instant::now();
        let r = vcpu
            .lock()
            .run()
            .map(|e| matches!(e, VcpuExit::Intr))
            .map_err(|e| e.errno());
        let _ = tx.send((r, t.elapsed()));
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    if got.is_err() {
        // Get the thread out of the guest loop before failing.
        Kick::kick(t.as_pthread_t());
        let _ = t.join();
        panic!("a kick that landed before KVM_RUN was lost: KVM_RUN ran the guest for 10 s");
    }
    t.join().unwrap();
    let (r, took) = got.unwrap();
    assert_eq!(r, Err(libc::EINTR), "KVM_RUN after a kick must return EINTR");
    assert!(
        fd.lock().get_kvm_run().immediate_exit == 1,
        "the handler did not set immediate_exit"
    );
    eprintln!("KVM_RUN after an early kick returned in {took:?}");
    drop(fd);
    drop(vm);
    drop(mem);
}
