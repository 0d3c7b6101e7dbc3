//! The seam between the tracking core and a hypervisor.
//!
//! A backend knows how to take write permission away from guest memory and give it back, and how
//! to turn its own exit into a [`GuestFault`]. Everything else (which unit to mark, what to
//! re-grant, when to re-protect, which policy) is the core's, so that a write is tracked the same
//! way whether it was seen by Hypervisor.framework, by KVM or by the software model.

use squib_arch::{GpaRange, PageGeometry, esr::Esr};

/// What a backend call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The range is not aligned to the backend's stage-2 granule.
    #[error("range {range} is not aligned to the {granule:#x}-byte stage-2 granule")]
    Misaligned {
        /// The offending range.
        range: GpaRange,
        /// The granule it must be aligned to.
        granule: u64,
    },
    /// The range is not (wholly) guest memory the backend knows.
    #[error("range {range} is not guest memory of this backend")]
    NotGuestMemory {
        /// The offending range.
        range: GpaRange,
    },
    /// The hypervisor refused the operation.
    #[error("{op} on {range} failed: {reason}")]
    Hypervisor {
        /// The operation (`write_protect`, `grant_write`, `harvest`).
        op: &'static str,
        /// The range it was applied to.
        range: GpaRange,
        /// The hypervisor's own words (errno, `hv_return_t`, ...).
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How a backend learns of guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingMechanism {
    /// Writes to protected memory exit to the VMM, which calls
    /// [`DirtyTracker::on_write_fault`](crate::DirtyTracker::on_write_fault) (HVF, soft, uffd-wp).
    Faulting,
    /// The kernel logs written pages without exiting; [`Stage2Backend::harvest`] reports them
    /// (KVM's dirty log).
    KernelLogged,
}

/// A hypervisor's stage-2 permissions, as the tracking core needs them.
///
/// Contract (see `docs/backend-guide.md`, `specs/16-snapshots.md`):
/// - Ranges passed in are aligned to [`PageGeometry::granule`] and lie inside guest RAM; a backend
///   rejects anything else with an error, never rounds silently.
/// - Each `write_protect` and `grant_write` call costs at most one TLB invalidation; the core
///   batches (one `write_protect` per region per checkpoint) so backends need not.
/// - Both may be called while vCPUs run and concurrently from several threads (the fault path runs
///   on every vCPU thread).
/// - After `write_protect(r)` returns, every later guest write to `r` is either faulted (and
///   reaches the core as a [`GuestFault`]) or reported by a later [`harvest`](Self::harvest).
/// - The faulting writer resumes only after
///   [`DirtyTracker::on_write_fault`](crate::DirtyTracker::on_write_fault) has returned. The core
///   grants and then marks; if `grant_write` itself let the writer run on (userfaultfd's
///   un-protect wakes the faulting thread by default), the writer could finish its write and be
///   paused for a quiescent checkpoint before the mark lands, and that checkpoint would miss the
///   write. Backends whose fault is served on another thread than the writer's (uffd-wp) grant
///   without waking and wake the writer after `on_write_fault` returns; backends whose vCPU
///   thread runs the fault path itself (HVF, soft) satisfy this by construction.
pub trait Stage2Backend: Send + Sync {
    /// The geometry this backend works in.
    fn geometry(&self) -> PageGeometry;

    /// How writes are seen.
    fn mechanism(&self) -> TrackingMechanism {
        TrackingMechanism::Faulting
    }

    /// Remove write permission from `range` (keeping read and execute).
    ///
    /// # Errors
    /// [`BackendError`] naming the range and the reason.
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError>;

    /// Give write permission back to `range`: the fault path's re-grant.
    ///
    /// # Errors
    /// [`BackendError`] naming the range and the reason.
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError>;

    /// Report ranges the hypervisor logged as written since the previous harvest (KVM's dirty
    /// log). Faulting backends log nothing and keep the default.
    ///
    /// # Errors
    /// [`BackendError`] when the log cannot be read.
    fn harvest(&self, sink: &mut dyn FnMut(GpaRange)) -> Result<(), BackendError> {
        let _ = sink;
        Ok(())
    }
}

impl<B: Stage2Backend + ?Sized> Stage2Backend for std::sync::Arc<B> {
    fn geometry(&self) -> PageGeometry {
        (**self).geometry()
    }
    fn mechanism(&self) -> TrackingMechanism {
        (**self).mechanism()
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        (**self).write_protect(range)
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        (**self).grant_write(range)
    }
    fn harvest(&self, sink: &mut dyn FnMut(GpaRange)) -> Result<(), BackendError> {
        (**self).harvest(sink)
    }
}

/// The one fault value every backend's exit decoder produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// The faulting guest-physical address (any byte of the access).
    pub gpa: u64,
    /// Whether the access was a write (or a stage-1 walk that may write).
    pub write: bool,
    /// The vCPU that took it ([`GuestFault::NOT_A_VCPU`] for a write by a VMM thread, which a
    /// backend tracking through the host mapping, like uffd-wp, sees too).
    pub vcpu: u32,
}

impl GuestFault {
    /// The `vcpu` of a fault taken by a thread that runs no vCPU (the VMM writing guest memory).
    pub const NOT_A_VCPU: u32 = u32::MAX;

    /// Decode an ARM stage-2 data abort: `Some` for a stage-2 write-permission fault (a tracking
    /// fault), `None` for anything the VMM must handle itself (MMIO, translation faults, reads).
    ///
    /// ```
    /// use squib_arch::esr::Esr;
    /// use squib_snapshot::GuestFault;
    /// let f = GuestFault::from_stage2_abort(Esr(0x9200_004F), 0x8000_1234, 1).unwrap();
    /// assert_eq!((f.gpa, f.write, f.vcpu), (0x8000_1234, true, 1));
    /// assert!(GuestFault::from_stage2_abort(Esr(0x93C1_8047), 0x9000_0000, 0).is_none());
    /// ```
    #[must_use]
    pub const fn from_stage2_abort(esr: Esr, ipa: u64, vcpu: u32) -> Option<Self> {
        if esr.is_stage2_write_permission_fault() {
            Some(Self {
                gpa: ipa,
                write: true,
                vcpu,
            })
        } else {
            None
        }
    }
}
