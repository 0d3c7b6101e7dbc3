//! An x86-64 machine on KVM that boots a 64-bit ELF kernel the way Firecracker
//! does, and whose complete state can be captured while it runs and restored
//! into a new VM.
//!
//! Why it is built this way: a snapshot is only as good as the state it does not
//! forget. The guest's clock is KVM's in-kernel PIT, PIC, IOAPIC and LAPIC, so
//! the machine keeps those in the kernel (where a real VMM keeps them) and
//! carries their state explicitly; COM1 lives in squib and is carried too.
//! Memory stays a plain `GuestMemoryMmap<AtomicBitmap>` so the snapshot file
//! format saves and maps it like any other backend's memory.
//!
//! The machine: one RAM region at 0 (below the 3 GiB MMIO hole), 1 or 2 vCPUs,
//! in-kernel irqchip and PIT, COM1 at 0x3f8 on GSI 4. The boot vCPU enters
//! the kernel in long mode; the others wait for INIT/SIPI from it, as on a PC.
//!
//! # What a snapshot must not forget (learned the hard way or by reading KVM)
//!
//! - **A port read is finished only by the next `KVM_RUN`.** After a
//!   `KVM_EXIT_IO` for an `in`, KVM copies the value into the guest's register
//!   when the vCPU re-enters. A vCPU parked right after such an exit has a
//!   half-done instruction, so before parking each vCPU re-enters once with
//!   `immediate_exit` set ([`vcpu`]).
//! - **Kicks get lost.** The signal that makes `KVM_RUN` return `EINTR` can land
//!   just before the thread enters `KVM_RUN`; the pauser repeats it until every
//!   thread has parked.
//! - **Order of reads.** `KVM_GET_MP_STATE` first (it makes KVM process pending
//!   INIT/SIPI, changing registers and LAPIC); `KVM_GET_VCPU_EVENTS` last.
//! - **Order of writes.** PIT, clock and the three irqchips before any vCPU;
//!   per vCPU: CPUID (decides which MSRs exist), MP state, regs, sregs (carry
//!   the APIC base, x2APIC mode included), XSAVE, XCRs, debug regs, LAPIC (after
//!   sregs), MSRs (after the LAPIC: TSC deadline), events last.
//! - **MSRs: whatever KVM lists and will read.** The list comes from
//!   `KVM_GET_MSR_INDEX_LIST`; `KVM_GET_MSRS` stops at the first MSR it refuses,
//!   so the reader skips that one and goes on. The TSC is among them: restoring
//!   it makes the guest's TSC continue from the captured value, so time never
//!   runs backwards (the guest checks).
//! - **KVM clock flags.** `KVM_SET_CLOCK` with the flags `KVM_GET_CLOCK`
//!   returned would add the wall time spent saved (or be refused on older
//!   kernels); the machine clears them, so guest time resumes where it stopped.
//! - **The PIT keeps host time.** While the vCPUs are parked the in-kernel PIT
//!   keeps counting, and by KVM's default reinject policy the missed ticks are
//!   delivered back to back on resume: a guest counting ticks sees the pause.
//!   A restore reloads the PIT counters, so a restored guest starts without a
//!   backlog.
//! - **The LAPIC's LINT0 must be ExtINT** (virtual wire) or the 8259's
//!   interrupts never reach the boot CPU; this is set at boot and then travels
//!   inside the LAPIC state.
//! - **vm-memory's bitmap after a restore.** Filling the new RAM through
//!   vm-memory marks every page dirty; those bits are cleared, because the
//!   loaded bytes are the base the next diff is relative to.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpuid;
pub mod guest;
pub mod layout;
pub mod mptable;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod vcpu;

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_XSAVE2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, Msrs, Xsave, kvm_enable_cap, kvm_irqchip,
    kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use parking_lot::Mutex;
use squib_arch::GpaRange;
use squib_snapshot::report::ErrorChain;
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};
use vm_superio::Serial;
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use boot::GuestMemory;
pub use console::{Capture, Console};
pub use state::{MachineState, VcpuState};

