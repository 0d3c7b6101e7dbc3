//! From a vCPU exit to what happens next.
//!
//! One function, [`handle_exit`], decides every exit the same way on Apple Silicon and in the
//! stand-in: an exception exit whose syndrome is a stage-2 write-permission fault is a tracking
//! fault and goes to the core (which re-grants and marks); the vCPU then runs again *without*
//! advancing its PC, so the faulting store executes again and lands. Everything else (a store to
//! unmapped space, which is MMIO; a read; an HVC; a cancel) is the VMM's and is handed back
//! untouched. Keeping this free of framework calls is what lets it be tested on any host.

use applevisor_sys::{hv_exit_reason_t, hv_vcpu_exit_t};
use squib_arch::esr::{Esr, ec};
use squib_snapshot::{DirtyTracker, FaultOutcome, GuestFault, Stage2Backend, TrackError};

/// An exit the VMM must handle itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// A data abort from the guest that is not a tracking fault: a store or load to an IPA with no
    /// RAM (MMIO, to emulate), a read of a read-protected page, or a write to memory squib does not
    /// track (ROM). The PC still points at the access.
    DataAbort {
        /// The syndrome.
        esr: Esr,
        /// The faulting intermediate physical address.
        ipa: u64,
        /// The faulting guest virtual address.
        va: u64,
    },
    /// Any other exception: HVC, SMC, a trapped system register, WFI/WFE, an instruction abort.
    Exception {
        /// The syndrome.
        esr: Esr,
        /// The reported intermediate physical address (meaningful for aborts only).
        ipa: u64,
        /// The reported guest virtual address (meaningful for aborts only).
        va: u64,
    },
    /// The host asked the vCPU to exit (`hv_vcpus_exit`).
    Canceled,
    /// The guest's virtual timer fired.
    VtimerActivated,
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// A tracking fault was handled: run the vCPU again at the same PC, so the store is retried.
    Retry(FaultOutcome),
    /// Hand the exit to the VMM.
    Vmm(VmmExit),
}

/// An exit that cannot be handled.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// The framework reported an exit of unknown cause.
    #[error("vCPU {vcpu} exited for an unknown reason (HV_EXIT_REASON_UNKNOWN)")]
    Unknown {
        /// The vCPU.
        vcpu: u32,
    },
    /// The core refused or failed a tracking fault (a failed re-grant, say).
    #[error("tracking fault on vCPU {vcpu} at IPA {ipa:#x} (ESR {esr:#x})")]
    Track {
        /// The vCPU.
        vcpu: u32,
        /// The faulting IPA.
        ipa: u64,
        /// The syndrome.
        esr: u64,
        /// What the core said.
        #[source]
        source: TrackError,
    },
}

