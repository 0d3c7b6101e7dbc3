//! Writing one snapshot directory atomically.
//!
//! Why the bounce buffer: a live checkpoint copies guest memory while vCPUs run (the tracker has
//! re-protected the pages, but the guest may fault them writable again and write during the
//! copy). Each chunk is copied once out of guest memory, and that one copy is both hashed and
//! written, so the recorded xxh3 always matches the bytes on disk; a page the guest tears during
//! the copy is dirty again and lands in the next diff. The chunk (256 KiB) stays in cache between
//! the copy, the hash and the `pwrite`.
//!
//! Why temp-then-rename: the directory appears under its final name by one `rename` after both
//! files and the directory itself are synced, and the parent directory is synced after the
//! rename. Any failure before that removes the temp directory, so the destination is untouched.
//! Where the file system lacks `RENAME_NOREPLACE` (NFS, older overlayfs), a plain `rename` takes
//! its place; `rename_into_place` says why that still never replaces a snapshot.
//!
//! Why leftovers are swept: a process killed mid-save leaves its temp directory behind. Its name
//! says which host and process made it, so the next save into the same directory removes the
//! temp directories of processes of this host that no longer run, and nothing else: see
//! [`remove_leftovers`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use squib_arch::{GpaRange, PageGeometry};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3;

use super::format::{Extent, ParentRef, RegionLayout, Section, SnapshotId, SnapshotKind, SnapshotState};
use super::io::SnapshotIo;
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
    /// The snapshot directory.
    pub dir: PathBuf,
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

