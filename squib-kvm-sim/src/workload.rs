//! Built-in guest workloads for simulated vCPUs.
//!
//! The policies trade faults against diff bytes, and which one wins depends on how a guest's
//! writes are spread: a sequential writer fills whole blocks, random writes touch one page per
//! block, a hot spot concentrates on a few blocks. Each workload reproduces one of those shapes,
//! deterministically for a given seed (each vCPU draws from its own stream derived from the seed
//! and its id), so a run can be repeated and compared across policies.
//!
//! A workload is named `NAME[:k=v,...]`. Parameters every workload takes: `seed` (default 1),
//! `size` (bytes per write, default 8), `start` and `len` (the byte range of RAM it writes,
//! default all of it). Per workload: `stride` takes `k` (one write every k pages, default 16);
//! `hotspot` takes `s` (the Zipf exponent over 2 MiB blocks, default 1.2). Sizes accept K, M
//! and G suffixes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The page writes are aligned to (`random`, `hotspot`, `stride`).
pub const WRITE_PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;

/// What a workload specification can be wrong about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// The name is not a built-in workload.
    #[error("unknown workload {0:?}: expected seq, random, hotspot, stride or idle")]
    UnknownWorkload(String),
    /// A parameter is malformed, unknown or out of range.
    #[error("workload parameter {key:?} = {value:?}: {reason}")]
    BadParameter {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The built-in workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// A sequential writer over its range (each vCPU over its own slice), wrapping around.
    Seq,
    /// Uniform 4 KiB-aligned writes over the range.
    Random,
    /// Zipf-distributed over 2 MiB blocks, uniform 4 KiB-aligned within a block.
    Hotspot,
    /// One write every `k` pages, sequentially (each vCPU over its own slice), wrapping around.
    Stride,
    /// No writes at all.
    Idle,
}

/// A parsed workload specification.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// Which workload.
    pub kind: WorkloadKind,
    /// Seed of the deterministic streams.
    pub seed: u64,
    /// Bytes per write.
    pub size: u64,
    /// First byte of the range, as an offset into RAM.
    pub start: u64,
    /// Length of the range (`None`: to the end of RAM).
    pub len: Option<u64>,
    /// `stride`: pages between writes.
    pub k: u64,
    /// `hotspot`: Zipf exponent.
    pub s: f64,
}