use serial::IrqTrigger;
use squib_kvm::pause::{NotSettled, Rendezvous, Want};
use squib_kvm::{DirtyLogBackend, MemoryLayout};
use vcpu::Devices;

/// Path of squib's test guest kernel, built from `guest/kernel.S` by this crate's build.
pub const GUEST_KERNEL: &str = env!("SQUIB_GUEST_KERNEL");

/// How long [`Machine::pause`] (and stopping the machine) waits for every vCPU to park.
pub const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most vCPUs the machine (and the test guest) supports.
pub const MAX_VCPUS: u8 = 2;

/// What went wrong with the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The configuration cannot be built.
    #[error("invalid machine configuration: {0}")]
    InvalidConfig(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("guest memory of {size} bytes: {reason}")]
    Memory {
        /// Requested size.
        size: u64,
        /// What failed.
        reason: String,
    },
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// An operation needs the vCPUs paused.
    #[error("the machine must be paused to {0}")]
    NotPaused(&'static str),
    /// vCPUs did not park (or stop) in time.
    #[error(transparent)]
    NotSettled(NotSettled),
    /// A KVM MSR read or write stopped short.
    #[error("KVM {op}: MSR {index:#x} was refused")]
    Msr {
        /// Read or write.
        op: &'static str,
        /// The MSR.
        index: u32,
    },
    /// The state does not fit the memory or machine it is restored into.
    #[error("machine state does not match: {0}")]
    StateMismatch(String),
    /// A vCPU thread could not be started.
    #[error("starting vCPU thread {index}")]
    Thread {
        /// vCPU index.
        index: usize,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { op, source }
}

/// How to build a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Kernel command line.
    pub cmdline: String,
    /// Track guest writes (KVM's dirty log under squib's [`DirtyTracker`]) so
    /// that diff snapshots can be taken. Needs RAM in whole 2 MiB.
    pub track_dirty_pages: bool,
    /// An initial ramdisk, loaded at the top of low RAM and named in the zero page.
    pub initrd: Option<std::path::PathBuf>,
}

/// How [`Machine::restore`] brings the machine up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Park the vCPUs before they run a single guest instruction; [`Machine::resume`] starts them.
    pub paused: bool,
    /// As [`MachineConfig::track_dirty_pages`]; the log starts empty, so the first
    /// diff holds what changed since the restored snapshot.
    pub track_dirty_pages: bool,
}

impl MachineConfig {
    /// Check the configuration before anything is allocated.
    ///
    /// # Errors
    /// [`MachineError::InvalidConfig`] naming the value and the allowed range.
    pub fn validate(&self) -> Result<(), MachineError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(MachineError::InvalidConfig(format!(
                "{} vCPUs: this machine runs 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.mem_size < layout::MIN_MEM || self.mem_size > layout::MMIO_GAP_START {
            return Err(MachineError::InvalidConfig(format!(
                "{} bytes of RAM: must be {} MiB to {} MiB",
                self.mem_size,
                layout::MIN_MEM >> 20,
                layout::MMIO_GAP_START >> 20
            )));
        }
        if self.track_dirty_pages && !self.mem_size.is_multiple_of(2 << 20) {
            return Err(MachineError::InvalidConfig(format!(
                "{} bytes of RAM: dirty-page tracking needs a multiple of 2 MiB",
                self.mem_size
            )));
        }
        if !self.mem_size.is_multiple_of(4096) {
            return Err(MachineError::InvalidConfig(format!(
                "{} bytes of RAM: not a multiple of 4 KiB",
                self.mem_size
            )));
        }
        Ok(())
    }
}

/// Allocate zeroed guest RAM of `size` bytes at guest address 0.
///
/// Why transparent huge pages: a full snapshot reads all of RAM, most of it
/// never touched by the guest; backed by 4 KiB pages every untouched page costs
/// a fault on that read, backed by huge pages one fault maps 2 MiB (the huge
/// zero page). KVM still logs dirty pages at 4 KiB.
///
/// # Errors
/// [`MachineError::Memory`] if the mapping fails.
pub fn new_memory(size: u64) -> Result<GuestMemory, MachineError> {
    let len = usize::try_from(size).map_err(|e| MachineError::Memory {
        size,
        reason: e.to_string(),
    })?;
    let memory = GuestMemory::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| MachineError::Memory {
        size,
        reason: e.to_string(),
    })?;
    for region in memory.iter() {
        let host = region.as_ptr();
        // SAFETY: `host` and `region.len()` are exactly the anonymous mapping vm-memory made for
        // this region; MADV_HUGEPAGE only changes how the kernel backs it (a hint: an error, as
        // on a kernel without THP, changes nothing and is ignored).
        unsafe {
            libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE);
        }
    }
    Ok(memory)
}

