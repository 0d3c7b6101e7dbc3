//! `squib run --snapshot-every D --snapshot-dir DIR`: a chain that sorts in order, verifies, and
//! restores, as does its merge, to the guest memory the run had at its closing checkpoint
//! (`squib run --dump-memory`), also after the whole DIR is moved.

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

/// Live checkpoints with guest writes the run waits for (`--stop-after-checkpoints`).
const CHECKPOINTS: u64 = 3;
/// The deadline for them (`--for`): generous, so a loaded machine only makes the test slower.
const DEADLINE: &str = "120s";

fn check_chain(backend_args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let chain = tmp.path().join("chain");
    let chain_s = chain.to_str().unwrap();
    let truth = tmp.path().join("truth.raw");
    let mut args = vec!["run"];
    args.extend_from_slice(backend_args);
    let n = CHECKPOINTS.to_string();
    args.extend_from_slice(&[
        "--snapshot-every",
        "50ms",
        "--for",
        DEADLINE,
        "--stop-after-checkpoints",
        &n,
        "--snapshot-dir",
        chain_s,
        "--dump-memory",
        truth.to_str().unwrap(),
        "--json",
    ]);
    let out = squib(&args);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written = summary["snapshots_written"].as_u64().unwrap();
    let m = members(&chain);
    // At least the live checkpoints that saved writes, plus the closing one.
    assert!(
        written > CHECKPOINTS,
        "{written} snapshots: {CHECKPOINTS} live checkpoints with writes did not happen within {DEADLINE}"
    );
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
    // Ground truth: guest memory as the run had it at its closing checkpoint, written by the run
    // itself from guest memory, not from any snapshot file.
    let truth = std::fs::read(truth).unwrap();
    assert!(truth.iter().any(|&x| x != 0), "the guest wrote something");
    for (src, extra, name) in [
        (leaf.as_str(), None, "the chain"),
        (leaf.as_str(), Some("--lazy"), "the chain, lazily"),
        (merged.to_str().unwrap(), None, "its merge"),
    ] {
        let dump = tmp.path().join("restored.raw");
        let mut restore = vec![
            "snapshot",
            "restore",
            src,
            "--dump-memory",
            dump.to_str().unwrap(),
        ];
        restore.extend(extra);
        squib(&restore);
        let restored = std::fs::read(&dump).unwrap();
        assert_eq!(restored.len(), truth.len(), "{name}");
        assert!(
            restored == truth,
            "{name} restores to other bytes than guest memory held"
        );
        std::fs::remove_file(dump).unwrap();
    }

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
