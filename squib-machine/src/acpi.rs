//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT), built with rust-vmm's `acpi_tables` as
//! Firecracker does for x86 guests.
//!
//! Why: a stock kernel learns its CPUs from ACPI's MADT, or from the MP table only when built
//! with `CONFIG_X86_MPPARSE`. Debian's cloud kernel is built without it, so with the MP table
//! alone it booted on one CPU whatever `--vcpus` said. The MP table stays for kernels that read
//! it (squib's test guest reads neither).
//!
//! The platform described is Firecracker's: hardware-reduced ACPI (no PM timer, no SCI, no
//! legacy PIC or PIT for the guest to drive: it keeps time with the local APIC and kvmclock),
//! an IOAPIC and one local APIC per vCPU in the MADT, and COM1 declared in the DSDT with its
//! port range and interrupt, which is how a hardware-reduced guest finds the serial port.
//! The FADT also says there is no VGA and no CMOS RTC: squib has neither, and a guest that
//! probes an RTC squib does not emulate waits seconds on its update-in-progress bit.
//!
//! Placement: the RSDP at [`layout::RSDP_ADDR`] (inside the BIOS area a kernel scans, and
//! named in the zero page's `acpi_rsdp_addr`), the other tables right after it, 16-byte
//! aligned, all below 1 MiB and outside the e820 RAM map.

use acpi_tables::Aml;
use acpi_tables::aml::{self, Device, EISAName, IO, Interrupt, Name, ResourceTemplate};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;
use super::layout;
use super::mptable::{IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"SQUIB ";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags (FADT): no VGA (bit 2), no CMOS RTC (bit 5).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"SQUIBKVM";

/// The tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More CPUs than the MADT's 8-bit APIC IDs (and the IOAPIC's ID after them) allow.
    #[error("{0} vCPUs: the ACPI tables describe 1 to 254")]
    TooManyCpus(u8),
    /// The tables do not fit below the end of the BIOS area.
    #[error("ACPI tables of {len} bytes at {addr:#x} run past {end:#x}")]
    TooLarge {
        /// Where they start.
        addr: u64,
        /// Their total length.
        len: usize,
        /// Where they must end.
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("writing the ACPI table {table} at {addr:#x}")]
    Write {
        /// Which table.
        table: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The DSDT: COM1 (PNP0501) with its eight ports and its edge-triggered interrupt.
fn dsdt() -> Vec<u8> {
    let mut body = Vec::new();
    let uid = aml::ZERO;
    // Consumer, edge-triggered, active high, exclusive.
    let irq = Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let ports = IO::new(layout::COM1_BASE, layout::COM1_BASE, 1, 8);
    let crs = ResourceTemplate::new(vec![&irq, &ports]);
    let hid = EISAName::new("PNP0501");
    let hid_name = Name::new("_HID".into(), &hid);
    let uid_name = Name::new("_UID".into(), &uid);
    let crs_name = Name::new("_CRS".into(), &crs);
    Device::new("_SB_.COM1".into(), vec![&hid_name, &uid_name, &crs_name]).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"SQUBDSDT", OEM_REVISION);
    // Extends the header's length and checksum too.
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The tables for `cpus` vCPUs, laid out from `base` (where the RSDP goes): the bytes to write
/// there, in one piece.
///
/// # Errors
/// [`AcpiError::TooManyCpus`] beyond 254 vCPUs.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, AcpiError> {
    if cpus == 0 || cpus > 254 {
        return Err(AcpiError::TooManyCpus(cpus));
    }
    let align = |v: usize| v.next_multiple_of(16);
    let dsdt = dsdt();

    let mut madt = MADT::new(
        OEM_ID,
        *b"SQUBMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC takes the ID after the last CPU's, as in the MP table.
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    let madt = bytes(&madt);

    // Offsets from `base`: RSDP, XSDT (two entries), FADT, MADT, DSDT.
    let xsdt_off = align(Rsdp::len());
    let xsdt_len = 36 + 2 * 8;
    let fadt_off = align(xsdt_off + xsdt_len);
    let madt_off = align(fadt_off + acpi_tables::fadt::FADT::len());
    let dsdt_off = align(madt_off + madt.len());
    let total = dsdt_off + dsdt.len();
    let at = |off: usize| base + off as u64;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"SQUBFADT", OEM_REVISION)
        .dsdt_64(at(dsdt_off))
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt = bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, *b"SQUBXSDT", OEM_REVISION);
    xsdt.add_entry(at(fadt_off));
    xsdt.add_entry(at(madt_off));
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), xsdt_len);

    let rsdp = bytes(&Rsdp::new(OEM_ID, at(xsdt_off)));
    let mut out = vec![0u8; total];
    for (off, table) in [
        (0, &rsdp),
        (xsdt_off, &xsdt),
        (fadt_off, &fadt),
        (madt_off, &madt),
        (dsdt_off, &dsdt),
    ] {
        out[off..off + table.len()].copy_from_slice(table);
    }
    Ok(out)
}

