//! The backend conformance suite, and the live-checkpoint guarantees, on the soft stage-2.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use squib_arch::{GpaRange, PageGeometry};
use squib_kvm_sim::soft::{GuestMem, SoftStage2, SoftVcpu, SoftVm};
use squib_snapshot::conformance::{Harness, run_all};
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
use vm_memory::{Bytes, GuestAddress};

struct SoftHarness {
    geometry: PageGeometry,
    vcpu: Option<SoftVcpu>,
}

fn memory(regions: &[GpaRange]) -> Arc<GuestMem> {
    let ranges: Vec<_> = regions
        .iter()
        .map(|r| (GuestAddress(r.start()), usize::try_from(r.len()).unwrap()))
        .collect();
    Arc::new(GuestMem::from_ranges(&ranges).unwrap())
}

impl Harness for SoftHarness {
    type Backend = Arc<SoftStage2>;

    fn regions(&self) -> Vec<GpaRange> {
        vec![
            GpaRange::new(0x8000_0000, 16 << 20).unwrap(),
            GpaRange::new(0x1_0000_0000, 8 << 20).unwrap(),
        ]
    }

    fn backend(&mut self, regions: &[GpaRange]) -> Arc<SoftStage2> {
        let vm = SoftVm::new(self.geometry, memory(regions), 1).unwrap();
        self.vcpu = Some(vm.vcpu(0).unwrap());
        Arc::clone(vm.mmu())
    }

