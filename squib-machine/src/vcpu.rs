//! vCPU threads, and how the machine stops them at a point where their state
//! can be read.
//!
//! A vCPU inside `KVM_RUN` is kicked out with a real-time signal whose handler
//! does nothing: the ioctl returns `EINTR`. A kick can land just before the
//! thread re-enters `KVM_RUN` and be lost, so the pauser repeats it until every
//! thread has parked. Before parking, a thread re-enters `KVM_RUN` once with
//! `immediate_exit` set: KVM finishes the port read the guest was waiting on
//! only on the next `KVM_RUN`, and state read before that would miss the value.

use std::sync::Arc;
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::layout;
use super::serial::Com1;

/// What the machine wants its vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Leave `KVM_RUN` and park.
    Pause,
    /// Leave `KVM_RUN` and end the thread.
    Stop,
}

#[derive(Debug)]
struct Shared {
    want: Want,
    parked: usize,
    exited: usize,
    failure: Option<String>,
}

/// The rendezvous between the machine and its vCPU threads.
#[derive(Debug)]
pub struct Control {
    state: Mutex<Shared>,
    cv: Condvar,
}

impl Control {
    /// A control block whose vCPUs start in state `want`.
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

    /// The first fatal error a vCPU reported, if any.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.state.lock().failure.clone()
    }

    /// How many vCPU threads have ended.
    #[must_use]
    pub fn exited(&self) -> usize {
        self.state.lock().exited
    }

    fn fail(&self, why: String) {
        let mut s = self.state.lock();
        s.failure.get_or_insert(why);
        s.exited += 1;
        self.cv.notify_all();
    }
}

/// The devices a vCPU exit can reach.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub com1: Mutex<Com1>,
}

impl Devices {
    fn io_out(&self, port: u16, data: &[u8]) -> Result<(), String> {
        match port {
            p if (layout::COM1_BASE..layout::COM1_BASE + 8).contains(&p) => {
                let offset = u8::try_from(p - layout::COM1_BASE).unwrap_or(0);
                if let Some(&b) = data.first() {
                    self.com1
                        .lock()
                        .write(offset, b)
                        .map_err(|e| format!("COM1 write: {e:?}"))?;
                }
                Ok(())
            }
            layout::PANIC_PORT => Err(format!(
                "guest panic: the guest reported fatal exception vector {}",
                data.first().copied().unwrap_or(0)
            )),
            _ => Ok(()),
        }
    }

    fn io_in(&self, port: u16, data: &mut [u8]) {
        if (layout::COM1_BASE..layout::COM1_BASE + 8).contains(&port) {
            let offset = u8::try_from(port - layout::COM1_BASE).unwrap_or(0);
            let v = self.com1.lock().read(offset);
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
        } else {
            data.fill(0xff);
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of `KVM_RUN`.
#[must_use]
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A failure here leaves the default action (terminate) in place; make it loud.
        register_signal_handler(kick_signal(), kick_handler)
            .expect("installing the vCPU kick signal handler");
    });
}

/// Spawn the thread that runs `vcpu`.
///
/// # Errors
/// The OS refused to create the thread.
pub fn spawn(
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    control: Arc<Control>,
    devices: Arc<Devices>,
) -> std::io::Result<JoinHandle<()>> {
    install_kick_handler();
    std::thread::Builder::new()
        .name(format!("squib-vcpu{index}"))
        .spawn(move || run(&vcpu, &control, &devices))
}

fn run(vcpu: &Mutex<VcpuFd>, control: &Control, devices: &Devices) {
    loop {
        let want = control.state.lock().want;
        if want != Want::Run {
            {
                let mut fd = vcpu.lock();
                fd.set_kvm_immediate_exit(1);
                // Completes a pending port/MMIO read; returns EINTR at once.
                let _ = fd.run();
                fd.set_kvm_immediate_exit(0);
                // Tell a kvmclock guest it was stopped, so the pause is not taken for a soft
                // lockup when it runs again (EINVAL, ignored, where the guest has no kvmclock).
                let _ = fd.kvmclock_ctrl();
            }
            let mut s = control.state.lock();
            if s.want == Want::Stop {
                s.exited += 1;
                control.cv.notify_all();
                return;
            }
            s.parked += 1;
            control.cv.notify_all();
            while s.want == Want::Pause {
                control.cv.wait(&mut s);
            }
            s.parked -= 1;
            continue;
        }
        let mut fd = vcpu.lock();
        let outcome = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => devices.io_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.io_in(port, data);
                Ok(())
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                Ok(())
            }
            Ok(VcpuExit::MmioWrite(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Ok(()),
            Ok(VcpuExit::Hlt) => Err("the guest halted with interrupts off".to_owned()),
            Ok(VcpuExit::Shutdown) => Err("the guest shut down (triple fault)".to_owned()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "KVM could not enter the guest on cpu {cpu}: hardware reason {reason:#x}"
            )),
            Ok(VcpuExit::InternalError) => {
                let run = fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Err(format!("KVM internal error, suberror {suberror}"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Err(format!("guest system event {kind}")),
            Ok(other) => Err(format!("unhandled vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(format!("KVM_RUN: {e}")),
        };
        drop(fd);
        if let Err(why) = outcome {
            control.fail(why);
            return;
        }
    }
}

/// Ask every vCPU to leave `KVM_RUN` for `want` ([`Want::Pause`] or [`Want::Stop`]) and
/// wait until all live threads have parked or ended.
pub fn stop_all(control: &Control, handles: &[JoinHandle<()>], want: Want) {
    let n = handles.len();
    let mut s = control.state.lock();
    s.want = want;
    control.cv.notify_all();
    loop {
        let settled = match want {
            Want::Pause => s.parked + s.exited >= n,
            _ => s.exited >= n,
        };
        if settled {
            return;
        }
        drop(s);
        for h in handles {
            if !h.is_finished() {
                // A lost kick is repeated on the next round.
                let _ = h.kill(kick_signal());
            }
        }
        s = control.state.lock();
        let _ = control.cv.wait_for(&mut s, Duration::from_millis(2));
    }
}

/// Let parked vCPUs run again.
pub fn resume_all(control: &Control) {
    let mut s = control.state.lock();
    s.want = Want::Run;
    control.cv.notify_all();
}

impl Control {
    /// Whether all `n` vCPU threads are parked (or ended) with a pause requested.
    #[must_use]
    pub fn is_paused(&self, n: usize) -> bool {
        let s = self.state.lock();
        s.want == Want::Pause && s.parked + s.exited >= n
    }
}
