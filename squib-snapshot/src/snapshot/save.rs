//! Writing one snapshot atomically and durably: squib's directory, two files anywhere
//! (Firecracker's paths), or a diff merged in place into its base's memory file.
//!
//! Why the bounce buffer: a live checkpoint copies guest memory while vCPUs run (the tracker has
//! re-protected the pages, but the guest may fault them writable again and write during the
//! copy). Each chunk is copied once out of guest memory, and that one copy is both hashed and
//! written, so the recorded xxh3 always matches the bytes on disk; a page the guest tears during
//! the copy is dirty again and lands in the next diff. The chunk (256 KiB) stays in cache between
//! the copy, the hash and the `pwrite`.
//!
//! What a durable, atomic save needs (spec 17 §6): the memory file durable before the state file
//! that names it can be (a lazy load maps memory unread), the state file and the names durable
//! before returning, and a file already at a path replaced only by a `rename` of its complete
//! successor. A squib directory appears under its final name by one `rename` after both files
//! and the directory are synced (a chain writer appends to its newest member, which must never be
//! seen half-written); where the file system lacks `RENAME_NOREPLACE` (NFS, older overlayfs), a
//! plain `rename` takes its place, and `rename_into_place` says why that still never replaces a
//! snapshot. Two files at new paths are written under their own names: a torn one is refused by
//! every loader (its length and CRC, or a missing trailer), so a temporary name buys nothing.
//! An in-place merge restamps the base's identity trailer, durably, before writing a guest byte
//! into it, so the base's old state file is refused from then on (see [`merge_in_place`]).
//!
//! Why leftovers are swept: a process killed mid-save leaves its temp directory or temp files
//! behind. Their names say which host and process made them, so the next save into the same
//! directory removes those of processes of this host that no longer run, and nothing else: see
//! [`remove_leftovers`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use squib_arch::{GpaRange, PageGeometry};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3;

use super::format::{
    Extent, MEMORY_TRAILER_LEN, MemoryTrailer, ParentRef, RegionLayout, Section, SnapshotId, SnapshotKind,
    SnapshotState,
};
use super::io::SnapshotIo;
use super::load::LoadedSnapshot;
use super::{MEMORY_FILE, Progress, STATE_FILE, SnapshotError};

/// Bytes copied out of guest memory per step: small enough that the copy, the hash, the zero
/// check and the kernel's copy in `pwrite` all hit the L2 cache.
pub const CHUNK: usize = 256 << 10;
/// The page size at which a full snapshot leaves all-zero pages as holes.
pub const ZERO_PAGE: usize = 4096;

/// What a run loop knows about its VM besides memory: the backend, its geometry, and opaque
/// per-backend vCPU and device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Backend name (`"soft"`, `"kvm"`, `"hvf"`).
    pub backend: String,
    /// The tracker's geometry.
    pub geometry: PageGeometry,
    /// Opaque per-vCPU state (index = vCPU id).
    pub vcpus: Vec<Vec<u8>>,
    /// Opaque device state sections.
    pub devices: Vec<Section>,
}

