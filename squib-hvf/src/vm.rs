//! A Hypervisor.framework VM with one RAM region, set up through applevisor.
//!
//! The framework allows one VM per process; applevisor's `VirtualMachineInstance` is a cheap,
//! `Send` handle to it, which each vCPU thread clones to create its own vCPU (vCPUs are bound to
//! their thread). RAM comes from `memory_create` (page-aligned `hv_vm_allocate`) and is mapped
//! with `Memory::map`, whose permissions pass through [`map_perms`](crate::perms::map_perms) so
//! applevisor 1.0's `MemPerms` bug cannot garble them; after that, every permission change is the
//! backend's `hv_vm_protect` with explicit bits. Where the framework does not exist, [`HvfVm::new`]
//! fails with [`HvError::Unavailable`] and no value of [`HvfVm`] can exist.

use squib_arch::GpaRange;

use crate::backend::{HvfBackend, RamError};
use crate::hv::{Framework, HvError};
use crate::perms::PermsError;

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

/// The process's Hypervisor.framework VM and its RAM.
#[derive(Debug)]
pub struct HvfVm {
    #[cfg(hvf)]
    vm: applevisor::vm::VirtualMachineInstance<applevisor::vm::GicDisabled>,
    #[cfg(hvf)]
    ram_memory: applevisor::memory::Memory,
    #[cfg(not(hvf))]
    never: std::convert::Infallible,
    ram: GpaRange,
}

impl HvfVm {
    /// Create the VM and map `ram` (granule-aligned) READ|WRITE|EXEC.
    ///
    /// # Errors
    /// [`VmError::Hv`] when the framework refuses (a VM already exists in this process, the
    /// process lacks the `com.apple.security.hypervisor` entitlement, ...) or does not exist here.
    #[cfg(hvf)]
    pub fn new(ram: GpaRange) -> Result<Self, VmError> {
        use applevisor::vm::VirtualMachine;

        if !ram.is_aligned(crate::hv::GRANULE) {
            return Err(RamError::Misaligned { range: ram }.into());
        }
        let size = usize::try_from(ram.len()).map_err(|_| VmError::TooLarge(ram))?;
        let perms = crate::perms::map_perms(crate::hv::WRITABLE)?;
        let vm = VirtualMachine::new().map_err(|e| HvError::from_applevisor("hv_vm_create", e))?;
        let mut ram_memory = vm
            .memory_create(size)
            .map_err(|e| HvError::from_applevisor("hv_vm_allocate", e))?;
        ram_memory
            .map(ram.start(), perms)
            .map_err(|e| HvError::from_applevisor("hv_vm_map", e))?;
        Ok(Self { vm, ram_memory, ram })
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
        #[cfg(hvf)]
        {
            self.ram_memory
                .write(gpa, data)
                .map_err(|e| HvError::from_applevisor("Memory::write", e).into())
        }
        #[cfg(not(hvf))]
        match self.never {}
    }

    /// Copy guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`VmError::OutOfRange`] outside guest RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.check(gpa, buf.len())?;
        #[cfg(hvf)]
        {
            self.ram_memory
                .read(gpa, buf)
                .map_err(|e| HvError::from_applevisor("Memory::read", e).into())
        }
        #[cfg(not(hvf))]
        match self.never {}
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), VmError> {
        let out = VmError::OutOfRange {
            gpa,
            len,
            ram: self.ram,
        };
        let n = u64::try_from(len).map_err(|_| VmError::TooLarge(self.ram))?;
        match GpaRange::new(gpa, n) {
            Ok(r) if self.ram.contains_range(&r) => Ok(()),
            _ => Err(out),
        }
    }
}

#[cfg(all(test, not(hvf)))]
mod tests {
    use super::*;

    #[test]
    fn test_should_say_the_framework_is_unavailable_off_apple_silicon() {
        let e = HvfVm::new(GpaRange::new(0x4000_0000, 1 << 20).unwrap()).unwrap_err();
        assert!(matches!(e, VmError::Hv(HvError::Unavailable)), "{e}");
        assert!(e.to_string().contains("macOS on Apple Silicon"), "{e}");
    }
}
