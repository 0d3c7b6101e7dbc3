//! A software stage-2 translation table that faults like Hypervisor.framework's.
//!
//! The soft backend is what CI and every user without a Mac or `/dev/kvm` runs, so a tracking bug
//! must show up here exactly as it would on hardware. The model therefore keeps the shape of the
//! real tables rather than a flat "writable" flag per page:
//!
//! - Each 2 MiB block has one descriptor. It is either a *block* descriptor carrying one set of
//!   permissions for the whole block, or a *table* descriptor whose granule pages each carry their
//!   own. With a 4 KiB granule the 2 MiB block is a level-2 block descriptor; with a 16 KiB
//!   granule (Apple Silicon) it is a run of 128 contiguous level-3 descriptors, so faults in it
//!   report level 3 either way.
//! - Changing part of a block splits it into pages; a table whose pages all agree again folds
//!   back into a block, as a hypervisor does to keep large mappings.
//! - Every `write_protect` and `grant_write` call is one TLB invalidation, counted. Taking write
//!   permission away is only complete when no vCPU can still be using the old translation, so
//!   `write_protect` waits until every guest access that began before it has finished: a write
//!   that lands after `write_protect` returns always faulted first. This is the property the
//!   tracker's "drain, re-protect, copy" rule depends on.
//!
//! Page tables for every block are allocated up front, so neither the fault path (`grant_write`)
//! nor a guest access ever allocates.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use squib_arch::esr::{Esr, ec};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend};

/// Read permission.
pub const PERM_R: u8 = 1;
/// Write permission.
pub const PERM_W: u8 = 2;
/// Execute permission.
pub const PERM_X: u8 = 4;
const PERM_RWX: u8 = PERM_R | PERM_W | PERM_X;
/// Descriptor bit: the block points to a table of granule pages.
const TABLE: u8 = 0x80;

/// What building the model can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MmuError {
    /// The geometry is invalid.
    #[error(transparent)]
    Geometry(#[from] squib_arch::GeometryError),
    /// A RAM region is not aligned to the granule, or overlaps another.
    #[error("RAM region {range} is unusable: {reason}")]
    BadRegion {
        /// The region.
        range: GpaRange,
        /// Why.
        reason: &'static str,
    },
    /// No vCPU slot is left for another vCPU.
    #[error("all {slots} vCPU slots of the soft stage-2 are taken")]
    NoVcpuSlot {
        /// How many slots the model was built with.
        slots: usize,
    },
}

/// One stage-2 descriptor, as a user of the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// The 2 MiB block is mapped whole with these permissions.
    Block(u8),
    /// The block is split; the granule page holding the address has these permissions.
    Page(u8),
}

/// A stage-2 abort the model raised instead of performing an access: what the vCPU exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage2Exit {
    /// The synthesized `ESR_EL2`.
    pub esr: Esr,
    /// The faulting IPA (the first byte of the access in the denied page).
    pub ipa: u64,
}

/// A vCPU's right to access guest memory through the model. Each vCPU thread holds its own; the
/// TLB-invalidation barrier in `write_protect` waits on each slot.
#[derive(Debug)]
pub struct VcpuSlot(usize);

/// Counters of what the model did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MmuCounters {
    /// TLB invalidations (one per `write_protect` or `grant_write` call).
    pub tlb_invalidations: u64,
    /// Blocks split into tables of pages.
    pub splits: u64,
    /// Tables folded back into blocks.
    pub folds: u64,
}

#[derive(Debug)]
struct Block {
    desc: AtomicU8,
    /// Serialises descriptor changes to this block; holds how many of its pages are writable
    /// while it is a table.
    writable: Mutex<u32>,
}

#[derive(Debug)]
struct Region {
    range: GpaRange,
    /// Absolute number of the first block.
    first_block: u64,
    blocks: Box<[Block]>,
    /// One permission byte per granule page of the region: the level-3 tables of every block.
    pages: Box<[AtomicU8]>,
}

/// Padded so vCPU slots do not share a cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Seq(AtomicU64);

