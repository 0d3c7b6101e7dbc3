//! squib's core: the [`Stage2Backend`] seam, lock-free dirty tracking with per-block adaptive
//! granularity, and (in later modules) the snapshot files it feeds.
//!
//! The core never names a backend. A backend turns its hypervisor's exits into [`GuestFault`]s
//! and implements four calls; the [`DirtyTracker`] decides what to mark, what to re-grant, when
//! to re-protect and at which granularity, identically for Hypervisor.framework, KVM and the
//! software model. `specs/16-snapshots.md` is the contract this crate follows.

#![deny(missing_docs)]

mod sync;

pub mod backend;
pub mod bitmap;
#[cfg(any(test, feature = "test-kit"))]
pub mod conformance;
pub mod policy;
pub mod report;
#[cfg(any(test, feature = "test-kit"))]
pub mod shadow;
pub mod sink;
pub mod tracker;

pub use backend::{BackendError, GuestFault, Stage2Backend, TrackingMechanism};
pub use bitmap::DirtyBitmap;
pub use policy::{BlockMode, ConfigError, CostModel, Policy, TrackingConfig};
pub use sink::{ChainSink, CheckpointSink, CountingSink};
pub use tracker::{
    CheckpointError, CheckpointStats, DirtyTracker, FaultOutcome, TrackError, TrackerCounters,
};
pub mod snapshot;
pub use snapshot::{ChainWriter, SnapshotError, SnapshotMeta};
