//! The dirty bitmap.
//!
//! Marking happens on the vCPU fault path, concurrently with other vCPUs and with a checkpoint
//! that drains the map while the guest runs; so the map is lock-free and is never swapped for
//! another one (swapping maps is how the original design lost writes). It has two levels: one bit
//! per unit, and one summary bit per 64-bit word that is set by whichever `set` found the word
//! empty. A drain visits only the words whose summary bit is set, so draining a large, sparsely
//! dirty region costs a few loads plus one swap per dirty word, not one swap per word.
//!
//! Why no bit is lost between the levels: a `set` that finds its word empty sets the summary bit
//! *after* the word bit; a drain clears the summary bit *before* swapping the word. A word bit set
//! after the drain's summary swap either finds the word non-empty (the drain's word swap, which is
//! still to come, takes it) or empty (the setter sets the summary bit again, for the next drain).
//! The loom model in `tests/loom.rs` checks this interleaving by interleaving.

use crate::sync::{AtomicU64, Ordering};

/// A bitmap of `len` bits, safe to set and drain from many threads at once.
///
/// ```
/// use squib_snapshot::DirtyBitmap;
/// let map = DirtyBitmap::new(1000);
/// assert!(map.set(3));
/// assert!(!map.set(3), "the second set finds the bit already dirty");
/// map.set(999);
/// let mut drained = Vec::new();
/// map.drain(|bit| drained.push(bit));
/// assert_eq!(drained, vec![3, 999]);
/// assert_eq!(map.count(), 0);
/// ```
#[derive(Debug)]
pub struct DirtyBitmap {
    len: u64,
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
}

