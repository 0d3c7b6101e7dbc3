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
//! switch). A block that escalated is held coarse while it keeps being written, re-measuring its
//! density with fine probes spaced so that they cost a bounded share of what holding costs (the
//! spacing comes from the cost model and grows with the block's confirmed dense history, so a
//! block that turns sparse is held only a bounded fraction too long). Idle gaps are free in
//! either mode; a held block stays coarse across gaps it has shown it wakes up dense from, and
//! otherwise returns to fine tracking, where a sparse wake-up costs nothing extra. A block whose
//! density flips between dense and sparse is not held at all until it settles.

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

/// The share of a held block's cost the adaptive policy lets its probes take: the spacing of
/// probes is at least what keeps a dense block's re-measurements within this share.
pub(crate) const PROBE_SHARE: f64 = 0.05;

impl CostModel {
    /// The adaptive policy's shortest spacing, in dirty epochs, between fine probes of a block it
    /// holds coarse: a probe of a block that is still dense costs the escalation faults beyond
    /// the first, `(escalate_at - 1) * F`, and this spacing keeps that within `PROBE_SHARE` (5 %) of
    /// the block's coarse cost `F + B/W` over the interval. Expensive faults (nested
    /// virtualisation, userfaultfd) space probes further apart; cheap ones allow frequent probes.
    #[must_use]
    pub fn min_probe_interval(&self, geometry: &PageGeometry) -> u16 {
        let k = f64::from(self.escalate_at(geometry));
        #[allow(clippy::cast_precision_loss)] // sizes are at most a few MiB
        let block_cost = self.fault_us + geometry.tracking_default as f64 / self.write_bytes_per_us;
        let probe = (k - 1.0) * self.fault_us;
        let i = (probe / (PROBE_SHARE * block_cost)).ceil();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to u16
        let i = if i.is_finite() {
            i.clamp(1.0, f64::from(u16::MAX)) as u16
        } else {
            1
        };
        i
    }
}

/// One in this many blocks written for the first time is measured whatever the prior says, so
/// the estimate keeps learning when the prior sends the others coarse unmeasured.
pub(crate) const FRESH_EXPLORE: u32 = 8;
/// Once this many first epochs have been measured, the counts are halved at the next checkpoint,
/// so the prior follows the guest's phases (start-up zeroing, then steady state).
pub(crate) const FRESH_WINDOW: u32 = 64;

/// The adaptive policy's prior for blocks it has never seen written.
///
/// A block's own faults say nothing about it until it has faulted `escalate_at` times, and a
/// block that turns out dense pays those faults before it goes coarse: across a guest whose
/// memory is written densely as it is first touched (a heap growing, memory being zeroed), that
/// learning cost is paid once per block and can exceed what coarse tracking costs outright. But
/// how the blocks written for the first time so far turned out *is* observable. At a block's
/// first fault the policy weighs the estimated chance `p` that it is dense (the measured first
/// epochs, counted pessimistically: a block still being measured counts as sparse) against the
/// cost model: escalating at once saves `(escalate_at - 1)` faults if it is dense, and loses at
/// most a whole block's bytes less one unit if it is sparse. It escalates at once only when
/// `p (k - 1) F > (1 - p) (B - U)`, with a Laplace estimate of `p`, so a guest whose first-touched
/// blocks are sparse (most programs) is never sent coarse by it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FreshPrior {
    /// What escalating a dense block at once saves: `(escalate_at - 1) * F`, µs.
    pub save: f64,
    /// What escalating a sparse block at once loses at most: the block's bytes less one unit's, µs.
    pub loss: f64,
}

impl FreshPrior {
    /// The prior for a cost model and geometry.
    pub(crate) fn new(cost: &CostModel, geometry: &PageGeometry) -> Self {
        let k = f64::from(cost.escalate_at(geometry));
        #[allow(clippy::cast_precision_loss)] // sizes are at most a few MiB
        let (unit, block) = (geometry.tracking_hot as f64, geometry.tracking_default as f64);
        Self {
            save: (k - 1.0) * cost.fault_us,
            loss: (block - unit) / cost.write_bytes_per_us,
        }
    }

