//! The CPUID a vCPU sees: what KVM supports, with the topology fields made true.

use kvm_bindings::CpuId;

/// Patch `supported` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
///
/// Leaf 1 carries the initial APIC ID and the logical processor count, leaves
/// 0xB and 0x1F the x2APIC ID. A guest tells its CPUs apart by these (squib's
/// test guest does), so each vCPU gets its own copy.
#[must_use]
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                // Hypervisor present.
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}
