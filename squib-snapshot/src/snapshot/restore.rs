//! Turning a chain back into guest memory.
//!
//! Why two modes: eager restore reads every extent into fresh anonymous memory and checks each
//! extent's xxh3 as it goes, so a restored guest never runs on corrupt bytes. Lazy restore maps
//! the base's memory file `MAP_PRIVATE`, so a 1 GiB guest is runnable after a few `mmap` calls
//! and pages come in from the page cache as the guest touches them, copy-on-write; it checks the
//! structure of every file but cannot check the base's checksums without reading it (run
//! `squib snapshot verify` first when the files' origin is in doubt). Diffs on top of a lazy base
//! are always read eagerly and checked.
//!
//! Either way the memory is built fresh and returned only when everything succeeded, so a
//! failed restore leaves nothing half-written behind.

use std::fs::File;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::format::{RegionLayout, SnapshotState};
use super::load::Chain;
use super::save::{CHUNK, ZERO_PAGE, is_zero};
use super::{Progress, SnapshotError};

/// How to bring memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read everything now, checking every checksum.
    Eager,
    /// Map the base's memory file copy-on-write; read diffs now.
    Lazy,
}

/// A restored guest: memory, and the leaf's state (vCPU and device sections) to resume from.
#[derive(Debug)]
pub struct Restored {
    /// Guest memory, bitmaps clear.
    pub memory: GuestMemoryMmap<AtomicBitmap>,
    /// The leaf snapshot's state.
    pub state: SnapshotState,
    /// Bytes read from memory files (the lazily mapped base not counted).
    pub bytes_read: u64,
}

/// Load the chain ending at `dir` and restore it.
///
/// ```no_run
/// use squib_snapshot::snapshot::{restore, RestoreMode};
/// let r = restore::restore(std::path::Path::new("snaps/000003-diff"), RestoreMode::Lazy)?;
/// println!("{} vCPUs to resume", r.state.vcpus.len());
/// # Ok::<(), squib_snapshot::snapshot::SnapshotError>(())
/// ```
///
/// # Errors
/// Any [`SnapshotError`] from loading or reading, naming the file.
pub fn restore(dir: &Path, mode: RestoreMode) -> Result<Restored, SnapshotError> {
    restore_chain(&Chain::load(dir)?, mode)
}

/// Restore a loaded chain: base, then each diff in order.
///
/// # Errors
/// Any [`SnapshotError`] from reading, naming the file.
pub fn restore_chain(chain: &Chain, mode: RestoreMode) -> Result<Restored, SnapshotError> {
    restore_chain_with(chain, mode, &mut |_| {})
}

/// The bytes [`restore_chain_with`] reads (and reports to its progress hook) for `chain` in
/// `mode`: every extent of every member, the base's left out when it is mapped lazily.
#[must_use]
pub fn bytes_to_read(chain: &Chain, mode: RestoreMode) -> u64 {
    let skip = usize::from(mode == RestoreMode::Lazy);
    chain
        .members
        .iter()
        .skip(skip)
        .map(|m| m.state.extent_bytes())
        .sum()
}

/// [`restore_chain`], telling `progress` how many bytes of extents each step read (the steps add
/// up to [`bytes_to_read`]). Memory files are opened one at a time, so a chain of any length
/// restores within any limit on open files.
///
/// # Errors
/// Any [`SnapshotError`] from reading, naming the file.
pub fn restore_chain_with(
    chain: &Chain,
    mode: RestoreMode,
    progress: &mut Progress<'_>,
) -> Result<Restored, SnapshotError> {
    let base = chain.base();
    let layout = &base.state.layout;
    let mut bytes_read = 0u64;
    let memory = match mode {
        RestoreMode::Eager => anonymous(layout)?,
        RestoreMode::Lazy => {
            let file = base.open_memory()?;
            map_private(file.file(), &base.memory_path, layout)?
        }
    };
    let mut buf = Vec::with_capacity(CHUNK);
    let skip = usize::from(mode == RestoreMode::Lazy);
    for (i, member) in chain.members.iter().enumerate().skip(skip) {
        // Fresh anonymous memory is zero: the base need not write its zero pages.
        let fresh = i == 0;
        let file = member.open_memory()?;
        for extent in &member.state.extents {
            file.read_extent(extent, &mut buf, &mut |gpa, bytes| {
                write_guest(&memory, gpa, bytes, fresh)?;
                progress(bytes.len() as u64);
                Ok(())
            })?;
            bytes_read += extent.len;
        }
    }
    for region in memory.iter() {
        let bitmap: &AtomicBitmap = (**region).bitmap();
        bitmap.reset();
    }
    Ok(Restored {
        memory,
        state: chain.leaf().state.clone(),
        bytes_read,
    })
}

