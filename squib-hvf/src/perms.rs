//! Permissions for `Memory::map`, clear of applevisor 1.0's `MemPerms` bug.
//!
//! applevisor 1.0.0 hands `perms as u64` to `hv_vm_map` and `hv_vm_protect`: the enum's position,
//! not its meaning, so `MemPerms::ReadWrite` (position 4) arrives as EXEC-only and
//! `MemPerms::Exec` (position 3) as READ|WRITE. A later release may fix that and send the
//! documented bits. [`map_perms`] therefore only hands out a `MemPerms` whose position and
//! meaning are the same bits, so the framework gets exactly the bits asked for whichever way
//! applevisor converts. READ|WRITE|EXEC (RAM) and READ|EXEC (code) both qualify; READ|WRITE
//! does not, and is refused rather than silently mapped EXEC-only.

use applevisor::memory::MemPerms;
use applevisor_sys::hv_memory_flags_t;

/// Bits no `MemPerms` can carry faithfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "permission bits {bits:#05b} cannot be passed through applevisor 1.0's MemPerms faithfully (its position and meaning differ)"
)]
pub struct PermsError {
    /// The bits asked for.
    pub bits: hv_memory_flags_t,
}

const ALL: [MemPerms; 8] = [
    MemPerms::None,
    MemPerms::Read,
    MemPerms::Write,
    MemPerms::Exec,
    MemPerms::ReadWrite,
    MemPerms::ReadExec,
    MemPerms::WriteExec,
    MemPerms::ReadWriteExec,
];

/// The `MemPerms` that makes `Memory::map` pass exactly `bits` to the framework.
///
/// ```
/// use applevisor::memory::MemPerms;
/// use squib_hvf::perms::map_perms;
/// assert_eq!(map_perms(0b111), Ok(MemPerms::ReadWriteExec)); // READ|WRITE|EXEC
/// assert_eq!(map_perms(0b101), Ok(MemPerms::ReadExec)); // READ|EXEC
/// assert!(map_perms(0b011).is_err()); // READ|WRITE: applevisor 1.0 would send EXEC-only
/// ```
///
/// # Errors
/// [`PermsError`] for bits whose `MemPerms` position and meaning differ.
pub fn map_perms(bits: hv_memory_flags_t) -> Result<MemPerms, PermsError> {
    ALL.into_iter()
        .find(|&p| position(p) == bits && u64::from(p) == bits)
        .ok_or(PermsError { bits })
}

/// What applevisor 1.0.0's `Memory::map` and `Memory::protect` actually send for `p`.
fn position(p: MemPerms) -> u64 {
    p as u64
}

#[cfg(test)]
mod tests {
    use applevisor_sys::{HV_MEMORY_EXEC, HV_MEMORY_READ, HV_MEMORY_WRITE};

    use super::*;
    use crate::hv::{PROTECTED, WRITABLE};

    #[test]
    fn test_should_map_ram_and_code_with_exactly_the_bits_asked_for() {
        for bits in [WRITABLE, PROTECTED] {
            let p = map_perms(bits).unwrap();
            assert_eq!(position(p), bits, "what applevisor 1.0.0 sends for {p:?}");
            assert_eq!(u64::from(p), bits, "what a fixed applevisor would send for {p:?}");
        }
    }

    #[test]
    fn test_should_refuse_bits_applevisor_would_garble() {
        // The bug itself: ReadWrite arrives as EXEC-only, Exec as READ|WRITE.
        assert_eq!(position(MemPerms::ReadWrite), HV_MEMORY_EXEC);
        assert_eq!(position(MemPerms::Exec), HV_MEMORY_READ | HV_MEMORY_WRITE);
        for bits in [HV_MEMORY_READ | HV_MEMORY_WRITE, HV_MEMORY_EXEC] {
            assert_eq!(map_perms(bits), Err(PermsError { bits }));
        }
        for bits in 0..8 {
            if let Ok(p) = map_perms(bits) {
                assert_eq!((position(p), u64::from(p)), (bits, bits));
            }
        }
    }
}
