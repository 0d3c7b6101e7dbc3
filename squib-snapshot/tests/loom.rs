//! loom models of the lock-free protocols (run with `RUSTFLAGS="--cfg loom"`).
#![cfg(loom)]
