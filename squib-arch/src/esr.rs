//! `ESR_EL2` decoding.
//!
//! Hypervisor.framework reports a guest's stage-2 fault as an exception exit carrying the
//! syndrome register and the faulting IPA. Whether that exit is a *tracking* fault (a write to a
//! page squib write-protected) or something the VMM must emulate (MMIO) is decided here, once, so
//! every backend agrees. The predicate deliberately does not require ISV: pair stores, SIMD stores
//! and stores with writeback fault with ISV=0, and a tracker that ignored them would lose writes.
//! Stage-1 page-table walks that hit a write-protected stage-2 page (S1PTW=1) are treated as writes,
//! as KVM does: the walker may set access and dirty flags in the guest's page tables.

/// Exception class values this crate names (ESR_EL2.EC, bits \[31:26\]).
pub mod ec {
    /// Unknown reason.
    pub const UNKNOWN: u8 = 0x00;
    /// WFI or WFE trapped.
    pub const WFX: u8 = 0x01;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR, MRS or system instruction trapped.
    pub const SYS64: u8 = 0x18;
    /// Instruction abort from a lower exception level (the guest).
    pub const INSTR_ABORT_LOWER: u8 = 0x20;
    /// Instruction abort from the same exception level.
    pub const INSTR_ABORT_CUR: u8 = 0x21;
    /// Data abort from a lower exception level (the guest): stage-2 faults land here.
    pub const DATA_ABORT_LOWER: u8 = 0x24;
    /// Data abort from the same exception level.
    pub const DATA_ABORT_CUR: u8 = 0x25;
}

/// The class of a data or instruction fault status code (DFSC/IFSC bits \[5:2\]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// 0b0000LL: address size fault.
    AddressSize,
    /// 0b0001LL: translation fault (no mapping).
    Translation,
    /// 0b0010LL: access flag fault.
    AccessFlag,
    /// 0b0011LL: permission fault: the one dirty tracking produces.
    Permission,
    /// Any other status code (external aborts, alignment, TLB conflict, ...).
    Other,
}

/// A fault status code: class and translation-table level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultStatus(pub u8);

impl FaultStatus {
    /// The class of the fault.
    #[must_use]
    pub const fn class(self) -> FaultClass {
        match self.0 >> 2 {
            0b0000 => FaultClass::AddressSize,
            0b0001 => FaultClass::Translation,
            0b0010 => FaultClass::AccessFlag,
            0b0011 => FaultClass::Permission,
            _ => FaultClass::Other,
        }
    }

    /// The translation-table level (0..=3) for the classes that carry one.
    #[must_use]
    pub const fn level(self) -> Option<u8> {
        match self.class() {
            FaultClass::Other => None,
            _ => Some(self.0 & 0b11),
        }
    }

    /// A permission fault at `level` (0..=3): DFSC 0x0C + level.
    #[must_use]
    pub const fn permission(level: u8) -> Self {
        Self(0x0C | (level & 0b11))
    }
}

/// The ISS of a data abort, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAbort {
    /// Instruction syndrome valid: SAS, SRT, SF describe the access.
    pub isv: bool,
    /// Access size as log2 bytes (0 = byte .. 3 = doubleword); meaningful only with `isv`.
    pub sas: u8,
    /// Syndrome register transfer: the general register of the access; only with `isv`.
    pub srt: u8,
    /// Sixty-four bit register access; only with `isv`.
    pub sf: bool,
    /// The fault happened during a stage-1 page-table walk.
    pub s1ptw: bool,
    /// Write not Read: the access was a write.
    pub wnr: bool,
    /// The data fault status code.
    pub dfsc: FaultStatus,
}

/// A raw `ESR_EL2` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Esr(pub u64);

impl Esr {
    /// Exception class, bits \[31:26\].
    #[must_use]
    pub const fn ec(self) -> u8 {
        ((self.0 >> 26) & 0x3F) as u8
    }

