//! Chains written by a live tracker restore to the live memory at the last checkpoint, eagerly,
//! lazily and after a merge; chains survive being moved.

mod common;
mod snapshot_support;

use std::sync::Arc;

use common::Recorder;
use proptest::prelude::*;
use snapshot_support::{build_chain, contents, copy_tree, fill, memory, meta, regions};
use squib_arch::PageGeometry;
use squib_snapshot::snapshot::restore::{dump_memory, restore};
use squib_snapshot::snapshot::{Chain, ChainWriter, RestoreMode, SnapshotKind, merge, verify};
use squib_snapshot::{DirtyTracker, Policy, TrackingConfig};
use vm_memory::{Bytes, GuestAddress};

/// One guest write: which region, offset, length, byte.
type Write = (usize, u64, u64, u8);

fn writes() -> impl Strategy<Value = Vec<Vec<Write>>> {
    let write = (0usize..2, 0u64..(2 << 20), 1u64..20_000, any::<u8>());
    prop::collection::vec(prop::collection::vec(write, 0..12), 1..5)
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Fine),
        Just(Policy::Coarse),
        Just(Policy::Adaptive),
        Just(Policy::Region)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn test_should_restore_a_chain_and_its_merge_to_the_live_memory_at_the_last_checkpoint(
        epochs in writes(),
        policy in policy(),
        vmm_bitmap in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let regions = regions();
        let mem = memory(&regions);
        fill(&mem, 0x8000, 0x8000, 7);
        let rec = Arc::new(Recorder::new(PageGeometry::X86_64, &regions));
        let tracker = DirtyTracker::new(Arc::clone(&rec), &regions, TrackingConfig::new(policy)).unwrap();
        tracker.start().unwrap();
        let meta = meta();
        let mut chain = ChainWriter::create(&dir.path().join("snaps")).unwrap();
        tracker.checkpoint(Some(&mem), |r| chain.save(&mem, r, &meta).map(drop)).unwrap();
        for epoch in &epochs {
            for &(region, offset, len, byte) in epoch {
                let r = regions[region];
                let len = len.min(r.len() - offset);
                let gpa = r.start() + offset;
                // A vCPU write faults first (the tracker marks), then lands.
                rec.guest_write(&tracker, gpa, len, 0).unwrap();
                mem.write_slice(&vec![byte; usize::try_from(len).unwrap()], GuestAddress(gpa)).unwrap();
            }
            let vmm = vmm_bitmap.then_some(&mem);
            tracker.checkpoint(vmm, |r| chain.save(&mem, r, &meta).map(drop)).unwrap();
        }
        let live = contents(&mem);
        let leaf = chain.leaf().unwrap();
        let loaded = Chain::load(&leaf).unwrap();
        prop_assert_eq!(loaded.members.len(), epochs.len() + 1);
        prop_assert_eq!(loaded.base().state.kind, SnapshotKind::Full);

        let eager = restore(&leaf, RestoreMode::Eager).unwrap();
        prop_assert!(contents(&eager.memory) == live, "eager restore differs from live memory");
        prop_assert_eq!(&eager.state.vcpus, &meta.vcpus);
        let lazy = restore(&leaf, RestoreMode::Lazy).unwrap();
        prop_assert!(contents(&lazy.memory) == live, "lazy restore differs from live memory");

        let merged = dir.path().join("merged");
        let m = merge(std::slice::from_ref(&leaf), &merged).unwrap();
        prop_assert_eq!(m.kind, SnapshotKind::Full);
        let from_merge = restore(&merged, RestoreMode::Eager).unwrap();
        prop_assert!(contents(&from_merge.memory) == live, "restore(merge) differs");
        prop_assert!(verify(&merged).unwrap().is_sound());
        prop_assert!(verify(&leaf).unwrap().is_sound());
    }
}

#[test]
fn test_should_load_a_chain_after_its_directory_is_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (members, live) = build_chain(&dir.path().join("a"));
    std::fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
    let moved = dir.path().join("b").join(members[2].file_name().unwrap());
    assert_eq!(
        contents(&restore(&moved, RestoreMode::Eager).unwrap().memory),
        live
    );
    copy_tree(&dir.path().join("b"), &dir.path().join("c"));
    let copied = dir.path().join("c").join(members[2].file_name().unwrap());
    assert_eq!(
        contents(&restore(&copied, RestoreMode::Lazy).unwrap().memory),
        live
    );
}

