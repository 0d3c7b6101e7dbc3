//! The guest programs: the workload shapes, written as x86-64 assembly with iced-x86's code
//! assembler, run by every vCPU as 64-bit user-mode (CPL3) code.
//!
//! Why CPL3 and why so little code: the guest is the thing being measured. It must write memory
//! the way a real guest does (the CPU's stores going through the hypervisor's stage-2 / shadow
//! tables, so that the kernel's dirty log and userfaultfd see real writes), and nothing else.
//! There is no guest kernel: the VMM puts the vCPU straight into 64-bit user mode with page tables
//! it built, and the program reports to the VMM with port I/O (`out`, allowed at CPL3 by the TSS
//! I/O permission bitmap). On nested hypervisors that emulate CPL0 instruction by instruction,
//! user-mode code is also the only kind that runs at native speed.
//!
//! # Workloads
//!
//! `--workload NAME[:k=v,...]` takes the soft backend's names and keys, with the same meaning:
//!
//! | name | writes |
//! |---|---|
//! | `seq` | successive `size`-byte writes, each vCPU through its own page-aligned slice, wrapping |
//! | `random` | uniform 4 KiB-aligned writes over the whole range |
//! | `hotspot` | Zipf (exponent `s`) over the range's 2 MiB blocks, uniform 4 KiB-aligned inside one; which blocks are hot is a permutation fixed by `seed` and shared by the vCPUs |
//! | `stride` | one write every `k` pages through the vCPU's slice; each pass starts one page further on |
//! | `idle` | none: the vCPU reports and waits |
//!
//! Keys: `seed` (default 1), `size` (bytes per write, 1 B to 1 MiB, default 8), `start` and `len`
//! (the byte range of RAM written, as offsets into RAM; default all of it), `k` (`stride`,
//! default 16), `s` (`hotspot`, default 1.2). KVM adds `report` (writes between progress exits,
//! default 65536). Sizes take K, M and G suffixes. A slice smaller than a page (or than `size`)
//! makes every vCPU use the whole range, as in soft.
//!
//! The guest draws from xorshift64 seeded per vCPU from `seed`, where soft draws from ChaCha8:
//! the shapes and their parameters are the same, the individual addresses are not.
//!
//! Every write stores the vCPU's running value, `(vcpu + 1) << 56 | n` for its `n`-th write
//! (a write of a size that is not a multiple of 8 repeats its low byte), so restored memory can be
//! checked for both "which bytes" and "which write".

use std::str::FromStr;

use iced_x86::IcedError;

use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, dx, eax, ebx, edx, qword_ptr, r8, r9, r10, r11, r12, r13, r14, r15, rax, rbp,
    rbx, rcx, rdi, rdx,
};
use squib_arch::spec::NamedSpec;
use squib_arch::workload::{WorkloadError, WorkloadKind, WorkloadSpec, parse_size};

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
/// The page `random`, `hotspot` and `stride` writes are aligned to.
pub const WRITE_PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;
/// Bytes per entry of the hotspot table (see [`Workload::hotspot_table`]).
pub const HOTSPOT_ENTRY: u64 = 32;

