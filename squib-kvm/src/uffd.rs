//! Mode `uffd-wp`: fault-driven tracking through userfaultfd write-protect on the host mapping
//! of guest RAM (the mechanism QEMU's background snapshot uses).
//!
//! This mode exists so that the fault path squib ships on Hypervisor.framework runs on real
//! hardware in CI: a guest write to a write-protected page blocks the writing thread in the
//! kernel (KVM resolving the vCPU's fault through the host page tables, or a VMM thread writing
//! guest memory directly), userfaultfd reports the address, and a handler thread turns it into
//! the core's [`GuestFault`](squib_snapshot::GuestFault). The core's fault path, the same code
//! that serves HVF and the soft model, adaptive policy included, then calls
//! [`grant_write`](Stage2Backend::grant_write) (a `UFFDIO_WRITEPROTECT` un-protect) and marks the
//! unit; only then does the handler [`wake`](UffdWpBackend::wake) the blocked thread.
//!
//! The un-protect must not wake the writer itself (`UFFDIO_WRITEPROTECT_MODE_DONTWAKE`): under
//! HVF the faulting vCPU runs the fault path on its own thread and cannot resume before the mark,
//! and the core relies on that. A writer woken by the grant can finish its write, run on, reach a
//! pause and be parked before the handler thread sets the dirty bit; a checkpoint taken then
//! misses a write that happened before it (seen on hardware: a guest filling a block that the
//! adaptive policy had just granted whole, its last 167 pages missing from the diff). Woken after
//! the mark, a writer that is parked has always been marked, so a checkpoint with the vCPUs
//! paused holds every write they made.
//!
//! The registration is not user-mode-only: KVM touches guest memory from kernel mode through the
//! host mapping, and those faults must reach the handler too. The descriptor is non-blocking and
//! polled, so a handler can stop without a wake-up write. Pages must be present before they can
//! be write-protected (anonymous memory without `UFFD_FEATURE_WP_UNPOPULATED`); the VM builder
//! populates RAM first.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend};
use userfaultfd::{Event, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, bitmap::AtomicBitmap};

use super::layout::MemoryLayout;
use super::threads::VcpuThreads;

const PAGE: u64 = 4096;

/// The uffd-wp backend over a VM's RAM.
#[derive(Debug)]
pub struct UffdWpBackend {
    uffd: Uffd,
    /// Each RAM region and the host address of its first byte.
    regions: Vec<(GpaRange, usize)>,
    /// Which thread runs which vCPU: a fault names its vCPU.
    threads: Arc<VcpuThreads>,
    /// Keeps the registered mappings alive for as long as the descriptor is.
    _ram: Arc<GuestMemoryMmap<AtomicBitmap>>,
}

fn os(op: &'static str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Os {
        op,
        source: std::io::Error::other(e.to_string()),
    }
}