/// Write the tables for `cpus` vCPUs at [`layout::RSDP_ADDR`].
///
/// # Errors
/// [`AcpiError`] naming the failure.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), AcpiError> {
    let tables = build(cpus, layout::RSDP_ADDR)?;
    if layout::RSDP_ADDR + tables.len() as u64 > layout::HIMEM_START {
        return Err(AcpiError::TooLarge {
            addr: layout::RSDP_ADDR,
            len: tables.len(),
            end: layout::HIMEM_START,
        });
    }
    mem.write_slice(&tables, GuestAddress(layout::RSDP_ADDR))
        .map_err(|source| AcpiError::Write {
            table: "RSDP",
            addr: layout::RSDP_ADDR,
            source,
        })
}

#[cfg(test)]
mod tests {
    //! The tables are read back by the ACPI specification's layout (offsets written out here,
    //! not taken from the crate that built them): every checksum, every pointer, the MADT's
    //! entries, and the DSDT's COM1 resources.
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    /// The table at guest address `addr`: its signature and bytes (length from its header).
    fn table(all: &[u8], base: u64, addr: u64) -> (&[u8; 4], &[u8]) {
        let off = usize::try_from(addr - base).unwrap();
        let len = usize::try_from(u32_at(all, off + 4)).unwrap();
        let t = &all[off..off + len];
        assert_eq!(sum(t), 0, "checksum of the table at {addr:#x}");
        (t[..4].try_into().unwrap(), t)
    }

    #[test]
    fn test_should_describe_every_vcpu_and_com1_in_checksummed_tables() {
        let base = 0xe0000;
        let all = build(2, base).unwrap();
        // RSDP (ACPI 2.0): signature, checksum over 20 bytes, extended over 36, XSDT at 24.
        assert_eq!(&all[..8], b"RSD PTR ");
        assert_eq!(sum(&all[..20]), 0);
        assert_eq!(sum(&all[..36]), 0);
        assert_eq!(all[15], 2, "revision 2: XSDT");
        let (sig, xsdt) = table(&all, base, u64_at(&all, 24));
        assert_eq!(sig, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect();
        let mut found = Vec::new();
        for &addr in &entries {
            let (sig, t) = table(&all, base, addr);
            found.push(*sig);
            match sig {
                b"FACP" => {
                    let flags = u32_at(t, 112);
                    assert_ne!(flags & (1 << 20), 0, "hardware-reduced ACPI");
                    assert_eq!(
                        u16::from_le_bytes([t[109], t[110]]),
                        (1 << 2) | (1 << 5),
                        "no VGA, no CMOS RTC"
                    );
                    let (dsig, dsdt) = table(&all, base, u64_at(t, 140));
                    assert_eq!(dsig, b"DSDT");
                    let aml = &dsdt[36..];
                    // PNP0501 as an EISA id (0x0c: DWord prefix, then the compressed id).
                    let eisa = [0x0c, 0x41, 0xd0, 0x05, 0x01];
                    assert!(aml.windows(5).any(|w| w == eisa), "COM1's _HID PNP0501");
                    // Extended IRQ descriptor: 0x89, length 6, flags (consumer, edge), 1, GSI 4.
                    let irq = [0x89, 6, 0, 0x03, 1, 4, 0, 0, 0];
                    assert!(aml.windows(9).any(|w| w == irq), "COM1's interrupt, GSI 4, edge");
                    // I/O port descriptor: 0x47, decode16, min 0x3f8, max 0x3f8, align 1, length 8.
                    let io = [0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8];
                    assert!(aml.windows(8).any(|w| w == io), "COM1's ports");
                }
                b"APIC" => {
                    assert_eq!(u32_at(t, 36), LAPIC_ADDR);
                    let (mut off, mut lapics, mut ioapics) = (44, Vec::new(), Vec::new());
                    while off < t.len() {
                        let (kind, len) = (t[off], usize::from(t[off + 1]));
                        match kind {
                            0 => lapics.push((t[off + 2], t[off + 3], u32_at(t, off + 4))),
                            1 => ioapics.push((t[off + 2], u32_at(t, off + 4), u32_at(t, off + 8))),
                            other => panic!("unexpected MADT entry type {other}"),
                        }
                        off += len;
                    }
                    assert_eq!(off, t.len(), "entries fill the MADT exactly");
                    assert_eq!(
                        lapics,
                        vec![(0, 0, 1), (1, 1, 1)],
                        "(uid, APIC id, enabled) per vCPU"
                    );
                    assert_eq!(ioapics, vec![(2, IOAPIC_ADDR, 0)], "(id, address, GSI base)");
                }
                other => panic!("unexpected table {other:?}"),
            }
        }
        assert_eq!(found, vec![*b"FACP", *b"APIC"]);
        assert!(base + all.len() as u64 <= layout::HIMEM_START);
    }

    #[test]
    fn test_should_refuse_cpu_counts_the_tables_cannot_hold() {
        assert!(matches!(build(0, 0xe0000), Err(AcpiError::TooManyCpus(0))));
        assert!(matches!(build(255, 0xe0000), Err(AcpiError::TooManyCpus(255))));
    }
}
