//! Where guest RAM and the VMM's system area sit in guest-physical and guest-virtual space.
//!
//! RAM may be split in several memslots with holes between them, as x86 splits RAM below and
//! above 4 GiB around the MMIO hole. Offset bookkeeping across slots is where VMMs have corrupted
//! diffs before (a page index taken relative to the wrong slot base), so every translation
//! between a guest-physical address, a memslot page and the guest's virtual window lives here, in
//! one place, with tests.
//!
//! The guest sees RAM through a *window*: guest-virtual `[0, total)` maps the RAM regions back to
//! back, so a workload addresses "RAM offset `o`" without knowing about the hole; the page tables
//! do the split. The system area (page tables, GDT, guest code, the per-vCPU mailboxes) is a
//! separate, untracked memslot above RAM: it is rebuilt by the VMM from the configuration, it is
//! not guest state, and keeping it out of tracked RAM keeps the guest's own bookkeeping out of
//! every diff.

use squib_arch::GpaRange;

/// The unit RAM regions are aligned to: the guest maps RAM with 2 MiB pages.
pub const REGION_ALIGN: u64 = 2 << 20;
/// Size of the system area memslot.
pub const SYSTEM_SIZE: u64 = 2 << 20;
/// Highest guest-virtual address the one PDPT covers (512 GiB).
const VA_LIMIT: u64 = 512 << 30;

/// A memory layout that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No RAM region was given.
    #[error("the memory layout has no RAM region")]
    Empty,
    /// A region is not aligned to 2 MiB.
    #[error("RAM region {0} is not aligned to 2 MiB (the guest maps RAM with 2 MiB pages)")]
    Misaligned(GpaRange),
    /// Two regions overlap.
    #[error("RAM region {0} overlaps RAM region {1}")]
    Overlap(GpaRange, GpaRange),
    /// RAM reaches past what the guest's page tables can map.
    #[error("RAM region {0} ends past 512 GiB, beyond what the guest page tables map")]
    TooHigh(GpaRange),
    /// A size was not usable.
    #[error("memory size {size:#x}: {reason}")]
    BadSize {
        /// The size.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Guest RAM regions (one memslot each, sorted) and the system area above them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    ram: Vec<GpaRange>,
    system: GpaRange,
}

impl MemoryLayout {
    /// A layout over `ram` (any order; 2 MiB aligned; non-overlapping).
    ///
    /// # Errors
    /// [`LayoutError`] naming the region at fault.
    pub fn new(mut ram: Vec<GpaRange>) -> Result<Self, LayoutError> {
        if ram.is_empty() {
            return Err(LayoutError::Empty);
        }
        ram.sort();
        for r in &ram {
            if !r.is_aligned(REGION_ALIGN) {
                return Err(LayoutError::Misaligned(*r));
            }
        }
        for w in ram.windows(2) {
            if w[0].overlaps(&w[1]) {
                return Err(LayoutError::Overlap(w[1], w[0]));
            }
        }
        let top = ram.iter().map(GpaRange::end).max().unwrap_or(0);
        let base = top.next_multiple_of(1 << 30);
        let total: u64 = ram.iter().map(GpaRange::len).sum();
        let last = ram[ram.len() - 1];
        if base + SYSTEM_SIZE > VA_LIMIT || total > VA_LIMIT {
            return Err(LayoutError::TooHigh(last));
        }
        let system = GpaRange::new(base, SYSTEM_SIZE).map_err(|_| LayoutError::TooHigh(last))?;
        Ok(Self { ram, system })
    }

    /// A scaled-down x86 layout of `total` bytes: RAM below `boundary * 3 / 4` from 0, the rest
    /// from `boundary` up, with the hole between standing for x86's MMIO hole below 4 GiB.
    /// `split(8 GiB, 4 GiB)` is the real shape; tests use small boundaries.
    ///
    /// ```
    /// use squib_kvm::MemoryLayout;
    /// let l = MemoryLayout::split(24 << 20, 32 << 20).unwrap();
    /// let ram: Vec<_> = l.ram().iter().map(|r| (r.start(), r.len())).collect();
    /// assert_eq!(ram, vec![(0, 24 << 20)]);
    /// let l = MemoryLayout::split(32 << 20, 32 << 20).unwrap();
    /// let ram: Vec<_> = l.ram().iter().map(|r| (r.start(), r.len())).collect();
    /// assert_eq!(ram, vec![(0, 24 << 20), (32 << 20, 8 << 20)]);
    /// ```
    ///
    /// # Errors
    /// [`LayoutError::BadSize`] when `total` or `boundary` is not a multiple of 2 MiB (or
    /// `boundary * 3 / 4` is not), or the layout is otherwise unusable.
    pub fn split(total: u64, boundary: u64) -> Result<Self, LayoutError> {
        let low_max = boundary / 4 * 3;
        for (size, what) in [
            (total, "RAM size must be a non-zero multiple of 2 MiB"),
            (
                low_max,
                "the low-RAM limit (3/4 of the boundary) must be a non-zero multiple of 2 MiB",
            ),
        ] {
            if size == 0 || size % REGION_ALIGN != 0 {
                return Err(LayoutError::BadSize { size, reason: what });
            }
        }
        let low = total.min(low_max);
        let mut ram = vec![GpaRange::new(0, low).map_err(|_| LayoutError::Empty)?];
        if total > low {
            ram.push(
                GpaRange::new(boundary, total - low).map_err(|_| LayoutError::BadSize {
                    size: total,
                    reason: "RAM runs past the end of the address space",
                })?,
            );
        }
        Self::new(ram)
    }

