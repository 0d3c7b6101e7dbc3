//! Page geometry.
//!
//! Four sizes interact when a VMM tracks writes through stage-2 permissions: the host page (what
//! `mmap` and userfaultfd work in), the stage-2 granule (the smallest range the hypervisor can
//! protect), the default tracking unit (one bit per 2 MiB block: few faults, coarse diffs) and
//! the hot tracking unit (one bit per granule page: exact diffs, more faults). The validation
//! rules below are what make the fault path's shift-and-mask arithmetic sound.

use serde::{Deserialize, Serialize};

/// A rejected geometry: names the field, its value and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The geometry breaks one of the rules of [`PageGeometry::validate`].
    #[error("invalid page geometry: {field} = {value:#x}: {reason}")]
    InvalidConfig {
        /// The field that is wrong (`host_page`, `granule`, `tracking_default`, `tracking_hot`).
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// The page sizes squib works with on one platform. All sizes are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageGeometry {
    /// The host's page size (16 KiB on Apple Silicon, 4 KiB on x86-64 Linux).
    pub host_page: u64,
    /// The stage-2 translation granule: the smallest range that can be protected.
    pub granule: u64,
    /// The default (coarse) tracking unit: one dirty bit per block of this size.
    pub tracking_default: u64,
    /// The hot (fine) tracking unit, used for blocks that are written densely enough.
    pub tracking_hot: u64,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl PageGeometry {
    /// Apple Silicon under Hypervisor.framework: 16 KiB pages and granule, 2 MiB blocks.
    pub const APPLE_SILICON: Self = Self {
        host_page: 16 * KIB,
        granule: 16 * KIB,
        tracking_default: 2 * MIB,
        tracking_hot: 16 * KIB,
    };

    /// x86-64 under KVM: 4 KiB pages and granule, 2 MiB blocks.
    pub const X86_64: Self = Self {
        host_page: 4 * KIB,
        granule: 4 * KIB,
        tracking_default: 2 * MIB,
        tracking_hot: 4 * KIB,
    };

    /// The geometry of the running host: Apple Silicon's on aarch64 macOS, x86-64's otherwise,
    /// with the host page size read from the system (a 64 KiB-page aarch64 Linux kernel gets a
    /// 64 KiB granule and hot unit, since a granule smaller than the host page is a fiction).
    ///
    /// ```
    /// let g = squib_arch::PageGeometry::host();
    /// assert!(g.validate().is_ok());
    /// assert_eq!(g.host_page, rustix::param::page_size() as u64);
    /// ```
    #[must_use]
    pub fn host() -> Self {
        let host_page = u64::try_from(rustix::param::page_size()).unwrap_or(4 * KIB);
        let base = if cfg!(all(target_os = "macos", target_arch = "aarch64")) {
            Self::APPLE_SILICON
        } else {
            Self::X86_64
        };
        let fine = base.granule.max(host_page);
        Self {
            host_page,
            granule: fine,
            tracking_default: base.tracking_default.max(fine),
            tracking_hot: fine,
        }
    }

    /// Check the rules the fault path relies on: every size a power of two, the granule not
    /// smaller than the host page, `granule <= tracking_hot <= tracking_default`, and the default
    /// unit a whole multiple of the hot one.
    ///
    /// # Errors
    /// [`GeometryError::InvalidConfig`] naming the first field that breaks a rule.
    ///
    /// ```
    /// use squib_arch::PageGeometry;
    /// let mut g = PageGeometry::X86_64;
    /// g.tracking_hot = 3000;
    /// let err = g.validate().unwrap_err().to_string();
    /// assert!(err.contains("tracking_hot"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<(), GeometryError> {
        let fields = [
            ("host_page", self.host_page),
            ("granule", self.granule),
            ("tracking_hot", self.tracking_hot),
            ("tracking_default", self.tracking_default),
        ];
        for (field, value) in fields {
            if !value.is_power_of_two() {
                return Err(GeometryError::InvalidConfig {
                    field,
                    value,
                    reason: "must be a non-zero power of two",
                });
            }
        }
        if self.granule < self.host_page {
            return Err(GeometryError::InvalidConfig {
                field: "granule",
                value: self.granule,
                reason: "must not be smaller than the host page (the host cannot protect less)",
            });
        }
        if self.tracking_hot < self.granule {
            return Err(GeometryError::InvalidConfig {
                field: "tracking_hot",
                value: self.tracking_hot,
                reason: "must not be smaller than the stage-2 granule",
            });
        }
        if self.tracking_default < self.tracking_hot {
            return Err(GeometryError::InvalidConfig {
                field: "tracking_default",
                value: self.tracking_default,
                reason: "must not be smaller than tracking_hot",
            });
        }
        // Both are powers of two and default >= hot, so default is a multiple of hot; the check
        // stays explicit so the rule survives a future relaxation of the power-of-two rule.
        if !self.tracking_default.is_multiple_of(self.tracking_hot) {
            return Err(GeometryError::InvalidConfig {
                field: "tracking_default",
                value: self.tracking_default,
                reason: "must be a whole multiple of tracking_hot",
            });
        }
        Ok(())
    }

    /// How many hot units make one default (block) unit.
    #[must_use]
    pub const fn hot_per_block(&self) -> u64 {
        self.tracking_default / self.tracking_hot
    }

    /// A short name for the two built-in geometries, `custom` otherwise.
    #[must_use]
    pub fn name(&self) -> &'static str {
        if *self == Self::APPLE_SILICON {
            "apple-silicon"
        } else if *self == Self::X86_64 {
            "x86-64"
        } else {
            "custom"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_should_accept_the_built_in_geometries() {
        PageGeometry::APPLE_SILICON.validate().unwrap();
        PageGeometry::X86_64.validate().unwrap();
        PageGeometry::host().validate().unwrap();
        assert_eq!(PageGeometry::APPLE_SILICON.hot_per_block(), 128);
        assert_eq!(PageGeometry::X86_64.hot_per_block(), 512);
    }

    fn rejected(g: PageGeometry) -> (&'static str, u64) {
        match g.validate() {
            Err(GeometryError::InvalidConfig { field, value, .. }) => (field, value),
            Ok(()) => panic!("{g:?} must be rejected"),
        }
    }

    #[test]
    fn test_should_name_the_field_that_is_not_a_power_of_two() {
        let mut g = PageGeometry::APPLE_SILICON;
        g.granule = 12 * KIB;
        assert_eq!(rejected(g), ("granule", 12 * KIB));
        let mut g = PageGeometry::APPLE_SILICON;
        g.tracking_default = 0;
        assert_eq!(rejected(g), ("tracking_default", 0));
    }

    #[test]
    fn test_should_reject_a_granule_smaller_than_the_host_page() {
        let mut g = PageGeometry::APPLE_SILICON;
        g.granule = 4 * KIB;
        g.tracking_hot = 4 * KIB;
        assert_eq!(rejected(g), ("granule", 4 * KIB));
    }

    #[test]
    fn test_should_reject_units_out_of_order() {
        let mut g = PageGeometry::X86_64;
        g.tracking_hot = 2 * KIB;
        g.host_page = 2 * KIB;
        g.granule = 4 * KIB;
        assert_eq!(rejected(g), ("tracking_hot", 2 * KIB));
        let mut g = PageGeometry::X86_64;
        g.tracking_default = 2 * KIB;
        g.tracking_hot = 4 * KIB;
        assert_eq!(rejected(g), ("tracking_default", 2 * KIB));
    }

    #[test]
    fn test_should_name_the_builtin_geometries() {
        assert_eq!(PageGeometry::APPLE_SILICON.name(), "apple-silicon");
        assert_eq!(PageGeometry::X86_64.name(), "x86-64");
        let mut g = PageGeometry::X86_64;
        g.tracking_default = 4 * MIB;
        assert_eq!(g.name(), "custom");
    }
}
