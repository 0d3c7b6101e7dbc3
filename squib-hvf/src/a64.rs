//! A few AArch64 instructions, encoded by hand, and the store-loop guest built from them.
//!
//! The HVF runner and its tests need a guest that stores to memory, and nothing more. A handful
//! of encoders, each checked against an assembler's output in the tests, keep that guest readable
//! source instead of an opaque byte array, without pulling in an assembler.
//!
//! The guest runs at EL1 with its MMU off, so its data accesses are Device memory: every access
//! must be naturally aligned, which the [`StoreLoop`] checks.

/// A 64-bit general-purpose register, `X0`..`X30`; number 31 is `XZR` in the instructions here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X(u8);

impl X {
    /// `Xn`.
    ///
    /// # Panics
    /// When `n > 30`.
    #[must_use]
    pub const fn n(n: u8) -> Self {
        assert!(n <= 30, "X0..X30");
        Self(n)
    }

    fn enc(self) -> u32 {
        u32::from(self.0)
    }
}

/// The zero register, `XZR`.
pub const XZR: X = X(31);

/// `movz xd, #imm16, lsl #(16 * hw)`.
///
/// # Panics
/// When `hw > 3`.
#[must_use]
pub fn movz(rd: X, imm16: u16, hw: u8) -> u32 {
    assert!(hw <= 3, "a 64-bit move shifts by 0, 16, 32 or 48");
    0xD280_0000 | (u32::from(hw) << 21) | (u32::from(imm16) << 5) | rd.enc()
}

/// `movk xd, #imm16, lsl #(16 * hw)`.
///
/// # Panics
/// When `hw > 3`.
#[must_use]
pub fn movk(rd: X, imm16: u16, hw: u8) -> u32 {
    assert!(hw <= 3, "a 64-bit move shifts by 0, 16, 32 or 48");
    0xF280_0000 | (u32::from(hw) << 21) | (u32::from(imm16) << 5) | rd.enc()
}

/// `mov xd, #value` for any 64-bit value: `movz` of the low half-word, then `movk` of the others.
#[must_use]
pub fn mov_imm64(rd: X, value: u64) -> [u32; 4] {
    let half = |i: u8| u16::try_from((value >> (16 * u32::from(i))) & 0xFFFF).expect("masked to 16 bits");
    [
        movz(rd, half(0), 0), // movz xd, #value[15:0]
        movk(rd, half(1), 1), // movk xd, #value[31:16], lsl #16
        movk(rd, half(2), 2), // movk xd, #value[47:32], lsl #32
        movk(rd, half(3), 3), // movk xd, #value[63:48], lsl #48
    ]
}

/// `mov xd, xm` (an alias of `orr xd, xzr, xm`).
#[must_use]
pub fn mov(rd: X, rm: X) -> u32 {
    0xAA00_0000 | (rm.enc() << 16) | (XZR.enc() << 5) | rd.enc()
}

/// `add xd, xn, xm`.
#[must_use]
pub fn add(rd: X, rn: X, rm: X) -> u32 {
    0x8B00_0000 | (rm.enc() << 16) | (rn.enc() << 5) | rd.enc()
}

/// `add xd, xn, #imm12`.
///
/// # Panics
/// When `imm12 >= 4096`.
#[must_use]
pub fn add_imm(rd: X, rn: X, imm12: u16) -> u32 {
    assert!(imm12 < 4096, "a 12-bit immediate");
    0x9100_0000 | (u32::from(imm12) << 10) | (rn.enc() << 5) | rd.enc()
}

/// `subs xd, xn, #imm12`.
///
/// # Panics
/// When `imm12 >= 4096`.
#[must_use]
pub fn subs_imm(rd: X, rn: X, imm12: u16) -> u32 {
    assert!(imm12 < 4096, "a 12-bit immediate");
    0xF100_0000 | (u32::from(imm12) << 10) | (rn.enc() << 5) | rd.enc()
}