/// A copy of `src` in fresh memory (what a restore from a full snapshot would map).
///
/// # Errors
/// [`MachineError::Memory`] if the copy cannot be made.
pub fn copy_memory(src: &GuestMemory) -> Result<GuestMemory, MachineError> {
    let size = src.last_addr().raw_value() + 1;
    let dst = new_memory(size)?;
    for region in src.iter() {
        let len = usize::try_from(region.len()).map_err(|e| MachineError::Memory {
            size,
            reason: e.to_string(),
        })?;
        let mut buf = vec![0u8; len];
        let fail = |e: vm_memory::GuestMemoryError| MachineError::Memory {
            size,
            reason: e.to_string(),
        };
        vm_memory::Bytes::read_slice(src, &mut buf, region.start_addr()).map_err(fail)?;
        vm_memory::Bytes::write_slice(&dst, &buf, region.start_addr()).map_err(fail)?;
    }
    Ok(dst)
}

/// A running (or paused) guest.
///
/// Dropping it stops the vCPU threads.
pub struct Machine {
    // Field order is drop order: threads end (in Drop) before the VM, the VM
    // before the memory it maps; the page server's watcher stops first of all.
    watch: Option<uffd::Watch>,
    handles: Vec<JoinHandle<()>>,
    control: Arc<Rendezvous>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    devices: Arc<Devices>,
    tracker: Option<DirtyTracker<DirtyLogBackend>>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    memory: Arc<GuestMemory>,
}

