//! The vCPU run loop.
//!
//! Hypervisor.framework binds a vCPU to the thread that created it: only that thread may run it,
//! read its registers or destroy it (applevisor's `Vcpu` is `!Send` for that reason). So each
//! vCPU thread owns its vCPU and runs [`run_until_vmm_exit`] with a shared `&DirtyTracker`; the
//! tracker and the backend are `Sync`, and `hv_vm_protect` is a VM-wide call any thread may make.
//! Tracking faults never leave this loop: they are handled on the vCPU's own thread, the vCPU is
//! resumed at the same PC, and only exits the VMM must act on come back to the caller.

use applevisor_sys::hv_vcpu_exit_t;
use squib_snapshot::{DirtyTracker, Stage2Backend};

use crate::exit::{ExitAction, ExitError, VmmExit, handle_exit};
use crate::hv::HvError;

/// How many tracking faults in a row at the same page the loop accepts before it calls the
/// re-grant ineffective. A checkpoint can re-protect a page between the re-grant and the retry,
/// so a second fault is normal; hundreds in a row mean the permission never took effect.
pub const MAX_REPEATED_FAULTS: u32 = 256;

/// A vCPU the loop can run: the real one on Apple Silicon, a simulated one in tests.
pub trait VcpuOps {
    /// Run until the next exit and report it (`hv_vcpu_run`, then the exit record).
    ///
    /// # Errors
    /// [`HvError`] when the framework refuses to run the vCPU.
    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvError>;
}

#[cfg(hvf)]
impl VcpuOps for applevisor::vcpu::Vcpu {
    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvError> {
        applevisor::vcpu::Vcpu::run(self).map_err(|e| HvError::from_applevisor("hv_vcpu_run", e))?;
        Ok(self.get_exit_info())
    }
}

/// Why a vCPU run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The framework refused to run the vCPU.
    #[error("vCPU {vcpu}")]
    Run {
        /// The vCPU.
        vcpu: u32,
        /// The framework's error.
        #[source]
        source: HvError,
    },
    /// An exit could not be handled.
    #[error(transparent)]
    Exit(#[from] ExitError),
    /// The same page kept faulting: its re-grant is not taking effect.
    #[error(
        "vCPU {vcpu}: {faults} tracking faults in a row at IPA {ipa:#x}; the re-grant is not taking effect"
    )]
    NoProgress {
        /// The vCPU.
        vcpu: u32,
        /// The faulting IPA.
        ipa: u64,
        /// Faults in a row.
        faults: u32,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    /// The exit the VMM must handle.
    pub exit: VmmExit,
    /// Tracking faults handled on the way.
    pub tracking_faults: u64,
}

/// Run vCPU `id` until an exit the VMM must handle, handling every tracking fault on the way
/// (mark, re-grant, resume at the same PC).
///
/// # Errors
/// [`VcpuError`] when the framework fails, an exit cannot be handled, or a page keeps faulting.
pub fn run_until_vmm_exit<V, B>(
    vcpu: &mut V,
    id: u32,
    tracker: &DirtyTracker<B>,
) -> Result<RunOutcome, VcpuError>
where
    V: VcpuOps + ?Sized,
    B: Stage2Backend,
{
    let mut tracking_faults = 0;
    let mut last_page = None;
    let mut repeats = 0;
    loop {
        let exit = vcpu.run().map_err(|source| VcpuError::Run { vcpu: id, source })?;
        match handle_exit(tracker, id, &exit)? {
            ExitAction::Retry(outcome) => {
                // The PC is left alone: the store that faulted runs again and now lands.
                tracking_faults += 1;
                let page = outcome.unit.start();
                if last_page == Some(page) {
                    repeats += 1;
                    if repeats >= MAX_REPEATED_FAULTS {
                        return Err(VcpuError::NoProgress {
                            vcpu: id,
                            ipa: exit.exception.physical_address,
                            faults: repeats,
                        });
                    }
                } else {
                    last_page = Some(page);
                    repeats = 1;
                }
            }
            ExitAction::Vmm(exit) => {
                return Ok(RunOutcome {
                    exit,
                    tracking_faults,
                });
            }
        }
    }
}
