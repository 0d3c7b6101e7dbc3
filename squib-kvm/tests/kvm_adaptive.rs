//! The core's adaptive policy on real hardware: uffd-wp faults reach the same fault path as HVF's,
//! so a guest filling blocks gets them granted whole, and its diffs still hold exactly what it
//! wrote.
#![cfg(target_os = "linux")]
mod kvm_support;

use kvm_support::{kvm_or_skip, split_layout};
use squib_arch::GpaRange;
use squib_kvm::{Machine, Tracking, VmConfig};
use squib_snapshot::{BlockMode, Policy, TrackingConfig};

#[test]
fn test_should_step_a_filled_block_up_to_coarse_under_uffd_wp() {
    if !kvm_or_skip("test_should_step_a_filled_block_up_to_coarse_under_uffd_wp") {
        return;
    }
    let cfg = VmConfig {
        layout: split_layout(),
        vcpus: 1,
        tracking: Tracking::UffdWp,
    };
    let mut m = Machine::new(&cfg, TrackingConfig::new(Policy::Adaptive)).unwrap();
    m.tracker.start().unwrap();
    // Fill one 2 MiB block in slot 1 (past the hole) from the guest.
    let block = GpaRange::new(32 << 20, 2 << 20).unwrap();
    m.vm.poke(0, block.start(), block.len(), 0x77).unwrap();
    let c = m.tracker.counters();
    assert!(c.step_ups >= 1, "no block stepped up: {c:?}");
    assert!(
        c.faults < block.len() / 4096,
        "{} faults for {} pages: the block was never granted whole",
        c.faults,
        block.len() / 4096
    );
    assert_eq!(m.tracker.block_mode(block.start()), Some(BlockMode::Coarse));
    assert_eq!(c.faults, m.faults_served());
    let mut diff = Vec::new();
    m.tracker
        .checkpoint(Some(m.vm.ram()), |r| -> Result<(), std::io::Error> {
            diff.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
    assert_eq!(diff, vec![block], "the diff is the filled block, nothing else");
    // One fill says little about the next epoch, and at these costs a wrong hold wastes far more
    // than a probe: the block is re-measured at once. Filled again, it escalates again and is
    // then held: the next epoch starts coarse for it, one fault grants it all.
    assert_eq!(m.tracker.block_mode(block.start()), Some(BlockMode::Fine));
    m.vm.poke(0, block.start(), block.len(), 0x7a).unwrap();
    assert_eq!(m.tracker.block_mode(block.start()), Some(BlockMode::Coarse));
    m.tracker
        .checkpoint(Some(m.vm.ram()), |_| -> Result<(), std::io::Error> { Ok(()) })
        .unwrap();
    assert_eq!(m.tracker.block_mode(block.start()), Some(BlockMode::Coarse));
    let before = m.tracker.counters().faults;
    m.vm.poke(0, block.start() + 4096 * 7, 8, 0x78).unwrap();
    m.vm.poke(0, block.end() - 8, 8, 0x79).unwrap();
    assert_eq!(m.tracker.counters().faults - before, 1);
    m.shutdown().unwrap();
}
