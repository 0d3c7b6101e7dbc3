//! The guest programs: the workload shapes, written as x86-64 assembly with iced-x86's code
//! assembler, run by every vCPU as 64-bit user-mode (CPL3) code.
//!
//! Why CPL3 and why so little code: the guest is the thing being measured. It must write memory
//! the way a real guest does (the CPU's stores going through the hypervisor's stage-2 / shadow
//! tables, so that the kernel's dirty log and userfaultfd see real writes), and nothing else.
//! There is no guest kernel: the VMM puts the vCPU straight into 64-bit user mode with page tables
//! it built, and the program reports to the VMM with port I/O (`out`, allowed at CPL3 by the TSS
//! I/O permission bitmap).
//! On nested hypervisors that emulate CPL0 instruction by instruction, user-mode code is also the
//! only kind that runs at native speed.
//!
//! # Workloads
//!
//! `--workload NAME[:k=v,...]`, the same names and keys as the soft backend's workloads:
//!
//! | name | writes |
//! |---|---|
//! | `seq` | successive `len`-byte writes through the range, wrapping |
//! | `random` | uniformly random `len`-aligned writes in the range (xorshift64, from `seed`) |
//! | `hotspot` | `pct`% of writes uniformly in the first `hot` bytes of the range, the rest anywhere |
//! | `stride` | one write every `stride` bytes; each pass starts `len` bytes further on |
//! | `idle` | none: the vCPU reports and waits |
//!
//! Keys: `seed` (default 1), `range` (bytes of RAM covered, from the start of RAM; default all),
//! `len` (bytes per write, a power of two from 8 to 4096; default 8), `hot` (default range/16),
//! `pct` (default 90), `stride` (default 4096), `report` (writes between progress exits; default
//! 65536). Sizes take K, M and G suffixes. With several vCPUs the range is cut into one equal
//! slice per vCPU, and vCPU `i` seeds its generator with `seed + i`, so runs are reproducible
//! per vCPU (the interleaving between vCPUs is the host's).
//!
//! Every write stores the vCPU's running value: `(vcpu + 1) << 56 | n` for its `n`-th write, so
//! restored memory can be checked for both "which bytes" and "which write".

use std::str::FromStr;

use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, dx, eax, ebx, ecx, edx, esi, qword_ptr, r8, r9, r10, r11, r12, r13, r14, r15,
    rax, rbp, rbx, rcx, rdi, rdx, rsi,
};

/// Port a workload writes to every `report` writes (progress).
pub const PORT_PROGRESS: u16 = 0x510;
/// Port a vCPU writes to when it saw a pause request in its mailbox; it waits there.
pub const PORT_PAUSE: u16 = 0x511;
/// Port the `idle` workload writes to; the VMM sleeps the vCPU briefly.
pub const PORT_IDLE: u16 = 0x512;
/// Port the poke program writes to when its write is done.
pub const PORT_DONE: u16 = 0x513;
/// Every port a guest program writes to, with the 4 bytes an `out dx, eax` covers from each.
pub const GUEST_PORTS: std::ops::RangeInclusive<u16> = PORT_PROGRESS..=PORT_DONE + 3;
/// Writes between two looks at the mailbox (pause requests, progress word).
pub const CHECK_EVERY: u64 = 256;

/// A workload the guest cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// The workload name is unknown.
    #[error("workload {0:?}: unknown (use seq, random, hotspot, stride or idle)")]
    UnknownWorkload(String),
    /// A `k=v` parameter is malformed, unknown or out of range.
    #[error("workload {workload:?}: parameter {key:?}: {reason}")]
    BadParam {
        /// The workload spec.
        workload: String,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The workload does not fit the VM (range larger than RAM, slice smaller than a stride...).
    #[error("workload does not fit the VM: {0}")]
    DoesNotFit(String),
    /// The assembler refused the program (a bug in this module).
    #[error("assembling the guest program failed: {0}")]
    Assemble(String),
}

impl From<IcedError> for GuestError {
    fn from(e: IcedError) -> Self {
        Self::Assemble(e.to_string())
    }
}

/// The shape of a workload's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Successive writes.
    Seq,
    /// Uniformly random writes.
    Random,
    /// Mostly in a hot area at the start of the range.
    Hotspot {
        /// Bytes of the hot area (per vCPU slice, clamped to it).
        hot: Option<u64>,
        /// Percent of writes that go to the hot area.
        pct: u8,
    },
    /// One write every `stride` bytes.
    Stride {
        /// Distance between writes.
        stride: u64,
    },
    /// No writes.
    Idle,
}

