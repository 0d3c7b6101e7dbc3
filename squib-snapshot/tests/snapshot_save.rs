//! Saving: atomic directories, failures (ENOSPC included) that leave nothing behind, and the
//! tracker folding its drained units back when the writer fails.

mod common;
mod snapshot_support;

use std::sync::Arc;

use common::Recorder;
use snapshot_support::{FailingIo, contents, fill, fill_all, listing, memory, meta, regions};
use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::{ChainWriter, RestoreMode, SnapshotError};
use squib_snapshot::{CheckpointError, DirtyTracker, Policy, TrackingConfig};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn test_should_leave_nothing_behind_when_a_full_save_runs_out_of_space_at_any_point() {
    let mem = memory(&regions());
    fill_all(&mem, 9);
    let meta = meta();
    // Budgets: before anything, mid memory file, just before the state file.
    for budget in [0, 1, 3 << 20, (6 << 20) - 1, 6 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let mut chain = ChainWriter::create(dir.path())
            .unwrap()
            .with_io(Box::new(FailingIo::new(budget, libc::ENOSPC)));
        let before = listing(dir.path());
        let err = chain.save(&mem, &[], &meta).unwrap_err();
        let msg = squib_snapshot::report::error_chain(&err);
        assert!(
            matches!(&err, SnapshotError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "budget {budget}: {msg}"
        );
        assert!(msg.contains("No space left"), "{msg}");
        assert!(
            msg.contains(".000000-full.squib-tmp-"),
            "error names the file written: {msg}"
        );
        assert_eq!(
            listing(dir.path()),
            before,
            "budget {budget}: a failed save left files"
        );
        assert!(chain.leaf().is_none());
    }
}

#[test]
fn test_should_keep_the_previous_snapshot_intact_when_a_diff_save_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill(&mem, 0x4000, 0x4000, 1);
    let io = FailingIo::new(i64::MAX, libc::ENOSPC);
    let mut chain = ChainWriter::create(dir.path())
        .unwrap()
        .with_io(Box::new(io.clone()));
    let full = chain.save(&mem, &[], &meta()).unwrap();
    let before = listing(dir.path());
    let at_full = contents(&mem);
    fill(&mem, 0x4000, 0x1000, 2);
    io.budget.store(100, std::sync::atomic::Ordering::SeqCst);
    let ranges = [GpaRange::new(0x4000, 0x1000).unwrap()];
    chain.save(&mem, &ranges, &meta()).unwrap_err();
    assert_eq!(listing(dir.path()), before);
    assert_eq!(chain.leaf(), Some(full.path.clone()));
    let restored = restore(&full.path, RestoreMode::Eager).unwrap();
    assert_eq!(contents(&restored.memory), at_full);
    // Space again: the next diff takes the failed one's place in the sequence.
    io.budget.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
    let d = chain.save(&mem, &ranges, &meta()).unwrap();
    assert!(d.path.ends_with("000001-diff"), "{}", d.path.display());
    assert_eq!(
        contents(&restore(&d.path, RestoreMode::Eager).unwrap().memory),
        contents(&mem)
    );
}