impl SnapshotMeta {
    /// Meta with no vCPU or device state.
    #[must_use]
    pub fn new(backend: &str, geometry: PageGeometry) -> Self {
        Self {
            backend: backend.to_owned(),
            geometry,
            vcpus: Vec::new(),
            devices: Vec::new(),
        }
    }
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSnapshot {
    /// What names the snapshot: its directory (squib's layout) or its state file. Every loader
    /// takes either.
    pub path: PathBuf,
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file.
    pub memory_path: PathBuf,
    /// Its id.
    pub id: SnapshotId,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Number of extents.
    pub extents: usize,
    /// Guest bytes the extents cover.
    pub extent_bytes: u64,
    /// Bytes actually written to the memory file (all-zero pages of a full snapshot are skipped).
    pub written_bytes: u64,
}

/// The layout of `mem`: its regions sorted by address, packed back to back.
///
/// # Errors
/// [`SnapshotError::GuestMemory`] when a region is not aligned to the granule.
pub fn layout_of(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    geometry: &PageGeometry,
) -> Result<Vec<RegionLayout>, SnapshotError> {
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let mut offset = 0;
    let mut out = Vec::with_capacity(regions.len());
    for (gpa, len) in regions {
        if !(gpa | len).is_multiple_of(geometry.granule) {
            return Err(SnapshotError::GuestMemory(format!(
                "region {gpa:#x}+{len:#x} is not aligned to the {:#x}-byte granule",
                geometry.granule
            )));
        }
        out.push(RegionLayout {
            gpa,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    Ok(out)
}

/// A fresh id: xxh3-128 over the time, the process, a counter and the destination.
pub(crate) fn new_id(dest: &Path) -> SnapshotId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut seed = Vec::with_capacity(64);
    seed.extend_from_slice(&nanos.to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    seed.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    seed.extend_from_slice(dest.as_os_str().as_encoded_bytes());
    SnapshotId(xxhash_rust::xxh3::xxh3_128(&seed))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sort, check and coalesce dirty ranges, splitting at region boundaries.
fn normalise(
    ranges: &[GpaRange],
    layout: &[RegionLayout],
    granule: u64,
) -> Result<Vec<GpaRange>, SnapshotError> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<GpaRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        if !r.is_aligned(granule) {
            return Err(SnapshotError::BadRange {
                start: r.start(),
                len: r.len(),
                reason: "not aligned to the granule",
            });
        }
        let inside = layout
            .iter()
            .any(|l| r.start() >= l.gpa && r.end() <= l.gpa + l.len);
        if !inside {
            return Err(SnapshotError::BadRange {
                start: r.start(),
                len: r.len(),
                reason: "not inside one region of guest memory",
            });
        }
        if let Some(last) = out.last_mut() {
            let same_region = layout
                .iter()
                .any(|l| last.start() >= l.gpa && r.end() <= l.gpa + l.len);
            if r.start() <= last.end() && same_region {
                if r.end() > last.end() {
                    *last = GpaRange::from_bounds(last.start(), r.end()).unwrap_or(*last);
                }
                continue;
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// Saves of at least this many bytes overlap copying and hashing with writing (two threads).
pub const PIPELINE_MIN: u64 = 16 << 20;
/// Bounce buffers in flight between the copying and the writing thread.
const PIPELINE_DEPTH: usize = 4;

/// One piece of guest memory to copy: guest address, length, memory file offset.
#[derive(Debug, Clone, Copy)]
struct Job {
    gpa: u64,
    len: u64,
    file_offset: u64,
}

/// The byte runs of `buf` to write: all of it, or (skipping zero pages) its non-zero page runs.
fn runs(buf: &[u8], skip_zero: bool, out: &mut Vec<(usize, usize)>) {
    out.clear();
    if !skip_zero {
        out.push((0, buf.len()));
        return;
    }
    let mut run: Option<usize> = None;
    for (p, page) in buf.chunks(ZERO_PAGE).enumerate() {
        match (run, is_zero(page)) {
            (None, false) => run = Some(p * ZERO_PAGE),
            (Some(s), true) => {
                out.push((s, p * ZERO_PAGE));
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        out.push((s, buf.len()));
    }
}

/// Bytes of zeros, for the checksum of an all-zero block.
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// The xxh3-64 of one job, fed chunk by chunk. A job that is one all-zero chunk (most blocks of
/// a mostly idle guest's full snapshot) takes the known hash of that many zeros instead of
/// hashing them: the zero check has already read every byte.
struct JobHasher {
    hasher: Xxh3,
    len: u64,
    zero: bool,
    /// Off when the caller needs no checksum of what it writes (an in-place merge hashes whole
    /// blocks itself).
    enabled: bool,
}

impl JobHasher {
    fn new(len: u64, enabled: bool) -> Self {
        Self {
            hasher: Xxh3::new(),
            len,
            zero: false,
            enabled,
        }
    }

    /// Feed the next chunk; `all_zero` when the caller has found it all zero.
    fn update(&mut self, chunk: &[u8], all_zero: bool) {
        if !self.enabled {
            return;
        }
        if all_zero && chunk.len() as u64 == self.len {
            self.zero = true;
        } else {
            self.hasher.update(chunk);
        }
    }

    fn digest(&self) -> u64 {
        if self.zero {
            zero_hash(self.len)
        } else {
            self.hasher.digest()
        }
    }
}

/// The xxh3-64 of `len` zero bytes (`len` ≤ [`CHUNK`]).
fn zero_hash(len: u64) -> u64 {
    static WHOLE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let n = usize::try_from(len).unwrap_or(CHUNK).min(CHUNK);
    if n == CHUNK {
        *WHOLE.get_or_init(|| xxhash_rust::xxh3::xxh3_64(&ZEROS))
    } else {
        xxhash_rust::xxh3::xxh3_64(&ZEROS[..n])
    }
}

/// Copies guest memory into the memory file through bounce buffers; returns each job's xxh3 and
/// the bytes written.
struct MemoryWriter<'a> {
    file: &'a File,
    path: &'a Path,
    io: &'a dyn SnapshotIo,
    /// Whether to checksum each job (else its hash is 0).
    hash: bool,
}

/// Copy one chunk out of guest memory.
fn read_chunk(mem: &GuestMemoryMmap<AtomicBitmap>, buf: &mut [u8], gpa: u64) -> Result<(), SnapshotError> {
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|e| SnapshotError::GuestMemory(format!("reading {gpa:#x}: {e}")))
}

impl MemoryWriter<'_> {
    fn put(&self, buf: &[u8], runs: &[(usize, usize)], at: u64) -> Result<u64, SnapshotError> {
        let mut written = 0;
        for &(a, b) in runs {
            self.io
                .write_at(self.file, &buf[a..b], at + a as u64)
                .map_err(SnapshotError::io(self.path, "write"))?;
            written += (b - a) as u64;
        }
        Ok(written)
    }

    fn copy_all(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        jobs: &[Job],
        skip_zero: bool,
        progress: &mut Progress<'_>,
    ) -> Result<(Vec<u64>, u64), SnapshotError> {
        let total: u64 = jobs.iter().map(|j| j.len).sum();
        if total >= PIPELINE_MIN {
            return self.copy_pipelined(mem, jobs, skip_zero, progress);
        }
        let longest = jobs.iter().map(|j| j.len).max().unwrap_or(0);
        let mut buf = vec![0u8; usize::try_from(longest.min(CHUNK as u64)).unwrap_or(CHUNK)];
        let mut spans = Vec::new();
        let mut hashes = Vec::with_capacity(jobs.len());
        let mut written = 0;
        for job in jobs {
            let mut hasher = JobHasher::new(job.len, self.hash);
            let mut done = 0u64;
            while done < job.len {
                let n = usize::try_from((job.len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                let chunk = &mut buf[..n];
                read_chunk(mem, chunk, job.gpa + done)?;
                runs(chunk, skip_zero, &mut spans);
                hasher.update(chunk, skip_zero && spans.is_empty());
                written += self.put(chunk, &spans, job.file_offset + done)?;
                done += n as u64;
                progress(n as u64);
            }
            hashes.push(hasher.digest());
        }
        Ok((hashes, written))
    }

    /// The same as the sequential path, with the `pwrite`s on a second thread: this thread
    /// copies and hashes chunk N+1 while the writer writes chunk N. Buffers circulate through
    /// two bounded channels, so memory stays at `PIPELINE_DEPTH` chunks.
    fn copy_pipelined(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        jobs: &[Job],
        skip_zero: bool,
        progress: &mut Progress<'_>,
    ) -> Result<(Vec<u64>, u64), SnapshotError> {
        use std::sync::mpsc::sync_channel;
        type Filled = (Vec<u8>, usize, Vec<(usize, usize)>, u64);
        let (to_writer, from_reader) = sync_channel::<Filled>(PIPELINE_DEPTH);
        let (to_reader, free) = sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
        for _ in 0..PIPELINE_DEPTH {
            // Cannot fail: the channel has room for every buffer and its receiver is alive.
            let _ = to_reader.send(vec![0u8; CHUNK]);
        }
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || -> Result<u64, SnapshotError> {
                let mut written = 0;
                for (buf, n, spans, at) in from_reader {
                    written += self.put(&buf[..n], &spans, at)?;
                    // The reader may have stopped (its own error); nothing to hand back then.
                    let _ = to_reader.send(buf);
                }
                Ok(written)
            });
            let produced = (|| -> Result<Vec<u64>, SnapshotError> {
                let mut hashes = Vec::with_capacity(jobs.len());
                for job in jobs {
                    let mut hasher = JobHasher::new(job.len, self.hash);
                    let mut done = 0u64;
                    while done < job.len {
                        // A closed channel means the writer failed: its error is reported below.
                        let Ok(mut buf) = free.recv() else {
                            return Ok(hashes);
                        };
                        let n = usize::try_from((job.len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                        read_chunk(mem, &mut buf[..n], job.gpa + done)?;
                        let mut spans = Vec::new();
                        runs(&buf[..n], skip_zero, &mut spans);
                        hasher.update(&buf[..n], skip_zero && spans.is_empty());
                        if to_writer.send((buf, n, spans, job.file_offset + done)).is_err() {
                            return Ok(hashes);
                        }
                        done += n as u64;
                        progress(n as u64);
                    }
                    hashes.push(hasher.digest());
                }
                Ok(hashes)
            })();
            drop(to_writer);
            let written = writer
                .join()
                .map_err(|_| SnapshotError::GuestMemory("the snapshot writer thread panicked".into()))??;
            let hashes = produced?;
            debug_assert_eq!(hashes.len(), jobs.len());
            Ok((hashes, written))
        })
    }
}

/// Whether every byte is zero.
///
/// Why this shape: an OR of the eight words of a fixed 64-byte block is a reduction LLVM turns
/// into a few vector ORs (and a debug build takes one step per word, not per byte), and stopping
/// at the first non-zero block keeps data pages cheap (a page with data usually shows it in its
/// first block). (Assembling
/// `u64`s from single bytes, as this once did, compiles to byte loads and shifts: about 9x slower
/// on zero pages, most of the time of a full save of a mostly-empty guest.)
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    blocks.by_ref().all(|b| {
        // `chunks_exact(8)` makes every `try_into` succeed; the `unwrap_or` is never taken.
        b.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    }) && blocks.remainder().iter().all(|&b| b == 0)
}

/// Where a snapshot's two files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement<'a> {
    /// squib's layout: a new directory (which must not exist) holding `state` and `memory`. It
    /// appears by one `rename` once both files and the directory are synced.
    Dir(&'a Path),
    /// Firecracker's: a state file and a memory file at any two paths (their directories must
    /// exist). Each is written under a temporary name beside it, synced, and renamed into place,
    /// memory first and the state file last (the commit record); a file already at either path
    /// is replaced, never modified.
    Files {
        /// The state file.
        state: &'a Path,
        /// The memory file.
        memory: &'a Path,
    },
}

impl<'a> From<&'a Path> for Placement<'a> {
    fn from(dir: &'a Path) -> Self {
        Self::Dir(dir)
    }
}

impl Placement<'_> {
    /// Where the state file ends up.
    #[must_use]
    pub fn state_path(&self) -> PathBuf {
        match self {
            Self::Dir(d) => d.join(STATE_FILE),
            Self::Files { state, .. } => state.to_path_buf(),
        }
    }

    /// Where the memory file ends up.
    #[must_use]
    pub fn memory_path(&self) -> PathBuf {
        match self {
            Self::Dir(d) => d.join(MEMORY_FILE),
            Self::Files { memory, .. } => memory.to_path_buf(),
        }
    }

    /// What names the snapshot: the directory, or the state file.
    fn name(&self) -> PathBuf {
        match self {
            Self::Dir(d) => d.to_path_buf(),
            Self::Files { state, .. } => state.to_path_buf(),
        }
    }

    /// The directory the leftovers of interrupted saves would be in.
    fn sweep_dirs(&self) -> Vec<&Path> {
        match self {
            Self::Dir(d) => vec![parent_of(d)],
            Self::Files { state, memory } => {
                let (a, b) = (parent_of(state), parent_of(memory));
                if a == b { vec![a] } else { vec![a, b] }
            }
        }
    }
}

/// A diff's parent as a save needs it: its id and where its state file is now (the save records
/// that path relative to the new state file when they are near each other, else absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's id.
    pub id: SnapshotId,
    /// The parent's state file.
    pub state: PathBuf,
}

/// How a state file at `from` records `target`: the file name when both are in one directory;
/// `../DIR/NAME` when their directories are siblings (squib's chain layout); else `target`
/// made absolute. A relative record keeps working when the set is moved or copied whole.
///
/// # Errors
/// [`SnapshotError::Usage`] when a path cannot be made absolute or is not UTF-8.
pub fn record_path(from: &Path, target: &Path) -> Result<String, SnapshotError> {
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|e| SnapshotError::Usage {
            path: p.to_path_buf(),
            reason: format!("cannot be made absolute: {e}"),
        })
    };
    let (from, target) = (abs(from)?, abs(target)?);
    let (fd, td) = (from.parent(), target.parent());
    let name = target.file_name();
    let recorded = match (fd, td, name) {
        (Some(fd), Some(td), Some(name)) if fd == td => PathBuf::from(name),
        (Some(fd), Some(td), Some(name)) if fd.parent().is_some() && fd.parent() == td.parent() => {
            match td.file_name() {
                Some(sibling) => Path::new("..").join(sibling).join(name),
                None => target.clone(),
            }
        }
        _ => target.clone(),
    };
    recorded
        .into_os_string()
        .into_string()
        .map_err(|p| SnapshotError::Usage {
            path: PathBuf::from(p),
            reason: "a path a state file records must be UTF-8".into(),
        })
}

/// Write a full snapshot of `mem` at `dest`. Removes the leftovers of interrupted saves from the
/// destination's directories first ([`remove_leftovers`]).
///
/// # Errors
/// Any [`SnapshotError`]; on error nothing at the destination has changed and no temp files
/// remain.
pub fn save_full(
    dest: Placement<'_>,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
) -> Result<SavedSnapshot, SnapshotError> {
    save_full_with(dest, mem, meta, io, &mut |_| {})
}

/// [`save_full`], telling `progress` how many bytes of guest memory each step copied (the steps
/// add up to the size of guest memory).
///
/// # Errors
/// As [`save_full`].
pub fn save_full_with(
    dest: Placement<'_>,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    for d in dest.sweep_dirs() {
        remove_leftovers(d);
    }
    write_full(dest, mem, meta, io, progress)
}