/// A parsed `--workload` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// What the writes look like.
    pub shape: Shape,
    /// Generator seed.
    pub seed: u64,
    /// Bytes of RAM covered (from its start); `None` for all of it.
    pub range: Option<u64>,
    /// Bytes per write.
    pub len: u64,
    /// Writes between progress exits.
    pub report: u64,
}

fn parse_num(s: &str) -> Option<u64> {
    let t = s.trim();
    let (n, mult) = match t.as_bytes().last()? {
        b'K' | b'k' => (&t[..t.len() - 1], 1 << 10),
        b'M' | b'm' => (&t[..t.len() - 1], 1 << 20),
        b'G' | b'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    n.parse::<u64>().ok()?.checked_mul(mult)
}

impl FromStr for Workload {
    type Err = GuestError;

    /// ```
    /// use squib_kvm_sim::kvm::{Shape, Workload};
    /// let w: Workload = "stride:stride=8K,seed=7".parse().unwrap();
    /// assert_eq!((w.shape, w.seed, w.len), (Shape::Stride { stride: 8192 }, 7, 8));
    /// assert!("stride:stride=12".parse::<Workload>().unwrap_err().to_string().contains("stride"));
    /// ```
    fn from_str(spec: &str) -> Result<Self, GuestError> {
        let (name, params) = spec.split_once(':').unwrap_or((spec, ""));
        let bad = |key: &str, reason: &str| GuestError::BadParam {
            workload: spec.to_string(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let mut w = Self {
            shape: match name {
                "seq" => Shape::Seq,
                "random" => Shape::Random,
                "hotspot" => Shape::Hotspot { hot: None, pct: 90 },
                "stride" => Shape::Stride { stride: 4096 },
                "idle" => Shape::Idle,
                other => return Err(GuestError::UnknownWorkload(other.to_string())),
            },
            seed: 1,
            range: None,
            len: 8,
            report: 65536,
        };
        for kv in params.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(kv, "expected key=value"))?;
            let n = parse_num(v).ok_or_else(|| bad(k, "not a number"))?;
            match (k, &mut w.shape) {
                ("seed", _) => w.seed = n,
                ("range", _) => w.range = Some(n),
                ("len", _) => w.len = n,
                ("report", _) => w.report = n,
                ("hot", Shape::Hotspot { hot, .. }) => *hot = Some(n),
                ("pct", Shape::Hotspot { pct, .. }) => {
                    *pct = u8::try_from(n)
                        .ok()
                        .filter(|p| *p <= 100)
                        .ok_or_else(|| bad(k, "must be 0..=100"))?;
                }
                ("stride", Shape::Stride { stride }) => *stride = n,
                _ => return Err(bad(k, "unknown for this workload")),
            }
        }
        if !(8..=4096).contains(&w.len) || !w.len.is_power_of_two() {
            return Err(bad("len", "must be a power of two from 8 to 4096"));
        }
        if w.report == 0 {
            return Err(bad("report", "must be above zero"));
        }
        if w.range == Some(0) {
            return Err(bad("range", "must be above zero"));
        }
        if let Shape::Stride { stride } = w.shape
            && (stride == 0 || stride % w.len != 0)
        {
            return Err(bad("stride", "must be a non-zero multiple of len"));
        }
        Ok(w)
    }
}

/// Where one vCPU's workload runs, in guest-virtual window addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// First byte.
    pub base: u64,
    /// Bytes.
    pub len: u64,
}

impl Workload {
    /// The slice of RAM (window addresses) each of `vcpus` vCPUs writes, for `ram` bytes of RAM.
    ///
    /// # Errors
    /// [`GuestError::DoesNotFit`] when the range exceeds RAM or a slice is too small.
    pub fn slices(&self, ram: u64, vcpus: u32) -> Result<Vec<Slice>, GuestError> {
        let range = self.range.unwrap_or(ram);
        if range > ram {
            return Err(GuestError::DoesNotFit(format!(
                "range {range:#x} is larger than guest RAM ({ram:#x})"
            )));
        }
        let n = u64::from(vcpus.max(1));
        let slice = (range / n) & !4095;
        let min = match self.shape {
            Shape::Stride { stride } => stride.max(self.len),
            _ => self.len,
        };
        if slice < min.max(4096) {
            return Err(GuestError::DoesNotFit(format!(
                "range {range:#x} over {n} vCPUs leaves {slice:#x} bytes each, below {:#x}",
                min.max(4096)
            )));
        }
        Ok((0..n)
            .map(|i| Slice {
                base: i * slice,
                len: slice,
            })
            .collect())
    }

