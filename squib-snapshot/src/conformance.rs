//! The backend conformance suite: one set of checks, generic over the backend, that every
//! backend's tests run (enable the `test-kit` feature).
//!
//! A backend is only correct together with the core: its protect and grant calls must make the
//! core's fault path see exactly the writes the guest made. So the checks drive real guest writes
//! through a [`Harness`] and assert what a snapshot user depends on: which units fault, which
//! units the next diff holds, and how many protect calls a checkpoint costs.
//!
//! ```ignore
//! #[test]
//! fn test_should_pass_the_conformance_suite() {
//!     squib_snapshot::conformance::run_all(&mut MyHarness::new());
//! }
//! ```

use squib_arch::GpaRange;

use crate::backend::{GuestFault, Stage2Backend, TrackingMechanism};
use crate::policy::{Policy, TrackingConfig};
use crate::tracker::{DirtyTracker, TrackError};

/// What the suite needs from a backend's test setup.
pub trait Harness {
    /// The backend under test.
    type Backend: Stage2Backend;

    /// Guest RAM for the checks: at least one region of at least four 2 MiB blocks. The suite
    /// uses the first region, and the second (if any) for the per-region protect check.
    fn regions(&self) -> Vec<GpaRange>;

    /// A fresh backend whose guest RAM is `regions`, every byte writable and untracked.
    fn backend(&mut self, regions: &[GpaRange]) -> Self::Backend;

    /// Write `len` bytes at `gpa` the way a vCPU does: every tracking fault the write takes is
    /// delivered to `tracker.on_write_fault` and the write retried until it lands. Returns how
    /// many tracking faults it took (0 for kernel-logged backends).
    ///
    /// # Errors
    /// A description of what went wrong in the harness.
    fn guest_write(
        &mut self,
        tracker: &DirtyTracker<Self::Backend>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, String>;
}

fn tracker<H: Harness>(h: &mut H, policy: Policy) -> (DirtyTracker<H::Backend>, Vec<GpaRange>) {
    let regions = h.regions();
    assert!(!regions.is_empty(), "harness gave no RAM");
    let backend = h.backend(&regions);
    let t = DirtyTracker::new(backend, &regions, TrackingConfig::new(policy))
        .unwrap_or_else(|e| panic!("tracker over {regions:?}: {e}"));
    t.start().unwrap_or_else(|e| panic!("start: {e}"));
    (t, regions)
}

fn diff<B: Stage2Backend>(t: &DirtyTracker<B>) -> Vec<GpaRange> {
    let mut out = Vec::new();
    t.checkpoint(None, |r| -> Result<(), std::io::Error> {
        out.extend_from_slice(r);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("checkpoint: {e}"));
    out
}

fn write<H: Harness>(h: &mut H, t: &DirtyTracker<H::Backend>, gpa: u64, len: u64) -> u64 {
    h.guest_write(t, gpa, len)
        .unwrap_or_else(|e| panic!("guest write of {len} bytes at {gpa:#x}: {e}"))
}

fn faulting<B: Stage2Backend>(t: &DirtyTracker<B>) -> bool {
    t.backend().mechanism() == TrackingMechanism::Faulting
}

/// The first write to a protected unit faults once; the diff holds exactly that unit.
pub fn check_first_write_faults_once<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let unit = t.geometry().tracking_hot;
    let gpa = regions[0].start() + 3 * unit + 8;
    let faults = write(h, &t, gpa, 8);
    if faulting(&t) {
        assert_eq!(
            faults, 1,
            "the first write to a protected unit must fault exactly once"
        );
        assert_eq!(t.counters().faults, 1);
    }
    let d = diff(&t);
    let expected = GpaRange::new(regions[0].start() + 3 * unit, unit).unwrap();
    assert_eq!(d, vec![expected], "the diff must hold exactly the written unit");
}

/// A re-granted unit takes no more faults in the same epoch, and its diff still holds it once.
pub fn check_regranted_unit_stops_faulting<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let gpa = regions[0].start() + 5 * t.geometry().tracking_hot;
    write(h, &t, gpa, 8);
    let again = write(h, &t, gpa + 64, 8);
    assert_eq!(
        again, 0,
        "a re-granted unit must not fault again within the epoch"
    );
    assert_eq!(diff(&t).len(), 1);
}

/// After a checkpoint the unit is protected again: the next write faults and is in the next diff;
/// a checkpoint with no writes gives an empty diff.
pub fn check_faults_again_after_checkpoint<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let unit = t.geometry().tracking_hot;
    let gpa = regions[0].start() + 7 * unit;
    write(h, &t, gpa, 8);
    assert_eq!(diff(&t).len(), 1);
    assert!(
        diff(&t).is_empty(),
        "a checkpoint with no writes must give an empty diff"
    );
    let faults = write(h, &t, gpa, 8);
    if faulting(&t) {
        assert_eq!(faults, 1, "after a checkpoint the unit must fault again");
    }
    assert_eq!(diff(&t), vec![GpaRange::new(gpa, unit).unwrap()]);
}

