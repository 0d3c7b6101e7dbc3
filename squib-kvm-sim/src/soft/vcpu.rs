//! Simulated vCPUs: guest writes through the soft stage-2 into real guest memory.
//!
//! A guest write must reach guest memory the way a vCPU's store does: *not* through vm-memory's
//! write path, whose bitmap records the VMM's own writes and is OR-ed into every diff (routing
//! guest writes through it would let a tracking bug hide behind that bitmap). So the vCPU writes
//! through a bitmap-less view of the host mapping, and only inside
//! [`SoftStage2::write_access`], i.e. only once the stage-2 allows it. A denied write exits with
//! the synthesized `ESR_EL2` and IPA; the exit is decoded by `squib-arch` into a [`GuestFault`],
//! handled by the tracker like any hardware exit, and the write retried.

use std::sync::Arc;

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{DirtyTracker, GuestFault, Stage2Backend, TrackError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileSlice};

use super::mmu::{MmuError, SoftStage2, Stage2Exit, VcpuSlot};

/// Guest memory as the soft backend uses it.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// What a simulated vCPU's write can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The guest wrote where there is no RAM: the exit is not a tracking fault.
    #[error("vCPU {vcpu} wrote to {ipa:#x}, which is not guest RAM (ESR {esr:#x})")]
    NotRam {
        /// The vCPU.
        vcpu: u32,
        /// The faulting IPA.
        ipa: u64,
        /// The raw syndrome.
        esr: u64,
    },
    /// The tracker refused the fault.
    #[error("vCPU {vcpu}: the tracker could not handle the fault")]
    Track {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: TrackError,
    },
    /// The write kept faulting after the tracker re-granted it.
    #[error("vCPU {vcpu}: write at {ipa:#x} still faults after {tries} re-grants")]
    Livelock {
        /// The vCPU.
        vcpu: u32,
        /// The IPA.
        ipa: u64,
        /// How many times it was retried.
        tries: u32,
    },
}

/// What building a soft VM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SoftVmError {
    /// The stage-2 model rejected the layout.
    #[error(transparent)]
    Mmu(#[from] MmuError),
    /// Guest memory has no host mapping at a region start.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostMapping(u64),
}

/// Guest memory plus the soft stage-2 that guards it.
#[derive(Debug, Clone)]
pub struct SoftVm {
    mmu: Arc<SoftStage2>,
    mem: Arc<GuestMem>,
    /// (guest range, host address of its first byte) per region.
    hosts: Arc<[(GpaRange, usize)]>,
}

impl SoftVm {
    /// A VM over `mem` with room for `vcpus` vCPUs.
    ///
    /// # Errors
    /// [`SoftVmError`] when the layout is unusable.
    pub fn new(geometry: PageGeometry, mem: Arc<GuestMem>, vcpus: usize) -> Result<Self, SoftVmError> {
        let mut hosts = Vec::new();
        for region in mem.iter() {
            let start = region.start_addr().0;
            let range = GpaRange::new(start, region.len()).map_err(|_| SoftVmError::NoHostMapping(start))?;
            let host = mem
                .get_host_address(GuestAddress(start))
                .map_err(|_| SoftVmError::NoHostMapping(start))?;
            hosts.push((range, host as usize));
        }
        let ranges: Vec<GpaRange> = hosts.iter().map(|(r, _)| *r).collect();
        let mmu = Arc::new(SoftStage2::new(geometry, &ranges, vcpus)?);
        Ok(Self {
            mmu,
            mem,
            hosts: hosts.into(),
        })
    }

    /// The stage-2 model: the tracker's backend.
    pub const fn mmu(&self) -> &Arc<SoftStage2> {
        &self.mmu
    }

    /// Guest memory.
    pub const fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// A new vCPU with id `id`.
    ///
    /// # Errors
    /// [`SoftVmError::Mmu`] when every vCPU slot is taken.
    pub fn vcpu(&self, id: u32) -> Result<SoftVcpu, SoftVmError> {
        Ok(SoftVcpu {
            id,
            slot: self.mmu.claim_vcpu()?,
            vm: self.clone(),
        })
    }
}

