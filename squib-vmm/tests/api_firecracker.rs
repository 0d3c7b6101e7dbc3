//! Firecracker's endpoints around snapshots on `squib run --api-sock`, as a Firecracker user
//! calls them: instance info, version, configuration, logger, metrics, the order rules, bad
//! bodies, unknown fields, the devices squib does not have, and `mem_backend` `Uffd` with a
//! page-fault handler written the way Firecracker's users write theirs.
//!
//! The tests before `// --- guests` need no `/dev/kvm`: a process waiting for configuration
//! touches no KVM. The guest tests check the restored guest against its own counter and
//! checksums (`squib_machine::guest::check`).
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod fc_support;

use std::path::Path;
use std::time::{Duration, Instant};

use fc_support::{Handler, Serve, Squib, TIMEOUT};
use squib_machine::GUEST_KERNEL;
use squib_machine::guest::{check, parse};

#[test]
fn test_should_describe_the_instance_its_version_and_its_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Squib::spawn(dir.path(), "s");
    let info = s.get("/");
    assert_eq!(info["id"], "anonymous-instance", "{info}");
    assert_eq!(info["state"], "Not started", "{info}");
    assert_eq!(info["app_name"], "squib", "{info}");
    assert_eq!(info["vmm_version"], env!("CARGO_PKG_VERSION"), "{info}");
    assert_eq!(
        s.get("/version")["firecracker_version"],
        env!("CARGO_PKG_VERSION")
    );
    // Firecracker's defaults before any PUT.
    let mc = s.get("/machine-config");
    assert_eq!(mc["vcpu_count"], 1, "{mc}");
    assert_eq!(mc["mem_size_mib"], 128, "{mc}");
    assert_eq!(mc["smt"], false, "{mc}");
    assert_eq!(mc["track_dirty_pages"], false, "{mc}");
    // PATCH changes only what it names.
    s.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#);
    let mc = s.get("/machine-config");
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(1), Some(64)),
        "{mc}"
    );
    s.ok(
        "PATCH",
        "/machine-config",
        r#"{"vcpu_count": 2, "track_dirty_pages": true}"#,
    );
    let mc = s.get("/machine-config");
    assert_eq!(mc["vcpu_count"], 2, "{mc}");
    assert_eq!(mc["mem_size_mib"], 64, "{mc}");
    assert_eq!(mc["track_dirty_pages"], true, "{mc}");
    assert!(
        s.fault("PATCH", "/machine-config", "{}")
            .contains("Empty PATCH request")
    );
    // A bad value changes nothing.
    let f = s.fault("PATCH", "/machine-config", r#"{"vcpu_count": 9}"#);
    assert!(f.contains("9 vCPUs"), "{f}");
    assert_eq!(s.get("/machine-config")["vcpu_count"], 2);
    // PUT sets every field, the optional ones to their defaults.
    s.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    let mc = s.get("/machine-config");
    assert_eq!(mc["track_dirty_pages"], false, "{mc}");
    s.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": GUEST_KERNEL, "boot_args": "console=ttyS0"}).to_string(),
    );
    let full = s.get("/vm/config");
    assert_eq!(full["machine-config"], mc, "{full}");
    assert_eq!(full["boot-source"]["kernel_image_path"], GUEST_KERNEL, "{full}");
    assert_eq!(full["boot-source"]["boot_args"], "console=ttyS0", "{full}");
    for empty in ["drives", "network-interfaces", "pmem"] {
        assert_eq!(full[empty], serde_json::json!([]), "{empty}: {full}");
    }
    for none in [
        "balloon",
        "vsock",
        "entropy",
        "mmds-config",
        "cpu-config",
        "logger",
        "metrics",
    ] {
        assert!(full[none].is_null(), "{none}: {full}");
    }
}

