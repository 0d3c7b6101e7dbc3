//! The dirty-log backend's contract with the core, against the real kernel log.
#![cfg(target_os = "linux")]
mod kvm_support;

use kvm_support::{kvm_or_skip, split_layout};
use squib_arch::GpaRange;
use squib_kvm::{KvmBackend, KvmVm, Tracking, VmConfig};
use squib_snapshot::{Stage2Backend, TrackingMechanism};

fn harvest(b: &KvmBackend) -> Vec<GpaRange> {
    let mut out = Vec::new();
    b.harvest(&mut |r| out.push(r)).unwrap();
    out
}

fn page(gpa: u64) -> GpaRange {
    GpaRange::new(gpa, 4096).unwrap()
}

#[test]
fn test_should_keep_a_page_written_after_the_harvest_for_the_next_one() {
    if !kvm_or_skip("test_should_keep_a_page_written_after_the_harvest_for_the_next_one") {
        return;
    }
    let layout = split_layout();
    let cfg = VmConfig {
        layout: layout.clone(),
        vcpus: 1,
        tracking: Tracking::DirtyLog,
    };
    let (mut vm, b) = KvmVm::new(&cfg).unwrap();
    assert_eq!(b.mechanism(), TrackingMechanism::KernelLogged);
    // Written before tracking starts: the first protect clears it (it is in the base).
    vm.poke(0, 0x5000, 8, 1).unwrap();
    for r in layout.ram() {
        b.write_protect(*r).unwrap();
    }
    assert!(harvest(&b).is_empty(), "arming must clear what was logged before");

    let high = layout.ram()[1];
    let (a, c) = (high.start() + 3 * 4096, high.start() + 9 * 4096);
    vm.poke(0, a + 8, 8, 2).unwrap();
    assert_eq!(
        harvest(&b),
        vec![page(a)],
        "pages are reported at their absolute address, past the hole"
    );
    // Written after the harvest and before the re-protect: must survive the clear.
    vm.poke(0, c, 8, 3).unwrap();
    b.write_protect(high).unwrap();
    assert_eq!(
        harvest(&b),
        vec![page(c)],
        "only the harvested page may be cleared"
    );
    b.write_protect(high).unwrap();
    assert!(harvest(&b).is_empty());
    // A cleared page is protected again: its next write is logged.
    vm.poke(0, a, 8, 4).unwrap();
    vm.poke(0, 4096, 4096 * 2, 5).unwrap();
    assert_eq!(harvest(&b), vec![GpaRange::new(4096, 2 * 4096).unwrap(), page(a)]);
}

#[test]
fn test_should_refuse_ranges_that_are_misaligned_or_not_ram() {
    if !kvm_or_skip("test_should_refuse_ranges_that_are_misaligned_or_not_ram") {
        return;
    }
    for tracking in [Tracking::DirtyLog, Tracking::UffdWp] {
        let cfg = VmConfig {
            layout: split_layout(),
            vcpus: 1,
            tracking,
        };
        let (_vm, b) = KvmVm::new(&cfg).unwrap();
        let hole = GpaRange::new(16 << 20, 4096).unwrap();
        let odd = GpaRange::new(0x800, 4096).unwrap();
        for r in [hole, odd] {
            let e = b.write_protect(r).unwrap_err().to_string();
            assert!(e.contains(&format!("{r}")), "{tracking:?}: {e}");
            assert!(b.grant_write(r).is_err(), "{tracking:?}: {r}");
        }
    }
}
