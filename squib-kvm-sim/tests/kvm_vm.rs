//! The VM itself: guest programs run in 64-bit user mode and write where they are told.
mod kvm_support;

use std::time::Duration;

use kvm_support::{kvm_or_skip, split_layout};
use squib_kvm_sim::kvm::{KvmVm, Tracking, VmConfig, Workload};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn test_should_land_guest_writes_on_both_sides_of_the_hole() {
    if !kvm_or_skip("test_should_land_guest_writes_on_both_sides_of_the_hole") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 1,
        tracking: Tracking::DirtyLog,
    };
    let (mut vm, _backend) = KvmVm::new(&cfg).unwrap();
    vm.poke(0, (8 << 20) - 16, 16, 0xAB).unwrap();
    vm.poke(0, (32 << 20) + 0x1234, 3, 0xCD).unwrap();
    let mut buf = [0u8; 16];
    vm.ram()
        .read_slice(&mut buf, GuestAddress((8 << 20) - 16))
        .unwrap();
    assert_eq!(buf, [0xAB; 16]);
    let mut buf = [0u8; 5];
    vm.ram()
        .read_slice(&mut buf, GuestAddress((32 << 20) + 0x1233))
        .unwrap();
    assert_eq!(buf, [0, 0xCD, 0xCD, 0xCD, 0]);
}

#[test]
fn test_should_run_a_workload_on_several_vcpus_and_pause_it() {
    if !kvm_or_skip("test_should_run_a_workload_on_several_vcpus_and_pause_it") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 2,
        tracking: Tracking::DirtyLog,
    };
    let (mut vm, _backend) = KvmVm::new(&cfg).unwrap();
    let w: Workload = "seq:seed=3".parse().unwrap();
    let workers = vm.start(&w).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    workers.pause(Duration::from_secs(5)).unwrap();
    let n = workers.writes();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(workers.writes(), n, "paused vCPUs must not write");
    assert!(n > 0, "the workload made no writes");
    workers.resume();
    let stats = vm.stop(workers).unwrap();
    assert!(stats.writes >= n);
    // vCPU 1's slice starts halfway through RAM: in the second slot, past the hole.
    let first: u64 = vm.ram().read_obj(GuestAddress(0)).unwrap();
    let second: u64 = vm.ram().read_obj(GuestAddress(32 << 20)).unwrap();
    assert_eq!(first >> 56, 1, "vCPU 0 wrote the start of slot 0");
    assert_eq!(second >> 56, 2, "vCPU 1 wrote the start of slot 1");
}