    /// The layout `squib run` uses for `total` bytes: split around a hole at half the size
    /// rounded to a power of two, so any run has two memslots and a hole between them.
    ///
    /// # Errors
    /// As [`split`](Self::split).
    pub fn for_size(total: u64) -> Result<Self, LayoutError> {
        if total <= 2 * REGION_ALIGN {
            return Self::split(total, 4 * REGION_ALIGN);
        }
        let boundary = (total.next_power_of_two() / 2).max(4 * REGION_ALIGN);
        Self::split(total, boundary)
    }

    /// The RAM regions, sorted; region `i` is memslot `i`.
    pub fn ram(&self) -> &[GpaRange] {
        &self.ram
    }

    /// Total RAM bytes.
    pub fn total(&self) -> u64 {
        self.ram.iter().map(GpaRange::len).sum()
    }

    /// The system area's guest-physical range (its memslot is `ram().len()`).
    pub const fn system(&self) -> GpaRange {
        self.system
    }

    /// The memslot of the system area.
    pub fn system_slot(&self) -> u32 {
        u32::try_from(self.ram.len()).unwrap_or(u32::MAX)
    }

    /// The slot, and page index within it, of `gpa` (4 KiB pages), if it is RAM.
    pub fn slot_page(&self, gpa: u64) -> Option<(u32, u64)> {
        let (i, r) = self.ram.iter().enumerate().find(|(_, r)| r.contains(gpa))?;
        Some((u32::try_from(i).ok()?, (gpa - r.start()) >> 12))
    }

    /// The guest-physical address of page `page` of RAM slot `slot`.
    pub fn page_gpa(&self, slot: u32, page: u64) -> Option<u64> {
        let r = self.ram.get(usize::try_from(slot).ok()?)?;
        let gpa = r.start().checked_add(page.checked_mul(4096)?)?;
        r.contains(gpa).then_some(gpa)
    }

    /// The guest-virtual address through which the guest reaches RAM address `gpa`.
    pub fn gpa_to_window(&self, gpa: u64) -> Option<u64> {
        let mut off = 0;
        for r in &self.ram {
            if r.contains(gpa) {
                return Some(off + gpa - r.start());
            }
            off += r.len();
        }
        None
    }

    /// The RAM address behind window address `va`.
    pub fn window_to_gpa(&self, va: u64) -> Option<u64> {
        let mut off = 0;
        for r in &self.ram {
            if va < off + r.len() {
                return Some(r.start() + va - off);
            }
            off += r.len();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(start, len).unwrap()
    }

    #[test]
    fn test_should_translate_across_the_hole_both_ways() {
        let l = MemoryLayout::new(vec![r(32 << 20, 4 << 20), r(0, 8 << 20)]).unwrap();
        assert_eq!(l.ram(), &[r(0, 8 << 20), r(32 << 20, 4 << 20)]);
        assert_eq!(l.gpa_to_window((8 << 20) - 1), Some((8 << 20) - 1));
        assert_eq!(l.gpa_to_window(32 << 20), Some(8 << 20));
        assert_eq!(l.gpa_to_window(16 << 20), None, "the hole is not RAM");
        assert_eq!(l.window_to_gpa(8 << 20), Some(32 << 20));
        assert_eq!(l.window_to_gpa(12 << 20), None);
        for gpa in [0, 4095, 8 << 20, (32 << 20) + 4096 * 7 + 5] {
            if let Some(va) = l.gpa_to_window(gpa) {
                assert_eq!(l.window_to_gpa(va), Some(gpa));
            }
        }
    }

    #[test]
    fn test_should_number_pages_per_slot_from_the_slot_base() {
        let l = MemoryLayout::split(32 << 20, 32 << 20).unwrap();
        assert_eq!(l.slot_page((32 << 20) + 3 * 4096 + 1), Some((1, 3)));
        assert_eq!(l.page_gpa(1, 3), Some((32 << 20) + 3 * 4096));
        assert_eq!(l.slot_page(5 * 4096), Some((0, 5)));
        assert_eq!(l.page_gpa(1, 2048), None, "past the end of slot 1");
        assert_eq!(l.system_slot(), 2);
        assert!(l.system().start() >= 40 << 20);
    }

    #[test]
    fn test_should_refuse_unusable_layouts() {
        assert_eq!(MemoryLayout::new(vec![]), Err(LayoutError::Empty));
        assert_eq!(
            MemoryLayout::new(vec![r(4096, 2 << 20)]),
            Err(LayoutError::Misaligned(r(4096, 2 << 20)))
        );
        assert!(matches!(
            MemoryLayout::new(vec![r(0, 4 << 20), r(2 << 20, 2 << 20)]),
            Err(LayoutError::Overlap(..))
        ));
        assert!(matches!(
            MemoryLayout::split(3 << 20, 32 << 20),
            Err(LayoutError::BadSize { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![r(600 << 30, 2 << 20)]),
            Err(LayoutError::TooHigh(_))
        ));
    }

    #[test]
    fn test_should_give_every_run_size_two_slots_and_a_hole() {
        for total in [8 << 20, 64 << 20, 256 << 20, 1 << 30] {
            let l = MemoryLayout::for_size(total).unwrap();
            assert_eq!(l.total(), total);
            assert_eq!(l.ram().len(), 2, "{total:#x}");
            assert!(l.ram()[0].end() < l.ram()[1].start());
        }
    }
}
