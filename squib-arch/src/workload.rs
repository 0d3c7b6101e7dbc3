//! The built-in workloads' names and parameters: what `--workload NAME[:k=v,...]` means.
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
//!
//! The description lives here, below every backend, because two backends run the same workloads:
//! the soft backend's simulated vCPUs draw the writes in Rust (`squib_kvm_sim::workload`), the
//! KVM backend's guests run them as x86-64 programs (`squib_kvm::guest`). One parser keeps the
//! two from drifting apart.

use crate::spec::{NamedSpec, SpecError, parse_size as parse_bytes};

/// The page writes are aligned to (`random`, `hotspot`, `stride`).
pub const WRITE_PAGE: u64 = 4096;

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

/// A byte count (`parse_size`'s rules) for the `k=v` parameters, refused by key.
pub fn parse_size(key: &str, v: &str) -> Result<u64, WorkloadError> {
    parse_bytes(v).map_err(|e| WorkloadError::BadParameter {
        key: key.into(),
        value: v.into(),
        reason: match e {
            SpecError::BadSize { reason, .. } | SpecError::BadParameter { reason, .. } => reason,
        },
    })
}

impl std::str::FromStr for WorkloadSpec {
    type Err = WorkloadError;

    /// Parse `NAME[:k=v,...]`.
    ///
    /// ```
    /// use squib_arch::workload::{WorkloadKind, WorkloadSpec};
    /// let w: WorkloadSpec = "hotspot:s=1.5,seed=7".parse().unwrap();
    /// assert_eq!((w.kind, w.seed), (WorkloadKind::Hotspot, 7));
    /// assert!("hotspot:q=1".parse::<WorkloadSpec>().is_err());
    /// ```
    fn from_str(spec: &str) -> Result<Self, WorkloadError> {
        Self::from_named(&NamedSpec::parse(spec)?)
    }
}

impl From<SpecError> for WorkloadError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::BadParameter { param, reason, .. } => Self::BadParameter {
                key: param,
                value: String::new(),
                reason,
            },
            SpecError::BadSize { text, reason } => Self::BadParameter {
                key: String::new(),
                value: text,
                reason,
            },
        }
    }
}

impl WorkloadSpec {
    /// The workload a parsed `NAME[:k=v,...]` names. A backend with keys of its own takes them
    /// out of `spec` first and passes the rest here.
    ///
    /// # Errors
    /// [`WorkloadError::UnknownWorkload`] for a name that is not built in;
    /// [`WorkloadError::BadParameter`] for an unknown key or a value out of range.
    pub fn from_named(spec: &NamedSpec<'_>) -> Result<Self, WorkloadError> {
        let kind = match spec.name {
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
        for &(k, v) in &spec.params {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_refuse_unknown_workloads_and_parameters() {
        assert!(matches!(
            "zigzag".parse::<WorkloadSpec>(),
            Err(WorkloadError::UnknownWorkload(_))
        ));
        assert!("seq:k=2".parse::<WorkloadSpec>().is_err());
        assert!("random:size=0".parse::<WorkloadSpec>().is_err());
        assert!("hotspot:s=-1".parse::<WorkloadSpec>().is_err());
        assert!("random:seed=1,seed=2".parse::<WorkloadSpec>().is_err());
        assert!("random:size".parse::<WorkloadSpec>().is_err());
    }

    #[test]
    fn test_should_read_every_parameter() {
        let w: WorkloadSpec = "stride:k=4,seed=7,size=64,start=1M,len=2M".parse().unwrap();
        assert_eq!(
            (w.kind, w.k, w.seed, w.size, w.start, w.len),
            (WorkloadKind::Stride, 4, 7, 64, 1 << 20, Some(2 << 20))
        );
        let w: WorkloadSpec = "hotspot:s=1.5".parse().unwrap();
        assert!((w.s - 1.5).abs() < f64::EPSILON);
    }
}
