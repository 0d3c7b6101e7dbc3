//! One pause protocol for every squib vCPU thread: the rendezvous between the VMM and its vCPU
//! threads ([`Rendezvous`]), and the signal kick that takes a thread out of `KVM_RUN` ([`Kick`]).
//!
//! A snapshot needs every vCPU stopped where its state can be read, and the VMM must know when
//! they all are. The rendezvous is that: the VMM asks for [`Want::Pause`] or [`Want::Stop`];
//! each thread, once out of the guest, parks (or ends) and says so; the VMM waits until all
//! have, up to a deadline that ends in an error naming how many did not, never a hang.
//!
//! How a thread is made to leave the guest depends on the guest, and that is the one thing the
//! two users do differently:
//!
//! - The machine runs any kernel, which cannot be asked to cooperate: its threads are kicked with
//!   a signal ([`Kick`]). The handler sets `kvm_run.immediate_exit` of the vCPU the thread runs,
//!   as crosvm and Firecracker do, so a kick that lands just before the thread enters `KVM_RUN`
//!   is not lost: that `KVM_RUN` returns at once. One kick per pause is enough.
//! - The workload guests (`crate::vm`) are squib's own programs and stop between two writes when
//!   asked through a word in guest memory: a signal could stop them between a store and the
//!   progress word that counts it, and the write count their checks rely on would be off. Their
//!   threads use the same rendezvous, with that request as the kick.

use std::cell::Cell;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use parking_lot::{Condvar, Mutex};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// What the VMM wants its vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Leave the guest and park until resumed.
    Pause,
    /// Leave the guest and end the thread.
    Stop,
}

/// vCPU threads that did not settle in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{unsettled} of {vcpus} vCPUs did not {what} within {timeout:?} (blocked in the guest or on a fault nobody serves?)"
)]
pub struct NotSettled {
    /// What was asked: "pause" or "stop".
    pub what: &'static str,
    /// Threads that had neither parked nor ended.
    pub unsettled: usize,
    /// Threads in all.
    pub vcpus: usize,
    /// How long the VMM waited.
    pub timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    want: Want,
    parked: usize,
    exited: usize,
    failure: Option<String>,
}

/// The rendezvous between the VMM and `n` vCPU threads.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use squib_kvm::pause::{Rendezvous, Want};
///
/// let rz = Arc::new(Rendezvous::new(Want::Run));
/// let t = { let rz = Arc::clone(&rz); std::thread::spawn(move || {
///     // A vCPU thread: run until asked otherwise, park on a pause, end on a stop.
///     loop {
///         match rz.want() {
///             Want::Run => std::thread::yield_now(), // KVM_RUN would go here
///             _ => if rz.park() == Want::Stop { return rz.exit() },
///         }
///     }
/// })};
/// rz.request(Want::Pause);
/// rz.wait_settled(1, Duration::from_secs(30)).unwrap();
/// assert!(rz.is_paused(1));
/// rz.request(Want::Run);
/// rz.request(Want::Stop);
/// rz.wait_settled(1, Duration::from_secs(30)).unwrap();
/// t.join().unwrap();
/// ```
#[derive(Debug)]
pub struct Rendezvous {
    state: Mutex<Shared>,
    cv: Condvar,
}

impl Rendezvous {
    /// A rendezvous whose threads start wanting `want`.
    #[must_use]
    pub fn new(want: Want) -> Self {
        Self {
            state: Mutex::new(Shared {
                want,
                parked: 0,
                exited: 0,
                failure: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// What the VMM wants now (vCPU side: check before each entry into the guest).
    #[must_use]
    pub fn want(&self) -> Want {
        self.state.lock().want
    }

    /// vCPU side, once out of the guest with [`want`](Self::want) not `Run`: park while a pause
    /// is asked. Returns [`Want::Run`] to go back into the guest, [`Want::Stop`] to end (then
    /// call [`exit`](Self::exit)).
    pub fn park(&self) -> Want {
        let mut s = self.state.lock();
        if s.want == Want::Pause {
            s.parked += 1;
            self.cv.notify_all();
            while s.want == Want::Pause {
                self.cv.wait(&mut s);
            }
            s.parked -= 1;
        }
        s.want
    }

    /// vCPU side, while running an idle guest: wait up to `timeout` or until the VMM asks for
    /// something else, whichever is first.
    pub fn idle(&self, timeout: Duration) {
        let mut s = self.state.lock();
        if s.want == Want::Run {
            self.cv.wait_for(&mut s, timeout);
        }
    }

    /// vCPU side: the thread ends.
    pub fn exit(&self) {
        let mut s = self.state.lock();
        s.exited += 1;
        self.cv.notify_all();
    }

    /// vCPU side: the thread ends on a fatal error; the first one is kept.
    pub fn fail(&self, why: String) {
        let mut s = self.state.lock();
        s.failure.get_or_insert(why);
        s.exited += 1;
        self.cv.notify_all();
    }

    /// VMM side: ask every thread for `want` (then kick them out of the guest).
    ///
    /// [`Want::Stop`] is final: once asked, a later request changes nothing, so threads that are
    /// ending (or held in the kernel and ending when they return) are never sent back to park or
    /// run.
    pub fn request(&self, want: Want) {
        let mut s = self.state.lock();
        if s.want == Want::Stop {
            return;
        }
        s.want = want;
        self.cv.notify_all();
    }

    /// VMM side: record `why` as the failure (unless one is recorded already) and ask every
    /// thread to stop for good, from a thread that watches something the guest depends on (then
    /// kick them out of the guest).
    pub fn halt(&self, why: String) {
        let mut s = self.state.lock();
        s.failure.get_or_insert(why);
        s.want = Want::Stop;
        self.cv.notify_all();
    }

    /// VMM side: wait until all `n` threads have settled on what was asked (parked or ended for
    /// a pause, ended for a stop), up to `timeout`.
    ///
    /// # Errors
    /// [`NotSettled`] naming how many had not.
    pub fn wait_settled(&self, n: usize, timeout: Duration) -> Result<(), NotSettled> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock();
        loop {
            let settled = match s.want {
                Want::Run => return Ok(()),
                Want::Pause => s.parked + s.exited,
                Want::Stop => s.exited,
            };
            if settled >= n {
                return Ok(());
            }
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                let settled = match s.want {
                    Want::Pause => s.parked + s.exited,
                    _ => s.exited,
                };
                if settled >= n {
                    return Ok(());
                }
                return Err(NotSettled {
                    what: if s.want == Want::Stop { "stop" } else { "pause" },
                    unsettled: n - settled,
                    vcpus: n,
                    timeout,
                });
            }
        }
    }

    /// Whether a pause is asked and all `n` threads are parked (or ended).
    #[must_use]
    pub fn is_paused(&self, n: usize) -> bool {
        let s = self.state.lock();
        s.want == Want::Pause && s.parked + s.exited >= n
    }

    /// The first fatal error a thread reported.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.state.lock().failure.clone()
    }

    /// Threads that have ended.
    #[must_use]
    pub fn exited(&self) -> usize {
        self.state.lock().exited
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, for the kick handler.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local without a destructor is a plain TLS
    // load, and the store is one volatile byte write.
    let run = RUNNING.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was set by `Kick::enter` on this very thread from a VcpuFd's `kvm_run`
        // mapping, and is cleared when that guard drops; the guard holds the VcpuFd (and so the
        // mapping) alive, so a non-null `run` points at a mapped `kvm_run`. KVM reads the field
        // at entry; a byte store racing that read is what `immediate_exit` is made for.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal kick: takes a thread out of `KVM_RUN` with `immediate_exit`, so no kick is lost.
#[derive(Debug, Clone, Copy)]
pub struct Kick;

/// While alive, kicks of this thread set the entered vCPU's `immediate_exit`. It holds the vCPU,
/// so the `kvm_run` mapping the handler writes outlives the registration.
#[must_use = "the kick reaches the vCPU only while the guard lives"]
pub struct Entered {
    _fd: Arc<Mutex<VcpuFd>>,
}

impl std::fmt::Debug for Entered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entered")
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(std::ptr::null_mut()));
    }
}

