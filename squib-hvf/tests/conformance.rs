//! The generic conformance suite against `HvfBackend` over the recording stand-in, with guest
//! writes made by a simulated vCPU through the real exit-handling code and vCPU loop.

use std::sync::Arc;

use squib_arch::GpaRange;
use squib_arch::esr::ec;
use squib_hvf::stand_in::{SimOp, SimVcpu, StandIn};
use squib_hvf::{HvfBackend, VmmExit, run_until_vmm_exit};
use squib_snapshot::DirtyTracker;
use squib_snapshot::conformance::{Harness, run_all};

struct HvfHarness {
    current: Option<Arc<StandIn>>,
    code: u64,
    writes: u64,
}

impl HvfHarness {
    fn new() -> Self {
        Self {
            current: None,
            code: 0,
            writes: 0,
        }
    }
}

fn pattern(gpa: u64, len: u64) -> Vec<u8> {
    (gpa..gpa + len).map(|a| (a % 251) as u8 ^ 0x5A).collect()
}

impl Harness for HvfHarness {
    type Backend = HvfBackend<Arc<StandIn>>;

    fn regions(&self) -> Vec<GpaRange> {
        vec![
            GpaRange::new(0x4000_0000, 16 << 20).unwrap(),
            GpaRange::new(0x1_0000_0000, 8 << 20).unwrap(),
        ]
    }

    fn backend(&mut self, regions: &[GpaRange]) -> Self::Backend {
        if let Some(prev) = &self.current {
            assert!(prev.violations().is_empty(), "{:?}", prev.violations());
        }
        let hv = Arc::new(StandIn::new(regions));
        // The guest's code sits in tracked RAM, so write-protecting RAM must keep it executable.
        self.code = regions[0].start() + (12 << 20);
        self.current = Some(Arc::clone(&hv));
        HvfBackend::new(hv, regions).unwrap()
    }

    fn guest_write(
        &mut self,
        tracker: &DirtyTracker<Self::Backend>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, String> {
        let hv = self.current.as_ref().ok_or("no backend yet")?;
        let data = pattern(gpa, len);
        let mut cpu = SimVcpu::new(
            hv,
            self.code,
            vec![
                SimOp::Store {
                    gpa,
                    data: data.clone(),
                },
                SimOp::Hvc,
            ],
        );
        let out = run_until_vmm_exit(&mut cpu, 0, tracker).map_err(|e| e.to_string())?;
        match out.exit {
            VmmExit::Exception { esr, .. } if esr.ec() == ec::HVC64 => {}
            other => return Err(format!("the guest stopped with {other:?} instead of its hvc")),
        }
        let mut landed = vec![0; data.len()];
        hv.read(gpa, &mut landed);
        if landed != data {
            return Err(format!("the store at {gpa:#x} did not land"));
        }
        let v = hv.violations();
        if !v.is_empty() {
            return Err(format!(
                "the backend made calls the framework must never get: {v:?}"
            ));
        }
        self.writes += 1;
        Ok(out.tracking_faults)
    }
}

#[test]
fn test_should_pass_conformance_over_the_stand_in() {
    let mut h = HvfHarness::new();
    run_all(&mut h);
    let hv = h.current.as_ref().unwrap();
    assert!(hv.violations().is_empty(), "{:?}", hv.violations());
    assert!(h.writes > 0);
    let calls = hv.calls();
    assert!(calls.iter().any(|c| c.flags == 0b101) && calls.iter().any(|c| c.flags == 0b111));
    assert!(
        calls
            .iter()
            .all(|c| c.ipa % 0x4000 == 0 && c.size % 0x4000 == 0 && (c.flags == 0b101 || c.flags == 0b111)),
        "{calls:?}"
    );
}
