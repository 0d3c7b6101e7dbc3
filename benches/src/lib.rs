//! Shared fixtures for squib's criterion benches; the benches themselves are in `benches/`.
#![deny(missing_docs)]

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend};

/// A backend whose protect and grant calls do nothing, so a bench measures only the core.
#[derive(Debug, Clone, Copy)]
pub struct NopBackend(pub PageGeometry);

impl Stage2Backend for NopBackend {
    fn geometry(&self) -> PageGeometry {
        self.0
    }
    fn write_protect(&self, _: GpaRange) -> Result<(), BackendError> {
        Ok(())
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        std::hint::black_box(range);
        Ok(())
    }
}

/// `n` distinct pseudo-random indices below `below`, sorted (a fixed sequence: benches compare
/// runs).
#[must_use]
pub fn scattered(n: u64, below: u64) -> Vec<u64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < n.min(below) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % below);
    }
    set.into_iter().collect()
}
