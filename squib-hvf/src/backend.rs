//! [`HvfBackend`]: squib's stage-2 seam over Hypervisor.framework.
//!
//! Tracking on Apple Silicon is fault-driven: a write-protected page is mapped READ|EXEC, a guest
//! store to it exits as a stage-2 permission data abort, and the core re-grants READ|WRITE|EXEC.
//! The backend is deliberately thin: it checks each range against the 16 KiB granule and the
//! guest RAM it was given (a misaligned range is the caller's bug and an error, never rounded),
//! and makes exactly one `hv_vm_protect` call per request, so one request costs one TLB
//! invalidation as the [`Stage2Backend`] contract says.

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend};

use crate::hv::{Framework, GRANULE, Hv, PROTECTED, WRITABLE};

/// Guest RAM the backend cannot track.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RamError {
    /// No RAM region was given.
    #[error("the HVF backend needs at least one guest RAM region")]
    NoRam,
    /// A region does not start and end on a 16 KiB granule boundary.
    #[error("guest RAM region {range} is not aligned to the {GRANULE:#x}-byte stage-2 granule")]
    Misaligned {
        /// The region.
        range: GpaRange,
    },
    /// Two regions overlap.
    #[error("guest RAM regions {first} and {second} overlap")]
    Overlap {
        /// One region.
        first: GpaRange,
        /// The other.
        second: GpaRange,
    },
}

/// The Hypervisor.framework [`Stage2Backend`], over the calls of `H` ([`Framework`] in
/// production, the recording stand-in in tests).
///
/// ```
/// use squib_arch::GpaRange;
/// use squib_hvf::HvfBackend;
/// use squib_hvf::stand_in::StandIn;
/// use squib_snapshot::Stage2Backend;
/// use std::sync::Arc;
///
/// let ram = [GpaRange::new(0x4000_0000, 4 << 20).unwrap()];
/// let hv = Arc::new(StandIn::new(&ram));
/// let backend = HvfBackend::new(Arc::clone(&hv), &ram).unwrap();
/// backend.write_protect(ram[0]).unwrap();
/// assert_eq!(hv.calls()[0].flags, 0b101); // HV_MEMORY_READ | HV_MEMORY_EXEC
/// assert!(backend.grant_write(GpaRange::new(0x4000_0000, 0x1000).unwrap()).is_err());
/// ```
#[derive(Debug)]
pub struct HvfBackend<H = Framework> {
    hv: H,
    ram: Vec<GpaRange>,
}

impl<H: Hv> HvfBackend<H> {
    /// A backend over `hv` for guest RAM `ram` (each region mapped, granule-aligned).
    ///
    /// # Errors
    /// [`RamError`] when `ram` is empty, misaligned or overlapping.
    pub fn new(hv: H, ram: &[GpaRange]) -> Result<Self, RamError> {
        if ram.is_empty() {
            return Err(RamError::NoRam);
        }
        let mut sorted = ram.to_vec();
        sorted.sort_unstable();
        for r in &sorted {
            if !r.is_aligned(GRANULE) {
                return Err(RamError::Misaligned { range: *r });
            }
        }
        for pair in sorted.windows(2) {
            if pair[0].overlaps(&pair[1]) {
                return Err(RamError::Overlap {
                    first: pair[0],
                    second: pair[1],
                });
            }
        }
        Ok(Self { hv, ram: sorted })
    }

    /// The hypervisor calls this backend makes.
    pub fn hv(&self) -> &H {
        &self.hv
    }

    /// The guest RAM it tracks, sorted.
    #[must_use]
    pub fn ram(&self) -> &[GpaRange] {
        &self.ram
    }

    /// Check `range`, then set its permissions to `flags` in one call.
    fn protect(&self, op: &'static str, range: GpaRange, flags: u64) -> Result<(), BackendError> {
        if !range.is_aligned(GRANULE) {
            return Err(BackendError::Misaligned {
                range,
                granule: GRANULE,
            });
        }
        if !self.ram.iter().any(|r| r.contains_range(&range)) {
            return Err(BackendError::NotGuestMemory { range });
        }
        let size = usize::try_from(range.len()).map_err(|_| BackendError::NotGuestMemory { range })?;
        self.hv
            .protect(range.start(), size, flags)
            .map_err(|e| BackendError::Hypervisor {
                op,
                range,
                reason: e.to_string(),
            })
    }
}

