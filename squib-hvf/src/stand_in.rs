//! A faithful stand-in for Hypervisor.framework, and a simulated vCPU that faults like one.
//!
//! The backend cannot run Hypervisor.framework outside Apple Silicon, so its correctness rests on
//! what reaches `hv_vm_protect`. [`StandIn`] records every call and refuses (and lists in
//! [`StandIn::violations`]) any call squib must never make: a range that is empty, not aligned to
//! the 16 KiB granule or not inside mapped memory, and permission bits other than exactly
//! READ|EXEC (protect) or READ|WRITE|EXEC (grant) — the last is the class of bug applevisor's own
//! tests missed. It keeps the resulting permissions per 16 KiB page and the bytes written, so
//! [`SimVcpu`] can run guest stores against them: a store to a page without WRITE becomes an
//! exception exit with the syndrome and IPA the hardware reports, which the real exit-handling
//! code ([`run_until_vmm_exit`](crate::vcpu::run_until_vmm_exit)) consumes.
//!
//! A permission change and a store are serialised by a reader-writer lock standing in for the
//! TLB invalidation: once `protect` returns, no store sees the old permission.
//!
//! Guest RAM is a vm-memory `GuestMemoryMmap` ([`StandIn::memory`]), allocated as a VM allocates
//! it ([`guest_ram`](crate::vm::guest_ram)), so the run loop, its snapshot sink and its
//! verification read the stand-in's RAM through the very type they read on Apple Silicon. Guest
//! stores land in it as a vCPU's do: straight into the mapping, not through vm-memory's write
//! path, whose dirty bitmap records only the VMM's own writes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use crate::hv::{GRANULE, Hv, HvError, PROTECTED, WRITABLE};
use applevisor_sys::{
    HV_MEMORY_EXEC, HV_MEMORY_READ, HV_MEMORY_WRITE, hv_exit_reason_t, hv_memory_flags_t,
    hv_vcpu_exit_exception_t, hv_vcpu_exit_t,
};
use squib_arch::GpaRange;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, VolatileSlice};

/// `HV_BAD_ARGUMENT`, what the stand-in returns for a call it refuses.
const HV_BAD_ARGUMENT: i32 = 0xfae9_4003_u32.cast_signed();

/// The granule in bytes, as a length.
const GRANULE_BYTES: usize = 0x4000;
const _: () = assert!(GRANULE_BYTES as u64 == GRANULE);

/// Syndromes the simulated vCPU reports, as the hardware encodes them (EC | IL | ISS).
pub mod syndrome {
    use squib_arch::esr::Esr;

    /// `str x1, [x0]` to a page without WRITE: data abort, ISV=1, 64-bit, WnR, permission L3.
    pub const STORE_PERMISSION: u64 = 0x93C1_804F;
    /// `str x1, [x0]` to an IPA with no memory: translation fault L3 (MMIO).
    pub const STORE_UNMAPPED: u64 = 0x93C1_8047;
    /// `stp` to a page without WRITE: ISV=0, as pair stores report.
    pub const STORE_PAIR_PERMISSION: u64 = Esr::stage2_write_permission(3).0;
    /// `stp` to an IPA with no memory.
    pub const STORE_PAIR_UNMAPPED: u64 = 0x9200_0047;
    /// `ldr x1, [x0]` from a page without READ.
    pub const LOAD_PERMISSION: u64 = 0x93C1_000F;
    /// `ldr x1, [x0]` from an IPA with no memory.
    pub const LOAD_UNMAPPED: u64 = 0x93C1_0007;
    /// Instruction fetch from a page without EXEC: instruction abort, permission L3.
    pub const FETCH_PERMISSION: u64 = 0x8200_000F;
    /// Instruction fetch from an IPA with no memory.
    pub const FETCH_UNMAPPED: u64 = 0x8200_0007;
    /// `hvc #0`.
    pub const HVC0: u64 = 0x5A00_0000;
}

/// One call that reached the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvCall {
    /// The IPA passed.
    pub ipa: u64,
    /// The size passed.
    pub size: usize,
    /// The flags passed.
    pub flags: hv_memory_flags_t,
}

