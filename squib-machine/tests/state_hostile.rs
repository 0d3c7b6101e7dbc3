//! Hostile machine-state sections: whatever bytes a snapshot's vCPU and device sections hold,
//! decoding gives the state that was encoded or an error naming the part, never a panic, a
//! hang or an allocation the bytes merely claim.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};
use proptest::prelude::*;
use squib_machine::serial::SerialSnapshot;
use squib_machine::state::{COM1_SECTION, MAX_MSRS, MachineState, StateCodecError, VM_SECTION, VcpuState};
use squib_snapshot::snapshot::Section;

fn vcpu(i: u32) -> VcpuState {
    VcpuState {
        cpuid: vec![
            kvm_cpuid_entry2 {
                function: 1,
                eax: i,
                ..Default::default()
            };
            3
        ],
        mp_state: Default::default(),
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000 + u64::from(i),
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: (0..1024).collect(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![
            kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            };
            4
        ],
        events: Default::default(),
        tsc_khz: Some(2_596_138),
    }
}

/// A state as a machine would capture it: two vCPUs, default devices.
fn state() -> MachineState {
    MachineState {
        version: squib_machine::state::STATE_VERSION,
        mem_size: 64 << 20,
        vcpus: vec![vcpu(0), vcpu(1)],
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
        serial: SerialSnapshot {
            baud_divisor_low: 1,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: b"typed".to_vec(),
        },
    }
}

fn sections() -> (Vec<Vec<u8>>, Vec<Section>) {
    state().into_sections()
}

#[test]
fn test_should_give_back_the_state_that_was_encoded() {
    let (vcpus, devices) = sections();
    let back = MachineState::from_sections(&vcpus, &devices).expect("decode");
    assert_eq!(back.to_bytes(), state().to_bytes());
    assert_eq!(back.vcpus[1].regs.rip, 0x10_0001);
    assert_eq!(back.vcpus[0].xsave, (0..1024).collect::<Vec<u32>>());
    assert_eq!(back.serial.in_buffer, b"typed");
    let whole = MachineState::from_bytes(&state().to_bytes()).expect("decode whole");
    assert_eq!(whole.to_bytes(), state().to_bytes());
}

#[test]
fn test_should_name_the_part_that_does_not_decode() {
    let (mut vcpus, devices) = sections();
    let half = vcpus[1].len() / 2;
    vcpus[1].truncate(half);
    let e = MachineState::from_sections(&vcpus, &devices).unwrap_err();
    assert!(e.to_string().contains("vCPU 1"), "{e}");
    let (mut vcpus, devices) = sections();
    vcpus[0].push(0);
    let e = MachineState::from_sections(&vcpus, &devices).unwrap_err();
    assert!(matches!(e, StateCodecError::Trailing { extra: 1, .. }), "{e}");
    let (vcpus, mut devices) = sections();
    devices.retain(|s| s.name != COM1_SECTION);
    let e = MachineState::from_sections(&vcpus, &devices).unwrap_err();
    assert!(e.to_string().contains("com1"), "{e}");
}

#[test]
fn test_should_refuse_counts_beyond_what_kvm_takes() {
    let mut s = state();
    s.vcpus[1].msrs = vec![kvm_msr_entry::default(); MAX_MSRS + 1];
    let (vcpus, devices) = s.into_sections();
    let e = MachineState::from_sections(&vcpus, &devices).unwrap_err();
    assert!(
        e.to_string().contains("vCPU 1") && e.to_string().contains("MSRs"),
        "{e}"
    );
    // A length prefix claiming 2^62 entries with nothing behind it: an error, not an allocation.
    let (mut vcpus, devices) = sections();
    let cpuid_len_at = 0; // the CPUID vector is the first field of a vCPU
    let mut hostile = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
    hostile.extend_from_slice(&vcpus[0][cpuid_len_at + 1..]);
    vcpus[0] = hostile;
    assert!(MachineState::from_sections(&vcpus, &devices).is_err());
}

#[test]
fn test_should_refuse_a_state_of_another_version() {
    let mut s = state();
    s.version = 1;
    let (vcpus, devices) = s.into_sections();
    let e = MachineState::from_sections(&vcpus, &devices).unwrap_err();
    assert!(matches!(e, StateCodecError::Version { found: 1, .. }), "{e}");
    // Version 1 was JSON: its bytes are refused, not misread.
    let devices = vec![
        Section {
            name: VM_SECTION.into(),
            data: br#"{"version":1,"mem_size":67108864}"#.to_vec(),
        },
        Section {
            name: COM1_SECTION.into(),
            data: b"{}".to_vec(),
        },
    ];
    assert!(MachineState::from_sections(&[b"{}".to_vec()], &devices).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn test_should_never_panic_on_mutated_sections(
        which in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (mut vcpus, mut devices) = sections();
        let target: &mut Vec<u8> = match which {
            0 | 1 => &mut vcpus[which],
            i => &mut devices[i - 2].data,
        };
        for (at, b) in flips {
            let i = at.index(target.len());
            target[i] ^= b;
        }
        if let Some(c) = cut {
            let keep = c.index(target.len() + 1);
            target.truncate(keep);
        }
        let _ = MachineState::from_sections(&vcpus, &devices);
    }

    #[test]
    fn test_should_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (_, devices) = sections();
        let _ = MachineState::from_sections(std::slice::from_ref(&bytes), &devices);
        let _ = MachineState::from_bytes(&bytes);
    }
}