/// Write a diff of `mem` holding `ranges` (the tracker's dirty ranges), chained to `parent`.
/// Removes the leftovers of interrupted saves from the destination's directories first.
///
/// # Errors
/// Any [`SnapshotError`]; on error nothing at the destination has changed and no temp files
/// remain.
pub fn save_diff(
    dest: Placement<'_>,
    parent: &ParentLink,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    ranges: &[GpaRange],
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
) -> Result<SavedSnapshot, SnapshotError> {
    for d in dest.sweep_dirs() {
        remove_leftovers(d);
    }
    write_diff(dest, parent, mem, ranges, meta, io)
}

/// Guest memory cut into the extents of a full snapshot: each region in blocks of [`CHUNK`]
/// bytes (the last block of a region may be shorter). A checksum per block, not per region, lets
/// an in-place merge rehash only the blocks a diff touched, and lets a verifier name the block.
fn full_extents(layout: &[RegionLayout]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in layout {
        let mut done = 0;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64);
            out.push((r.gpa + done, n));
            done += n;
        }
    }
    out
}

/// [`save_full`] without the sweep (a chain writer sweeps its directory once, when it opens it).
pub(crate) fn write_full(
    dest: Placement<'_>,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    let layout = layout_of(mem, &meta.geometry)?;
    let ranges = full_extents(&layout);
    write_snapshot(dest, mem, meta, layout, &ranges, None, io, progress)
}

