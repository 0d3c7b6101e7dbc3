//! squib's backends that run on Linux: `soft`, a software model of the stage-2 MMU that faults
//! exactly as Hypervisor.framework does (with simulated vCPUs, built-in workloads and write-trace
//! replay), so every host can run the tracking core end to end; `kvm`, real guest programs under
//! KVM with the kernel's dirty log or userfaultfd write-protect faults; and `machine`, a booted
//! x86-64 guest kernel whose complete state is snapshotted and restored.
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod kvm;
#[cfg(target_os = "linux")]
pub mod machine;
pub mod soft;
pub mod trace;
pub mod workload;

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
