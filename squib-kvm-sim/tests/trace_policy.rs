//! The adaptive policy's bar on small hand-made traces: its modelled cost stays within 1.10 × the
//! better of `fine` and `coarse`, on density patterns that defeat a fixed rule (phases, bursts,
//! flicker), under the default cost model and a nested-virtualisation one. Each trace runs long
//! enough to amortise the one escalation per block that any policy starting fine pays to learn
//! that a block is dense.

use std::fmt::Write as _;

use squib_kvm_sim::trace::{ReplayConfig, replay};
use squib_snapshot::{CostModel, Policy};

const EPOCH: u64 = 100_000_000;
const BLOCKS: u64 = 4;
const UNIT: u64 = 16 << 10;
const BLOCK: u64 = 2 << 20;

/// Per epoch, how many units of each block are written (0: idle). Units are spread with a fixed
/// stride so the pattern is deterministic.
fn trace(densities: &[u64]) -> String {
    let mut s = String::new();
    for (e, &d) in densities.iter().enumerate() {
        let mut t = e as u64 * EPOCH + 1;
        for b in 0..BLOCKS {
            for i in 0..d {
                let unit = (i * 37 + b * 11) % 128;
                writeln!(s, "{t} {:#x} 8", b * BLOCK + unit * UNIT + 8).unwrap();
                t += 1;
            }
        }
    }
    s
}

fn cost(text: &str, policy: Policy, model: CostModel) -> f64 {
    let mut cfg = ReplayConfig::new(policy);
    cfg.tracking.cost = model;
    replay(text.as_bytes(), &cfg, BLOCKS * BLOCK)
        .unwrap()
        .modelled_cost_us
}

fn check(name: &str, densities: &[u64]) {
    let nested = CostModel {
        fault_us: 50.0,
        protect_us: 120.0,
        write_bytes_per_us: 5000.0,
    };
    for model in [CostModel::default(), nested] {
        let t = trace(densities);
        let best = cost(&t, Policy::Fine, model).min(cost(&t, Policy::Coarse, model));
        let adaptive = cost(&t, Policy::Adaptive, model);
        assert!(
            adaptive <= 1.10 * best,
            "{name} under {model:?}: adaptive {adaptive:.0} µs > 1.10 × {best:.0} µs"
        );
    }
}

#[test]
fn test_should_stay_within_the_bar_on_a_dense_then_sparse_phase_change() {
    let mut d = vec![128; 20];
    d.extend([5; 20]);
    check("dense then sparse", &d);
}

#[test]
fn test_should_stay_within_the_bar_on_dense_bursts_between_idle_epochs() {
    check("bursts", &[128, 0].repeat(15));
}

#[test]
fn test_should_stay_within_the_bar_when_density_flickers() {
    check("flicker", &[128, 128, 128, 8, 8, 8].repeat(5));
}

#[test]
fn test_should_stay_within_the_bar_on_a_dense_start_then_sparse_wakeups() {
    let mut d = vec![128];
    d.extend([0, 0, 0, 0, 3].repeat(12));
    check("start-up then sparse", &d);
}
