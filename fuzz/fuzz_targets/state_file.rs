//! Fuzz the state-file parser: any bytes either decode to a state that passes validation (and
//! survives an encode/decode round trip) or give an error; never a panic.
//!
//! Each input is tried twice: as it is (header checks, length, CRC), and with its header rewritten
//! to a valid magic, version, length and CRC around the rest, so mutations reach the postcard
//! decoder and the validation rules instead of dying at the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use squib_snapshot::snapshot::SnapshotState;

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 32 {
        check(&squib_fuzz::fix_header(data));
    }
});

fn check(bytes: &[u8]) {
    if let Ok(state) = SnapshotState::decode(bytes) {
        let again = state.encode().expect("an accepted state re-encodes");
        assert_eq!(SnapshotState::decode(&again).as_ref(), Ok(&state), "round trip changed the state");
    }
}