/// One simulated vCPU.
#[derive(Debug)]
pub struct SoftVcpu {
    id: u32,
    slot: VcpuSlot,
    vm: SoftVm,
}

/// How many times one page of a write may fault before the vCPU gives up: a correct tracker
/// re-grants on the first; a few more cover concurrent re-protects by live checkpoints.
const MAX_RETRIES: u32 = 1_000_000;

impl SoftVcpu {
    /// This vCPU's id.
    pub const fn id(&self) -> u32 {
        self.id
    }

    /// Try to write `data` at `ipa`, which must lie in one granule page: the store either lands
    /// or exits.
    ///
    /// # Errors
    /// The stage-2 exit the store took instead.
    pub fn try_store(&self, ipa: u64, data: &[u8]) -> Result<(), Stage2Exit> {
        let host = self.host_ptr(ipa, data.len());
        self.vm.mmu.write_access(&self.slot, ipa, || {
            if let Some(ptr) = host {
                // SAFETY: `ptr..ptr + data.len()` lies inside one mmap'd guest region (checked by
                // `host_ptr`), which `self.vm.mem` keeps mapped for as long as this vCPU lives.
                // Every access to guest memory is volatile (vm-memory's and this one), as
                // `VolatileSlice::new` requires.
                let slice = unsafe { VolatileSlice::new(ptr, data.len()) };
                slice.copy_from(data);
            }
        })
    }

    /// Host address of `[ipa, ipa + len)` when it lies inside one region.
    fn host_ptr(&self, ipa: u64, len: usize) -> Option<*mut u8> {
        let len = u64::try_from(len).ok()?;
        let (range, host) = self.vm.hosts.iter().find(|(r, _)| r.contains(ipa))?;
        if ipa.checked_add(len)? > range.end() {
            return None;
        }
        let off = usize::try_from(ipa - range.start()).ok()?;
        Some(host.checked_add(off)? as *mut u8)
    }

    /// Write `data` at `ipa` as the guest does: page by page; each page that faults exits, the
    /// exit is decoded and handed to `tracker`, and the store is retried until it lands. Returns
    /// the number of tracking faults taken.
    ///
    /// # Errors
    /// [`VcpuError`] when the write is outside RAM or the tracker refuses the fault.
    pub fn write<B: Stage2Backend>(
        &self,
        tracker: &DirtyTracker<B>,
        ipa: u64,
        data: &[u8],
    ) -> Result<u64, VcpuError> {
        let granule = self.vm.mmu.geometry().granule;
        let mut faults = 0;
        let mut done = 0usize;
        while done < data.len() {
            let at = ipa + done as u64;
            let room = usize::try_from(granule - (at & (granule - 1))).unwrap_or(usize::MAX);
            let piece = &data[done..data.len().min(done + room)];
            let mut tries = 0;
            while let Err(exit) = self.try_store(at, piece) {
                faults += 1;
                tries += 1;
                deliver(tracker, exit, self.id)?;
                if tries > MAX_RETRIES {
                    return Err(VcpuError::Livelock {
                        vcpu: self.id,
                        ipa: at,
                        tries,
                    });
                }
            }
            done += piece.len();
        }
        Ok(faults)
    }
}

/// Hand a stage-2 exit to the tracker the way a hardware backend does: decode the syndrome, and
/// accept only stage-2 write-permission faults.
///
/// # Errors
/// [`VcpuError::NotRam`] for anything that is not a tracking fault; [`VcpuError::Track`] when the
/// tracker refuses it.
pub fn deliver<B: Stage2Backend>(
    tracker: &DirtyTracker<B>,
    exit: Stage2Exit,
    vcpu: u32,
) -> Result<(), VcpuError> {
    let fault = GuestFault::from_stage2_abort(exit.esr, exit.ipa, vcpu).ok_or(VcpuError::NotRam {
        vcpu,
        ipa: exit.ipa,
        esr: exit.esr.0,
    })?;
    tracker
        .on_write_fault(fault)
        .map(|_| ())
        .map_err(|source| VcpuError::Track { vcpu, source })
}
