//! The software stage-2 backend: what runs where there is neither a Mac nor `/dev/kvm`, and what
//! CI leans on. It must fault exactly as Hypervisor.framework does, so it models the stage-2
//! tables ([`mmu`]), makes simulated vCPUs exit with the same syndrome a hardware abort carries
//! ([`vcpu`]), and runs guests whose writes race live checkpoints ([`runner`]).

pub mod mmu;
pub mod runner;
pub mod vcpu;

pub use mmu::{Descriptor, MmuCounters, SoftStage2, Stage2Exit};
pub use runner::{CheckpointSink, CountingSink, RunConfig, RunReport};
pub use vcpu::{GuestMem, SoftVcpu, SoftVm};
