//! Tracking policies: at which unit each 2 MiB block is tracked, and when that changes.
//!
//! The trade is between faults and bytes. A block tracked at 2 MiB faults once per epoch however
//! many of its pages are written, but a single written byte puts all 2 MiB in the diff; a block
//! tracked at the hot unit faults once per written page and puts only those pages in the diff.
//! Which is cheaper depends on how densely the block is written *and* on what a fault and a
//! written byte cost on this platform, so the adaptive policy decides per block from a
//! [`CostModel`], not from a fixed fault rate.
//!
//! What a policy can observe constrains it: a block tracked coarsely faults at most once per
//! epoch, so its density is invisible until it is tracked finely again. The adaptive policy
//! therefore tracks finely by default and *escalates* a block to 2 MiB in the middle of an epoch
//! as soon as its fault count shows that the whole block would have been cheaper (a ski-rental
//! rule: the loss against the best choice in hindsight is bounded by the faults paid before the
//! switch). A block that escalated stays coarse while it keeps being written, re-measuring its
//! density now and then with an exponentially spaced fine probe; a block that goes clean returns
//! to fine tracking, where waking up costs nothing extra.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use squib_arch::PageGeometry;

/// Default step-down threshold of the `region` policy: faults per window per 2 MiB block.
pub const DEFAULT_STEP_DOWN_THRESHOLD: u32 = 32;
/// Default window of the `region` policy's fault-rate trigger.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);

/// Which unit each block is tracked at, and how that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Every block at the hot unit, always: exact diffs, most faults.
    Fine,
    /// Every block at the default (2 MiB) unit, always: fewest faults, largest diffs.
    Coarse,
    /// The original squib rule: a region starts coarse; when any one of its blocks takes more than
    /// the threshold of faults in a window, the whole region steps down to fine, for good.
    Region,
    /// Per block, in both directions, from the block's own faults and the [`CostModel`].
    Adaptive,
}

impl Policy {
    /// All policies, in the order reports list them.
    pub const ALL: [Self; 4] = [Self::Fine, Self::Coarse, Self::Region, Self::Adaptive];

    /// The policy's command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fine => "fine",
            Self::Coarse => "coarse",
            Self::Region => "region",
            Self::Adaptive => "adaptive",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown policy {s:?}: expected fine, coarse, region or adaptive"))
    }
}

/// What tracking costs on a platform: the model both the adaptive policy and trace replay use.
/// Defaults are design.md's: an HVF exit round trip, a full-range strip with TLB shoot-down, and
/// 0.5 GB/s of diff writing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Cost of one write fault (exit, mark, re-grant, resume), µs.
    pub fault_us: f64,
    /// Cost of one `write_protect` call (TLB invalidation included), µs.
    pub protect_us: f64,
    /// Diff write bandwidth, bytes per µs.
    pub write_bytes_per_us: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            fault_us: 4.0,
            protect_us: 120.0,
            write_bytes_per_us: 500.0,
        }
    }
}

impl CostModel {
    /// Modelled cost in µs of a run with these counts.
    #[must_use]
    pub fn cost_us(&self, faults: u64, protect_calls: u64, dirty_bytes: u64) -> f64 {
        #[allow(clippy::cast_precision_loss)] // a model: 2^53 faults is beyond any run
        let (f, p, b) = (faults as f64, protect_calls as f64, dirty_bytes as f64);
        f * self.fault_us + p * self.protect_us + b / self.write_bytes_per_us
    }

    /// The adaptive policy's escalation point: how many fine faults in one block within one epoch
    /// make tracking the whole block cheaper. Break-even of `n * (F + U/W)` against `F + B/W`,
    /// at least 2 and at most the number of hot units in a block.
    #[must_use]
    pub fn escalate_at(&self, geometry: &PageGeometry) -> u32 {
        #[allow(clippy::cast_precision_loss)] // sizes are at most a few MiB
        let (unit, block) = (geometry.tracking_hot as f64, geometry.tracking_default as f64);
        let unit_cost = self.fault_us + unit / self.write_bytes_per_us;
        let block_cost = self.fault_us + block / self.write_bytes_per_us;
        let k = (block_cost / unit_cost).ceil();
        let max = geometry.hot_per_block();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped below
        let k = if k.is_finite() && k > 0.0 {
            k.min(4.0e9) as u64
        } else {
            max
        };
        u32::try_from(k.clamp(2, max.max(2))).unwrap_or(u32::MAX)
    }
}

