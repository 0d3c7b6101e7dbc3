//! A KVM virtual machine that runs squib's guest programs: memslots, the system area (page
//! tables, GDT, code, mailboxes), vCPUs started directly in 64-bit user mode, and the vCPU
//! threads with a pause protocol that lets a checkpoint run with vCPUs running or stopped.
//!
//! Pausing goes through the guest: the VMM sets a word in each vCPU's mailbox (untracked system
//! memory), the guest sees it within [`CHECK_EVERY`](super::guest::CHECK_EVERY) writes and exits on [`PORT_PAUSE`], and the
//! vCPU thread parks. No signal can be lost between a check and `KVM_RUN`, and a paused vCPU is
//! between two writes, never inside one.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_enable_cap, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend, TrackingMechanism};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    bitmap::AtomicBitmap,
};

use std::sync::atomic::{AtomicU64, Ordering};

use super::dirty_log::DirtyLogBackend;
use super::guest::{
    GUEST_PORTS, GuestError, PORT_DONE, PORT_IDLE, PORT_PAUSE, PORT_PROGRESS, Workload, poke_program,
    workload_program,
};
use super::layout::{LayoutError, MemoryLayout, REGION_ALIGN};
use super::pause::{Rendezvous, Want};
use super::threads::VcpuThreads;
use super::uffd::UffdWpBackend;

/// Offsets in the system area.
const PML4: u64 = 0;
const PDPT: u64 = 0x1000;
const PD_FIRST: u64 = 0x2000;
const PD_END: u64 = 0x3_0000;
const TSS: u64 = 0x3_0000;
/// The TSS's I/O permission bitmap, right after its 104-byte body, covering ports 0..0x600.
const IOMAP: u64 = 0x68;
const IOMAP_BYTES: u64 = 0x600 / 8;
const GDT: u64 = 0x4_0000;
const POKE_CODE: u64 = 0x4_1000;
const WORKLOAD_CODE: u64 = 0x4_2000;
const WORKLOAD_CODE_END: u64 = 0x8_0000;
const MAILBOXES: u64 = 0x8_0000;
const MAILBOX_SIZE: u64 = 64;
const HOTSPOT_TABLE: u64 = 0x10_0000;
const HOTSPOT_TABLE_END: u64 = 0x20_0000;
/// Most vCPUs a VM can have (mailbox space).
pub const MAX_VCPUS: u32 = 256;

const USER_CODE: u16 = 0x23;
const USER_DATA: u16 = 0x1b;
/// RFLAGS: reserved bit 1 only. IOPL stays 0: the guest's ports are opened by the TSS I/O
/// permission bitmap instead, because a nested hypervisor (kvm_pvm) was seen dropping a guest's
/// IOPL=3 mid-run (RFLAGS 0x10046 at a #GP on `out`, a triple fault with no IDT).
const RFLAGS: u64 = 0x2;
const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
/// Accessed and dirty preset, so the MMU never writes page-table entries.
const PTE_A: u64 = 0x20;
const PTE_D: u64 = 0x40;
const PTE_PS: u64 = 0x80;