/// [`save_diff`] without the sweep.
pub(crate) fn write_diff(
    dest: Placement<'_>,
    parent: &ParentLink,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    ranges: &[GpaRange],
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
) -> Result<SavedSnapshot, SnapshotError> {
    let layout = layout_of(mem, &meta.geometry)?;
    let ranges: Vec<(u64, u64)> = normalise(ranges, &layout, meta.geometry.granule)?
        .iter()
        .map(|r| (r.start(), r.len()))
        .collect();
    let recorded = ParentRef {
        id: parent.id,
        state: record_path(&dest.state_path(), &parent.state)?,
    };
    write_snapshot(dest, mem, meta, layout, &ranges, Some(recorded), io, &mut |_| {})
}

/// The jobs of a save: each range with its memory file offset.
fn jobs_for(layout: &[RegionLayout], ranges: &[(u64, u64)]) -> Result<Vec<Job>, SnapshotError> {
    let mut jobs = Vec::with_capacity(ranges.len());
    for &(gpa, len) in ranges {
        let region = layout
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.len)
            .ok_or(SnapshotError::BadRange {
                start: gpa,
                len,
                reason: "not inside one region of guest memory",
            })?;
        jobs.push(Job {
            gpa,
            len,
            file_offset: region.file_offset + (gpa - region.gpa),
        });
    }
    Ok(jobs)
}

/// The state file of a new snapshot, encoded.
struct NewState {
    state: SnapshotState,
    bytes: Vec<u8>,
}

