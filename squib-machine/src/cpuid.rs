//! The CPUID a vCPU sees: what KVM supports, with the topology fields made true and the
//! features KVM emulates but does not list switched on.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 24: the local APIC timer has TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: EBX[23:16] (logical processors per package) is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Patch `supported` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
///
/// Leaf 1 carries the initial APIC ID and the logical processor count (a power of two, as
/// the field is defined, with HTT saying it is valid when there is more than one), leaves 0xB
/// and 0x1F the x2APIC ID. A guest tells its CPUs apart by these (squib's test guest does), so
/// each vCPU gets its own copy.
///
/// `tsc_deadline`: KVM emulates the local APIC's TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`)
/// but does not set its CPUID bit; a VMM must. Without it a stock kernel that has no PIT to
/// calibrate the APIC timer against (hardware-reduced ACPI, as squib describes the machine)
/// waits forever for ticks at boot, and with it the kernel programs one-shot deadlines that
/// a snapshot carries in `MSR_IA32_TSC_DEADLINE`.
#[must_use]
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    let per_package = u32::from(count).next_power_of_two();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | ((per_package & 0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx: 0x0000_0800, // CLFLUSH line size 8 (x 8 bytes), kept
            ..Default::default()
        }
    }

    #[test]
    fn test_should_give_each_vcpu_its_apic_id_and_the_tsc_deadline_bit() {
        let supported = CpuId::from_entries(&[leaf(1), leaf(0xb)]).unwrap();
        let c = for_vcpu(&supported, 1, 2, true);
        let l1 = c.as_slice()[0];
        assert_eq!(l1.ebx >> 24, 1, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 2, "logical processors per package");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "the rest of EBX kept");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC-deadline");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with two vCPUs");
        assert_eq!(c.as_slice()[1].edx, 1, "x2APIC ID");

        let c = for_vcpu(&supported, 0, 3, false);
        let l1 = c.as_slice()[0];
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "three vCPUs: the next power of two");
        assert_eq!(l1.ecx & (1 << 24), 0, "no TSC-deadline where KVM lacks it");
        let c = for_vcpu(&supported, 0, 1, true);
        assert_eq!(c.as_slice()[0].edx & (1 << 28), 0, "no HTT with one vCPU");
    }
}
