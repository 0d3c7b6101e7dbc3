//! A Hypervisor.framework VM with one RAM region, its memory owned by vm-memory.
//!
//! The framework allows one VM per process; applevisor's `VirtualMachineInstance` is a cheap,
//! `Send` handle to it, which each vCPU thread clones to create its own vCPU (vCPUs are bound to
//! their thread). Where the framework does not exist, [`HvfVm::new`] fails with
//! [`HvError::Unavailable`] and no value of [`HvfVm`] can exist.
//!
//! Why vm-memory owns guest RAM (and the framework only maps it): snapshots are written by the
//! same code for every backend ([`squib_snapshot::ChainSink`]), which reads a
//! `GuestMemoryMmap<AtomicBitmap>`. A view built over memory the framework allocated
//! (`hv_vm_allocate` behind applevisor's `Memory`) could be cloned out of the VM's life and read
//! freed memory; memory vm-memory allocated ([`guest_ram`]) lives as long as any clone of it, and
//! [`HvfVm`] unmaps it from the VM (`hv_vm_unmap`) before dropping its own reference. The
//! mapping is made with `hv_vm_map` and the explicit bits READ|WRITE|EXEC
//! ([`WRITABLE`](crate::hv::WRITABLE)); after that, every permission change is the backend's
//! `hv_vm_protect`. The VMM's own writes go through vm-memory, whose bitmap records them.

use squib_arch::GpaRange;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{HvfBackend, RamError};
use crate::hv::{Framework, GRANULE, HvError};
use crate::perms::PermsError;

/// Guest memory as squib-hvf keeps it: one anonymous vm-memory region per RAM range.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// What setting up a VM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The framework refused a call (or does not exist here).
    #[error(transparent)]
    Hv(#[from] HvError),
    /// The permissions cannot be passed faithfully.
    #[error(transparent)]
    Perms(#[from] PermsError),
    /// The RAM layout is unusable.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The RAM region does not fit this host's address space.
    #[error("guest RAM {0} is larger than this host can allocate")]
    TooLarge(GpaRange),
    /// Guest RAM could not be allocated.
    #[error("allocating guest RAM {ram}: {reason}")]
    Allocate {
        /// The RAM region.
        ram: GpaRange,
        /// vm-memory's words.
        reason: String,
    },
    /// An access outside guest RAM.
    #[error("guest memory access at {gpa:#x} of {len} bytes is outside guest RAM {ram}")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Its length.
        len: usize,
        /// The RAM region.
        ram: GpaRange,
    },
}

/// Zeroed, page-aligned anonymous memory for `ram` (granule-aligned), with a vm-memory dirty
/// bitmap for the VMM's own writes: what a VM (or the stand-in) maps as guest RAM.
///
/// # Errors
/// [`VmError::Ram`] when `ram` is not granule-aligned, [`VmError::TooLarge`] or
/// [`VmError::Allocate`] when it cannot be allocated.
pub fn guest_ram(ram: GpaRange) -> Result<GuestRam, VmError> {
    if !ram.is_aligned(GRANULE) {
        return Err(RamError::Misaligned { range: ram }.into());
    }
    let size = usize::try_from(ram.len()).map_err(|_| VmError::TooLarge(ram))?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(ram.start()), size)]).map_err(|e| VmError::Allocate {
        ram,
        reason: e.to_string(),
    })
}

/// The process's Hypervisor.framework VM and its RAM.
#[derive(Debug)]
pub struct HvfVm {
    #[cfg(hvf)]
    vm: applevisor::vm::VirtualMachineInstance<applevisor::vm::GicDisabled>,
    #[cfg(not(hvf))]
    never: std::convert::Infallible,
    memory: GuestRam,
    ram: GpaRange,
}

impl HvfVm {
    /// Create the VM, allocate `ram` (granule-aligned) with [`guest_ram`] and map it
    /// READ|WRITE|EXEC.
    ///
    /// # Errors
    /// [`VmError::Hv`] when the framework refuses (a VM already exists in this process, the
    /// process lacks the `com.apple.security.hypervisor` entitlement, ...) or does not exist here.
    #[cfg(hvf)]
    pub fn new(ram: GpaRange) -> Result<Self, VmError> {
        use applevisor::vm::VirtualMachine;
        use vm_memory::GuestMemoryBackend as _;

        let memory = guest_ram(ram)?;
        let size = usize::try_from(ram.len()).map_err(|_| VmError::TooLarge(ram))?;
        let host = memory
            .get_host_address(GuestAddress(ram.start()))
            .map_err(|e| VmError::Allocate {
                ram,
                reason: e.to_string(),
            })?;
        let vm = VirtualMachine::new().map_err(|e| HvError::from_applevisor("hv_vm_create", e))?;
        // SAFETY: `host` is the start of the anonymous mapping of exactly `size` bytes that
        // vm-memory made for `ram` (page-aligned, as mmap returns it). The returned `HvfVm` holds
        // that memory (`memory`) and its `Drop` unmaps it from the VM before letting go of it, so
        // the VM never maps freed memory. The framework validates the rest and returns a status.
        let code = unsafe {
            applevisor_sys::hv_vm_map(host.cast_const().cast(), ram.start(), size, crate::hv::WRITABLE)
        };
        crate::hv::check("hv_vm_map", code)?;
        Ok(Self { vm, memory, ram })
    }