fn encode_state(state: SnapshotState, path: &Path) -> Result<NewState, SnapshotError> {
    let bytes = state.encode().map_err(|source| SnapshotError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(NewState { state, bytes })
}

/// Write a snapshot with the given extents at `dest`.
#[allow(clippy::too_many_arguments)] // internal: the public entry points fill these in
fn write_snapshot(
    dest: Placement<'_>,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    layout: Vec<RegionLayout>,
    ranges: &[(u64, u64)],
    parent: Option<ParentRef>,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    let (state_dest, memory_dest) = (dest.state_path(), dest.memory_path());
    let kind = if parent.is_some() {
        SnapshotKind::Diff
    } else {
        SnapshotKind::Full
    };
    let id = new_id(&state_dest);
    let memory = record_path(&state_dest, &memory_dest)?;
    let jobs = jobs_for(&layout, ranges)?;
    let layout_bytes: u64 = layout.iter().map(|r| r.len).sum();
    // The memory file: created (never opened over an existing file), guest bytes and the trailer
    // written, not yet synced.
    let mut write_memory = |path: &Path| -> Result<(File, Vec<Extent>, u64), SnapshotError> {
        let file = File::create_new(path).map_err(SnapshotError::io(path, "create"))?;
        file.set_len(layout_bytes + MEMORY_TRAILER_LEN)
            .map_err(SnapshotError::io(path, "set length"))?;
        let w = MemoryWriter {
            file: &file,
            path,
            io,
            hash: true,
        };
        let (hashes, written) = w.copy_all(mem, &jobs, kind == SnapshotKind::Full, progress)?;
        let trailer = MemoryTrailer { id, layout_bytes }.encode();
        io.write_at(&file, &trailer, layout_bytes)
            .map_err(SnapshotError::io(path, "write"))?;
        let extents = jobs
            .iter()
            .zip(hashes)
            .map(|(j, xxh3)| Extent {
                gpa: j.gpa,
                len: j.len,
                xxh3,
            })
            .collect();
        Ok((file, extents, written + trailer.len() as u64))
    };
    let new_state = |extents: Vec<Extent>| -> Result<NewState, SnapshotError> {
        encode_state(
            SnapshotState {
                id,
                kind,
                parent: parent.clone(),
                memory: memory.clone(),
                created_unix_ms: now_ms(),
                backend: meta.backend.clone(),
                geometry: meta.geometry,
                layout: layout.clone(),
                extents,
                vcpus: meta.vcpus.clone(),
                devices: meta.devices.clone(),
            },
            &state_dest,
        )
    };
    let write_state = |path: &Path, new: &NewState| -> Result<File, SnapshotError> {
        let sf = File::create_new(path).map_err(SnapshotError::io(path, "create"))?;
        io.write_at(&sf, &new.bytes, 0)
            .map_err(SnapshotError::io(path, "write"))?;
        Ok(sf)
    };
    let saved = |new: &NewState, written: u64| SavedSnapshot {
        path: dest.name(),
        state_path: state_dest.clone(),
        memory_path: memory_dest.clone(),
        id,
        kind,
        extents: new.state.extents.len(),
        extent_bytes: new.state.extent_bytes(),
        written_bytes: written,
    };
    match dest {
        Placement::Dir(dir) => {
            if dir.symlink_metadata().is_ok() {
                return Err(SnapshotError::DestinationExists {
                    path: dir.to_path_buf(),
                });
            }
            let tmp = temp_name_for(dir, TEMP_MARK)?;
            std::fs::create_dir(&tmp).map_err(SnapshotError::io(&tmp, "create directory"))?;
            let (mem_tmp, state_tmp) = (tmp.join(MEMORY_FILE), tmp.join(STATE_FILE));
            let result = (|| {
                let (file, extents, written) = write_memory(&mem_tmp)?;
                let new = new_state(extents)?;
                let sf = write_state(&state_tmp, &new)?;
                // Both files are written before either is synced: on journalling file systems the
                // first fsync's commit then carries the second file's data too. Nothing is
                // visible before the rename, so the order of the two does not matter here.
                file.sync_all().map_err(SnapshotError::io(&mem_tmp, "fsync"))?;
                sf.sync_all().map_err(SnapshotError::io(&state_tmp, "fsync"))?;
                sync_dir(&tmp)?;
                rename_into_place(&tmp, dir, io)?;
                Ok(saved(&new, written))
            })();
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            result
        }
        Placement::Files { state, memory } => {
            if same_file(state, memory) {
                return Err(SnapshotError::Usage {
                    path: state.to_path_buf(),
                    reason: format!(
                        "the state file and the memory file ({}) must be two files",
                        memory.display()
                    ),
                });
            }
            // A file already at a path is replaced by a rename once its successor is complete;
            // a new path is written under its own name (a crash leaves a torn file there, which
            // every loader refuses: the state file by its length and CRC, the memory file by its
            // missing trailer or the absence of a state file naming it).
            let staging = |path: &Path| -> Result<Option<PathBuf>, SnapshotError> {
                if path.symlink_metadata().is_ok() {
                    temp_name_for(path, TEMP_FILE_MARK).map(Some)
                } else {
                    Ok(None)
                }
            };
            let (mem_tmp, state_tmp) = (staging(memory)?, staging(state)?);
            let mem_at = mem_tmp.clone().unwrap_or_else(|| memory.to_path_buf());
            let state_at = state_tmp.clone().unwrap_or_else(|| state.to_path_buf());
            let mut created: Vec<PathBuf> = Vec::new();
            let result = (|| {
                let (file, extents, written) = write_memory(&mem_at).inspect_err(|e| {
                    if !matches!(e, SnapshotError::Io { op: "create", .. }) {
                        created.push(mem_at.clone());
                    }
                })?;
                created.push(mem_at.clone());
                let new = new_state(extents)?;
                // The memory is durable before the state file that names it can be: a crash
                // can never leave a valid state file over memory that did not reach the disk.
                file.sync_data()
                    .map_err(SnapshotError::io(&mem_at, "fdatasync"))?;
                if mem_tmp.is_some() {
                    std::fs::rename(&mem_at, memory)
                        .map_err(SnapshotError::io(memory, "rename into place"))?;
                    created.pop();
                }
                let sf = write_state(&state_at, &new).inspect_err(|e| {
                    if !matches!(e, SnapshotError::Io { op: "create", .. }) {
                        created.push(state_at.clone());
                    }
                })?;
                created.push(state_at.clone());
                sf.sync_all().map_err(SnapshotError::io(&state_at, "fsync"))?;
                if state_tmp.is_some() {
                    std::fs::rename(&state_at, state)
                        .map_err(SnapshotError::io(state, "rename into place"))?;
                }
                created.clear();
                // The names: both directories (once when they are one).
                sync_dirs(state, memory)?;
                Ok(saved(&new, written))
            })();
            if result.is_err() {
                for p in &created {
                    let _ = std::fs::remove_file(p);
                }
            }
            result
        }
    }
}

/// Whether two paths name one file (the same path, or the same existing inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if std::path::absolute(a).ok() == std::path::absolute(b).ok() {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// fsync the directories holding `a` and `b` (once when they are one).
fn sync_dirs(a: &Path, b: &Path) -> Result<(), SnapshotError> {
    let (da, db) = (parent_of(a), parent_of(b));
    sync_dir(da)?;
    let same = da == db
        || matches!((std::fs::canonicalize(da), std::fs::canonicalize(db)), (Ok(x), Ok(y)) if x == y);
    if !same {
        sync_dir(db)?;
    }
    Ok(())
}

/// Merge a diff into its full parent's memory file in place, as Firecracker users do by naming
/// the base's memory file as a diff's `mem_file_path`: the dirty `ranges` of `mem` are written
/// into `base`'s memory file, and a new **full** snapshot whose memory is that file is written at
/// `state` (a state file already there is replaced). `base` must be a full snapshot whose memory
/// file still holds its memory, and `mem` must be the guest it was taken of (or loaded into),
/// paused, with `ranges` everything written since. On success `base` describes the merged
/// snapshot (so a caller merging again need not read the state file back).
///
/// Writing into the base cannot be atomic, so the order makes every crash safe to load from:
/// 1. everything that can fail without touching the base first: the base is full, its memory
///    file still carries its id (on the descriptor the writes use), the layouts match;
/// 2. the memory file's identity trailer is rewritten to the new snapshot's id and synced
///    (`fdatasync`) **before** any guest byte is written: from here on the base's state file is
///    refused by name, whatever else reaches the disk;
/// 3. the dirty ranges are written and synced (meanwhile a second thread rehashes, from `mem`,
///    the blocks of the base's extents that a range touches; the others' checksums carry over);
/// 4. the new state file is written under a temporary name, synced, renamed into place, and its
///    directory synced.
///
/// A crash after 2 leaves a memory file that no state file describes (the old one is refused,
/// the new one does not exist yet): the base is lost, as the caller asked it to be overwritten,
/// but nothing loads wrong. A failure after 2 is [`SnapshotError::InPlaceMerge`].
///
/// # Errors
/// [`SnapshotError::Usage`] when `base` is not a full snapshot whose memory file still holds its
/// memory, a layout mismatch, or any I/O error.
pub fn merge_in_place(
    state: &Path,
    base: &mut LoadedSnapshot,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    ranges: &[GpaRange],
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
) -> Result<SavedSnapshot, SnapshotError> {
    let mem_path = &base.memory_path;
    if base.state.kind != SnapshotKind::Full {
        return Err(SnapshotError::Usage {
            path: mem_path.clone(),
            reason: format!(
                "is the memory file of the diff {}; a diff merges in place only into a full snapshot's memory file",
                base.state_path.display()
            ),
        });
    }
    let layout = layout_of(mem, &meta.geometry)?;
    if layout != base.state.layout || meta.geometry != base.state.geometry {
        return Err(SnapshotError::Incompatible {
            path: base.state_path.clone(),
            what: "memory layout",
            expected: format!("{layout:?}"),
            found: format!("{:?}", base.state.layout),
        });
    }
    if same_file(state, mem_path) {
        return Err(SnapshotError::Usage {
            path: state.to_path_buf(),
            reason: format!(
                "is the memory file {}; name another state file",
                mem_path.display()
            ),
        });
    }
    remove_leftovers(parent_of(state));
    let dirty = normalise(ranges, &layout, meta.geometry.granule)?;
    let id = new_id(state);
    let memory = record_path(state, mem_path)?;
    // The file must still hold the base (checked on this descriptor, which the writes use).
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(mem_path)
        .map_err(SnapshotError::io(mem_path, "open for writing"))?;
    let len = file
        .metadata()
        .map_err(SnapshotError::io(mem_path, "stat"))?
        .len();
    let layout_bytes = base.state.layout_bytes();
    if len != base.state.memory_file_len() {
        return Err(SnapshotError::MemoryFileLength {
            path: mem_path.clone(),
            expected: base.state.memory_file_len(),
            actual: len,
            reason: "not the size of its layout and identity trailer",
        });
    }
    let held = super::load::read_trailer(&file, mem_path, layout_bytes)?;
    if held.id != base.state.id {
        return Err(SnapshotError::MemoryMismatch {
            path: mem_path.clone(),
            state: base.state_path.clone(),
            found: held.id,
            expected: base.state.id,
        });
    }
    let jobs = jobs_for(
        &layout,
        &dirty.iter().map(|r| (r.start(), r.len())).collect::<Vec<_>>(),
    )?;
    let changed = |source: SnapshotError| SnapshotError::InPlaceMerge {
        path: mem_path.clone(),
        source: Box::new(source),
    };
    // The checksums of the blocks the diff touches are computed from guest memory (paused: it is
    // what the file will hold) on a second thread while this one waits for the disk; the other
    // blocks' checksums carry over.
    let (new, written) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| -> Result<Vec<Extent>, SnapshotError> {
            let mut extents = base.state.extents.clone();
            let mut buf = vec![0u8; CHUNK];
            let mut d = 0;
            for e in &mut extents {
                while d < dirty.len() && dirty[d].end() <= e.gpa {
                    d += 1;
                }
                if d < dirty.len() && dirty[d].start() < e.gpa + e.len {
                    e.xxh3 = hash_guest(mem, e.gpa, e.len, &mut buf)?;
                }
            }
            Ok(extents)
        });
        // 2. Restamp and sync: the old state file no longer matches, whatever reaches the disk
        // next.
        let written = (|| {
            io.write_at(&file, &MemoryTrailer { id, layout_bytes }.encode(), layout_bytes)
                .map_err(SnapshotError::io(mem_path, "write identity trailer"))?;
            file.sync_data()
                .map_err(SnapshotError::io(mem_path, "fdatasync"))
                .map_err(changed)?;
            // 3. The dirty ranges, in place (zero pages too: the base may hold data there).
            let w = MemoryWriter {
                file: &file,
                path: mem_path,
                io,
                hash: false,
            };
            let (_, written) = w.copy_all(mem, &jobs, false, &mut |_| {}).map_err(changed)?;
            file.sync_data()
                .map_err(SnapshotError::io(mem_path, "fdatasync"))
                .map_err(changed)?;
            Ok::<u64, SnapshotError>(written)
        })();
        let extents = hashing
            .join()
            .map_err(|_| SnapshotError::GuestMemory("the hashing thread panicked".into()))?;
        let written = written?;
        let new = encode_state(
            SnapshotState {
                id,
                kind: SnapshotKind::Full,
                parent: None,
                memory,
                created_unix_ms: now_ms(),
                backend: meta.backend.clone(),
                geometry: meta.geometry,
                layout,
                extents: extents.map_err(changed)?,
                vcpus: meta.vcpus.clone(),
                devices: meta.devices.clone(),
            },
            state,
        )
        .map_err(changed)?;
        Ok::<_, SnapshotError>((new, written))
    })?;
    // 4. The new state file: the commit record. Under its own name when the path is new (a
    // torn one is refused by its length and CRC), else beside it and renamed over the old one.
    let tmp = if state.symlink_metadata().is_ok() {
        Some(temp_name_for(state, TEMP_FILE_MARK).map_err(changed)?)
    } else {
        None
    };
    let at = tmp.clone().unwrap_or_else(|| state.to_path_buf());
    let mut made = false;
    let committed = (|| {
        let sf = File::create_new(&at).map_err(SnapshotError::io(&at, "create"))?;
        made = true;
        io.write_at(&sf, &new.bytes, 0)
            .map_err(SnapshotError::io(&at, "write"))?;
        sf.sync_all().map_err(SnapshotError::io(&at, "fsync"))?;
        if tmp.is_some() {
            std::fs::rename(&at, state).map_err(SnapshotError::io(state, "rename into place"))?;
        }
        made = false;
        sync_dir(parent_of(state))
    })();
    if let Err(e) = committed {
        if made {
            let _ = std::fs::remove_file(&at);
        }
        return Err(changed(e));
    }
    let saved = SavedSnapshot {
        path: state.to_path_buf(),
        state_path: state.to_path_buf(),
        memory_path: mem_path.clone(),
        id,
        kind: SnapshotKind::Full,
        extents: new.state.extents.len(),
        extent_bytes: new.state.extent_bytes(),
        written_bytes: written,
    };
    // `base` now describes the merge, ready for the next one.
    base.path = state.to_path_buf();
    base.state_path = state.to_path_buf();
    base.state = new.state;
    Ok(saved)
}