#[test]
fn test_should_answer_400_naming_each_device_squib_does_not_have() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Squib::spawn(dir.path(), "s");
    let drive =
        r#"{"drive_id": "rootfs", "path_on_host": "/x.ext4", "is_root_device": true, "is_read_only": false}"#;
    let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
    let cases: &[(&str, &str, &str, &str)] = &[
        ("PUT", "/drives/rootfs", drive, "block devices"),
        (
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs"}"#,
            "block devices",
        ),
        ("PUT", "/network-interfaces/eth0", net, "network devices"),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
            "vsock",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true}"#,
            "balloon",
        ),
        ("GET", "/balloon", "", "balloon"),
        ("GET", "/balloon/statistics", "", "balloon"),
        ("PUT", "/mmds", r#"{"k": "v"}"#, "MMDS"),
        ("GET", "/mmds", "", "MMDS"),
        (
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"]}"#,
            "MMDS",
        ),
        ("PUT", "/entropy", "{}", "entropy"),
        ("PUT", "/pmem/p0", r#"{"id": "p0", "path_on_host": "/p"}"#, "pmem"),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 64}"#,
            "memory hotplug",
        ),
        ("PUT", "/cpu-config", "{}", "CPU templates"),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#, "i8042"),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#,
            "CPU templates",
        ),
    ];
    for &(method, path, body, device) in cases {
        let f = s.fault(method, path, body);
        assert!(
            f.contains("squib has no") && f.contains(device),
            "{method} {path}: {f}"
        );
    }
    // On a load, the overrides of devices squib lacks get the same answer (before the files are
    // even looked at).
    let load = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"snapshot_path": "/nonexistent/state", "mem_file_path": "/nonexistent/memory"});
        b.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        s.fault("PUT", "/snapshot/load", &b.to_string())
    };
    let f = load(serde_json::json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}));
    assert!(
        f.contains("squib has no network devices") && f.contains("eth0"),
        "{f}"
    );
    let f = load(serde_json::json!({"vsock_override": {"uds_path": "/v2.sock"}}));
    assert!(f.contains("squib has no vsock device"), "{f}");
    // An empty list overrides nothing: the load goes on and fails on the missing file instead.
    let f = load(serde_json::json!({"network_overrides": []}));
    assert!(f.contains("/nonexistent"), "{f}");
}

#[test]
fn test_should_refuse_unknown_fields_and_bad_bodies_with_400() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Squib::spawn(dir.path(), "s");
    let unknown: &[(&str, &str, &str)] = &[
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#,
        ),
        ("PATCH", "/machine-config", r#"{"bogus": 1}"#),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "bogus": 1}"#,
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart", "bogus": 1}"#,
        ),
        ("PATCH", "/vm", r#"{"state": "Paused", "bogus": 1}"#),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "bogus": 1}"#,
        ),
        ("PUT", "/snapshot/load", r#"{"snapshot_path": "/s", "bogus": 1}"#),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_path": "/m", "backend_type": "File", "bogus": 1}}"#,
        ),
        ("PUT", "/logger", r#"{"log_path": "/l", "bogus": 1}"#),
        ("PUT", "/metrics", r#"{"metrics_path": "/m", "bogus": 1}"#),
        ("PUT", "/serial", r#"{"serial_out_path": "/s", "bogus": 1}"#),
    ];
    for &(method, path, body) in unknown {
        let f = s.fault(method, path, body);
        assert!(f.contains("unknown field `bogus`"), "{method} {path}: {f}");
    }
    let bad: &[(&str, &str, &str, &str)] = &[
        ("PUT", "/machine-config", "{not json", "invalid body"),
        (
            "PUT",
            "/machine-config",
            r#"{"mem_size_mib": 64}"#,
            "missing field `vcpu_count`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 300, "mem_size_mib": 64}"#,
            "300",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "unknown variant `Reboot`",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Sleeping"}"#,
            "unknown variant `Sleeping`",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_path": "/m", "backend_type": "Tape"}}"#,
            "unknown variant `Tape`",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_path": "/m", "backend_type": "File"}}"#,
            "exclusively",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "clock_realtime": true}"#,
            "clock_realtime",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "huge_pages": "2M"}"#,
            "huge_pages",
        ),
        (
            "PUT",
            "/logger",
            r#"{"log_path": "/tmp/x", "level": "Loud"}"#,
            "Loud",
        ),
        ("PUT", "/logger", r#"{"level": "Info"}"#, "log_path"),
        ("PUT", "/machine-config", "", "Empty PUT request"),
        ("PATCH", "/vm", "", "Empty PATCH request"),
        ("GET", "/machine-config", "{}", "GET request cannot have a body"),
        (
            "GET",
            "/nowhere",
            "",
            "Invalid request method and/or path: GET /nowhere",
        ),
        ("DELETE", "/vm", "", "Invalid request method and/or path"),
        (
            "PUT",
            "/snapshot/delete",
            "{}",
            "Invalid request method and/or path",
        ),
    ];
    for &(method, path, body, says) in bad {
        let f = s.fault(method, path, body);
        assert!(f.contains(says), "{method} {path} {body}: {f}");
    }
    // None of those changed anything.
    assert_eq!(s.get("/machine-config")["mem_size_mib"], 128);
    assert_eq!(s.get("/")["state"], "Not started");
}

