//! `squib run --backend kvm --kernel`: the test guest boots from the command
//! line, its console reaches standard output and the `--serial-file`.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::process::Command;

use squib_machine::GUEST_KERNEL;

fn squib() -> Command {
    Command::new(env!("CARGO_BIN_EXE_squib"))
}

#[test]
fn test_should_boot_guest_kernel_from_the_command_line_with_console_on_stdout_and_file() {
    if !squib_kvm::kvm_or_skip("run_kernel_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let serial = dir.path().join("com1.txt");
    let out = squib()
        .args(["run", "--backend", "kvm", "--kernel", GUEST_KERNEL])
        .args(["--vcpus", "2", "--mem", "64M", "--cmdline", "squib.cli=1"])
        .args(["--for", "3s", "--serial-file"])
        .arg(&serial)
        .output()
        .expect("run squib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "squib failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("squib guest: e820=2 ram_mib=63 cmdline=squib.cli=1\n"),
        "{stdout}"
    );
    let counters: Vec<&str> = stdout.lines().filter(|l| l.starts_with("COUNTER ")).collect();
    assert!(!counters.is_empty(), "no COUNTER line in 3 s:\n{stdout}");
    assert!(counters[0].starts_with("COUNTER 1 ck0="), "{stdout}");
    assert!(counters[0].contains(" ck1="), "both CPUs report: {stdout}");
    let file = std::fs::read_to_string(&serial).expect("serial file");
    assert_eq!(file, stdout, "the serial file holds what the terminal showed");
}

#[test]
fn test_should_refuse_kernel_without_kvm_backend() {
    let out = squib()
        .args(["run", "--backend", "soft", "--kernel", GUEST_KERNEL])
        .output()
        .expect("run squib");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs --backend kvm") && err.contains(GUEST_KERNEL),
        "{err}"
    );
}

#[test]
fn test_should_name_the_kernel_file_that_is_not_an_elf() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, b"#!/bin/sh\necho hi\n").expect("write");
    let out = squib()
        .args(["run", "--backend", "kvm", "--mem", "16M", "--kernel"])
        .arg(&bogus)
        .output()
        .expect("run squib");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*bogus.to_string_lossy()) && err.contains("not a loadable 64-bit ELF"),
        "{err}"
    );
}

#[test]
fn test_should_write_a_chain_while_the_guest_runs_and_resume_it_with_snapshot_restore() {
    use squib_machine::guest::{check, parse};
    if !squib_kvm::kvm_or_skip("run_kernel_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let snaps = dir.path().join("snaps");
    let out = squib()
        .args(["run", "--backend", "kvm", "--kernel", GUEST_KERNEL])
        .args([
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--snapshot-every",
            "400ms",
            "--snapshot-dir",
        ])
        .arg(&snaps)
        .args(["--for", "5s", "--json"])
        .output()
        .expect("run squib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "squib failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut members: Vec<String> = std::fs::read_dir(&snaps)
        .expect("snapshot dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    members.sort();
    // A busy debug build may take seconds over the first full snapshot: ask for one diff.
    assert!(members.len() >= 2, "a full and diffs: {members:?}");
    assert_eq!(members[0], "000000-full");
    assert!(members[1..].iter().all(|m| m.ends_with("-diff")), "{members:?}");
    let leaf = snaps.join(members.last().expect("leaf"));

    let verify = squib()
        .args(["snapshot", "verify"])
        .arg(&leaf)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let resumed = squib()
        .args(["snapshot", "restore"])
        .arg(&leaf)
        .args(["--lazy", "--for", "1500ms"])
        .output()
        .expect("restore");
    let after = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "restore failed: {}\n{after}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let lines = parse(&after);
    let first = lines
        .first()
        .unwrap_or_else(|| panic!("no COUNTER line after restore:\n{after}"));
    // The restored guest continues the stream from a point the original run had reached.
    let original = parse(&stdout);
    assert!(
        original.iter().any(|l| l.counter + 1 == first.counter),
        "restored stream starts at COUNTER {} which does not follow the original run:\n{stdout}\n---\n{after}",
        first.counter
    );
    if let Err(e) = check(&lines, 2) {
        panic!("{e}\n{after}");
    }
}

#[test]
fn test_should_name_an_initrd_that_cannot_be_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-initrd.img");
    let out = squib()
        .args([
            "run",
            "--backend",
            "kvm",
            "--mem",
            "16M",
            "--kernel",
            GUEST_KERNEL,
            "--initrd",
        ])
        .arg(&missing)
        .output()
        .expect("run squib");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*missing.to_string_lossy()) && err.contains("cannot read"),
        "{err}"
    );
}