/// xxh3-64 of `len` bytes of guest memory at `gpa`, copied out in chunks through `buf`.
fn hash_guest(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    gpa: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u64, SnapshotError> {
    let mut hasher = Xxh3::new();
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
        read_chunk(mem, &mut buf[..n], gpa + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hasher.digest())
}

/// What marks a temp directory as squib's: `.<name>.squib-tmp-<pid>-<n>@<host>`.
const TEMP_MARK: &str = ".squib-tmp-";
/// What marks a temp file (a state or memory file written beside its final path) as squib's:
/// `.<name>.squib-tmpfile-<pid>-<n>@<host>`.
const TEMP_FILE_MARK: &str = ".squib-tmpfile-";

/// This host's name as it appears in temp names: the node name, with anything but ASCII letters,
/// digits, `.`, `_` and `-` replaced by `_` (never `@`, which ends the process part).
fn host_tag() -> String {
    let uname = rustix::system::uname();
    let name: String = uname
        .nodename()
        .to_string_lossy()
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() { "host".into() } else { name }
}

/// A hidden temp name beside `dest`: same file system, so the rename is atomic. Its name
/// (`.<name><mark><pid>-<n>@<host>`) says which process of which host made it, so a later save
/// can tell an abandoned one from one in progress.
fn temp_name_for(dest: &Path, mark: &str) -> Result<PathBuf, SnapshotError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().ok_or_else(|| SnapshotError::Usage {
        path: dest.to_path_buf(),
        reason: "destination has no file name".into(),
    })?;
    let tmp_name = format!(
        ".{}{mark}{}-{}@{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        host_tag()
    );
    Ok(dest.with_file_name(tmp_name))
}