/// A byte count with an optional K, M or G suffix (binary units), for the `k=v` parameters.
pub(crate) fn parse_size(key: &str, v: &str) -> Result<u64, WorkloadError> {
    let bad = |reason| WorkloadError::BadParameter {
        key: key.into(),
        value: v.into(),
        reason,
    };
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..split].parse().map_err(|_| bad("not a number"))?;
    let mult = match v[split..].trim_end_matches(['B', 'i']) {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return Err(bad("unknown unit (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| bad("too large"))
}

impl std::str::FromStr for WorkloadSpec {
    type Err = WorkloadError;

    /// Parse `NAME[:k=v,...]`.
    ///
    /// ```
    /// use squib_kvm_sim::workload::{WorkloadKind, WorkloadSpec};
    /// let w: WorkloadSpec = "hotspot:s=1.5,seed=7".parse().unwrap();
    /// assert_eq!((w.kind, w.seed), (WorkloadKind::Hotspot, 7));
    /// assert!("hotspot:q=1".parse::<WorkloadSpec>().is_err());
    /// ```
    fn from_str(spec: &str) -> Result<Self, WorkloadError> {
        let (name, params) = spec.split_once(':').unwrap_or((spec, ""));
        let kind = match name {
            "seq" => WorkloadKind::Seq,
            "random" => WorkloadKind::Random,
            "hotspot" => WorkloadKind::Hotspot,
            "stride" => WorkloadKind::Stride,
            "idle" => WorkloadKind::Idle,
            other => return Err(WorkloadError::UnknownWorkload(other.into())),
        };
        let mut w = Self {
            kind,
            seed: 1,
            size: 8,
            start: 0,
            len: None,
            k: 16,
            s: 1.2,
        };
        for kv in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| WorkloadError::BadParameter {
                key: kv.into(),
                value: String::new(),
                reason: "expected key=value",
            })?;
            let bad = |reason| WorkloadError::BadParameter {
                key: k.into(),
                value: v.into(),
                reason,
            };
            match (k, kind) {
                ("seed", _) => w.seed = v.parse().map_err(|_| bad("not an unsigned integer"))?,
                ("size", _) => w.size = parse_size(k, v)?,
                ("start", _) => w.start = parse_size(k, v)?,
                ("len", _) => w.len = Some(parse_size(k, v)?),
                ("k", WorkloadKind::Stride) => w.k = v.parse().map_err(|_| bad("not an unsigned integer"))?,
                ("s", WorkloadKind::Hotspot) => {
                    w.s = v.parse().map_err(|_| bad("not a number"))?;
                    if !w.s.is_finite() || w.s < 0.0 {
                        return Err(bad("must be a finite, non-negative exponent"));
                    }
                }
                _ => return Err(bad("not a parameter of this workload")),
            }
        }
        if w.size == 0 || w.size > 1 << 20 {
            return Err(WorkloadError::BadParameter {
                key: "size".into(),
                value: w.size.to_string(),
                reason: "must be between 1 byte and 1 MiB",
            });
        }
        if w.k == 0 {
            return Err(WorkloadError::BadParameter {
                key: "k".into(),
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        Ok(w)
    }
}

/// One vCPU's stream of writes.
pub trait Workload: Send {
    /// The next write, as (offset into RAM, length), or `None` for a workload that does not write.
    fn next_write(&mut self) -> Option<(u64, u64)>;
}

impl WorkloadSpec {
    /// Build the stream of vCPU `vcpu` (of `vcpus`) over RAM of `ram_len` bytes.
    ///
    /// # Errors
    /// [`WorkloadError::BadParameter`] when the range does not fit in RAM or cannot hold a write.
    pub fn build(&self, ram_len: u64, vcpu: u32, vcpus: u32) -> Result<Box<dyn Workload>, WorkloadError> {
        let len = self.len.unwrap_or_else(|| ram_len.saturating_sub(self.start));
        let bad = |reason| WorkloadError::BadParameter {
            key: "start/len".into(),
            value: format!("{:#x}+{:#x}", self.start, len),
            reason,
        };
        if self.start.checked_add(len).is_none_or(|e| e > ram_len) {
            return Err(bad("the range runs past the end of guest RAM"));
        }
        if self.kind != WorkloadKind::Idle && len < self.size.max(WRITE_PAGE) {
            return Err(bad("the range is smaller than one page"));
        }
        let rng = ChaCha8Rng::seed_from_u64(self.seed ^ u64::from(vcpu).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Sequential workloads give each vCPU its own page-aligned slice.
        let n = u64::from(vcpus.max(1));
        let slice = (len / n) & !(WRITE_PAGE - 1);
        let (s_start, s_len) = if slice >= self.size.max(WRITE_PAGE) {
            (self.start + slice * u64::from(vcpu), slice)
        } else {
            (self.start, len)
        };
        Ok(match self.kind {
            WorkloadKind::Idle => Box::new(Idle),
            WorkloadKind::Seq => Box::new(Seq {
                start: s_start,
                len: s_len,
                size: self.size,
                at: 0,
            }),
            WorkloadKind::Stride => Box::new(Stride {
                start: s_start,
                pages: s_len / WRITE_PAGE,
                k: self.k,
                size: self.size.min(WRITE_PAGE),
                page: 0,
            }),
            WorkloadKind::Random => Box::new(Random {
                start: self.start,
                slots: (len - self.size) / WRITE_PAGE + 1,
                size: self.size,
                rng,
            }),
            WorkloadKind::Hotspot => Box::new(Hotspot::new(self, self.start, len, rng)),
        })
    }
}

struct Idle;

impl Workload for Idle {
    fn next_write(&mut self) -> Option<(u64, u64)> {
        None
    }
}

struct Seq {
    start: u64,
    len: u64,
    size: u64,
    at: u64,
}

impl Workload for Seq {
    fn next_write(&mut self) -> Option<(u64, u64)> {
        if self.at + self.size > self.len {
            self.at = 0;
        }
        let w = (self.start + self.at, self.size);
        self.at += self.size;
        Some(w)
    }
}

struct Stride {
    start: u64,
    pages: u64,
    k: u64,
    size: u64,
    page: u64,
}

impl Workload for Stride {
    fn next_write(&mut self) -> Option<(u64, u64)> {
        if self.page >= self.pages {
            // Next pass shifted by one page, so successive passes touch different pages.
            self.page = (self.page + 1) % self.k.min(self.pages.max(1));
        }
        let w = (self.start + self.page * WRITE_PAGE, self.size);
        self.page += self.k;
        Some(w)
    }
}

struct Random {
    start: u64,
    slots: u64,
    size: u64,
    rng: ChaCha8Rng,
}

impl Workload for Random {
    fn next_write(&mut self) -> Option<(u64, u64)> {
        let slot = self.rng.random_range(0..self.slots);
        Some((self.start + slot * WRITE_PAGE, self.size))
    }
}

struct Hotspot {
    start: u64,
    len: u64,
    size: u64,
    /// Cumulative Zipf weights by rank.
    cdf: Box<[f64]>,
    /// Block of each rank: a seed-determined permutation shared by every vCPU.
    block_of_rank: Box<[u64]>,
    rng: ChaCha8Rng,
}

impl Hotspot {
    fn new(spec: &WorkloadSpec, start: u64, len: u64, rng: ChaCha8Rng) -> Self {
        let blocks = len.div_ceil(BLOCK).max(1);
        let mut acc = 0.0;
        let cdf = (1..=blocks)
            .map(|rank| {
                #[allow(clippy::cast_precision_loss)] // block counts are far below 2^53
                let w = 1.0 / (rank as f64).powf(spec.s);
                acc += w;
                acc
            })
            .collect();
        let mut block_of_rank: Vec<u64> = (0..blocks).collect();
        let mut perm = ChaCha8Rng::seed_from_u64(spec.seed);
        for i in (1..block_of_rank.len()).rev() {
            let j = perm.random_range(0..=i);
            block_of_rank.swap(i, j);
        }
        Self {
            start,
            len,
            size: spec.size,
            cdf,
            block_of_rank: block_of_rank.into_boxed_slice(),
            rng,
        }
    }
}

impl Workload for Hotspot {
    fn next_write(&mut self) -> Option<(u64, u64)> {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let u = self.rng.random::<f64>() * total;
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
        let base = self.block_of_rank[rank] * BLOCK;
        let room = self.len.min(base + BLOCK).saturating_sub(base);
        let slots = room.saturating_sub(self.size) / WRITE_PAGE + 1;
        let slot = self.rng.random_range(0..slots);
        let off = (base + slot * WRITE_PAGE).min(self.len - self.size);
        Some((self.start + off, self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn take(spec: &str, ram: u64, vcpu: u32, n: usize) -> Vec<(u64, u64)> {
        let mut w = spec.parse::<WorkloadSpec>().unwrap().build(ram, vcpu, 2).unwrap();
        (0..n).map_while(|_| w.next_write()).collect()
    }

    #[test]
    fn test_should_repeat_a_workload_for_the_same_seed_and_differ_for_another() {
        for name in ["random", "hotspot"] {
            let a = take(&format!("{name}:seed=3"), 64 << 20, 0, 500);
            assert_eq!(a, take(&format!("{name}:seed=3"), 64 << 20, 0, 500));
            assert_ne!(a, take(&format!("{name}:seed=4"), 64 << 20, 0, 500));
            assert_ne!(a, take(&format!("{name}:seed=3"), 64 << 20, 1, 500));
        }
    }

    #[test]
    fn test_should_keep_every_write_inside_its_range_and_page_aligned() {
        for name in [
            "seq:size=4096",
            "random",
            "hotspot",
            "stride:k=3",
            "random:start=1M,len=2M",
        ] {
            for (off, len) in take(name, 16 << 20, 1, 5000) {
                assert!(off + len <= 16 << 20, "{name}: {off:#x}+{len}");
                if !name.starts_with("seq") {
                    assert_eq!(off % WRITE_PAGE, 0, "{name}");
                }
                if name.contains("start=1M") {
                    assert!(off >= 1 << 20 && off + len <= 3 << 20);
                }
            }
        }
    }

    #[test]
    fn test_should_concentrate_hotspot_writes_on_few_blocks() {
        let mut per_block: HashMap<u64, u32> = HashMap::new();
        for (off, _) in take("hotspot:s=1.5", 256 << 20, 0, 10_000) {
            *per_block.entry(off / BLOCK).or_default() += 1;
        }
        let mut counts: Vec<u32> = per_block.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top4: u32 = counts.iter().take(4).sum();
        assert!(
            top4 > 5_000,
            "the four hottest blocks took only {top4} of 10000 writes"
        );
    }

    #[test]
    fn test_should_write_sequentially_and_by_stride() {
        let w = take("seq:size=4096", 64 << 20, 0, 3);
        assert_eq!(w, vec![(0, 4096), (4096, 4096), (8192, 4096)]);
        let w = take("stride:k=4", 64 << 20, 1, 2);
        assert_eq!(w, vec![(32 << 20, 8), ((32 << 20) + 4 * 4096, 8)]);
        assert!(take("idle", 64 << 20, 0, 10).is_empty());
    }

    #[test]
    fn test_should_refuse_unknown_workloads_and_parameters() {
        assert!(matches!(
            "zigzag".parse::<WorkloadSpec>(),
            Err(WorkloadError::UnknownWorkload(_))
        ));
        assert!("seq:k=2".parse::<WorkloadSpec>().is_err());
        assert!("random:size=0".parse::<WorkloadSpec>().is_err());
        assert!("hotspot:s=-1".parse::<WorkloadSpec>().is_err());
        let w: WorkloadSpec = "random:start=60M,len=8M".parse().unwrap();
        assert!(w.build(64 << 20, 0, 1).is_err());
    }
}
