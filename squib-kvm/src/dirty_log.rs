//! Mode `dirty-log`: the kernel's dirty log, with manual protect.
//!
//! KVM logs every page the guest writes in a per-memslot bitmap without exiting. With
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reading the log (`KVM_GET_DIRTY_LOG`) no longer clears it
//! or re-protects the pages; `KVM_CLEAR_DIRTY_LOG` does, for exactly the pages it is given. That
//! split is what makes a live checkpoint safe, and it maps onto the core's order: `harvest`
//! reads the log and *remembers* what it reported; the tracker drains; `write_protect` clears
//! (re-protects) exactly the remembered pages; then the writer copies. A page written after the
//! harvest stays set in the kernel's log, so the next harvest reports it: clearing pages that
//! were not harvested would lose that write.
//!
//! Page numbers in the log are relative to the memslot's base. Every translation goes through
//! [`MemoryLayout`], so a layout with a hole between slots cannot shift a page into the wrong
//! place in a diff.

use std::sync::Arc;

use kvm_bindings::{KVMIO, kvm_clear_dirty_log};
use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend, TrackingMechanism};
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

use super::layout::MemoryLayout;

mod raw {
    //! The one ioctl kvm-ioctls does not wrap.
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        super::KVMIO,
        0xc0,
        super::kvm_clear_dirty_log
    );
}

const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct SlotLog {
    /// Pages reported by a harvest (or found at arming) and not yet cleared, one bit each.
    harvested: Vec<u64>,
    /// Whether the first `write_protect` has run (it clears whatever the log held before).
    armed: bool,
}

/// The dirty-log backend over a VM's RAM memslots (slot `i` is RAM region `i` of the layout).
#[derive(Debug)]
pub struct DirtyLogBackend {
    vm: Arc<VmFd>,
    layout: MemoryLayout,
    slots: Vec<Mutex<SlotLog>>,
    /// Keeps the memslots' host memory mapped for as long as the VM fd is held here.
    _ram: Arc<GuestMemoryMmap<AtomicBitmap>>,
}

impl DirtyLogBackend {
    /// A backend over `vm`'s RAM slots. The slots must have been registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES` and manual protect enabled on `vm` (the VM builder does both).
    #[must_use]
    pub fn new(vm: Arc<VmFd>, layout: MemoryLayout, ram: Arc<GuestMemoryMmap<AtomicBitmap>>) -> Self {
        let slots = layout
            .ram()
            .iter()
            .map(|r| {
                Mutex::new(SlotLog {
                    harvested: vec![0; usize::try_from((r.len() / PAGE).div_ceil(64)).unwrap_or(0)],
                    armed: false,
                })
            })
            .collect();
        Self {
            vm,
            layout,
            slots,
            _ram: ram,
        }
    }

