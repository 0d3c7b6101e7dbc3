//! The tracker's configuration checks, start/stop, and counters.
mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::Recorder;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BlockMode, DirtyTracker, GuestFault, Policy, TrackError, TrackingConfig};

fn ram(start: u64, len: u64) -> GpaRange {
    GpaRange::new(start, len).unwrap()
}

#[test]
fn test_should_reject_overlapping_regions_naming_the_region() {
    let regions = [ram(0, 4 << 20), ram(2 << 20, 4 << 20)];
    let rec = Recorder::new(PageGeometry::X86_64, &regions[..1]);
    let err = DirtyTracker::new(rec, &regions, TrackingConfig::default())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, TrackError::InvalidRegion { .. }), "{err}");
    assert!(err.to_string().contains("overlaps"), "{err}");
    assert!(err.to_string().contains("0x200000"), "{err}");
}

#[test]
fn test_should_reject_a_region_not_aligned_to_the_hot_unit() {
    // 4 KiB-aligned, but Apple Silicon's hot unit is 16 KiB.
    let r = ram(0x1000, 2 << 20);
    let rec = Recorder::new(PageGeometry::APPLE_SILICON, &[ram(0, 4 << 20)]);
    let err = DirtyTracker::new(rec, &[r], TrackingConfig::new(Policy::Fine))
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("hot tracking unit"), "{err}");
}

#[test]
fn test_should_reject_an_invalid_configuration_as_invalid_config() {
    let rec = Recorder::new(PageGeometry::X86_64, &[ram(0, 4 << 20)]);
    let config = TrackingConfig {
        step_down_threshold: 0,
        ..TrackingConfig::default()
    };
    let err = DirtyTracker::new(rec, &[ram(0, 4 << 20)], config)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, TrackError::InvalidConfig(_)), "{err}");
    assert!(err.to_string().contains("step_down_threshold"), "{err}");
}

#[test]
fn test_should_reject_an_invalid_backend_geometry() {
    let mut g = PageGeometry::X86_64;
    g.tracking_hot = 3 << 10;
    let mut rec = Recorder::new(PageGeometry::X86_64, &[ram(0, 4 << 20)]);
    rec.geometry = g;
    let err = DirtyTracker::new(rec, &[ram(0, 4 << 20)], TrackingConfig::default())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, TrackError::InvalidGeometry(_)), "{err}");
}

#[test]
fn test_should_protect_each_region_with_one_call_on_start_and_grant_everything_on_stop() {
    let regions = [ram(0, 4 << 20), ram(1 << 32, 2 << 20)];
    let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &regions));
    let t = DirtyTracker::new(Arc::clone(&rec), &regions, TrackingConfig::default()).unwrap();
    t.start().unwrap();
    assert!(t.is_started());
    assert_eq!(rec.protect_calls.load(Ordering::SeqCst), 2);
    assert_eq!(rec.is_writable(0x1234), Some(false));
    assert_eq!(rec.is_writable((1 << 32) + 0x1000), Some(false));
    t.stop().unwrap();
    assert!(!t.is_started());
    assert_eq!(rec.is_writable(0x1234), Some(true));
    assert_eq!(t.counters().protect_calls, 2);
}

/// One checkpoint's ranges, through the public API.
fn diff<B: squib_snapshot::Stage2Backend>(t: &DirtyTracker<B>) -> Vec<GpaRange> {
    let mut out = Vec::new();
    t.checkpoint(None, |ranges| -> Result<(), std::io::Error> {
        out.extend_from_slice(ranges);
        Ok(())
    })
    .unwrap();
    out
}

fn covers(ranges: &[GpaRange], gpa: u64) -> bool {
    ranges.iter().any(|r| r.contains(gpa))
}

#[test]
fn test_should_hold_writes_made_while_stopped_in_the_next_checkpoint() {
    let r = ram(0, 4 << 20);
    let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &[r]));
    let t = DirtyTracker::new(Arc::clone(&rec), &[r], TrackingConfig::new(Policy::Fine)).unwrap();
    t.start().unwrap();
    assert_eq!(rec.guest_write(&t, 0x1000, 8, 0).unwrap(), 1);
    assert_eq!(diff(&t), vec![ram(0x1000, 0x1000)]);
    t.stop().unwrap();
    // Stopped: the guest writes without faulting, so nothing sees these writes.
    assert_eq!(rec.guest_write(&t, 0x20_0000, 8, 0).unwrap(), 0);
    let while_stopped = diff(&t);
    assert!(covers(&while_stopped, 0x20_0000), "{while_stopped:?}");
    assert_eq!(
        rec.is_writable(0x20_0000),
        Some(true),
        "a checkpoint while stopped leaves RAM writable"
    );
    assert_eq!(rec.guest_write(&t, 0x30_0000, 8, 0).unwrap(), 0);
    t.start().unwrap();
    let after_restart = diff(&t);
    assert!(
        covers(&after_restart, 0x30_0000),
        "a write made between stop and start is lost: {after_restart:?}"
    );
    // Running again, tracking is exact once more.
    assert_eq!(rec.guest_write(&t, 0x5000, 8, 0).unwrap(), 1);
    assert_eq!(diff(&t), vec![ram(0x5000, 0x1000)]);
}