    /// Instruction length bit (1 = 32-bit instruction).
    #[must_use]
    pub const fn il(self) -> bool {
        (self.0 >> 25) & 1 == 1
    }

    /// Instruction specific syndrome, bits \[24:0\].
    #[must_use]
    pub const fn iss(self) -> u32 {
        (self.0 & 0x01FF_FFFF) as u32
    }

    /// The data abort fields, when the class is a data abort (lower or same EL).
    #[must_use]
    pub const fn data_abort(self) -> Option<DataAbort> {
        let ec = self.ec();
        if ec != ec::DATA_ABORT_LOWER && ec != ec::DATA_ABORT_CUR {
            return None;
        }
        let iss = self.iss();
        Some(DataAbort {
            isv: (iss >> 24) & 1 == 1,
            sas: ((iss >> 22) & 0b11) as u8,
            srt: ((iss >> 16) & 0x1F) as u8,
            sf: (iss >> 15) & 1 == 1,
            s1ptw: (iss >> 7) & 1 == 1,
            wnr: (iss >> 6) & 1 == 1,
            dfsc: FaultStatus((iss & 0x3F) as u8),
        })
    }

    /// The one predicate for "stage-2 write-permission fault from the guest": a lower-EL data
    /// abort with a permission DFSC (0x0C..=0x0F) that is a write (WnR) or a stage-1 walk
    /// (S1PTW). ISV is not required.
    ///
    /// ```
    /// use squib_arch::esr::Esr;
    /// assert!(Esr(0x93C1_804F).is_stage2_write_permission_fault()); // str x1, [x0]
    /// assert!(Esr(0x9200_004F).is_stage2_write_permission_fault()); // stp, ISV=0
    /// assert!(!Esr(0x93C1_0007).is_stage2_write_permission_fault()); // a load, unmapped
    /// ```
    #[must_use]
    pub const fn is_stage2_write_permission_fault(self) -> bool {
        if self.ec() != ec::DATA_ABORT_LOWER {
            return false;
        }
        match self.data_abort() {
            Some(da) => matches!(da.dfsc.class(), FaultClass::Permission) && (da.wnr || da.s1ptw),
            None => false,
        }
    }

