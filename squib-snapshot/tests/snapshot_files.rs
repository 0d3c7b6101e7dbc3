//! Snapshot files where the user says (Firecracker's `snapshot_path` and `mem_file_path`): two
//! files anywhere, a moved set, swapped and missing files refused by name, diffs loaded directly,
//! and a diff merged in place into its base's memory file. Ground truth is the guest memory image
//! the snapshots were taken of (`contents`), never what the code under test read back.

mod snapshot_support;

use std::path::{Path, PathBuf};

use snapshot_support::{FailingIo, contents, fill, fill_all, listing, memory, meta, regions};
use squib_arch::GpaRange;
use squib_snapshot::report::error_chain;
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::save::{save_diff, save_full};
use squib_snapshot::snapshot::{
    Chain, DirectIo, LoadedSnapshot, ParentLink, Placement, RestoreMode, SnapshotKind, SnapshotState,
    merge_in_place, verify,
};

fn files<'a>(state: &'a Path, memory: &'a Path) -> Placement<'a> {
    Placement::Files { state, memory }
}

fn recorded(state: &Path) -> SnapshotState {
    SnapshotState::decode(&std::fs::read(state).unwrap()).unwrap()
}

/// Both restore modes give `expected`, byte for byte.
fn assert_restores(state: &Path, expected: &[u8]) {
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let r = restore(state, mode).unwrap_or_else(|e| panic!("{mode:?}: {}", error_chain(&e)));
        assert!(
            contents(&r.memory) == expected,
            "{mode:?} restore of {}",
            state.display()
        );
    }
}

#[test]
fn test_should_save_and_load_a_snapshot_whose_files_are_in_two_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (states, mems) = (
        dir.path().join("a").join("states"),
        dir.path().join("b").join("mems"),
    );
    std::fs::create_dir_all(&states).unwrap();
    std::fs::create_dir_all(&mems).unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 1);
    let (state, mfile) = (states.join("snap.state"), mems.join("snap.mem"));
    let saved = save_full(files(&state, &mfile), &mem, &meta(), &DirectIo).unwrap();
    assert_eq!(
        (saved.state_path.as_path(), saved.memory_path.as_path()),
        (state.as_path(), mfile.as_path())
    );
    // Not near each other: the memory file is recorded by its absolute path.
    assert_eq!(
        Path::new(&recorded(&state).memory),
        std::path::absolute(&mfile).unwrap()
    );
    assert_restores(&state, &contents(&mem));
    // Only the two named files remain: no temp names.
    let names: Vec<PathBuf> = listing(dir.path()).into_iter().map(|(p, _)| p).collect();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    assert_eq!(
        names,
        vec![a, states.clone(), state.clone(), b, mems.clone(), mfile.clone()]
    );
    // Sibling directories (squib's chain layout) are recorded relative, so the pair can move.
    let (near, near_mem) = (
        dir.path().join("a").join("n.state"),
        dir.path().join("b").join("n.mem"),
    );
    save_full(files(&near, &near_mem), &mem, &meta(), &DirectIo).unwrap();
    assert_eq!(recorded(&near).memory, "../b/n.mem");
    assert_restores(&near, &contents(&mem));
}

#[test]
fn test_should_load_a_set_moved_together_and_a_memory_file_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    std::fs::create_dir(&set).unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 2);
    save_full(
        files(&set.join("vm.state"), &set.join("vm.mem")),
        &mem,
        &meta(),
        &DirectIo,
    )
    .unwrap();
    assert_eq!(recorded(&set.join("vm.state")).memory, "vm.mem");
    let expected = contents(&mem);
    fill(&mem, 0x3000, 0x2000, 9);
    let range = GpaRange::new(0x3000, 0x2000).unwrap();
    let parent = ParentLink {
        id: recorded(&set.join("vm.state")).id,
        state: set.join("vm.state"),
    };
    save_diff(
        files(&set.join("d.state"), &set.join("d.mem")),
        &parent,
        &mem,
        &[range],
        &meta(),
        &DirectIo,
    )
    .unwrap();
    assert_eq!(recorded(&set.join("d.state")).parent.unwrap().state, "vm.state");
    let moved = dir.path().join("moved");
    std::fs::rename(&set, &moved).unwrap();
    assert_restores(&moved.join("vm.state"), &expected);
    // The diff loads directly (its chain resolved where it now is).
    assert_restores(&moved.join("d.state"), &contents(&mem));
    // A memory file moved apart from its state file loads when the caller names it.
    let apart = dir.path().join("apart.mem");
    std::fs::rename(moved.join("vm.mem"), &apart).unwrap();
    let err = error_chain(&Chain::load(&moved.join("vm.state")).unwrap_err());
    assert!(
        err.contains("moved/vm.mem: memory file of") && err.contains("is missing"),
        "{err}"
    );
    let chain = Chain::load_with_memory(&moved.join("vm.state"), Some(&apart)).unwrap();
    let r = squib_snapshot::snapshot::restore::restore_chain(&chain, RestoreMode::Lazy).unwrap();
    assert!(contents(&r.memory) == expected);
}