/// A workload the guest cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// The workload spec is malformed (the parser shared with the soft backend).
    #[error(transparent)]
    Spec(#[from] WorkloadError),
    /// A `k=v` parameter only this guest has (`report`) is malformed or out of range.
    #[error("workload parameter {key:?} = {value:?}: {reason}")]
    BadParameter {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The workload does not fit the VM.
    #[error("workload range {start:#x}+{len:#x}: {reason}")]
    DoesNotFit {
        /// First byte of the range (offset into RAM).
        start: u64,
        /// Its length.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Successive writes through each vCPU's slice.
    Seq,
    /// Uniform page-aligned writes over the range.
    Random,
    /// Zipf over 2 MiB blocks.
    Hotspot {
        /// The Zipf exponent.
        s: f64,
    },
    /// One write every `k` pages.
    Stride {
        /// Pages between writes.
        k: u64,
    },
    /// No writes.
    Idle,
}

/// A parsed `--workload` spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// What the writes look like.
    pub shape: Shape,
    /// Generator seed.
    pub seed: u64,
    /// Bytes per write.
    pub size: u64,
    /// First byte of the range, as an offset into RAM.
    pub start: u64,
    /// Length of the range (`None`: to the end of RAM).
    pub len: Option<u64>,
    /// Writes between progress exits.
    pub report: u64,
}

impl FromStr for Workload {
    type Err = GuestError;

    /// Parse `NAME[:k=v,...]`.
    ///
    /// ```
    /// use squib_kvm::{Shape, Workload};
    /// let w: Workload = "stride:k=4,seed=7,size=64".parse().unwrap();
    /// assert_eq!((w.shape, w.seed, w.size), (Shape::Stride { k: 4 }, 7, 64));
    /// assert!("stride:s=1".parse::<Workload>().unwrap_err().to_string().contains("\"s\""));
    /// ```
    fn from_str(spec: &str) -> Result<Self, GuestError> {
        // `report` (writes between progress exits) is this guest's own key; the names and every
        // other key are the soft backend's, read by the one parser both backends share.
        let mut named = NamedSpec::parse(spec).map_err(WorkloadError::from)?;
        let mut report = 65536;
        if let Some(at) = named.params.iter().position(|(k, _)| *k == "report") {
            let (_, v) = named.params.remove(at);
            report = parse_size("report", v)?;
            if report == 0 {
                return Err(GuestError::BadParameter {
                    key: "report".into(),
                    value: v.into(),
                    reason: "must be at least 1",
                });
            }
        }
        let w = WorkloadSpec::from_named(&named)?;
        let shape = match w.kind {
            WorkloadKind::Seq => Shape::Seq,
            WorkloadKind::Random => Shape::Random,
            WorkloadKind::Hotspot => Shape::Hotspot { s: w.s },
            WorkloadKind::Stride => Shape::Stride { k: w.k },
            WorkloadKind::Idle => Shape::Idle,
        };
        Ok(Self {
            shape,
            seed: w.seed,
            size: w.size,
            start: w.start,
            len: w.len,
            report,
        })
    }
}

/// How one vCPU runs a workload: the registers its program starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// `r8`: first byte the vCPU writes from (window address).
    pub base: u64,
    /// `r9`: bytes from `base` it may write.
    pub len: u64,
    /// `r10`: shape-specific count (`random`: page slots; `hotspot`: blocks; `stride`: pages).
    pub count: u64,
    /// `r11`: shape-specific (`stride`: pages per pass cycle; `hotspot`: its table's address,
    /// filled in by the VMM).
    pub aux: u64,
}

impl Workload {
    /// The `(start, len)` range over `ram` bytes of RAM.
    ///
    /// # Errors
    /// [`GuestError::DoesNotFit`] when it runs past RAM or cannot hold one write.
    pub fn range(&self, ram: u64) -> Result<(u64, u64), GuestError> {
        let len = self.len.unwrap_or_else(|| ram.saturating_sub(self.start));
        let bad = |reason| GuestError::DoesNotFit {
            start: self.start,
            len,
            reason,
        };
        if self.start.checked_add(len).is_none_or(|e| e > ram) {
            return Err(bad("the range runs past the end of guest RAM"));
        }
        if self.shape != Shape::Idle && len < self.size.max(WRITE_PAGE) {
            return Err(bad("the range is smaller than one page"));
        }
        Ok((self.start, len))
    }

    /// The registers vCPU `vcpu` of `vcpus` starts with, over `ram` bytes of RAM (window
    /// addresses: RAM offset = window address).
    ///
    /// # Errors
    /// As [`range`](Self::range).
    pub fn entry(&self, ram: u64, vcpu: u32, vcpus: u32) -> Result<Entry, GuestError> {
        let (start, len) = self.range(ram)?;
        let n = u64::from(vcpus.max(1));
        let slice = (len / n) & !(WRITE_PAGE - 1);
        let (s_start, s_len) = if slice >= self.size.max(WRITE_PAGE) {
            (start + slice * u64::from(vcpu), slice)
        } else {
            (start, len)
        };
        Ok(match self.shape {
            Shape::Seq | Shape::Idle => Entry {
                base: s_start,
                len: s_len,
                count: 0,
                aux: 0,
            },
            Shape::Stride { k } => {
                let pages = s_len / WRITE_PAGE;
                Entry {
                    base: s_start,
                    len: s_len,
                    count: pages,
                    aux: k.min(pages.max(1)),
                }
            }
            Shape::Random => Entry {
                base: start,
                len,
                count: (len - self.size) / WRITE_PAGE + 1,
                aux: 0,
            },
            Shape::Hotspot { .. } => Entry {
                base: start,
                len,
                count: len.div_ceil(BLOCK).max(1),
                aux: 0,
            },
        })
    }

