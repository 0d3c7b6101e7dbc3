//! Test fixtures for the core's own tests. The recorder is a stand-in, not a product backend: it
//! keeps one writable flag per granule page and records every call, so the core can be tested
//! before (and independently of) the real backends.

#![allow(dead_code, missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::conformance::Harness;
use squib_snapshot::{BackendError, DirtyTracker, GuestFault, Stage2Backend, TrackingMechanism};

/// A backend that records calls and models write permission per granule page.
#[derive(Debug)]
pub struct Recorder {
    pub geometry: PageGeometry,
    pub regions: Vec<GpaRange>,
    writable: Vec<Box<[AtomicBool]>>,
    pub protect_calls: AtomicU64,
    pub grant_calls: AtomicU64,
    pub calls: Mutex<Vec<(&'static str, GpaRange)>>,
    /// When set, the next write_protect fails.
    pub fail_protect: AtomicBool,
    /// Ranges to report from harvest (kernel-logged mode).
    pub logged: Mutex<BTreeSet<u64>>,
    pub kernel_logged: bool,
}

impl Recorder {
    pub fn new(geometry: PageGeometry, regions: &[GpaRange]) -> Self {
        Self {
            geometry,
            regions: regions.to_vec(),
            writable: regions
                .iter()
                .map(|r| {
                    (0..r.len() / geometry.granule)
                        .map(|_| AtomicBool::new(true))
                        .collect()
                })
                .collect(),
            protect_calls: AtomicU64::new(0),
            grant_calls: AtomicU64::new(0),
            calls: Mutex::new(Vec::new()),
            fail_protect: AtomicBool::new(false),
            logged: Mutex::new(BTreeSet::new()),
            kernel_logged: false,
        }
    }

    fn pages(&self, range: GpaRange) -> Result<(usize, std::ops::Range<u64>), BackendError> {
        if !range.is_aligned(self.geometry.granule) {
            return Err(BackendError::Misaligned {
                range,
                granule: self.geometry.granule,
            });
        }
        let (i, r) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains_range(&range))
            .ok_or(BackendError::NotGuestMemory { range })?;
        let first = (range.start() - r.start()) / self.geometry.granule;
        Ok((i, first..first + range.len() / self.geometry.granule))
    }

    fn set(&self, range: GpaRange, w: bool) -> Result<(), BackendError> {
        let (i, pages) = self.pages(range)?;
        for p in pages {
            self.writable[i][usize::try_from(p).unwrap()].store(w, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Whether the granule page holding `gpa` is writable.
    pub fn is_writable(&self, gpa: u64) -> Option<bool> {
        let (i, r) = self.regions.iter().enumerate().find(|(_, r)| r.contains(gpa))?;
        let p = usize::try_from((gpa - r.start()) / self.geometry.granule).unwrap();
        Some(self.writable[i][p].load(Ordering::SeqCst))
    }

    /// A guest write as a vCPU makes it: fault on each protected page, deliver, retry.
    pub fn guest_write<B: Stage2Backend>(
        &self,
        tracker: &DirtyTracker<B>,
        gpa: u64,
        len: u64,
        vcpu: u32,
    ) -> Result<u64, String> {
        let g = self.geometry.granule;
        let mut faults = 0;
        let mut page = gpa & !(g - 1);
        while page < gpa + len {
            loop {
                match self.is_writable(page) {
                    None => return Err(format!("{page:#x} is not RAM")),
                    Some(true) => break,
                    Some(false) if self.kernel_logged => break,
                    Some(false) => {
                        faults += 1;
                        tracker
                            .on_write_fault(GuestFault {
                                gpa: page.max(gpa),
                                write: true,
                                vcpu,
                            })
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            if self.kernel_logged {
                self.logged.lock().insert(page);
            }
            page += g;
        }
        Ok(faults)
    }
}

impl Stage2Backend for Recorder {
    fn geometry(&self) -> PageGeometry {
        self.geometry
    }

    fn mechanism(&self) -> TrackingMechanism {
        if self.kernel_logged {
            TrackingMechanism::KernelLogged
        } else {
            TrackingMechanism::Faulting
        }
    }

    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.protect_calls.fetch_add(1, Ordering::SeqCst);
        self.calls.lock().push(("write_protect", range));
        if self.fail_protect.swap(false, Ordering::SeqCst) {
            return Err(BackendError::Hypervisor {
                op: "write_protect",
                range,
                reason: "injected".into(),
            });
        }
        self.set(range, false)
    }

    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.grant_calls.fetch_add(1, Ordering::SeqCst);
        self.set(range, true)
    }

    fn harvest(&self, sink: &mut dyn FnMut(GpaRange)) -> Result<(), BackendError> {
        let pages = std::mem::take(&mut *self.logged.lock());
        for p in pages {
            sink(GpaRange::new(p, self.geometry.granule).unwrap());
        }
        Ok(())
    }
}

/// Conformance harness over the recorder.
pub struct RecorderHarness {
    pub geometry: PageGeometry,
    pub regions: Vec<GpaRange>,
    pub kernel_logged: bool,
    current: Option<Arc<Recorder>>,
}

impl RecorderHarness {
    pub fn new(geometry: PageGeometry, kernel_logged: bool) -> Self {
        Self {
            geometry,
            regions: vec![
                GpaRange::new(0x8000_0000, 16 << 20).unwrap(),
                GpaRange::new(0x1_0000_0000, 8 << 20).unwrap(),
            ],
            kernel_logged,
            current: None,
        }
    }
}

impl Harness for RecorderHarness {
    type Backend = Arc<Recorder>;

    fn regions(&self) -> Vec<GpaRange> {
        self.regions.clone()
    }

    fn backend(&mut self, regions: &[GpaRange]) -> Arc<Recorder> {
        let mut r = Recorder::new(self.geometry, regions);
        r.kernel_logged = self.kernel_logged;
        let r = Arc::new(r);
        self.current = Some(Arc::clone(&r));
        r
    }

    fn guest_write(
        &mut self,
        tracker: &DirtyTracker<Arc<Recorder>>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, String> {
        self.current
            .as_ref()
            .expect("backend first")
            .guest_write(tracker, gpa, len, 0)
    }
}