impl UffdWpBackend {
    /// Open a userfaultfd and register every RAM region of `layout` in `ram` for write-protect
    /// faults. Nothing is protected until `write_protect`. Every page of RAM must be present.
    /// Faults name their vCPU through `threads`.
    ///
    /// # Errors
    /// [`BackendError::Os`] when userfaultfd is unavailable (no permission: see
    /// `vm.unprivileged_userfaultfd`), lacks write-protect support, or refuses a region.
    pub fn new(
        ram: Arc<GuestMemoryMmap<AtomicBitmap>>,
        layout: &MemoryLayout,
        threads: Arc<VcpuThreads>,
    ) -> Result<Self, BackendError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM writes guest memory from kernel mode: those faults must be reported too.
            .user_mode_only(false)
            // The faulting thread's id, mapped to its vCPU.
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP | FeatureFlags::THREAD_ID)
            .create()
            .map_err(|e| os("opening a write-protect userfaultfd", e))?;
        let mut regions = Vec::new();
        for r in layout.ram() {
            let host = ram
                .get_host_address(GuestAddress(r.start()))
                .map_err(|e| os("finding the host mapping of guest RAM", e))?;
            let len = usize::try_from(r.len()).map_err(|e| os("sizing a RAM region", e))?;
            uffd.register_with_mode(host.cast(), len, RegisterMode::WRITE_PROTECT)
                .map_err(|e| os("UFFDIO_REGISTER (write-protect mode)", e))?;
            regions.push((*r, host as usize));
        }
        Ok(Self {
            uffd,
            regions,
            threads,
            _ram: ram,
        })
    }

    /// Unregister every RAM region: tracking ends and every thread blocked on a write-protect
    /// fault is woken to finish its write untracked. Only for tearing down a VM whose tracking
    /// has failed, once no snapshot will be taken of it any more.
    ///
    /// # Errors
    /// [`BackendError::Os`] when `UFFDIO_UNREGISTER` fails.
    pub fn release_all(&self) -> Result<(), BackendError> {
        for (r, host) in &self.regions {
            let len = usize::try_from(r.len()).map_err(|e| os("sizing a RAM region", e))?;
            let start = *host as *mut libc::c_void;
            self.uffd
                .unregister(start, len)
                .map_err(|e| os("UFFDIO_UNREGISTER", e))?;
            // Unregistering wakes the waiters of missing-page faults only, not of write-protect
            // faults: wake those explicitly (the descriptor still reaches them).
            self.uffd.wake(start, len).map_err(|e| os("UFFDIO_WAKE", e))?;
        }
        Ok(())
    }

    fn host(&self, range: GpaRange) -> Result<(*mut libc::c_void, usize), BackendError> {
        if !range.is_aligned(PAGE) {
            return Err(BackendError::Misaligned { range, granule: PAGE });
        }
        let (r, host) = self
            .regions
            .iter()
            .find(|(r, _)| r.contains_range(&range))
            .ok_or(BackendError::NotGuestMemory { range })?;
        let off =
            usize::try_from(range.start() - r.start()).map_err(|_| BackendError::NotGuestMemory { range })?;
        let len = usize::try_from(range.len()).map_err(|_| BackendError::NotGuestMemory { range })?;
        Ok(((host + off) as *mut libc::c_void, len))
    }

    /// The guest-physical address behind host address `addr`, if it is registered RAM.
    #[must_use]
    pub fn gpa_of_host(&self, addr: usize) -> Option<u64> {
        self.regions.iter().find_map(|(r, host)| {
            let off = u64::try_from(addr.checked_sub(*host)?).ok()?;
            (off < r.len()).then(|| r.start() + off)
        })
    }

    /// Wake the threads blocked on write-protect faults in `range` (they retry their writes).
    ///
    /// # Errors
    /// [`BackendError`] for a range that is not registered RAM, or a failing `UFFDIO_WAKE`.
    pub fn wake(&self, range: GpaRange) -> Result<(), BackendError> {
        let (start, len) = self.host(range)?;
        self.uffd.wake(start, len).map_err(|e| BackendError::Hypervisor {
            op: "wake",
            range,
            reason: format!("UFFDIO_WAKE: {e}"),
        })
    }

    /// Wait up to `timeout` for write-protect faults and hand each one's guest-physical address
    /// and vCPU ([`GuestFault::NOT_A_VCPU`](squib_snapshot::GuestFault::NOT_A_VCPU) for a VMM
    /// thread) to `on_fault`, which must resolve it: re-grant, mark, then [`wake`](Self::wake).
    /// Returns how many faults were handed over. Events that are not RAM write-protect faults
    /// are woken without tracking, so no thread stays blocked.
    ///
    /// When `on_fault` fails, serving stops there and the error is returned: the faults read
    /// after it in the same batch stay blocked, never woken untracked.
    ///
    /// # Errors
    /// [`BackendError::Os`] when polling or reading the descriptor fails; `on_fault`'s error.
    pub fn serve<E: From<BackendError>>(
        &self,
        timeout: Duration,
        on_fault: &mut dyn FnMut(u64, u32) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd on the stack, and nfds is 1.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(BackendError::Os {
                op: "polling the userfaultfd",
                source: e,
            }
            .into());
        }
        let mut n = 0;
        while let Some(event) = self
            .uffd
            .read_event()
            .map_err(|e| os("reading a userfaultfd event", e))?
        {
            if let Event::Pagefault {
                kind,
                addr,
                thread_id,
                ..
            } = event
            {
                let page = (addr as usize) & !4095usize;
                match (kind, self.gpa_of_host(addr as usize)) {
                    (FaultKind::WriteProtected, Some(gpa)) => {
                        n += 1;
                        on_fault(gpa, self.threads.vcpu_of(thread_id.as_raw()))?;
                    }
                    _ => {
                        let _ = self.uffd.wake(page as *mut libc::c_void, 4096);
                    }
                }
            }
        }
        Ok(n)
    }
}

impl Stage2Backend for UffdWpBackend {
    fn geometry(&self) -> PageGeometry {
        PageGeometry::X86_64
    }

    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        let (start, len) = self.host(range)?;
        self.uffd
            .write_protect(start, len)
            .map_err(|e| BackendError::Hypervisor {
                op: "write_protect",
                range,
                reason: format!("UFFDIO_WRITEPROTECT: {e}"),
            })
    }

    /// Un-protect `range` without waking threads blocked on it: the fault handler wakes them
    /// after the tracker has marked the unit ([`UffdWpBackend::wake`]).
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        let (start, len) = self.host(range)?;
        self.uffd
            .remove_write_protection(start, len, false)
            .map_err(|e| BackendError::Hypervisor {
                op: "grant_write",
                range,
                reason: format!("UFFDIO_WRITEPROTECT (un-protect, no wake): {e}"),
            })
    }
}
