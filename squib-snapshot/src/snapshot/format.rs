//! The state file: a fixed 32-byte header, then a postcard-encoded body.
//!
//! Why this shape: the header is readable without the codec (magic, version and body length are
//! checked before a single body byte is decoded), the CRC-64 covers every body byte so any bit
//! flip is caught before the codec sees hostile input, and the file length must equal header +
//! body exactly so truncation and appended garbage are refused by one comparison. After decoding,
//! [`SnapshotState::validate`] checks every count, offset and length against the layout, so no
//! later stage ever trusts a number read from a file.
//!
//! Why postcard: its wire format is specified and frozen for 1.x, it is actively maintained, it
//! is compact (varints) and it is non-self-describing, so the body carries no field names for an
//! attacker to play with; serde's cautious size hints cap pre-allocation on hostile lengths, and
//! the decoder only reads from the bounded slice it is given. The format version in the header
//! stands in for the schema evolution a self-describing codec would give.

use serde::{Deserialize, Serialize};
use squib_arch::{GpaRange, PageGeometry};

/// First eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SQUIBSNP";
/// The format version this build writes and the only one it reads. Version 1 (a snapshot was a
/// directory, its parent a sibling directory name, its memory file bare guest memory) is refused
/// with a message saying so.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;
/// The largest state file accepted on load (header + body).
pub const MAX_STATE_FILE: u64 = 64 << 20;
/// Most memory regions a layout may have.
pub const MAX_REGIONS: usize = 1024;
/// Longest backend name accepted.
pub const MAX_BACKEND_NAME: usize = 64;
/// Longest recorded path (the memory file, the parent's state file) accepted, in bytes.
pub const MAX_RECORDED_PATH: usize = 4096;
/// First eight bytes of a memory file's identity trailer.
pub const MEMORY_MAGIC: [u8; 8] = *b"SQUIBMEM";
/// The trailer's own version.
pub const MEMORY_TRAILER_VERSION: u32 = 1;
/// Bytes the identity trailer occupies at the end of a memory file (one page, so the file stays a
/// whole number of pages; only the first [`MEMORY_TRAILER_USED`] bytes carry data).
pub const MEMORY_TRAILER_LEN: u64 = 4096;
/// Bytes of the trailer that carry data: magic, version, reserved, id, layout size, CRC-64.
pub const MEMORY_TRAILER_USED: usize = 48;

/// The CRC-64 used over the body (CRC-64/XZ, the one `xz` uses).
pub const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a state file's bytes were refused. The caller adds the file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer bytes than the header.
    #[error("truncated: {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader {
        /// Bytes present.
        len: usize,
    },
    /// The magic is not `SQUIBSNP`.
    #[error("not a squib state file (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION}){}", version_hint(*found))]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
    },
    /// The reserved header word is not zero.
    #[error("reserved header field is {found:#x}, expected 0")]
    Reserved {
        /// Value found.
        found: u32,
    },
    /// The header announces a body larger than the load cap.
    #[error("body length {body_len} exceeds the {MAX_STATE_FILE}-byte cap")]
    TooLarge {
        /// Announced body length.
        body_len: u64,
    },
    /// The file is not exactly header + body long.
    #[error(
        "length mismatch: header announces a {expected}-byte file, found {found} bytes (truncated or trailing data)"
    )]
    LengthMismatch {
        /// Header + announced body.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// The CRC-64 of the body does not match.
    #[error("CRC-64 mismatch: header says {expected:#018x}, body hashes to {found:#018x}")]
    Crc {
        /// CRC in the header.
        expected: u64,
        /// CRC of the body.
        found: u64,
    },
    /// The body does not decode.
    #[error("body does not decode: {0}")]
    Decode(String),
    /// The body decodes but leaves bytes unread.
    #[error("body has {0} trailing bytes after the state")]
    TrailingBytes(usize),
    /// The body decodes but breaks a rule.
    #[error("invalid state: {0}")]
    Invalid(String),
    /// A memory file's identity trailer is not one squib wrote.
    #[error("no squib memory identity in the last {MEMORY_TRAILER_LEN} bytes ({0})")]
    Trailer(&'static str),
}

fn version_hint(found: u32) -> &'static str {
    if found == 1 {
        ": version 1 was written by a squib that kept both files in one directory without \
         recording where they are; take the snapshot again with this build"
    } else {
        ""
    }
}