/// Everything that configures a tracker's policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrackingConfig {
    /// The policy.
    pub policy: Policy,
    /// `region` policy: faults per window per block that step the region down.
    pub step_down_threshold: u32,
    /// `region` policy: the window the threshold is counted over.
    pub window: Duration,
    /// `adaptive` policy: the platform costs it balances.
    pub cost: CostModel,
    /// `adaptive` policy: longest spacing, in dirty epochs, between fine probes of a coarse block.
    pub max_probe_interval: u16,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        Self::new(Policy::Adaptive)
    }
}

impl TrackingConfig {
    /// The defaults, with `policy`.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            step_down_threshold: DEFAULT_STEP_DOWN_THRESHOLD,
            window: DEFAULT_WINDOW,
            cost: CostModel::default(),
            max_probe_interval: 64,
        }
    }

    /// Check every field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field, its value and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, value: String, reason: &'static str| {
            Err(ConfigError { field, value, reason })
        };
        if self.step_down_threshold == 0 {
            return bad(
                "step_down_threshold",
                "0".into(),
                "must be at least 1 fault per window",
            );
        }
        if self.window.is_zero() {
            return bad("window", format!("{:?}", self.window), "must be longer than zero");
        }
        for (field, v) in [
            ("fault_us", self.cost.fault_us),
            ("protect_us", self.cost.protect_us),
            ("write_bytes_per_us", self.cost.write_bytes_per_us),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(field, v.to_string(), "must be a finite, non-negative number");
            }
        }
        if self.cost.write_bytes_per_us == 0.0 {
            return bad("write_bytes_per_us", "0".into(), "must be above zero");
        }
        if self.max_probe_interval == 0 {
            return bad("max_probe_interval", "0".into(), "must be at least 1 epoch");
        }
        Ok(())
    }
}

/// A rejected tracking configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tracking configuration: {field} = {value}: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Its value, as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The unit a block is tracked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockMode {
    /// The hot unit (a granule page).
    Fine = 0,
    /// The whole block (2 MiB).
    Coarse = 1,
}

impl BlockMode {
    pub(crate) const fn from_u8(v: u8) -> Self {
        if v == Self::Coarse as u8 {
            Self::Coarse
        } else {
            Self::Fine
        }
    }
}

/// What one block did in the epoch a checkpoint just closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EpochObservation {
    /// The mode the block started the epoch in.
    pub start: BlockMode,
    /// It escalated from fine to coarse during the epoch.
    pub escalated: bool,
    /// It was written (any unit dirty).
    pub dirty: bool,
}

/// The adaptive policy's memory of one block: when it next probes, and how far apart probes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct BlockHistory {
    probe_interval: u16,
    until_probe: u16,
    /// The current fine epoch is a probe of a block that was coarse.
    probing: bool,
}