#[test]
fn test_should_fold_drained_units_back_when_the_snapshot_writer_fails() {
    let dir = tempfile::tempdir().unwrap();
    let regions = regions();
    let mem = memory(&regions);
    let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &regions));
    let tracker = DirtyTracker::new(Arc::clone(&rec), &regions, TrackingConfig::new(Policy::Fine)).unwrap();
    tracker.start().unwrap();
    let io = FailingIo::new(i64::MAX, libc::ENOSPC);
    let mut chain = ChainWriter::create(dir.path())
        .unwrap()
        .with_io(Box::new(io.clone()));
    let meta = meta();
    tracker
        .checkpoint(Some(&mem), |r| chain.save(&mem, r, &meta).map(drop))
        .unwrap();
    let guest_write = |gpa: u64, len: u64, byte: u8| {
        rec.guest_write(&tracker, gpa, len, 0).unwrap();
        mem.write_slice(&vec![byte; usize::try_from(len).unwrap()], GuestAddress(gpa))
            .unwrap();
    };
    guest_write(0x3000, 0x2000, 0xAA);
    guest_write((1 << 30) + 0x1000, 0x10, 0xBB);
    io.budget.store(0, std::sync::atomic::Ordering::SeqCst);
    let err = tracker
        .checkpoint(None, |r| chain.save(&mem, r, &meta).map(drop))
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::Writer(SnapshotError::Io { .. })),
        "{err}"
    );
    io.budget.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
    guest_write(0x10_0000, 0x1000, 0xCC);
    tracker
        .checkpoint(None, |r| chain.save(&mem, r, &meta).map(drop))
        .unwrap();
    let leaf = chain.leaf().unwrap();
    assert!(leaf.ends_with("000001-diff"));
    // The diff written after the failure still holds the failed epoch's writes.
    assert_eq!(
        contents(&restore(&leaf, RestoreMode::Eager).unwrap().memory),
        contents(&mem)
    );
}

#[test]
fn test_should_refuse_to_overwrite_an_existing_snapshot_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    std::fs::create_dir(dir.path().join("000000-full")).unwrap();
    let err = ChainWriter::create(dir.path()).unwrap_err().to_string();
    assert!(err.contains("already holds snapshot 000000-full"), "{err}");
    let dest = dir.path().join("x");
    std::fs::create_dir(&dest).unwrap();
    let err = squib_snapshot::snapshot::save::save_full(
        squib_snapshot::snapshot::Placement::Dir(&dest),
        &mem,
        &meta(),
        &squib_snapshot::snapshot::DirectIo,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("destination already exists"), "{err}");
}

/// A real ENOSPC from a tiny tmpfs, where mounting is permitted (root in a namespace that allows
/// it); skipped with a printed reason elsewhere.
#[test]
fn test_should_leave_nothing_behind_on_a_full_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here (needs root and mount permission)");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let mem = memory(&regions());
        fill_all(&mem, 3);
        let mut chain = ChainWriter::create(&mnt.join("snaps")).unwrap();
        let before = listing(&mnt);
        let err = chain.save(&mem, &[], &meta()).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{err}"
        );
        assert_eq!(listing(&mnt), before);
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Saves of 16 MiB and more copy and write on two threads; a failure on the writing thread
/// must still leave nothing behind, and a success must restore byte for byte.
#[test]
fn test_should_fail_cleanly_and_succeed_exactly_on_the_two_thread_path() {
    use squib_snapshot::snapshot::save::PIPELINE_MIN;
    let regions = [
        GpaRange::new(0, PIPELINE_MIN).unwrap(),
        GpaRange::new(1 << 32, 8 << 20).unwrap(),
    ];
    let mem = memory(&regions);
    fill_all(&mem, 5);
    // A zero hole in the middle, so the written runs are split.
    mem.write_slice(&vec![0u8; 1 << 20], GuestAddress(3 << 20))
        .unwrap();
    let total = i64::try_from(PIPELINE_MIN + (8 << 20)).unwrap();
    for budget in [0, 5 << 20, total - (1 << 20) - 1] {
        let dir = tempfile::tempdir().unwrap();
        let mut chain = ChainWriter::create(dir.path())
            .unwrap()
            .with_io(Box::new(FailingIo::new(budget, libc::ENOSPC)));
        let before = listing(dir.path());
        let err = chain.save(&mem, &[], &meta()).unwrap_err();
        let msg = squib_snapshot::report::error_chain(&err);
        assert!(msg.contains("No space left"), "budget {budget}: {msg}");
        assert_eq!(listing(dir.path()), before, "budget {budget}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut chain = ChainWriter::create(dir.path()).unwrap();
    let full = chain.save(&mem, &[], &meta()).unwrap();
    // Everything but the zero hole, and the 48 bytes of the identity trailer.
    assert_eq!(full.written_bytes, u64::try_from(total).unwrap() - (1 << 20) + 48);
    let restored = restore(&full.path, RestoreMode::Eager).unwrap();
    assert_eq!(contents(&restored.memory), contents(&mem));
}

/// A file system without `RENAME_NOREPLACE` (NFS, older overlayfs): the flag fails with EINVAL.
/// `before_refusing` runs first, standing in for another writer that gets there in between.
struct NoRenameFlag {
    before_refusing: Box<dyn Fn(&std::path::Path) + Send + Sync>,
    calls: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for NoRenameFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoRenameFlag")
    }
}

impl squib_snapshot::snapshot::SnapshotIo for NoRenameFlag {
    fn write_at(&self, file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }

    fn rename_noreplace(&self, _: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (self.before_refusing)(to);
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

fn no_rename_flag(f: impl Fn(&std::path::Path) + Send + Sync + 'static) -> NoRenameFlag {
    NoRenameFlag {
        before_refusing: Box::new(f),
        calls: std::sync::atomic::AtomicU32::new(0),
    }
}

/// Names in `dir` that are squib temp directories.
fn temp_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".squib-tmp-"))
        .collect()
}

