//! Firecracker's API on `squib run --api-sock`: configure and start the test
//! guest, pause, snapshot, resume, kill -9 the process, load the snapshot in a
//! new process: the guest carries on where it was.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use squib_machine::GUEST_KERNEL;
use squib_machine::guest::{check, parse};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A `squib run --api-sock` process, killed (SIGKILL) when dropped.
struct Squib {
    child: Child,
    sock: PathBuf,
    serial: PathBuf,
}

impl Squib {
    fn spawn(dir: &Path, name: &str) -> Self {
        Self::spawn_with_stdout(dir, name, Stdio::null())
    }

    fn spawn_with_stdout(dir: &Path, name: &str, stdout: Stdio) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.com1"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_squib"))
            .args(["run", "--backend", "kvm", "--api-sock"])
            .arg(&sock)
            .arg("--serial-file")
            .arg(&serial)
            .stdout(stdout)
            .spawn()
            .expect("spawn squib");
        let deadline = Instant::now() + TIMEOUT;
        while !sock.exists() {
            if let Some(status) = child.try_wait().expect("poll squib") {
                panic!("squib ended before serving {}: {status}", sock.display());
            }
            assert!(Instant::now() < deadline, "no API socket {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, sock, serial }
    }

    /// Send one request; returns the status and the body.
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        // A call that hangs fails the test with a message instead of hanging it.
        s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status)
            .unwrap_or_else(|e| panic!("{method} {path}: no reply within {TIMEOUT:?}: {e}"));
        let code: u16 = status
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("status line {status:?}"));
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("Content-Length: ") {
                len = v.parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("body");
        (code, String::from_utf8(body).expect("utf-8"))
    }

    fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, reply) = self.call(method, path, body);
        assert_eq!(code, 204, "{method} {path} {body}: {reply}");
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_console(&self, mut done: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.console();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "console of {} never got there:\n{text}",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Squib {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Firecracker's create body; `snapshot_path` names squib's snapshot directory by its state file.
fn create_body(kind: &str, dir: &Path) -> String {
    serde_json::json!({
        "snapshot_type": kind, "snapshot_path": dir.join("state"), "mem_file_path": dir.join("memory"),
    })
    .to_string()
}

/// Run `squib ARGS`, returning its standard output; panics with its error output on failure.
fn squib(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(args)
        .output()
        .expect("run squib");
    assert!(
        out.status.success(),
        "squib {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn test_should_restore_guest_from_diff_snapshots_over_api_after_kill_9() {
    if !squib_kvm::kvm_or_skip("api_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).expect("snapshot directory");
    let snap = |name: &str| snaps.join(name);

    let a = Squib::spawn(dir.path(), "a");
    let (code, info) = a.call("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Not started\""), "{info}");
    a.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "smt": false, "track_dirty_pages": true}"#,
    );
    a.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": GUEST_KERNEL, "boot_args": "console=ttyS0"}).to_string(),
    );
    a.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= 1));

    // Configuration is closed once the guest runs; a snapshot needs a pause.
    let (code, fault) = a.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    assert_eq!(code, 400, "{fault}");
    let base = snap("base");
    let (code, fault) = a.call("PUT", "/snapshot/create", &create_body("Full", &base));
    assert_eq!(code, 400);
    assert!(fault.contains("paused"), "{fault}");

    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    // A diff needs a snapshot to chain to, beside it.
    let (code, fault) = a.call("PUT", "/snapshot/create", &create_body("Diff", &snap("early")));
    assert_eq!(code, 400);
    assert!(fault.contains("create a Full first"), "{fault}");
    a.ok("PUT", "/snapshot/create", &create_body("Full", &base));
    assert!(!snap("early").exists());
    a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // Three diffs of the running guest, a few timer periods apart.
    let mut diffs = Vec::new();
    let mut before = String::new();
    for i in 0..3 {
        let n = parse(&a.console()).last().map_or(0, |l| l.counter);
        a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= n + 2));
        a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        let d = snap(&format!("diff{i}"));
        a.ok("PUT", "/snapshot/create", &create_body("Diff", &d));
        before = a.console();
        a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        diffs.push(d);
    }
    let at_pause = parse(&before).last().expect("a line").counter;
    // The guest runs on after the last diff, then its process dies without warning.
    a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter > at_pause + 1));
    drop(a);

    // squib's snapshot command works on machine snapshots: verify the chain, merge it, inspect.
    let leaf = diffs.last().expect("a diff").clone();
    let merged = snap("merged");
    let verified = squib(&["snapshot".as_ref(), "verify".as_ref(), leaf.as_os_str()]);
    assert!(verified.contains("sound (4 snapshots"), "{verified}");
    squib(&[
        "snapshot".as_ref(),
        "merge".as_ref(),
        base.as_os_str(),
        leaf.as_os_str(),
        "--out".as_ref(),
        merged.as_os_str(),
    ]);
    let info: serde_json::Value = serde_json::from_str(&squib(&[
        "snapshot".as_ref(),
        "inspect".as_ref(),
        merged.as_os_str(),
        "--json".as_ref(),
    ]))
    .expect("inspect json");
    assert_eq!(info["type"], "full", "{info}");
    assert_eq!(info["backend"], "kvm", "{info}");
    assert_eq!(info["vcpus"], 2, "{info}");
    assert!(info["devices"].to_string().contains("kvm-machine"), "{info}");

    // A new process loads the chain through its leaf (the diff) and the guest carries on.
    let b = Squib::spawn(dir.path(), "b");
    b.ok(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({
            "snapshot_path": leaf.join("state"),
            "mem_backend": {"backend_path": leaf.join("memory"), "backend_type": "File"},
            "resume_vm": true,
        })
        .to_string(),
    );
    let after = b.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    });
    let (code, info) = b.call("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Running\""), "{info}");
    let all = format!("{before}{after}");
    if let Err(e) = check(&parse(&all), 2) {
        panic!("{e}\nconsole:\n{all}");
    }
    drop(b);

    // And so does the merge, loaded by naming its directory.
    let c = Squib::spawn(dir.path(), "c");
    c.ok(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": merged, "resume_vm": true}).to_string(),
    );
    let after = c.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    });
    let all = format!("{before}{after}");
    if let Err(e) = check(&parse(&all), 2) {
        panic!("{e}\nconsole:\n{all}");
    }
}