    /// The syndrome a write to a write-protected stage-2 page produces: lower-EL data abort,
    /// 32-bit instruction, WnR=1, permission fault at `level`, no instruction syndrome (ISV=0, as
    /// for a pair store). Used by software models that must fault exactly like the hardware.
    #[must_use]
    pub const fn stage2_write_permission(level: u8) -> Self {
        let ec = (ec::DATA_ABORT_LOWER as u64) << 26;
        let il = 1 << 25;
        let wnr = 1 << 6;
        Self(ec | il | wnr | FaultStatus::permission(level).0 as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        name: &'static str,
        esr: u64,
        ec: u8,
        dfsc: Option<(FaultClass, u8)>,
        isv: Option<bool>,
        wnr: Option<bool>,
        tracking: bool,
    }

    // Encodings as the hardware reports them (EC | IL | ISS), one per kind of exit a tracker sees.
    const CASES: &[Case] = &[
        Case {
            name: "str x1, [x0] to a write-protected page (level 3)",
            esr: 0x93C1_804F,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::Permission, 3)),
            isv: Some(true),
            wnr: Some(true),
            tracking: true,
        },
        Case {
            name: "stp x1, x2, [x0] to a write-protected 2 MiB block (ISV=0, level 2)",
            esr: 0x9200_004E,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::Permission, 2)),
            isv: Some(false),
            wnr: Some(true),
            tracking: true,
        },
        Case {
            name: "ldr x1, [x0] from a read-protected page",
            esr: 0x93C1_000F,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::Permission, 3)),
            isv: Some(true),
            wnr: Some(false),
            tracking: false,
        },
        Case {
            name: "instruction fetch abort (permission, level 3)",
            esr: 0x8200_000F,
            ec: ec::INSTR_ABORT_LOWER,
            dfsc: None,
            isv: None,
            wnr: None,
            tracking: false,
        },
        Case {
            name: "str to an unmapped IPA (MMIO): translation fault, level 3",
            esr: 0x93C1_8047,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::Translation, 3)),
            isv: Some(true),
            wnr: Some(true),
            tracking: false,
        },
        Case {
            name: "stage-1 walk hits a write-protected page table (S1PTW=1, WnR=0)",
            esr: 0x9200_008F,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::Permission, 3)),
            isv: Some(false),
            wnr: Some(false),
            tracking: true,
        },
        Case {
            name: "same-EL data abort is the hypervisor's own, never the guest's",
            esr: 0x9600_004F,
            ec: ec::DATA_ABORT_CUR,
            dfsc: Some((FaultClass::Permission, 3)),
            isv: Some(false),
            wnr: Some(true),
            tracking: false,
        },
        Case {
            name: "access flag fault on a store",
            esr: 0x9200_004B,
            ec: ec::DATA_ABORT_LOWER,
            dfsc: Some((FaultClass::AccessFlag, 3)),
            isv: Some(false),
            wnr: Some(true),
            tracking: false,
        },
        Case {
            name: "hvc #0",
            esr: 0x5A00_0000,
            ec: ec::HVC64,
            dfsc: None,
            isv: None,
            wnr: None,
            tracking: false,
        },
    ];

    #[test]
    fn test_should_decode_real_encodings() {
        for c in CASES {
            let esr = Esr(c.esr);
            assert_eq!(esr.ec(), c.ec, "{}", c.name);
            assert!(esr.il(), "{}", c.name);
            let da = esr.data_abort();
            assert_eq!(da.is_some(), c.dfsc.is_some(), "{}", c.name);
            if let Some(da) = da {
                let (class, level) = c.dfsc.unwrap();
                assert_eq!(da.dfsc.class(), class, "{}", c.name);
                assert_eq!(da.dfsc.level(), Some(level), "{}", c.name);
                assert_eq!(Some(da.isv), c.isv, "{}", c.name);
                assert_eq!(Some(da.wnr), c.wnr, "{}", c.name);
            }
            assert_eq!(esr.is_stage2_write_permission_fault(), c.tracking, "{}", c.name);
        }
    }

    #[test]
    fn test_should_decode_the_instruction_syndrome_of_a_store() {
        let da = Esr(0x93C1_804F).data_abort().unwrap();
        assert_eq!((da.sas, da.srt, da.sf, da.s1ptw), (3, 1, true, false));
    }

    #[test]
    fn test_should_synthesize_a_fault_that_decodes_as_tracking_at_every_level() {
        for level in 0..4 {
            let esr = Esr::stage2_write_permission(level);
            assert!(esr.is_stage2_write_permission_fault());
            let da = esr.data_abort().unwrap();
            assert_eq!(da.dfsc.level(), Some(level));
            assert!(!da.isv);
        }
        assert_eq!(Esr::stage2_write_permission(2).0, 0x9200_004E);
    }

    #[test]
    fn test_should_classify_every_status_code() {
        for code in 0u8..64 {
            let fs = FaultStatus(code);
            let is_perm = (0x0C..=0x0F).contains(&code);
            assert_eq!(fs.class() == FaultClass::Permission, is_perm, "{code:#x}");
            if code >= 0x10 {
                assert_eq!(fs.level(), None);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn test_should_never_call_a_non_write_permission_fault_tracking(raw in proptest::prelude::any::<u32>()) {
            let esr = Esr(u64::from(raw));
            let expected = esr.ec() == ec::DATA_ABORT_LOWER
                && (0x0C..=0x0F).contains(&(raw & 0x3F))
                && (raw & (1 << 6) != 0 || raw & (1 << 7) != 0);
            proptest::prop_assert_eq!(esr.is_stage2_write_permission_fault(), expected);
        }
    }
}
