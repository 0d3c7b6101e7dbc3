//! The hostile-input matrix: every malformed snapshot is refused by every consumer (chain load,
//! verify, eager and lazy restore, merge) with an error naming the file and the reason, without
//! a panic, and without anything written anywhere.

mod snapshot_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snapshot_support::{build_chain, copy_tree, listing, read_state, rewrite_state};
use squib_arch::PageGeometry;
use squib_snapshot::report::error_chain;
use squib_snapshot::snapshot::format::{MAX_STATE_FILE, MemoryTrailer};
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::{
    Chain, Extent, MEMORY_FILE, RestoreMode, STATE_FILE, SnapshotKind, merge, verify,
};

struct Case {
    name: &'static str,
    /// Mutates the chain (members: base, d1, d2); returns the file the error must name.
    mutate: fn(&[PathBuf]) -> PathBuf,
    /// A fragment of the reason the error must give.
    reason: &'static str,
    /// Whether lazy restore can see it (it does not read the base's bytes).
    lazy_sees_it: bool,
}

fn flip(path: &Path, offset: u64, mask: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "state file truncated",
            mutate: |m| {
                let p = m[2].join(STATE_FILE);
                set_len(&p, 40);
                p
            },
            reason: "length mismatch",
            lazy_sees_it: true,
        },
        Case {
            name: "bit flip in the state body",
            mutate: |m| {
                let p = m[2].join(STATE_FILE);
                flip(&p, 45, 0x10);
                p
            },
            reason: "CRC-64 mismatch",
            lazy_sees_it: true,
        },
        Case {
            name: "bit flip in the magic",
            mutate: |m| {
                let p = m[1].join(STATE_FILE);
                flip(&p, 2, 0x01);
                p
            },
            reason: "bad magic",
            lazy_sees_it: true,
        },
        Case {
            name: "future format version",
            mutate: |m| {
                let p = m[0].join(STATE_FILE);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .write_all_at(&3u32.to_le_bytes(), 8)
                    .unwrap();
                p
            },
            reason: "unsupported format version 3",
            lazy_sees_it: true,
        },
        Case {
            name: "state file above the size cap",
            mutate: |m| {
                let p = m[2].join(STATE_FILE);
                set_len(&p, MAX_STATE_FILE + 1);
                p
            },
            reason: "above the",
            lazy_sees_it: true,
        },
        Case {
            name: "extent outside guest RAM",
            mutate: |m| {
                rewrite_state(&m[2], |s| s.extents[0].gpa = 0x8000_0000);
                m[2].join(STATE_FILE)
            },
            reason: "outside guest RAM",
            lazy_sees_it: true,
        },
        Case {
            name: "extent past the end of the memory file",
            mutate: |m| {
                let p = m[2].join(MEMORY_FILE);
                set_len(&p, 4 << 20);
                p
            },
            reason: "past the end",
            lazy_sees_it: true,
        },
        Case {
            name: "overlapping extents",
            mutate: |m| {
                rewrite_state(&m[2], |s| {
                    let e = s.extents[0];
                    s.extents.insert(
                        1,
                        Extent {
                            gpa: e.gpa,
                            len: e.len,
                            xxh3: e.xxh3,
                        },
                    );
                });
                m[2].join(STATE_FILE)
            },
            reason: "overlaps",
            lazy_sees_it: true,
        },
        Case {
            name: "diff of another geometry",
            mutate: |m| {
                rewrite_state(&m[1], |s| {
                    s.geometry = PageGeometry {
                        tracking_default: 4 << 20,
                        ..PageGeometry::X86_64
                    };
                });
                m[1].join(STATE_FILE)
            },
            reason: "geometry mismatch",
            lazy_sees_it: true,
        },
        Case {
            name: "diff of another backend",
            mutate: |m| {
                rewrite_state(&m[1], |s| s.backend = "kvm".into());
                m[1].join(STATE_FILE)
            },
            reason: "backend mismatch",
            lazy_sees_it: true,
        },
        Case {
            name: "missing parent",
            mutate: |m| {
                std::fs::remove_dir_all(&m[1]).unwrap();
                m[2].join(STATE_FILE)
            },
            reason: "is missing",
            lazy_sees_it: true,
        },
        Case {
            name: "parent replaced by another snapshot",
            mutate: |m| {
                // Another snapshot's pair of files: its state and a memory file carrying its id.
                rewrite_state(&m[1], |s| s.id.0 ^= 1);
                let s = read_state(&m[1]);
                let p = m[1].join(MEMORY_FILE);
                let trailer = MemoryTrailer {
                    id: s.id,
                    layout_bytes: s.layout_bytes(),
                };
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .write_all_at(&trailer.encode(), s.layout_bytes())
                    .unwrap();
                m[2].join(STATE_FILE)
            },
            reason: "but the diff names id",
            lazy_sees_it: true,
        },
        Case {
            name: "chain with a cycle",
            mutate: |m| {
                let leaf = read_state(&m[2]);
                let name = m[2].file_name().unwrap().to_string_lossy().into_owned();
                rewrite_state(&m[0], |s| {
                    s.kind = SnapshotKind::Diff;
                    s.parent = Some(squib_snapshot::snapshot::ParentRef {
                        id: leaf.id,
                        state: format!("../{name}/state"),
                    });
                });
                m[2].join(STATE_FILE)
            },
            reason: "cycle",
            lazy_sees_it: true,
        },
        Case {
            name: "parent path longer than the cap",
            mutate: |m| {
                rewrite_state(&m[2], |s| s.parent.as_mut().unwrap().state = "a/".repeat(2049));
                m[2].join(STATE_FILE)
            },
            reason: "parent state file path",
            lazy_sees_it: true,
        },
        Case {
            name: "memory path holding a NUL",
            mutate: |m| {
                rewrite_state(&m[1], |s| s.memory = "mem\0ory".into());
                m[1].join(STATE_FILE)
            },
            reason: "memory file path",
            lazy_sees_it: true,
        },
        Case {
            name: "parent path naming a file that is not a state file",
            mutate: |m| {
                rewrite_state(&m[2], |s| {
                    s.parent.as_mut().unwrap().state = "../000000-full/memory".into();
                });
                m[0].join(MEMORY_FILE)
            },
            reason: "bad magic",
            lazy_sees_it: true,
        },
        Case {
            name: "memory path naming a missing file",
            mutate: |m| {
                rewrite_state(&m[2], |s| s.memory = "/nonexistent/squib/memory".into());
                PathBuf::from("/nonexistent/squib/memory")
            },
            reason: "is missing",
            lazy_sees_it: true,
        },
        Case {
            name: "memory files of two snapshots swapped",
            mutate: |m| {
                let (a, b) = (m[1].join(MEMORY_FILE), m[2].join(MEMORY_FILE));
                let tmp = m[1].join("swap");
                std::fs::rename(&a, &tmp).unwrap();
                std::fs::rename(&b, &a).unwrap();
                std::fs::rename(&tmp, &b).unwrap();
                b
            },
            reason: "memory file holds snapshot",
            lazy_sees_it: true,
        },
        Case {
            name: "memory file identity trailer damaged",
            mutate: |m| {
                let p = m[0].join(MEMORY_FILE);
                let len = std::fs::metadata(&p).unwrap().len();
                flip(&p, len - 4096 + 20, 0x04);
                p
            },
            reason: "identity trailer",
            lazy_sees_it: true,
        },
        Case {
            name: "full snapshot missing part of its memory",
            mutate: |m| {
                rewrite_state(&m[0], |s| {
                    s.extents.pop();
                });
                m[0].join(STATE_FILE)
            },
            reason: "exactly its regions",
            lazy_sees_it: true,
        },
        Case {
            name: "memory file shorter than its layout",
            mutate: |m| {
                // The leaf's last extent ends at file offset 5 MiB + 16 KiB; the layout is 6 MiB.
                let p = m[2].join(MEMORY_FILE);
                set_len(&p, (5 << 20) + 0x8000);
                p
            },
            reason: "shorter than its layout",
            lazy_sees_it: true,
        },
        Case {
            name: "corrupted memory data in the base",
            mutate: |m| {
                let p = m[0].join(MEMORY_FILE);
                flip(&p, 0x10_0123, 0x40);
                p
            },
            reason: "is corrupt",
            lazy_sees_it: false,
        },
        Case {
            name: "corrupted memory data in a diff",
            mutate: |m| {
                let p = m[1].join(MEMORY_FILE);
                flip(&p, 0x20_0001, 0x01);
                p
            },
            reason: "is corrupt",
            lazy_sees_it: true,
        },
        Case {
            name: "state file that is a FIFO",
            mutate: |m| {
                let p = m[2].join(STATE_FILE);
                std::fs::remove_file(&p).unwrap();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap();
                p
            },
            reason: "not a regular file",
            lazy_sees_it: true,
        },
        Case {
            name: "memory file that is a directory",
            mutate: |m| {
                let p = m[1].join(MEMORY_FILE);
                std::fs::remove_file(&p).unwrap();
                std::fs::create_dir(&p).unwrap();
                p
            },
            reason: "not a regular file",
            lazy_sees_it: true,
        },
        Case {
            name: "missing state file",
            mutate: |m| {
                let p = m[1].join(STATE_FILE);
                std::fs::remove_file(&p).unwrap();
                m[2].join(STATE_FILE)
            },
            reason: "is missing",
            lazy_sees_it: true,
        },
    ]
}

