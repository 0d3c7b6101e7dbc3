//! The built-in workloads' write streams, for simulated vCPUs.
//!
//! The policies trade faults against diff bytes, and which one wins depends on how a guest's
//! writes are spread: a sequential writer fills whole blocks, random writes touch one page per
//! block, a hot spot concentrates on a few blocks. Each stream reproduces one of those shapes,
//! deterministically for a given seed (each vCPU draws from its own stream derived from the seed
//! and its id), so a run can be repeated and compared across policies. What the names and
//! parameters mean is [`squib_arch::workload`]'s, shared with the KVM guests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
pub use squib_arch::workload::{WRITE_PAGE, WorkloadError, WorkloadKind, WorkloadSpec};

const BLOCK: u64 = 2 << 20;

/// One vCPU's stream of writes.
pub trait Workload: Send {
    /// The next write, as (offset into RAM, length), or `None` for a workload that does not write.
    fn next_write(&mut self) -> Option<(u64, u64)>;
}

/// Build the stream of vCPU `vcpu` (of `vcpus`) of `spec` over RAM of `ram_len` bytes.
///
/// # Errors
/// [`WorkloadError::BadParameter`] when the range does not fit in RAM or cannot hold a write.
pub fn stream(
    spec: &WorkloadSpec,
    ram_len: u64,
    vcpu: u32,
    vcpus: u32,
) -> Result<Box<dyn Workload>, WorkloadError> {
    let len = spec.len.unwrap_or_else(|| ram_len.saturating_sub(spec.start));
    let bad = |reason| WorkloadError::BadParameter {
        key: "start/len".into(),
        value: format!("{:#x}+{:#x}", spec.start, len),
        reason,
    };
    if spec.start.checked_add(len).is_none_or(|e| e > ram_len) {
        return Err(bad("the range runs past the end of guest RAM"));
    }
    if spec.kind != WorkloadKind::Idle && len < spec.size.max(WRITE_PAGE) {
        return Err(bad("the range is smaller than one page"));
    }
    let rng = ChaCha8Rng::seed_from_u64(spec.seed ^ u64::from(vcpu).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // Sequential workloads give each vCPU its own page-aligned slice.
    let n = u64::from(vcpus.max(1));
    let slice = (len / n) & !(WRITE_PAGE - 1);
    let (s_start, s_len) = if slice >= spec.size.max(WRITE_PAGE) {
        (spec.start + slice * u64::from(vcpu), slice)
    } else {
        (spec.start, len)
    };
    Ok(match spec.kind {
        WorkloadKind::Idle => Box::new(Idle),
        WorkloadKind::Seq => Box::new(Seq {
            start: s_start,
            len: s_len,
            size: spec.size,
            at: 0,
        }),
        WorkloadKind::Stride => Box::new(Stride {
            start: s_start,
            pages: s_len / WRITE_PAGE,
            k: spec.k,
            size: spec.size.min(WRITE_PAGE),
            page: 0,
        }),
        WorkloadKind::Random => Box::new(Random {
            start: spec.start,
            slots: (len - spec.size) / WRITE_PAGE + 1,
            size: spec.size,
            rng,
        }),
        WorkloadKind::Hotspot => Box::new(Hotspot::new(spec, spec.start, len, rng)),
    })
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
        let mut w = stream(&spec.parse::<WorkloadSpec>().unwrap(), ram, vcpu, 2).unwrap();
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
    fn test_should_refuse_a_range_past_the_end_of_ram() {
        let w: WorkloadSpec = "random:start=60M,len=8M".parse().unwrap();
        assert!(stream(&w, 64 << 20, 0, 1).is_err());
        assert!(stream(&w, 68 << 20, 0, 1).is_ok());
    }
}