#[test]
fn test_should_refuse_a_guest_snapshot_that_is_not_one_naming_the_file() {
    if !squib_kvm::kvm_or_skip("api_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let vm = dir.path().join("vm");
    std::fs::create_dir(&vm).expect("mkdir");
    std::fs::write(vm.join("state"), b"not a snapshot, though longer than a header").expect("write");
    std::fs::write(vm.join("memory"), b"").expect("write");
    let s = Squib::spawn(dir.path(), "s");
    let (code, fault) = s.call(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": vm.join("state"), "mem_file_path": vm.join("memory")})
            .to_string(),
    );
    assert_eq!(code, 400);
    assert!(fault.contains("vm/state") && fault.contains("magic"), "{fault}");
    let (code, fault) = s.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "bogus": 1}"#,
    );
    assert_eq!(code, 400);
    assert!(fault.contains("bogus"), "{fault}");
    // An unknown path is a 400, as in Firecracker.
    let (code, fault) = s.call("GET", "/nowhere", "");
    assert_eq!(code, 400);
    assert!(fault.contains("Invalid request method and/or path"), "{fault}");
}

/// The counter the guest printed last in `console`.
fn last_counter(console: &str) -> u64 {
    parse(console).last().map_or(0, |l| l.counter)
}

/// Load `body` into a new process and check that the guest carries on from `before` (the
/// console up to the snapshot): its own counters and checksums, two lines past the snapshot.
fn load_and_check(dir: &Path, name: &str, body: &serde_json::Value, before: &str) {
    let p = Squib::spawn(dir, name);
    p.ok("PUT", "/snapshot/load", &body.to_string());
    let at = last_counter(before);
    let after = p.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at + 2)
    });
    let all = format!("{before}{after}");
    if let Err(e) = check(&parse(&all), 2) {
        panic!("{name}: {e}\nconsole:\n{all}");
    }
}