/// Why a guest access did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessFault {
    /// No memory mapped at the address.
    Unmapped(u64),
    /// Mapped, but the permission is missing.
    Permission(u64),
}

/// A recording, checking model of Hypervisor.framework's stage-2 permissions over mapped memory.
#[derive(Debug)]
pub struct StandIn {
    mapped: Vec<GpaRange>,
    flags: Vec<Box<[AtomicU8]>>,
    memory: GuestMemoryMmap<AtomicBitmap>,
    tlb: RwLock<()>,
    calls: Mutex<Vec<HvCall>>,
    violations: Mutex<Vec<String>>,
    fail_next: Mutex<Option<HvError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn granule_index(offset: u64) -> usize {
    usize::try_from(offset / GRANULE).expect("a mapped region fits the address space")
}

impl StandIn {
    /// Memory mapped at `mapped` (granule-aligned), every page READ|WRITE|EXEC and zero, as
    /// `Memory::map` with `ReadWriteExec` leaves it.
    ///
    /// # Panics
    /// When a region is not granule-aligned or its memory cannot be allocated: the stand-in's own
    /// setup is wrong.
    #[must_use]
    pub fn new(mapped: &[GpaRange]) -> Self {
        for r in mapped {
            assert!(
                r.is_aligned(GRANULE),
                "stand-in mapping {r} is not granule-aligned"
            );
        }
        let ranges: Vec<_> = mapped
            .iter()
            .map(|r| {
                let len = usize::try_from(r.len()).expect("a stand-in mapping fits the address space");
                (GuestAddress(r.start()), len)
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).expect("allocate the stand-in's guest RAM");
        // Truncation is impossible: the flag values are 3-bit.
        let rwx = u8::try_from(WRITABLE).expect("permission bits fit a byte");
        Self {
            mapped: mapped.to_vec(),
            flags: mapped
                .iter()
                .map(|r| (0..r.len() / GRANULE).map(|_| AtomicU8::new(rwx)).collect())
                .collect(),
            memory,
            tlb: RwLock::new(()),
            calls: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            fail_next: Mutex::new(None),
        }
    }

    /// Every call received, in order.
    #[must_use]
    pub fn calls(&self) -> Vec<HvCall> {
        lock(&self.calls).clone()
    }

    /// Every call refused, with the reason; empty for a correct backend.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// Make the next (otherwise valid) call fail with `err`.
    pub fn fail_next(&self, err: HvError) {
        *lock(&self.fail_next) = Some(err);
    }

    /// The permission bits of the page holding `gpa`; `None` when it is not mapped.
    #[must_use]
    pub fn flags_at(&self, gpa: u64) -> Option<hv_memory_flags_t> {
        let (i, r) = self.mapped.iter().enumerate().find(|(_, r)| r.contains(gpa))?;
        Some(u64::from(
            self.flags[i][granule_index(gpa - r.start())].load(Ordering::Acquire),
        ))
    }

    /// Guest RAM, as a VM's [`memory`](crate::vm::HvfVm::memory) is.
    #[must_use]
    pub const fn memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.memory
    }

    /// Copy guest memory at `gpa` into `buf` (RAM starts zeroed).
    ///
    /// # Panics
    /// When the range is not inside one mapped region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        let len = u64::try_from(buf.len()).expect("buffer length fits u64");
        let range = GpaRange::new(gpa, len).expect("a non-empty, non-wrapping read");
        assert!(
            self.mapped.iter().any(|r| r.contains_range(&range)),
            "stand-in read of {range} outside mapped memory"
        );
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .expect("checked above: the range is mapped");
    }