#[test]
fn test_should_save_where_rename_noreplace_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 4);
    let io = no_rename_flag(|_: &std::path::Path| {});
    let dest = dir.path().join("snap");
    let saved = squib_snapshot::snapshot::save::save_full(
        squib_snapshot::snapshot::Placement::Dir(&dest),
        &mem,
        &meta(),
        &io,
    )
    .unwrap();
    assert_eq!(
        io.calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the flag was tried first"
    );
    assert_eq!(saved.path, dest);
    assert_eq!(
        contents(&restore(&dest, RestoreMode::Eager).unwrap().memory),
        contents(&mem)
    );
    assert!(temp_names(dir.path()).is_empty());
    // And a chain through the same file system.
    let chain_dir = dir.path().join("chain");
    let mut chain = ChainWriter::create(&chain_dir)
        .unwrap()
        .with_io(Box::new(no_rename_flag(|_: &std::path::Path| {})));
    chain.save(&mem, &[], &meta()).unwrap();
    fill(&mem, 0x2000, 0x1000, 7);
    let leaf = chain
        .save(&mem, &[GpaRange::new(0x2000, 0x1000).unwrap()], &meta())
        .unwrap();
    assert_eq!(
        contents(&restore(&leaf.path, RestoreMode::Eager).unwrap().memory),
        contents(&mem)
    );
}

#[test]
fn test_should_never_replace_a_snapshot_that_appears_while_falling_back_to_a_plain_rename() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = memory(&regions());
    fill_all(&theirs, 1);
    let ours = memory(&regions());
    fill_all(&ours, 2);
    let dest = dir.path().join("snap");
    // Another writer completes its snapshot at `dest` after our existence check, just before our
    // rename (which then finds the flag unsupported).
    let other = theirs.clone();
    let io = no_rename_flag(move |to: &std::path::Path| {
        squib_snapshot::snapshot::save::save_full(
            squib_snapshot::snapshot::Placement::Dir(to),
            &other,
            &meta(),
            &squib_snapshot::snapshot::DirectIo,
        )
        .unwrap();
    });
    let err = squib_snapshot::snapshot::save::save_full(
        squib_snapshot::snapshot::Placement::Dir(&dest),
        &ours,
        &meta(),
        &io,
    )
    .unwrap_err();
    assert!(
        matches!(err, SnapshotError::DestinationExists { .. }),
        "{}",
        squib_snapshot::report::error_chain(&err)
    );
    assert_eq!(
        contents(&restore(&dest, RestoreMode::Eager).unwrap().memory),
        contents(&theirs),
        "the snapshot already at the destination was replaced"
    );
    assert!(temp_names(dir.path()).is_empty(), "{:?}", temp_names(dir.path()));
}