/// Decide what exit `exit` of vCPU `vcpu` means, handing tracking faults to `tracker`.
///
/// ```
/// use applevisor_sys::{hv_exit_reason_t, hv_vcpu_exit_exception_t, hv_vcpu_exit_t};
/// use squib_arch::GpaRange;
/// use squib_hvf::exit::{ExitAction, handle_exit};
/// use squib_hvf::{HvfBackend, stand_in::StandIn};
/// use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
///
/// let ram = [GpaRange::new(0x4000_0000, 4 << 20).unwrap()];
/// let backend = HvfBackend::new(StandIn::new(&ram), &ram).unwrap();
/// let tracker = DirtyTracker::new(backend, &ram, TrackingConfig::new(Policy::Fine)).unwrap();
/// tracker.start().unwrap();
/// let exit = hv_vcpu_exit_t {
///     reason: hv_exit_reason_t::EXCEPTION,
///     exception: hv_vcpu_exit_exception_t {
///         syndrome: 0x93C1_804F, // str x1, [x0] to a write-protected page
///         virtual_address: 0x4000_4008,
///         physical_address: 0x4000_4008,
///     },
/// };
/// assert!(matches!(handle_exit(&tracker, 0, &exit), Ok(ExitAction::Retry(_))));
/// assert!(tracker.is_marked(0x4000_4008));
/// ```
///
/// # Errors
/// [`ExitError`] for an exit of unknown cause, or a tracking fault the core could not handle.
pub fn handle_exit<B: Stage2Backend>(
    tracker: &DirtyTracker<B>,
    vcpu: u32,
    exit: &hv_vcpu_exit_t,
) -> Result<ExitAction, ExitError> {
    let esr = Esr(exit.exception.syndrome);
    let ipa = exit.exception.physical_address;
    let va = exit.exception.virtual_address;
    match exit.reason {
        hv_exit_reason_t::EXCEPTION => {
            let Some(fault) = GuestFault::from_stage2_abort(esr, ipa, vcpu) else {
                return Ok(ExitAction::Vmm(if esr.ec() == ec::DATA_ABORT_LOWER {
                    VmmExit::DataAbort { esr, ipa, va }
                } else {
                    VmmExit::Exception { esr, ipa, va }
                }));
            };
            match tracker.on_write_fault(fault) {
                Ok(outcome) => Ok(ExitAction::Retry(outcome)),
                // A write-permission fault squib did not cause: memory the VMM protects itself.
                Err(TrackError::OutsideTrackedRam { .. }) => {
                    Ok(ExitAction::Vmm(VmmExit::DataAbort { esr, ipa, va }))
                }
                Err(source) => Err(ExitError::Track {
                    vcpu,
                    ipa,
                    esr: esr.0,
                    source,
                }),
            }
        }
        hv_exit_reason_t::CANCELED => Ok(ExitAction::Vmm(VmmExit::Canceled)),
        hv_exit_reason_t::VTIMER_ACTIVATED => Ok(ExitAction::Vmm(VmmExit::VtimerActivated)),
        hv_exit_reason_t::UNKNOWN => Err(ExitError::Unknown { vcpu }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use squib_arch::GpaRange;
    use squib_snapshot::{Policy, TrackingConfig};

    use super::*;
    use crate::HvfBackend;
    use crate::hv::HvError;
    use crate::stand_in::{StandIn, exception_exit};

    const RAM: u64 = 0x4000_0000;

    fn setup() -> (DirtyTracker<HvfBackend<Arc<StandIn>>>, Arc<StandIn>) {
        let ram = [GpaRange::new(RAM, 4 << 20).unwrap()];
        let hv = Arc::new(StandIn::new(&ram));
        let backend = HvfBackend::new(Arc::clone(&hv), &ram).unwrap();
        let t = DirtyTracker::new(backend, &ram, TrackingConfig::new(Policy::Fine)).unwrap();
        t.start().unwrap();
        (t, hv)
    }

    #[test]
    fn test_should_mark_and_regrant_on_a_stage2_write_permission_fault() {
        let (t, hv) = setup();
        for (esr, ipa) in [
            (0x93C1_804F, RAM + 0x4008),                          // str x1, [x0], ISV=1
            (Esr::stage2_write_permission(3).0, RAM + 0x10_0010), // stp, ISV=0
            (0x9200_008F, RAM + 0x20_0000),                       // stage-1 walk, S1PTW=1
        ] {
            let action = handle_exit(&t, 2, &exception_exit(esr, ipa)).unwrap();
            let unit = GpaRange::new(ipa & !0x3FFF, 0x4000).unwrap();
            assert!(
                matches!(action, ExitAction::Retry(o) if o.unit == unit),
                "{esr:#x}: {action:?}"
            );
            assert!(t.is_marked(ipa), "{esr:#x}");
            assert_eq!(hv.flags_at(ipa), Some(0b111), "{esr:#x}: page not re-granted");
        }
        assert_eq!(t.counters().faults, 3);
    }

    #[test]
    fn test_should_forward_a_translation_fault_to_the_vmm_unmarked() {
        let (t, hv) = setup();
        let calls = hv.calls().len();
        // str to an IPA with no RAM behind it (a device register): translation fault, level 3.
        let mmio = 0x0900_0000;
        let action = handle_exit(&t, 0, &exception_exit(0x93C1_8047, mmio)).unwrap();
        assert_eq!(
            action,
            ExitAction::Vmm(VmmExit::DataAbort {
                esr: Esr(0x93C1_8047),
                ipa: mmio,
                va: mmio
            })
        );
        // The same fault inside RAM is still not a tracking fault.
        let action = handle_exit(&t, 0, &exception_exit(0x93C1_8047, RAM + 0x8000)).unwrap();
        assert!(matches!(action, ExitAction::Vmm(VmmExit::DataAbort { .. })));
        assert!(!t.is_marked(RAM + 0x8000));
        assert_eq!(t.counters().faults, 0);
        assert_eq!(
            hv.calls().len(),
            calls,
            "a forwarded fault must not change permissions"
        );
    }

    #[test]
    fn test_should_not_treat_a_read_permission_fault_as_tracking() {
        let (t, hv) = setup();
        // ldr x1, [x0] from a page without READ: permission fault, WnR=0.
        let action = handle_exit(&t, 0, &exception_exit(0x93C1_000F, RAM + 0x4000)).unwrap();
        assert!(
            matches!(action, ExitAction::Vmm(VmmExit::DataAbort { .. })),
            "{action:?}"
        );
        assert!(!t.is_marked(RAM + 0x4000));
        assert_eq!(
            hv.flags_at(RAM + 0x4000),
            Some(0b101),
            "a read fault must not re-grant"
        );
    }

    #[test]
    fn test_should_forward_a_write_permission_fault_outside_tracked_ram() {
        let (t, _) = setup();
        let rom = 0x1000_0000;
        let action = handle_exit(&t, 0, &exception_exit(0x93C1_804F, rom)).unwrap();
        assert!(matches!(action, ExitAction::Vmm(VmmExit::DataAbort { ipa, .. }) if ipa == rom));
        assert_eq!(t.counters().faults, 0);
    }

    #[test]
    fn test_should_forward_other_exceptions_and_exits() {
        let (t, _) = setup();
        for esr in [0x5A00_0000, 0x8200_000F, 0x0400_0000] {
            // hvc #0; an instruction abort; wfi.
            let action = handle_exit(&t, 0, &exception_exit(esr, 0)).unwrap();
            assert!(
                matches!(action, ExitAction::Vmm(VmmExit::Exception { esr: e, .. }) if e.0 == esr),
                "{esr:#x}: {action:?}"
            );
        }
        let mut exit = exception_exit(0, 0);
        exit.reason = hv_exit_reason_t::CANCELED;
        assert_eq!(
            handle_exit(&t, 0, &exit).unwrap(),
            ExitAction::Vmm(VmmExit::Canceled)
        );
        exit.reason = hv_exit_reason_t::VTIMER_ACTIVATED;
        assert_eq!(
            handle_exit(&t, 0, &exit).unwrap(),
            ExitAction::Vmm(VmmExit::VtimerActivated)
        );
        exit.reason = hv_exit_reason_t::UNKNOWN;
        assert!(matches!(
            handle_exit(&t, 7, &exit),
            Err(ExitError::Unknown { vcpu: 7 })
        ));
    }

    #[test]
    fn test_should_fail_when_the_regrant_fails() {
        let (t, hv) = setup();
        hv.fail_next(HvError::status("hv_vm_protect", 0xfae9_4001_u32.cast_signed()));
        let e = handle_exit(&t, 1, &exception_exit(0x93C1_804F, RAM + 0x4000)).unwrap_err();
        assert!(matches!(e, ExitError::Track { vcpu: 1, .. }), "{e}");
        assert!(e.to_string().contains("0x40004000"), "{e}");
    }
}