    /// The first value vCPU `vcpu` writes.
    #[must_use]
    pub const fn first_value(vcpu: u32) -> u64 {
        ((vcpu as u64 + 1) << 56) | 1
    }

    /// The generator state vCPU `vcpu` starts from (never zero: xorshift's fixed point).
    #[must_use]
    pub const fn rng_state(&self, vcpu: u32) -> u64 {
        // splitmix64 of seed + vcpu.
        let mut z = self
            .seed
            .wrapping_add(vcpu as u64)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) | 1
    }

    /// Hot-area units (writes of `len`) in a slice of `slice` bytes.
    #[must_use]
    pub fn hot_units(&self, slice: u64) -> u64 {
        match self.shape {
            Shape::Hotspot { hot, .. } => (hot.unwrap_or(slice / 16).min(slice) / self.len).max(1),
            _ => 1,
        }
    }
}

/// The registers a workload program expects at entry (the VMM sets them per vCPU).
///
/// `r8` slice base (window address), `r9` slice length, `r10` slice length in writes, `r11` hot
/// area in writes, `r12` the vCPU's mailbox, `r13` the first value, `r14` the generator state.
/// The mailbox holds the next value at offset 0 (written every [`CHECK_EVERY`] writes) and the
/// pause request at offset 8 (non-zero: exit on [`PORT_PAUSE`]).
///
/// # Errors
/// [`GuestError::Assemble`] (a bug here, not a user error).
pub fn workload_program(w: &Workload, load_va: u64) -> Result<Vec<u8>, GuestError> {
    let mut a = CodeAssembler::new(64)?;
    let checks_per_report = w.report.div_ceil(CHECK_EVERY).max(1);
    let mut top = a.create_label();
    if w.shape == Shape::Idle {
        a.set_label(&mut top)?;
        mailbox_check(&mut a)?;
        a.mov(edx, u32::from(PORT_IDLE))?;
        a.out(dx, eax)?;
        a.jmp(top)?;
        return Ok(a.assemble(load_va)?);
    }
    let shift = w.len.trailing_zeros();
    a.mov(r15, CHECK_EVERY)?;
    a.mov(rbp, checks_per_report)?;
    a.xor(ebx, ebx)?;
    a.xor(esi, esi)?;
    a.set_label(&mut top)?;
    // rax <- byte offset of this write in the slice.
    match w.shape {
        Shape::Seq => {
            let mut no_wrap = a.create_label();
            a.mov(rax, rbx)?;
            a.add(
                rbx,
                i32::try_from(w.len).map_err(|_| GuestError::Assemble("len".into()))?,
            )?;
            a.cmp(rbx, r9)?;
            a.jb(no_wrap)?;
            a.xor(ebx, ebx)?;
            a.set_label(&mut no_wrap)?;
        }
        Shape::Stride { stride } => {
            let mut no_wrap = a.create_label();
            let mut pass_ok = a.create_label();
            a.mov(rax, rbx)?;
            a.mov(rcx, stride)?;
            a.add(rbx, rcx)?;
            a.cmp(rbx, r9)?;
            a.jb(no_wrap)?;
            // Next pass: one write further on, back to the first when a stride is covered.
            a.add(
                rsi,
                i32::try_from(w.len).map_err(|_| GuestError::Assemble("len".into()))?,
            )?;
            a.cmp(rsi, rcx)?;
            a.jb(pass_ok)?;
            a.xor(esi, esi)?;
            a.set_label(&mut pass_ok)?;
            a.mov(rbx, rsi)?;
            a.set_label(&mut no_wrap)?;
        }
        Shape::Random => {
            xorshift(&mut a)?;
            a.mov(rax, r14)?;
            a.xor(edx, edx)?;
            a.div(r10)?;
            a.mov(rax, rdx)?;
            a.shl(rax, shift)?;
        }
        Shape::Hotspot { pct, .. } => {
            xorshift(&mut a)?;
            // Percentile from the high bits, unit from the whole value.
            a.mov(rax, r14)?;
            a.shr(rax, 40u32)?;
            a.xor(edx, edx)?;
            a.mov(ecx, 100u32)?;
            a.div(rcx)?;
            a.mov(rcx, r10)?;
            a.cmp(rdx, i32::from(pct))?;
            a.cmovb(rcx, r11)?;
            a.mov(rax, r14)?;
            a.xor(edx, edx)?;
            a.div(rcx)?;
            a.mov(rax, rdx)?;
            a.shl(rax, shift)?;
        }
        Shape::Idle => unreachable!("handled above"),
    }
    // The write itself.
    if w.len == 8 {
        a.mov(qword_ptr(r8 + rax), r13)?;
    } else {
        a.lea(rdi, qword_ptr(r8 + rax))?;
        a.mov(rcx, w.len / 8)?;
        a.mov(rax, r13)?;
        a.rep().stosq()?;
    }
    a.inc(r13)?;
    a.dec(r15)?;
    a.jnz(top)?;
    a.mov(r15, CHECK_EVERY)?;
    mailbox_check(&mut a)?;
    a.dec(rbp)?;
    a.jnz(top)?;
    a.mov(rbp, checks_per_report)?;
    a.mov(edx, u32::from(PORT_PROGRESS))?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    Ok(a.assemble(load_va)?)
}