/// `str xt, [xn, #offset]` (unsigned offset, a multiple of 8 below 32 KiB).
///
/// # Panics
/// When the offset is not encodable.
#[must_use]
pub fn str(rt: X, rn: X, offset: u16) -> u32 {
    assert!(
        offset.is_multiple_of(8) && offset < 0x8000,
        "a scaled 12-bit offset"
    );
    0xF900_0000 | (u32::from(offset / 8) << 10) | (rn.enc() << 5) | rt.enc()
}

/// `stp xt1, xt2, [xn, #offset]` (signed offset, a multiple of 8 in -512..=504).
///
/// # Panics
/// When the offset is not encodable.
#[must_use]
pub fn stp(rt1: X, rt2: X, rn: X, offset: i16) -> u32 {
    assert!(
        offset % 8 == 0 && (-512..=504).contains(&offset),
        "a scaled 7-bit offset"
    );
    let imm7 = u32::from((offset / 8).cast_unsigned()) & 0x7F;
    0xA900_0000 | (imm7 << 15) | (rt2.enc() << 10) | (rn.enc() << 5) | rt1.enc()
}

/// `b.ne #offset` (bytes from this instruction, a multiple of 4 within ±1 MiB).
///
/// # Panics
/// When the offset is not encodable.
#[must_use]
pub fn b_ne(offset: i32) -> u32 {
    assert!(
        offset % 4 == 0 && (-(1 << 20)..(1 << 20)).contains(&offset),
        "a 19-bit word offset"
    );
    let imm19 = (offset / 4).cast_unsigned() & 0x7_FFFF;
    0x5400_0000 | (imm19 << 5) | 0x1 // cond = NE
}

/// `b #offset` (bytes from this instruction, a multiple of 4 within ±128 MiB).
///
/// # Panics
/// When the offset is not encodable.
#[must_use]
pub fn b(offset: i32) -> u32 {
    assert!(
        offset % 4 == 0 && (-(1 << 27)..(1 << 27)).contains(&offset),
        "a 26-bit word offset"
    );
    0x1400_0000 | ((offset / 4).cast_unsigned() & 0x03FF_FFFF)
}

/// `hvc #imm16`: a hypercall, which Hypervisor.framework reports as an exception exit (EC 0x16).
#[must_use]
pub fn hvc(imm16: u16) -> u32 {
    0xD400_0002 | (u32::from(imm16) << 5)
}

/// Instructions as the little-endian bytes guest memory holds.
#[must_use]
pub fn to_bytes(code: &[u32]) -> Vec<u8> {
    code.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// A store loop the guest cannot get wrong: why a [`StoreLoop`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// The stride leaves no room for a slot or breaks alignment.
    #[error("store-loop stride {0} must be a multiple of 16 and at least 32 bytes")]
    Stride(u64),
    /// The base is not 16-byte aligned (the guest's Device-memory stores must be aligned).
    #[error("store-loop base {0:#x} must be 16-byte aligned")]
    Base(u64),
    /// Nothing to store.
    #[error("store-loop must make at least one store per pass")]
    Empty,
    /// The stores run past the end of the address space.
    #[error("store-loop of {count} stores of stride {stride} from {base:#x} runs past the address space")]
    Overflow {
        /// Base.
        base: u64,
        /// Stride.
        stride: u64,
        /// Stores per pass.
        count: u64,
    },
}

/// The guest workload: pass after pass over `count` slots `stride` bytes apart from `base`, each
/// slot taking a pair store of the pass's value at offset 16 (`stp`, which faults with ISV=0) and a
/// single store at offset 0 (`str`); the value starts at `first_value` and grows by one per pass.
/// After `passes` passes (0: never) the guest makes `hvc #0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLoop {
    /// The first slot's IPA.
    pub base: u64,
    /// Bytes from one slot to the next.
    pub stride: u64,
    /// Slots per pass.
    pub count: u64,
    /// Passes before `hvc #0`; 0 runs (practically) forever.
    pub passes: u64,
    /// The value of the first pass.
    pub first_value: u64,
}

impl StoreLoop {
    /// The bytes one slot spans.
    pub const SLOT_BYTES: u64 = 32;