#[test]
fn test_should_name_chain_members_so_they_sort_in_chain_order() {
    let dir = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(dir.path());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let expected: Vec<_> = members
        .iter()
        .map(|m| m.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, expected);
    assert_eq!(names, ["000000-full", "000001-diff", "000002-diff"]);
}

#[test]
fn test_should_dump_equal_files_for_eager_lazy_and_merged_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (members, live) = build_chain(&dir.path().join("c"));
    let a = dir.path().join("eager.raw");
    let b = dir.path().join("lazy.raw");
    let c = dir.path().join("merged.raw");
    dump_memory(&restore(&members[2], RestoreMode::Eager).unwrap().memory, &a).unwrap();
    dump_memory(&restore(&members[2], RestoreMode::Lazy).unwrap().memory, &b).unwrap();
    merge(&members, &dir.path().join("m")).unwrap();
    dump_memory(
        &restore(&dir.path().join("m"), RestoreMode::Eager).unwrap().memory,
        &c,
    )
    .unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), live);
    assert_eq!(std::fs::read(&b).unwrap(), live);
    assert_eq!(std::fs::read(&c).unwrap(), live);
}

#[test]
fn test_should_refuse_to_merge_a_directory_that_is_not_in_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = build_chain(&dir.path().join("a"));
    let (b, _) = build_chain(&dir.path().join("b"));
    let out = dir.path().join("out");
    let err = merge(&[b[0].clone(), a[2].clone()], &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a member of the chain"), "{err}");
    assert!(!out.exists());
}

#[test]
fn test_should_leave_holes_for_zero_pages_in_a_full_snapshot() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mem = memory(&regions());
    fill(&mem, 0x10_0000, 0x1000, 1);
    let mut chain = ChainWriter::create(dir.path()).unwrap();
    let full = chain.save(&mem, &[], &meta()).unwrap();
    assert_eq!(
        full.written_bytes,
        0x1000 + 48,
        "only the one non-zero page is written, and the identity trailer"
    );
    assert_eq!(full.extent_bytes, 6 << 20);
    let md = std::fs::metadata(full.path.join("memory")).unwrap();
    assert_eq!(md.len(), (6 << 20) + 4096, "layout, then the identity trailer");
    // 6 MiB logical; a few KiB of data allocated (file systems without holes would allocate all).
    if md.blocks() * 512 < (1 << 20) {
        assert!(
            md.blocks() * 512 <= 64 << 10,
            "{} bytes allocated",
            md.blocks() * 512
        );
    } else {
        eprintln!("note: this file system does not keep holes");
    }
    let restored = restore(&full.path, RestoreMode::Eager).unwrap();
    assert_eq!(contents(&restored.memory), contents(&mem));
}

#[test]
fn test_should_append_to_an_existing_chain_after_reopening_it() {
    let dir = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(dir.path());
    let mem = memory(&regions());
    fill(&mem, 0x40_0000 - 0x1000, 0x1000, 8);
    let mut chain = ChainWriter::open(dir.path()).unwrap();
    assert_eq!(chain.leaf().as_ref(), Some(&members[2]));
    let d = chain
        .save(
            &mem,
            &[squib_arch::GpaRange::new(0x40_0000 - 0x1000, 0x1000).unwrap()],
            &meta(),
        )
        .unwrap();
    assert!(d.path.ends_with("000003-diff"));
    let loaded = Chain::load(&d.path).unwrap();
    assert_eq!(loaded.members.len(), 4);
    let restored = restore(&d.path, RestoreMode::Eager).unwrap();
    let mut page = vec![0u8; 0x1000];
    restored
        .memory
        .read_slice(&mut page, GuestAddress(0x40_0000 - 0x1000))
        .unwrap();
    let mut want = vec![0u8; 0x1000];
    mem.read_slice(&mut want, GuestAddress(0x40_0000 - 0x1000))
        .unwrap();
    assert_eq!(page, want);
}

#[test]
fn test_should_load_a_chain_given_as_the_current_directory_path() {
    let dir = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(dir.path());
    // "<leaf>/sub/.." names the leaf but has no final name; the parent must still resolve to
    // the leaf's siblings, not to siblings of "sub".
    std::fs::create_dir(members[2].join("sub")).unwrap();
    let dotted = members[2].join("sub").join("..");
    assert!(dotted.file_name().is_none());
    assert_eq!(Chain::load(&dotted).unwrap().members.len(), 3);
}

/// The environment variable that makes this test binary the child that runs under a low limit
/// on open files; its value is the directory to work in.
const LOW_FD_LIMIT: &str = "SQUIB_TEST_LOW_FD_LIMIT";
/// The child's limit on open files, far below the chain's length.
const FD_LIMIT: u64 = 32;
/// Members of the long chain.
const LONG_CHAIN: u64 = 150;

