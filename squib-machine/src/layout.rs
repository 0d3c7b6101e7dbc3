//! Where things live in guest-physical memory at boot.
//!
//! The addresses are Firecracker's on x86-64, so an image that boots there finds
//! its GDT, page tables, zero page and command line where it expects them. The
//! kernel itself lands at its ELF physical addresses (1 MiB or above).

/// The boot GDT (null, code, data, TSS descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// A zero IDT, so that an early exception shuts the guest down instead of running garbage.
pub const IDT_ADDR: u64 = 0x520;
/// Linux's `boot_params` ("zero page"), handed to the kernel in `rsi`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial `rsp`/`rbp` of every vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot page tables: one PML4, one PDPT, one PD of 2 MiB pages (identity map of 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// See [`PML4_ADDR`].
pub const PDPT_ADDR: u64 = 0xa000;
/// See [`PML4_ADDR`].
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, terminator included (Linux's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI RSDP, with the other ACPI tables after it: in the BIOS area (0xe0000..0x100000) that
/// a kernel scans for it, outside the e820 RAM map.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// Start of high memory; an ELF entry below it is refused.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, KVM's TSS): RAM must end below it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Where KVM puts the three pages of its real-mode TSS (inside the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The smallest guest RAM that holds the boot structures and a kernel at 1 MiB.
pub const MIN_MEM: u64 = 4 << 20;
/// COM1's I/O ports.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line (GSI).
pub const COM1_GSI: u32 = 4;
/// A write here is the guest reporting a fatal error (squib's test guest writes the
/// exception vector).
pub const PANIC_PORT: u16 = 0x501;