    /// Check the loop can run as written.
    ///
    /// # Errors
    /// [`ProgramError`] naming the bad parameter.
    pub fn validate(&self) -> Result<(), ProgramError> {
        if self.stride < Self::SLOT_BYTES || !self.stride.is_multiple_of(16) {
            return Err(ProgramError::Stride(self.stride));
        }
        if !self.base.is_multiple_of(16) {
            return Err(ProgramError::Base(self.base));
        }
        if self.count == 0 {
            return Err(ProgramError::Empty);
        }
        self.end().ok_or(ProgramError::Overflow {
            base: self.base,
            stride: self.stride,
            count: self.count,
        })?;
        Ok(())
    }

    /// One past the last byte the loop writes.
    #[must_use]
    pub fn end(&self) -> Option<u64> {
        self.stride
            .checked_mul(self.count - 1)?
            .checked_add(self.base)?
            .checked_add(Self::SLOT_BYTES)
    }

    /// The program, position-independent, its parameters loaded by its own prologue.
    ///
    /// # Errors
    /// [`ProgramError`] as [`validate`](Self::validate).
    pub fn program(&self) -> Result<Vec<u32>, ProgramError> {
        self.validate()?;
        let (base, stride, count, value, cursor, left, passes) =
            (X::n(0), X::n(1), X::n(2), X::n(3), X::n(4), X::n(5), X::n(6));
        let mut code = Vec::new();
        code.extend(mov_imm64(base, self.base)); // mov x0, #base
        code.extend(mov_imm64(stride, self.stride)); // mov x1, #stride
        code.extend(mov_imm64(count, self.count)); // mov x2, #count
        code.extend(mov_imm64(value, self.first_value)); // mov x3, #first_value
        code.extend(mov_imm64(passes, self.passes)); // mov x6, #passes
        let outer = code.len();
        code.push(mov(cursor, base)); // outer: mov x4, x0
        code.push(mov(left, count)); //        mov x5, x2
        let inner = code.len();
        code.push(stp(value, value, cursor, 16)); // inner: stp x3, x3, [x4, #16]
        code.push(str(value, cursor, 0)); //               str x3, [x4]
        code.push(add(cursor, cursor, stride)); //         add x4, x4, x1
        code.push(subs_imm(left, left, 1)); //             subs x5, x5, #1
        code.push(b_ne(word_offset(code.len(), inner))); // b.ne inner
        code.push(add_imm(value, value, 1)); //            add x3, x3, #1
        code.push(subs_imm(passes, passes, 1)); //         subs x6, x6, #1
        code.push(b_ne(word_offset(code.len(), outer))); // b.ne outer
        let done = code.len();
        code.push(hvc(0)); //                        done: hvc #0
        code.push(b(word_offset(code.len(), done))); //    b done
        Ok(code)
    }

    /// What the slots hold after `passes_done` complete passes: `(ipa, bytes)` per slot.
    #[must_use]
    pub fn expected(&self, passes_done: u64) -> Vec<(u64, [u8; 32])> {
        let v = self
            .first_value
            .wrapping_add(passes_done.wrapping_sub(1))
            .to_le_bytes();
        let mut slot = [0u8; 32];
        slot[..8].copy_from_slice(&v);
        slot[16..24].copy_from_slice(&v);
        slot[24..].copy_from_slice(&v);
        (0..self.count)
            .map(|i| (self.base + i * self.stride, slot))
            .collect()
    }
}