/// The environment variable that makes this test binary a saver that never finishes.
const HANG_IN_SAVE: &str = "SQUIB_TEST_HANG_IN_SAVE";

/// A writer that writes a little, then blocks forever (until the process is killed).
#[derive(Debug)]
struct Hang;

impl squib_snapshot::snapshot::SnapshotIo for Hang {
    fn write_at(&self, file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)?;
        loop {
            std::thread::park();
        }
    }
}

#[test]
fn test_should_remove_only_the_leftovers_of_a_killed_save() {
    if let Some(dir) = std::env::var_os(HANG_IN_SAVE) {
        // The child: start a save into `dir` and hang in its first write.
        let mem = memory(&regions());
        fill_all(&mem, 3);
        let _ = ChainWriter::create(std::path::Path::new(&dir))
            .unwrap()
            .with_io(Box::new(Hang))
            .save(&mem, &[], &meta());
        unreachable!("the save hangs");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "test_should_remove_only_the_leftovers_of_a_killed_save",
            "--test-threads=1",
        ])
        .env(HANG_IN_SAVE, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the child's temp directory to hold its memory file, then kill it mid-save.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let leftover = loop {
        if let Some(name) = temp_names(dir.path()).pop() {
            let path = dir.path().join(name);
            if path.join("memory").exists() {
                break path;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child's save did not start within 60 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the child exited");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let name = leftover.file_name().unwrap().to_string_lossy().into_owned();
    let pid = child.id();
    assert!(name.contains(&format!(".squib-tmp-{pid}-")), "{name}");
    let host = name.rsplit_once('@').unwrap().1.to_owned();
    // A user's things with similar names, which must survive: the old naming, a file with
    // squib's exact naming, a directory with squib's naming holding a file squib never writes,
    // one of another host, one of a process still running (this one), one without the dot.
    let me = std::process::id();
    let user_files = [
        format!(".000000-full.tmp-{pid}-0"),
        format!(".notes.squib-tmp-{pid}-0@{host}"),
    ];
    for f in &user_files {
        std::fs::write(dir.path().join(f), b"mine").unwrap();
    }
    let user_dirs = [
        format!(".other.squib-tmp-{pid}-1@{host}"),
        format!(".000009-diff.squib-tmp-{pid}-2@another-host"),
        format!(".000009-diff.squib-tmp-{me}-999@{host}"),
        format!("000009-diff.squib-tmp-{pid}-3@{host}"),
    ];
    for d in &user_dirs {
        std::fs::create_dir(dir.path().join(d)).unwrap();
        std::fs::write(dir.path().join(d).join("state"), b"mine").unwrap();
    }
    std::fs::write(dir.path().join(&user_dirs[0]).join("notes.txt"), b"mine").unwrap();
    // The next writer into the directory sweeps the leftover and nothing else.
    let mem = memory(&regions());
    fill_all(&mem, 5);
    let saved = ChainWriter::create(dir.path())
        .unwrap()
        .save(&mem, &[], &meta())
        .unwrap();
    assert!(
        !leftover.exists(),
        "the killed save's temp directory is still there"
    );
    for f in user_files.iter().chain(&user_dirs) {
        assert!(dir.path().join(f).exists(), "{f} was removed");
    }
    assert_eq!(
        contents(&restore(&saved.path, RestoreMode::Eager).unwrap().memory),
        contents(&mem)
    );
    // A single save elsewhere sweeps too.
    std::fs::create_dir(dir.path().join(format!(".x.squib-tmp-{pid}-7@{host}"))).unwrap();
    squib_snapshot::snapshot::save::save_full(
        squib_snapshot::snapshot::Placement::Dir(&dir.path().join("single")),
        &mem,
        &meta(),
        &squib_snapshot::snapshot::DirectIo,
    )
    .unwrap();
    assert!(!dir.path().join(format!(".x.squib-tmp-{pid}-7@{host}")).exists());
}
