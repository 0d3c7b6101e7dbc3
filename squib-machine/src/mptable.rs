//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA, as Firecracker
//! writes it: how a Linux guest without ACPI learns how many CPUs there are,
//! their local APIC IDs, the IOAPIC and the ISA interrupt wiring.
//!
//! squib's test guest does not read it (it counts CPUs from CPUID), but a
//! vmlinux with more than one vCPU needs it to start its application
//! processors; it sits at [`layout::EBDA_START`], outside the e820 RAM map.
//! Built with explicit little-endian bytes: no `repr(C)` structs to get wrong.

use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;
use super::layout;

/// Where the local APICs are (the default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where the IOAPIC is (KVM's in-kernel IOAPIC answers there).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const ISA_IRQS: u8 = 16;

/// The table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More CPUs than the table (and the EBDA) can describe.
    #[error("{0} vCPUs: the MP table describes 1 to 254")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("writing the MP table at {addr:#x}")]
    Write {
        /// Where.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The table's bytes for `cpus` CPUs, to be placed at guest address `base`.
///
/// # Errors
/// [`MpTableError::TooManyCpus`] beyond 254 CPUs (the IOAPIC takes the next ID).
pub fn build(cpus: u8, base: u32) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    // Entries after the 44-byte configuration table header.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0u8); // processor
        entries.push(id); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled, BSP
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]); // IOAPIC, usable
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt, INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SQUIB   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // The floating pointer comes first, the table right after it.
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(base + 16).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec 1.4
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // features: configuration table present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Write the table for `cpus` CPUs at [`layout::EBDA_START`].
///
/// # Errors
/// [`MpTableError`] naming the failure.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MpTableError> {
    let base = u32::try_from(layout::EBDA_START).unwrap_or(0);
    let bytes = build(cpus, base)?;
    mem.write_slice(&bytes, GuestAddress(layout::EBDA_START))
        .map_err(|source| MpTableError::Write {
            addr: layout::EBDA_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn test_should_build_checksummed_mp_table_listing_every_cpu() {
        let base = 0x9fc00;
        let t = build(2, base).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(ptr, base + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        // Walk the entries: processors are 20 bytes, everything else 8.
        let mut off = 44;
        let mut cpus = Vec::new();
        let mut ioapics = 0;
        let mut irqs = 0;
        for _ in 0..count {
            match table[off] {
                0 => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                2 => {
                    ioapics += 1;
                    assert_eq!(&table[off + 4..off + 8], &IOAPIC_ADDR.to_le_bytes());
                    off += 8;
                }
                3 => {
                    irqs += 1;
                    off += 8;
                }
                1 | 4 => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, table.len(), "entries fill the table exactly");
        assert_eq!(
            cpus,
            vec![(0, 3), (1, 1)],
            "CPU 0 is the enabled BSP, CPU 1 enabled"
        );
        assert_eq!(ioapics, 1);
        assert_eq!(irqs, 16);
        assert!(t.len() < 0x400, "fits in the 1 KiB EBDA");
    }

    #[test]
    fn test_should_refuse_cpu_counts_the_table_cannot_hold() {
        assert!(matches!(build(0, 0), Err(MpTableError::TooManyCpus(0))));
        assert!(matches!(build(255, 0), Err(MpTableError::TooManyCpus(255))));
    }
}
