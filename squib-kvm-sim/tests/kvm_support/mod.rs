//! Shared by the KVM tests: the /dev/kvm gate and small layouts.
#![allow(dead_code, missing_docs)]

use squib_arch::GpaRange;
use squib_kvm_sim::kvm::{MemoryLayout, kvm_available};

/// Whether the calling test can use KVM. Without `/dev/kvm` the test prints why and is skipped,
/// unless `SQUIB_REQUIRE_KVM=1`, which makes a missing `/dev/kvm` a failure.
pub fn kvm_or_skip(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    assert!(
        std::env::var("SQUIB_REQUIRE_KVM").as_deref() != Ok("1"),
        "{test}: SQUIB_REQUIRE_KVM=1 but /dev/kvm does not exist"
    );
    eprintln!("{test}: skipped: /dev/kvm does not exist on this host");
    false
}

/// Two slots with a hole: 8 MiB at 0, 8 MiB at 32 MiB (a scaled-down below/above-4 GiB split).
pub fn split_layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        GpaRange::new(0, 8 << 20).unwrap(),
        GpaRange::new(32 << 20, 8 << 20).unwrap(),
    ])
    .unwrap()
}
