//! Guest-physical ranges.

use serde::{Deserialize, Serialize};

/// A range that cannot exist: empty or past the end of the address space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `start + len` overflows `u64`.
    #[error("guest range at {start:#x} with length {len:#x} runs past the end of the address space")]
    Overflow {
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The range is empty.
    #[error("guest range at {start:#x} is empty")]
    Empty {
        /// First byte.
        start: u64,
    },
}

/// A non-empty guest-physical byte range `[start, start + len)` that does not wrap.
///
/// ```
/// use squib_arch::GpaRange;
/// let r = GpaRange::new(0x4000, 0x8000).unwrap();
/// assert_eq!(r.end(), 0xC000);
/// assert!(r.contains(0xBFFF) && !r.contains(0xC000));
/// assert!(GpaRange::new(u64::MAX, 2).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawRange", into = "RawRange")]
pub struct GpaRange {
    start: u64,
    len: u64,
}

#[derive(Serialize, Deserialize)]
struct RawRange {
    start: u64,
    len: u64,
}

impl TryFrom<RawRange> for GpaRange {
    type Error = RangeError;
    fn try_from(r: RawRange) -> Result<Self, RangeError> {
        Self::new(r.start, r.len)
    }
}

impl From<GpaRange> for RawRange {
    fn from(r: GpaRange) -> Self {
        Self {
            start: r.start,
            len: r.len,
        }
    }
}

impl GpaRange {
    /// A checked range.
    ///
    /// # Errors
    /// [`RangeError::Empty`] for `len == 0`, [`RangeError::Overflow`] when it would wrap.
    pub const fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if start.checked_add(len).is_none() {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(Self { start, len })
    }

    /// The range `[start, end)`.
    ///
    /// # Errors
    /// [`RangeError::Empty`] when `end <= start`.
    pub const fn from_bounds(start: u64, end: u64) -> Result<Self, RangeError> {
        if end <= start {
            return Err(RangeError::Empty { start });
        }
        Ok(Self {
            start,
            len: end - start,
        })
    }

    /// First byte.
    #[must_use]
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes (never zero).
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a `GpaRange` is never empty. Present for API symmetry with slices.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// One past the last byte.
    #[must_use]
    pub const fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether `gpa` lies inside.
    #[must_use]
    pub const fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start && gpa < self.end()
    }

    /// Whether `other` lies wholly inside.
    #[must_use]
    pub const fn contains_range(&self, other: &Self) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }

    /// Whether the two share at least one byte.
    #[must_use]
    pub const fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// The common part, if any.
    #[must_use]
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        Self::from_bounds(self.start.max(other.start), self.end().min(other.end())).ok()
    }

    /// Whether start and length are multiples of `align` (a power of two).
    #[must_use]
    pub const fn is_aligned(&self, align: u64) -> bool {
        self.start & (align - 1) == 0 && self.len & (align - 1) == 0
    }
}

impl std::fmt::Display for GpaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_refuse_empty_and_wrapping_ranges() {
        assert_eq!(GpaRange::new(5, 0), Err(RangeError::Empty { start: 5 }));
        assert!(matches!(
            GpaRange::new(u64::MAX - 1, 2),
            Err(RangeError::Overflow { .. })
        ));
        assert!(GpaRange::new(u64::MAX - 1, 1).is_ok());
        assert!(GpaRange::from_bounds(10, 10).is_err());
    }

    #[test]
    fn test_should_compute_overlap_and_intersection() {
        let a = GpaRange::new(0, 100).unwrap();
        let b = GpaRange::new(50, 100).unwrap();
        let c = GpaRange::new(100, 10).unwrap();
        assert!(a.overlaps(&b) && !a.overlaps(&c));
        assert_eq!(a.intersect(&b), Some(GpaRange::new(50, 50).unwrap()));
        assert_eq!(a.intersect(&c), None);
        assert!(a.contains_range(&GpaRange::new(10, 90).unwrap()));
        assert!(!a.contains_range(&b));
    }

    #[test]
    fn test_should_check_alignment() {
        assert!(GpaRange::new(0x4000, 0x4000).unwrap().is_aligned(0x4000));
        assert!(!GpaRange::new(0x4000, 0x1000).unwrap().is_aligned(0x4000));
    }

    #[test]
    fn test_should_refuse_a_deserialized_range_that_wraps() {
        let raw = RawRange {
            start: u64::MAX,
            len: 2,
        };
        assert!(matches!(
            GpaRange::try_from(raw),
            Err(RangeError::Overflow { .. })
        ));
        let raw = RawRange { start: 7, len: 0 };
        assert!(matches!(GpaRange::try_from(raw), Err(RangeError::Empty { .. })));
    }
}
