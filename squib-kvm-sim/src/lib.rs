//! squib's software stage-2 backend, the one every host and CI can run: a model of the stage-2
//! MMU ([`soft`]) that faults exactly as Hypervisor.framework does, simulated vCPUs that exit with
//! the syndrome a hardware abort carries, and the built-in workloads ([`workload`]) that drive
//! them. It proves the tracking core end to end without a hypervisor; the KVM backends
//! (`squib-kvm`), the booted machine (`squib-machine`) and trace replay (`squib-trace`) live in
//! crates of their own, so a backend author can depend on the simulator alone.
#![deny(missing_docs)]

pub mod soft;
pub mod workload;
