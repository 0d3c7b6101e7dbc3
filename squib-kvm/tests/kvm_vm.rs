//! The VM itself: guest programs run in 64-bit user mode and write where they are told.
#![cfg(target_os = "linux")]
mod kvm_support;

use kvm_support::{DEADLINE, kvm_or_skip, split_layout, wait_for};
use squib_kvm::{KvmVm, Tracking, VmConfig, Workload};
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
    // A write running off the end of slot 0 would land in slot 1 through the window: refused.
    let e = vm.poke(0, (8 << 20) - 8, 16, 0xEE).unwrap_err().to_string();
    assert!(e.contains("0x7ffff8"), "{e}");
    let v: u64 = vm.ram().read_obj(GuestAddress(32 << 20)).unwrap();
    assert_eq!(v, 0, "nothing landed past the hole");
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
    wait_for("the workload's first writes", || workers.writes() > 0);
    workers.pause(DEADLINE).unwrap();
    // `pause` returned: every vCPU thread that has not ended is parked in the host, outside
    // KVM_RUN, so the guest cannot run; none has ended (that would be a failure).
    assert!(!workers.any_exited(), "a vCPU thread ended");
    let n = workers.writes();
    let image = |vm: &KvmVm| {
        let mut buf = vec![0u8; 16 << 20];
        vm.ram().read_slice(&mut buf[..8 << 20], GuestAddress(0)).unwrap();
        vm.ram()
            .read_slice(&mut buf[8 << 20..], GuestAddress(32 << 20))
            .unwrap();
        buf
    };
    let at_pause = image(&vm);
    assert!(image(&vm) == at_pause, "guest memory changed while paused");
    assert_eq!(workers.writes(), n, "paused vCPUs must not write");
    assert!(n > 0);
    workers.resume();
    let stats = vm.stop(workers).unwrap();
    assert!(stats.writes >= n);
    // vCPU 1's slice starts halfway through RAM: in the second slot, past the hole.
    let first: u64 = vm.ram().read_obj(GuestAddress(0)).unwrap();
    let second: u64 = vm.ram().read_obj(GuestAddress(32 << 20)).unwrap();
    assert_eq!(first >> 56, 1, "vCPU 0 wrote the start of slot 0");
    assert_eq!(second >> 56, 2, "vCPU 1 wrote the start of slot 1");
}

/// Run `spec` on one vCPU until it made `min_writes` writes (failing after a generous deadline),
/// and return RAM's qwords (window order) and the writes.
fn run_shape(spec: &str, min_writes: u64) -> (Vec<u64>, u64) {
    let layout = split_layout();
    let cfg = VmConfig {
        layout: layout.clone(),
        vcpus: 1,
        tracking: Tracking::DirtyLog,
    };
    let (mut vm, _backend) = KvmVm::new(&cfg).unwrap();
    let w: Workload = spec.parse().unwrap();
    let workers = vm.start(&w).unwrap();
    wait_for(&format!("{spec}: {min_writes} writes"), || {
        workers.writes() >= min_writes || workers.any_exited()
    });
    let stats = vm.stop(workers).unwrap();
    let mut words = Vec::new();
    for r in layout.ram() {
        let mut buf = vec![0u8; usize::try_from(r.len()).unwrap()];
        vm.ram().read_slice(&mut buf, GuestAddress(r.start())).unwrap();
        words.extend(buf.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())));
    }
    (words, stats.writes)
}

