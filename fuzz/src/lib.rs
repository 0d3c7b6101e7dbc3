//! Shared by the fuzz targets and the seed writer: the input format of `chain_load`.
//!
//! An input is a chain of 1..=3 snapshot directories (`000000-full`, `000001-diff`,
//! `000002-diff`, whatever their contents say), each encoded as
//! `u16 state_len, state bytes, u32 memory_len, u32 data_len, data bytes` (little-endian): the
//! memory file is `data` followed by zeros up to `memory_len`.

/// Names of the member directories, in order.
pub const NAMES: [&str; 3] = ["000000-full", "000001-diff", "000002-diff"];
/// Largest memory file the harness creates (keeps executions fast).
pub const MAX_MEMORY: u32 = 16 << 20;

/// One decoded member.
pub struct Member<'a> {
    /// State file bytes.
    pub state: &'a [u8],
    /// Memory file length.
    pub memory_len: u32,
    /// Memory file prefix.
    pub data: &'a [u8],
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (a, b) = data.split_at(n);
    *data = b;
    Some(a)
}

/// Split an input into members; `None` when it is too short.
pub fn parse(mut data: &[u8]) -> Option<Vec<Member<'_>>> {
    let n = usize::from(take(&mut data, 1)?[0] % 3) + 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = take(&mut data, 2)?;
        let state = take(&mut data, usize::from(u16::from_le_bytes([l[0], l[1]])))?;
        let m = take(&mut data, 4)?;
        let memory_len = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        let d = take(&mut data, 4)?;
        let data_len = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let body = take(&mut data, usize::try_from(data_len).ok()?)?;
        out.push(Member {
            state,
            memory_len,
            data: body,
        });
    }
    Some(out)
}

/// Encode members (the inverse of [`parse`]).
pub fn encode(members: &[(Vec<u8>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![u8::try_from(members.len() - 1).unwrap_or(0)];
    for (state, memory_len, data) in members {
        out.extend_from_slice(&u16::try_from(state.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(state);
        out.extend_from_slice(&memory_len.to_le_bytes());
        out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// `bytes` with its 32-byte header rewritten to a valid magic, version, reserved word, body
/// length and CRC-64 around the rest (so fuzzing reaches the decoder past the CRC).
pub fn fix_header(bytes: &[u8]) -> Vec<u8> {
    use squib_snapshot::snapshot::format::{CRC64, FORMAT_VERSION, HEADER_LEN, MAGIC};
    let mut out = bytes.to_vec();
    if out.len() < HEADER_LEN {
        return out;
    }
    let body_len = (out.len() - HEADER_LEN) as u64;
    let crc = CRC64.checksum(&out[HEADER_LEN..]);
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&0u32.to_le_bytes());
    out[16..24].copy_from_slice(&body_len.to_le_bytes());
    out[24..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The input format of `machine_state`: up to four parts, each `u16 length, bytes`
/// (little-endian): the vCPU sections, then the `kvm-machine` and `com1` device sections (the
/// last two parts; with fewer than three parts, all are vCPUs and the devices are empty).
pub fn split_parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while parts.len() < 4 {
        let Some(l) = take(&mut data, 2) else { break };
        let n = usize::from(u16::from_le_bytes([l[0], l[1]]));
        let n = n.min(data.len());
        let Some(p) = take(&mut data, n) else { break };
        parts.push(p);
    }
    parts
}

/// Encode parts (the inverse of [`split_parts`]).
pub fn join_parts(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&u16::try_from(p.len()).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}