#[test]
fn test_should_follow_firecrackers_snapshot_flow_with_files_anywhere() {
    if !squib_kvm::kvm_or_skip("api_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (states, mems) = (dir.path().join("states"), dir.path().join("x").join("mems"));
    std::fs::create_dir(&states).expect("mkdir");
    std::fs::create_dir_all(&mems).expect("mkdir");
    let create = |kind: &str, state: &Path, mem: &Path| {
        serde_json::json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}).to_string()
    };
    let a = Squib::spawn(dir.path(), "a");
    a.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "track_dirty_pages": true}"#,
    );
    a.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": GUEST_KERNEL}).to_string(),
    );
    a.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let run_on = |a: &Squib| {
        let n = last_counter(&a.console());
        a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        a.wait_console(|t| last_counter(t) >= n + 2);
        a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        a.console()
    };
    a.wait_console(|t| last_counter(t) >= 1);
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    // Firecracker's names, the two files in directories that are not near each other.
    let (snap, snap_mem) = (states.join("snap.state"), mems.join("snap.mem"));
    a.ok("PUT", "/snapshot/create", &create("Full", &snap, &snap_mem));
    let at_full = a.console();
    // A diff merged in place into the base's memory file: a full snapshot at merged.state.
    run_on(&a);
    let merged = states.join("merged.state");
    a.ok("PUT", "/snapshot/create", &create("Diff", &merged, &snap_mem));
    let at_merge = a.console();
    // A diff into an existing file that is not the base's memory is refused by name.
    std::fs::write(mems.join("other.mem"), b"not mine").expect("write");
    let (code, fault) = a.call(
        "PUT",
        "/snapshot/create",
        &create("Diff", &states.join("x.state"), &mems.join("other.mem")),
    );
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains("other.mem") && fault.contains("merged.state"),
        "{fault}"
    );
    // A diff of its own, chained to the merge; and a set kept together in one directory.
    run_on(&a);
    let (d2, d2_mem) = (states.join("d2.state"), mems.join("d2.mem"));
    a.ok("PUT", "/snapshot/create", &create("Diff", &d2, &d2_mem));
    let at_d2 = a.console();
    let set = dir.path().join("set");
    std::fs::create_dir(&set).expect("mkdir");
    a.ok(
        "PUT",
        "/snapshot/create",
        &create("Full", &set.join("vm.state"), &set.join("vm.mem")),
    );
    let at_set = a.console();
    drop(a);

    // The state file that described the overwritten memory is refused by name.
    let b = Squib::spawn(dir.path(), "b");
    let (code, fault) = b.call(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": snap_mem}})
            .to_string(),
    );
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains("snap.mem: memory file holds snapshot") && fault.contains("snap.state"),
        "{fault}"
    );
    // A swapped memory file and a missing one, likewise.
    let (code, fault) = b.call(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": d2, "mem_file_path": set.join("vm.mem")}).to_string(),
    );
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains("vm.mem: memory file holds snapshot") && fault.contains("d2.state"),
        "{fault}"
    );
    let (code, fault) = b.call(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": d2, "mem_file_path": mems.join("gone.mem")}).to_string(),
    );
    assert_eq!(code, 400, "{fault}");
    assert!(
        fault.contains("gone.mem: memory file of") && fault.contains("is missing"),
        "{fault}"
    );
    drop(b);
    assert!(at_full.len() < at_merge.len());

    // The merge loads with the memory file it was merged into; the diff loads directly (its
    // chain resolved: the merge beneath it); the set loads after being moved.
    load_and_check(
        dir.path(),
        "merged",
        &serde_json::json!({"snapshot_path": merged, "mem_backend": {"backend_type": "File", "backend_path": snap_mem}, "resume_vm": true}),
        &at_merge,
    );
    load_and_check(
        dir.path(),
        "diff",
        &serde_json::json!({"snapshot_path": d2, "mem_file_path": d2_mem, "resume_vm": true}),
        &at_d2,
    );
    let moved = dir.path().join("moved");
    std::fs::rename(&set, &moved).expect("move the set");
    load_and_check(
        dir.path(),
        "moved",
        &serde_json::json!({"snapshot_path": moved.join("vm.state"), "mem_file_path": moved.join("vm.mem"), "resume_vm": true}),
        &at_set,
    );
}

/// A pipe whose buffer is already full: standard output that nobody reads.
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    let (r, mut w) = std::io::pipe().expect("pipe");
    let fd = w.as_raw_fd();
    let set = |on: bool| {
        // SAFETY: F_GETFL/F_SETFL on a pipe descriptor this function owns.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(
                fd,
                libc::F_SETFL,
                if on {
                    fl | libc::O_NONBLOCK
                } else {
                    fl & !libc::O_NONBLOCK
                },
            );
        }
    };
    set(true);
    while w.write(&[b'.'; 4096]).is_ok() {}
    set(false);
    (r, w)
}

#[test]
fn test_should_pause_and_snapshot_promptly_while_nobody_reads_the_console() {
    if !squib_kvm::kvm_or_skip("api_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut reader, writer) = full_pipe();
    let a = Squib::spawn_with_stdout(dir.path(), "a", Stdio::from(writer));
    a.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    a.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": GUEST_KERNEL, "boot_args": "console=ttyS0"}).to_string(),
    );
    a.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    // The guest prints (to the serial file; its standard output is a full pipe) and goes on.
    let n = parse(&a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= 3)))
        .last()
        .map_or(0, |l| l.counter);
    // Every call answers (each within TIMEOUT, or the call panics) though stdout is blocked.
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    a.ok(
        "PUT",
        "/snapshot/create",
        &create_body("Full", &dir.path().join("snap")),
    );
    a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= n + 2));
    // The reader comes back: the guest's lines reach standard output, after the old contents.
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(&got).contains("COUNTER") {
        assert!(
            Instant::now() < deadline,
            "the guest's output never reached standard output"
        );
        let k = reader.read(&mut buf).expect("read stdout");
        assert!(k > 0, "standard output closed");
        got.extend_from_slice(&buf[..k]);
    }
    let m = parse(&a.console()).last().map_or(0, |l| l.counter);
    a.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= m + 2));
}