    /// The first value vCPU `vcpu` writes.
    #[must_use]
    pub const fn first_value(vcpu: u32) -> u64 {
        ((vcpu as u64 + 1) << 56) | 1
    }

    /// The generator state vCPU `vcpu` starts from (never zero: xorshift's fixed point).
    #[must_use]
    pub const fn rng_state(&self, vcpu: u32) -> u64 {
        splitmix(self.seed ^ (vcpu as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
    }

    /// The `hotspot` sampling table over `ram` bytes of RAM: one [`HOTSPOT_ENTRY`]-byte entry per
    /// Zipf rank, `[threshold, alias, block offset, page slots]` as little-endian u64s. A draw
    /// picks rank `i` uniformly, keeps it if a 32-bit draw is below `threshold` and takes
    /// `alias` otherwise (Walker's alias method: O(1) in the guest, exact Zipf weights); the
    /// entry's block offset (from the range start, in the seed's permutation) and page-slot
    /// count then place the write. Empty for other shapes.
    ///
    /// # Errors
    /// As [`range`](Self::range).
    pub fn hotspot_table(&self, ram: u64) -> Result<Vec<u8>, GuestError> {
        let Shape::Hotspot { s } = self.shape else {
            return Ok(Vec::new());
        };
        let (_, len) = self.range(ram)?;
        let blocks = len.div_ceil(BLOCK).max(1);
        let n = usize::try_from(blocks).unwrap_or(usize::MAX);
        // Zipf weights by rank, normalised to mean 1.
        #[allow(clippy::cast_precision_loss)] // ranks and block counts are far below 2^53
        let weights: Vec<f64> = (1..=blocks).map(|r| 1.0 / (r as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        #[allow(clippy::cast_precision_loss)]
        let mut prob: Vec<f64> = weights.iter().map(|w| w * blocks as f64 / total).collect();
        let mut alias: Vec<usize> = (0..n).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| prob[i] < 1.0);
        while let (Some(&l), Some(&g)) = (small.last(), large.last()) {
            small.pop();
            alias[l] = g;
            prob[g] -= 1.0 - prob[l];
            if prob[g] < 1.0 {
                large.pop();
                small.push(g);
            }
        }
        for i in small.into_iter().chain(large) {
            prob[i] = 1.0;
        }
        // Which block each rank is: a permutation fixed by the seed, shared by every vCPU.
        let mut block_of_rank: Vec<u64> = (0..blocks).collect();
        let mut x = splitmix(self.seed);
        for i in (1..n).rev() {
            x = splitmix(x);
            let j = usize::try_from(x % (i as u64 + 1)).unwrap_or(0);
            block_of_rank.swap(i, j);
        }
        let mut out = Vec::with_capacity(n * 32);
        for i in 0..n {
            // In [0, 2^32]: a 32-bit draw below it keeps rank i.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let threshold = (prob[i].clamp(0.0, 1.0) * 4_294_967_296.0) as u64;
            let base = block_of_rank[i] * BLOCK;
            let room = len.min(base + BLOCK).saturating_sub(base);
            let slots = room.saturating_sub(self.size) / WRITE_PAGE + 1;
            for v in [threshold, alias[i] as u64, base, slots] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(out)
    }
}

const fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The workload program, assembled to run at `load_va`.
///
/// At entry (set by the VMM per vCPU, see [`Entry`]): `r8` base, `r9` length, `r10` count,
/// `r11` aux, `r12` the vCPU's mailbox, `r13` the first value, `r14` the generator state. The
/// mailbox holds the next value at offset 0 (written every [`CHECK_EVERY`] writes) and the pause
/// request at offset 8 (non-zero: exit on [`PORT_PAUSE`] and wait).
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
    let imm = |v: u64| i32::try_from(v).map_err(|_| GuestError::Assemble(format!("{v:#x}")));
    let mut size = w.size;
    a.mov(r15, CHECK_EVERY)?;
    a.mov(rbp, checks_per_report)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut top)?;
    // rax <- offset of this write from r8.
    match w.shape {
        Shape::Seq => {
            let mut fits = a.create_label();
            a.lea(rax, qword_ptr(rbx + imm(size)?))?;
            a.cmp(rax, r9)?;
            a.jbe(fits)?;
            a.xor(ebx, ebx)?;
            a.set_label(&mut fits)?;
            a.mov(rax, rbx)?;
            a.add(rbx, imm(size)?)?;
        }
        Shape::Stride { k } => {
            size = size.min(WRITE_PAGE);
            let mut in_pass = a.create_label();
            a.cmp(rbx, r10)?;
            a.jb(in_pass)?;
            // Next pass, one page further on: page = (page + 1) % min(k, pages).
            a.lea(rax, qword_ptr(rbx + 1))?;
            a.xor(edx, edx)?;
            a.div(r11)?;
            a.mov(rbx, rdx)?;
            a.set_label(&mut in_pass)?;
            a.mov(rax, rbx)?;
            a.shl(rax, 12u32)?;
            a.mov(rcx, k)?;
            a.add(rbx, rcx)?;
        }
        Shape::Random => {
            xorshift(&mut a)?;
            a.mov(rax, r14)?;
            a.xor(edx, edx)?;
            a.div(r10)?;
            a.mov(rax, rdx)?;
            a.shl(rax, 12u32)?;
        }
        Shape::Hotspot { .. } => {
            let mut keep = a.create_label();
            // Rank i uniformly, then keep it or take its alias.
            xorshift(&mut a)?;
            a.mov(rax, r14)?;
            a.xor(edx, edx)?;
            a.div(r10)?;
            a.mov(rcx, rdx)?;
            a.shl(rcx, 5u32)?;
            a.add(rcx, r11)?;
            xorshift(&mut a)?;
            a.mov(rax, r14)?;
            a.shr(rax, 32u32)?;
            a.cmp(rax, qword_ptr(rcx))?;
            a.jb(keep)?;
            a.mov(rcx, qword_ptr(rcx + 8))?;
            a.shl(rcx, 5u32)?;
            a.add(rcx, r11)?;
            a.set_label(&mut keep)?;
            // A page slot of the rank's block, clamped so the write stays in the range.
            xorshift(&mut a)?;
            a.mov(rax, r14)?;
            a.xor(edx, edx)?;
            a.div(qword_ptr(rcx + 24))?;
            a.mov(rax, rdx)?;
            a.shl(rax, 12u32)?;
            a.add(rax, qword_ptr(rcx + 16))?;
            a.mov(rdx, r9)?;
            a.sub(rdx, imm(size)?)?;
            a.cmp(rax, rdx)?;
            a.cmova(rax, rdx)?;
        }
        Shape::Idle => unreachable!("handled above"),
    }
    // The write itself.
    if size == 8 {
        a.mov(qword_ptr(r8 + rax), r13)?;
    } else {
        a.lea(rdi, qword_ptr(r8 + rax))?;
        a.mov(rax, r13)?;
        if size.is_multiple_of(8) {
            a.mov(rcx, size / 8)?;
            a.rep().stosq()?;
        } else {
            a.mov(rcx, size)?;
            a.rep().stosb()?;
        }
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
    fn test_should_parse_every_workload_with_the_soft_backends_keys() {
        let w: Workload = "hotspot:s=1.5,seed=3,size=64,start=1M,len=16M".parse().unwrap();
        assert_eq!(
            w,
            Workload {
                shape: Shape::Hotspot { s: 1.5 },
                seed: 3,
                size: 64,
                start: 1 << 20,
                len: Some(16 << 20),
                report: 65536
            }
        );
        let w: Workload = "stride:k=3".parse().unwrap();
        assert_eq!(w.shape, Shape::Stride { k: 3 });
        for name in ["seq", "random", "idle", "seq:report=1K"] {
            assert!(name.parse::<Workload>().is_ok(), "{name}");
        }
    }

    #[test]
    fn test_should_refuse_bad_workloads_naming_the_fault() {
        let e = "walk".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("walk"), "{e}");
        for (spec, key) in [
            ("seq:size=0", "size"),
            ("seq:size=2M", "size"),
            ("seq:k=5", "k"),
            ("hotspot:s=-1", "s"),
            ("stride:k=0", "k"),
            ("random:seed=x", "seed"),
            ("random:len=3Q", "len"),
        ] {
            let e = spec.parse::<Workload>().unwrap_err().to_string();
            assert!(e.contains(&format!("{key:?}")), "{spec}: {e}");
        }
    }

    #[test]
    fn test_should_slice_sequential_workloads_per_vcpu_and_share_random_ones() {
        let w: Workload = "seq:start=1M,len=8M".parse().unwrap();
        let e = w.entry(16 << 20, 3, 4).unwrap();
        assert_eq!((e.base, e.len), ((1 << 20) + (6 << 20), 2 << 20));
        let w: Workload = "stride:k=4".parse().unwrap();
        let e = w.entry(64 << 20, 1, 2).unwrap();
        assert_eq!((e.base, e.count, e.aux), (32 << 20, 8192, 4));
        let w: Workload = "random:size=16".parse().unwrap();
        let e = w.entry(8 << 20, 1, 2).unwrap();
        assert_eq!((e.base, e.len, e.count), (0, 8 << 20, 2048));
        let w: Workload = "seq:len=8K".parse().unwrap();
        let e = w.entry(8 << 20, 3, 4).unwrap();
        assert_eq!(
            (e.base, e.len),
            (0, 8 << 10),
            "slices below a page: the whole range"
        );
        let w: Workload = "seq:start=7M,len=2M".parse().unwrap();
        assert!(w.entry(8 << 20, 0, 1).is_err(), "range past RAM");
    }

    #[test]
    fn test_should_build_a_hotspot_table_with_zipf_weights() {
        let w: Workload = "hotspot:s=1.0,seed=2".parse().unwrap();
        let t = w.hotspot_table(16 << 20).unwrap();
        assert_eq!(t.len(), 8 * 32);
        let word = |i: usize, f: usize| {
            u64::from_le_bytes(t[i * 32 + f * 8..i * 32 + f * 8 + 8].try_into().unwrap())
        };
        // Each rank's probability: its kept share plus the shares others alias to it.
        let mut mass = [0f64; 8];
        for i in 0..8 {
            #[allow(clippy::cast_precision_loss)]
            let keep = word(i, 0) as f64 / 4_294_967_296.0;
            mass[i] += keep / 8.0;
            mass[usize::try_from(word(i, 1)).unwrap()] += (1.0 - keep) / 8.0;
        }
        let h: f64 = (1..=8).map(|r| 1.0 / f64::from(r)).sum();
        for (r, m) in mass.iter().enumerate() {
            let r = f64::from(u32::try_from(r).unwrap());
            assert!((m - 1.0 / (r + 1.0) / h).abs() < 1e-6, "rank {r}: {m}");
        }
        let mut blocks: Vec<u64> = (0..8).map(|i| word(i, 2) >> 21).collect();
        blocks.sort_unstable();
        assert_eq!(
            blocks,
            (0..8).collect::<Vec<_>>(),
            "ranks map to a permutation of blocks"
        );
        assert!(
            (0..8).all(|i| word(i, 3) == 512),
            "512 page slots per 2 MiB block"
        );
    }

    #[test]
    fn test_should_assemble_every_shape() {
        for spec in [
            "seq",
            "random",
            "hotspot",
            "stride",
            "idle",
            "seq:size=4096",
            "seq:size=3",
        ] {
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
