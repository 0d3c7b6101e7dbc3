//! An interpreter for the few AArch64 instructions squib's guest uses, over the stand-in.
//!
//! It lets the very bytes `squib run --backend hvf` loads into a VM run on any host, through the
//! same runner, vCPU loop and exit handling as on Apple Silicon: stores to write-protected pages
//! exit with the hardware's syndromes, the faulting instruction is re-executed from the same PC,
//! `hvc #0` exits to the VMM, and a kick makes the vCPU exit as `hv_vcpus_exit` does. Anything
//! else the guest might do (an unknown instruction, a misaligned Device-memory access) would
//! trap to the guest's own exception vectors on hardware, which this guest does not have; here
//! it exits with an unknown-class syndrome so the run fails visibly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use applevisor_sys::{
    HV_MEMORY_EXEC, HV_MEMORY_WRITE, hv_exit_reason_t, hv_vcpu_exit_exception_t, hv_vcpu_exit_t,
};

use crate::hv::HvError;
use crate::stand_in::{AccessFault, StandIn, syndrome};
use crate::vcpu::VcpuOps;
use crate::workload::{RunError, VcpuFactory};

/// ESR for an exception the guest would take itself (EC 0, IL=1): an undefined instruction or an
/// alignment fault.
pub const GUEST_OWN_EXCEPTION: u64 = 0x0200_0000;

/// An AArch64 vCPU (EL1, MMU off) interpreting guest code held by a [`StandIn`].
#[derive(Debug)]
pub struct A64Vcpu<'a> {
    hv: &'a StandIn,
    x: [u64; 31],
    pc: u64,
    zero: bool,
    cancel: Arc<AtomicBool>,
}

impl<'a> A64Vcpu<'a> {
    /// A vCPU at `pc` with all registers zero; setting `cancel` makes it exit (CANCELED) before
    /// its next instruction.
    #[must_use]
    pub fn new(hv: &'a StandIn, pc: u64, cancel: Arc<AtomicBool>) -> Self {
        Self {
            hv,
            x: [0; 31],
            pc,
            zero: false,
            cancel,
        }
    }

    /// The PC.
    #[must_use]
    pub fn pc(&self) -> u64 {
        self.pc
    }

    /// Register `n` (`XZR` for 31).
    #[must_use]
    pub fn reg(&self, n: u32) -> u64 {
        self.x.get(idx(n)).copied().unwrap_or(0)
    }

    fn set(&mut self, n: u32, v: u64) {
        if let Some(r) = self.x.get_mut(idx(n)) {
            *r = v;
        }
    }

    fn exit(reason: hv_exit_reason_t, syndrome: u64, ipa: u64) -> hv_vcpu_exit_t {
        hv_vcpu_exit_t {
            reason,
            exception: hv_vcpu_exit_exception_t {
                syndrome,
                virtual_address: ipa,
                physical_address: ipa,
            },
        }
    }

    fn fault(f: AccessFault, on_perm: u64, on_unmapped: u64) -> hv_vcpu_exit_t {
        match f {
            AccessFault::Permission(ipa) => Self::exit(hv_exit_reason_t::EXCEPTION, on_perm, ipa),
            AccessFault::Unmapped(ipa) => Self::exit(hv_exit_reason_t::EXCEPTION, on_unmapped, ipa),
        }
    }