/// A snapshot's identity: 128 random-looking bits, fixed at save time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub u128);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Every byte of guest memory.
    Full,
    /// Only the extents written since the parent.
    Diff,
}

impl SnapshotKind {
    /// `"full"` or `"diff"`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Diff => "diff",
        }
    }
}

/// How a diff names its parent: the parent's id, and where the parent's state file is. The path
/// is relative to the directory holding the diff's state file when the two are near each other
/// (same directory, or sibling directories), so a chain survives being moved or copied whole;
/// otherwise it is absolute. The id catches a parent that was replaced by another snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's id (checked on load).
    pub id: SnapshotId,
    /// The parent's state file: relative to the directory holding this state file, or absolute.
    pub state: String,
}

/// One guest memory region and where its bytes live in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// First guest-physical byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
}

/// One guest range the memory file holds, with the xxh3-64 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First guest-physical byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the extent's bytes as written.
    pub xxh3: u64,
}

/// An opaque, named per-backend section (a device's state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Name (the backend's choice, e.g. `"uart0"`).
    pub name: String,
    /// The backend's bytes.
    pub data: Vec<u8>,
}

/// The decoded body of a state file. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// This snapshot's id.
    pub id: SnapshotId,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The parent, for a diff (never for a full snapshot).
    pub parent: Option<ParentRef>,
    /// The memory file: relative to the directory holding this state file, or absolute. Its
    /// identity trailer must carry this snapshot's id.
    pub memory: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The backend that took it (`"soft"`, `"kvm"`, `"hvf"`, ...).
    pub backend: String,
    /// The page geometry it was tracked with.
    pub geometry: PageGeometry,
    /// Guest memory regions, sorted by address, packed back to back in the memory file.
    pub layout: Vec<RegionLayout>,
    /// What the memory file holds, sorted, non-overlapping, each inside one region.
    pub extents: Vec<Extent>,
    /// Per-vCPU state, opaque to the core (index = vCPU id).
    pub vcpus: Vec<Vec<u8>>,
    /// Device state sections, opaque to the core.
    pub devices: Vec<Section>,
}

impl SnapshotState {
    /// Total bytes of guest memory the layout describes (= memory file length).
    #[must_use]
    pub fn layout_bytes(&self) -> u64 {
        self.layout.iter().map(|r| r.len).sum()
    }

    /// Bytes the extents hold.
    #[must_use]
    pub fn extent_bytes(&self) -> u64 {
        self.extents.iter().fold(0u64, |a, e| a.saturating_add(e.len))
    }

    /// Length of the memory file: the layout's bytes, then the identity trailer.
    #[must_use]
    pub fn memory_file_len(&self) -> u64 {
        self.layout_bytes().saturating_add(MEMORY_TRAILER_LEN)
    }

    /// The region holding all of `[gpa, gpa + len)`, if one does.
    #[must_use]
    pub fn region_of(&self, gpa: u64, len: u64) -> Option<&RegionLayout> {
        let end = gpa.checked_add(len)?;
        self.layout.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
    }

    /// The memory file offset of guest byte `gpa` (which must lie in the layout).
    #[must_use]
    pub fn file_offset_of(&self, gpa: u64) -> Option<u64> {
        let r = self.region_of(gpa, 1)?;
        Some(r.file_offset + (gpa - r.gpa))
    }