/// A write spanning two units faults on each (faulting backends) and the diff holds both.
pub fn check_spanning_write_faults_per_unit<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let unit = t.geometry().tracking_hot;
    let gpa = regions[0].start() + 10 * unit - 4;
    let faults = write(h, &t, gpa, 8);
    if faulting(&t) {
        assert_eq!(
            faults, 2,
            "a write spanning two protected units must fault on each"
        );
    }
    assert_eq!(diff(&t), vec![GpaRange::new(gpa + 4 - unit, 2 * unit).unwrap()]);
}

/// Under `coarse`, one fault grants the whole block: other writes in it do not fault, and the
/// diff is the block (kernel-logged backends: exactly the written units, which cost no fault).
pub fn check_coarse_grants_the_whole_block<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Coarse);
    let block = t.geometry().tracking_default;
    let base = regions[0].start().next_multiple_of(block) + block;
    let first = write(h, &t, base + 100, 8);
    let second = write(h, &t, base + block - 64, 8);
    let d = diff(&t);
    if faulting(&t) {
        assert_eq!((first, second), (1, 0), "one fault must grant the whole block");
        assert_eq!(d, vec![GpaRange::new(base, block).unwrap()]);
    } else {
        // Kernel-logged pages cost no fault, so they are kept exact whatever the policy.
        let unit = t.geometry().tracking_hot;
        let expected = [base, base + block - unit].map(|s| GpaRange::new(s, unit).unwrap());
        assert_eq!(d, expected.to_vec());
    }
}

/// Faults outside tracked RAM, and reads, are refused, not marked.
pub fn check_refuses_faults_outside_ram<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let last = regions.iter().map(GpaRange::end).max().unwrap();
    let outside = GuestFault {
        gpa: last + 0x1000,
        write: true,
        vcpu: 0,
    };
    assert!(matches!(
        t.on_write_fault(outside),
        Err(TrackError::OutsideTrackedRam { .. })
    ));
    let read = GuestFault {
        gpa: regions[0].start(),
        write: false,
        vcpu: 0,
    };
    assert!(matches!(
        t.on_write_fault(read),
        Err(TrackError::NotAWrite { .. })
    ));
    assert!(diff(&t).is_empty());
    assert_eq!(t.counters().faults, 0);
}

/// Re-protecting costs one call per region with dirty units, not one per unit.
pub fn check_reprotect_is_per_region<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let unit = t.geometry().tracking_hot;
    let before = t.counters().protect_calls;
    for i in 0..16 {
        write(h, &t, regions[0].start() + i * 3 * unit, 8);
    }
    if let Some(second) = regions.get(1) {
        write(h, &t, second.start(), 8);
    }
    let d = diff(&t);
    assert_eq!(d.len(), 16 + usize::from(regions.len() > 1));
    let dirty_regions = if regions.len() > 1 { 2 } else { 1 };
    assert_eq!(
        t.counters().protect_calls - before,
        dirty_regions,
        "a checkpoint must re-protect with one call per dirty region"
    );
}

/// Every written unit reaches the diff, whether the backend faults or logs (harvest).
pub fn check_every_write_reaches_the_diff<H: Harness>(h: &mut H) {
    let (t, regions) = tracker(h, Policy::Fine);
    let unit = t.geometry().tracking_hot;
    let mut expected = Vec::new();
    for r in &regions {
        let units = r.len() / unit;
        for i in [0, 1, units / 2, units - 1] {
            let gpa = r.start() + i * unit;
            write(h, &t, gpa + unit / 2, 1);
            expected.push(gpa);
        }
    }
    expected.sort_unstable();
    expected.dedup();
    let d = diff(&t);
    let covered: Vec<u64> = d
        .iter()
        .flat_map(|r| (r.start()..r.end()).step_by(usize::try_from(unit).unwrap()))
        .collect();
    assert_eq!(
        covered, expected,
        "the diff must hold every written unit and nothing else"
    );
}

/// Run every check.
pub fn run_all<H: Harness>(h: &mut H) {
    check_first_write_faults_once(h);
    check_regranted_unit_stops_faulting(h);
    check_faults_again_after_checkpoint(h);
    check_spanning_write_faults_per_unit(h);
    check_coarse_grants_the_whole_block(h);
    check_refuses_faults_outside_ram(h);
    check_reprotect_is_per_region(h);
    check_every_write_reaches_the_diff(h);
}