#[test]
fn test_should_leave_memory_writable_when_start_fails() {
    let regions = [ram(0, 4 << 20), ram(1 << 32, 2 << 20)];
    let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &regions));
    let t = DirtyTracker::new(Arc::clone(&rec), &regions, TrackingConfig::default()).unwrap();
    // Fail the first protect: nothing may stay protected.
    rec.fail_protect.store(true, Ordering::SeqCst);
    assert!(matches!(t.start(), Err(TrackError::Backend(_))));
    assert!(!t.is_started());
    assert_eq!(rec.is_writable(0), Some(true));
    assert_eq!(rec.is_writable(1 << 32), Some(true));
}

#[test]
fn test_should_count_faults_regrants_and_dirty_bytes() {
    let r = ram(0, 4 << 20);
    let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &[r]));
    let t = DirtyTracker::new(Arc::clone(&rec), &[r], TrackingConfig::new(Policy::Fine)).unwrap();
    t.start().unwrap();
    for i in 0..5u64 {
        rec.guest_write(&t, i * 0x1000, 4, 0).unwrap();
    }
    t.checkpoint(None, |_| -> Result<(), std::io::Error> { Ok(()) })
        .unwrap();
    let c = t.counters();
    assert_eq!(
        (c.faults, c.regrants, c.dirty_bytes, c.checkpoints),
        (5, 5, 5 * 0x1000, 1)
    );
    assert_eq!(c.protect_calls, 2, "one at start, one for the dirty region");
}

#[test]
fn test_should_escalate_a_densely_written_block_to_coarse_within_the_epoch() {
    let g = PageGeometry::APPLE_SILICON;
    let r = ram(0x8000_0000, 8 << 20);
    let rec = Arc::new(Recorder::new(g, &[r]));
    let t = DirtyTracker::new(Arc::clone(&rec), &[r], TrackingConfig::new(Policy::Adaptive)).unwrap();
    t.start().unwrap();
    let k = u64::from(t.escalate_at());
    assert!(k > 2 && k < g.hot_per_block());
    for i in 0..k {
        assert_eq!(
            rec.guest_write(&t, r.start() + i * g.tracking_hot, 8, 0).unwrap(),
            1
        );
    }
    assert_eq!(t.block_mode(r.start()), Some(BlockMode::Coarse));
    // The rest of the block was granted whole: no more faults in it this epoch.
    assert_eq!(
        rec.guest_write(&t, r.start() + (k + 5) * g.tracking_hot, 8, 0)
            .unwrap(),
        0
    );
    let mut diff = Vec::new();
    t.checkpoint(None, |d| -> Result<(), std::io::Error> {
        diff.extend_from_slice(d);
        Ok(())
    })
    .unwrap();
    assert_eq!(diff, vec![ram(r.start(), g.tracking_default)]);
    // One dense epoch says little about the next (a heap block being filled is dense once), and
    // at these costs a wrong hold wastes far more than a probe: it is re-measured at once.
    assert_eq!(t.block_mode(r.start()), Some(BlockMode::Fine));
    for i in 0..k {
        rec.guest_write(&t, r.start() + i * g.tracking_hot, 8, 0).unwrap();
    }
    t.checkpoint(None, |_| -> Result<(), std::io::Error> { Ok(()) })
        .unwrap();
    // Dense again: now it is held coarse for the next epoch, and across short idle gaps (a dense
    // block usually wakes up dense); a longer gap returns it to fine, where a sparse wake-up costs
    // nothing extra.
    assert_eq!(t.block_mode(r.start()), Some(BlockMode::Coarse));
    let mut clean_epochs = 0;
    while t.block_mode(r.start()) == Some(BlockMode::Coarse) {
        t.checkpoint(None, |_| -> Result<(), std::io::Error> { Ok(()) })
            .unwrap();
        clean_epochs += 1;
        assert!(
            clean_epochs <= 64,
            "an idle block must not be held coarse for ever"
        );
    }
    assert!(clean_epochs > 1, "a dense block is held across a short gap");
    let c = t.counters();
    assert_eq!((c.step_ups, c.step_downs), (2, 2));
}

/// An adaptive tracker over 16 blocks, started, with expensive faults and a fast disk (so it
/// escalates after a handful of faults).
fn nested_adaptive_tracker() -> (Arc<Recorder>, DirtyTracker<Arc<Recorder>>, GpaRange) {
    let r = ram(0x8000_0000, 32 << 20);
    let rec = Arc::new(Recorder::new(PageGeometry::APPLE_SILICON, &[r]));
    let mut c = TrackingConfig::new(Policy::Adaptive);
    c.cost.fault_us = 50.0;
    c.cost.write_bytes_per_us = 5000.0;
    let t = DirtyTracker::new(Arc::clone(&rec), &[r], c).unwrap();
    t.start().unwrap();
    (rec, t, r)
}

