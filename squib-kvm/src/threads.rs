//! Which host thread runs which vCPU, so a fault reported by thread id names its vCPU.
//!
//! Why: userfaultfd reports the faulting thread (`UFFD_FEATURE_THREAD_ID`), not a vCPU. Every
//! place that enters `KVM_RUN` for vCPU `i` registers its thread for as long as it runs it
//! ([`VcpuThreads::enter`]); the uffd-wp handler looks the thread up. A thread that is no vCPU's
//! (the VMM writing guest memory itself) maps to [`GuestFault::NOT_A_VCPU`].
//!
//! The table is a fixed array of atomics: registration and lookup take no lock and allocate
//! nothing, so the fault path stays as cheap as it was.

use std::sync::atomic::{AtomicI32, Ordering};

use squib_snapshot::GuestFault;

/// The thread id of each vCPU's running thread (0: not running).
#[derive(Debug)]
pub struct VcpuThreads {
    tids: Box<[AtomicI32]>,
}

/// While alive, the calling thread is registered as running one vCPU.
#[derive(Debug)]
#[must_use = "the registration ends when the guard drops"]
pub struct Entered<'a> {
    slot: &'a AtomicI32,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Release);
    }
}

/// The calling thread's kernel thread id.
#[must_use]
pub fn current_tid() -> i32 {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::gettid() }
}

impl VcpuThreads {
    /// A table for `vcpus` vCPUs, none running.
    #[must_use]
    pub fn new(vcpus: usize) -> Self {
        Self {
            tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
        }
    }

    /// Register the calling thread as running vCPU `vcpu` until the guard drops. An index past
    /// the table registers nothing (its faults then name no vCPU).
    pub fn enter(&self, vcpu: usize) -> Option<Entered<'_>> {
        let slot = self.tids.get(vcpu)?;
        slot.store(current_tid(), Ordering::Release);
        Some(Entered { slot })
    }

    /// The vCPU thread `tid` runs, or [`GuestFault::NOT_A_VCPU`].
    #[must_use]
    pub fn vcpu_of(&self, tid: i32) -> u32 {
        if tid == 0 {
            return GuestFault::NOT_A_VCPU;
        }
        self.tids
            .iter()
            .position(|t| t.load(Ordering::Acquire) == tid)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(GuestFault::NOT_A_VCPU)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_name_the_vcpu_a_thread_runs_only_while_it_runs_it() {
        let t = VcpuThreads::new(2);
        let me = current_tid();
        assert_eq!(t.vcpu_of(me), GuestFault::NOT_A_VCPU);
        {
            let _g = t.enter(1).unwrap();
            assert_eq!(t.vcpu_of(me), 1);
            let other = std::thread::scope(|s| s.spawn(current_tid).join().unwrap());
            assert_eq!(t.vcpu_of(other), GuestFault::NOT_A_VCPU);
        }
        assert_eq!(t.vcpu_of(me), GuestFault::NOT_A_VCPU);
        assert!(t.enter(2).is_none());
        assert_eq!(t.vcpu_of(0), GuestFault::NOT_A_VCPU);
    }
}