#[test]
fn test_should_write_each_shape_only_where_its_spec_says() {
    if !kvm_or_skip("test_should_write_each_shape_only_where_its_spec_says") {
        return;
    }
    let written = |words: &[u64]| -> Vec<u64> {
        (0u64..)
            .zip(words)
            .filter(|(_, w)| **w != 0)
            .map(|(i, _)| i * 8)
            .collect()
    };
    // seq: a prefix of the range (unless it wrapped), each value one more than the last.
    let (words, writes) = run_shape("seq:len=2M,report=4K", 1000);
    let offs = written(&words);
    assert!(
        writes > 0 && offs.iter().all(|&o| o < 2 << 20),
        "seq left its range"
    );
    assert_eq!(words[0] >> 56, 1, "vCPU 0's writes carry its tag");
    if writes < (2 << 20) / 8 {
        assert_eq!(
            offs.len() as u64,
            offs.last().unwrap() / 8 + 1,
            "seq skipped a qword"
        );
        assert!(words.windows(2).take(offs.len() - 1).all(|p| p[1] == p[0] + 1));
    }
    // stride: 64-byte writes at page starts only, every 16th page on the first pass.
    let (words, _) = run_shape("stride:start=1M,len=4M,k=16,size=64", 1000);
    let offs = written(&words);
    assert!(
        offs.iter()
            .all(|&o| (1 << 20..5 << 20).contains(&o) && o % 4096 < 64)
    );
    let first_pass = offs
        .iter()
        .filter(|&&o| (o - (1 << 20)) % (16 * 4096) == 0)
        .count();
    assert_eq!(first_pass, 64, "every 16th page of the range is written");
    // random: page-aligned, inside the range.
    let (words, _) = run_shape("random:len=6M,seed=4", 1000);
    let offs = written(&words);
    assert!(offs.len() > 100 && offs.iter().all(|&o| o < 6 << 20 && o % 4096 == 0));
    idle_and_hotspot(&written);
}

fn idle_and_hotspot(written: &dyn Fn(&[u64]) -> Vec<u64>) {
    // hotspot: page-aligned, inside the range, and the Zipf rank-0 block rewritten far more
    // often than the coldest: its pages hold much more recent values.
    let spec = "hotspot:len=8M,s=3,seed=4";
    let (words, _) = run_shape(spec, 400_000);
    let offs = written(&words);
    assert!(offs.iter().all(|&o| o < 8 << 20 && o % 4096 == 0));
    let w: Workload = spec.parse().unwrap();
    let table = w.hotspot_table(16 << 20).unwrap();
    let block_of_rank =
        |r: usize| u64::from_le_bytes(table[r * 32 + 16..r * 32 + 24].try_into().unwrap()) >> 21;
    let last = offs
        .iter()
        .map(|&o| words[(o / 8) as usize] & ((1 << 56) - 1))
        .max()
        .unwrap();
    let mean_age = |block: u64| {
        let ages: Vec<u64> = offs
            .iter()
            .filter(|&&o| o >> 21 == block)
            .map(|&o| last - (words[(o / 8) as usize] & ((1 << 56) - 1)))
            .collect();
        assert!(!ages.is_empty(), "block {block} never written");
        ages.iter().sum::<u64>() / ages.len() as u64
    };
    let (hot, cold) = (mean_age(block_of_rank(0)), mean_age(block_of_rank(3)));
    assert!(hot * 4 < cold, "rank-0 block mean age {hot}, rank-3 block {cold}");
    // idle: nothing.
    let (words, writes) = run_shape("idle", 0);
    assert_eq!(writes, 0);
    assert!(written(&words).is_empty(), "idle wrote guest memory");
}

#[test]
fn test_should_keep_guest_ram_mapped_while_any_vcpu_runs() {
    if !kvm_or_skip("test_should_keep_guest_ram_mapped_while_any_vcpu_runs") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 2,
        tracking: Tracking::DirtyLog,
    };
    let (mut vm, backend) = KvmVm::new(&cfg).unwrap();
    let ram = std::sync::Arc::downgrade(vm.ram());
    let w: Workload = "seq:seed=5".parse().unwrap();
    let workers = vm.start(&w).unwrap();
    // Drop every owner of the VM but the running vCPUs: their memslots still point at RAM.
    drop(backend);
    drop(vm);
    assert!(
        ram.upgrade().is_some(),
        "guest RAM was unmapped while vCPUs of its VM still ran"
    );
    let n = workers.writes();
    wait_for("the vCPUs to write on after their VM's owner was dropped", || {
        workers.writes() > n + 256
    });
    assert!(!workers.any_exited(), "a vCPU thread ended");
    drop(workers);
    assert!(ram.upgrade().is_none(), "guest RAM outlived every fd of its VM");
}
