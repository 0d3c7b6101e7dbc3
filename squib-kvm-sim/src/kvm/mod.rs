//! The KVM backend: real guest code under `/dev/kvm`, tracked by the kernel's dirty log or by
//! userfaultfd write-protect faults.
//!
//! The soft backend proves the tracking core against a model; this one proves it against a real
//! CPU writing real memory. Two mechanisms, one [`Stage2Backend`](squib_snapshot::Stage2Backend)
//! seam:
//!
//! - [`Tracking::DirtyLog`]: KVM logs written pages without exiting ([`DirtyLogBackend`]); the
//!   core harvests the log at each checkpoint.
//! - [`Tracking::UffdWp`]: writes fault ([`UffdWpBackend`]); a handler thread feeds each fault to
//!   the core's fault path, which is the path HVF takes, so adaptive granularity and the
//!   grant-then-mark rule are exercised on hardware.
//!
//! Guests are small user-mode programs ([`guest`]) started by the VMM directly in 64-bit mode
//! ([`vm`]); RAM may span several memslots with a hole between them ([`layout`]).

pub mod dirty_log;
pub mod guest;
pub mod layout;
pub mod runner;
pub mod uffd;
pub mod vm;

pub use dirty_log::DirtyLogBackend;
pub use guest::{Entry, GuestError, Shape, Workload};
pub use layout::{LayoutError, MemoryLayout};
pub use runner::{
    CheckpointRecord, CheckpointSink, CountingSink, FaultServer, Machine, RunConfig, RunReport,
};
pub use uffd::UffdWpBackend;
pub use vm::{KvmBackend, KvmError, KvmVm, RunStats, Tracking, VmConfig, Workers, kvm_available};