    /// Copy `data` into guest memory at `gpa` as the VMM does: no permission applies, and
    /// vm-memory's bitmap records the write.
    ///
    /// # Panics
    /// When the range is not inside one mapped region.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let len = u64::try_from(data.len()).expect("buffer length fits u64");
        let range = GpaRange::new(gpa, len).expect("a non-empty, non-wrapping write");
        assert!(
            self.mapped.iter().any(|r| r.contains_range(&range)),
            "stand-in write of {range} outside mapped memory"
        );
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .expect("checked above: the range is mapped");
    }

    /// A guest store that the permissions allowed: into the mapping directly, leaving
    /// vm-memory's bitmap alone (a vCPU's store does not go through the VMM).
    fn store(&self, gpa: u64, data: &[u8]) {
        let slice = self
            .memory
            .get_slice(GuestAddress(gpa), data.len())
            .expect("a permitted store is inside one mapped region");
        let guard = slice.ptr_guard_mut();
        // SAFETY: `guard` points at `data.len()` bytes of the stand-in's own guest memory (the
        // slice vm-memory just handed out for exactly that range), which stays mapped while
        // `self` lives; every other access to it goes through vm-memory's volatile copies.
        let raw = unsafe { VolatileSlice::new(guard.as_ptr(), data.len()) };
        raw.copy_from(data);
    }

    fn check(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), String> {
        let len = u64::try_from(size).map_err(|_| format!("size {size:#x} does not fit u64"))?;
        let range =
            GpaRange::new(ipa, len).map_err(|e| format!("hv_vm_protect({ipa:#x}, {size:#x}): {e}"))?;
        if !range.is_aligned(GRANULE) {
            return Err(format!(
                "hv_vm_protect on {range}: not aligned to the 16 KiB granule"
            ));
        }
        if !self.mapped.iter().any(|r| r.contains_range(&range)) {
            return Err(format!("hv_vm_protect on {range}: not inside one mapped region"));
        }
        if flags & HV_MEMORY_EXEC == 0 {
            return Err(format!(
                "hv_vm_protect on {range} with flags {flags:#05b}: EXEC dropped, the guest would take instruction aborts"
            ));
        }
        if flags != PROTECTED && flags != WRITABLE {
            return Err(format!(
                "hv_vm_protect on {range} with flags {flags:#05b}: neither READ|EXEC nor READ|WRITE|EXEC"
            ));
        }
        Ok(())
    }

    /// Perform a guest access of `len` bytes at `gpa` needing permission `need`; a store passes
    /// its bytes in `data`. All or nothing: the first page lacking the permission stops it.
    pub(crate) fn access(
        &self,
        gpa: u64,
        len: u64,
        need: u64,
        data: Option<&[u8]>,
    ) -> Result<(), AccessFault> {
        let _tlb = self.tlb.read().unwrap_or_else(PoisonError::into_inner);
        let end = gpa.checked_add(len).ok_or(AccessFault::Unmapped(gpa))?;
        let mut page = gpa & !(GRANULE - 1);
        while page < end {
            let at = page.max(gpa);
            match self.flags_at(page) {
                None => return Err(AccessFault::Unmapped(at)),
                Some(f) if f & need != need => return Err(AccessFault::Permission(at)),
                Some(_) => {}
            }
            page += GRANULE;
        }
        if let Some(data) = data {
            self.store(gpa, data);
        }
        Ok(())
    }
}

impl Hv for StandIn {
    fn protect(&self, ipa: u64, size: usize, flags: hv_memory_flags_t) -> Result<(), HvError> {
        lock(&self.calls).push(HvCall { ipa, size, flags });
        if let Err(why) = self.check(ipa, size, flags) {
            lock(&self.violations).push(why);
            return Err(HvError::status("hv_vm_protect", HV_BAD_ARGUMENT));
        }
        if let Some(err) = lock(&self.fail_next).take() {
            return Err(err);
        }
        let _tlb = self.tlb.write().unwrap_or_else(PoisonError::into_inner);
        let (i, r) = self
            .mapped
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(ipa))
            .expect("checked above: the range is mapped");
        let first = granule_index(ipa - r.start());
        let bits = u8::try_from(flags).expect("checked above: the flags are 3-bit");
        for f in &self.flags[i][first..first + size / GRANULE_BYTES] {
            f.store(bits, Ordering::Release);
        }
        Ok(())
    }
}