/// The byte offset from instruction `from` to instruction `to`.
fn word_offset(from: usize, to: usize) -> i32 {
    let from = i32::try_from(from).expect("a short program");
    let to = i32::try_from(to).expect("a short program");
    (to - from) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each expected word is what `llvm-mc -triple=aarch64 -show-encoding` prints for the mnemonic.
    #[test]
    fn test_should_encode_as_an_assembler_does() {
        let x = X::n;
        let cases: &[(&str, u32, u32)] = &[
            ("str x1, [x0]", str(x(1), x(0), 0), 0xF900_0001),
            ("str x3, [x4]", str(x(3), x(4), 0), 0xF900_0083),
            ("stp x3, x3, [x4, #16]", stp(x(3), x(3), x(4), 16), 0xA901_0C83),
            ("stp x1, x2, [x0]", stp(x(1), x(2), x(0), 0), 0xA900_0801),
            ("add x4, x4, x1", add(x(4), x(4), x(1)), 0x8B01_0084),
            ("add x3, x3, #1", add_imm(x(3), x(3), 1), 0x9100_0463),
            ("subs x5, x5, #1", subs_imm(x(5), x(5), 1), 0xF100_04A5),
            ("subs x6, x6, #1", subs_imm(x(6), x(6), 1), 0xF100_04C6),
            ("mov x4, x0", mov(x(4), x(0)), 0xAA00_03E4),
            ("mov x0, #0x1234", movz(x(0), 0x1234, 0), 0xD282_4680),
            ("movk x0, #0x4000, lsl #16", movk(x(0), 0x4000, 1), 0xF2A8_0000),
            ("movk x7, #0xffff, lsl #48", movk(x(7), 0xFFFF, 3), 0xF2FF_FFE7),
            ("hvc #0", hvc(0), 0xD400_0002),
            ("b.ne #-12", b_ne(-12), 0x54FF_FFA1),
            ("b #-40", b(-40), 0x17FF_FFF6),
        ];
        for (mnemonic, got, want) in cases {
            assert_eq!(got, want, "{mnemonic}: {got:#010x} != {want:#010x}");
        }
    }

    #[test]
    fn test_should_load_any_64_bit_value_in_four_moves() {
        let code = mov_imm64(X::n(7), 0xFFFF_0000_4000_1234);
        assert_eq!(code, [0xD282_4687, 0xF2A8_0007, 0xF2C0_0007, 0xF2FF_FFE7]);
        assert_eq!(to_bytes(&code[..1]), [0x87, 0x46, 0x82, 0xD2]);
    }

    #[test]
    fn test_should_build_a_store_loop_that_branches_back_to_its_labels() {
        let l = StoreLoop {
            base: 0x4000_4000,
            stride: 64,
            count: 10,
            passes: 3,
            first_value: 7,
        };
        let code = l.program().unwrap();
        // 5 × 4 moves of the prologue, then the loop.
        assert_eq!(code[20], mov(X::n(4), X::n(0)));
        assert_eq!(code[22], stp(X::n(3), X::n(3), X::n(4), 16));
        assert_eq!(code[26], 0x54FF_FF81, "b.ne #-16 back to the stp");
        assert_eq!(code[29], 0x54FF_FEE1, "b.ne #-36 back to the outer mov");
        assert_eq!(code[30], hvc(0));
        assert_eq!(code[31], b(-4));
        let slots = l.expected(3);
        assert_eq!(slots.len(), 10);
        assert_eq!(slots[9].0, 0x4000_4000 + 9 * 64);
        assert_eq!(&slots[0].1[..8], &9u64.to_le_bytes());
        assert_eq!(&slots[0].1[8..16], &[0; 8]);
    }

    #[test]
    fn test_should_refuse_a_store_loop_that_cannot_run() {
        let ok = StoreLoop {
            base: 0x4000_0000,
            stride: 32,
            count: 1,
            passes: 1,
            first_value: 1,
        };
        assert!(ok.validate().is_ok());
        assert_eq!(
            StoreLoop { stride: 24, ..ok }.validate(),
            Err(ProgramError::Stride(24))
        );
        assert_eq!(
            StoreLoop { stride: 40, ..ok }.validate(),
            Err(ProgramError::Stride(40))
        );
        assert_eq!(StoreLoop { base: 8, ..ok }.validate(), Err(ProgramError::Base(8)));
        assert_eq!(StoreLoop { count: 0, ..ok }.validate(), Err(ProgramError::Empty));
        assert!(matches!(
            StoreLoop {
                base: u64::MAX - 15,
                ..ok
            }
            .validate(),
            Err(ProgramError::Overflow { .. })
        ));
        assert!(StoreLoop { count: 0, ..ok }.program().is_err());
    }
}
