//! Fuzz the machine-state decoder (the vCPU and device sections of a snapshot of a booted
//! kernel): any bytes either decode to a state that survives an encode/decode round trip or give
//! an error; never a panic, a hang or an allocation the bytes merely claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use squib_machine::state::{COM1_SECTION, MachineState, VM_SECTION};
use squib_snapshot::snapshot::Section;

fuzz_target!(|data: &[u8]| {
    let parts = squib_fuzz::split_parts(data);
    let (vcpus, devices) = if parts.len() >= 3 {
        let (v, d) = parts.split_at(parts.len() - 2);
        (v.to_vec(), vec![d[0], d[1]])
    } else {
        (parts.clone(), Vec::new())
    };
    let vcpus: Vec<Vec<u8>> = vcpus.iter().map(|p| p.to_vec()).collect();
    let devices: Vec<Section> = [VM_SECTION, COM1_SECTION]
        .iter()
        .zip(devices)
        .map(|(name, d)| Section { name: (*name).to_owned(), data: d.to_vec() })
        .collect();
    if let Ok(state) = MachineState::from_sections(&vcpus, &devices) {
        let bytes = state.to_bytes();
        let (v2, d2) = state.into_sections();
        let again = MachineState::from_sections(&v2, &d2).expect("an accepted state re-decodes");
        assert_eq!(again.to_bytes(), bytes, "round trip changed the state");
    }
    let _ = MachineState::from_bytes(data);
});
