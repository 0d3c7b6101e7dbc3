//! `squib run --snapshot-every D --snapshot-dir DIR`: a chain that sorts in order, verifies, and
//! restores to the same bytes as its merge, also after the whole DIR is moved.

use std::path::{Path, PathBuf};
use std::process::Command;

fn squib(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(args)
        .output()
        .expect("run squib");
    assert!(
        out.status.success(),
        "squib {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run squib expecting it to fail; returns its standard error.
fn squib_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(args)
        .output()
        .expect("run squib");
    assert!(!out.status.success(), "squib {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn members(dir: &Path) -> Vec<PathBuf> {
    let mut m: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    m.sort();
    m
}

fn check_chain(backend_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let chain = tmp.path().join("chain");
    let chain_s = chain.to_str().unwrap();
    let mut args = vec!["run"];
    args.extend_from_slice(backend_args);
    args.extend_from_slice(&[
        "--snapshot-every",
        "150ms",
        "--for",
        "700ms",
        "--snapshot-dir",
        chain_s,
        "--json",
    ]);
    let out = squib(&args);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written = summary["snapshots_written"].as_u64().unwrap();
    let m = members(&chain);
    assert!(written >= 3, "{written} snapshots");
    assert_eq!(m.len() as u64, written);
    let names: Vec<String> = m
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names[0].ends_with("-full"), "{names:?}");
    assert!(names[1..].iter().all(|n| n.ends_with("-diff")), "{names:?}");

    // Move the whole directory: parents are found relative to it.
    let moved = tmp.path().join("moved");
    std::fs::rename(&chain, &moved).unwrap();
    let m = members(&moved);
    let leaf = m.last().unwrap().to_str().unwrap().to_owned();
    let verify = squib(&["snapshot", "verify", &leaf]);
    assert!(String::from_utf8_lossy(&verify.stdout).contains("sound"));

    let merged = tmp.path().join("merged");
    let mut merge_args = vec!["snapshot", "merge"];
    let strs: Vec<String> = m.iter().map(|p| p.to_str().unwrap().to_owned()).collect();
    merge_args.extend(strs.iter().map(String::as_str));
    merge_args.extend_from_slice(&["--out", merged.to_str().unwrap()]);
    squib(&merge_args);
    let a = tmp.path().join("a.raw");
    let b = tmp.path().join("b.raw");
    squib(&["snapshot", "restore", &leaf, "--dump-memory", a.to_str().unwrap()]);
    squib(&[
        "snapshot",
        "restore",
        merged.to_str().unwrap(),
        "--dump-memory",
        b.to_str().unwrap(),
    ]);
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    assert!(a == b, "restore of the chain and of its merge differ");
    assert!(a.iter().any(|&x| x != 0), "the guest wrote something");

    // A workload snapshot holds memory only: --for (resume a guest kernel) is refused, by name.
    let err = squib_fails(&["snapshot", "restore", &leaf, "--for", "100ms"]);
    assert!(err.contains(&leaf) && err.contains("no vCPU state"), "{err}");
}

#[test]
fn test_should_write_a_restorable_chain_from_a_soft_run() {
    check_chain(&[
        "--backend",
        "soft",
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--workload",
        "random:seed=3",
    ]);
}

#[test]
fn test_should_write_a_restorable_chain_from_a_kvm_run() {
    if !squib_kvm::kvm_or_skip("run_snapshots") {
        return;
    }
    check_chain(&[
        "--backend",
        "kvm",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--workload",
        "random:seed=3",
    ]);
}

#[test]
fn test_should_refuse_a_snapshot_dir_that_already_holds_a_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let d = dir.to_str().unwrap();
    let run = [
        "run",
        "--backend",
        "soft",
        "--mem",
        "8M",
        "--workload",
        "idle",
        "--for",
        "200ms",
        "--snapshot-every",
        "100ms",
        "--snapshot-dir",
        d,
    ];
    squib(&run);
    let before = members(&dir);
    let err = squib_fails(&run);
    assert!(err.contains(d), "the error names the directory: {err}");
    assert_eq!(members(&dir), before, "nothing already saved is touched");
}
