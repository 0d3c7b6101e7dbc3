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
use squib_snapshot::snapshot::Section;

use super::serial::SerialSnapshot;

/// Name of the device section holding the VM-wide state (irqchips, PIT, clock, RAM size).
pub const VM_SECTION: &str = "kvm-machine";
/// Name of the device section holding COM1.
pub const COM1_SECTION: &str = "com1";

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
    /// The guest TSC's rate in kHz (`KVM_GET_TSC_KHZ`); a restore on a host whose rate differs
    /// scales the vCPU's TSC to it. Absent in snapshots written before squib saved it, and
    /// where KVM cannot tell.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
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

/// The VM-wide part of [`MachineState`]: the `kvm-machine` section of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct VmPart {
    version: u32,
    mem_size: u64,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
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
    /// A snapshot lacks a section a machine needs (it was not taken of a booted machine).
    #[error("machine state: no {0:?} section (not a snapshot of a booted kernel)")]
    MissingSection(&'static str),
    /// A snapshot has no vCPU state.
    #[error("machine state: no vCPU sections")]
    NoVcpus,
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

    /// Split into the opaque sections of squib's snapshot format: one JSON blob per vCPU (index
    /// order) and the device sections [`VM_SECTION`] and [`COM1_SECTION`].
    ///
    /// # Panics
    /// Never: every field is plain data that serde_json can encode.
    #[must_use]
    pub fn into_sections(self) -> (Vec<Vec<u8>>, Vec<Section>) {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| serde_json::to_vec(v).expect("vCPU state is plain data"))
            .collect();
        let vm = VmPart {
            version: self.version,
            mem_size: self.mem_size,
            pic_master: self.pic_master,
            pic_slave: self.pic_slave,
            ioapic: self.ioapic,
            pit: self.pit,
            clock: self.clock,
        };
        let devices = vec![
            Section {
                name: VM_SECTION.to_owned(),
                data: serde_json::to_vec(&vm).expect("VM state is plain data"),
            },
            Section {
                name: COM1_SECTION.to_owned(),
                data: serde_json::to_vec(&self.serial).expect("COM1 state is plain data"),
            },
        ];
        (vcpus, devices)
    }

    /// Rebuild from the sections [`MachineState::into_sections`] made.
    ///
    /// # Errors
    /// [`StateCodecError`] naming the missing section or the decode failure.
    pub fn from_sections(vcpus: &[Vec<u8>], devices: &[Section]) -> Result<Self, StateCodecError> {
        let find = |name: &'static str| {
            devices
                .iter()
                .find(|s| s.name == name)
                .ok_or(StateCodecError::MissingSection(name))
        };
        let vm: VmPart = serde_json::from_slice(&find(VM_SECTION)?.data)?;
        if vm.version != STATE_VERSION {
            return Err(StateCodecError::Version {
                found: vm.version,
                expected: STATE_VERSION,
            });
        }
        let serial: SerialSnapshot = serde_json::from_slice(&find(COM1_SECTION)?.data)?;
        if vcpus.is_empty() {
            return Err(StateCodecError::NoVcpus);
        }
        let vcpus = vcpus
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<Vec<VcpuState>, _>>()?;
        Ok(Self {
            version: vm.version,
            mem_size: vm.mem_size,
            vcpus,
            pic_master: vm.pic_master,
            pic_slave: vm.pic_slave,
            ioapic: vm.ioapic,
            pit: vm.pit,
            clock: vm.clock,
            serial,
        })
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