#[test]
fn test_should_keep_firecrackers_order_rules_before_boot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Squib::spawn(dir.path(), "s");
    // Runtime operations need a guest.
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
    ] {
        let f = s.fault(method, path, body);
        assert!(f.contains("before the guest starts"), "{method} {path}: {f}");
    }
    let f = s.fault("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(f.contains("no kernel configured"), "{f}");
    // The logger and the metrics may come before a load: the load then fails on its files.
    let log = dir.path().join("api.log");
    let metrics = dir.path().join("metrics.json");
    s.ok(
        "PUT",
        "/logger",
        &serde_json::json!({"log_path": log, "level": "Info"}).to_string(),
    );
    s.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics}).to_string(),
    );
    let f = s.fault(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics}).to_string(),
    );
    assert!(f.contains("already initialized"), "{f}");
    let load = serde_json::json!({"snapshot_path": dir.path().join("none/state")}).to_string();
    let f = s.fault("PUT", "/snapshot/load", &load);
    assert!(f.contains("none/state"), "{f}");
    // A boot-specific resource closes the load path.
    s.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#);
    let f = s.fault("PUT", "/snapshot/load", &load);
    assert!(f.contains("boot-specific"), "{f}");
}

#[test]
fn test_should_write_the_api_log_to_the_named_file_at_the_level_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Squib::spawn(dir.path(), "s");
    let log = dir.path().join("api.log");
    s.ok(
        "PUT",
        "/logger",
        &serde_json::json!({"log_path": log, "level": "Warning", "show_level": true}).to_string(),
    );
    s.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#);
    s.fault("PATCH", "/machine-config", r#"{"mem_size_mib": 1}"#);
    let text = std::fs::read_to_string(&log).expect("log file");
    // At Warning, the success is not written, the error is, with its level.
    assert!(!text.contains("executed successfully"), "{text}");
    let err = text
        .lines()
        .find(|l| l.contains("Status code: 400"))
        .unwrap_or_else(|| panic!("no error line:\n{text}"));
    assert!(
        err.contains("[anonymous-instance:") && err.contains(":ERROR]"),
        "{err}"
    );
    assert!(err.contains("1048576 bytes of RAM"), "{err}");
    // Lower the level (and keep the file): requests now appear too.
    s.ok("PUT", "/logger", r#"{"level": "info"}"#);
    s.get("/machine-config");
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        text.contains("The API server received a GET request on \"/machine-config\"."),
        "{text}"
    );
    let full = s.get("/vm/config");
    assert_eq!(full["logger"]["log_path"], log.display().to_string(), "{full}");
    assert_eq!(full["logger"]["level"], "Info", "{full}");
}

// --- guests (need /dev/kvm)

/// Boot the test guest on `s` with `vcpus` and 64 MiB, and wait for its first lines.
fn boot(s: &Squib, vcpus: u8, track: bool) {
    s.ok(
        "PUT",
        "/machine-config",
        &serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": 64, "track_dirty_pages": track}).to_string(),
    );
    s.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": GUEST_KERNEL, "boot_args": "console=ttyS0"}).to_string(),
    );
    s.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    s.wait_console(|t| parse(t).last().is_some_and(|l| l.counter >= 2));
}

/// Pause `s`, save a full snapshot at `snap` (Firecracker's curl flow), and return the console
/// as it was at the pause.
fn pause_and_snapshot(s: &Squib, snap: &Path) -> String {
    s.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    s.ok(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({
            "snapshot_type": "Full", "snapshot_path": snap.join("state"), "mem_file_path": snap.join("memory"),
        })
        .to_string(),
    );
    s.console()
}

fn last_metrics(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("metrics file");
    let line = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no metrics line in {}", path.display()));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("metrics line {line:?}: {e}"))
}

/// Time one call from the client's side.
fn timed_ok(s: &Squib, method: &str, path: &str, body: &str) -> Duration {
    let t = Instant::now();
    s.ok(method, path, body);
    t.elapsed()
}

fn us(v: &serde_json::Value) -> Duration {
    Duration::from_micros(v.as_u64().unwrap_or_else(|| panic!("not a count of µs: {v}")))
}