/// One guest instruction the simulated vCPU executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimOp {
    /// A single-register store of `data` at `gpa` (faults with ISV=1, like `str`).
    Store {
        /// Where.
        gpa: u64,
        /// What.
        data: Vec<u8>,
    },
    /// A pair store of `data` at `gpa` (faults with ISV=0, like `stp`).
    StorePair {
        /// Where.
        gpa: u64,
        /// What.
        data: [u8; 16],
    },
    /// A load of `len` bytes at `gpa` (needs READ).
    Load {
        /// Where.
        gpa: u64,
        /// How many bytes.
        len: u64,
    },
    /// `hvc #0`: exit to the VMM.
    Hvc,
}

/// An exception exit as the framework reports it, for the guest's MMU-off world (virtual and
/// physical address are both the IPA).
pub(crate) fn exception_exit(syndrome: u64, ipa: u64) -> hv_vcpu_exit_t {
    hv_vcpu_exit_t {
        reason: hv_exit_reason_t::EXCEPTION,
        exception: hv_vcpu_exit_exception_t {
            syndrome,
            virtual_address: ipa,
            physical_address: ipa,
        },
    }
}

/// A vCPU that executes [`SimOp`]s against a [`StandIn`], fetching each from the code page at
/// `code` (so a code page without EXEC stops it), and exits exactly where hardware would: on a
/// stage-2 fault with the PC still at the faulting instruction, or after an `hvc`.
#[derive(Debug)]
pub struct SimVcpu<'a> {
    hv: &'a StandIn,
    code: u64,
    ops: Vec<SimOp>,
    next: usize,
    entries: Vec<u64>,
}

impl<'a> SimVcpu<'a> {
    /// A vCPU whose program `ops` sits at IPA `code` (4 bytes per instruction).
    #[must_use]
    pub fn new(hv: &'a StandIn, code: u64, ops: Vec<SimOp>) -> Self {
        Self {
            hv,
            code,
            ops,
            next: 0,
            entries: Vec::new(),
        }
    }

    /// The PC.
    #[must_use]
    pub fn pc(&self) -> u64 {
        self.code + 4 * u64::try_from(self.next).expect("program index fits u64")
    }

    /// The PC at each entry into `run`, in order: a retried store shows up as the same PC twice.
    #[must_use]
    pub fn entry_pcs(&self) -> &[u64] {
        &self.entries
    }
}