/// The process id and host of a name [`temp_name_for`] makes with `mark`, or `None` for any
/// other name.
fn parse_temp_name<'a>(name: &'a str, mark: &str) -> Option<(u32, &'a str)> {
    let (front, host) = name.rsplit_once('@')?;
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let (front, counter) = front.rsplit_once('-')?;
    let (front, pid) = front.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let dest = front
        .strip_prefix('.')?
        .strip_suffix(mark.trim_end_matches('-'))?;
    if !valid_host || !digits(counter) || dest.is_empty() {
        return None;
    }
    Some((pid.parse().ok().filter(|_| digits(pid))?, host))
}

/// Whether process `pid` of this host still exists (an existing process we may not signal
/// counts as running).
fn process_running(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return true;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// Whether `dir` is a real directory holding nothing but what a save writes (regular `state` and
/// `memory` files).
fn holds_only_snapshot_files(dir: &Path) -> bool {
    let Ok(md) = dir.symlink_metadata() else {
        return false;
    };
    if !md.is_dir() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|e| {
        e.is_ok_and(|e| {
            (e.file_name() == MEMORY_FILE || e.file_name() == STATE_FILE)
                && e.file_type().is_ok_and(|t| t.is_file())
        })
    })
}

/// Remove what interrupted saves left in `dir`: directories named as a save names its temp
/// directory (`.<name>.squib-tmp-<pid>-<n>@<host>`) holding nothing but `state` and `memory`
/// files, and regular files named as a save names its temp files
/// (`.<name>.squib-tmpfile-<pid>-<n>@<host>`), each made on this host by a process that no
/// longer exists. Anything else is left alone: a user's file
/// or directory with a similar name, a temp directory of a save still running (in this process
/// or another), one from another host sharing the directory (its process cannot be checked from
/// here). Best effort: a leftover that cannot be removed is logged, not an error of the save.
/// Returns how many were removed.
pub fn remove_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let (me, host) = (std::process::id(), host_tag());
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let (found, is_dir) = match parse_temp_name(name, TEMP_MARK) {
            Some(f) => (f, true),
            None => match parse_temp_name(name, TEMP_FILE_MARK) {
                Some(f) => (f, false),
                None => continue,
            },
        };
        let (pid, from) = found;
        if from != host || pid == me || process_running(pid) {
            continue;
        }
        let path = entry.path();
        let done = if is_dir {
            if !holds_only_snapshot_files(&path) {
                continue;
            }
            std::fs::remove_dir_all(&path)
        } else {
            // A temp file is a regular file (a state or memory file being written).
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            std::fs::remove_file(&path)
        };
        match done {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %path.display(), pid, "removed what an interrupted save left");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove what an interrupted save left");
            }
        }
    }
    removed
}