    /// Execute one instruction: `None` to go on, `Some(exit)` to leave `run`.
    fn step(&mut self) -> Option<hv_vcpu_exit_t> {
        let pc = self.pc;
        if let Err(f) = self.hv.access(pc, 4, HV_MEMORY_EXEC, None) {
            return Some(Self::fault(
                f,
                syndrome::FETCH_PERMISSION,
                syndrome::FETCH_UNMAPPED,
            ));
        }
        let mut word = [0u8; 4];
        self.hv.read(pc, &mut word);
        let w = u32::from_le_bytes(word);
        let (rd, rn, rm) = (w & 31, (w >> 5) & 31, (w >> 16) & 31);
        let own = Some(Self::exit(hv_exit_reason_t::EXCEPTION, GUEST_OWN_EXCEPTION, pc));
        let mut next = pc + 4;
        if w & 0xFF80_0000 == 0xD280_0000 {
            // movz xd, #imm16, lsl #(16 * hw)
            self.set(rd, u64::from((w >> 5) & 0xFFFF) << (16 * ((w >> 21) & 3)));
        } else if w & 0xFF80_0000 == 0xF280_0000 {
            // movk xd, #imm16, lsl #(16 * hw)
            let shift = 16 * ((w >> 21) & 3);
            let v = (self.reg(rd) & !(0xFFFF << shift)) | (u64::from((w >> 5) & 0xFFFF) << shift);
            self.set(rd, v);
        } else if w & 0xFFE0_FC00 == 0xAA00_0000 {
            // orr xd, xn, xm (mov xd, xm when xn is xzr)
            self.set(rd, self.reg(rn) | self.reg(rm));
        } else if w & 0xFFE0_FC00 == 0x8B00_0000 {
            // add xd, xn, xm
            self.set(rd, self.reg(rn).wrapping_add(self.reg(rm)));
        } else if w & 0xFFC0_0000 == 0x9100_0000 && rn != 31 && rd != 31 {
            // add xd, xn, #imm12 (not SP: this guest has no stack)
            self.set(rd, self.reg(rn).wrapping_add(u64::from((w >> 10) & 0xFFF)));
        } else if w & 0xFFC0_0000 == 0xF100_0000 && rn != 31 {
            // subs xd, xn, #imm12 (cmp when xd is xzr); only Z is kept: b.ne/b.eq read it
            let v = self.reg(rn).wrapping_sub(u64::from((w >> 10) & 0xFFF));
            self.zero = v == 0;
            self.set(rd, v);
        } else if w & 0xFFC0_0000 == 0xF900_0000 && rn != 31 {
            // str xt, [xn, #imm12 * 8]
            let gpa = self.reg(rn).wrapping_add(u64::from((w >> 10) & 0xFFF) * 8);
            if !gpa.is_multiple_of(8) {
                return own;
            }
            let data = self.reg(rd).to_le_bytes();
            if let Err(f) = self.hv.access(gpa, 8, HV_MEMORY_WRITE, Some(&data)) {
                return Some(Self::fault(
                    f,
                    syndrome::STORE_PERMISSION,
                    syndrome::STORE_UNMAPPED,
                ));
            }
        } else if w & 0xFFC0_0000 == 0xA900_0000 && rn != 31 {
            // stp xt1, xt2, [xn, #imm7 * 8]
            let imm7 = i64::from(((w >> 15) & 0x7F).cast_signed() << 25 >> 25) * 8;
            let gpa = self.reg(rn).wrapping_add_signed(imm7);
            if !gpa.is_multiple_of(8) {
                return own;
            }
            let mut data = [0u8; 16];
            data[..8].copy_from_slice(&self.reg(rd).to_le_bytes());
            data[8..].copy_from_slice(&self.reg((w >> 10) & 31).to_le_bytes());
            if let Err(f) = self.hv.access(gpa, 16, HV_MEMORY_WRITE, Some(&data)) {
                return Some(Self::fault(
                    f,
                    syndrome::STORE_PAIR_PERMISSION,
                    syndrome::STORE_PAIR_UNMAPPED,
                ));
            }
        } else if w & 0xFF00_001E == 0x5400_0000 {
            // b.eq / b.ne #imm19 * 4
            let taken = (w & 1 == 1) != self.zero;
            if taken {
                next = pc.wrapping_add_signed(i64::from(((w >> 5) & 0x7_FFFF).cast_signed() << 13 >> 13) * 4);
            }
        } else if w & 0xFC00_0000 == 0x1400_0000 {
            // b #imm26 * 4
            next = pc.wrapping_add_signed(i64::from((w & 0x03FF_FFFF).cast_signed() << 6 >> 6) * 4);
        } else if w & 0xFFE0_001F == 0xD400_0002 {
            // hvc #imm16: the host sees it with the PC already past it
            self.pc = next;
            let esr = syndrome::HVC0 | u64::from((w >> 5) & 0xFFFF);
            return Some(Self::exit(hv_exit_reason_t::EXCEPTION, esr, 0));
        } else {
            return own;
        }
        self.pc = next;
        None
    }
}

fn idx(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl VcpuOps for A64Vcpu<'_> {
    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvError> {
        loop {
            if self.cancel.swap(false, Ordering::AcqRel) {
                return Ok(Self::exit(hv_exit_reason_t::CANCELED, 0, 0));
            }
            if let Some(exit) = self.step() {
                return Ok(exit);
            }
        }
    }
}

/// Makes [`A64Vcpu`]s over one stand-in; a handle is the vCPU's cancel flag.
#[derive(Debug)]
pub struct SimFactory<'a> {
    hv: &'a StandIn,
}

impl<'a> SimFactory<'a> {
    /// vCPUs over `hv`.
    #[must_use]
    pub fn new(hv: &'a StandIn) -> Self {
        Self { hv }
    }
}