/// The tracker a machine's diffs come from: squib's core over KVM's dirty log.
pub type MachineTracker = DirtyTracker<DirtyLogBackend>;

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .field("mem_size", &(self.memory.last_addr().raw_value() + 1))
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Boot `kernel` (a 64-bit ELF) on a new machine; the vCPUs start running at once.
    ///
    /// # Errors
    /// [`MachineError`] naming the configuration value, file or KVM call at fault.
    pub fn boot(config: &MachineConfig, kernel: &Path, console: Console) -> Result<Self, MachineError> {
        config.validate()?;
        let memory = new_memory(config.mem_size)?;
        let (entry, kernel_end) = boot::load_kernel(&memory, kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&memory, path, config.mem_size, kernel_end)?),
            None => None,
        };
        boot::write_boot_params(&memory, &config.cmdline, config.mem_size, initrd)?;
        boot::write_tables(&memory)?;
        mptable::write(&memory, config.vcpus)?;
        acpi::write(&memory, config.vcpus)?;

        let (kvm, vm) = create_vm(&memory, config.track_dirty_pages)?;
        let devices = Arc::new(Devices {
            com1: Mutex::new(Serial::new(irq_trigger(&vm)?, console)),
        });
        let supported = supported_cpuid(&kvm)?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&supported, index, config.vcpus, tsc_deadline))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            set_msrs(&fd, &boot::msrs())?;
            fd.set_regs(&boot::regs(entry)).map_err(kvm_err("KVM_SET_REGS"))?;
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_fpu(&boot::fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
            let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            set_lint_virtual_wire(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        Self::start(
            kvm,
            vm,
            Arc::new(memory),
            vcpus,
            devices,
            Want::Run,
            config.track_dirty_pages,
        )
    }

    /// Build a new machine from `state` and `memory` (guest RAM as it was at the
    /// capture). It runs on from where the captured one stopped, or, with
    /// `paused`, waits for [`Machine::resume`] without running a single guest
    /// instruction.
    ///
    /// # Errors
    /// [`MachineError::StateMismatch`] if `memory` is not the size the state
    /// was captured with; otherwise the KVM call that refused the state.
    pub fn restore(
        state: &MachineState,
        memory: GuestMemory,
        console: Console,
        options: RestoreOptions,
    ) -> Result<Self, MachineError> {
        let paused = options.paused;
        let size = memory.last_addr().raw_value() + 1;
        if size != state.mem_size || memory.num_regions() != 1 {
            return Err(MachineError::StateMismatch(format!(
                "state is for {} bytes of RAM in one region, memory has {size} bytes in {} regions",
                state.mem_size,
                memory.num_regions()
            )));
        }
        let n = state.vcpus.len();
        if n == 0 || n > usize::from(MAX_VCPUS) {
            return Err(MachineError::StateMismatch(format!(
                "state has {n} vCPUs, this machine runs 1 to {MAX_VCPUS}"
            )));
        }
        // The memory is the snapshot's: nothing in it is dirty relative to it.
        for region in memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
        let (kvm, vm) = create_vm(&memory, options.track_dirty_pages)?;
        // VM-wide devices first: the vCPUs' LAPICs and events refer to them.
        vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        let mut clock = state.clock;
        // Resume the guest clock at its captured value: no jump back, and none
        // forward by the time the machine spent saved (flags would add it).
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        let serial = Serial::from_state(&(&state.serial).into(), irq_trigger(&vm)?, NoEvents, console)
            .map_err(|e| MachineError::StateMismatch(format!("COM1: {e:?}")))?;
        let devices = Arc::new(Devices {
            com1: Mutex::new(serial),
        });
        let mut vcpus = Vec::new();
        for (index, vs) in (0u64..).zip(&state.vcpus) {
            let fd = vm.create_vcpu(index).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            restore_vcpu(&fd, vs, xsave_size(&vm))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let want = if paused { Want::Pause } else { Want::Run };
        let machine = Self::start(
            kvm,
            vm,
            Arc::new(memory),
            vcpus,
            devices,
            want,
            options.track_dirty_pages,
        )?;
        if paused {
            // Wait until every thread has parked, so that `is_paused` holds on return.
            machine.pause()?;
        }
        Ok(machine)
    }

    /// As [`Machine::restore`], over memory a page-fault handler serves
    /// ([`uffd::UffdMemory::handshake`]). The machine keeps the handler's connection and its own
    /// copy of the userfaultfd for its whole life, and watches the connection: if the handler
    /// hangs up, the machine records the failure and stops for good (see [`uffd`]).
    ///
    /// # Errors
    /// As [`Machine::restore`]; also [`MachineError::Thread`] if the watcher cannot start.
    pub fn restore_served(
        state: &MachineState,
        served: uffd::ServedMemory,
        console: Console,
        options: RestoreOptions,
    ) -> Result<Self, MachineError> {
        let uffd::ServedMemory { memory, server } = served;
        let mut machine = Self::restore(state, memory, console, options)?;
        let halter = uffd::Halter::new(Arc::clone(&machine.control), &machine.handles);
        machine.watch = Some(
            uffd::Watch::start(server, halter).map_err(|source| MachineError::Thread {
                index: machine.handles.len(),
                source,
            })?,
        );
        Ok(machine)
    }

    fn start(
        kvm: Kvm,
        vm: VmFd,
        memory: Arc<GuestMemory>,
        vcpus: Vec<Arc<Mutex<VcpuFd>>>,
        devices: Arc<Devices>,
        want: Want,
        track_dirty_pages: bool,
    ) -> Result<Self, MachineError> {
        let vm = Arc::new(vm);
        // Tracking starts before any vCPU runs: every later guest write is in the dirty log,
        // every VMM write in vm-memory's bitmap, and the tracker ORs both into each diff.
        let tracker = if track_dirty_pages {
            Some(new_tracker(&vm, &memory)?)
        } else {
            None
        };
        let control = Arc::new(Rendezvous::new(want));
        let mut machine = Self {
            watch: None,
            handles: Vec::new(),
            control,
            vcpus,
            devices,
            tracker,
            vm,
            kvm,
            memory,
        };
        for (index, fd) in machine.vcpus.iter().enumerate() {
            let handle = vcpu::spawn(
                index,
                Arc::clone(fd),
                Arc::clone(&machine.control),
                Arc::clone(&machine.devices),
                Arc::clone(&machine.memory),
            )
            .map_err(|source| MachineError::Thread { index, source })?;
            machine.handles.push(handle);
        }
        Ok(machine)
    }

    /// Guest RAM.
    #[must_use]
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Number of vCPUs.
    #[must_use]
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The first fatal error a vCPU hit (guest panic, triple fault, KVM error), if any.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.control.failure()
    }

    /// Whether every vCPU thread has ended.
    #[must_use]
    pub fn has_stopped(&self) -> bool {
        self.control.exited() >= self.handles.len()
    }

    /// Whether the machine tracks guest writes ([`MachineConfig::track_dirty_pages`]).
    #[must_use]
    pub fn tracks_dirty_pages(&self) -> bool {
        self.tracker.is_some()
    }

    /// The dirty tracker, when the machine tracks guest writes.
    #[must_use]
    pub fn tracker(&self) -> Option<&MachineTracker> {
        self.tracker.as_ref()
    }

    /// Whether the vCPUs are parked by [`Machine::pause`] (or a paused restore).
    #[must_use]
    pub fn is_paused(&self) -> bool {
        self.control.is_paused(self.handles.len())
    }

    /// Stop the vCPUs at a point where their state is complete; returns once all are parked,
    /// or after [`PAUSE_TIMEOUT`] with an error naming how many were not.
    ///
    /// # Errors
    /// [`MachineError::NotSettled`] when a vCPU does not park in time.
    pub fn pause(&self) -> Result<(), MachineError> {
        vcpu::stop_all(&self.control, &self.handles, Want::Pause, PAUSE_TIMEOUT)
            .map_err(MachineError::NotSettled)
    }

    /// Let paused vCPUs run on (a machine stopped by [`Machine::halt`] or by a failure of its
    /// page server stays stopped).
    pub fn resume(&self) {
        vcpu::resume_all(&self.control);
    }

    /// Stop the vCPUs for good (after a failure, say): they leave `KVM_RUN` and their threads
    /// end; the machine never runs guest code again. Waits at most `timeout` for the threads to
    /// end; a thread held inside `KVM_RUN` (blocked on a page fault nobody serves) ends when it
    /// returns, since the request stays.
    ///
    /// # Errors
    /// [`MachineError::NotSettled`] naming how many vCPU threads had not ended in time.
    pub fn halt(&self, timeout: std::time::Duration) -> Result<(), MachineError> {
        vcpu::stop_all(&self.control, &self.handles, Want::Stop, timeout).map_err(MachineError::NotSettled)
    }

    /// Capture the complete machine state (memory excepted). The machine must be paused.
    ///
    /// # Errors
    /// [`MachineError::NotPaused`], or the KVM call that failed.
    pub fn capture(&self) -> Result<MachineState, MachineError> {
        if !self.control.is_paused(self.handles.len()) {
            return Err(MachineError::NotPaused("capture its state"));
        }
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::new();
        for fd in &self.vcpus {
            let fd = fd.lock();
            vcpus.push(capture_vcpu(&fd, msr_list.as_slice(), xsave_size(&self.vm))?);
        }
        let chip = |chip_id| -> Result<kvm_irqchip, MachineError> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(MachineState {
            version: state::STATE_VERSION,
            mem_size: self.memory.last_addr().raw_value() + 1,
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
            serial: self.devices.com1.lock().state().into(),
        })
    }
}