/// Linux's `MADV_POPULATE_WRITE` (5.14), not in every libc release.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// What building or running a KVM VM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{op}")]
    Ioctl {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host's KVM lacks a capability this mode needs.
    #[error("KVM on this host lacks {0}")]
    Unsupported(&'static str),
    /// The memory layout is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The workload is unusable.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The tracking backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The tracker failed.
    #[error(transparent)]
    Track(#[from] squib_snapshot::TrackError),
    /// A vCPU exited in a way the guest programs never do.
    #[error("vCPU {vcpu} stopped unexpectedly: {exit} (rip {rip:#x})")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit.
        exit: String,
        /// Its instruction pointer.
        rip: u64,
    },
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
    /// A checkpoint failed (its units were folded back).
    #[error("checkpoint {index} failed")]
    Checkpoint {
        /// Which checkpoint.
        index: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// vCPUs did not reach a pause in time.
    #[error("vCPUs did not pause within {0:?} (a vCPU blocked on an unserved fault?)")]
    PauseTimeout(Duration),
    /// A vCPU thread panicked or could not start.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// The uffd-wp handler met a fault the tracker refused, and the VM was stopped.
    #[error(transparent)]
    UntrackedFault(Arc<crate::runner::UntrackedFault>),
}

fn ioctl(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    let op = op.into();
    move |source| KvmError::Ioctl { op, source }
}

/// How the VM's writes are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// The kernel's dirty log with manual protect.
    DirtyLog,
    /// userfaultfd write-protect faults through the core's fault path.
    UffdWp,
}

impl std::str::FromStr for Tracking {
    type Err = KvmError;
    fn from_str(s: &str) -> Result<Self, KvmError> {
        match s {
            "dirty-log" => Ok(Self::DirtyLog),
            "uffd-wp" => Ok(Self::UffdWp),
            other => Err(KvmError::Config(format!(
                "tracking {other:?}: unknown (use dirty-log or uffd-wp)"
            ))),
        }
    }
}

/// The KVM tracking backend, in either mode.
#[derive(Debug)]
pub enum KvmBackend {
    /// `dirty-log`.
    DirtyLog(DirtyLogBackend),
    /// `uffd-wp`.
    UffdWp(UffdWpBackend),
}

impl KvmBackend {
    /// The userfaultfd backend, in `uffd-wp` mode (its faults must be served).
    #[must_use]
    pub const fn uffd(&self) -> Option<&UffdWpBackend> {
        match self {
            Self::UffdWp(u) => Some(u),
            Self::DirtyLog(_) => None,
        }
    }
}

impl Stage2Backend for KvmBackend {
    fn geometry(&self) -> PageGeometry {
        PageGeometry::X86_64
    }
    fn mechanism(&self) -> TrackingMechanism {
        match self {
            Self::DirtyLog(b) => b.mechanism(),
            Self::UffdWp(b) => b.mechanism(),
        }
    }
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        match self {
            Self::DirtyLog(b) => b.write_protect(range),
            Self::UffdWp(b) => b.write_protect(range),
        }
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        match self {
            Self::DirtyLog(b) => b.grant_write(range),
            Self::UffdWp(b) => b.grant_write(range),
        }
    }
    fn harvest(&self, sink: &mut dyn FnMut(GpaRange)) -> Result<(), BackendError> {
        match self {
            Self::DirtyLog(b) => b.harvest(sink),
            Self::UffdWp(b) => b.harvest(sink),
        }
    }
}

/// What a VM is built from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// RAM regions (one memslot each).
    pub layout: MemoryLayout,
    /// vCPUs.
    pub vcpus: u32,
    /// Tracking mode.
    pub tracking: Tracking,
}

/// A KVM VM with squib's guest environment.
///
/// Drop order is part of memory safety: a memslot points KVM at host memory, and a VM (kept alive
/// by its own fd and by every vCPU fd) may touch it until the last of those fds closes. So every
/// holder of a VM or vCPU fd also holds the memory its slots point at and drops it after the fds:
/// here the fields are declared fds first, mappings last (fields drop in declaration order); the
/// dirty-log backend holds the VM fd before its RAM `Arc`; a running workload's threads own their
/// vCPU fds and share `Control`, which holds both mappings.
#[derive(Debug)]
pub struct KvmVm {
    vcpus: Vec<VcpuFd>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    layout: MemoryLayout,
    sregs: kvm_sregs,
    threads: Arc<VcpuThreads>,
    ram: Arc<GuestMemoryMmap<AtomicBitmap>>,
    sys: Arc<GuestMemoryMmap<()>>,
}

/// Whether this host can run KVM guests (`/dev/kvm` exists).
#[must_use]
pub fn kvm_available() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