impl crate::vcpu::VcpuOps for SimVcpu<'_> {
    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvError> {
        self.entries.push(self.pc());
        loop {
            let pc = self.pc();
            match self.hv.access(pc, 4, HV_MEMORY_EXEC, None) {
                Ok(()) => {}
                Err(AccessFault::Permission(_)) => {
                    return Ok(exception_exit(syndrome::FETCH_PERMISSION, pc));
                }
                Err(AccessFault::Unmapped(_)) => return Ok(exception_exit(syndrome::FETCH_UNMAPPED, pc)),
            }
            let Some(op) = self.ops.get(self.next) else {
                // Ran off the end of the program: stop as a host-requested exit would.
                return Ok(hv_vcpu_exit_t {
                    reason: hv_exit_reason_t::CANCELED,
                    exception: hv_vcpu_exit_exception_t {
                        syndrome: 0,
                        virtual_address: 0,
                        physical_address: 0,
                    },
                });
            };
            let (result, on_perm, on_unmapped) = match op {
                SimOp::Store { gpa, data } => (
                    self.hv.access(
                        *gpa,
                        u64::try_from(data.len()).expect("fits"),
                        HV_MEMORY_WRITE,
                        Some(data),
                    ),
                    syndrome::STORE_PERMISSION,
                    syndrome::STORE_UNMAPPED,
                ),
                SimOp::StorePair { gpa, data } => (
                    self.hv.access(*gpa, 16, HV_MEMORY_WRITE, Some(data)),
                    syndrome::STORE_PAIR_PERMISSION,
                    syndrome::STORE_PAIR_UNMAPPED,
                ),
                SimOp::Load { gpa, len } => (
                    self.hv.access(*gpa, *len, HV_MEMORY_READ, None),
                    syndrome::LOAD_PERMISSION,
                    syndrome::LOAD_UNMAPPED,
                ),
                SimOp::Hvc => {
                    // HVC's preferred return address is the next instruction.
                    self.next += 1;
                    return Ok(exception_exit(syndrome::HVC0, 0));
                }
            };
            match result {
                Ok(()) => self.next += 1,
                Err(AccessFault::Permission(ipa)) => return Ok(exception_exit(on_perm, ipa)),
                Err(AccessFault::Unmapped(ipa)) => return Ok(exception_exit(on_unmapped, ipa)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> [GpaRange; 1] {
        [GpaRange::new(0x4000_0000, 1 << 20).unwrap()]
    }

    #[test]
    fn test_should_refuse_and_record_every_call_squib_must_never_make() {
        let hv = StandIn::new(&ram());
        let bad: [(u64, usize, u64, &str); 7] = [
            (0x4000_1000, 0x4000, PROTECTED, "not aligned"),
            (0x4000_0000, 0x2000, PROTECTED, "not aligned"),
            (0x4000_0000, 0, PROTECTED, "empty"),
            (0x400F_C000, 0x8000, WRITABLE, "not inside"),
            (0x4000_0000, 0x4000, HV_MEMORY_READ, "EXEC dropped"),
            // applevisor 1.0's Memory::protect(MemPerms::ReadWrite) sends the enum position, 4:
            (0x4000_0000, 0x4000, HV_MEMORY_EXEC, "neither"),
            (0x4000_0000, 0x4000, HV_MEMORY_WRITE | HV_MEMORY_EXEC, "neither"),
        ];
        for (ipa, size, flags, why) in bad {
            let e = hv.protect(ipa, size, flags).unwrap_err();
            assert!(matches!(e, HvError::Status { code, .. } if code == HV_BAD_ARGUMENT));
            let v = hv.violations();
            assert!(
                v.last().unwrap().contains(why),
                "{ipa:#x}/{size:#x}/{flags:#b}: {v:?}"
            );
        }
        assert_eq!(hv.violations().len(), bad.len());
        assert_eq!(
            hv.calls().len(),
            bad.len(),
            "every call is recorded, refused or not"
        );
        assert_eq!(
            hv.flags_at(0x4000_0000),
            Some(WRITABLE),
            "a refused call changed permissions"
        );
    }

    #[test]
    fn test_should_model_permissions_per_granule_page() {
        let hv = StandIn::new(&ram());
        hv.protect(0x4000_4000, 0x8000, PROTECTED).unwrap();
        assert_eq!(hv.flags_at(0x4000_3FFF), Some(WRITABLE));
        assert_eq!(hv.flags_at(0x4000_4000), Some(PROTECTED));
        assert_eq!(hv.flags_at(0x4000_BFFF), Some(PROTECTED));
        assert_eq!(hv.flags_at(0x4000_C000), Some(WRITABLE));
        assert_eq!(hv.flags_at(0x4010_0000), None);
        assert!(hv.violations().is_empty());
    }

    #[test]
    fn test_should_keep_the_bytes_a_store_writes() {
        let hv = StandIn::new(&ram());
        hv.access(0x4000_3FFC, 8, HV_MEMORY_WRITE, Some(&[1, 2, 3, 4, 5, 6, 7, 8]))
            .unwrap();
        let mut buf = [0xAA; 10];
        hv.read(0x4000_3FFB, &mut buf);
        assert_eq!(buf, [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]);
        hv.protect(0x4000_4000, 0x4000, PROTECTED).unwrap();
        assert_eq!(
            hv.access(0x4000_3FFC, 8, HV_MEMORY_WRITE, Some(&[9; 8])),
            Err(AccessFault::Permission(0x4000_4000))
        );
        hv.read(0x4000_3FFB, &mut buf);
        assert_eq!(
            buf,
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 0],
            "a faulting store must land nowhere"
        );
    }
}