impl Drop for Machine {
    /// Stop the vCPU threads and join them. A thread that does not stop in time (stuck in the
    /// kernel) is left behind rather than waited for forever; it holds the vCPU (and through the
    /// kick guard its `kvm_run`) and ends with the process.
    fn drop(&mut self) {
        // The page server's watcher kicks vCPU threads by pthread id: it goes before any thread
        // may be joined or left behind.
        if let Some(w) = self.watch.as_mut() {
            w.stop();
        }
        if let Err(e) = vcpu::stop_all(&self.control, &self.handles, Want::Stop, PAUSE_TIMEOUT) {
            tracing::error!(error = %e, "machine dropped with vCPU threads still running");
        }
        for h in self.handles.drain(..) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// A started tracker over `memory`'s regions (one KVM memslot each, slot = region index).
fn new_tracker(vm: &Arc<VmFd>, memory: &Arc<GuestMemory>) -> Result<MachineTracker, MachineError> {
    let ram = memory
        .iter()
        .map(|r| GpaRange::new(r.start_addr().raw_value(), r.len()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MachineError::InvalidConfig(format!("guest RAM: {e}")))?;
    let layout = MemoryLayout::new(ram.clone())
        .map_err(|e| MachineError::InvalidConfig(format!("dirty-page tracking: {e}")))?;
    let backend = DirtyLogBackend::new(Arc::clone(vm), layout, Arc::clone(memory));
    let tracker = DirtyTracker::new(backend, &ram, TrackingConfig::new(Policy::Fine))
        .map_err(|e| MachineError::InvalidConfig(format!("dirty-page tracking: {}", ErrorChain(&e))))?;
    tracker.start().map_err(|e| {
        MachineError::InvalidConfig(format!("starting dirty-page tracking: {}", ErrorChain(&e)))
    })?;
    Ok(tracker)
}

/// Open KVM, create the VM with its in-kernel irqchip and PIT, and map `memory`.
fn create_vm(memory: &GuestMemory, log_dirty: bool) -> Result<(Kvm, VmFd), MachineError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDR).unwrap_or(usize::MAX))
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    if log_dirty {
        // Manual protect: reading the log does not re-protect; KVM_CLEAR_DIRTY_LOG does, for
        // exactly the pages harvested (the order a live checkpoint needs; see kvm::dirty_log).
        if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) == 0 {
            return Err(MachineError::InvalidConfig(
                "dirty-page tracking: this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2".to_owned(),
            ));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        vm.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
    }
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| MachineError::Memory {
                size: region.len(),
                reason: e.to_string(),
            })?;
        let mr = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping is `region.len()` bytes at `host`, owned by `memory`,
        // which the Machine keeps alive (and drops after the VM).
        unsafe { vm.set_user_memory_region(mr) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok((kvm, vm))
}

