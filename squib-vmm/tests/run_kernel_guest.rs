//! `squib run --backend kvm --kernel`: the test guest boots from the command
//! line, its console reaches standard output and the `--serial-file`.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use squib_machine::GUEST_KERNEL;

/// How long a test waits for the guest to get somewhere: generous, so a loaded machine only
/// makes the test slower.
const DEADLINE: Duration = Duration::from_secs(60);

fn squib() -> Command {
    Command::new(env!("CARGO_BIN_EXE_squib"))
}

/// Run `cmd` (a run with a `--for` far beyond [`DEADLINE`]) until `done` holds for its standard
/// output so far, then kill it; returns that output. Fails, with the output, if the process ends
/// first or `done` does not hold within [`DEADLINE`]. The event ends the run, not a clock.
fn run_until(cmd: &mut Command, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run squib");
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = child.stdout.take().expect("stdout");
    let sink = Arc::clone(&out);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let deadline = Instant::now() + DEADLINE;
    while !done(&text()) {
        if let Some(status) = child.try_wait().expect("poll squib") {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("squib ended ({status}) before {what}:\n{}\n{err}", text());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("stop squib");
    child.wait().expect("reap squib");
    reader.join().expect("stdout reader");
    text()
}

#[test]
fn test_should_boot_guest_kernel_from_the_command_line_with_console_on_stdout_and_file() {
    if !squib_kvm::kvm_or_skip("run_kernel_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let serial = dir.path().join("com1.txt");
    // Until the second COUNTER line has begun: the first is then complete.
    let stdout = run_until(
        squib()
            .args(["run", "--backend", "kvm", "--kernel", GUEST_KERNEL])
            .args(["--vcpus", "2", "--mem", "64M", "--cmdline", "squib.cli=1"])
            .args(["--for", "600s", "--serial-file"])
            .arg(&serial),
        "the second COUNTER line on stdout and in the serial file",
        |out| {
            out.contains("COUNTER 2 ")
                && std::fs::read_to_string(&serial).is_ok_and(|f| f.contains("COUNTER 2 "))
        },
    );
    assert!(
        stdout.starts_with("squib guest: e820=2 ram_mib=63 cmdline=squib.cli=1\n"),
        "{stdout}"
    );
    let counters: Vec<&str> = stdout.lines().filter(|l| l.starts_with("COUNTER ")).collect();
    assert!(counters[0].starts_with("COUNTER 1 ck0="), "{stdout}");
    assert!(counters[0].contains(" ck1="), "both CPUs report: {stdout}");
    // The serial file holds what the terminal showed, up to where the run was stopped: each
    // sink is drained by its own thread, so either may be ahead, but one is a prefix of the other.
    let file = std::fs::read_to_string(&serial).expect("serial file");
    assert!(
        stdout.starts_with(&file) || file.starts_with(&stdout),
        "the serial file differs:\n{file}\n---\n{stdout}"
    );
    assert!(
        file.contains(counters[0]),
        "the first COUNTER line is in the file:\n{file}"
    );
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
    // Members appear by an atomic rename: once three are there the chain is complete to them,
    // and the run can be stopped without warning.
    let members_in = |dir: &std::path::Path| -> Vec<String> {
        let mut m: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        m.sort();
        m
    };
    let stdout = run_until(
        squib()
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
            .args(["--for", "600s"]),
        "a full snapshot and two diffs",
        |_| members_in(&snaps).len() >= 3,
    );
    let members = members_in(&snaps);
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

    // Until the restored guest has printed three complete COUNTER lines.
    let after = run_until(
        squib()
            .args(["snapshot", "restore"])
            .arg(&leaf)
            .args(["--lazy", "--for", "600s"]),
        "three COUNTER lines from the restored guest",
        |out| parse(out).len() >= 3,
    );
    let lines = parse(&after);
    let first = lines
        .first()
        .unwrap_or_else(|| panic!("no COUNTER line after restore:\n{after}"));
    // The restored guest continues the stream from a point the original run had reached.
    let original = parse(&stdout);
    // A snapshot taken while the guest was printing a line: the original run ends with that line
    // cut short (it was stopped right after the snapshot), and the restored guest prints the
    // rest of it before its first whole line.
    let cut_line = !after.starts_with("COUNTER")
        && first.counter > 0
        && stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("COUNTER {} ", first.counter - 1)));
    assert!(
        cut_line || original.iter().any(|l| l.counter + 1 == first.counter),
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