#[test]
fn test_should_refuse_a_swapped_or_missing_memory_file_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 3);
    let (a, am) = (dir.path().join("a.state"), dir.path().join("a.mem"));
    let (b, bm) = (dir.path().join("b.state"), dir.path().join("b.mem"));
    save_full(files(&a, &am), &mem, &meta(), &DirectIo).unwrap();
    fill_all(&mem, 4);
    save_full(files(&b, &bm), &mem, &meta(), &DirectIo).unwrap();
    // Same layout, same length: only the identity tells them apart.
    for (state, wrong) in [(&a, &bm), (&b, &am)] {
        for mode in [RestoreMode::Lazy, RestoreMode::Eager] {
            let chain = Chain::load_with_memory(state, Some(wrong));
            let err = error_chain(&chain.map(drop).unwrap_err());
            assert!(
                err.contains(&wrong.display().to_string())
                    && err.contains("memory file holds snapshot")
                    && err.contains(&state.display().to_string()),
                "{mode:?}: {err}"
            );
        }
    }
    std::fs::remove_file(&am).unwrap();
    let err = error_chain(&restore(&a, RestoreMode::Lazy).unwrap_err());
    assert!(
        err.contains(&format!(
            "{}: memory file of {} is missing",
            am.display(),
            a.display()
        )),
        "{err}"
    );
}

/// A full snapshot at `base.state`/`base.mem`, then guest writes, then the diff of those writes
/// merged in place into `base.mem` with its state at `merged.state`. Returns the base's state,
/// the guest memory before and after the writes, and the merged state.
fn merged(dir: &Path) -> (PathBuf, Vec<u8>, Vec<u8>, PathBuf) {
    let mem = memory(&regions());
    fill(&mem, 0x10_0000, 0x4_0000, 1);
    fill(&mem, (1 << 30) + 0x2000, 0x3000, 2);
    let (base, base_mem) = (dir.join("base.state"), dir.join("base.mem"));
    save_full(files(&base, &base_mem), &mem, &meta(), &DirectIo).unwrap();
    let before = contents(&mem);
    fill(&mem, 0x1000, 0x1000, 5);
    fill(&mem, 0x10_2000, 0x2000, 6);
    // A page that becomes zero must reach the file as zeros.
    mem.write_obj(0u64, vm_memory::GuestAddress(0x10_0000)).unwrap();
    use vm_memory::Bytes as _;
    mem.write_slice(&[0u8; 0x1000], vm_memory::GuestAddress(0x11_0000))
        .unwrap();
    let ranges = [
        GpaRange::new(0x1000, 0x1000).unwrap(),
        GpaRange::new(0x10_0000, 0x1000).unwrap(),
        GpaRange::new(0x10_2000, 0x2000).unwrap(),
        GpaRange::new(0x11_0000, 0x1000).unwrap(),
    ];
    let mut loaded = LoadedSnapshot::open(&base).unwrap();
    let out = dir.join("merged.state");
    let saved = merge_in_place(&out, &mut loaded, &mem, &ranges, &meta(), &DirectIo).unwrap();
    assert_eq!(saved.kind, SnapshotKind::Full);
    assert_eq!(saved.memory_path, base_mem);
    // The handle now describes the merge, as the state file written says.
    assert_eq!(loaded.state, recorded(&out));
    assert_eq!(loaded.state_path, out);
    (base, before, contents(&mem), out)
}

#[test]
fn test_should_merge_a_diff_in_place_and_refuse_the_overwritten_base_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, before, after, out) = merged(dir.path());
    assert_ne!(before, after);
    let base_mem = dir.path().join("base.mem");
    assert_eq!(recorded(&out).memory, "base.mem");
    assert!(recorded(&out).parent.is_none());
    assert_restores(&out, &after);
    assert!(verify(&out).unwrap().is_sound());
    // The old state file described bytes that are gone: refused by name, lazily and eagerly.
    for mode in [RestoreMode::Lazy, RestoreMode::Eager] {
        let err = error_chain(&restore(&base, mode).unwrap_err());
        assert!(
            err.contains(&format!("{}: memory file holds snapshot", base_mem.display()))
                && err.contains(&base.display().to_string()),
            "{mode:?}: {err}"
        );
    }
    // And if the trailer is forged back to the base's id, the checksums still catch it: every
    // block the diff changed is reported corrupt, naming the memory file.
    let old = LoadedSnapshot::open(&out).unwrap();
    let base_id = recorded(&base).id;
    let len = std::fs::metadata(&base_mem).unwrap().len();
    let trailer = squib_snapshot::snapshot::format::MemoryTrailer {
        id: base_id,
        layout_bytes: old.state.layout_bytes(),
    };
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&base_mem).unwrap(),
        &trailer.encode(),
        len - 4096,
    )
    .unwrap();
    let report = verify(&base).unwrap();
    assert!(!report.is_sound());
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .all(|p| p.contains(&base_mem.display().to_string()) && p.contains("is corrupt")),
        "{problems:?}"
    );
    // Blocks of 256 KiB: 0x1000 is in block 0, 0x100000..0x111000 in block 4.
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(restore(&base, RestoreMode::Eager).is_err());
}

