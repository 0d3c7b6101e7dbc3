//! Property: what each policy puts in a diff, for random write sequences and random checkpoints.
//!
//! Under `fine` and `coarse` a diff holds exactly the units written since the previous checkpoint
//! (at that policy's unit). Under `adaptive` and `region` it holds every written unit and never
//! more than `coarse` would have: every range lies inside a block that was written.
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::Recorder;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{CostModel, DirtyTracker, Policy, TrackingConfig};

const RAM_START: u64 = 0x4000_0000;
const BLOCKS: u64 = 6;

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` bytes at byte offset `off` into RAM.
    Write {
        off: u64,
        len: u64,
    },
    /// Advance policy time by `ms` and tick.
    Tick {
        ms: u64,
    },
    Checkpoint,
}

fn ops(geometry: PageGeometry) -> impl Strategy<Value = Vec<Op>> {
    let ram = BLOCKS * geometry.tracking_default;
    let hot_block = geometry.tracking_default;
    let op = prop_oneof![
        6 => (0..ram - 64, 1u64..64).prop_map(|(off, len)| Op::Write { off, len }),
        // Dense writes in one block, so adaptive escalates and region steps down.
        4 => (0..hot_block - (64 << 10), 1u64..(64 << 10)).prop_map(move |(off, len)| Op::Write { off: hot_block + off, len }),
        1 => (1u64..150).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Checkpoint),
    ];
    proptest::collection::vec(op, 1..400)
}

/// Units (at `unit` size) touched by a write.
fn units(off: u64, len: u64, unit: u64) -> impl Iterator<Item = u64> {
    let first = (RAM_START + off) / unit;
    let last = (RAM_START + off + len - 1) / unit;
    (first..=last).map(move |u| u * unit)
}

fn covered(diff: &[GpaRange], unit: u64) -> BTreeSet<u64> {
    diff.iter()
        .flat_map(|r| (r.start()..r.end()).step_by(usize::try_from(unit).unwrap()))
        .collect()
}

/// Runs the ops, checking every diff; returns how many mode changes the tracker made.
fn run(policy: Policy, geometry: PageGeometry, ops: &[Op]) -> Result<u64, TestCaseError> {
    let ram = GpaRange::new(RAM_START, BLOCKS * geometry.tracking_default).unwrap();
    let rec = Arc::new(Recorder::new(geometry, &[ram]));
    let config = TrackingConfig {
        cost: CostModel {
            fault_us: 50.0,
            protect_us: 120.0,
            write_bytes_per_us: 5000.0,
        },
        step_down_threshold: 3,
        ..TrackingConfig::new(policy)
    };
    let t = DirtyTracker::new(Arc::clone(&rec), &[ram], config).unwrap();
    t.start().unwrap();
    let (hot, block) = (geometry.tracking_hot, geometry.tracking_default);
    let mut now = 0;
    let mut written_hot = BTreeSet::new();
    let mut written_blocks = BTreeSet::new();
    let check = |t: &DirtyTracker<Arc<Recorder>>,
                 written_hot: &mut BTreeSet<u64>,
                 written_blocks: &mut BTreeSet<u64>| {
        let mut diff = Vec::new();
        t.checkpoint(None, |r| -> Result<(), std::io::Error> {
            diff.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
        let got_hot = covered(&diff, hot);
        match policy {
            Policy::Fine => prop_assert_eq!(&got_hot, &*written_hot),
            Policy::Coarse => prop_assert_eq!(covered(&diff, block), written_blocks.clone()),
            Policy::Adaptive | Policy::Region => {
                prop_assert!(
                    got_hot.is_superset(written_hot),
                    "{policy}: a written unit is missing"
                );
                for r in &diff {
                    for u in (r.start()..r.end()).step_by(usize::try_from(hot).unwrap()) {
                        prop_assert!(
                            written_blocks.contains(&(u / block * block)),
                            "{policy}: {u:#x} is in no written block"
                        );
                    }
                }
            }
        }
        written_hot.clear();
        written_blocks.clear();
        Ok(())
    };
    for op in ops {
        match *op {
            Op::Write { off, len } => {
                rec.guest_write(&t, RAM_START + off, len, 0).unwrap();
                written_hot.extend(units(off, len, hot));
                written_blocks.extend(units(off, len, block));
            }
            Op::Tick { ms } => {
                now += ms;
                t.tick(Duration::from_millis(now));
            }
            Op::Checkpoint => check(&t, &mut written_hot, &mut written_blocks)?,
        }
    }
    check(&t, &mut written_hot, &mut written_blocks)?;
    let c = t.counters();
    Ok(c.step_ups + c.step_downs)
}

#[test]
fn test_should_exercise_mode_changes_in_the_generated_cases() {
    // Guards the generator: if no case ever changed a block's mode, the adaptive and region
    // properties above would be vacuous.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for policy in [Policy::Adaptive, Policy::Region] {
        let mut changes = 0;
        for _ in 0..16 {
            let case = ops(PageGeometry::APPLE_SILICON)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            changes += run(policy, PageGeometry::APPLE_SILICON, &case).unwrap();
        }
        assert!(changes > 0, "{policy}: no mode change generated");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn test_should_hold_exactly_the_written_units_under_fine(ops in ops(PageGeometry::APPLE_SILICON)) {
        run(Policy::Fine, PageGeometry::APPLE_SILICON, &ops)?;
    }

    #[test]
    fn test_should_hold_exactly_the_written_blocks_under_coarse(ops in ops(PageGeometry::APPLE_SILICON)) {
        run(Policy::Coarse, PageGeometry::APPLE_SILICON, &ops)?;
    }

    #[test]
    fn test_should_hold_every_written_unit_and_no_more_than_coarse_under_adaptive(ops in ops(PageGeometry::APPLE_SILICON)) {
        run(Policy::Adaptive, PageGeometry::APPLE_SILICON, &ops)?;
    }

    #[test]
    fn test_should_hold_every_written_unit_and_no_more_than_coarse_under_region(ops in ops(PageGeometry::X86_64)) {
        run(Policy::Region, PageGeometry::X86_64, &ops)?;
    }
}