fn populate(ram: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), KvmError> {
    for region in ram.iter() {
        let host = ram
            .get_host_address(region.start_addr())
            .map_err(|e| KvmError::Memory(format!("host address of RAM: {e}")))?;
        let len =
            usize::try_from(region.len()).map_err(|e| KvmError::Memory(format!("RAM region size: {e}")))?;
        // SAFETY: `host..host+len` is one whole anonymous mapping owned by `ram`; neither advice
        // changes its contents (NOHUGEPAGE keeps faults and protection at 4 KiB; POPULATE_WRITE
        // allocates zero pages as if each were written).
        let ret = unsafe {
            libc::madvise(host.cast(), len, libc::MADV_NOHUGEPAGE);
            libc::madvise(host.cast(), len, MADV_POPULATE_WRITE)
        };
        if ret != 0 {
            // Older kernels: touch every page. The bitmap of VMM writes is reset below.
            let mut off = 0;
            while off < region.len() {
                ram.write_obj(0u8, region.start_addr().unchecked_add(off))
                    .map_err(|e| KvmError::Memory(format!("populating RAM: {e}")))?;
                off += 4096;
            }
            let bitmap: &AtomicBitmap = (**region).bitmap();
            bitmap.reset();
        }
    }
    Ok(())
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl KvmVm {
    /// Build a VM: open `/dev/kvm`, create the VM, map and populate RAM and register it as
    /// memslots (with dirty logging in `dirty-log` mode), build the system area, create the
    /// vCPUs in 64-bit user mode. Returns the VM and its tracking backend (for the tracker).
    ///
    /// # Errors
    /// [`KvmError`] naming the step that failed.
    pub fn new(cfg: &VmConfig) -> Result<(Self, KvmBackend), KvmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(KvmError::Config(format!(
                "{} vCPUs: must be 1..={MAX_VCPUS}",
                cfg.vcpus
            )));
        }
        let layout = cfg.layout.clone();
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = Arc::new(kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?);
        let log = cfg.tracking == Tracking::DirtyLog;
        if log {
            if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) == 0 {
                return Err(KvmError::Unsupported("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"));
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm.enable_cap(&cap)
                .map_err(ioctl("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
        }
        let ranges: Vec<(GuestAddress, usize)> = layout
            .ram()
            .iter()
            .map(|r| Ok((GuestAddress(r.start()), usize::try_from(r.len())?)))
            .collect::<Result<_, std::num::TryFromIntError>>()
            .map_err(|e| KvmError::Memory(e.to_string()))?;
        let ram = Arc::new(
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges)
                .map_err(|e| KvmError::Memory(format!("mapping RAM {:?}: {e}", layout.ram())))?,
        );
        populate(&ram)?;
        let sys_range = layout.system();
        let sys = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(
                GuestAddress(sys_range.start()),
                usize::try_from(sys_range.len()).map_err(|e| KvmError::Memory(e.to_string()))?,
            )])
            .map_err(|e| KvmError::Memory(format!("mapping the system area: {e}")))?,
        );
        let mut slots: Vec<(u32, u64, u64, u64, u32)> = Vec::new();
        for (i, r) in layout.ram().iter().enumerate() {
            let host = ram
                .get_host_address(GuestAddress(r.start()))
                .map_err(|e| KvmError::Memory(e.to_string()))?;
            let flags = if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            let slot = u32::try_from(i).map_err(|e| KvmError::Memory(e.to_string()))?;
            slots.push((slot, r.start(), r.len(), host as u64, flags));
        }
        let sys_host = sys
            .get_host_address(GuestAddress(sys_range.start()))
            .map_err(|e| KvmError::Memory(e.to_string()))?;
        slots.push((
            layout.system_slot(),
            sys_range.start(),
            sys_range.len(),
            sys_host as u64,
            0,
        ));
        for (slot, gpa, size, host, flags) in slots {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host..host+size` is a live mapping owned by `ram` or `sys`. Every holder of
            // this VM's fd or of one of its vCPU fds (this KvmVm, the dirty-log backend, a
            // workload's Control and threads) also holds both `Arc`s and drops them after the fds
            // (see KvmVm), so the mapping outlives every use KVM can make of the slot.
            unsafe { vm.set_user_memory_region(region) }.map_err(ioctl(format!(
                "KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}"
            )))?;
        }
        build_system(&layout, &sys)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let threads = Arc::new(VcpuThreads::new(usize::try_from(cfg.vcpus).unwrap_or(0)));
        let mut vcpus = Vec::new();
        let mut sregs = kvm_sregs::default();
        for i in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(ioctl(format!("KVM_CREATE_VCPU {i}")))?;
            vcpu.set_cpuid2(&cpuid)
                .map_err(ioctl(format!("KVM_SET_CPUID2 on vCPU {i}")))?;
            sregs = vcpu
                .get_sregs()
                .map_err(ioctl(format!("KVM_GET_SREGS on vCPU {i}")))?;
            long_mode_user(&mut sregs, sys_range.start());
            vcpu.set_sregs(&sregs)
                .map_err(ioctl(format!("KVM_SET_SREGS (64-bit user mode) on vCPU {i}")))?;
            vcpus.push(vcpu);
        }
        let backend = if log {
            KvmBackend::DirtyLog(DirtyLogBackend::new(
                Arc::clone(&vm),
                layout.clone(),
                Arc::clone(&ram),
            ))
        } else {
            KvmBackend::UffdWp(UffdWpBackend::new(
                Arc::clone(&ram),
                &layout,
                Arc::clone(&threads),
            )?)
        };
        Ok((
            Self {
                vm,
                layout,
                ram,
                sys,
                vcpus,
                sregs,
                threads,
                _kvm: kvm,
            },
            backend,
        ))
    }

    /// Guest RAM (its bitmap records the VMM's own writes).
    #[must_use]
    pub const fn ram(&self) -> &Arc<GuestMemoryMmap<AtomicBitmap>> {
        &self.ram
    }

    /// The memory layout.
    #[must_use]
    pub const fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// vCPUs not running a workload.
    #[must_use]
    pub fn idle_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Make the guest write `len` bytes of `byte` at RAM address `gpa` (through its window,
    /// so a write must not cross from one RAM region into the next) on idle vCPU `vcpu`, and
    /// return when the write is done. In `uffd-wp` mode another thread must serve the faults.
    ///
    /// # Errors
    /// [`KvmError::Config`] for an address outside RAM; [`KvmError::UnexpectedExit`] or
    /// [`KvmError::Ioctl`] if the vCPU fails.
    pub fn poke(&mut self, vcpu: usize, gpa: u64, len: u64, byte: u8) -> Result<(), KvmError> {
        let va = self
            .layout
            .gpa_to_window(gpa)
            .filter(|va| {
                len > 0
                    && gpa
                        .checked_add(len - 1)
                        .and_then(|last| self.layout.gpa_to_window(last))
                        == Some(va + len - 1)
            })
            .ok_or_else(|| {
                KvmError::Config(format!(
                    "poke of {len} bytes at {gpa:#x}: not inside one RAM region"
                ))
            })?;
        let sys = self.layout.system().start();
        let v = self
            .vcpus
            .get_mut(vcpu)
            .ok_or_else(|| KvmError::Config(format!("vCPU {vcpu} is not idle")))?;
        let regs = kvm_regs {
            rip: sys + POKE_CODE,
            rdi: va,
            rcx: len,
            rax: u64::from(byte),
            rflags: RFLAGS,
            ..Default::default()
        };
        v.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        let id = u32::try_from(vcpu).unwrap_or(u32::MAX);
        let _running = self.threads.enter(vcpu);
        loop {
            match v.run() {
                Ok(VcpuExit::IoOut(PORT_DONE, _)) => return Ok(()),
                Ok(exit) => {
                    let exit = format!("{exit:?}");
                    let rip = v.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(KvmError::UnexpectedExit { vcpu: id, exit, rip });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(ioctl("KVM_RUN")(e)),
            }
        }
    }

    /// Start `workload` on every idle vCPU, each in its own thread.
    ///
    /// # Errors
    /// [`KvmError::Guest`] when the workload does not fit; [`KvmError::Ioctl`] when a vCPU
    /// cannot be set up.
    pub fn start(&mut self, workload: &Workload) -> Result<Workers, KvmError> {
        let n = u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX);
        if n == 0 {
            return Err(KvmError::Config("no idle vCPU to run the workload".into()));
        }
        let ram = self.layout.total();
        let entries = (0..n)
            .map(|i| workload.entry(ram, i, n))
            .collect::<Result<Vec<_>, _>>()?;
        let sys = self.layout.system().start();
        let code = workload_program(workload, sys + WORKLOAD_CODE)?;
        if code.len() > usize::try_from(WORKLOAD_CODE_END - WORKLOAD_CODE).unwrap_or(0) {
            return Err(KvmError::Config("workload program too large".into()));
        }
        self.sys
            .write_slice(&code, GuestAddress(sys + WORKLOAD_CODE))
            .map_err(|e| KvmError::Memory(format!("writing the workload program: {e}")))?;
        let table = workload.hotspot_table(ram)?;
        if table.len() > usize::try_from(HOTSPOT_TABLE_END - HOTSPOT_TABLE).unwrap_or(0) {
            return Err(KvmError::Config(format!(
                "hotspot over {ram:#x} bytes needs a {}-byte table; the system area holds {:#x}",
                table.len(),
                HOTSPOT_TABLE_END - HOTSPOT_TABLE
            )));
        }
        self.sys
            .write_slice(&table, GuestAddress(sys + HOTSPOT_TABLE))
            .map_err(|e| KvmError::Memory(format!("writing the hotspot table: {e}")))?;
        let control = Arc::new(Control {
            rz: Rendezvous::new(Want::Run),
            progress_exits: AtomicU64::new(0),
            _ram: Arc::clone(&self.ram),
            sys: Arc::clone(&self.sys),
            mailboxes: (0..u64::from(n))
                .map(|i| sys + MAILBOXES + i * MAILBOX_SIZE)
                .collect(),
            first: (0..n).map(Workload::first_value).collect(),
        });
        for (i, v) in self.vcpus.iter().enumerate() {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let e = entries[i];
            let mailbox = control.mailboxes[i];
            control.set(i, 0, Workload::first_value(id));
            control.set(i, 8, 0);
            let regs = kvm_regs {
                rip: sys + WORKLOAD_CODE,
                rflags: RFLAGS,
                r8: e.base,
                r9: e.len,
                r10: e.count,
                r11: if table.is_empty() {
                    e.aux
                } else {
                    sys + HOTSPOT_TABLE
                },
                r12: mailbox,
                r13: Workload::first_value(id),
                r14: workload.rng_state(id),
                ..Default::default()
            };
            v.set_regs(&regs)
                .map_err(ioctl(format!("KVM_SET_REGS on vCPU {i}")))?;
            v.set_sregs(&self.sregs)
                .map_err(ioctl(format!("KVM_SET_SREGS on vCPU {i}")))?;
        }
        let mut threads = Vec::new();
        for (i, v) in self.vcpus.drain(..).enumerate() {
            let c = Arc::clone(&control);
            let registry = Arc::clone(&self.threads);
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let t = std::thread::Builder::new()
                .name(format!("squib-vcpu{i}"))
                .spawn(move || {
                    let _running = registry.enter(i);
                    vcpu_loop(v, id, &c)
                })
                .map_err(|e| KvmError::Thread(e.to_string()))?;
            threads.push(t);
        }
        Ok(Workers {
            control,
            threads,
            started: Instant::now(),
        })
    }

    /// Stop `workers` and take their vCPUs back (idle again).
    ///
    /// # Errors
    /// The first vCPU thread's failure, if any (the other vCPUs are still taken back).
    pub fn stop(&mut self, workers: Workers) -> Result<RunStats, KvmError> {
        let (vcpus, stats, err) = workers.finish();
        self.vcpus = vcpus;
        err.map_or(Ok(stats), Err)
    }

    /// The VM fd.
    #[must_use]
    pub const fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }
}

/// 64-bit user mode: paging with the VMM's tables, long mode, CPL3 code and data segments.
fn long_mode_user(s: &mut kvm_sregs, sys: u64) {
    s.cs = seg(USER_CODE, 0xb, 1, 0);
    let data = seg(USER_DATA, 0x3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: sys + TSS,
        limit: u32::try_from(IOMAP + IOMAP_BYTES).unwrap_or(0x67),
        selector: 0x28,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = sys + GDT;
    s.gdt.limit = 5 * 8 - 1;
    // CR0: PE, MP, ET, NE, WP, PG.
    s.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    // CR4: PAE, OSFXSR, OSXMMEXCPT.
    s.cr4 = 0x20 | 0x200 | 0x400;
    s.cr3 = sys + PML4;
    // EFER: LME, LMA.
    s.efer = 0x100 | 0x400;
}

/// Page tables (RAM window at virtual 0, system area identity-mapped), GDT, poke program.
fn build_system(layout: &MemoryLayout, sys: &GuestMemoryMmap<()>) -> Result<(), KvmError> {
    let base = layout.system().start();
    let w = |val: u64, off: u64| {
        sys.write_obj(val, GuestAddress(base + off))
            .map_err(|e| KvmError::Memory(format!("writing the system area at {off:#x}: {e}")))
    };
    let table = PTE_P | PTE_RW | PTE_US | PTE_A;
    w((base + PDPT) | table, PML4)?;
    let mut pds: Vec<(u64, u64)> = Vec::new(); // (1 GiB index, PD offset)
    let mut map = |va: u64, gpa: u64| -> Result<(), KvmError> {
        let gib = va >> 30;
        let pd = match pds.iter().find(|(g, _)| *g == gib) {
            Some((_, pd)) => *pd,
            None => {
                let pd = PD_FIRST + 0x1000 * u64::try_from(pds.len()).unwrap_or(u64::MAX);
                if pd >= PD_END {
                    return Err(KvmError::Config(format!(
                        "guest RAM of {:#x} bytes needs more page directories than the system area holds",
                        layout.total()
                    )));
                }
                pds.push((gib, pd));
                w((base + pd) | table, PDPT + gib * 8)?;
                pd
            }
        };
        w(gpa | table | PTE_D | PTE_PS, pd + ((va >> 21) & 511) * 8)
    };
    let mut va = 0;
    for r in layout.ram() {
        let mut off = 0;
        while off < r.len() {
            map(va + off, r.start() + off)?;
            off += REGION_ALIGN;
        }
        va += r.len();
    }
    map(base, base)?;
    // GDT: null, kernel code, kernel data, user data (0x18), user code 64-bit (0x20).
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, d) in (0u64..).zip(gdt) {
        w(d, GDT + i * 8)?;
    }
    // TSS: I/O map base at IOMAP; the guest's ports allowed (bit clear), every other port denied,
    // and the terminating all-ones byte.
    let iomap_base = u16::try_from(IOMAP).unwrap_or(0x68);
    sys.write_obj(iomap_base, GuestAddress(base + TSS + 102))
        .map_err(|e| KvmError::Memory(format!("writing the TSS: {e}")))?;
    let mut iomap = vec![0xffu8; usize::try_from(IOMAP_BYTES + 1).unwrap_or(0)];
    for port in GUEST_PORTS {
        iomap[usize::from(port / 8)] &= !(1 << (port % 8));
    }
    sys.write_slice(&iomap, GuestAddress(base + TSS + IOMAP))
        .map_err(|e| KvmError::Memory(format!("writing the I/O permission bitmap: {e}")))?;
    let poke = poke_program(base + POKE_CODE)?;
    sys.write_slice(&poke, GuestAddress(base + POKE_CODE))
        .map_err(|e| KvmError::Memory(format!("writing the poke program: {e}")))?;
    Ok(())
}

#[derive(Debug)]
struct Control {
    /// The pause protocol every squib vCPU thread follows ([`crate::pause`]); here the kick is
    /// the mailbox request, so a workload stops between a write and the word that counts it.
    rz: Rendezvous,
    progress_exits: AtomicU64,
    mailboxes: Vec<u64>,
    first: Vec<u64>,
    /// The system area and guest RAM, held for as long as any vCPU thread runs (or its fd
    /// lives): a KvmVm dropped under running workers must not unmap what their vCPUs use.
    sys: Arc<GuestMemoryMmap<()>>,
    _ram: Arc<GuestMemoryMmap<AtomicBitmap>>,
}

impl Control {
    fn set(&self, vcpu: usize, off: u64, v: u64) {
        let _ = self.sys.store(
            v,
            GuestAddress(self.mailboxes[vcpu] + off),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    fn get(&self, vcpu: usize, off: u64) -> u64 {
        self.sys
            .load(
                GuestAddress(self.mailboxes[vcpu] + off),
                std::sync::atomic::Ordering::SeqCst,
            )
            .unwrap_or(0)
    }

    fn request(&self, on: bool) {
        for i in 0..self.mailboxes.len() {
            self.set(i, 8, u64::from(on));
        }
    }
}

fn vcpu_loop(mut v: VcpuFd, id: u32, c: &Control) -> (VcpuFd, Result<(), KvmError>) {
    let r = loop {
        let exit = match v.run() {
            Ok(VcpuExit::IoOut(port, _)) => port,
            Ok(other) => {
                let exit = format!("{other:?}");
                let rip = v.get_regs().map(|r| r.rip).unwrap_or(0);
                break Err(KvmError::UnexpectedExit { vcpu: id, exit, rip });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => break Err(ioctl(format!("KVM_RUN on vCPU {id}"))(e)),
        };
        match exit {
            PORT_PROGRESS => {
                c.progress_exits.fetch_add(1, Ordering::Relaxed);
            }
            // The guest saw the mailbox request: it is between two writes.
            PORT_PAUSE => {
                if c.rz.park() == Want::Stop {
                    break Ok(());
                }
            }
            PORT_IDLE => c.rz.idle(Duration::from_millis(1)),
            other => {
                let rip = v.get_regs().map(|r| r.rip).unwrap_or(0);
                break Err(KvmError::UnexpectedExit {
                    vcpu: id,
                    exit: format!("out to unknown port {other:#x}"),
                    rip,
                });
            }
        }
        if c.rz.want() == Want::Stop {
            break Ok(());
        }
    };
    match &r {
        Ok(()) => c.rz.exit(),
        Err(e) => c.rz.fail(e.to_string()),
    }
    (v, r)
}

/// What a workload run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Guest writes made (as of the vCPUs' last mailbox update).
    pub writes: u64,
    /// Progress exits taken.
    pub progress_exits: u64,
    /// Wall time from start to stop.
    pub elapsed: Duration,
}

/// vCPU threads running a workload.
#[derive(Debug)]
pub struct Workers {
    control: Arc<Control>,
    threads: Vec<JoinHandle<(VcpuFd, Result<(), KvmError>)>>,
    started: Instant,
}

impl Workers {
    /// Ask every vCPU to pause and wait (up to `timeout`) until all are parked between two
    /// writes. Guest memory is then still until [`resume`](Self::resume).
    ///
    /// # Errors
    /// [`KvmError::PauseTimeout`] if a vCPU did not pause in time (the request stays set).
    pub fn pause(&self, timeout: Duration) -> Result<(), KvmError> {
        self.control.rz.request(Want::Pause);
        self.control.request(true);
        self.control
            .rz
            .wait_settled(self.threads.len(), timeout)
            .map_err(|_| KvmError::PauseTimeout(timeout))
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        self.control.request(false);
        self.control.rz.request(Want::Run);
    }

    /// Guest writes made so far, summed over vCPUs (updated every [`CHECK_EVERY`](super::guest::CHECK_EVERY) writes).
    #[must_use]
    pub fn writes(&self) -> u64 {
        (0..self.control.mailboxes.len())
            .map(|i| self.control.get(i, 0).saturating_sub(self.control.first[i]))
            .sum()
    }

    /// Progress exits taken so far.
    #[must_use]
    pub fn progress_exits(&self) -> u64 {
        self.control.progress_exits.load(Ordering::Relaxed)
    }

    /// Whether a vCPU thread has ended (it failed, unless a stop was requested).
    #[must_use]
    pub fn any_exited(&self) -> bool {
        self.control.rz.exited() > 0
    }

    fn finish(mut self) -> (Vec<VcpuFd>, RunStats, Option<KvmError>) {
        self.join()
    }

    fn join(&mut self) -> (Vec<VcpuFd>, RunStats, Option<KvmError>) {
        self.control.rz.request(Want::Stop);
        self.control.request(true);
        let mut vcpus = Vec::new();
        let mut err = None;
        for t in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok((v, r)) => {
                    vcpus.push(v);
                    if let Err(e) = r {
                        err.get_or_insert(e);
                    }
                }
                Err(_) => {
                    err.get_or_insert(KvmError::Thread("a vCPU thread panicked".into()));
                }
            }
        }
        let writes = (0..self.control.mailboxes.len())
            .map(|i| self.control.get(i, 0).saturating_sub(self.control.first[i]))
            .sum();
        let stats = RunStats {
            writes,
            progress_exits: self.control.progress_exits.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        };
        (vcpus, stats, err)
    }
}

impl Drop for Workers {
    /// Workers dropped without [`KvmVm::stop`] stop their vCPUs and join their threads, so no
    /// vCPU outlives the run that started it.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.join();
        }
    }
}
