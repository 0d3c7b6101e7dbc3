//! End to end on real guests: vCPUs write while diffs are taken; base + diffs restored into
//! fresh memory equal, byte for byte, the guest's memory at the last checkpoint.
#![cfg(target_os = "linux")]
mod kvm_support;

use kvm_support::{DEADLINE, kvm_or_skip, split_layout, wait_for};
use squib_arch::GpaRange;
use squib_kvm::{Machine, Tracking, VmConfig, Workload};
use squib_snapshot::{Policy, TrackingConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

/// A diff held in memory: each dirty range and its bytes.
type Diff = Vec<(u64, Vec<u8>)>;

fn copy(mem: &GuestMemoryMmap<AtomicBitmap>, r: GpaRange) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(r.len()).unwrap()];
    mem.read_slice(&mut buf, GuestAddress(r.start())).unwrap();
    buf
}

fn checkpoint(m: &Machine) -> Diff {
    let mem = m.vm.ram();
    let mut diff = Diff::new();
    m.tracker
        .checkpoint(Some(mem), |ranges| -> Result<(), std::io::Error> {
            for r in ranges {
                diff.push((r.start(), copy(mem, *r)));
            }
            Ok(())
        })
        .unwrap();
    diff
}

fn run(tracking: Tracking, policy: Policy, spec: &str) {
    let layout = split_layout();
    let cfg = VmConfig {
        layout: layout.clone(),
        vcpus: 2,
        tracking,
    };
    let m = Machine::new(&cfg, TrackingConfig::new(policy)).unwrap();
    let mut m = m;
    // The workload covers 12 MiB: all of slot 0 and half of slot 1. The VMM writes past it.
    let w: Workload = spec.parse().unwrap();
    let workers = m.vm.start(&w).unwrap();
    wait_for("the guest's first writes", || workers.writes() > 0);
    // Base: protect everything, then copy everything, with the vCPUs running.
    m.tracker.start().unwrap();
    let base: Diff = layout
        .ram()
        .iter()
        .map(|r| (r.start(), copy(m.vm.ram(), *r)))
        .collect();
    let mut diffs = Vec::new();
    let vmm_gpa = layout.ram()[1].end() - 4096 + 24;
    for i in 0..4u64 {
        // Each live epoch holds guest writes: wait for the guest to make more.
        let before = workers.writes();
        wait_for("guest writes between checkpoints", || workers.writes() > before);
        if i == 1 {
            // A device-model write: no guest fault, in both modes it must reach a diff.
            m.vm.ram()
                .write_obj(0xFEED_F00Du64, GuestAddress(vmm_gpa))
                .unwrap();
        }
        diffs.push(checkpoint(&m));
    }
    wait_for("256 guest writes", || workers.writes() >= 256);
    workers.pause(DEADLINE).unwrap();
    diffs.push(checkpoint(&m));
    let live: Diff = layout
        .ram()
        .iter()
        .map(|r| (r.start(), copy(m.vm.ram(), *r)))
        .collect();
    let writes = workers.writes();
    workers.resume();
    m.vm.stop(workers).unwrap();

    // Restore into fresh memory: base, then every diff in order.
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram()
        .iter()
        .map(|r| (GuestAddress(r.start()), usize::try_from(r.len()).unwrap()))
        .collect();
    let fresh = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    for (gpa, bytes) in base.iter().chain(diffs.iter().flatten()) {
        fresh.write_slice(bytes, GuestAddress(*gpa)).unwrap();
    }
    let mut dirty = 0u64;
    for d in &diffs[..4] {
        dirty += d.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    }
    assert!(writes >= 256, "{tracking:?}: the guest made only {writes} writes");
    assert!(
        dirty > 0,
        "{tracking:?}: no diff taken while running held anything"
    );
    for (gpa, expected) in &live {
        let mut got = vec![0u8; expected.len()];
        fresh.read_slice(&mut got, GuestAddress(*gpa)).unwrap();
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "{tracking:?}/{policy:?}: restored byte at {:#x} is {:#x}, the guest's is {:#x}",
                gpa + i as u64,
                got[i],
                expected[i]
            );
        }
    }
    let v: u64 = fresh.read_obj(GuestAddress(vmm_gpa)).unwrap();
    assert_eq!(v, 0xFEED_F00D, "{tracking:?}: the VMM's own write was lost");
    m.shutdown().unwrap();
}

#[test]
fn test_should_restore_what_the_guest_wrote_in_dirty_log_mode() {
    if !kvm_or_skip("test_should_restore_what_the_guest_wrote_in_dirty_log_mode") {
        return;
    }
    run(Tracking::DirtyLog, Policy::Adaptive, "random:len=12M,seed=5");
}

#[test]
fn test_should_restore_what_the_guest_wrote_in_uffd_wp_mode_adaptive() {
    if !kvm_or_skip("test_should_restore_what_the_guest_wrote_in_uffd_wp_mode_adaptive") {
        return;
    }
    run(Tracking::UffdWp, Policy::Adaptive, "hotspot:len=12M,seed=9");
}

#[test]
fn test_should_restore_what_the_guest_wrote_in_uffd_wp_mode_fine() {
    if !kvm_or_skip("test_should_restore_what_the_guest_wrote_in_uffd_wp_mode_fine") {
        return;
    }
    run(Tracking::UffdWp, Policy::Fine, "random:len=12M,seed=5");
}