/// A chain of a full snapshot and `LONG_CHAIN - 1` diffs, each writing one page; returns the leaf,
/// every member and guest memory as written.
fn long_chain(dir: &std::path::Path) -> (std::path::PathBuf, Vec<std::path::PathBuf>, Vec<u8>) {
    let region = squib_arch::GpaRange::new(0, 1 << 20).unwrap();
    let mem = memory(&[region]);
    let meta = squib_snapshot::SnapshotMeta::new("soft", PageGeometry::X86_64);
    let mut chain = ChainWriter::create(dir).unwrap();
    let mut members = vec![chain.save(&mem, &[], &meta).unwrap().path];
    for i in 1..LONG_CHAIN {
        // Pages are rewritten as the chain goes round the region, so later diffs override
        // earlier ones: a member read out of order or skipped shows.
        let gpa = (i * 0x1000 * 7) % region.len();
        fill(&mem, gpa, 0x1000, u8::try_from(i % 251).unwrap());
        let range = squib_arch::GpaRange::new(gpa, 0x1000).unwrap();
        members.push(chain.save(&mem, &[range], &meta).unwrap().path);
    }
    (members.last().unwrap().clone(), members, contents(&mem))
}

#[test]
fn test_should_load_restore_verify_and_merge_a_chain_longer_than_the_open_file_limit() {
    if let Some(dir) = std::env::var_os(LOW_FD_LIMIT) {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let old = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(FD_LIMIT),
                maximum: old.maximum,
            },
        )
        .unwrap();
        let dir = std::path::Path::new(&dir);
        let (leaf, members, written) = long_chain(&dir.join("chain"));
        let chain = Chain::load(&leaf).unwrap();
        assert_eq!(chain.members.len() as u64, LONG_CHAIN);
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            let restored = restore(&leaf, mode).unwrap();
            assert!(
                contents(&restored.memory) == written,
                "{mode:?} restore differs from guest memory as written"
            );
        }
        let report = verify(&leaf).unwrap();
        assert!(report.is_sound() && report.chain.len() as u64 == LONG_CHAIN);
        let merged = dir.join("merged");
        merge(&members, &merged).unwrap();
        assert!(contents(&restore(&merged, RestoreMode::Eager).unwrap().memory) == written);
        // Appending to it opens it again.
        ChainWriter::open(&dir.join("chain")).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "test_should_load_restore_verify_and_merge_a_chain_longer_than_the_open_file_limit",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(LOW_FD_LIMIT, dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the child with at most {FD_LIMIT} open files failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_should_report_restore_and_merge_progress_adding_up_to_the_bytes_read_and_written() {
    use squib_snapshot::snapshot::restore::{bytes_to_read, restore_chain_with};
    use squib_snapshot::snapshot::{merge_bytes, merge_chain};
    let dir = tempfile::tempdir().unwrap();
    let (members, live) = build_chain(&dir.path().join("c"));
    let chain = Chain::load(members.last().unwrap()).unwrap();
    // What the state files say the chain holds, counted here from the extents.
    let extents: Vec<u64> = chain
        .members
        .iter()
        .map(|m| m.state.extents.iter().map(|e| e.len).sum())
        .collect();
    let all: u64 = extents.iter().sum();
    for (mode, expected) in [(RestoreMode::Eager, all), (RestoreMode::Lazy, all - extents[0])] {
        let mut steps = Vec::new();
        let r = restore_chain_with(&chain, mode, &mut |n| steps.push(n)).unwrap();
        assert_eq!(contents(&r.memory), live);
        assert_eq!(steps.iter().sum::<u64>(), expected, "{mode:?}");
        assert_eq!(bytes_to_read(&chain, mode), expected, "{mode:?}");
        assert!(
            steps.iter().all(|&n| n > 0 && n <= 256 << 10),
            "{mode:?}: {steps:?}"
        );
    }
    let mut done = 0u64;
    let out = dir.path().join("merged");
    merge_chain(&chain, &[], &out, &mut |n| done += n).unwrap();
    let layout: u64 = chain.base().state.layout.iter().map(|r| r.len).sum();
    assert_eq!(
        done,
        all + layout,
        "every extent read, then all of memory written"
    );
    assert_eq!(merge_bytes(&chain), done);
    assert_eq!(contents(&restore(&out, RestoreMode::Eager).unwrap().memory), live);
}
