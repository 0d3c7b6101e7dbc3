//! The hypervisor calls the backend makes, behind one small trait.
//!
//! Nothing that builds squib in CI can run Hypervisor.framework, and applevisor's own tests show
//! how a permission bug slips through when nobody looks at what reaches the framework (its
//! `Memory::protect` passes an enum's position as the permission bits, so `ReadWrite` arrives as
//! EXEC-only). So every stage-2 permission change the backend makes goes through [`Hv`]: on Apple
//! Silicon [`Framework`] hands it to `hv_vm_protect` unchanged, and on any host the recording
//! stand-in (feature `stand-in`) checks the alignment, the bounds and the exact bits of each call.
//!
//! Permissions always travel as explicit `HV_MEMORY_*` bits, and EXEC is always among them: guest
//! code lives in the same RAM that is tracked, and a page without EXEC makes every instruction
//! fetch from it an instruction abort.

use applevisor_sys::{HV_MEMORY_EXEC, HV_MEMORY_READ, HV_MEMORY_WRITE, hv_memory_flags_t, hv_return_t};

/// The stage-2 granule Hypervisor.framework maps and protects in: 16 KiB.
pub const GRANULE: u64 = 0x4000;

// The framework's page size as applevisor-sys states it must be the granule squib protects in.
const _: () = assert!(applevisor_sys::PAGE_SIZE == 0x4000);
const _: () = assert!(squib_arch::PageGeometry::APPLE_SILICON.granule == GRANULE);

/// Stage-2 permissions of a write-protected page: read and execute, never write.
pub const PROTECTED: hv_memory_flags_t = HV_MEMORY_READ | HV_MEMORY_EXEC;

/// Stage-2 permissions of a writable page (RAM as mapped, and every re-grant).
pub const WRITABLE: hv_memory_flags_t = HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC;

/// `HV_SUCCESS`: the one `hv_return_t` that is not an error.
const HV_SUCCESS: hv_return_t = 0;

/// What a hypervisor call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvError {
    /// The framework returned an error status.
    #[error("{call} failed: {description}")]
    Status {
        /// The framework function.
        call: &'static str,
        /// Its `hv_return_t`.
        code: hv_return_t,
        /// What the status means, with the code (applevisor's wording).
        description: String,
    },
    /// This host has no Hypervisor.framework for Apple Silicon.
    #[error(
        "Hypervisor.framework is not available on this host: the HVF backend needs macOS on Apple Silicon"
    )]
    Unavailable,
}

impl HvError {
    /// The error for status `code` returned by `call`.
    ///
    /// ```
    /// use squib_hvf::hv::HvError;
    /// let e = HvError::status("hv_vm_protect", 0xfae9_4003_u32 as i32);
    /// assert_eq!(
    ///     e.to_string(),
    ///     "hv_vm_protect failed: function call has an invalid argument (error 0xfae94003)"
    /// );
    /// ```
    #[must_use]
    pub fn status(call: &'static str, code: hv_return_t) -> Self {
        Self::Status {
            call,
            code,
            description: applevisor::error::HypervisorError::from(code).to_string(),
        }
    }

    /// The error for an applevisor call `call` that failed with `err`.
    #[must_use]
    pub fn from_applevisor(call: &'static str, err: applevisor::error::HypervisorError) -> Self {
        Self::status(call, hv_return_t::from(err))
    }
}

/// `Ok` for `HV_SUCCESS`, the status as an error otherwise.
///
/// # Errors
/// [`HvError::Status`] for any status other than `HV_SUCCESS`.
pub fn check(call: &'static str, code: hv_return_t) -> Result<(), HvError> {
    if code == HV_SUCCESS {
        Ok(())
    } else {
        Err(HvError::status(call, code))
    }
}

/// The stage-2 calls [`HvfBackend`](crate::HvfBackend) makes. Implementations must be callable
/// from any thread, concurrently with running vCPUs, as `hv_vm_protect` is.
pub trait Hv: Send + Sync {
    /// `hv_vm_protect(ipa, size, flags)`: set the stage-2 permissions of `[ipa, ipa + size)` to
    /// exactly `flags`.
    ///
    /// # Errors
    /// [`HvError`] with the framework's status.
    fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError>;
}

impl<T: Hv + ?Sized> Hv for std::sync::Arc<T> {
    fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError> {
        (**self).protect(ipa, size, flags)
    }
}

/// The real Hypervisor.framework: calls go straight to `hv_vm_protect` for the process's VM.
///
/// Holding one keeps the VM alive, so a backend can never protect memory of a destroyed VM.
#[cfg(hvf)]
#[derive(Debug, Clone)]
pub struct Framework {
    _vm: applevisor::vm::VirtualMachineInstance<applevisor::vm::GicDisabled>,
}

#[cfg(hvf)]
impl Framework {
    /// The framework calls for `vm` (Hypervisor.framework has one VM per process).
    #[must_use]
    pub fn new(vm: &applevisor::vm::VirtualMachineInstance<applevisor::vm::GicDisabled>) -> Self {
        Self { _vm: vm.clone() }
    }
}

#[cfg(hvf)]
impl Hv for Framework {
    fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError> {
        // SAFETY: hv_vm_protect takes plain integers and touches no memory of ours; the VM exists
        // for as long as `self` does (it holds a reference); the framework validates the range
        // itself and returns an error status for one it does not map.
        let code = unsafe { applevisor_sys::hv_vm_protect(ipa, size, flags) };
        check("hv_vm_protect", code)
    }
}

/// Hypervisor.framework where it does not exist: a type with no values, so that code naming
/// `HvfBackend<Framework>` builds on every host while nothing can call into a framework that is
/// not there. Hosts get [`HvError::Unavailable`] when they ask for a VM.
#[cfg(not(hvf))]
#[derive(Debug, Clone)]
pub enum Framework {}

#[cfg(not(hvf))]
impl Hv for Framework {
    fn protect(&self, _ipa: u64, _size: usize, _flags: hv_memory_flags_t) -> Result<(), HvError> {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_keep_exec_and_read_in_both_permission_sets() {
        for flags in [PROTECTED, WRITABLE] {
            assert_eq!(flags & HV_MEMORY_EXEC, HV_MEMORY_EXEC, "{flags:#x} drops EXEC");
            assert_eq!(flags & HV_MEMORY_READ, HV_MEMORY_READ, "{flags:#x} drops READ");
        }
        assert_eq!(PROTECTED & HV_MEMORY_WRITE, 0);
        assert_eq!(WRITABLE & HV_MEMORY_WRITE, HV_MEMORY_WRITE);
        assert_eq!((PROTECTED, WRITABLE), (0b101, 0b111));
    }

    #[test]
    fn test_should_turn_statuses_into_errors_naming_the_call() {
        assert_eq!(check("hv_vm_protect", 0), Ok(()));
        let busy = 0xfae9_4002_u32.cast_signed();
        let e = check("hv_vm_map", busy).unwrap_err();
        assert!(matches!(e, HvError::Status { call: "hv_vm_map", code, .. } if code == busy));
        assert!(e.to_string().contains("busy"), "{e}");
        let unknown = HvError::status("hv_vcpu_run", 0x1234);
        assert!(
            unknown.to_string().contains("unknown error (error 0x001234)"),
            "{unknown}"
        );
    }
}