/// The adaptive policy's decision for a block's next epoch.
pub(crate) fn adaptive_next(h: &mut BlockHistory, obs: EpochObservation, max_interval: u16) -> BlockMode {
    let was_probe = std::mem::take(&mut h.probing);
    if obs.escalated {
        // Dense enough that the whole block was cheaper. A probe that escalates again doubles the
        // spacing of the next probe; a first escalation probes again soon.
        h.probe_interval = if was_probe {
            h.probe_interval.saturating_mul(2).min(max_interval)
        } else {
            1
        };
        h.until_probe = h.probe_interval;
        return BlockMode::Coarse;
    }
    match obs.start {
        BlockMode::Coarse if obs.dirty => {
            if h.until_probe <= 1 {
                h.probing = true;
                BlockMode::Fine
            } else {
                h.until_probe -= 1;
                BlockMode::Coarse
            }
        }
        // A clean coarse block steps back to fine: idle costs nothing either way, and fine with
        // escalation bounds what a sparse wake-up costs.
        BlockMode::Coarse => BlockMode::Fine,
        BlockMode::Fine => {
            if was_probe && obs.dirty {
                // The probe found the block sparse: forget the old density.
                h.probe_interval = 1;
            }
            BlockMode::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_parse_and_name_every_policy() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
        }
        let err = "medium".parse::<Policy>().unwrap_err();
        assert!(err.contains("medium"), "{err}");
    }

    #[test]
    fn test_should_reject_bad_configuration_naming_the_field() {
        let c = TrackingConfig {
            step_down_threshold: 0,
            ..TrackingConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "step_down_threshold");
        let c = TrackingConfig {
            window: Duration::ZERO,
            ..TrackingConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "window");
        let mut c = TrackingConfig::default();
        c.cost.fault_us = f64::NAN;
        assert_eq!(c.validate().unwrap_err().field, "fault_us");
        let mut c = TrackingConfig::default();
        c.cost.write_bytes_per_us = 0.0;
        assert_eq!(c.validate().unwrap_err().field, "write_bytes_per_us");
        TrackingConfig::default().validate().unwrap();
    }

    #[test]
    fn test_should_escalate_at_the_break_even_fault_count() {
        let g = PageGeometry::APPLE_SILICON;
        // Defaults: unit = 4 + 16384/500 = 36.77 µs, block = 4 + 2 MiB/500 = 4198.3 µs.
        assert_eq!(CostModel::default().escalate_at(&g), 115);
        // Expensive faults, fast disk: a handful of pages already pay for the block.
        let nested = CostModel {
            fault_us: 50.0,
            protect_us: 120.0,
            write_bytes_per_us: 5000.0,
        };
        assert_eq!(nested.escalate_at(&g), 9);
        // Free faults: never cheaper to take the block before every page faulted.
        let free = CostModel {
            fault_us: 0.0,
            protect_us: 0.0,
            write_bytes_per_us: 500.0,
        };
        assert_eq!(free.escalate_at(&g), 128);
    }

    #[test]
    fn test_should_model_cost_as_the_design_formula() {
        let c = CostModel::default();
        assert!((c.cost_us(10, 2, 1_000_000) - (40.0 + 240.0 + 2000.0)).abs() < 1e-9);
    }

    #[test]
    fn test_should_keep_a_dense_block_coarse_and_probe_it_less_often_each_time() {
        let mut h = BlockHistory::default();
        let esc = EpochObservation {
            start: BlockMode::Fine,
            escalated: true,
            dirty: true,
        };
        let coarse_dirty = EpochObservation {
            start: BlockMode::Coarse,
            escalated: false,
            dirty: true,
        };
        assert_eq!(adaptive_next(&mut h, esc, 64), BlockMode::Coarse);
        // Interval 1: the next dirty coarse epoch probes.
        assert_eq!(adaptive_next(&mut h, coarse_dirty, 64), BlockMode::Fine);
        // The probe escalates again: interval doubles to 2.
        assert_eq!(adaptive_next(&mut h, esc, 64), BlockMode::Coarse);
        assert_eq!(adaptive_next(&mut h, coarse_dirty, 64), BlockMode::Coarse);
        assert_eq!(adaptive_next(&mut h, coarse_dirty, 64), BlockMode::Fine);
        assert_eq!(adaptive_next(&mut h, esc, 64), BlockMode::Coarse);
        let mut coarse_epochs = 0;
        while adaptive_next(&mut h, coarse_dirty, 64) == BlockMode::Coarse {
            coarse_epochs += 1;
        }
        assert_eq!(
            coarse_epochs, 3,
            "interval 4: three more coarse epochs, then a probe"
        );
    }

    #[test]
    fn test_should_return_a_clean_coarse_block_to_fine() {
        let mut h = BlockHistory::default();
        let clean = EpochObservation {
            start: BlockMode::Coarse,
            escalated: false,
            dirty: false,
        };
        assert_eq!(adaptive_next(&mut h, clean, 64), BlockMode::Fine);
        let sparse = EpochObservation {
            start: BlockMode::Fine,
            escalated: false,
            dirty: true,
        };
        assert_eq!(adaptive_next(&mut h, sparse, 64), BlockMode::Fine);
    }
}