    /// Whether a block written for the first time escalates at its first fault, given that
    /// `dense` of the `measured` first epochs so far were dense.
    pub(crate) fn escalates_at_once(&self, measured: u32, dense: u32) -> bool {
        let dense = dense.min(measured);
        let p_dense = f64::from(dense) + 1.0;
        let p_sparse = f64::from(measured - dense) + 1.0;
        p_dense * self.save > p_sparse * self.loss
    }
}

/// How long the adaptive policy may hold a dense block coarse between probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HoldLimits {
    /// The floor of the spacing once the block has a dense history.
    pub min: u16,
    /// Ceiling of the spacing.
    pub max: u16,
    /// When non-zero, the spacing is also at most the block's confirmed dense epochs divided by
    /// this (but never below `min`): a block that turns sparse after being dense for `n` epochs
    /// is held at most about `n / held_divisor` epochs too long.
    pub held_divisor: u16,
    /// When non-zero, the floor ramps up to `min` with the block's dense history:
    /// `ceil(held × ramp)`. A block that escalated once is re-measured soon (it may have been a
    /// burst). Only used where a probe is cheap against a wrong hold (under a quarter of a coarse
    /// block-epoch); where it is dear the floor is `min` at once.
    pub ramp: f64,
    /// Cost of a coarse block-epoch, µs.
    pub block_cost: f64,
    /// Cost of one fine unit (its fault and its bytes), µs.
    pub unit_cost: f64,
    /// Extra cost of a probe of a block that is still dense, µs.
    pub probe_cost: f64,
    /// A block's first escalation is followed at once by a probe (through the waves; one a full
    /// wave defers is probed at its next dirty epoch, whatever the ramp says): set where one held
    /// epoch of a typical sparse block (half the break-even count of units) wastes more than a
    /// probe of a dense one costs. One escalation says little about the next epoch (a heap block
    /// being filled is dense once, then sparse), so this bets on neither.
    pub recheck_first: bool,
}

impl HoldLimits {
    /// The limits a tracker uses.
    pub(crate) fn new(cost: &CostModel, geometry: &PageGeometry, max_probe_interval: u16) -> Self {
        let k = f64::from(cost.escalate_at(geometry));
        #[allow(clippy::cast_precision_loss)] // sizes are at most a few MiB
        let block_cost = cost.fault_us + geometry.tracking_default as f64 / cost.write_bytes_per_us;
        let probe = (k - 1.0) * cost.fault_us;
        let ratio = if block_cost > 0.0 {
            4.0 * probe / block_cost
        } else {
            f64::INFINITY
        };
        #[allow(clippy::cast_precision_loss)] // sizes are at most a few MiB
        let unit_cost = cost.fault_us + geometry.tracking_hot as f64 / cost.write_bytes_per_us;
        Self {
            min: cost.min_probe_interval(geometry).min(max_probe_interval),
            max: max_probe_interval,
            held_divisor: 8,
            ramp: if ratio < 1.0 { ratio } else { 0.0 },
            block_cost,
            unit_cost,
            probe_cost: probe,
            recheck_first: block_cost - k / 2.0 * unit_cost > probe,
        }
    }

    /// Whether a sparse epoch of `units` dirty units, right after the block was dense, shows that
    /// holding it coarse loses more than a probe costs: only then is it a flip worth reacting to.
    fn flip_pays(&self, units: u32) -> bool {
        self.block_cost - f64::from(units) * self.unit_cost > self.probe_cost
    }

    /// The floor of the spacing for a block with `held` confirmed dense epochs.
    fn floor(&self, held: u32) -> u16 {
        if held <= 1 && self.recheck_first {
            return 1;
        }
        if self.ramp <= 0.0 {
            return self.min;
        }
        let f = (f64::from(held) * self.ramp).ceil();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to u16
        let f = if f.is_finite() {
            f.clamp(1.0, f64::from(u16::MAX)) as u16
        } else {
            self.min
        };
        f.clamp(1, self.min.max(1))
    }

