//! The machine state a snapshot needs besides guest memory, in a serde form.
//!
//! Everything KVM keeps about a running guest is here: per vCPU the general,
//! special and debug registers, the XSAVE area (x87, SSE, AVX: the FPU state
//! included), XCR0, every MSR KVM lists as saveable, the local APIC page, the MP
//! state and the pending-event record; per VM both 8259s, the IOAPIC, the PIT
//! and the KVM clock; and the 8250 serial device, which lives in squib.
//!
//! Encoded with postcard, like the rest of the state file: one codec, no field names in the
//! bytes, and one kind of parser facing a hostile file. Every decode checks that the bytes are
//! used up and that counts fit what KVM takes (vCPUs, CPUID entries, MSRs, the XSAVE area), so
//! a hostile section is an error naming itself, never a panic or a huge allocation.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};
use squib_snapshot::snapshot::Section;

use super::serial::SerialSnapshot;

/// Name of the device section holding the VM-wide state (irqchips, PIT, clock, RAM size).
pub const VM_SECTION: &str = "kvm-machine";
/// Name of the device section holding COM1.
pub const COM1_SECTION: &str = "com1";

/// Format version of [`MachineState`]'s encoding; bumped on any incompatible change (2: postcard
/// instead of JSON, and an XSAVE area of the size KVM reports; 3: each vCPU's TSC rate).
pub const STATE_VERSION: u32 = 3;

/// Most vCPUs a state may hold.
pub const MAX_STATE_VCPUS: usize = 256;
/// Most CPUID entries a vCPU state may hold (KVM's own limit).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most MSRs a vCPU state may hold.
pub const MAX_MSRS: usize = 4096;
/// Largest XSAVE area accepted, in 32-bit words (1 MiB; AMX needs about 11 KiB).
pub const MAX_XSAVE_WORDS: usize = 1 << 18;

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
    /// The XSAVE area (FPU, SSE, AVX and the rest) as KVM returned it, in 32-bit words: the 4 KiB
    /// of `KVM_GET_XSAVE`, or more where `KVM_CAP_XSAVE2` reports a larger size (dynamically
    /// enabled features such as AMX).
    pub xsave: Vec<u32>,
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
    /// by more than 250 ppm scales the vCPU's TSC to it. `None` where KVM cannot tell (then the
    /// restore does not scale).
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
    /// The bytes of one part are not what that part encodes.
    #[error("machine state: cannot decode {part}")]
    Decode {
        /// Which part ("vCPU 1", the `kvm-machine` section...).
        part: String,
        /// The decoder's complaint.
        #[source]
        source: postcard::Error,
    },
    /// A part decodes with bytes left over.
    #[error("machine state: {part} has {extra} bytes after its end")]
    Trailing {
        /// Which part.
        part: String,
        /// Bytes left.
        extra: usize,
    },
    /// A count is beyond what KVM (or squib) takes.
    #[error("machine state: {part} holds {count} {what}, at most {max} are taken")]
    TooMany {
        /// Which part.
        part: String,
        /// What is counted.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Postcard writes plain data into a Vec without failing (no map keys, no unsized lengths).
    postcard::to_stdvec(v).expect("machine state is plain data")
}

fn decode<'a, T: Deserialize<'a>>(part: impl Fn() -> String, bytes: &'a [u8]) -> Result<T, StateCodecError> {
    let (v, rest) = postcard::take_from_bytes(bytes)
        .map_err(|source| StateCodecError::Decode { part: part(), source })?;
    if !rest.is_empty() {
        return Err(StateCodecError::Trailing {
            part: part(),
            extra: rest.len(),
        });
    }
    Ok(v)
}

fn at_most(part: &str, what: &'static str, count: usize, max: usize) -> Result<(), StateCodecError> {
    if count > max {
        return Err(StateCodecError::TooMany {
            part: part.to_owned(),
            what,
            count,
            max,
        });
    }
    Ok(())
}

impl VcpuState {
    fn check(&self, index: usize) -> Result<(), StateCodecError> {
        let part = format!("vCPU {index}");
        at_most(&part, "CPUID entries", self.cpuid.len(), MAX_CPUID_ENTRIES)?;
        at_most(&part, "MSRs", self.msrs.len(), MAX_MSRS)?;
        at_most(&part, "XSAVE words", self.xsave.len(), MAX_XSAVE_WORDS)
    }
}

impl MachineState {
    /// Encode as bytes (postcard), for tests and tools that keep a whole state in one blob.
    ///
    /// # Panics
    /// Never: every field is plain data that postcard can encode.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Split into the opaque sections of squib's snapshot format: one postcard blob per vCPU
    /// (index order) and the device sections [`VM_SECTION`] and [`COM1_SECTION`].
    ///
    /// # Panics
    /// Never: every field is plain data that postcard can encode.
    #[must_use]
    pub fn into_sections(self) -> (Vec<Vec<u8>>, Vec<Section>) {
        let vcpus = self.vcpus.iter().map(encode).collect();
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
                data: encode(&vm),
            },
            Section {
                name: COM1_SECTION.to_owned(),
                data: encode(&self.serial),
            },
        ];
        (vcpus, devices)
    }

    /// Rebuild from the sections [`MachineState::into_sections`] made.
    ///
    /// # Errors
    /// [`StateCodecError`] naming the missing section, the part that does not decode, or the
    /// count out of bounds.
    pub fn from_sections(vcpus: &[Vec<u8>], devices: &[Section]) -> Result<Self, StateCodecError> {
        let find = |name: &'static str| {
            devices
                .iter()
                .find(|s| s.name == name)
                .ok_or(StateCodecError::MissingSection(name))
        };
        let vm: VmPart = decode(|| format!("the {VM_SECTION:?} section"), &find(VM_SECTION)?.data)?;
        if vm.version != STATE_VERSION {
            return Err(StateCodecError::Version {
                found: vm.version,
                expected: STATE_VERSION,
            });
        }
        let serial: SerialSnapshot = decode(
            || format!("the {COM1_SECTION:?} section"),
            &find(COM1_SECTION)?.data,
        )?;
        if vcpus.is_empty() {
            return Err(StateCodecError::NoVcpus);
        }
        at_most("the snapshot", "vCPUs", vcpus.len(), MAX_STATE_VCPUS)?;
        let vcpus = vcpus
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let v: VcpuState = decode(|| format!("vCPU {i}"), b)?;
                v.check(i)?;
                Ok(v)
            })
            .collect::<Result<Vec<VcpuState>, StateCodecError>>()?;
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
        let state: Self = decode(|| "the machine state".to_owned(), bytes)?;
        if state.version != STATE_VERSION {
            return Err(StateCodecError::Version {
                found: state.version,
                expected: STATE_VERSION,
            });
        }
        at_most("the machine state", "vCPUs", state.vcpus.len(), MAX_STATE_VCPUS)?;
        for (i, v) in state.vcpus.iter().enumerate() {
            v.check(i)?;
        }
        Ok(state)
    }
}