    /// Check every rule a decoded state must keep. Nothing read from a file is used before this.
    ///
    /// # Errors
    /// [`FormatError::Invalid`] naming the broken rule.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |s: String| Err(FormatError::Invalid(s));
        self.geometry
            .validate()
            .map_err(|e| FormatError::Invalid(format!("geometry: {e}")))?;
        let g = self.geometry.granule;
        if self.backend.is_empty()
            || self.backend.len() > MAX_BACKEND_NAME
            || !self
                .backend
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "backend name {:?} is not a short identifier",
                self.backend
            ));
        }
        match (self.kind, &self.parent) {
            (SnapshotKind::Full, Some(_)) => return bad("a full snapshot has a parent".into()),
            (SnapshotKind::Diff, None) => return bad("a diff snapshot has no parent".into()),
            (SnapshotKind::Diff, Some(p)) => {
                validate_recorded_path("parent state file", &p.state)?;
                if p.id == self.id {
                    return bad(format!("snapshot {} names itself as parent", self.id));
                }
            }
            (SnapshotKind::Full, None) => {}
        }
        validate_recorded_path("memory file", &self.memory)?;
        if self.layout.is_empty() {
            return bad("the memory layout has no regions".into());
        }
        if self.layout.len() > MAX_REGIONS {
            return bad(format!(
                "the memory layout has {} regions (at most {MAX_REGIONS})",
                self.layout.len()
            ));
        }
        let mut offset = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in self.layout.iter().enumerate() {
            let range =
                GpaRange::new(r.gpa, r.len).map_err(|e| FormatError::Invalid(format!("region {i}: {e}")))?;
            if !range.is_aligned(g) {
                return bad(format!(
                    "region {i} at {:#x}+{:#x} is not aligned to the {g:#x}-byte granule",
                    r.gpa, r.len
                ));
            }
            if i > 0 && r.gpa < prev_end {
                return bad(format!(
                    "region {i} at {:#x} overlaps or precedes region {}",
                    r.gpa,
                    i - 1
                ));
            }
            if r.file_offset != offset {
                return bad(format!(
                    "region {i} file offset {:#x} is not {offset:#x} (regions are packed in order)",
                    r.file_offset
                ));
            }
            prev_end = range.end();
            offset = offset
                .checked_add(r.len)
                .ok_or_else(|| FormatError::Invalid("layout size overflows".into()))?;
        }
        let mut prev: Option<GpaRange> = None;
        for (i, e) in self.extents.iter().enumerate() {
            let range = GpaRange::new(e.gpa, e.len)
                .map_err(|err| FormatError::Invalid(format!("extent {i}: {err}")))?;
            if !range.is_aligned(g) {
                return bad(format!(
                    "extent {i} at {:#x}+{:#x} is not aligned to the {g:#x}-byte granule",
                    e.gpa, e.len
                ));
            }
            if self.region_of(e.gpa, e.len).is_none() {
                return bad(format!(
                    "extent {i} at {:#x}+{:#x} lies outside guest RAM (not inside one region of the layout)",
                    e.gpa, e.len
                ));
            }
            if let Some(p) = prev
                && range.start() < p.end()
            {
                return bad(format!(
                    "extent {i} at {:#x}+{:#x} overlaps or precedes the extent before it ({:#x}+{:#x})",
                    e.gpa,
                    e.len,
                    p.start(),
                    p.len()
                ));
            }
            prev = Some(range);
        }
        // Extents are inside the layout and do not overlap, so covering as many bytes as the
        // layout means covering all of it.
        if self.kind == SnapshotKind::Full && self.extent_bytes() != self.layout_bytes() {
            return bad(format!(
                "a full snapshot's extents must cover exactly its regions ({:#x} of {:#x} bytes)",
                self.extent_bytes(),
                self.layout_bytes()
            ));
        }
        Ok(())
    }

    /// Encode as a complete state file (header + body).
    ///
    /// # Errors
    /// [`FormatError::Invalid`] when the state breaks a rule, [`FormatError::TooLarge`] when it
    /// would exceed the load cap.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        self.encode_unchecked()
    }

    /// Encode without checking the rules: for tests and fuzz seeds that craft hostile files
    /// (a correct CRC over a body that breaks a rule). Never use it to save a snapshot.
    ///
    /// # Errors
    /// [`FormatError::TooLarge`] when the body would exceed the load cap.
    pub fn encode_unchecked(&self) -> Result<Vec<u8>, FormatError> {
        let body = postcard::to_stdvec(self).map_err(|e| FormatError::Decode(e.to_string()))?;
        let body_len = u64::try_from(body.len()).map_err(|_| FormatError::TooLarge { body_len: u64::MAX })?;
        if body_len + HEADER_LEN as u64 > MAX_STATE_FILE {
            return Err(FormatError::TooLarge { body_len });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&CRC64.checksum(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decode and validate a complete state file.
    ///
    /// ```
    /// use squib_snapshot::snapshot::format::{FormatError, SnapshotState};
    /// assert_eq!(SnapshotState::decode(b"SQUIB"), Err(FormatError::TruncatedHeader { len: 5 }));
    /// ```
    ///
    /// # Errors
    /// The first [`FormatError`] found, header first, then CRC, then codec, then rules.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or(FormatError::TruncatedHeader { len: bytes.len() })?;
        let word =
            |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let dword = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if header[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let reserved = word(12);
        if reserved != 0 {
            return Err(FormatError::Reserved { found: reserved });
        }
        let body_len = dword(16);
        if body_len > MAX_STATE_FILE - HEADER_LEN as u64 {
            return Err(FormatError::TooLarge { body_len });
        }
        let found = bytes.len() as u64;
        let expected = HEADER_LEN as u64 + body_len;
        if found != expected {
            return Err(FormatError::LengthMismatch { expected, found });
        }
        let body = &bytes[HEADER_LEN..];
        let crc = CRC64.checksum(body);
        if crc != dword(24) {
            return Err(FormatError::Crc {
                expected: dword(24),
                found: crc,
            });
        }
        let (state, rest): (Self, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| FormatError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FormatError::TrailingBytes(rest.len()));
        }
        state.validate()?;
        Ok(state)
    }
}

/// A recorded path (the memory file, the parent's state file) is input like any other byte: it
/// must be non-empty, at most [`MAX_RECORDED_PATH`] bytes, and free of NUL (which no path can
/// hold). It may point anywhere, as the user's own paths may; what is found there is checked
/// (a regular file, the right id) before it is used.
fn validate_recorded_path(what: &str, path: &str) -> Result<(), FormatError> {
    if path.is_empty() || path.len() > MAX_RECORDED_PATH || path.contains('\0') {
        return Err(FormatError::Invalid(format!(
            "{what} path {:?} is empty, longer than {MAX_RECORDED_PATH} bytes or holds a NUL",
            path.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// The identity trailer at the end of every memory file: which snapshot's memory the file holds.
///
/// Why a trailer: a lazy load maps the memory file without reading it, so checksums cannot tell
/// it whether the file is the one its state file describes. The trailer can, with one small
/// read: a swapped file, or a base memory file that an in-place merge has since overwritten (its
/// trailer now carries the merge's id), is refused by name before anything is mapped. It sits
/// after the guest's bytes, so regions keep their offsets and the file maps as Firecracker's
/// does.
///
/// Bytes (little-endian): magic `SQUIBMEM`, `u32` trailer version 1, `u32` reserved 0, `u128`
/// snapshot id, `u64` layout size, `u64` CRC-64/XZ of the 40 bytes before it; the rest of the
/// page is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryTrailer {
    /// The snapshot whose memory the file holds.
    pub id: SnapshotId,
    /// The layout size the file was written for (the trailer's own offset).
    pub layout_bytes: u64,
}

impl MemoryTrailer {
    /// The trailer's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; MEMORY_TRAILER_USED] {
        let mut out = [0u8; MEMORY_TRAILER_USED];
        out[..8].copy_from_slice(&MEMORY_MAGIC);
        out[8..12].copy_from_slice(&MEMORY_TRAILER_VERSION.to_le_bytes());
        out[16..32].copy_from_slice(&self.id.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.layout_bytes.to_le_bytes());
        let crc = CRC64.checksum(&out[..40]);
        out[40..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a trailer's first [`MEMORY_TRAILER_USED`] bytes.
    ///
    /// # Errors
    /// [`FormatError::Trailer`] saying what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let b = bytes
            .get(..MEMORY_TRAILER_USED)
            .ok_or(FormatError::Trailer("too short"))?;
        if b[..8] != MEMORY_MAGIC {
            return Err(FormatError::Trailer("bad magic"));
        }
        let mut crc = [0u8; 8];
        crc.copy_from_slice(&b[40..48]);
        if CRC64.checksum(&b[..40]) != u64::from_le_bytes(crc) {
            return Err(FormatError::Trailer("CRC-64 mismatch"));
        }
        let mut word = [0u8; 4];
        word.copy_from_slice(&b[8..12]);
        if u32::from_le_bytes(word) != MEMORY_TRAILER_VERSION {
            return Err(FormatError::Trailer("unsupported trailer version"));
        }
        word.copy_from_slice(&b[12..16]);
        if u32::from_le_bytes(word) != 0 {
            return Err(FormatError::Trailer("reserved field is not zero"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[32..40]);
        Ok(Self {
            id: SnapshotId(u128::from_le_bytes(id)),
            layout_bytes: u64::from_le_bytes(len),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SnapshotState {
        SnapshotState {
            id: SnapshotId(7),
            kind: SnapshotKind::Diff,
            parent: Some(ParentRef {
                id: SnapshotId(6),
                state: "../000000-full/state".into(),
            }),
            memory: "memory".into(),
            created_unix_ms: 1,
            backend: "soft".into(),
            geometry: PageGeometry::X86_64,
            layout: vec![
                RegionLayout {
                    gpa: 0,
                    len: 0x10000,
                    file_offset: 0,
                },
                RegionLayout {
                    gpa: 0x100000,
                    len: 0x4000,
                    file_offset: 0x10000,
                },
            ],
            extents: vec![
                Extent {
                    gpa: 0x1000,
                    len: 0x2000,
                    xxh3: 1,
                },
                Extent {
                    gpa: 0x100000,
                    len: 0x1000,
                    xxh3: 2,
                },
            ],
            vcpus: vec![vec![1, 2, 3]],
            devices: vec![Section {
                name: "uart".into(),
                data: vec![9],
            }],
        }
    }

    #[test]
    fn test_should_round_trip_a_state_file() {
        let s = state();
        assert_eq!(SnapshotState::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn test_should_refuse_a_recorded_path_that_is_empty_too_long_or_holds_a_nul() {
        for bad in [
            String::new(),
            "a".repeat(MAX_RECORDED_PATH + 1),
            "mem\0ory".into(),
        ] {
            let mut s = state();
            s.memory.clone_from(&bad);
            assert!(
                matches!(s.encode(), Err(FormatError::Invalid(m)) if m.contains("memory file path")),
                "{bad:?}"
            );
            let mut s = state();
            s.parent.as_mut().unwrap().state.clone_from(&bad);
            assert!(
                matches!(s.encode(), Err(FormatError::Invalid(m)) if m.contains("parent state file path")),
                "{bad:?}"
            );
        }
        let mut s = state();
        s.memory = "/".to_owned() + &"a".repeat(MAX_RECORDED_PATH - 1);
        s.parent.as_mut().unwrap().state = "../../elsewhere/x.state".into();
        assert_eq!(SnapshotState::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn test_should_refuse_a_version_1_state_file_saying_what_wrote_it() {
        let mut bytes = state().encode().unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let err = SnapshotState::decode(&bytes).unwrap_err();
        assert_eq!(err, FormatError::UnsupportedVersion { found: 1 });
        assert!(err.to_string().contains("take the snapshot again"), "{err}");
    }

    #[test]
    fn test_should_round_trip_a_memory_trailer_and_refuse_any_flipped_bit() {
        let t = MemoryTrailer {
            id: SnapshotId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            layout_bytes: 512 << 20,
        };
        let bytes = t.encode();
        assert_eq!(&bytes[..8], b"SQUIBMEM");
        assert_eq!(MemoryTrailer::decode(&bytes).unwrap(), t);
        for bit in 0..MEMORY_TRAILER_USED * 8 {
            let mut b = bytes;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(MemoryTrailer::decode(&b).is_err(), "bit {bit}");
        }
        assert_eq!(
            MemoryTrailer::decode(&bytes[..47]),
            Err(FormatError::Trailer("too short"))
        );
    }

    #[test]
    fn test_should_refuse_an_extent_spanning_two_regions() {
        let mut s = state();
        s.layout[1].gpa = 0x10000;
        s.extents[0] = Extent {
            gpa: 0xF000,
            len: 0x2000,
            xxh3: 0,
        };
        s.extents[1] = Extent {
            gpa: 0x11000,
            len: 0x1000,
            xxh3: 0,
        };
        assert!(matches!(s.validate(), Err(FormatError::Invalid(m)) if m.contains("outside guest RAM")));
    }
}