fn irq_trigger(vm: &VmFd) -> Result<IrqTrigger, MachineError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| MachineError::Kvm {
        op: "eventfd",
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    vm.register_irqfd(&evt, layout::COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(IrqTrigger(evt))
}

fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, MachineError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// LINT0 as ExtINT (the 8259 reaches the CPU through it) and LINT1 as NMI: the
/// "virtual wire" mode a PC boots in.
fn set_lint_virtual_wire(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let set = |lapic: &mut kvm_lapic_state, off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(&lapic.regs[off..off + 4]) {
            *d = s.to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (d, s) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
            *d = i8::from_ne_bytes([s]);
        }
    };
    set(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set(lapic, APIC_LVT1, APIC_MODE_NMI);
}

fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MachineError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| MachineError::Msr {
        op: "KVM_SET_MSRS (too many entries)",
        index: 0,
    })?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n < entries.len() {
        return Err(MachineError::Msr {
            op: "KVM_SET_MSRS",
            index: entries[n].index,
        });
    }
    Ok(())
}

/// Read every MSR in `list` that KVM will read; skip (one by one) those it refuses.
fn get_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, MachineError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| MachineError::Msr {
            op: "KVM_GET_MSRS (too many entries)",
            index: chunk[0],
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n (if any) was refused: skip it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Bytes of the XSAVE area KVM copies for this VM: `KVM_CAP_XSAVE2`'s answer, which exceeds the
/// 4 KiB `kvm_xsave` once the process has dynamic XSTATE permission (AMX), or 4 KiB where the
/// capability is absent.
fn xsave_size(vm: &VmFd) -> usize {
    let legacy = std::mem::size_of::<kvm_xsave>();
    usize::try_from(vm.check_extension_raw(u64::from(KVM_CAP_XSAVE2)))
        .unwrap_or(0)
        .max(legacy)
}

/// The XSAVE area, of the size KVM copies: `KVM_GET_XSAVE2` into a buffer that large where it
/// exceeds 4 KiB, `KVM_GET_XSAVE` otherwise.
fn get_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>, MachineError> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    if size <= legacy {
        return Ok(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?.region.to_vec());
    }
    let extra = (size - legacy).div_ceil(4);
    let mut xsave = Xsave::new(extra)
        .map_err(|_| MachineError::StateMismatch(format!("an XSAVE area of {size} bytes")))?;
    // SAFETY: `xsave` holds `size` bytes (the 4 KiB header plus `extra` words), the size KVM
    // reported for KVM_GET_XSAVE2 on this VM, so KVM writes within it.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Load an XSAVE area captured by [`get_xsave`], refusing one larger than this host's.
fn set_xsave(fd: &VcpuFd, words: &[u32], size: usize) -> Result<(), MachineError> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    let host_words = size.div_ceil(4);
    if words.len() > host_words {
        return Err(MachineError::StateMismatch(format!(
            "an XSAVE area of {} bytes, where this host's KVM takes {size}",
            words.len() * 4
        )));
    }
    let head = words.len().min(legacy / 4);
    if size <= legacy {
        let mut x = kvm_xsave::default();
        x.region[..head].copy_from_slice(&words[..head]);
        // SAFETY: KVM copies `size` bytes from the pointer, and `size` is at most the 4 KiB of
        // the `kvm_xsave` passed.
        return unsafe { fd.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::new(host_words - legacy / 4)
        .map_err(|_| MachineError::StateMismatch(format!("an XSAVE area of {size} bytes")))?;
    // SAFETY: the FAM header is plain data; only its region is written.
    unsafe { xsave.as_mut_fam_struct() }.xsave.region[..head].copy_from_slice(&words[..head]);
    if words.len() > head {
        xsave.as_mut_slice()[..words.len() - head].copy_from_slice(&words[head..]);
    }
    // SAFETY: `xsave` holds the `size` bytes KVM reports for this VM (header plus FAM), so
    // KVM_SET_XSAVE, which copies that many, reads within it.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
}

fn capture_vcpu(fd: &VcpuFd, msr_list: &[u32], xsave_size: usize) -> Result<VcpuState, MachineError> {
    // MP state first: reading it makes KVM process pending INIT/SIPI, which
    // changes the registers and LAPIC read after it.
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = get_xsave(fd, xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?;
    let msrs = get_msrs(fd, msr_list)?;
    // The rate the guest's TSC runs at (KVM without KVM_CAP_GET_TSC_KHZ: unknown, not saved).
    let tsc_khz = fd.get_tsc_khz().ok();
    // Events last: the pending-interrupt record must match the LAPIC read above.
    let events = fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        tsc_khz,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// How far (in parts per million) this host's TSC rate may differ from a snapshot's before
/// the restored vCPU's TSC is scaled to the snapshot's: boot-time calibration of one and the
/// same clock differs by less (QEMU's and Firecracker's tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Whether a vCPU whose TSC runs at `host_khz` must be scaled to run at `saved_khz`.
#[must_use]
pub fn tsc_needs_scaling(host_khz: u32, saved_khz: u32) -> bool {
    u64::from(host_khz.abs_diff(saved_khz)) * 1_000_000 > u64::from(saved_khz) * TSC_KHZ_TOLERANCE_PPM
}

/// The MSRs as `KVM_SET_MSRS` must take them after a restore: everything but the TSC deadline,
/// then the TSC deadline alone. KVM arms the LAPIC's one-shot timer by comparing the deadline
/// with the guest TSC at the time of the write, so the TSC must already hold its restored
/// value. A deadline of 0 with the timer in TSC-deadline mode (seen when a snapshot falls just
/// as the timer fired and before the guest re-armed it) would leave the guest without timer
/// interrupts for good; it becomes the restored TSC, a deadline already due, so the timer
/// fires at once and the guest's handler re-arms it (Firecracker does the same).
#[must_use]
pub fn restore_order_msrs(msrs: &[kvm_msr_entry]) -> (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    let tsc = msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data);
    let (mut deferred, first): (Vec<_>, Vec<_>) = msrs
        .iter()
        .copied()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    if let Some(tsc) = tsc {
        for m in deferred.iter_mut().filter(|m| m.data == 0) {
            m.data = tsc;
        }
    }
    (first, deferred)
}

fn restore_vcpu(fd: &VcpuFd, vs: &VcpuState, xsave_size: usize) -> Result<(), MachineError> {
    // The TSC's rate before anything that reads or writes TSC values.
    if let Some(saved) = vs.tsc_khz {
        let host = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        if tsc_needs_scaling(host, saved) {
            fd.set_tsc_khz(saved).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
        }
    }
    // Order matters (as in Firecracker): CPUID before MSRs (it decides which
    // exist); sregs before the LAPIC (sregs carry the APIC base); the LAPIC
    // before MSRs (TSC deadline) and before events; events last.
    let cpuid = CpuId::from_entries(&vs.cpuid)
        .map_err(|_| MachineError::StateMismatch(format!("{} CPUID entries", vs.cpuid.len())))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(vs.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&vs.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&vs.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    set_xsave(fd, &vs.xsave, xsave_size)?;
    fd.set_xcrs(&vs.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&vs.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&vs.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let (msrs, deadline) = restore_order_msrs(&vs.msrs);
    set_msrs(fd, &msrs)?;
    set_msrs(fd, &deadline)?;
    fd.set_vcpu_events(&vs.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    // The guest was stopped: its kvmclock page says so at the next entry, and a guest that
    // reads it (Linux) does not take the time it spent saved for a soft lockup. Refused
    // (EINVAL) where the guest never enabled kvmclock, as squib's test guest does not.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn test_should_restore_the_tsc_deadline_after_the_tsc_and_never_as_zero() {
        let saved = [msr(0x6e0, 0), msr(0x10, 5_000_000), msr(0x1b, 0xfee0_0900)];
        let (first, deferred) = restore_order_msrs(&saved);
        let idx = |v: &[kvm_msr_entry]| v.iter().map(|m| (m.index, m.data)).collect::<Vec<_>>();
        assert_eq!(idx(&first), vec![(0x10, 5_000_000), (0x1b, 0xfee0_0900)]);
        assert_eq!(
            idx(&deferred),
            vec![(0x6e0, 5_000_000)],
            "a zero deadline becomes the TSC: due at once"
        );
        let (_, deferred) = restore_order_msrs(&[msr(0x10, 7), msr(0x6e0, 9)]);
        assert_eq!(idx(&deferred), vec![(0x6e0, 9)], "an armed deadline is kept");
    }

    #[test]
    fn test_should_scale_the_tsc_only_beyond_250_ppm() {
        assert!(
            !tsc_needs_scaling(2_596_119, 2_596_138),
            "7 ppm: one clock calibrated twice"
        );
        assert!(!tsc_needs_scaling(1_000_250, 1_000_000), "exactly 250 ppm");
        assert!(tsc_needs_scaling(1_000_251, 1_000_000));
        assert!(tsc_needs_scaling(2_000_000, 3_000_000), "another host");
    }
}
