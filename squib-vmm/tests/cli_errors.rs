//! The `squib` command's error line names each cause once (anyhow's `{:#}` walks `source()`, so
//! a message that also interpolated its source printed it twice).

use std::process::Command;

/// Runs squib expecting failure; returns its standard error.
fn stderr_of_failing(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(args)
        .output()
        .expect("run squib");
    assert!(!out.status.success(), "squib {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn test_should_print_each_cause_once_for_a_missing_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nonexist");
    let err = stderr_of_failing(&["snapshot", "inspect", dir.to_str().unwrap()]);
    assert_eq!(
        err,
        format!(
            // Not a directory: the path names a state file, which is missing.
            "squib: error: {}: open failed: No such file or directory (os error 2)\n",
            dir.display()
        )
    );
}

#[test]
fn test_should_print_each_cause_once_for_a_corrupt_state_file_and_a_missing_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    std::fs::write(snap.join("state"), [0u8; 64]).unwrap();
    std::fs::write(snap.join("memory"), []).unwrap();
    let err = stderr_of_failing(&["snapshot", "verify", snap.to_str().unwrap()]);
    assert!(
        err.starts_with(&format!("squib: error: {}/state: ", snap.display())),
        "{err}"
    );
    assert_eq!(err.matches("magic").count(), 1, "{err}");

    let trace = tmp.path().join("no.trace");
    let err = stderr_of_failing(&["trace", "replay", trace.to_str().unwrap()]);
    assert!(err.contains(trace.to_str().unwrap()), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
