//! Shared by the KVM tests: the /dev/kvm gate and small layouts.
#![allow(dead_code, missing_docs)]

use squib_arch::GpaRange;
use squib_kvm::MemoryLayout;

/// Whether the calling test can use KVM (the crate's one gate; see [`squib_kvm::kvm_or_skip`]).
pub fn kvm_or_skip(test: &str) -> bool {
    squib_kvm::kvm_or_skip(test)
}

/// Two slots with a hole: 8 MiB at 0, 8 MiB at 32 MiB (a scaled-down below/above-4 GiB split).
pub fn split_layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        GpaRange::new(0, 8 << 20).unwrap(),
        GpaRange::new(32 << 20, 8 << 20).unwrap(),
    ])
    .unwrap()
}
