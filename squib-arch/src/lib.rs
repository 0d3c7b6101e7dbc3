//! Facts about the machine that every squib crate agrees on, and the small vocabulary they share.
//!
//! Dirty tracking is only as correct as its arithmetic: which page a fault belongs to, which
//! range a re-grant covers, whether an exit is a tracking fault at all. Keeping those facts in
//! one crate without I/O means the soft model, the HVF backend and the KVM backend cannot drift
//! apart on them, and that they can be tested exhaustively on any host.
//!
//! - [`PageGeometry`]: host page, stage-2 granule, and the two tracking unit sizes.
//! - [`esr`]: decoding of the ARMv8 `ESR_EL2` syndrome that Hypervisor.framework reports, and the
//!   one predicate that says "this is a stage-2 write-permission fault".
//! - [`GpaRange`]: a checked guest-physical byte range used by every crate.
//! - [`spec`]: byte sizes (`256M`) and `NAME:k=v,...` specifications, parsed one way everywhere.
//! - [`workload`]: the built-in workloads' names and parameters, which the soft backend's
//!   simulated vCPUs and the KVM backend's guest programs both run.

#![deny(missing_docs)]

pub mod esr;
mod geometry;
mod range;
pub mod spec;
pub mod workload;

pub use geometry::{GeometryError, PageGeometry};
pub use range::{GpaRange, RangeError};
