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
//!
//! Everything but [`kvm_or_skip`] exists on Linux only; on other hosts the crate is that gate.
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod dirty_log;
#[cfg(target_os = "linux")]
pub mod guest;
#[cfg(target_os = "linux")]
pub mod layout;
#[cfg(target_os = "linux")]
pub mod pause;
#[cfg(target_os = "linux")]
pub mod runner;
#[cfg(target_os = "linux")]
pub mod threads;
#[cfg(target_os = "linux")]
pub mod uffd;
#[cfg(target_os = "linux")]
pub mod vm;

#[cfg(target_os = "linux")]
pub use dirty_log::DirtyLogBackend;
#[cfg(target_os = "linux")]
pub use guest::{Entry, GuestError, Shape, Workload};
#[cfg(target_os = "linux")]
pub use layout::{LayoutError, MemoryLayout};
#[cfg(target_os = "linux")]
pub use runner::{
    CheckpointRecord, CheckpointSink, CountingSink, FaultServer, Machine, RunConfig, RunReport,
};
#[cfg(target_os = "linux")]
pub use uffd::UffdWpBackend;
#[cfg(target_os = "linux")]
pub use vm::{KvmBackend, KvmError, KvmVm, RunStats, Tracking, VmConfig, Workers, kvm_available};

/// The gate every test and bench that needs `/dev/kvm` goes through: true when `/dev/kvm` can be
/// opened for reading and writing. Otherwise it prints why `what` is skipped and returns false —
/// unless `SQUIB_REQUIRE_KVM=1` (set by `.ci/run` wherever `/dev/kvm` exists), where a missing
/// KVM is a failure, not a skip.
///
/// # Panics
/// When KVM cannot be opened and `SQUIB_REQUIRE_KVM=1`.
#[must_use]
pub fn kvm_or_skip(what: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("SQUIB_REQUIRE_KVM").as_deref() != Ok("1"),
                "{what}: SQUIB_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            eprintln!("{what}: skipped: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}