/// Copies guest memory into the memory file through bounce buffers; returns each job's xxh3 and
/// the bytes written.
struct MemoryWriter<'a> {
    file: &'a File,
    path: &'a Path,
    io: &'a dyn SnapshotIo,
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
            let mut hasher = Xxh3::new();
            let mut done = 0u64;
            while done < job.len {
                let n = usize::try_from((job.len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                let chunk = &mut buf[..n];
                read_chunk(mem, chunk, job.gpa + done)?;
                hasher.update(chunk);
                runs(chunk, skip_zero, &mut spans);
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
                    let mut hasher = Xxh3::new();
                    let mut done = 0u64;
                    while done < job.len {
                        // A closed channel means the writer failed: its error is reported below.
                        let Ok(mut buf) = free.recv() else {
                            return Ok(hashes);
                        };
                        let n = usize::try_from((job.len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                        read_chunk(mem, &mut buf[..n], job.gpa + done)?;
                        hasher.update(&buf[..n]);
                        let mut spans = Vec::new();
                        runs(&buf[..n], skip_zero, &mut spans);
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

/// Write a full snapshot of `mem` to `dest` (which must not exist). Removes the leftovers of
/// interrupted saves from `dest`'s directory first ([`remove_leftovers`]).
///
/// # Errors
/// Any [`SnapshotError`]; on error nothing exists at `dest` and no temp files remain.
pub fn save_full(
    dest: &Path,
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
    dest: &Path,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    remove_leftovers(parent_of(dest));
    write_full(dest, mem, meta, io, progress)
}

/// Write a diff of `mem` holding `ranges` (the tracker's dirty ranges), chained to `parent`.
/// Removes the leftovers of interrupted saves from `dest`'s directory first.
///
/// # Errors
/// Any [`SnapshotError`]; on error nothing exists at `dest` and no temp files remain.
pub fn save_diff(
    dest: &Path,
    parent: ParentRef,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    ranges: &[GpaRange],
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
) -> Result<SavedSnapshot, SnapshotError> {
    remove_leftovers(parent_of(dest));
    write_diff(dest, parent, mem, ranges, meta, io)
}

/// [`save_full`] without the sweep (a chain writer sweeps its directory once, when it opens it).
pub(crate) fn write_full(
    dest: &Path,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    let layout = layout_of(mem, &meta.geometry)?;
    let ranges: Vec<(u64, u64)> = layout.iter().map(|r| (r.gpa, r.len)).collect();
    write_snapshot(dest, mem, meta, layout, &ranges, None, io, progress)
}

/// [`save_diff`] without the sweep.
pub(crate) fn write_diff(
    dest: &Path,
    parent: ParentRef,
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
    write_snapshot(dest, mem, meta, layout, &ranges, Some(parent), io, &mut |_| {})
}

/// Write a snapshot with the given extents through a temp directory and rename it into place.
#[allow(clippy::too_many_arguments)] // internal: the two public entry points fill these in
fn write_snapshot(
    dest: &Path,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    meta: &SnapshotMeta,
    layout: Vec<RegionLayout>,
    ranges: &[(u64, u64)],
    parent: Option<ParentRef>,
    io: &dyn SnapshotIo,
    progress: &mut Progress<'_>,
) -> Result<SavedSnapshot, SnapshotError> {
    if dest.symlink_metadata().is_ok() {
        return Err(SnapshotError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let id = new_id(dest);
    let tmp = temp_dir_for(dest)?;
    std::fs::create_dir(&tmp).map_err(SnapshotError::io(&tmp, "create directory"))?;
    let result = (|| {
        let kind = if parent.is_some() {
            SnapshotKind::Diff
        } else {
            SnapshotKind::Full
        };
        let mem_path = tmp.join(MEMORY_FILE);
        let file = File::create_new(&mem_path).map_err(SnapshotError::io(&mem_path, "create"))?;
        let total: u64 = layout.iter().map(|r| r.len).sum();
        file.set_len(total)
            .map_err(SnapshotError::io(&mem_path, "set length"))?;
        let w = MemoryWriter {
            file: &file,
            path: &mem_path,
            io,
        };
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
        let (hashes, written) = w.copy_all(mem, &jobs, kind == SnapshotKind::Full, progress)?;
        let extents: Vec<Extent> = jobs
            .iter()
            .zip(hashes)
            .map(|(j, xxh3)| Extent {
                gpa: j.gpa,
                len: j.len,
                xxh3,
            })
            .collect();
        let state = SnapshotState {
            id,
            kind,
            parent,
            created_unix_ms: now_ms(),
            backend: meta.backend.clone(),
            geometry: meta.geometry,
            layout,
            extents,
            vcpus: meta.vcpus.clone(),
            devices: meta.devices.clone(),
        };
        let state_path = tmp.join(STATE_FILE);
        let bytes = state.encode().map_err(|source| SnapshotError::Format {
            path: state_path.clone(),
            source,
        })?;
        let sf = File::create_new(&state_path).map_err(SnapshotError::io(&state_path, "create"))?;
        io.write_at(&sf, &bytes, 0)
            .map_err(SnapshotError::io(&state_path, "write"))?;
        // Both files are written before either is synced: on journalling file systems the first
        // fsync's commit then carries the second file's data too, and the later ones are cheap.
        file.sync_all().map_err(SnapshotError::io(&mem_path, "fsync"))?;
        sf.sync_all().map_err(SnapshotError::io(&state_path, "fsync"))?;
        sync_dir(&tmp)?;
        Ok(SavedSnapshot {
            dir: dest.to_path_buf(),
            id,
            kind,
            extents: state.extents.len(),
            extent_bytes: state.extent_bytes(),
            written_bytes: written,
        })
    })();
    match result {
        Ok(saved) => {
            if let Err(e) = rename_into_place(&tmp, dest, io) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            Ok(saved)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// What marks a temp directory as squib's: `.<name>.squib-tmp-<pid>-<n>@<host>`.
const TEMP_MARK: &str = ".squib-tmp-";

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

/// A hidden temp directory beside `dest`: same file system, so the rename is atomic. Its name
/// (`.<name>.squib-tmp-<pid>-<n>@<host>`) says which process of which host made it, so a later
/// save can tell an abandoned one from one in progress.
fn temp_dir_for(dest: &Path) -> Result<PathBuf, SnapshotError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().ok_or_else(|| SnapshotError::Usage {
        path: dest.to_path_buf(),
        reason: "destination has no directory name".into(),
    })?;
    let tmp_name = format!(
        ".{}{TEMP_MARK}{}-{}@{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        host_tag()
    );
    Ok(dest.with_file_name(tmp_name))
}

/// The process id and host of a name [`temp_dir_for`] makes, or `None` for any other name.
fn parse_temp_name(name: &str) -> Option<(u32, &str)> {
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
        .strip_suffix(TEMP_MARK.trim_end_matches('-'))?;
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
/// directory (`.<name>.squib-tmp-<pid>-<n>@<host>`), made on this host by a process that no
/// longer exists, and holding nothing but `state` and `memory` files. Anything else is left alone: a user's file
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
        let Some((pid, from)) = name.to_str().and_then(parse_temp_name) else {
            continue;
        };
        if from != host || pid == me || process_running(pid) {
            continue;
        }
        let path = entry.path();
        if !holds_only_snapshot_files(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %path.display(), pid, "removed the temp directory of an interrupted save");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the temp directory of an interrupted save");
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