fn check(case: &str, what: &str, err: String, file: &Path, reason: &str) {
    let file = file.display().to_string();
    assert!(
        err.contains(&file),
        "{case}: {what}: error does not name {file}: {err}"
    );
    assert!(
        err.contains(reason),
        "{case}: {what}: error does not say {reason:?}: {err}"
    );
}

#[test]
fn test_should_refuse_every_hostile_chain_naming_the_file_and_reason() {
    let pristine = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(pristine.path());
    let names: Vec<_> = members
        .iter()
        .map(|m| m.file_name().unwrap().to_owned())
        .collect();
    let mut results = Vec::new();
    for case in cases() {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("chain");
        copy_tree(pristine.path(), &root);
        let m: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
        let file = (case.mutate)(&m);
        let before = listing(work.path());
        let leaf = &m[2];

        let load = Chain::load(leaf).map(drop).map_err(|e| error_chain(&e));
        let verified = match verify(leaf) {
            Err(e) => Err(error_chain(&e)),
            Ok(r) if !r.is_sound() => Err(error_chain(&r.problems[0])),
            Ok(_) => Ok(()),
        };
        let eager = restore(leaf, RestoreMode::Eager)
            .map(drop)
            .map_err(|e| error_chain(&e));
        let lazy = restore(leaf, RestoreMode::Lazy)
            .map(drop)
            .map_err(|e| error_chain(&e));
        let out = work.path().join("merged");
        let merged = merge(std::slice::from_ref(leaf), &out)
            .map(drop)
            .map_err(|e| error_chain(&e));

        eprintln!(
            "| {} | {} |",
            case.name,
            eager.as_ref().err().map_or("(accepted)", String::as_str)
        );
        // Memory corruption is found by reading bytes, not by loading.
        if case.reason != "is corrupt" {
            check(case.name, "load", load.unwrap_err(), &file, case.reason);
        }
        check(case.name, "verify", verified.unwrap_err(), &file, case.reason);
        check(case.name, "eager restore", eager.unwrap_err(), &file, case.reason);
        if case.lazy_sees_it {
            check(case.name, "lazy restore", lazy.unwrap_err(), &file, case.reason);
        }
        check(case.name, "merge", merged.unwrap_err(), &file, case.reason);
        assert!(!out.exists(), "{}: merge left {}", case.name, out.display());
        assert_eq!(
            listing(work.path()),
            before,
            "{}: something was written",
            case.name
        );
        results.push(case.name);
    }
    eprintln!(
        "hostile matrix: {} cases refused by load, verify, restore and merge",
        results.len()
    );
    assert_eq!(results.len(), cases().len());
}