#[test]
fn test_should_report_snapshot_latencies_no_longer_than_the_client_waited() {
    if !squib_kvm::kvm_or_skip("api_firecracker") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = dir.path().join("metrics.json");
    let a = Squib::spawn(dir.path(), "a");
    a.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics, "emit_id": true}).to_string(),
    );
    boot(&a, 1, true);
    let pause = timed_ok(&a, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(a.get("/")["state"], "Paused");
    let body = |kind: &str, name: &str| {
        let d = dir.path().join(name);
        serde_json::json!({"snapshot_type": kind, "snapshot_path": d.join("state"), "mem_file_path": d.join("memory")})
            .to_string()
    };
    let full = timed_ok(&a, "PUT", "/snapshot/create", &body("Full", "base"));
    let diff = timed_ok(&a, "PUT", "/snapshot/create", &body("Diff", "d1"));
    let resume = timed_ok(&a, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(a.get("/")["state"], "Running");
    a.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let m = last_metrics(&metrics);
    assert_eq!(m["id"], "anonymous-instance", "{m}");
    let l = &m["latencies_us"];
    // The server's own measure of each call (from request to reply) is non-zero and no longer
    // than the client waited for it; the VMM's part is no longer than the API's.
    for (key, client) in [
        ("pause_vm", pause),
        ("full_create_snapshot", full),
        ("diff_create_snapshot", diff),
        ("resume_vm", resume),
    ] {
        let api = us(&l[key]);
        let vmm = us(&l[format!("vmm_{key}")]);
        assert!(
            api > Duration::ZERO && api <= client,
            "{key}: {api:?} vs the client's {client:?}: {m}"
        );
        assert!(vmm <= api, "{key}: vmm {vmm:?} > api {api:?}: {m}");
    }
    assert_eq!(l["load_snapshot"], 0, "no load in this process: {m}");
    // Configuration is closed once the guest runs, metrics and logger included.
    let f = a.fault(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics}).to_string(),
    );
    assert!(f.contains("after the guest has started"), "{f}");
    let f = a.fault("PUT", "/logger", r#"{"log_path": "/tmp/l", "level": "Info"}"#);
    assert!(f.contains("after the guest has started"), "{f}");
    let f = a.fault("PATCH", "/machine-config", r#"{"mem_size_mib": 32}"#);
    assert!(f.contains("after the guest has started"), "{f}");
    // A snapshot needs a pause.
    let f = a.fault("PUT", "/snapshot/create", &body("Full", "running"));
    assert!(f.contains("paused"), "{f}");
}

#[test]
fn test_should_refuse_a_diff_after_a_load_without_track_dirty_pages_and_chain_one_with_it() {
    if !squib_kvm::kvm_or_skip("api_firecracker") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Squib::spawn(dir.path(), "a");
    boot(&a, 1, false);
    let base = dir.path().join("base");
    let before = pause_and_snapshot(&a, &base);
    drop(a);
    let load = |track: bool| {
        serde_json::json!({
            "snapshot_path": base.join("state"),
            "mem_backend": {"backend_type": "File", "backend_path": base.join("memory")},
            "track_dirty_pages": track, "resume_vm": true,
        })
        .to_string()
    };
    let diff_body = |name: &str| {
        let d = dir.path().join(name);
        serde_json::json!({"snapshot_type": "Diff", "snapshot_path": d.join("state"), "mem_file_path": d.join("memory")})
            .to_string()
    };
    // Without tracking, a Diff of the loaded guest is refused, as in Firecracker.
    let b = Squib::spawn(dir.path(), "b");
    b.ok("PUT", "/snapshot/load", &load(false));
    assert_eq!(b.get("/machine-config")["track_dirty_pages"], false);
    b.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let f = b.fault("PUT", "/snapshot/create", &diff_body("d-untracked"));
    assert!(f.contains("track_dirty_pages"), "{f}");
    // A load is refused once a guest is loaded.
    let f = b.fault("PUT", "/snapshot/load", &load(false));
    assert!(f.contains("fresh process"), "{f}");
    drop(b);
    // With tracking, the diff chains to the loaded snapshot: it verifies as a 2-member chain and
    // loads into a third process whose guest carries on from the diff.
    let c = Squib::spawn(dir.path(), "c");
    c.ok("PUT", "/snapshot/load", &load(true));
    assert_eq!(c.get("/machine-config")["track_dirty_pages"], true);
    let at_load = parse(&before).last().expect("a line").counter;
    let ran = c.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_load + 2)
    });
    c.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    c.ok("PUT", "/snapshot/create", &diff_body("d1"));
    let before = format!("{before}{}", c.console());
    let _ = ran;
    drop(c);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(["snapshot", "verify"])
        .arg(dir.path().join("d1"))
        .output()
        .expect("squib snapshot verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("sound (2 snapshots"),
        "{report}"
    );
    let d = Squib::spawn(dir.path(), "d");
    d.ok(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": dir.path().join("d1/state"), "resume_vm": true}).to_string(),
    );
    let at_pause = parse(&before).last().expect("a line").counter;
    let after = d.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 2)
    });
    let all = format!("{before}{after}");
    if let Err(e) = check(&parse(&all), 1) {
        panic!("{e}\nconsole:\n{all}");
    }
}