impl<'a> VcpuFactory for SimFactory<'a> {
    type Vcpu = A64Vcpu<'a>;
    type Handle = Arc<AtomicBool>;

    fn create(&self, _id: u32, pc: u64) -> Result<(A64Vcpu<'a>, Arc<AtomicBool>), RunError> {
        let cancel = Arc::new(AtomicBool::new(false));
        Ok((A64Vcpu::new(self.hv, pc, Arc::clone(&cancel)), cancel))
    }

    fn kick(&self, handles: &[Arc<AtomicBool>]) {
        for h in handles {
            h.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use squib_arch::GpaRange;

    use super::*;
    use crate::a64::{StoreLoop, X, b_ne, hvc, movz, str, subs_imm, to_bytes};
    use crate::hv::{Hv, PROTECTED};

    const RAM: u64 = 0x4000_0000;

    fn stand_in() -> StandIn {
        StandIn::new(&[GpaRange::new(RAM, 1 << 20).unwrap()])
    }

    fn run_to_exit(cpu: &mut A64Vcpu<'_>) -> hv_vcpu_exit_t {
        cpu.run().unwrap()
    }

    #[test]
    fn test_should_execute_the_store_loop_to_its_hvc() {
        let hv = stand_in();
        let program = StoreLoop {
            base: RAM + 0x4000,
            stride: 0x40,
            count: 5,
            passes: 3,
            first_value: 0x10,
        };
        hv.write(RAM, &to_bytes(&program.program().unwrap()));
        let mut cpu = A64Vcpu::new(&hv, RAM, Arc::new(AtomicBool::new(false)));
        let exit = run_to_exit(&mut cpu);
        assert_eq!(
            (exit.reason, exit.exception.syndrome),
            (hv_exit_reason_t::EXCEPTION, syndrome::HVC0)
        );
        for (gpa, want) in program.expected(3) {
            let mut got = [0u8; 32];
            hv.read(gpa, &mut got);
            assert_eq!(got, want, "slot {gpa:#x}");
        }
        assert_eq!(cpu.reg(3), 0x13, "value after three passes");
        assert_eq!(cpu.reg(6), 0, "passes counted down");
    }

    #[test]
    fn test_should_stop_at_a_protected_page_with_the_pc_on_the_store() {
        let hv = stand_in();
        let code = [
            movz(X::n(0), 0x8000, 0),      // mov x0, #0x8000
            movz(X::n(1), 0x4000, 1),      // mov x1, #0x40000000
            0x8B01_0000,                   // add x0, x0, x1
            str(X::n(0), X::n(0), 0),      // str x0, [x0]
            subs_imm(X::n(2), X::n(0), 0), // subs x2, x0, #0
            b_ne(8),                       // b.ne +8 (taken: x0 is not zero)
            0,                             // udf (skipped)
            hvc(0),                        // hvc #0
        ];
        hv.write(RAM, &to_bytes(&code));
        hv.protect(RAM + 0x8000, 0x4000, PROTECTED).unwrap();
        let mut cpu = A64Vcpu::new(&hv, RAM, Arc::new(AtomicBool::new(false)));
        let exit = run_to_exit(&mut cpu);
        assert_eq!(exit.exception.syndrome, syndrome::STORE_PERMISSION);
        assert_eq!(exit.exception.physical_address, RAM + 0x8000);
        assert_eq!(cpu.pc(), RAM + 12, "the PC stays on the faulting str");
        hv.protect(RAM + 0x8000, 0x4000, 0b111).unwrap();
        let exit = run_to_exit(&mut cpu);
        assert_eq!(exit.exception.syndrome, syndrome::HVC0);
        let mut got = [0u8; 8];
        hv.read(RAM + 0x8000, &mut got);
        assert_eq!(u64::from_le_bytes(got), RAM + 0x8000);
    }

    #[test]
    fn test_should_exit_canceled_when_kicked_and_on_unknown_instructions() {
        let hv = stand_in();
        hv.write(RAM, &to_bytes(&[crate::a64::b(0), 0]));
        let factory = SimFactory::new(&hv);
        let (mut cpu, handle) = factory.create(0, RAM).unwrap();
        factory.kick(&[handle]);
        assert_eq!(run_to_exit(&mut cpu).reason, hv_exit_reason_t::CANCELED);
        let mut cpu = A64Vcpu::new(&hv, RAM + 4, Arc::new(AtomicBool::new(false)));
        assert_eq!(run_to_exit(&mut cpu).exception.syndrome, GUEST_OWN_EXCEPTION);
    }
}