/// Publish progress, and exit on [`PORT_PAUSE`] if a pause is requested. Clobbers rax, rdx.
fn mailbox_check(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut no_pause: CodeLabel = a.create_label();
    a.mov(qword_ptr(r12), r13)?;
    a.mov(rax, qword_ptr(r12 + 8))?;
    a.test(rax, rax)?;
    a.jz(no_pause)?;
    a.mov(edx, u32::from(PORT_PAUSE))?;
    a.out(dx, eax)?;
    a.set_label(&mut no_pause)?;
    Ok(())
}

/// xorshift64 on r14. Clobbers rax.
fn xorshift(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (left, n) in [(true, 13u32), (false, 7), (true, 17)] {
        a.mov(rax, r14)?;
        if left {
            a.shl(rax, n)?;
        } else {
            a.shr(rax, n)?;
        }
        a.xor(r14, rax)?;
    }
    Ok(())
}

/// The poke program: `rep stosb` of `al` over `rcx` bytes at `rdi`, then an exit on
/// [`PORT_DONE`]. The VMM uses it to make one guest write of its choosing (the conformance
/// harness, tests).
///
/// # Errors
/// [`GuestError::Assemble`] (a bug here).
pub fn poke_program(load_va: u64) -> Result<Vec<u8>, GuestError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.rep().stosb()?;
    a.mov(edx, u32::from(PORT_DONE))?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    Ok(a.assemble(load_va)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_parse_every_workload_with_its_keys() {
        let w: Workload = "hotspot:hot=1M,pct=75,seed=3,len=64,range=16M".parse().unwrap();
        assert_eq!(
            w,
            Workload {
                shape: Shape::Hotspot {
                    hot: Some(1 << 20),
                    pct: 75
                },
                seed: 3,
                range: Some(16 << 20),
                len: 64,
                report: 65536
            }
        );
        for name in ["seq", "random", "stride", "idle"] {
            assert!(name.parse::<Workload>().is_ok(), "{name}");
        }
    }

    #[test]
    fn test_should_refuse_bad_workloads_naming_the_fault() {
        let e = "walk".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("walk"), "{e}");
        let e = "seq:len=12".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("len"), "{e}");
        let e = "seq:pct=5".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("pct"), "{e}");
        let e = "hotspot:pct=101".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("pct"), "{e}");
        let e = "random:seed=x".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("seed"), "{e}");
    }

    #[test]
    fn test_should_cut_the_range_into_one_slice_per_vcpu() {
        let w: Workload = "seq:range=8M".parse().unwrap();
        let s = w.slices(16 << 20, 4).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[3],
            Slice {
                base: 6 << 20,
                len: 2 << 20
            }
        );
        assert!(w.slices(4 << 20, 1).is_err(), "range above RAM");
        let w: Workload = "stride:stride=1M".parse().unwrap();
        assert!(w.slices(2 << 20, 4).is_err(), "slice below one stride");
    }

    #[test]
    fn test_should_assemble_every_shape() {
        for spec in ["seq", "random", "hotspot", "stride", "idle", "seq:len=4096"] {
            let w: Workload = spec.parse().unwrap();
            let code = workload_program(&w, 0x1000).unwrap();
            assert!(
                code.len() > 8 && code.len() < 4096,
                "{spec}: {} bytes",
                code.len()
            );
        }
        assert!(!poke_program(0).unwrap().is_empty());
    }
}
