//! The machine state a snapshot needs besides guest memory, in a serde form.
//!
//! Everything KVM keeps about a running guest is here: per vCPU the general,
//! special and debug registers, the XSAVE area (x87, SSE, AVX: the FPU state
//! included), XCR0, every MSR KVM lists as saveable, the local APIC page, the MP
//! state and the pending-event record; per VM both 8259s, the IOAPIC, the PIT
//! and the KVM clock; and the 8250 serial device, which lives in squib.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::serial::SerialSnapshot;

/// Format version of [`MachineState`]'s encoding; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (FPU, SSE, AVX and the rest).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page (timer, LVTs, ISR/IRR...).
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM could read, TSC included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
}

/// A paused machine's state, memory excepted.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`] at capture.
    pub version: u32,
    /// Guest RAM size in bytes (one region at guest address 0).
    pub mem_size: u64,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest nanoseconds).
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialSnapshot,
}

/// The state could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateCodecError {
    /// The bytes are not a machine state.
    #[error("machine state: cannot decode: {0}")]
    Decode(#[from] serde_json::Error),
    /// Encoded by an incompatible squib.
    #[error("machine state: version {found}, this squib reads version {expected}")]
    Version {
        /// The version in the bytes.
        found: u32,
        /// [`STATE_VERSION`].
        expected: u32,
    },
}

impl MachineState {
    /// Encode as bytes (JSON), for a snapshot file's backend-state section.
    ///
    /// # Panics
    /// Never: every field is plain data that serde_json can encode.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("machine state is plain data")
    }

    /// Decode bytes made by [`MachineState::to_bytes`].
    ///
    /// # Errors
    /// [`StateCodecError`] naming what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateCodecError> {
        let state: Self = serde_json::from_slice(bytes)?;
        if state.version != STATE_VERSION {
            return Err(StateCodecError::Version {
                found: state.version,
                expected: STATE_VERSION,
            });
        }
        Ok(state)
    }
}