    /// Pure doubling from 1 up to `max`.
    #[cfg(test)]
    pub(crate) const fn doubling(max: u16) -> Self {
        Self {
            min: 1,
            max,
            held_divisor: 0,
            ramp: 0.0,
            block_cost: f64::INFINITY,
            unit_cost: 0.0,
            probe_cost: 0.0,
            recheck_first: false,
        }
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
    /// Fine units it had dirty (meaningful when it started fine and did not escalate).
    pub units: u32,
}

/// The adaptive policy's memory of one block: when it next probes, how far apart probes are, and
/// what its density has been doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct BlockHistory {
    probe_interval: u16,
    until_probe: u16,
    /// The next dirty fine epoch measures a block that was coarse (a probe). Survives clean
    /// epochs: a probe that saw no writes has measured nothing yet.
    probing: bool,
    /// The last epoch in which the block's density was observed (tracked finely) found it dense.
    last_dense: bool,
    /// Flip score: raised when the block was found sparse right after being dense, lowered by
    /// each escalation. While it is above zero the block is not held coarse.
    flips: u8,
    /// Near score: raised when the block was found below break-even right after being dense, but
    /// by too little for holding it to have cost more than a probe; lowered by each escalation.
    /// It raises the escalation point (as flips do) without stopping holds.
    near: u8,
    /// Clean epochs in a row while held coarse.
    idle: u16,
    /// Dirty epochs the block has been dense (escalated or held coarse) since it was last found
    /// sparse.
    held: u32,
    /// Clean epochs since the block was last written, in either mode.
    gap: u16,
    /// The last wake-up (a dirty epoch after clean ones) that was tracked finely proved dense.
    wakes_dense: bool,
    /// Due probes in a row answered by other blocks' probes instead of its own.
    skips: u8,
}

impl BlockHistory {
    /// The fault count at which this block escalates within an epoch: the break-even `k`, raised
    /// up to `2k` (at most `max`, the hot units per block) while its density flips. A block whose
    /// density hovers near break-even would otherwise escalate in every epoch that just crosses
    /// it, paying the escalation faults on top of a whole block it barely needed.
    pub(crate) fn escalate_at(&self, k: u32, max: u32) -> u32 {
        let extra = k.saturating_mul(u32::from(self.flips.max(self.near))) / u32::from(FLIP_MAX);
        k.saturating_add(extra).min(max.max(k))
    }
}

/// How much one dense-to-sparse flip raises a block's flip score, and its ceiling.
const FLIP_STEP: u8 = 4;
const FLIP_MAX: u8 = 8;

/// Probes of held blocks started at one checkpoint while no outcome of probes at the same
/// spacing is known.
pub(crate) const PROBE_WAVE: u32 = 4;
/// Due probes in a row a block may let other blocks' probes answer.
const MAX_SKIPS: u8 = 7;
/// Probe spacings the evidence tells apart (longer ones share the last slot).
const COHORTS: usize = 64;
const SAW_DENSE: u8 = 1;
const SAW_SPARSE: u8 = 2;

/// What the adaptive policy learns from probes of held blocks, across blocks.
///
/// A probe of a block that is still dense costs the escalation faults and tells only that. In a
/// guest that writes many blocks alike, the blocks held coarse come due for probes together, at
/// the same spacing (they have the same history), and probing all of them pays that cost many
/// times over for one piece of knowledge. So blocks due at the same spacing form a cohort: at one
/// checkpoint at most [`PROBE_WAVE`] of them probe while the cohort's last outcome is unknown and
/// the rest wait; once the outcome is in, a dense one answers the waiting blocks' probes (their
/// spacing doubles as if they had probed), and a sparse one sends them all to probe. A block lets
/// others answer for it at most [`MAX_SKIPS`] times in a row, so every block is still measured
/// itself at a bounded rate, and a cohort that turns sparse is seen within a few epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeEvidence {
    /// Outcomes recorded at the previous checkpoint, per probe spacing.
    prev: [u8; COHORTS],
    /// Outcomes being recorded at this checkpoint.
    cur: [u8; COHORTS],
    /// Probes started at this checkpoint without an outcome to go by.
    started: u32,
}

