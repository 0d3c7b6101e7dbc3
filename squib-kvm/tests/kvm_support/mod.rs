//! Shared by the KVM tests: the /dev/kvm gate and small layouts.
#![allow(dead_code, missing_docs)]

use squib_arch::GpaRange;
use squib_kvm::MemoryLayout;

/// Whether the calling test can use KVM (the crate's one gate; see [`squib_kvm::kvm_or_skip`]).
pub fn kvm_or_skip(test: &str) -> bool {
    squib_kvm::kvm_or_skip(test)
}

/// How long a test waits for an event before failing: generous, so a loaded machine only makes
/// the test slower.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Poll `done` every millisecond until it holds; fail naming `what` after [`DEADLINE`].
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: did not happen within {DEADLINE:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Serve uffd-wp faults with `serve` until `finished` says the vCPU thread is done. Past
/// [`DEADLINE`] it says so on standard error and keeps serving (the thread, blocked on a fault,
/// could not end otherwise, and a scoped thread is joined even while unwinding); returns whether
/// the deadline passed, for the caller to fail on once the thread has ended.
pub fn serve_until(mut finished: impl FnMut() -> bool, mut serve: impl FnMut(), what: &str) -> bool {
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut late = false;
    while !finished() {
        if !late && std::time::Instant::now() >= deadline {
            eprintln!("{what}: not done within {DEADLINE:?}; serving faults until it ends");
            late = true;
        }
        serve();
    }
    late
}

/// Two slots with a hole: 8 MiB at 0, 8 MiB at 32 MiB (a scaled-down below/above-4 GiB split).
pub fn split_layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        GpaRange::new(0, 8 << 20).unwrap(),
        GpaRange::new(32 << 20, 8 << 20).unwrap(),
    ])
    .unwrap()
}