/// The directory `dest` is in (`.` for a bare name).
pub(crate) fn parent_of(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether a `renameat2` error means the flag is not supported here (rather than a real failure).
fn noreplace_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Move the finished temp directory `tmp` to `dest` without ever replacing a snapshot, then
/// fsync the parent directory.
///
/// First choice: `renameat2(RENAME_NOREPLACE)`, which fails with `EEXIST` if anything is at
/// `dest`. Where the file system does not support the flag (`EINVAL` on NFS and older overlayfs,
/// `ENOSYS` on old kernels), a plain `rename(2)` takes its place. That is still safe, because of
/// what `rename` does with a *directory*: it replaces an existing `dest` only when `dest` is an
/// empty directory; a non-empty directory fails with `ENOTEMPTY` or `EEXIST`, and a file or
/// symlink with `ENOTDIR` (POSIX; Linux and NFS servers follow it). A snapshot directory always
/// holds its `state` file (the temp directory is renamed only after both files are written and
/// synced), so no snapshot can be replaced: at worst an empty directory created at `dest` between
/// the existence check and the rename is, which held nothing. The rename itself is one atomic
/// operation (on NFS, one server-side operation), so a reader sees either no `dest` or the whole
/// synced snapshot, exactly as with the flag. (A `link` + `unlink` pair, the usual fallback for
/// files, does not apply: directories cannot be hard-linked.)
fn rename_into_place(tmp: &Path, dest: &Path, io: &dyn SnapshotIo) -> Result<(), SnapshotError> {
    let exists = || SnapshotError::DestinationExists {
        path: dest.to_path_buf(),
    };
    match io.rename_noreplace(tmp, dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
        Err(e) if noreplace_unsupported(&e) => {
            tracing::debug!(dest = %dest.display(), error = %e, "RENAME_NOREPLACE unsupported here: plain rename of the directory");
            if let Err(e) = std::fs::rename(tmp, dest) {
                let occupied = matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR | libc::EISDIR)
                );
                return Err(if occupied && dest.symlink_metadata().is_ok() {
                    exists()
                } else {
                    SnapshotError::Io {
                        path: dest.to_path_buf(),
                        op: "rename into place",
                        source: e,
                    }
                });
            }
        }
        Err(e) => {
            return Err(SnapshotError::Io {
                path: dest.to_path_buf(),
                op: "rename into place",
                source: e,
            });
        }
    }
    sync_dir(parent_of(dest))
}

/// fsync a directory.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn test_should_find_a_single_non_zero_byte_anywhere_in_a_page_or_its_tail() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4096 + 7] {
            let mut page = vec![0u8; len];
            assert!(is_zero(&page), "all-zero {len} bytes");
            for at in 0..len {
                page[at] = 0x80;
                assert!(!is_zero(&page), "byte {at} of {len} set");
                page[at] = 0;
            }
        }
    }

    #[test]
    fn test_should_find_a_single_set_bit_anywhere_in_a_page() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(is_zero(&page));
        for at in [0, 7, 63, 64, 575, 576, 4095, 4098] {
            page[at] = 0x80;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