#[test]
fn test_should_refuse_a_state_file_truncated_at_every_length() {
    let pristine = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(pristine.path());
    let state = members[2].join(STATE_FILE);
    let bytes = std::fs::read(&state).unwrap();
    for len in 0..bytes.len() {
        std::fs::write(&state, &bytes[..len]).unwrap();
        let err = error_chain(&Chain::load(&members[2]).unwrap_err());
        assert!(err.contains(&state.display().to_string()), "len {len}: {err}");
        assert!(
            err.contains("truncated") || err.contains("length mismatch"),
            "len {len}: {err}"
        );
    }
    std::fs::write(&state, &bytes).unwrap();
    assert!(Chain::load(&members[2]).is_ok());
}

#[test]
fn test_should_refuse_a_state_file_with_any_single_bit_flipped() {
    let pristine = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(pristine.path());
    let state = members[1].join(STATE_FILE);
    let bytes = std::fs::read(&state).unwrap();
    let mut flipped = bytes.clone();
    for bit in 0..bytes.len() * 8 {
        flipped[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&state, &flipped).unwrap();
        let err = error_chain(&Chain::load(&members[2]).unwrap_err());
        assert!(err.contains(&state.display().to_string()), "bit {bit}: {err}");
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
    std::fs::write(&state, &bytes).unwrap();
    assert!(Chain::load(&members[2]).is_ok());
}

#[test]
fn test_should_refuse_restoring_into_another_backend_or_geometry() {
    let pristine = tempfile::tempdir().unwrap();
    let (members, _) = build_chain(pristine.path());
    let chain = Chain::load(&members[2]).unwrap();
    let state = members[2].join(STATE_FILE).display().to_string();
    let err = error_chain(&chain.check_target(Some("kvm"), None).unwrap_err());
    assert!(err.contains(&state) && err.contains("backend mismatch"), "{err}");
    let err = error_chain(
        &chain
            .check_target(None, Some(&PageGeometry::APPLE_SILICON))
            .unwrap_err(),
    );
    assert!(err.contains(&state) && err.contains("geometry mismatch"), "{err}");
    chain
        .check_target(Some("soft"), Some(&PageGeometry::X86_64))
        .unwrap();
}