impl Kick {
    /// The signal used (the first real-time signal).
    #[must_use]
    pub fn signal() -> libc::c_int {
        SIGRTMIN()
    }

    /// Install the handler (once per process).
    ///
    /// # Panics
    /// If the handler cannot be installed: the signal's default action would kill the process.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            register_signal_handler(Self::signal(), kick_handler)
                .expect("installing the vCPU kick signal handler");
        });
    }

    /// Make kicks of the calling thread reach `fd` until the guard drops. The thread must clear
    /// `immediate_exit` (`fd.set_kvm_immediate_exit(0)`) each time `KVM_RUN` returns, before it
    /// looks at [`Rendezvous::want`].
    pub fn enter(fd: &Arc<Mutex<VcpuFd>>) -> Entered {
        let run: *mut kvm_run = fd.lock().get_kvm_run();
        RUNNING.with(|r| r.set(run));
        Entered { _fd: Arc::clone(fd) }
    }

    /// Kick the thread `thread` (a `pthread_t`): it leaves `KVM_RUN` now, or at its next entry.
    pub fn kick(thread: libc::pthread_t) {
        // SAFETY: pthread_kill with a thread id from a JoinHandle of a thread not yet joined
        // (the callers keep the handle) and a signal whose handler is installed.
        let _ = unsafe { libc::pthread_kill(thread, Self::signal()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_report_threads_that_never_park_instead_of_waiting_forever() {
        let rz = Rendezvous::new(Want::Run);
        rz.request(Want::Pause);
        let e = rz.wait_settled(2, Duration::from_millis(50)).unwrap_err();
        assert_eq!((e.unsettled, e.vcpus, e.what), (2, 2, "pause"));
        assert!(e.to_string().contains("2 of 2 vCPUs did not pause"), "{e}");
    }

    #[test]
    fn test_should_keep_a_stop_final_and_record_the_failure_that_halted() {
        let rz = Rendezvous::new(Want::Run);
        rz.halt("the page server hung up".to_owned());
        rz.request(Want::Run);
        rz.request(Want::Pause);
        assert_eq!(rz.want(), Want::Stop);
        rz.halt("a later reason".to_owned());
        assert_eq!(rz.failure().as_deref(), Some("the page server hung up"));
        assert_eq!(rz.exited(), 0, "halting counts no thread as ended");
    }

    #[test]
    fn test_should_count_failed_threads_as_settled_and_keep_the_first_failure() {
        let rz = Arc::new(Rendezvous::new(Want::Run));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let rz = Arc::clone(&rz);
                std::thread::spawn(move || {
                    if i == 1 {
                        rz.fail(format!("vCPU {i} fell over"));
                        return;
                    }
                    loop {
                        if rz.want() == Want::Run {
                            rz.idle(Duration::from_millis(1));
                        } else if rz.park() == Want::Stop {
                            return rz.exit();
                        }
                    }
                })
            })
            .collect();
        rz.request(Want::Pause);
        rz.wait_settled(3, Duration::from_secs(30)).unwrap();
        assert!(rz.is_paused(3));
        assert_eq!(rz.failure().as_deref(), Some("vCPU 1 fell over"));
        rz.request(Want::Stop);
        rz.wait_settled(3, Duration::from_secs(30)).unwrap();
        assert_eq!(rz.exited(), 3);
        for t in threads {
            t.join().unwrap();
        }
    }
}