impl Default for ProbeEvidence {
    fn default() -> Self {
        Self {
            prev: [0; COHORTS],
            cur: [0; COHORTS],
            started: 0,
        }
    }
}

/// What to do with a held block whose probe is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeGate {
    /// Track it finely for an epoch.
    Probe,
    /// Its cohort's probes proved dense: count it as confirmed, hold it another interval.
    Skip,
    /// This checkpoint's wave is full and no outcome is known: ask again at the next one.
    Defer,
}

const fn cohort(interval: u16) -> usize {
    let i = interval as usize;
    if i < COHORTS { i } else { COHORTS - 1 }
}

impl ProbeEvidence {
    /// A new checkpoint: what was recorded becomes what the gate goes by.
    pub(crate) fn new_checkpoint(&mut self) {
        self.prev = self.cur;
        self.cur = [0; COHORTS];
        self.started = 0;
    }

    /// A probe's outcome: `dense` when the block escalated again. `interval` is the spacing the
    /// probe was started at.
    fn record(&mut self, interval: u16, dense: bool) {
        self.cur[cohort(interval)] |= if dense { SAW_DENSE } else { SAW_SPARSE };
    }

    /// Whether a due probe at spacing `interval`, of a block that let others answer for it
    /// `skips` times in a row, runs.
    fn gate(&mut self, interval: u16, skips: u8) -> ProbeGate {
        let seen = self.prev[cohort(interval)];
        if skips >= MAX_SKIPS || seen & SAW_SPARSE != 0 {
            return ProbeGate::Probe;
        }
        if seen & SAW_DENSE != 0 {
            return ProbeGate::Skip;
        }
        if self.started >= PROBE_WAVE {
            return ProbeGate::Defer;
        }
        self.started += 1;
        ProbeGate::Probe
    }
}

/// Re-arm a block held coarse after it proved dense: a confirming probe doubles the spacing of
/// the next one; a first escalation probes again soon.
fn rearm(h: &mut BlockHistory, limits: HoldLimits, confirmed: bool) {
    let floor = limits.floor(h.held);
    let mut cap = limits.max.max(floor);
    if limits.held_divisor > 0 {
        let by_held = u16::try_from(h.held / u32::from(limits.held_divisor)).unwrap_or(u16::MAX);
        cap = cap.min(by_held.max(floor));
    }
    h.probe_interval = if confirmed {
        h.probe_interval.saturating_mul(2).clamp(floor, cap)
    } else {
        floor
    };
    h.until_probe = h.probe_interval;
}

/// A held block's probe is due: probe it, let its cohort's outcome answer for it, or wait.
fn probe_if_due(h: &mut BlockHistory, limits: HoldLimits, ev: &mut ProbeEvidence) -> BlockMode {
    match ev.gate(h.probe_interval, h.skips) {
        ProbeGate::Probe => {
            h.skips = 0;
            h.probing = true;
            BlockMode::Fine
        }
        ProbeGate::Skip => {
            // The blocks probed alongside it proved dense: count it as confirmed too.
            h.skips += 1;
            rearm(h, limits, true);
            BlockMode::Coarse
        }
        ProbeGate::Defer => BlockMode::Coarse,
    }
}

