//! A template squib backend: a `Stage2Backend` over plain host memory.
//!
//! Copy this crate to start a backend for another hypervisor. It has the three parts every
//! backend has, each marked `STEP`:
//!
//! 1. permissions: `write_protect` and `grant_write` change what the "hardware" allows (here a
//!    permission word per granule page; in a real backend, a hypervisor call);
//! 2. exits: a write the permissions deny becomes a [`GuestFault`] handed to
//!    [`DirtyTracker::on_write_fault`], and the write is retried (here in [`TemplateBackend::guest_write`];
//!    in a real backend, the vCPU run loop);
//! 3. the conformance kit: `tests/conformance.rs` implements
//!    `squib_snapshot::conformance::Harness` (feature `test-kit`) and calls `run_all`.
//!
//! ```
//! use squib_arch::{GpaRange, PageGeometry};
//! use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
//! use squib_template_backend::TemplateBackend;
//! use std::sync::Arc;
//!
//! let ram = GpaRange::new(0x4000_0000, 4 << 20).unwrap();
//! let backend = Arc::new(TemplateBackend::new(PageGeometry::X86_64, ram));
//! let tracker = DirtyTracker::new(Arc::clone(&backend), &[ram], TrackingConfig::new(Policy::Fine)).unwrap();
//! tracker.start().unwrap();
//! // The guest writes 3 bytes: one fault, then the write lands.
//! assert_eq!(backend.guest_write(&tracker, 0x4000_1000, b"abc").unwrap(), 1);
//! assert_eq!(backend.read(0x4000_1000, 3), b"abc");
//! let mut diff = Vec::new();
//! tracker.checkpoint(None, |r| -> Result<(), std::io::Error> { diff.extend_from_slice(r); Ok(()) }).unwrap();
//! assert_eq!(diff, vec![GpaRange::new(0x4000_1000, 0x1000).unwrap()]);
//! ```

#![deny(missing_docs)]

/// The backend author's guide (`docs/backend-guide.md`), included here so its code blocks run
/// as doctests of this crate.
#[doc = include_str!("../../../docs/backend-guide.md")]
pub mod guide {}

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, DirtyTracker, GuestFault, Stage2Backend, TrackError};

/// A backend whose "stage-2" is a writable flag per granule page over host memory.
#[derive(Debug)]
pub struct TemplateBackend {
    geometry: PageGeometry,
    ram: GpaRange,
    writable: Box<[AtomicBool]>,
    memory: Mutex<Vec<u8>>,
}

impl TemplateBackend {
    /// A backend with `ram` bytes of zeroed guest memory, all writable.
    ///
    /// # Panics
    /// If `ram` is not granule-aligned or does not fit in host memory.
    #[must_use]
    pub fn new(geometry: PageGeometry, ram: GpaRange) -> Self {
        assert!(
            ram.is_aligned(geometry.granule),
            "RAM {ram} must be granule-aligned"
        );
        let pages = ram.len() / geometry.granule;
        Self {
            geometry,
            ram,
            writable: (0..pages).map(|_| AtomicBool::new(true)).collect(),
            memory: Mutex::new(vec![
                0;
                usize::try_from(ram.len()).expect("RAM fits in host memory")
            ]),
        }
    }

    fn page_index(&self, gpa: u64) -> usize {
        // In range: callers check `self.ram.contains(gpa)`; the page count fits (it was allocated).
        usize::try_from((gpa - self.ram.start()) / self.geometry.granule).unwrap_or(usize::MAX)
    }

    /// STEP 1: the permission change every backend implements. A real backend calls its
    /// hypervisor here (`hv_vm_protect`, `UFFDIO_WRITEPROTECT`, a page-table walk, ...).
    fn set_writable(&self, range: GpaRange, writable: bool) -> Result<(), BackendError> {
        if !range.is_aligned(self.geometry.granule) {
            return Err(BackendError::Misaligned {
                range,
                granule: self.geometry.granule,
            });
        }
        if !self.ram.contains_range(&range) {
            return Err(BackendError::NotGuestMemory { range });
        }
        let first = self.page_index(range.start());
        let count = usize::try_from(range.len() / self.geometry.granule).unwrap_or(0);
        for flag in &self.writable[first..first + count] {
            flag.store(writable, Ordering::Release);
        }
        Ok(())
    }

    /// STEP 2: a guest write as a vCPU makes it. Each granule page the write touches is checked;
    /// a denied page exits to the tracker as a [`GuestFault`], and the write is retried once the
    /// tracker has re-granted. Returns how many faults the write took.
    ///
    /// # Errors
    /// [`TrackError`] if the write is outside guest RAM or the tracker refuses the fault.
    pub fn guest_write<B: Stage2Backend>(
        &self,
        tracker: &DirtyTracker<B>,
        gpa: u64,
        data: &[u8],
    ) -> Result<u64, TrackError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let end = gpa
            .checked_add(len)
            .filter(|&e| e <= self.ram.end() && gpa >= self.ram.start());
        let Some(end) = end else {
            return Err(TrackError::OutsideTrackedRam { gpa, vcpu: 0 });
        };
        let g = self.geometry.granule;
        let mut faults = 0;
        let mut page = gpa & !(g - 1);
        while page < end {
            while !self.writable[self.page_index(page)].load(Ordering::Acquire) {
                faults += 1;
                tracker.on_write_fault(GuestFault {
                    gpa: page.max(gpa),
                    write: true,
                    vcpu: 0,
                })?;
            }
            page += g;
        }
        let off = usize::try_from(gpa - self.ram.start()).unwrap_or(usize::MAX);
        self.memory.lock()[off..off + data.len()].copy_from_slice(data);
        Ok(faults)
    }

    /// Read `len` bytes of guest memory at `gpa` (what a snapshot writer copies).
    ///
    /// # Panics
    /// If the range is outside guest RAM.
    #[must_use]
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let off = usize::try_from(gpa - self.ram.start()).expect("in RAM");
        self.memory.lock()[off..off + len].to_vec()
    }
}

impl Stage2Backend for TemplateBackend {
    fn geometry(&self) -> PageGeometry {
        self.geometry
    }

    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.set_writable(range, false)
    }

    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.set_writable(range, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_refuse_misaligned_and_foreign_ranges() {
        let ram = GpaRange::new(0, 4 << 20).unwrap();
        let b = TemplateBackend::new(PageGeometry::APPLE_SILICON, ram);
        let err = b
            .write_protect(GpaRange::new(0x1000, 0x4000).unwrap())
            .unwrap_err();
        assert!(matches!(err, BackendError::Misaligned { .. }), "{err}");
        let err = b
            .grant_write(GpaRange::new(4 << 20, 0x4000).unwrap())
            .unwrap_err();
        assert!(matches!(err, BackendError::NotGuestMemory { .. }), "{err}");
    }
}
