//! The atomics the lock-free structures use: `std`'s normally, `loom`'s under `--cfg loom`, so
//! the loom models exercise the very code the VMM runs.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
