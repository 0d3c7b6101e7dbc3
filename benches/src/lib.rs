//! Shared fixtures for squib's criterion benches; the benches themselves are in `benches/`.
#![deny(missing_docs)]

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::{BackendError, Stage2Backend};

/// A backend whose protect and grant calls do nothing, so a bench measures only the core.
#[derive(Debug, Clone, Copy)]
pub struct NopBackend(pub PageGeometry);

impl Stage2Backend for NopBackend {
    fn geometry(&self) -> PageGeometry {
        self.0
    }
    fn write_protect(&self, _: GpaRange) -> Result<(), BackendError> {
        Ok(())
    }
    fn grant_write(&self, range: GpaRange) -> Result<(), BackendError> {
        std::hint::black_box(range);
        Ok(())
    }
}

/// `n` distinct pseudo-random indices below `below`, sorted (a fixed sequence: benches compare
/// runs).
#[must_use]
pub fn scattered(n: u64, below: u64) -> Vec<u64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < n.min(below) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % below);
    }
    set.into_iter().collect()
}

/// A temporary directory for snapshot benches, under `SQUIB_BENCH_DIR` (default: the system temp
/// dir; point it at a tmpfs to measure CPU overhead without the disk).
///
/// # Panics
/// If the directory cannot be created.
#[must_use]
pub fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("SQUIB_BENCH_DIR").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    tempfile::tempdir_in(base).expect("bench dir")
}

/// The bare baseline of a diff save: create `path`, size it to `size`, write each range of `mem`
/// at its own offset straight from guest memory (one write per range, no copy, no checksum), and
/// `fsync`.
///
/// # Panics
/// On any I/O error (a bench cannot go on).
pub fn raw_pwrite(
    path: &std::path::Path,
    mem: &vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>,
    ranges: &[GpaRange],
    size: u64,
) {
    use std::io::{Seek, SeekFrom};
    use vm_memory::{GuestAddress, GuestMemoryBackend, WriteVolatile};
    let mut f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    for r in ranges {
        let s = mem
            .get_slice(GuestAddress(r.start()), usize::try_from(r.len()).expect("fits"))
            .expect("slice");
        f.seek(SeekFrom::Start(r.start())).expect("seek");
        f.write_all_volatile(&s).expect("pwrite");
    }
    f.sync_all().expect("fsync");
}