    fn guest_write(
        &mut self,
        tracker: &DirtyTracker<Arc<SoftStage2>>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, String> {
        let data = vec![0xA5; usize::try_from(len).unwrap()];
        self.vcpu
            .as_ref()
            .expect("backend first")
            .write(tracker, gpa, &data)
            .map_err(|e| e.to_string())
    }
}

#[test]
fn test_should_pass_the_conformance_suite_with_apple_silicon_geometry() {
    run_all(&mut SoftHarness {
        geometry: PageGeometry::APPLE_SILICON,
        vcpu: None,
    });
}

#[test]
fn test_should_pass_the_conformance_suite_with_x86_64_geometry() {
    run_all(&mut SoftHarness {
        geometry: PageGeometry::X86_64,
        vcpu: None,
    });
}

#[test]
fn test_should_land_a_denied_write_only_after_the_regrant() {
    let ram = GpaRange::new(0x8000_0000, 4 << 20).unwrap();
    let vm = SoftVm::new(PageGeometry::APPLE_SILICON, memory(&[ram]), 1).unwrap();
    let vcpu = vm.vcpu(0).unwrap();
    let tracker = DirtyTracker::new(Arc::clone(vm.mmu()), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    let exit = vcpu.try_store(0x8000_0010, &[7; 8]).unwrap_err();
    assert!(exit.esr.is_stage2_write_permission_fault());
    assert_eq!(exit.ipa, 0x8000_0010);
    let mut byte = [0u8; 1];
    vm.memory()
        .read_slice(&mut byte, GuestAddress(0x8000_0010))
        .unwrap();
    assert_eq!(byte, [0], "a denied store must not reach memory");
    assert_eq!(vcpu.write(&tracker, 0x8000_0010, &[7; 8]).unwrap(), 1);
    vm.memory()
        .read_slice(&mut byte, GuestAddress(0x8000_0010))
        .unwrap();
    assert_eq!(byte, [7]);
}

#[test]
fn test_should_not_mark_guest_writes_in_the_vmm_bitmap() {
    let ram = GpaRange::new(0x8000_0000, 4 << 20).unwrap();
    let vm = SoftVm::new(PageGeometry::APPLE_SILICON, memory(&[ram]), 1).unwrap();
    let vcpu = vm.vcpu(0).unwrap();
    let tracker = DirtyTracker::new(Arc::clone(vm.mmu()), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    vcpu.write(&tracker, 0x8000_8000, &[1; 64]).unwrap();
    // Stop tracking: the write is only in the tracker's map, never in vm-memory's VMM bitmap.
    let mut ranges = Vec::new();
    tracker
        .checkpoint(None, |r| -> Result<(), std::io::Error> {
            ranges.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
    assert_eq!(ranges, vec![GpaRange::new(0x8000_8000, 0x4000).unwrap()]);
    use vm_memory::GuestMemoryBackend;
    for region in vm.memory().iter() {
        let bitmap: &vm_memory::bitmap::AtomicBitmap = (**region).bitmap();
        let dirty = bitmap.get_and_reset();
        assert!(
            dirty.iter().all(|w| *w == 0),
            "guest writes leaked into the VMM bitmap"
        );
    }
}

/// Shadow-copy check: while vCPUs write without pause, live checkpoints copy their dirty ranges
/// into a shadow image; after the vCPUs stop and a final checkpoint, the shadow must equal guest
/// memory byte for byte. A write lost by the backend or the tracker makes them differ.
fn live_checkpoints_lose_nothing(policy: Policy) {
    let ram = GpaRange::new(0x8000_0000, 8 << 20).unwrap();
    let vm = SoftVm::new(PageGeometry::APPLE_SILICON, memory(&[ram]), 2).unwrap();
    let tracker = DirtyTracker::new(Arc::clone(vm.mmu()), &[ram], TrackingConfig::new(policy)).unwrap();
    tracker.start().unwrap();
    let mut shadow = vec![0u8; usize::try_from(ram.len()).unwrap()];
    let stop = AtomicBool::new(false);
    let vcpus = [vm.vcpu(0).unwrap(), vm.vcpu(1).unwrap()];
    let copy = |shadow: &mut Vec<u8>, ranges: &[GpaRange]| -> Result<(), std::io::Error> {
        for r in ranges {
            let off = usize::try_from(r.start() - ram.start()).unwrap();
            let len = usize::try_from(r.len()).unwrap();
            vm.memory()
                .read_slice(&mut shadow[off..off + len], GuestAddress(r.start()))
                .unwrap();
        }
        Ok(())
    };
    std::thread::scope(|s| {
        for vcpu in &vcpus {
            let (tracker, stop) = (&tracker, &stop);
            s.spawn(move || {
                let mut x: u64 = 0x9E37_79B9 ^ u64::from(vcpu.id());
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) || n < 2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Mostly the first two blocks (dense), sometimes anywhere (sparse).
                    let span = if n.is_multiple_of(4) { 8 << 20 } else { 4 << 20 };
                    let off = (x % (span - 16)) & !7;
                    n += 1;
                    vcpu.write(tracker, ram.start() + off, &n.to_le_bytes()).unwrap();
                }
            });
        }
        // Live checkpoints until 20 of them raced writes (a generous deadline fails instead).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut raced = 0;
        while raced < 20 {
            if std::time::Instant::now() >= deadline {
                stop.store(true, Ordering::Relaxed);
                panic!("{policy}: only {raced} live checkpoints held writes within 60 s");
            }
            let stats = tracker
                .checkpoint(Some(vm.memory()), |r| copy(&mut shadow, r))
                .unwrap();
            if stats.dirty_bytes > 0 {
                raced += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    tracker
        .checkpoint(Some(vm.memory()), |r| copy(&mut shadow, r))
        .unwrap();
    let mut actual = vec![0u8; shadow.len()];
    vm.memory()
        .read_slice(&mut actual, GuestAddress(ram.start()))
        .unwrap();
    let first_diff = shadow.iter().zip(&actual).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "{policy}: a write never reached a diff");
    assert!(tracker.counters().faults > 0);
}

#[test]
fn test_should_lose_no_write_under_live_checkpoints_fine() {
    live_checkpoints_lose_nothing(Policy::Fine);
}

#[test]
fn test_should_lose_no_write_under_live_checkpoints_adaptive() {
    live_checkpoints_lose_nothing(Policy::Adaptive);
}

#[test]
fn test_should_lose_no_write_under_live_checkpoints_coarse_and_region() {
    live_checkpoints_lose_nothing(Policy::Coarse);
    live_checkpoints_lose_nothing(Policy::Region);
}
