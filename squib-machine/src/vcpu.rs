//! vCPU threads, and how the machine stops them at a point where their state
//! can be read.
//!
//! The threads follow squib's one pause protocol ([`squib_kvm::pause`]): the machine asks through
//! the rendezvous and kicks each thread with a signal whose handler sets the vCPU's
//! `immediate_exit`, so a kick landing just before `KVM_RUN` makes that `KVM_RUN` return at once
//! and one kick is enough. Before parking, a thread re-enters `KVM_RUN` once with
//! `immediate_exit` set: KVM finishes the port read the guest was waiting on only on the next
//! `KVM_RUN`, and state read before that would miss the value.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::Mutex;
use squib_kvm::pause::{Kick, NotSettled, Rendezvous, Want};

use super::layout;
use super::serial::Com1;

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

/// Spawn the thread that runs `vcpu`.
///
/// # Errors
/// The OS refused to create the thread.
/// The thread holds `memory` (the RAM the VM's memslots point at) until after its vCPU fd is
/// closed, so RAM stays mapped as long as the vCPU can run, even if the machine was dropped
/// while this thread was stuck.
pub fn spawn<M: Send + Sync + 'static>(
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    control: Arc<Rendezvous>,
    devices: Arc<Devices>,
    memory: Arc<M>,
) -> std::io::Result<JoinHandle<()>> {
    Kick::install();
    std::thread::Builder::new()
        .name(format!("squib-vcpu{index}"))
        .spawn(move || {
            run(&vcpu, &control, &devices);
            drop(vcpu);
            drop(memory);
        })
}

fn run(vcpu: &Arc<Mutex<VcpuFd>>, control: &Rendezvous, devices: &Devices) {
    let _kick = Kick::enter(vcpu);
    loop {
        if control.want() != Want::Run {
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
            if control.park() == Want::Stop {
                control.exit();
                return;
            }
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
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it before looking at what is wanted, so a kick that lands
                // from here on is either seen by that look or ends the next KVM_RUN.
                fd.set_kvm_immediate_exit(0);
                Ok(())
            }
            Err(e) => Err(format!("KVM_RUN: {e}")),
        };
        drop(fd);
        if let Err(why) = outcome {
            control.fail(why);
            return;
        }
    }
}

/// Ask every vCPU to leave `KVM_RUN` for `want` ([`Want::Pause`] or [`Want::Stop`]), kick each
/// live thread once, and wait up to `timeout` until all have parked or ended.
///
/// # Errors
/// [`NotSettled`] naming how many threads had not.
pub fn stop_all(
    control: &Rendezvous,
    handles: &[JoinHandle<()>],
    want: Want,
    timeout: Duration,
) -> Result<(), NotSettled> {
    control.request(want);
    for h in handles {
        if !h.is_finished() {
            Kick::kick(h.as_pthread_t());
        }
    }
    control.wait_settled(handles.len(), timeout)
}

/// Let parked vCPUs run again.
pub fn resume_all(control: &Rendezvous) {
    control.request(Want::Run);
}