impl<H: Hv> Stage2Backend for HvfBackend<H> {
    fn geometry(&self) -> PageGeometry {
        PageGeometry::APPLE_SILICON
    }

    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.protect("write_protect", range, PROTECTED)
    }

    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.protect("grant_write", range, WRITABLE)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hv::HvError;
    use crate::stand_in::{HvCall, StandIn};

    fn ram() -> Vec<GpaRange> {
        vec![
            GpaRange::new(0x4000_0000, 4 << 20).unwrap(),
            GpaRange::new(0x8000_0000, 2 << 20).unwrap(),
        ]
    }

    fn backend() -> (HvfBackend<Arc<StandIn>>, Arc<StandIn>) {
        let hv = Arc::new(StandIn::new(&ram()));
        (HvfBackend::new(Arc::clone(&hv), &ram()).unwrap(), hv)
    }

    #[test]
    fn test_should_protect_with_read_exec_and_grant_with_read_write_exec() {
        let (b, hv) = backend();
        let r = GpaRange::new(0x4000_8000, 0x8000).unwrap();
        b.write_protect(r).unwrap();
        b.grant_write(GpaRange::new(0x4000_8000, 0x4000).unwrap())
            .unwrap();
        assert_eq!(
            hv.calls(),
            vec![
                HvCall {
                    ipa: 0x4000_8000,
                    size: 0x8000,
                    flags: 0b101
                },
                HvCall {
                    ipa: 0x4000_8000,
                    size: 0x4000,
                    flags: 0b111
                },
            ]
        );
        assert_eq!(hv.flags_at(0x4000_8000), Some(0b111));
        assert_eq!(hv.flags_at(0x4000_C000), Some(0b101));
        assert!(hv.violations().is_empty(), "{:?}", hv.violations());
    }

    #[test]
    fn test_should_refuse_a_misaligned_range_without_calling_the_framework() {
        let (b, hv) = backend();
        for (start, len) in [
            (0x4000_1000, 0x4000),
            (0x4000_0000, 0x1000),
            (0x4000_4000, 0x6000),
        ] {
            let r = GpaRange::new(start, len).unwrap();
            match b.write_protect(r) {
                Err(BackendError::Misaligned { range, granule }) => {
                    assert_eq!((range, granule), (r, 0x4000));
                }
                other => panic!("{r}: expected Misaligned, got {other:?}"),
            }
            assert!(matches!(b.grant_write(r), Err(BackendError::Misaligned { .. })));
        }
        assert!(hv.calls().is_empty(), "a misaligned range reached the framework");
    }

    #[test]
    fn test_should_refuse_ranges_outside_guest_ram() {
        let (b, hv) = backend();
        let outside = [
            GpaRange::new(0x3FFF_C000, 0x8000).unwrap(), // straddles the first region's start
            GpaRange::new(0x4040_0000, 0x4000).unwrap(), // just past the first region
            GpaRange::new(0x4000_0000, 0x4000_4000).unwrap(), // spans the hole between regions
        ];
        for r in outside {
            assert!(
                matches!(b.write_protect(r), Err(BackendError::NotGuestMemory { range }) if range == r),
                "{r}"
            );
        }
        assert!(hv.calls().is_empty());
    }

    #[test]
    fn test_should_report_a_framework_failure_with_the_range_and_status() {
        let (b, hv) = backend();
        hv.fail_next(HvError::status("hv_vm_protect", 0xfae9_4005_u32.cast_signed()));
        let r = GpaRange::new(0x8000_0000, 2 << 20).unwrap();
        let e = b.write_protect(r).unwrap_err();
        assert!(matches!(e, BackendError::Hypervisor { op: "write_protect", range, .. } if range == r));
        assert!(e.to_string().contains("0xfae94005"), "{e}");
    }

    #[test]
    fn test_should_refuse_unusable_ram_layouts() {
        let hv = Arc::new(StandIn::new(&ram()));
        assert_eq!(
            HvfBackend::new(Arc::clone(&hv), &[]).unwrap_err(),
            RamError::NoRam
        );
        let odd = GpaRange::new(0x4000_0000, 0x2000).unwrap();
        assert_eq!(
            HvfBackend::new(Arc::clone(&hv), &[odd]).unwrap_err(),
            RamError::Misaligned { range: odd }
        );
        let a = GpaRange::new(0x4000_0000, 0x8000).unwrap();
        let b = GpaRange::new(0x4000_4000, 0x8000).unwrap();
        assert!(matches!(
            HvfBackend::new(hv, &[b, a]).unwrap_err(),
            RamError::Overlap { first, second } if first == a && second == b
        ));
    }

    #[test]
    fn test_should_report_apple_silicon_geometry() {
        let (b, _) = backend();
        assert_eq!(b.geometry(), PageGeometry::APPLE_SILICON);
        assert_eq!(b.geometry().granule, GRANULE);
    }
}