/// Write every hot unit of block `b` once; the faults it took.
fn write_block_densely(rec: &Recorder, t: &DirtyTracker<Arc<Recorder>>, base: u64, b: u64) -> u64 {
    let g = t.geometry();
    (0..g.hot_per_block())
        .map(|u| {
            rec.guest_write(t, base + b * g.tracking_default + u * g.tracking_hot, 8, 0)
                .unwrap()
        })
        .sum()
}

#[test]
fn test_should_send_never_written_blocks_coarse_at_once_when_first_touched_blocks_proved_dense() {
    // A guest zeroing its memory block by block: once the first blocks have shown that a block
    // is dense when first written, the next ones are granted whole at their first fault (one
    // fault each) instead of paying the escalation faults again; one in eight is still measured.
    let g = PageGeometry::APPLE_SILICON;
    let (rec, t, r) = nested_adaptive_tracker();
    let k = u64::from(t.escalate_at());
    let faults: Vec<u64> = (0..16)
        .map(|b| write_block_densely(&rec, &t, r.start(), b))
        .collect();
    assert_eq!(faults[0], k, "the first block is measured");
    assert_eq!(
        faults[1], 1,
        "at these costs a wrong guess loses about what a right one saves: 2 to 1 odds suffice"
    );
    let at_once = faults.iter().filter(|&&f| f == 1).count();
    let measured = faults.iter().filter(|&&f| f == k).count();
    assert_eq!(at_once + measured, 16, "{faults:?}");
    assert_eq!(faults[8], k, "one in eight is measured whatever the prior says");
    assert_eq!(at_once, 14, "{faults:?}");
    // Every byte is still in the diff.
    let mut bytes = 0;
    t.checkpoint(None, |d| -> Result<(), std::io::Error> {
        bytes = d.iter().map(GpaRange::len).sum();
        Ok(())
    })
    .unwrap();
    assert_eq!(bytes, 16 * g.tracking_default);
}

#[test]
fn test_should_keep_never_written_blocks_fine_when_first_touched_blocks_proved_sparse() {
    // Most programs: the blocks written so far held a few pages each, so a new block's first
    // fault grants one unit, even after one dense block.
    let g = PageGeometry::APPLE_SILICON;
    let (rec, t, r) = nested_adaptive_tracker();
    for b in 0..4 {
        rec.guest_write(&t, r.start() + b * g.tracking_default, 8, 0)
            .unwrap();
    }
    assert_eq!(
        write_block_densely(&rec, &t, r.start(), 4),
        u64::from(t.escalate_at())
    );
    t.checkpoint(None, |_| -> Result<(), std::io::Error> { Ok(()) })
        .unwrap();
    for b in 5..16 {
        let gpa = r.start() + b * g.tracking_default;
        assert_eq!(rec.guest_write(&t, gpa, 8, 0).unwrap(), 1);
        assert_eq!(t.block_mode(gpa), Some(BlockMode::Fine), "block {b}");
    }
}

#[test]
fn test_should_step_the_whole_region_down_under_the_region_policy() {
    let g = PageGeometry::APPLE_SILICON;
    let r = ram(0x8000_0000, 8 << 20);
    let rec = Arc::new(Recorder::new(g, &[r]));
    let config = TrackingConfig {
        step_down_threshold: 2,
        ..TrackingConfig::new(Policy::Region)
    };
    let t = DirtyTracker::new(Arc::clone(&rec), &[r], config).unwrap();
    t.start().unwrap();
    assert_eq!(t.block_mode(r.start() + (6 << 20)), Some(BlockMode::Coarse));
    t.tick(std::time::Duration::ZERO);
    // Three faults in block 0 within one window: over the threshold of 2 (one per epoch, as a
    // coarse block faults once per epoch).
    for _ in 0..3 {
        rec.guest_write(&t, r.start(), 8, 0).unwrap();
        t.checkpoint(None, |_| -> Result<(), std::io::Error> { Ok(()) })
            .unwrap();
    }
    t.tick(std::time::Duration::from_millis(100));
    assert_eq!(
        t.block_mode(r.start() + (6 << 20)),
        Some(BlockMode::Fine),
        "the whole region steps down"
    );
    assert_eq!(t.counters().step_downs, 1);
}

#[test]
fn test_should_refuse_a_read_fault() {
    let r = ram(0, 4 << 20);
    let t = DirtyTracker::new(
        Recorder::new(PageGeometry::X86_64, &[r]),
        &[r],
        TrackingConfig::default(),
    )
    .unwrap();
    let err = t
        .on_write_fault(GuestFault {
            gpa: 0x10,
            write: false,
            vcpu: 3,
        })
        .unwrap_err();
    assert!(err.to_string().contains("vCPU 3"), "{err}");
}