fn write_guest(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    gpa: u64,
    bytes: &[u8],
    skip_zero: bool,
) -> Result<(), SnapshotError> {
    let put = |at: u64, b: &[u8]| {
        mem.write_slice(b, GuestAddress(at))
            .map_err(|e| SnapshotError::GuestMemory(format!("writing {at:#x}: {e}")))
    };
    if !skip_zero {
        return put(gpa, bytes);
    }
    for (p, page) in bytes.chunks(ZERO_PAGE).enumerate() {
        if !is_zero(page) {
            put(gpa + (p * ZERO_PAGE) as u64, page)?;
        }
    }
    Ok(())
}

/// Fresh anonymous guest memory with `layout`'s regions.
///
/// # Errors
/// [`SnapshotError::GuestMemory`] when the regions cannot be mapped.
pub fn anonymous(layout: &[RegionLayout]) -> Result<GuestMemoryMmap<AtomicBitmap>, SnapshotError> {
    let ranges = layout
        .iter()
        .map(|r| Ok((GuestAddress(r.gpa), region_size(r)?)))
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges)
        .map_err(|e| SnapshotError::GuestMemory(format!("mapping {} regions: {e}", ranges.len())))
}

fn region_size(r: &RegionLayout) -> Result<usize, SnapshotError> {
    usize::try_from(r.len).map_err(|_| {
        SnapshotError::GuestMemory(format!("region {:#x}+{:#x} does not fit this host", r.gpa, r.len))
    })
}

/// Guest memory mapping each region of a full snapshot's memory file `MAP_PRIVATE`.
fn map_private(
    file: &File,
    path: &Path,
    layout: &[RegionLayout],
) -> Result<GuestMemoryMmap<AtomicBitmap>, SnapshotError> {
    let page = rustix::param::page_size() as u64;
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        if !r.file_offset.is_multiple_of(page) {
            return Err(SnapshotError::GuestMemory(format!(
                "{}: region {:#x} starts at file offset {:#x}, not a multiple of the host page {page:#x}; restore eagerly",
                path.display(),
                r.gpa,
                r.file_offset
            )));
        }
        let f = file
            .try_clone()
            .map_err(SnapshotError::io(path, "duplicate descriptor"))?;
        let mapping = MmapRegion::<AtomicBitmap>::build(
            Some(FileOffset::new(f, r.file_offset)),
            region_size(r)?,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::GuestMemory(format!("{}: mmap: {e}", path.display())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or_else(|| {
            SnapshotError::GuestMemory(format!("region {:#x}+{:#x} overflows", r.gpa, r.len))
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::GuestMemory(format!("{}: {e}", path.display())))
}

/// Write guest memory to `out` as one raw file: every region in address order, back to back
/// (the memory file's layout). Two restores of the same state give files `cmp` finds equal.
///
/// # Errors
/// [`SnapshotError::Io`] naming `out`.
pub fn dump_memory(mem: &GuestMemoryMmap<AtomicBitmap>, out: &Path) -> Result<u64, SnapshotError> {
    use std::io::Write;
    let mut regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let f = File::create(out).map_err(SnapshotError::io(out, "create"))?;
    let mut w = std::io::BufWriter::with_capacity(CHUNK, f);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for (gpa, len) in regions {
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            mem.read_slice(&mut buf[..n], GuestAddress(gpa + done))
                .map_err(|e| SnapshotError::GuestMemory(format!("reading {:#x}: {e}", gpa + done)))?;
            w.write_all(&buf[..n]).map_err(SnapshotError::io(out, "write"))?;
            done += n as u64;
        }
        total += len;
    }
    w.into_inner()
        .map_err(|e| SnapshotError::Io {
            path: out.to_path_buf(),
            op: "flush",
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(SnapshotError::io(out, "fsync"))?;
    Ok(total)
}
