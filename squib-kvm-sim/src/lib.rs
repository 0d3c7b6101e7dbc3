//! Linux backends for squib: the software stage-2 model and KVM (filled by their issues).
#![deny(missing_docs)]
#[cfg(target_os = "linux")]
pub mod machine;