/// The software stage-2. Implements [`Stage2Backend`]; guest accesses go through
/// [`SoftStage2::write_access`].
///
/// ```
/// use squib_arch::{GpaRange, PageGeometry};
/// use squib_kvm_sim::soft::mmu::{Descriptor, SoftStage2, PERM_W};
/// use squib_snapshot::Stage2Backend;
/// let ram = GpaRange::new(0x8000_0000, 4 << 20).unwrap();
/// let mmu = SoftStage2::new(PageGeometry::APPLE_SILICON, &[ram], 1).unwrap();
/// let vcpu = mmu.claim_vcpu().unwrap();
/// mmu.write_protect(ram).unwrap();
/// let exit = mmu.write_access(&vcpu, 0x8000_4010, || ()).unwrap_err();
/// assert!(exit.esr.is_stage2_write_permission_fault());
/// mmu.grant_write(GpaRange::new(0x8000_4000, 0x4000).unwrap()).unwrap();
/// assert_eq!(mmu.descriptor(0x8000_4000), Some(Descriptor::Page(0b111)));
/// assert!(mmu.write_access(&vcpu, 0x8000_4010, || ()).is_ok());
/// assert_eq!(mmu.counters().tlb_invalidations, 2);
/// ```
#[derive(Debug)]
pub struct SoftStage2 {
    geometry: PageGeometry,
    block_shift: u32,
    page_shift: u32,
    block_level: u8,
    regions: Box<[Region]>,
    slots: Box<[Seq]>,
    next_slot: AtomicU32,
    tlbi: AtomicU64,
    splits: AtomicU64,
    folds: AtomicU64,
}

