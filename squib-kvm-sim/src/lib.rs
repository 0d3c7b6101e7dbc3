//! Linux backends for squib: the software stage-2 model and KVM (filled by their issues).
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod kvm;
#[cfg(target_os = "linux")]
pub mod machine;
pub mod soft;
pub mod trace;
pub mod workload;
