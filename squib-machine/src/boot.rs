//! Linux's 64-bit boot protocol, done by the VMM: load the ELF, write the zero
//! page and command line, build a GDT and identity page tables, and hand each
//! vCPU its first registers.
//!
//! The vCPU starts in long mode at the ELF entry, with `rsi` pointing at the
//! zero page, exactly as Firecracker starts a vmlinux; none of the guest's own
//! 16- or 32-bit code runs (on a nested PVM host that code would be emulated).

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Guest memory as the machine holds it: dirty bits for VMM writes included.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Why the guest could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("kernel {path}: cannot open")]
    OpenKernel {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// linux-loader refused the image.
    #[error("kernel {path}: not a loadable 64-bit ELF: {reason}")]
    LoadKernel {
        /// The image.
        path: PathBuf,
        /// What linux-loader said.
        reason: String,
    },
    /// The initrd could not be read or does not fit in guest RAM above the kernel.
    #[error("initrd {path}: {reason}")]
    Initrd {
        /// The initrd file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The command line does not fit or has a forbidden byte.
    #[error("kernel command line {cmdline:?}: {reason}")]
    Cmdline {
        /// The command line.
        cmdline: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the zero page failed.
    #[error("writing boot_params at {addr:#x}: {reason}")]
    BootParams {
        /// Guest address of the zero page.
        addr: u64,
        /// What failed.
        reason: String,
    },
    /// Writing a boot structure (GDT, page tables) failed.
    #[error("writing the boot {what} at {addr:#x}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

/// Load an ELF64 kernel at its physical addresses; returns the entry point and the first guest
/// address past the kernel.
///
/// # Errors
/// [`BootError::OpenKernel`] or [`BootError::LoadKernel`], naming the file.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(|e| {
        BootError::LoadKernel {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok((loaded.kernel_load.0, loaded.kernel_end))
}

/// Load an initrd the way Firecracker does on x86-64: at the highest page-aligned guest address
/// where it ends within low RAM (`mem_size`), which must lie above the kernel (`kernel_end`).
/// Returns its guest address and size, for the zero page's `ramdisk_image`/`ramdisk_size`.
///
/// # Errors
/// [`BootError::Initrd`] naming the file: unreadable, empty, or too large for the RAM above the
/// kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let bad = |reason: String| BootError::Initrd {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let size = u64::try_from(bytes.len()).map_err(|e| bad(e.to_string()))?;
    if size == 0 {
        return Err(bad("empty file".into()));
    }
    let top = mem_size.min(layout::MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.next_multiple_of(0x1000))
        .ok_or_else(|| {
            bad(format!(
                "{size} bytes do not fit in guest RAM between the kernel's end ({kernel_end:#x}) and {top:#x}"
            ))
        })?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| bad(format!("writing it at {addr:#x}: {e}")))?;
    Ok((addr, size))
}

/// Write the command line and the zero page (with the e820 map for `mem_size` bytes of RAM).
///
/// # Errors
/// [`BootError::Cmdline`] for a command line that does not fit, [`BootError::BootParams`]
/// if the zero page cannot be written.
pub fn write_boot_params(
    mem: &GuestMemory,
    cmdline: &str,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let bad = |reason: String| BootError::Cmdline {
        cmdline: cmdline.to_owned(),
        reason,
    };
    let mut cl = Cmdline::new(layout::CMDLINE_MAX).map_err(|e| bad(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(|e| bad(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cl)
        .map_err(|e| bad(e.to_string()))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x100_0000;
    // Where the ACPI tables start (boot protocol 2.14); a kernel would find them by scanning too.
    params.acpi_rsdp_addr = layout::RSDP_ADDR;
    params.hdr.cmd_line_ptr = u32::try_from(layout::CMDLINE_ADDR).unwrap_or(u32::MAX);
    params.hdr.cmdline_size = u32::try_from(cmdline.len()).map_err(|e| bad(e.to_string()))?;
    if let Some((addr, size)) = initrd {
        // Both below 4 GiB: the initrd ends within low RAM, which stops at the MMIO gap.
        let field = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| BootError::BootParams {
                addr: layout::ZERO_PAGE_ADDR,
                reason: format!("initrd {what} {v:#x} above 4 GiB"),
            })
        };
        params.hdr.ramdisk_image = field(addr, "address")?;
        params.hdr.ramdisk_size = field(size, "size")?;
    }
    let ram = [
        (0, layout::EBDA_START),
        (layout::HIMEM_START, mem_size - layout::HIMEM_START),
    ];
    for (i, (addr, size)) in ram.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: 1, // E820_RAM
        };
    }
    params.e820_entries = 2;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::BootParams {
        addr: layout::ZERO_PAGE_ADDR,
        reason: e.to_string(),
    })
}

/// Boot GDT: null, 64-bit code, data, TSS (Firecracker's).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    // `as` widening from u16/u32 to u64 is lossless; `u64::from` is not const.
    #[allow(clippy::cast_lossless)]
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(index: u16, entry: u64) -> kvm_segment {
    let bit = |n: u32| u8::from(entry >> n & 1 == 1);
    let g = bit(55);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present: bit(47),
        dpl: u8::try_from((entry >> 45) & 3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 1 - bit(47),
        padding: 0,
    }
}

/// Write the boot GDT, a zero IDT and page tables identity-mapping the first 1 GiB.
///
/// # Errors
/// [`BootError::Write`] naming the structure.
pub fn write_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let write = |what, addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|source| BootError::Write { what, addr, source })
    };
    for (i, e) in (0u64..).zip(GDT) {
        write("GDT", layout::GDT_ADDR + i * 8, e)?;
    }
    write("IDT", layout::IDT_ADDR, 0)?;
    write("PML4", layout::PML4_ADDR, layout::PDPT_ADDR | 3)?;
    write("PDPT", layout::PDPT_ADDR, layout::PD_ADDR | 3)?;
    for i in 0..512u64 {
        write("PD", layout::PD_ADDR + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// Special registers for long mode with the boot GDT and page tables, on top of
/// what KVM reports for a fresh vCPU (`base`, which carries the APIC base).
#[must_use]
pub fn sregs(mut base: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    base.gdt.base = layout::GDT_ADDR;
    base.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    base.idt.base = layout::IDT_ADDR;
    base.idt.limit = 7;
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = segment(3, GDT[3]);
    base.cr3 = layout::PML4_ADDR;
    base.cr4 |= 1 << 5; // PAE
    base.cr0 |= 1 | (1 << 31); // PE, PG
    base.efer |= (1 << 8) | (1 << 10); // LME, LMA
    base
}

/// General registers at the kernel entry: `rsi` = zero page (the boot protocol).
#[must_use]
pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// x87/SSE state after reset (FCW 0x37f, MXCSR 0x1f80).
#[must_use]
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs a VMM sets at boot (Firecracker's list): syscall MSRs cleared, TSC at
/// zero, fast strings on, MTRRs enabled with write-back default.
#[must_use]
pub fn msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}