impl SoftStage2 {
    /// A model over `regions` (granule-aligned, disjoint), every page readable, writable and
    /// executable, with room for `vcpus` concurrently accessing vCPUs.
    ///
    /// # Errors
    /// [`MmuError`] for a bad geometry or region.
    pub fn new(geometry: PageGeometry, regions: &[GpaRange], vcpus: usize) -> Result<Self, MmuError> {
        geometry.validate()?;
        let mut sorted = regions.to_vec();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[0].overlaps(&w[1]) {
                return Err(MmuError::BadRegion {
                    range: w[1],
                    reason: "overlaps another region",
                });
            }
        }
        let block_shift = geometry.tracking_default.trailing_zeros();
        let page_shift = geometry.granule.trailing_zeros();
        let mut built = Vec::with_capacity(sorted.len());
        for range in sorted {
            if !range.is_aligned(geometry.granule) {
                return Err(MmuError::BadRegion {
                    range,
                    reason: "not aligned to the stage-2 granule",
                });
            }
            let first_block = range.start() >> block_shift;
            let blocks = ((range.end() - 1) >> block_shift) - first_block + 1;
            let pages = range.len() >> page_shift;
            built.push(Region {
                range,
                first_block,
                blocks: (0..blocks)
                    .map(|_| Block {
                        desc: AtomicU8::new(PERM_RWX),
                        writable: Mutex::new(0),
                    })
                    .collect(),
                pages: (0..pages).map(|_| AtomicU8::new(PERM_RWX)).collect(),
            });
        }
        // The level a block-sized mapping lives at: a level-2 block when the granule's level-2
        // entries are exactly block-sized (4 KiB granule: 512 × 4 KiB = 2 MiB), otherwise a run
        // of contiguous level-3 entries (16 KiB granule: 128 × 16 KiB).
        let l2_size = geometry.granule.saturating_mul(geometry.granule / 8);
        let block_level = if l2_size == geometry.tracking_default {
            2
        } else {
            3
        };
        Ok(Self {
            geometry,
            block_shift,
            page_shift,
            block_level,
            regions: built.into_boxed_slice(),
            slots: (0..vcpus.max(1)).map(|_| Seq::default()).collect(),
            next_slot: AtomicU32::new(0),
            tlbi: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            folds: AtomicU64::new(0),
        })
    }

    /// Claim a vCPU slot: each thread that makes guest accesses needs its own.
    ///
    /// # Errors
    /// [`MmuError::NoVcpuSlot`] when every slot is taken.
    pub fn claim_vcpu(&self) -> Result<VcpuSlot, MmuError> {
        let i = usize::try_from(self.next_slot.fetch_add(1, Ordering::Relaxed)).unwrap_or(usize::MAX);
        if i >= self.slots.len() {
            return Err(MmuError::NoVcpuSlot {
                slots: self.slots.len(),
            });
        }
        Ok(VcpuSlot(i))
    }

    /// The RAM regions, sorted.
    pub fn regions(&self) -> impl Iterator<Item = GpaRange> + '_ {
        self.regions.iter().map(|r| r.range)
    }

    /// Counters so far.
    pub fn counters(&self) -> MmuCounters {
        MmuCounters {
            tlb_invalidations: self.tlbi.load(Ordering::Relaxed),
            splits: self.splits.load(Ordering::Relaxed),
            folds: self.folds.load(Ordering::Relaxed),
        }
    }

    #[inline]
    fn region_of(&self, gpa: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.range.contains(gpa))
    }

    /// Index of a block or page: bounded by slices allocated at construction, so it fits.
    #[inline]
    #[allow(clippy::cast_possible_truncation)]
    const fn idx(i: u64) -> usize {
        i as usize
    }

    /// The region's pages `[first, first + count)` that belong to `block`.
    fn block_pages(&self, r: &Region, block: u64) -> (u64, u64) {
        let base = (r.first_block + block) << self.block_shift;
        let start = base.max(r.range.start());
        let end = (base + self.geometry.tracking_default).min(r.range.end());
        let first = (start - r.range.start()) >> self.page_shift;
        (first, (end - start) >> self.page_shift)
    }

    /// The descriptor governing `gpa`, if it is RAM.
    pub fn descriptor(&self, gpa: u64) -> Option<Descriptor> {
        let r = self.region_of(gpa)?;
        let block = (gpa >> self.block_shift) - r.first_block;
        let d = r.blocks[Self::idx(block)].desc.load(Ordering::SeqCst);
        if d & TABLE == 0 {
            return Some(Descriptor::Block(d));
        }
        let page = (gpa - r.range.start()) >> self.page_shift;
        Some(Descriptor::Page(r.pages[Self::idx(page)].load(Ordering::SeqCst)))
    }

    /// A guest write to the granule page holding `gpa`, by the vCPU holding `slot`: checks the
    /// stage-2 permission and, when it allows the write, runs `apply` (which performs it) before
    /// any later `write_protect` can return. When it does not, nothing is applied and the vCPU
    /// exits with a stage-2 data abort: a permission fault at the descriptor's level, or a
    /// translation fault for an address that is not RAM. The access must not cross a granule
    /// page; callers split writes page by page, as the hardware faults them.
    ///
    /// # Errors
    /// The [`Stage2Exit`] the vCPU takes instead of the write.
    ///
    /// # Panics
    /// If `slot` was claimed from another model with more vCPU slots than this one.
    #[inline]
    pub fn write_access<R>(
        &self,
        slot: &VcpuSlot,
        gpa: u64,
        apply: impl FnOnce() -> R,
    ) -> Result<R, Stage2Exit> {
        let seq = &self.slots[slot.0].0;
        // Enter: odd. SeqCst pairs with the SeqCst descriptor stores and slot loads in
        // `write_protect`: either it sees this access in flight and waits, or this access sees
        // its new descriptors.
        seq.fetch_add(1, Ordering::SeqCst);
        let result = match self.permission(gpa) {
            Some((perms, _)) if perms & PERM_W != 0 => Ok(apply()),
            Some((_, level)) => Err(Stage2Exit {
                esr: Esr::stage2_write_permission(level),
                ipa: gpa,
            }),
            None => Err(Stage2Exit {
                esr: translation_fault(self.block_level),
                ipa: gpa,
            }),
        };
        // Leave: even. Release publishes what `apply` wrote to whoever waited on this slot.
        seq.fetch_add(1, Ordering::Release);
        result
    }

    /// Permissions and descriptor level for `gpa`.
    #[inline]
    fn permission(&self, gpa: u64) -> Option<(u8, u8)> {
        let r = self.region_of(gpa)?;
        let block = (gpa >> self.block_shift) - r.first_block;
        let d = r.blocks[Self::idx(block)].desc.load(Ordering::SeqCst);
        if d & TABLE == 0 {
            return Some((d, self.block_level));
        }
        let page = (gpa - r.range.start()) >> self.page_shift;
        Some((r.pages[Self::idx(page)].load(Ordering::SeqCst), 3))
    }

    /// Set or clear write permission on `range`, block by block, splitting and folding.
    fn set_write(&self, range: GpaRange, writable: bool) -> Result<(), BackendError> {
        if !range.is_aligned(self.geometry.granule) {
            return Err(BackendError::Misaligned {
                range,
                granule: self.geometry.granule,
            });
        }
        let r = self
            .regions
            .iter()
            .find(|r| r.range.contains_range(&range))
            .ok_or(BackendError::NotGuestMemory { range })?;
        self.tlbi.fetch_add(1, Ordering::Relaxed);
        let target = if writable { PERM_RWX } else { PERM_R | PERM_X };
        let first_block = (range.start() >> self.block_shift) - r.first_block;
        let last_block = ((range.end() - 1) >> self.block_shift) - r.first_block;
        let want_first = (range.start() - r.range.start()) >> self.page_shift;
        let want_end = (range.end() - r.range.start()) >> self.page_shift;
        for block in first_block..=last_block {
            let b = &r.blocks[Self::idx(block)];
            let (first, count) = self.block_pages(r, block);
            let lo = want_first.max(first);
            let hi = want_end.min(first + count);
            let mut wcount = b.writable.lock();
            let d = b.desc.load(Ordering::Relaxed);
            if lo == first && hi == first + count {
                // The whole block: one block descriptor.
                if d & TABLE != 0 {
                    self.folds.fetch_add(1, Ordering::Relaxed);
                }
                b.desc.store(target, Ordering::SeqCst);
                continue;
            }
            if d & TABLE == 0 {
                if d == target {
                    continue;
                }
                // Split: the table starts as a copy of the block's permissions.
                for p in first..first + count {
                    r.pages[Self::idx(p)].store(d, Ordering::SeqCst);
                }
                *wcount = if d & PERM_W != 0 {
                    u32::try_from(count).unwrap_or(u32::MAX)
                } else {
                    0
                };
                self.splits.fetch_add(1, Ordering::Relaxed);
            }
            for p in lo..hi {
                let prev = r.pages[Self::idx(p)].swap(target, Ordering::SeqCst);
                match (prev & PERM_W != 0, writable) {
                    (false, true) => *wcount += 1,
                    (true, false) => *wcount -= 1,
                    _ => {}
                }
            }
            if *wcount == 0 || u64::from(*wcount) == count {
                // Uniform again: fold back into one block descriptor.
                let perms = if *wcount == 0 { PERM_R | PERM_X } else { PERM_RWX };
                b.desc.store(perms, Ordering::SeqCst);
                if d & TABLE != 0 {
                    self.folds.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                b.desc.store(TABLE, Ordering::SeqCst);
            }
            drop(wcount);
        }
        Ok(())
    }

    /// The TLB-invalidation barrier: wait until every guest access that may have used a
    /// translation from before this call has finished.
    fn invalidate_tlb(&self) {
        for slot in self.slots.iter() {
            let s = slot.0.load(Ordering::SeqCst);
            if s & 1 == 0 {
                continue;
            }
            let mut spins = 0u32;
            while slot.0.load(Ordering::Acquire) == s {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// A stage-2 translation fault on a write: what an access outside RAM exits with.
const fn translation_fault(level: u8) -> Esr {
    let ec = (ec::DATA_ABORT_LOWER as u64) << 26;
    Esr(ec | (1 << 25) | (1 << 6) | (0x04 | (level & 3)) as u64)
}

impl Stage2Backend for SoftStage2 {
    fn geometry(&self) -> PageGeometry {
        self.geometry
    }

    fn write_protect(&self, range: GpaRange) -> Result<(), BackendError> {
        self.set_write(range, false)?;
        self.invalidate_tlb();
        Ok(())
    }

    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        // Adding a permission needs no barrier: a vCPU still using the old translation takes a
        // spurious fault and retries, as on hardware.
        self.set_write(range, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: PageGeometry = PageGeometry::APPLE_SILICON;

    fn mmu() -> (SoftStage2, GpaRange) {
        let ram = GpaRange::new(0x8000_0000, 8 << 20).unwrap();
        (SoftStage2::new(G, &[ram], 2).unwrap(), ram)
    }

    #[test]
    fn test_should_split_a_block_on_a_partial_change_and_fold_it_back_when_uniform() {
        let (m, ram) = mmu();
        m.write_protect(ram).unwrap();
        assert_eq!(
            m.descriptor(ram.start()),
            Some(Descriptor::Block(PERM_R | PERM_X))
        );
        let page = GpaRange::new(ram.start() + 0x4000, 0x4000).unwrap();
        m.grant_write(page).unwrap();
        assert_eq!(m.descriptor(page.start()), Some(Descriptor::Page(PERM_RWX)));
        assert_eq!(m.descriptor(ram.start()), Some(Descriptor::Page(PERM_R | PERM_X)));
        assert_eq!(m.counters().splits, 1);
        m.write_protect(page).unwrap();
        assert_eq!(
            m.descriptor(ram.start()),
            Some(Descriptor::Block(PERM_R | PERM_X))
        );
        assert_eq!(m.counters().folds, 1);
        // Granting every page one at a time folds into a writable block.
        for i in 0..128 {
            m.grant_write(GpaRange::new(ram.start() + i * 0x4000, 0x4000).unwrap())
                .unwrap();
        }
        assert_eq!(m.descriptor(ram.start()), Some(Descriptor::Block(PERM_RWX)));
        assert_eq!(m.counters().tlb_invalidations, 2 + 1 + 128);
    }

    #[test]
    fn test_should_fault_at_the_descriptor_level() {
        let ram = GpaRange::new(0, 4 << 20).unwrap();
        let m = SoftStage2::new(PageGeometry::X86_64, &[ram], 1).unwrap();
        let v = m.claim_vcpu().unwrap();
        m.write_protect(ram).unwrap();
        let e = m.write_access(&v, 0x1234, || ()).unwrap_err();
        assert_eq!(e.esr.data_abort().unwrap().dfsc.level(), Some(2));
        assert_eq!(e.ipa, 0x1234);
        m.grant_write(GpaRange::new(0x1000, 0x1000).unwrap()).unwrap();
        let e = m.write_access(&v, 0x0, || ()).unwrap_err();
        assert_eq!(e.esr.data_abort().unwrap().dfsc.level(), Some(3));
        let e = m.write_access(&v, 8 << 20, || ()).unwrap_err();
        assert!(!e.esr.is_stage2_write_permission_fault());
    }

    #[test]
    fn test_should_refuse_misaligned_and_foreign_ranges() {
        let (m, ram) = mmu();
        assert!(matches!(
            m.write_protect(GpaRange::new(ram.start() + 0x1000, 0x4000).unwrap()),
            Err(BackendError::Misaligned { .. })
        ));
        assert!(matches!(
            m.grant_write(GpaRange::new(ram.end(), 0x4000).unwrap()),
            Err(BackendError::NotGuestMemory { .. })
        ));
    }

    #[test]
    fn test_should_refuse_more_vcpus_than_slots() {
        let (m, _) = mmu();
        m.claim_vcpu().unwrap();
        m.claim_vcpu().unwrap();
        assert!(matches!(m.claim_vcpu(), Err(MmuError::NoVcpuSlot { slots: 2 })));
    }
}