fn zeroed(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Word index and bit mask of bit `i`. The caller has checked `i < len`, and `len` bits fit in a
/// slice of `len / 64` words, so the index fits in `usize`.
#[inline]
fn split(i: u64) -> (usize, u64) {
    #[allow(clippy::cast_possible_truncation)] // bounded by the slice length (see above)
    let w = (i >> 6) as usize;
    (w, 1u64 << (i & 63))
}

impl DirtyBitmap {
    /// A clean map of `len` bits. Allocates here, never afterwards.
    ///
    /// # Panics
    /// If `len` bits do not fit in this machine's memory (more than `usize::MAX` words).
    #[must_use]
    pub fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).expect("bitmap larger than the address space");
        Self {
            len,
            words: zeroed(words),
            summary: zeroed(words.div_ceil(64)),
        }
    }

    /// Number of bits.
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether the map has no bits at all.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Mark bit `i` dirty. Returns true if it was clean. Out-of-range bits are ignored (false).
    /// Lock-free, allocation-free; one atomic read-modify-write when the bit was clean, two when
    /// its word was empty, a plain load when the bit was already set.
    #[inline]
    pub fn set(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, mask) = split(i);
        let word = &self.words[w];
        if word.load(Ordering::Relaxed) & mask != 0 {
            return false;
        }
        // Release: a drain that acquires this word also sees what the marker did before marking.
        let prev = word.fetch_or(mask, Ordering::AcqRel);
        if prev == 0 {
            let (s, smask) = split(w as u64);
            self.summary[s].fetch_or(smask, Ordering::AcqRel);
        }
        prev & mask == 0
    }

    /// Whether bit `i` is set (false when out of range).
    #[must_use]
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, mask) = split(i);
        self.words[w].load(Ordering::Acquire) & mask != 0
    }

    /// Mark every bit in `[first, first + count)` (clamped to the map).
    pub fn set_range(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        while i < end {
            let (w, _) = split(i);
            let word_end = ((i | 63) + 1).min(end);
            let hi = word_end - i; // 1..=64 bits starting at bit (i & 63)
            let mask = if hi == 64 {
                u64::MAX
            } else {
                ((1u64 << hi) - 1) << (i & 63)
            };
            let prev = self.words[w].fetch_or(mask, Ordering::AcqRel);
            if prev == 0 {
                let (s, smask) = split(w as u64);
                self.summary[s].fetch_or(smask, Ordering::AcqRel);
            }
            i = word_end;
        }
    }

    /// Clear every bit, calling `f` with the index of each bit that was set, in increasing order.
    /// Allocation-free; safe against concurrent [`set`](Self::set): a bit set during the drain is
    /// either reported now or stays set for the next drain, never lost.
    pub fn drain(&self, mut f: impl FnMut(u64)) {
        for (s, sword) in self.summary.iter().enumerate() {
            if sword.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut pending = sword.swap(0, Ordering::AcqRel);
            while pending != 0 {
                let w = (s << 6) + pending.trailing_zeros() as usize;
                pending &= pending - 1;
                let mut bits = self.words[w].swap(0, Ordering::AcqRel);
                let base = (w as u64) << 6;
                while bits != 0 {
                    f(base + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
    }

    /// Clear every bit, calling `f(word_index, bits)` once per non-empty 64-bit word, in
    /// increasing order. The fast form of [`drain`](Self::drain) for callers that coalesce runs.
    pub fn drain_words(&self, mut f: impl FnMut(usize, u64)) {
        for (s, sword) in self.summary.iter().enumerate() {
            if sword.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut pending = sword.swap(0, Ordering::AcqRel);
            while pending != 0 {
                let w = (s << 6) + pending.trailing_zeros() as usize;
                pending &= pending - 1;
                let bits = self.words[w].swap(0, Ordering::AcqRel);
                if bits != 0 {
                    f(w, bits);
                }
            }
        }
    }

    /// Number of set bits (a snapshot; concurrent sets may or may not be counted).
    #[must_use]
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Number of set bits in `[first, first + count)`, clamped to the map.
    #[must_use]
    pub fn count_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut n = 0;
        let mut i = first;
        while i < end {
            let (w, _) = split(i);
            let word_end = ((i | 63) + 1).min(end);
            let hi = word_end - i;
            let mask = if hi == 64 {
                u64::MAX
            } else {
                ((1u64 << hi) - 1) << (i & 63)
            };
            n += u64::from((self.words[w].load(Ordering::Relaxed) & mask).count_ones());
            i = word_end;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    #[test]
    fn test_should_report_the_clean_to_dirty_transition_once() {
        let m = DirtyBitmap::new(130);
        assert!(m.set(129));
        assert!(!m.set(129));
        assert!(m.get(129) && !m.get(128));
        assert!(!m.set(130), "out of range is ignored");
        assert!(!m.get(130));
    }

    #[test]
    fn test_should_drain_in_order_and_leave_the_map_clean() {
        let m = DirtyBitmap::new(10_000);
        for i in [9_999, 0, 64, 63, 4_096, 100] {
            m.set(i);
        }
        let mut out = Vec::new();
        m.drain(|i| out.push(i));
        assert_eq!(out, vec![0, 63, 64, 100, 4_096, 9_999]);
        let mut again = Vec::new();
        m.drain(|i| again.push(i));
        assert!(again.is_empty());
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn test_should_set_and_count_ranges_across_word_boundaries() {
        let m = DirtyBitmap::new(1_000);
        m.set_range(60, 70); // 60..130
        assert_eq!(m.count(), 70);
        assert_eq!(m.count_range(0, 64), 4);
        assert_eq!(m.count_range(64, 64), 64);
        assert_eq!(m.count_range(128, 1_000), 2);
        m.set_range(990, 100); // clamped to 990..1000
        assert_eq!(m.count(), 80);
        let mut words = Vec::new();
        m.drain_words(|w, bits| words.push((w, bits.count_ones())));
        assert_eq!(words, vec![(0, 4), (1, 64), (2, 2), (15, 10)]);
    }

    #[test]
    fn test_should_lose_no_bit_set_during_concurrent_drains() {
        // Ground truth: every bit set by any thread must come out of exactly one drain.
        let m = Arc::new(DirtyBitmap::new(1 << 16));
        let setters: Vec<_> = (0..4u64)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                    let mut set = BTreeSet::new();
                    let mut transitions = 0usize;
                    for _ in 0..50_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = x % (1 << 16);
                        if m.set(i) {
                            transitions += 1;
                            set.insert(i);
                        }
                    }
                    (set, transitions)
                })
            })
            .collect();
        let mut drained = Vec::new();
        while setters.iter().any(|h| !h.is_finished()) {
            m.drain(|i| drained.push(i));
        }
        let mut expected_count = 0usize;
        let mut union = BTreeSet::new();
        for h in setters {
            let (s, transitions) = h.join().unwrap();
            expected_count += transitions;
            union.extend(s);
        }
        m.drain(|i| drained.push(i));
        // Each clean->dirty transition is reported by exactly one drain.
        assert_eq!(drained.len(), expected_count);
        let drained_set: BTreeSet<u64> = drained.into_iter().collect();
        assert_eq!(drained_set, union);
    }
}