/// The adaptive policy's decision for a block's next epoch.
///
/// Holding a block coarse is a bet that it stays dense: a coarse epoch of a block that turned
/// sparse costs the whole block, and its density is invisible until it is tracked finely again.
/// Releasing it costs at most the escalation faults (the ski-rental loss) when it is still dense.
/// Per block, the policy therefore
/// - holds a block coarse after it escalated, re-measuring it with fine probes spaced
///   exponentially while it keeps proving dense (a stationary dense block converges to coarse);
/// - keeps holding it across idle gaps no longer than its probe interval, and across any gap once
///   a wake-up tracked finely proved dense (a block written densely in bursts does not pay the
///   escalation again at every burst); otherwise it releases the block to fine after the gap, so
///   a block that was dense once, at start-up say, and is then written sparsely, wakes up fine;
/// - stops holding a block whose density flips: once a block has been found sparse right after
///   being dense, it escalates afresh each epoch (paying at most the escalation faults when dense,
///   and nothing extra when sparse) until escalations outnumber the flips again.
pub(crate) fn adaptive_next(
    h: &mut BlockHistory,
    obs: EpochObservation,
    limits: HoldLimits,
    ev: &mut ProbeEvidence,
) -> BlockMode {
    // A probe is consumed by the first dirty epoch after it starts.
    let was_probe = if obs.dirty {
        std::mem::take(&mut h.probing)
    } else {
        h.probing
    };
    if was_probe && obs.dirty {
        ev.record(h.probe_interval, obs.escalated);
    }
    let woke = obs.dirty && h.gap > 0;
    if obs.dirty {
        h.gap = 0;
    } else {
        h.gap = h.gap.saturating_add(1);
    }
    if obs.escalated {
        if woke {
            h.wakes_dense = true;
        }
        h.near = h.near.saturating_sub(1);
        h.last_dense = true;
        h.idle = 0;
        h.held = h.held.saturating_add(1);
        if h.flips > 0 {
            // Recently flipped: do not bet on the density lasting.
            h.flips -= 1;
            return BlockMode::Fine;
        }
        // Dense enough that the whole block was cheaper. A probe that escalates again doubles the
        // spacing of the next probe; a first escalation probes again soon.
        rearm(h, limits, was_probe);
        if h.held <= 1 && limits.recheck_first {
            // One escalation says little about the next epoch: re-measure at once, in a wave.
            return probe_if_due(h, limits, ev);
        }
        return BlockMode::Coarse;
    }
    match obs.start {
        BlockMode::Coarse if obs.dirty => {
            h.idle = 0;
            h.held = h.held.saturating_add(1);
            if h.until_probe > 1 {
                h.until_probe -= 1;
                return BlockMode::Coarse;
            }
            probe_if_due(h, limits, ev)
        }
        BlockMode::Coarse => {
            // Idle costs nothing in either mode; what matters is the wake-up. A block that proved
            // dense recently wakes up coarse; after a longer gap it wakes up fine, where
            // escalation bounds what a sparse wake-up costs, and that wake-up counts as a probe.
            h.idle = h.idle.saturating_add(1);
            if h.idle <= h.probe_interval || (h.wakes_dense && h.flips == 0) {
                BlockMode::Coarse
            } else {
                h.idle = 0;
                h.probing = h.probe_interval > 0;
                BlockMode::Fine
            }
        }
        BlockMode::Fine => {
            if obs.dirty {
                if h.last_dense {
                    if limits.flip_pays(obs.units) {
                        // Dense last time it was measured, sparse now: the density flips.
                        h.flips = h.flips.saturating_add(FLIP_STEP).min(FLIP_MAX);
                    } else {
                        // Below break-even, but close: escalating it barely pays.
                        h.near = h.near.saturating_add(FLIP_STEP).min(FLIP_MAX);
                    }
                }
                h.last_dense = false;
                h.held = 0;
                if woke {
                    h.wakes_dense = false;
                }
                if was_probe {
                    // The probe found the block sparse: forget the old density.
                    h.probe_interval = 1;
                }
            }
            BlockMode::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expensive faults, a fast disk: a userfaultfd fault on a nested host, a page-cache writer.
    const NESTED: CostModel = CostModel {
        fault_us: 50.0,
        protect_us: 120.0,
        write_bytes_per_us: 5000.0,
    };

    /// One block's decision, with no other block's probes to learn from.
    fn next(h: &mut BlockHistory, obs: EpochObservation, limits: HoldLimits) -> BlockMode {
        adaptive_next(h, obs, limits, &mut ProbeEvidence::default())
    }

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
        assert_eq!(NESTED.escalate_at(&g), 9);
        // Free faults: never cheaper to take the block before every page faulted.
        let free = CostModel {
            fault_us: 0.0,
            protect_us: 0.0,
            write_bytes_per_us: 500.0,
        };
        assert_eq!(free.escalate_at(&g), 128);
    }

    #[test]
    fn test_should_send_fresh_blocks_coarse_only_on_evidence_worth_its_risk() {
        let g = PageGeometry::APPLE_SILICON;
        let nested = FreshPrior::new(&NESTED, &g);
        // Saving 8 faults (400 µs) against losing at most 416 µs of bytes: about even odds.
        assert!(!nested.escalates_at_once(0, 0), "no evidence");
        assert!(!nested.escalates_at_once(1, 0));
        assert!(!nested.escalates_at_once(2, 1));
        assert!(nested.escalates_at_once(2, 2));
        assert!(!nested.escalates_at_once(6, 1), "mostly sparse");
        // Defaults: a wrong guess costs a 2 MiB write (4.2 ms) against 114 faults (456 µs)
        // saved, so it takes nine dense first epochs in a row and few sparse ones.
        let default = FreshPrior::new(&CostModel::default(), &g);
        assert!(!default.escalates_at_once(8, 8));
        assert!(default.escalates_at_once(9, 9));
        assert!(default.escalates_at_once(40, 38));
        assert!(!default.escalates_at_once(40, 34));
        // Free faults: never worth it.
        let free = FreshPrior::new(
            &CostModel {
                fault_us: 0.0,
                protect_us: 0.0,
                write_bytes_per_us: 500.0,
            },
            &g,
        );
        assert!(!free.escalates_at_once(1000, 1000));
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
            units: 1,
        };
        let coarse_dirty = EpochObservation {
            start: BlockMode::Coarse,
            escalated: false,
            dirty: true,
            units: 1,
        };
        assert_eq!(next(&mut h, esc, HoldLimits::doubling(64)), BlockMode::Coarse);
        // Interval 1: the next dirty coarse epoch probes.
        assert_eq!(
            next(&mut h, coarse_dirty, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        // The probe escalates again: interval doubles to 2.
        assert_eq!(next(&mut h, esc, HoldLimits::doubling(64)), BlockMode::Coarse);
        assert_eq!(
            next(&mut h, coarse_dirty, HoldLimits::doubling(64)),
            BlockMode::Coarse
        );
        assert_eq!(
            next(&mut h, coarse_dirty, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        assert_eq!(next(&mut h, esc, HoldLimits::doubling(64)), BlockMode::Coarse);
        let mut coarse_epochs = 0;
        while next(&mut h, coarse_dirty, HoldLimits::doubling(64)) == BlockMode::Coarse {
            coarse_epochs += 1;
        }
        assert_eq!(
            coarse_epochs, 3,
            "interval 4: three more coarse epochs, then a probe"
        );
    }

    const ESC: EpochObservation = EpochObservation {
        start: BlockMode::Fine,
        escalated: true,
        dirty: true,
        units: 0,
    };
    const COARSE_DIRTY: EpochObservation = EpochObservation {
        start: BlockMode::Coarse,
        escalated: false,
        dirty: true,
        units: 1,
    };
    const COARSE_CLEAN: EpochObservation = EpochObservation {
        start: BlockMode::Coarse,
        escalated: false,
        dirty: false,
        units: 0,
    };
    const FINE_SPARSE: EpochObservation = EpochObservation {
        start: BlockMode::Fine,
        escalated: false,
        dirty: true,
        units: 1,
    };
    const FINE_CLEAN: EpochObservation = EpochObservation {
        start: BlockMode::Fine,
        escalated: false,
        dirty: false,
        units: 0,
    };

    /// Run one checkpoint over `blocks`: each block's epoch is dense (`dense`) or one unit.
    fn checkpoint_all(
        blocks: &mut [(BlockHistory, BlockMode)],
        ev: &mut ProbeEvidence,
        dense: bool,
    ) -> usize {
        ev.new_checkpoint();
        let mut fine = 0;
        for (h, mode) in blocks.iter_mut() {
            let obs = match (*mode, dense) {
                (BlockMode::Coarse, _) => COARSE_DIRTY,
                (BlockMode::Fine, true) => ESC,
                (BlockMode::Fine, false) => FINE_SPARSE,
            };
            *mode = adaptive_next(h, obs, HoldLimits::doubling(64), ev);
            fine += usize::from(*mode == BlockMode::Fine);
        }
        fine
    }

    #[test]
    fn test_should_let_a_wave_of_probes_answer_for_the_blocks_due_with_it() {
        let mut ev = ProbeEvidence::default();
        let mut blocks = vec![(BlockHistory::default(), BlockMode::Fine); 32];
        assert_eq!(
            checkpoint_all(&mut blocks, &mut ev, true),
            0,
            "all escalated, held"
        );
        // Interval 1: all 32 are due; only a wave probes.
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, true), PROBE_WAVE as usize);
        // The wave's outcome is not in yet when the others ask again: another wave.
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, true), PROBE_WAVE as usize);
        // The first wave proved dense: the waiting blocks count as confirmed, nobody probes.
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, true), 0);
        let intervals: Vec<u16> = blocks.iter().map(|(h, _)| h.probe_interval).collect();
        assert!(intervals.iter().all(|&i| i == 2), "{intervals:?}");
        // Each block is still measured itself at a bounded rate.
        let mut probes = vec![0u32; blocks.len()];
        for _ in 0..200 {
            checkpoint_all(&mut blocks, &mut ev, true);
            for (p, (_, m)) in probes.iter_mut().zip(&blocks) {
                *p += u32::from(*m == BlockMode::Fine);
            }
        }
        assert!(probes.iter().all(|&p| p >= 1), "{probes:?}");
    }

    #[test]
    fn test_should_send_a_whole_cohort_to_probe_when_its_wave_finds_the_density_gone() {
        let mut ev = ProbeEvidence::default();
        let mut blocks = vec![(BlockHistory::default(), BlockMode::Fine); 32];
        checkpoint_all(&mut blocks, &mut ev, true);
        // The guest's phase changes: the wave probes and finds its blocks sparse.
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, false), PROBE_WAVE as usize);
        assert_eq!(
            checkpoint_all(&mut blocks, &mut ev, false),
            2 * PROBE_WAVE as usize
        );
        // The sparse outcome is in: every waiting block probes, and all end up fine.
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, false), 32);
        assert_eq!(checkpoint_all(&mut blocks, &mut ev, false), 32);
    }

    #[test]
    fn test_should_hold_a_dense_block_coarse_across_an_idle_gap_no_longer_than_its_probe_interval() {
        let mut h = BlockHistory::default();
        assert_eq!(next(&mut h, ESC, HoldLimits::doubling(64)), BlockMode::Coarse);
        assert_eq!(
            next(&mut h, COARSE_DIRTY, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        assert_eq!(
            next(&mut h, ESC, HoldLimits::doubling(64)),
            BlockMode::Coarse,
            "probe interval now 2"
        );
        assert_eq!(
            next(&mut h, COARSE_CLEAN, HoldLimits::doubling(64)),
            BlockMode::Coarse
        );
        assert_eq!(
            next(&mut h, COARSE_CLEAN, HoldLimits::doubling(64)),
            BlockMode::Coarse
        );
        assert_eq!(
            next(&mut h, COARSE_CLEAN, HoldLimits::doubling(64)),
            BlockMode::Fine,
            "a gap longer than the interval releases the block"
        );
        // The release is a probe: escalating on wake-up confirms the density (interval 4).
        assert_eq!(
            next(&mut h, FINE_CLEAN, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        assert_eq!(next(&mut h, ESC, HoldLimits::doubling(64)), BlockMode::Coarse);
        for _ in 0..3 {
            assert_eq!(
                next(&mut h, COARSE_DIRTY, HoldLimits::doubling(64)),
                BlockMode::Coarse
            );
        }
        assert_eq!(
            next(&mut h, COARSE_DIRTY, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
    }

    #[test]
    fn test_should_stop_holding_a_block_whose_density_flips_until_it_settles() {
        let mut h = BlockHistory::default();
        assert_eq!(next(&mut h, ESC, HoldLimits::doubling(64)), BlockMode::Coarse);
        assert_eq!(
            next(&mut h, COARSE_DIRTY, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        // The probe finds it sparse right after it was dense: a flip.
        assert_eq!(
            next(&mut h, FINE_SPARSE, HoldLimits::doubling(64)),
            BlockMode::Fine
        );
        // Dense again: escalations do not hold it coarse while the flip score lasts.
        for _ in 0..FLIP_STEP {
            assert_eq!(next(&mut h, ESC, HoldLimits::doubling(64)), BlockMode::Fine);
        }
        // Settled dense: held coarse again.
        assert_eq!(next(&mut h, ESC, HoldLimits::doubling(64)), BlockMode::Coarse);
    }

    #[test]
    fn test_should_raise_the_escalation_point_but_keep_holding_a_block_just_below_break_even() {
        // A coarse block-epoch costs 100, a unit 10, a probe 50: 8 units save only 20 over
        // coarse, less than a probe, so that is not a flip; 1 unit saves 90, which is.
        let limits = HoldLimits {
            min: 1,
            max: 64,
            held_divisor: 0,
            ramp: 0.0,
            block_cost: 100.0,
            unit_cost: 10.0,
            probe_cost: 50.0,
            recheck_first: false,
        };
        let sparse = |units| EpochObservation {
            start: BlockMode::Fine,
            escalated: false,
            dirty: true,
            units,
        };
        let mut near = BlockHistory::default();
        assert_eq!(next(&mut near, ESC, limits), BlockMode::Coarse);
        assert_eq!(next(&mut near, COARSE_DIRTY, limits), BlockMode::Fine);
        assert_eq!(next(&mut near, sparse(8), limits), BlockMode::Fine);
        assert_eq!(near.escalate_at(9, 128), 9 + 9 * 4 / 8);
        assert_eq!(next(&mut near, ESC, limits), BlockMode::Coarse, "still held");
        let mut flip = BlockHistory::default();
        next(&mut flip, ESC, limits);
        next(&mut flip, COARSE_DIRTY, limits);
        next(&mut flip, sparse(1), limits);
        assert_eq!(flip.escalate_at(9, 128), 13);
        assert_eq!(next(&mut flip, ESC, limits), BlockMode::Fine, "not held");
        assert_eq!(BlockHistory::default().escalate_at(115, 128), 115);
        let mut capped = flip;
        capped.flips = FLIP_MAX;
        assert_eq!(capped.escalate_at(115, 128), 128);
    }

    #[test]
    fn test_should_re_measure_a_block_at_once_after_its_first_escalation_where_a_wrong_hold_is_dear() {
        // x86-64 at default costs: escalation takes 345 of 512 pages, a probe of a dense block
        // costs a third of a coarse block-epoch, and holding a block that turned sparse wastes
        // most of one. One escalation says little: the block goes back to fine at once.
        let x86 = HoldLimits::new(&CostModel::default(), &PageGeometry::X86_64, 64);
        assert!(x86.recheck_first);
        let mut h = BlockHistory::default();
        assert_eq!(next(&mut h, ESC, x86), BlockMode::Fine);
        // Dense again: now it is held.
        assert_eq!(next(&mut h, ESC, x86), BlockMode::Coarse);
        // With nested costs on Apple Silicon a probe costs about what a wrong hold wastes, and a
        // block that escalated is held.
        let apple = HoldLimits::new(&NESTED, &PageGeometry::APPLE_SILICON, 64);
        assert!(!apple.recheck_first);
        assert_eq!(next(&mut BlockHistory::default(), ESC, apple), BlockMode::Coarse);
    }

    #[test]
    fn test_should_space_probes_by_what_they_cost() {
        let g = PageGeometry::APPLE_SILICON;
        assert_eq!(CostModel::default().min_probe_interval(&g), 3);
        assert_eq!(NESTED.min_probe_interval(&g), 18);
    }

    #[test]
    fn test_should_return_a_clean_coarse_block_to_fine() {
        let mut h = BlockHistory::default();
        let clean = EpochObservation {
            start: BlockMode::Coarse,
            escalated: false,
            dirty: false,
            units: 0,
        };
        assert_eq!(next(&mut h, clean, HoldLimits::doubling(64)), BlockMode::Fine);
        let sparse = EpochObservation {
            start: BlockMode::Fine,
            escalated: false,
            dirty: true,
            units: 1,
        };
        assert_eq!(next(&mut h, sparse, HoldLimits::doubling(64)), BlockMode::Fine);
    }
}