    /// The slot holding `range`, and the range's first page and page count within it.
    fn locate(&self, range: GpaRange) -> Result<(usize, u64, u64), BackendError> {
        if !range.is_aligned(PAGE) {
            return Err(BackendError::Misaligned { range, granule: PAGE });
        }
        let (slot, r) = self
            .layout
            .ram()
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains_range(&range))
            .ok_or(BackendError::NotGuestMemory { range })?;
        Ok((slot, (range.start() - r.start()) / PAGE, range.len() / PAGE))
    }

    fn read_log(&self, slot: usize, range: GpaRange) -> Result<Vec<u64>, BackendError> {
        let len = self.layout.ram()[slot].len();
        let fail = |reason: String| BackendError::Hypervisor {
            op: "harvest",
            range,
            reason,
        };
        let size = usize::try_from(len).map_err(|e| fail(e.to_string()))?;
        let id = u32::try_from(slot).map_err(|e| fail(e.to_string()))?;
        self.vm
            .get_dirty_log(id, size)
            .map_err(|e| fail(format!("KVM_GET_DIRTY_LOG on slot {slot}: {e}")))
    }

    /// Clear (re-protect) the pages set in `bitmap`, which starts at page `first` (a multiple
    /// of 64) of `slot` and covers `pages` pages (a multiple of 64, or up to the slot's end).
    fn clear(
        &self,
        slot: usize,
        first: u64,
        pages: u64,
        bitmap: &mut [u64],
        range: GpaRange,
    ) -> Result<(), BackendError> {
        let fail = |reason: String| BackendError::Hypervisor {
            op: "write_protect",
            range,
            reason,
        };
        let mut arg = kvm_clear_dirty_log {
            slot: u32::try_from(slot).map_err(|e| fail(e.to_string()))?,
            num_pages: u32::try_from(pages).map_err(|e| fail(e.to_string()))?,
            first_page: first,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads `arg` and the bitmap it points to: `num_pages` bits,
        // which `bitmap` holds (the caller sized it as ceil(pages / 64) words), alive and
        // exclusively borrowed for the call. The VM fd is open for as long as `self.vm` lives.
        // The kernel validates slot, first_page (64-aligned) and num_pages against the memslot and
        // writes no user memory beyond the bitmap.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*self.vm, raw::KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(fail(format!(
                "KVM_CLEAR_DIRTY_LOG on slot {slot}, pages {first}+{pages}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// Call `sink` for every run of set bits in `words`, as GPA ranges from `base`.
fn emit_runs(words: &[u64], base: u64, sink: &mut dyn FnMut(GpaRange)) {
    let mut run: Option<(u64, u64)> = None;
    for (w, &word) in (0u64..).zip(words) {
        let mut bits = word;
        while bits != 0 {
            let page = w * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            run = match run {
                Some((start, end)) if end == page => Some((start, page + 1)),
                Some((start, end)) => {
                    if let Ok(r) = GpaRange::from_bounds(base + start * PAGE, base + end * PAGE) {
                        sink(r);
                    }
                    Some((page, page + 1))
                }
                None => Some((page, page + 1)),
            };
        }
    }
    if let Some((start, end)) = run
        && let Ok(r) = GpaRange::from_bounds(base + start * PAGE, base + end * PAGE)
    {
        sink(r);
    }
}

impl Stage2Backend for DirtyLogBackend {
    fn geometry(&self) -> PageGeometry {
        PageGeometry::X86_64
    }

    fn mechanism(&self) -> TrackingMechanism {
        TrackingMechanism::KernelLogged
    }

    /// Clear (re-protect) the harvested pages inside `range`. The first call on a slot first
    /// reads the log, so that what was written before tracking began (it is in the base
    /// snapshot) is cleared too.
    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        let (slot, first, count) = self.locate(range)?;
        let slot_pages = self.layout.ram()[slot].len() / PAGE;
        let mut log = self.slots[slot].lock();
        if !log.armed {
            let now = self.read_log(slot, range)?;
            for (h, n) in log.harvested.iter_mut().zip(&now) {
                *h |= n;
            }
            log.armed = true;
        }
        let w0 = first / 64;
        let w1 = (first + count).div_ceil(64);
        let mut bitmap = Vec::with_capacity(usize::try_from(w1 - w0).unwrap_or(0));
        let mut any = false;
        for w in w0..w1 {
            let lo = (w * 64).max(first);
            let hi = ((w + 1) * 64).min(first + count);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << (lo - w * 64)
            };
            let slot_word = &mut log.harvested[usize::try_from(w).unwrap_or(usize::MAX)];
            let bits = *slot_word & mask;
            *slot_word &= !mask;
            any |= bits != 0;
            bitmap.push(bits);
        }
        if !any {
            return Ok(());
        }
        let pages = ((w1 - w0) * 64).min(slot_pages - w0 * 64);
        if let Err(e) = self.clear(slot, w0 * 64, pages, &mut bitmap, range) {
            // Keep them remembered: a retry clears them.
            for (w, bits) in (w0..w1).zip(&bitmap) {
                log.harvested[usize::try_from(w).unwrap_or(usize::MAX)] |= bits;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Nothing faults in this mode: a no-op, after the same checks as `write_protect`.
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        self.locate(range).map(|_| ())
    }

    /// Read every slot's log, report the pages set (absolute GPAs: slot base + page * 4 KiB)
    /// and remember them for the next `write_protect`.
    fn harvest(&self, sink: &mut dyn FnMut(GpaRange)) -> Result<(), BackendError> {
        for (slot, r) in self.layout.ram().iter().enumerate() {
            let now = self.read_log(slot, *r)?;
            let mut log = self.slots[slot].lock();
            for (h, n) in log.harvested.iter_mut().zip(&now) {
                *h |= n;
            }
            drop(log);
            emit_runs(&now, r.start(), sink);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_report_runs_of_set_bits_from_the_slot_base() {
        let mut words = vec![0u64; 3];
        words[0] = 0b1110_0001;
        words[0] |= 1 << 63;
        words[1] = 1; // joins bit 63 of word 0
        words[2] = 1 << 5;
        let mut out = Vec::new();
        emit_runs(&words, 0x10_0000, &mut |r| out.push((r.start(), r.len())));
        assert_eq!(
            out,
            vec![
                (0x10_0000, PAGE),
                (0x10_0000 + 5 * PAGE, 3 * PAGE),
                (0x10_0000 + 63 * PAGE, 2 * PAGE),
                (0x10_0000 + 133 * PAGE, PAGE),
            ]
        );
    }
}