    /// Create the VM: not on this host.
    ///
    /// # Errors
    /// Always [`HvError::Unavailable`]: Hypervisor.framework for Apple Silicon is not here.
    #[cfg(not(hvf))]
    pub fn new(ram: GpaRange) -> Result<Self, VmError> {
        let _ = ram;
        Err(HvError::Unavailable.into())
    }

    /// The guest RAM region.
    #[must_use]
    pub fn ram(&self) -> GpaRange {
        self.ram
    }

    /// Guest memory (what snapshots read; the VMM's writes through it are in its bitmap).
    #[must_use]
    pub const fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// A backend over this VM's RAM.
    ///
    /// # Errors
    /// [`RamError`] (not for a VM made by [`new`](Self::new), whose RAM was checked).
    pub fn backend(&self) -> Result<HvfBackend<Framework>, RamError> {
        #[cfg(hvf)]
        {
            HvfBackend::new(Framework::new(&self.vm), &[self.ram])
        }
        #[cfg(not(hvf))]
        match self.never {}
    }

    /// A handle to the VM for a vCPU thread: clone it there and call `vcpu_create` on it.
    #[cfg(hvf)]
    #[must_use]
    pub fn instance(&self) -> &applevisor::vm::VirtualMachineInstance<applevisor::vm::GicDisabled> {
        &self.vm
    }

    /// Copy `data` into guest memory at `gpa` (the VMM's write: it does not fault).
    ///
    /// # Errors
    /// [`VmError::OutOfRange`] outside guest RAM.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.check(gpa, data.len())?;
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| self.out_of_range(gpa, data.len()))
    }

    /// Copy guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`VmError::OutOfRange`] outside guest RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.check(gpa, buf.len())?;
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| self.out_of_range(gpa, buf.len()))
    }

    const fn out_of_range(&self, gpa: u64, len: usize) -> VmError {
        VmError::OutOfRange {
            gpa,
            len,
            ram: self.ram,
        }
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), VmError> {
        let n = u64::try_from(len).map_err(|_| VmError::TooLarge(self.ram))?;
        match GpaRange::new(gpa, n) {
            Ok(r) if self.ram.contains_range(&r) => Ok(()),
            _ => Err(self.out_of_range(gpa, len)),
        }
    }
}

#[cfg(hvf)]
impl Drop for HvfVm {
    fn drop(&mut self) {
        let size = usize::try_from(self.ram.len()).unwrap_or(usize::MAX);
        // SAFETY: hv_vm_unmap takes plain integers and touches no memory of ours; the VM exists
        // (`self.vm` is dropped after this runs).
        let code = unsafe { applevisor_sys::hv_vm_unmap(self.ram.start(), size) };
        if let Err(e) = crate::hv::check("hv_vm_unmap", code) {
            // The VM may still map guest RAM: keep the memory alive for the process's life
            // rather than free memory a guest could still reach.
            tracing::error!(error = %e, ram = %self.ram, "cannot unmap guest RAM; leaking it");
            std::mem::forget(self.memory.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(hvf))]
    #[test]
    fn test_should_say_the_framework_is_unavailable_off_apple_silicon() {
        let e = HvfVm::new(GpaRange::new(0x4000_0000, 1 << 20).unwrap()).unwrap_err();
        assert!(matches!(e, VmError::Hv(HvError::Unavailable)), "{e}");
        assert!(e.to_string().contains("macOS on Apple Silicon"), "{e}");
    }

    #[test]
    fn test_should_allocate_zeroed_guest_ram_and_refuse_a_misaligned_region() {
        let ram = GpaRange::new(0x4000_0000, 1 << 20).unwrap();
        let mem = guest_ram(ram).unwrap();
        let mut buf = [0xAAu8; 64];
        mem.read_slice(&mut buf, GuestAddress(ram.end() - 64)).unwrap();
        assert_eq!(buf, [0; 64]);
        let odd = GpaRange::new(0x4000_1000, 1 << 20).unwrap();
        assert!(matches!(
            guest_ram(odd),
            Err(VmError::Ram(RamError::Misaligned { .. }))
        ));
    }
}
