//! squib's Hypervisor.framework backend, for macOS on Apple Silicon: squib's production backend.
//!
//! Nothing that builds squib in CI can run Hypervisor.framework, so this crate is built to be
//! right by construction and checked by a faithful stand-in:
//!
//! - every stage-2 permission change goes through one small trait, [`hv::Hv`], with explicit
//!   `HV_MEMORY_*` bits (READ|EXEC to protect, READ|WRITE|EXEC to re-grant: EXEC is never
//!   dropped). applevisor 1.0's `Memory::protect` sends an enum's *position* as the bits and covers
//!   a whole allocation, so it is never used;
//! - exit handling ([`exit::handle_exit`]) and the vCPU loop ([`vcpu::run_until_vmm_exit`]) make no
//!   framework calls of their own, so they run unchanged against the stand-in (feature
//!   `stand-in`), which records every call, refuses any squib must never make, and faults guest
//!   stores the way the hardware does;
//! - the little that calls the framework directly is behind `cfg(hvf)` (set on aarch64 macOS by
//!   the build script), so the crate builds, lints and tests on any host, and elsewhere asking for
//!   a VM gives [`hv::HvError::Unavailable`].
//!
//! `docs/hvf.md` says what the stand-in checks and what only a run on Apple Silicon can reveal.

#![deny(missing_docs)]

pub mod a64;
#[cfg(any(test, feature = "stand-in"))]
pub mod a64_sim;
pub mod backend;
pub mod exit;
pub mod hv;
pub mod perms;
#[cfg(any(test, feature = "stand-in"))]
pub mod stand_in;
pub mod vcpu;
pub mod vm;
pub mod workload;

/// Whether this build runs Hypervisor.framework guests: true on aarch64 macOS only.
pub const AVAILABLE: bool = cfg!(hvf);

pub use backend::{HvfBackend, RamError};
pub use exit::{ExitAction, ExitError, VmmExit, handle_exit};
pub use hv::{Framework, Hv, HvError};
pub use vcpu::{RunOutcome, VcpuError, VcpuOps, run_until_vmm_exit};