fn uffd_load(snap: &Path, socket: &Path, resume: bool, track: bool) -> String {
    serde_json::json!({
        "snapshot_path": snap.join("state"),
        "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
        "resume_vm": resume, "track_dirty_pages": track,
    })
    .to_string()
}

#[test]
fn test_should_run_a_restored_guest_on_pages_a_firecracker_style_handler_serves() {
    if !squib_kvm::kvm_or_skip("api_firecracker") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Squib::spawn(dir.path(), "a");
    boot(&a, 2, false);
    let base = dir.path().join("base");
    let before = pause_and_snapshot(&a, &base);
    drop(a);

    let socket = dir.path().join("uffd.sock");
    let handler = Handler::spawn(&socket, &base.join("memory"), Serve::Pages);
    let metrics = dir.path().join("metrics.json");
    let b = Squib::spawn(dir.path(), "b");
    b.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({"metrics_path": metrics}).to_string(),
    );
    b.ok("PUT", "/snapshot/load", &uffd_load(&base, &socket, true, true));
    let at_pause = parse(&before).last().expect("a line").counter;
    let after = b.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    });
    let all = format!("{before}{after}");
    if let Err(e) = check(&parse(&all), 2) {
        panic!("{e}\nconsole:\n{all}");
    }
    assert!(
        handler.served() > 0,
        "the guest ran on pages the handler copied in"
    );
    b.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let m = last_metrics(&metrics);
    assert!(m["latencies_us"]["load_snapshot"].as_u64() > Some(0), "{m}");
    // Firecracker's diffs after a load chain to the loaded snapshot; so do squib's, over served
    // memory too (the dirty pages were all served before they were written).
    b.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let d1 = dir.path().join("d1");
    b.ok(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_type": "Diff", "snapshot_path": d1.join("state"), "mem_file_path": d1.join("memory")})
            .to_string(),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_squib"))
        .args(["snapshot", "verify"])
        .arg(&d1)
        .output()
        .expect("squib snapshot verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("sound (2 snapshots"),
        "{report}"
    );
    drop(b);
    let report = handler.die();
    assert_eq!(report.error, None);
    assert!(report.got_fd, "the userfaultfd came with the handshake");
    // The handshake, field by field, as Firecracker sends it: one region at memory-file offset 0,
    // 4 KiB pages, and the deprecated page_size_kib holding bytes.
    let hs = report.handshake.expect("a handshake");
    let regions = hs.as_array().unwrap_or_else(|| panic!("not an array: {hs}"));
    assert_eq!(regions.len(), 1, "{hs}");
    let r = regions[0].as_object().expect("object");
    let keys: Vec<&str> = r.keys().map(String::as_str).collect();
    let mut want = vec![
        "base_host_virt_addr",
        "offset",
        "page_size",
        "page_size_kib",
        "size",
    ];
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{hs}");
    assert_eq!(r["size"], 64 << 20, "{hs}");
    assert_eq!(r["offset"], 0, "{hs}");
    assert_eq!(r["page_size"], 4096, "{hs}");
    assert_eq!(r["page_size_kib"], 4096, "{hs}");
    assert!(
        r["base_host_virt_addr"]
            .as_u64()
            .is_some_and(|a| a != 0 && a % 4096 == 0),
        "{hs}"
    );
    // Every page the handler copied in lies in the region it was told about.
    let base_addr = r["base_host_virt_addr"].as_u64().expect("address");
    assert!(
        report
            .pages
            .iter()
            .all(|&p| (base_addr..base_addr + (64 << 20)).contains(&p)),
        "pages outside the region"
    );
}

#[test]
fn test_should_fail_a_uffd_load_clearly_when_no_handler_takes_the_handshake() {
    if !squib_kvm::kvm_or_skip("api_firecracker") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Squib::spawn(dir.path(), "a");
    boot(&a, 1, true);
    let base = dir.path().join("base");
    pause_and_snapshot(&a, &base);
    let d1 = dir.path().join("d1");
    a.ok(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_type": "Diff", "snapshot_path": d1.join("state"), "mem_file_path": d1.join("memory")})
            .to_string(),
    );
    drop(a);
    let b = Squib::spawn(dir.path(), "b");
    // Nothing at the path.
    let missing = dir.path().join("nobody.sock");
    let f = b.fault("PUT", "/snapshot/load", &uffd_load(&base, &missing, true, false));
    assert!(f.contains("nobody.sock") && f.contains("cannot connect"), "{f}");
    // A listener that never accepts: an error within the handshake timeout, not a hang.
    let deaf = dir.path().join("deaf.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&deaf).expect("bind");
    let t = Instant::now();
    let f = b.fault("PUT", "/snapshot/load", &uffd_load(&base, &deaf, true, false));
    let took = t.elapsed();
    assert!(
        f.contains("deaf.sock") && f.contains("did not accept and read the handshake"),
        "{f}"
    );
    assert!(took < TIMEOUT, "the load answered after {took:?}");
    // A diff's memory is spread over its chain: refused with the reason, before any connection.
    let f = b.fault("PUT", "/snapshot/load", &uffd_load(&d1, &missing, true, false));
    assert!(f.contains("d1/state") && f.contains("a Diff snapshot"), "{f}");
    // Failed loads leave the process fresh: a load from the files still works.
    assert_eq!(b.get("/")["state"], "Not started");
    b.ok(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": base.join("state"), "resume_vm": false}).to_string(),
    );
    assert_eq!(b.get("/")["state"], "Paused");
}

#[test]
fn test_should_stop_the_guest_with_an_error_when_its_page_fault_handler_dies() {
    if !squib_kvm::kvm_or_skip("api_firecracker") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Squib::spawn(dir.path(), "a");
    boot(&a, 2, false);
    let base = dir.path().join("base");
    let before = pause_and_snapshot(&a, &base);
    drop(a);
    let at_pause = parse(&before).last().expect("a line").counter;

    // 1. A handler that serves, then dies while the guest runs.
    let socket = dir.path().join("serving.sock");
    let handler = Handler::spawn(&socket, &base.join("memory"), Serve::Pages);
    let mut b = Squib::spawn(dir.path(), "b");
    b.ok("PUT", "/snapshot/load", &uffd_load(&base, &socket, true, false));
    b.wait_console(|t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 2)
    });
    let report = handler.die();
    assert_eq!(report.error, None);
    let info = b.wait_info("the guest stopped after its handler died", |i| {
        !i["failure"].is_null()
    });
    let failure = info["failure"].as_str().expect("a failure message");
    assert!(
        failure.contains("serving.sock") && failure.contains("hung up"),
        "{info}"
    );
    assert_eq!(info["state"], "Paused", "{info}");
    // The process lives on and every call answers, saying why the guest cannot run or be saved.
    assert!(b.child.try_wait().expect("poll").is_none(), "squib ended");
    let f = b.fault("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert!(f.contains("has failed") && f.contains("serving.sock"), "{f}");
    let snap = dir.path().join("after-death");
    let f = b.fault(
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": snap.join("state"), "mem_file_path": snap.join("memory")})
            .to_string(),
    );
    assert!(f.contains("has failed"), "{f}");
    assert!(!snap.exists());
    drop(b);

    // 2. A handler that takes the handshake and never serves: the vCPUs block on their first
    // fault (a fault KVM takes in kernel mode waits through signals), so a pause cannot complete;
    // it answers with the reason within its timeout instead of hanging. Then the handler dies
    // and the guest is stopped.
    let socket = dir.path().join("idle.sock");
    let handler = Handler::spawn(&socket, &base.join("memory"), Serve::Nothing);
    let c = Squib::spawn(dir.path(), "c");
    c.ok("PUT", "/snapshot/load", &uffd_load(&base, &socket, true, false));
    let f = c.fault("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert!(
        f.contains("of 2 vCPUs did not pause within") && f.contains("fault"),
        "{f}"
    );
    assert_eq!(c.get("/")["state"], "Running");
    c.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(handler.served(), 0);
    let report = handler.die();
    assert_eq!(report.error, None);
    let info = c.wait_info("the guest stopped after its idle handler died", |i| {
        !i["failure"].is_null()
    });
    assert!(
        info["failure"].as_str().is_some_and(|f| f.contains("idle.sock")),
        "{info}"
    );
    // Nothing the guest printed came from a page the handler never served.
    assert!(parse(&c.console()).is_empty(), "{}", c.console());
}