#[test]
fn test_should_leave_the_base_refused_and_no_new_state_when_an_in_place_merge_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 7);
    let (base, base_mem) = (dir.path().join("base.state"), dir.path().join("base.mem"));
    save_full(files(&base, &base_mem), &mem, &meta(), &DirectIo).unwrap();
    fill(&mem, 0x20_0000, 0x4_0000, 8);
    let ranges = [GpaRange::new(0x20_0000, 0x4_0000).unwrap()];
    let mut loaded = LoadedSnapshot::open(&base).unwrap();
    let out = dir.path().join("merged.state");
    // The trailer (48 bytes) goes through, the dirty bytes do not: a crash-like stop midway.
    let io = FailingIo::new(48 + 0x1_0000, libc::ENOSPC);
    let err = merge_in_place(&out, &mut loaded, &mem, &ranges, &meta(), &io).unwrap_err();
    let msg = error_chain(&err);
    assert!(
        msg.contains("in-place merge failed") && msg.contains("base.mem"),
        "{msg}"
    );
    assert!(!out.exists(), "the new state file appeared");
    let left: Vec<PathBuf> = listing(dir.path()).into_iter().map(|(p, _)| p).collect();
    assert_eq!(left, vec![base_mem.clone(), base.clone()], "temp files left");
    let err = error_chain(&restore(&base, RestoreMode::Lazy).unwrap_err());
    assert!(err.contains("memory file holds snapshot"), "{err}");
    // A failure before the base is touched (an unwritable trailer) leaves the base loadable.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let (b2, b2m) = (fresh.join("b.state"), fresh.join("b.mem"));
    save_full(files(&b2, &b2m), &mem, &meta(), &DirectIo).unwrap();
    let image = contents(&mem);
    let mut loaded = LoadedSnapshot::open(&b2).unwrap();
    let io = FailingIo::new(0, libc::EIO);
    merge_in_place(&fresh.join("m.state"), &mut loaded, &mem, &ranges, &meta(), &io).unwrap_err();
    assert_restores(&b2, &image);
}

#[test]
fn test_should_refuse_an_in_place_merge_into_a_file_that_no_longer_holds_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, _, _) = merged(dir.path());
    // `base.state` still decodes; its memory file is now the merge's.
    let state = recorded(&base);
    let mut stale = LoadedSnapshot {
        path: base.clone(),
        state_path: base.clone(),
        memory_path: dir.path().join("base.mem"),
        state,
    };
    let mem = memory(&regions());
    let err = merge_in_place(
        &dir.path().join("again.state"),
        &mut stale,
        &mem,
        &[],
        &meta(),
        &DirectIo,
    )
    .unwrap_err();
    let msg = error_chain(&err);
    assert!(
        msg.contains("memory file holds snapshot") && msg.contains("base.mem"),
        "{msg}"
    );
    assert!(!dir.path().join("again.state").exists());
}

#[test]
fn test_should_replace_files_at_the_named_paths_and_refuse_diffs_of_the_replaced_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill_all(&mem, 1);
    let (s, m) = (dir.path().join("snap.state"), dir.path().join("snap.mem"));
    let first = save_full(files(&s, &m), &mem, &meta(), &DirectIo).unwrap();
    fill(&mem, 0x4000, 0x1000, 2);
    let parent = ParentLink {
        id: first.id,
        state: s.clone(),
    };
    let d = dir.path().join("d.state");
    save_diff(
        files(&d, &dir.path().join("d.mem")),
        &parent,
        &mem,
        &[GpaRange::new(0x4000, 0x1000).unwrap()],
        &meta(),
        &DirectIo,
    )
    .unwrap();
    fill_all(&mem, 3);
    save_full(files(&s, &m), &mem, &meta(), &DirectIo).unwrap();
    assert_restores(&s, &contents(&mem));
    let err = error_chain(&Chain::load(&d).unwrap_err());
    assert!(
        err.contains("but the diff names id") && err.contains("snap.state"),
        "{err}"
    );
    // Two names for one file are refused before anything is written.
    let err = save_full(files(&s, &s), &mem, &meta(), &DirectIo).unwrap_err();
    assert!(
        error_chain(&err).contains("must be two files"),
        "{}",
        error_chain(&err)
    );
}
