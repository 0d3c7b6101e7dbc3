//! The test guest on the KVM machine: boots, ticks on a real timer interrupt,
//! keeps its checksum, and carries on across a capture and restore.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use squib_arch::{GpaRange, PageGeometry};
use squib_machine::guest::{CounterLine, check, parse};
use squib_machine::snapshot::{self, Staging, Target};
use squib_machine::{
    Capture, Console, GUEST_KERNEL, Machine, MachineConfig, MachineState, RestoreOptions, copy_memory,
    new_memory,
};
use squib_snapshot::report::error_chain;
use squib_snapshot::snapshot::save::save_full;
use squib_snapshot::snapshot::{
    ChainWriter, DirectIo, LoadedSnapshot, ParentLink, Placement, RestoreMode, SavedSnapshot, SnapshotKind,
    SnapshotMeta, merge, verify,
};

/// Generous: CPL0 code is emulated on nested hosts and CI machines are busy.
const TIMEOUT: Duration = Duration::from_secs(60);

fn boot(vcpus: u8) -> (Machine, Capture) {
    let capture = Capture::default();
    let console = Console::new().with_sink(Box::new(capture.clone()));
    let config = MachineConfig {
        mem_size: 64 << 20,
        vcpus,
        cmdline: "console=ttyS0 squib.test=1".to_owned(),
        track_dirty_pages: true,
        initrd: None,
    };
    let machine = Machine::boot(&config, Path::new(GUEST_KERNEL), console).expect("boot");
    (machine, capture)
}

fn wait_for_counter(machine: &Machine, capture: &Capture, n: u64) -> Vec<CounterLine> {
    let reached = capture.wait_until(TIMEOUT, |t| {
        parse(t).last().is_some_and(|l| l.counter >= n) || t.contains("EXCEPTION")
    });
    let text = capture.text();
    assert!(
        reached && !text.contains("EXCEPTION"),
        "no COUNTER {n} within {TIMEOUT:?}; failure: {:?}; console:\n{text}",
        machine.failure()
    );
    parse(&text)
}

/// Wait until user mode has run on every CPU since this call (call it right
/// after a resume): two lines printed after the call, the later one showing
/// more finished re-checks than the earlier.
///
/// Neither counting lines nor comparing with the last line before the call is
/// proof: KVM's PIT keeps time while the vCPUs are parked and replays the
/// missed ticks back to back on resume, and those first lines report work
/// done before the pause.
fn wait_for_user_work(capture: &Capture) {
    let seen = parse(&capture.text()).len();
    let done = capture.wait_until(TIMEOUT, |t| {
        let lines = parse(t);
        let fresh = lines.get(seen..).unwrap_or_default();
        match (fresh.first(), fresh.last()) {
            (Some(a), Some(b)) => {
                a.cpus.len() == b.cpus.len() && a.cpus.iter().zip(&b.cpus).all(|(x, y)| y.ok > x.ok)
            }
            _ => false,
        }
    });
    assert!(done, "no user-mode progress:\n{}", capture.text());
}

fn assert_consistent(lines: &[CounterLine], vcpus: usize) {
    if let Err(e) = check(lines, vcpus) {
        panic!("{e}");
    }
}

fn boot_and_count(vcpus: u8) {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let (machine, capture) = boot(vcpus);
    let lines = wait_for_counter(&machine, &capture, 3);
    assert!(
        capture
            .text()
            .starts_with("squib guest: e820=2 ram_mib=63 cmdline=console=ttyS0 squib.test=1\n"),
        "{}",
        capture.text()
    );
    assert_consistent(&lines, usize::from(vcpus));
    assert_eq!(machine.failure(), None);
}

#[test]
fn test_should_boot_guest_and_count_on_timer_interrupts_with_one_vcpu() {
    boot_and_count(1);
}

#[test]
fn test_should_boot_guest_and_count_on_timer_interrupts_with_two_vcpus() {
    boot_and_count(2);
}

fn capture_and_restore_in_process(vcpus: u8) {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let (machine, capture) = boot(vcpus);
    wait_for_counter(&machine, &capture, 2);
    machine.pause().expect("pause");
    let state = machine.capture().expect("capture");
    let memory = copy_memory(machine.memory()).expect("copy memory");
    // The console up to the pause, possibly ending in the middle of a line.
    let before = capture.text();
    let at_pause = parse(&before).last().expect("a line").counter;
    drop(machine);

    // Through bytes, as a snapshot file carries it.
    let state = MachineState::from_bytes(&state.to_bytes()).expect("decode state");
    let after = Capture::default();
    let console = Console::new().with_sink(Box::new(after.clone()));
    let restored = Machine::restore(&state, memory, console, RestoreOptions::default()).expect("restore");
    // The restored guest's output continues the stream where it stopped.
    let continued = after.wait_until(TIMEOUT, |t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    });
    let all = parse(&format!("{before}{}", after.text()));
    assert!(
        continued,
        "no COUNTER {} after restore; failure: {:?}; console after restore:\n{}",
        at_pause + 3,
        restored.failure(),
        after.text()
    );
    assert_consistent(&all, usize::from(vcpus));
    assert_eq!(restored.failure(), None);
}

#[test]
fn test_should_park_every_vcpu_on_one_kick_per_pause_again_and_again() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    // Each pause sends one signal per vCPU; its handler sets immediate_exit, so a kick that lands
    // before KVM_RUN is entered still ends it. A lost kick would leave pause waiting until its
    // deadline and fail here, where many pauses race the guest's own exits (timer, serial).
    let (machine, capture) = boot(2);
    wait_for_counter(&machine, &capture, 1);
    for i in 0..300 {
        if let Err(e) = machine.pause() {
            panic!("pause {i}: {e}");
        }
        assert!(machine.is_paused());
        machine.resume();
    }
    let n = parse(&capture.text()).last().map_or(0, |l| l.counter);
    let lines = wait_for_counter(&machine, &capture, n + 2);
    assert_consistent(&lines, 2);
    assert_eq!(machine.failure(), None);
}

#[test]
fn test_should_refuse_an_xsave_area_larger_than_this_hosts_kvm_takes() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let (machine, capture) = boot(1);
    wait_for_counter(&machine, &capture, 1);
    machine.pause().expect("pause");
    let mut state = machine.capture().expect("capture");
    let memory = copy_memory(machine.memory()).expect("copy memory");
    drop(machine);
    // KVM's area is at least the 4 KiB kvm_xsave; this host's KVM_CAP_XSAVE2 size is what was
    // captured. A state from a host with a larger area (AMX enabled, say) must be refused by
    // size, not copied past the end of the buffer KVM reads.
    let words = state.vcpus[0].xsave.len();
    assert!(
        words >= 1024,
        "captured XSAVE area of {words} words, below kvm_xsave's 1024"
    );
    state.vcpus[0].xsave.resize(words + 2816, 0);
    let err = match Machine::restore(&state, memory, Console::new(), RestoreOptions::default()) {
        Ok(_) => panic!("restored an XSAVE area larger than this host's"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("XSAVE area of") && err.contains(&(words * 4).to_string()),
        "{err}"
    );
}

#[test]
fn test_should_continue_guest_counter_and_checksum_after_in_process_restore() {
    capture_and_restore_in_process(1);
}

#[test]
fn test_should_continue_guest_on_two_vcpus_after_in_process_restore() {
    capture_and_restore_in_process(2);
}

#[test]
fn test_should_not_run_a_guest_restored_paused_until_resumed() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let (machine, capture) = boot(1);
    wait_for_counter(&machine, &capture, 1);
    machine.pause().expect("pause");
    let state = machine.capture().expect("capture");
    let memory = copy_memory(machine.memory()).expect("copy memory");
    let before = capture.text();
    let at_pause = parse(&before).last().expect("a line").counter;
    drop(machine);

    let after = Capture::default();
    let console = Console::new().with_sink(Box::new(after.clone()));
    let restored = Machine::restore(
        &state,
        memory,
        console,
        RestoreOptions {
            paused: true,
            ..RestoreOptions::default()
        },
    )
    .expect("restore");
    // `is_paused` holds only once every vCPU thread is parked in the host (outside KVM_RUN):
    // the guest cannot have run, so nothing it printed can be waiting in the console.
    assert!(restored.is_paused());
    assert_eq!(after.text(), "", "a paused restore ran the guest");
    restored.resume();
    // KVM's PIT ran on host time while the vCPUs were parked and, by its default
    // reinject policy, delivers the ~30 ticks it missed back to back on resume:
    // about 3 lines at once. Wait for lines the guest worked between.
    assert!(after.wait_until(TIMEOUT, |t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 6)
    }));
    let all = format!("{before}{}", after.text());
    if let Err(e) = check(&parse(&all), 1) {
        panic!("{e}\nconsole:\n{all}");
    }
}

/// A minimal ELF64 executable: one PT_LOAD segment at 1 MiB holding `code`,
/// entered at its first byte.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HDRS: u64 = 64 + 56;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(LOAD + HDRS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers
    e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    let size = HDRS + code.len() as u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R X
    e.extend_from_slice(&0u64.to_le_bytes()); // file offset
    e.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    e.extend_from_slice(&size.to_le_bytes());
    e.extend_from_slice(&size.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}

#[test]
fn test_should_report_a_guest_that_faults_before_it_has_an_idt() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = dir.path().join("ud2.elf");
    std::fs::write(&kernel, tiny_elf(&[0x0f, 0x0b])).expect("write kernel"); // ud2
    let config = MachineConfig {
        mem_size: 16 << 20,
        vcpus: 1,
        cmdline: String::new(),
        track_dirty_pages: false,
        initrd: None,
    };
    let machine = Machine::boot(&config, &kernel, Console::new()).expect("boot");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while machine.failure().is_none() {
        assert!(std::time::Instant::now() < deadline, "no failure reported");
        std::thread::sleep(Duration::from_millis(10));
    }
    // #UD with the VMM's empty IDT escalates to a triple fault: KVM shuts the VM down.
    let failure = machine.failure().unwrap_or_default();
    assert!(failure.contains("triple fault"), "{failure}");
    assert!(machine.has_stopped());
}

// ---- full and diff snapshots in squib's snapshot directories ---------------

/// Wait for fresh user-mode work, pause, append a snapshot to `chain`, and
/// return the console as it was at the pause.
fn chain_snapshot(machine: &Machine, capture: &Capture, chain: &mut ChainWriter) -> (String, SavedSnapshot) {
    wait_for_user_work(capture);
    machine.pause().expect("pause");
    let saved = snapshot::save(machine, Target::Chain(chain)).expect("save snapshot");
    (capture.text(), saved)
}

/// Restore the snapshot at `dir` (a chain leaf or a full snapshot) in this
/// process and check that the guest carries on from `before`.
fn restore_and_check(dir: &Path, mode: RestoreMode, before: &str, vcpus: usize) {
    let loaded = snapshot::load(dir, mode).expect("load snapshot");
    let at_pause = parse(before).last().expect("a line").counter;
    let after = Capture::default();
    let console = Console::new().with_sink(Box::new(after.clone()));
    let restored =
        Machine::restore(&loaded.state, loaded.memory, console, RestoreOptions::default()).expect("restore");
    let reached = after.wait_until(TIMEOUT, |t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    });
    let all = format!("{before}{}", after.text());
    assert!(reached, "{}: no COUNTER {}:\n{all}", dir.display(), at_pause + 3);
    if let Err(e) = check(&parse(&all), vcpus) {
        panic!("{}: {e}\nconsole:\n{all}", dir.display());
    }
    assert_eq!(restored.failure(), None);
}

#[test]
fn test_should_restore_guest_from_chain_of_full_base_and_three_diffs_and_from_its_merge() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let chain_dir = dir.path().join("chain");
    let mut chain = ChainWriter::create(&chain_dir).expect("chain");
    let (machine, capture) = boot(2);
    wait_for_counter(&machine, &capture, 1);
    let (_, base) = chain_snapshot(&machine, &capture, &mut chain);
    assert_eq!(base.kind, SnapshotKind::Full);
    let mut before = String::new();
    for i in 0..3 {
        machine.resume();
        // The guest writes all over its work regions between two diffs.
        let (text, d) = chain_snapshot(&machine, &capture, &mut chain);
        assert_eq!(d.kind, SnapshotKind::Diff);
        assert!(
            d.extent_bytes > 0 && d.extent_bytes < 64 << 20,
            "diff {i} holds {} bytes: neither empty nor all of RAM",
            d.extent_bytes
        );
        before = text;
    }
    let leaf = chain.leaf().expect("leaf");
    drop(machine);

    // The chain restores (base mapped copy-on-write, diffs applied), and so does its merge.
    restore_and_check(&leaf, RestoreMode::Lazy, &before, 2);
    let merged = dir.path().join("merged");
    merge(std::slice::from_ref(&leaf), &merged).expect("merge");
    restore_and_check(&merged, RestoreMode::Eager, &before, 2);
    assert!(verify(&leaf).expect("verify chain").is_sound());
}

#[test]
fn test_should_restore_guest_from_a_chain_of_diffs_written_after_the_guest_resumed() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut chain = ChainWriter::create(dir.path()).expect("chain");
    let (machine, capture) = boot(2);
    wait_for_counter(&machine, &capture, 1);
    let staging = Staging::for_machine(&machine).expect("staging");
    let mut before = String::new();
    for i in 0..4 {
        wait_for_user_work(&capture);
        let live = snapshot::save_live_diff(&machine, &mut chain, &staging, || before = capture.text())
            .expect("live save");
        assert_eq!(live.saved.kind == SnapshotKind::Full, i == 0);
        assert!(!machine.is_paused(), "the guest runs on after a live save");
    }
    // The guest keeps writing its work regions while and after the last diff is written.
    wait_for_user_work(&capture);
    drop(machine);
    restore_and_check(&chain.leaf().expect("leaf"), RestoreMode::Lazy, &before, 2);
}

#[test]
fn test_should_keep_pages_of_a_failed_diff_for_the_next_diff() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (machine, capture) = boot(1);
    wait_for_counter(&machine, &capture, 1);
    machine.pause().expect("pause");
    let base_dir = dir.path().join("base");
    let base = snapshot::save(&machine, Target::Full(Placement::Dir(&base_dir))).expect("full");
    machine.resume();
    wait_for_user_work(&capture);
    machine.pause().expect("pause");
    let parent = ParentLink {
        id: base.id,
        state: base.state_path.clone(),
    };
    let nowhere = dir.path().join("missing").join("diff");
    let err = snapshot::save(&machine, Target::Diff(Placement::Dir(&nowhere), parent.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    // The guest has not run since: every page in this diff comes from the failed one.
    let retry = dir.path().join("retry");
    snapshot::save(&machine, Target::Diff(Placement::Dir(&retry), parent)).expect("retry");
    let extents = LoadedSnapshot::open(&retry).expect("open").state.extents;
    let work_region = GpaRange::new(0x40_0000, 1 << 20).expect("range");
    assert!(
        extents.iter().any(|e| GpaRange::new(e.gpa, e.len)
            .expect("extent")
            .intersect(&work_region)
            .is_some()),
        "the retried diff lost the guest's writes: {extents:?}"
    );
}

#[test]
fn test_should_refuse_a_kvm_snapshot_without_machine_state_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let memory = new_memory(4 << 20).expect("memory");
    let plain = dir.path().join("plain");
    save_full(
        Placement::Dir(&plain),
        &memory,
        &SnapshotMeta::new(snapshot::BACKEND, PageGeometry::X86_64),
        &DirectIo,
    )
    .expect("save");
    let err = error_chain(&snapshot::load(&plain, RestoreMode::Lazy).unwrap_err());
    assert!(
        err.contains("plain/state") && err.contains("kvm-machine"),
        "{err}"
    );
    let soft = dir.path().join("soft");
    save_full(
        Placement::Dir(&soft),
        &memory,
        &SnapshotMeta::new("soft", PageGeometry::X86_64),
        &DirectIo,
    )
    .expect("save");
    let err = error_chain(&snapshot::load(&soft, RestoreMode::Lazy).unwrap_err());
    assert!(err.contains("backend mismatch"), "{err}");
}

#[test]
fn test_should_refuse_a_diff_of_a_machine_that_does_not_track_dirty_pages() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = MachineConfig {
        mem_size: 64 << 20,
        vcpus: 1,
        cmdline: String::new(),
        track_dirty_pages: false,
        initrd: None,
    };
    let machine = Machine::boot(&config, Path::new(GUEST_KERNEL), Console::new()).expect("boot");
    machine.pause().expect("pause");
    let mut chain = ChainWriter::create(dir.path()).expect("chain");
    snapshot::save(&machine, Target::Chain(&mut chain)).expect("full without tracking");
    let err = snapshot::save(&machine, Target::Chain(&mut chain))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tracks dirty pages"), "{err}");
}

// ---- across processes ------------------------------------------------------

const CHILD_ROLE: &str = "SQUIB_GUEST_CHILD_ROLE";
const CHILD_DIR: &str = "SQUIB_GUEST_CHILD_DIR";
const CHILD_VCPUS: &str = "SQUIB_GUEST_CHILD_VCPUS";
const CHILD_SNAPSHOT: &str = "SQUIB_GUEST_CHILD_SNAPSHOT";

/// Write `bytes` so that a reader sees the whole file or none of it.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// The two halves of the cross-process test, run in child processes of this
/// test binary: `boot` boots, writes a chain (a full base and three diffs a
/// second apart) while the guest runs and keeps running until it is killed;
/// `restore` restores a snapshot and runs the guest on.
#[test]
#[ignore = "a child process of test_should_restore_running_guest_in_a_new_process_after_kill_9"]
fn guest_child_process() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("child dir"));
    let vcpus: u8 = std::env::var(CHILD_VCPUS)
        .expect("child vcpus")
        .parse()
        .expect("vcpus");
    match std::env::var(CHILD_ROLE).expect("child role").as_str() {
        "boot" => {
            let (machine, capture) = boot(vcpus);
            wait_for_counter(&machine, &capture, 2);
            let mut chain = ChainWriter::create(&dir.join("chain")).expect("chain");
            chain_snapshot(&machine, &capture, &mut chain);
            let mut console = String::new();
            for _ in 0..3 {
                machine.resume();
                // chain_snapshot waits for the guest's user-mode work before it pauses.
                console = chain_snapshot(&machine, &capture, &mut chain).0;
            }
            std::fs::write(dir.join("console.txt"), console).expect("write console");
            let leaf = chain.leaf().expect("leaf");
            // Last: its presence tells the parent the chain is complete.
            write_atomically(&dir.join("leaf"), leaf.as_os_str().as_encoded_bytes());
            machine.resume();
            // Tell the parent once the guest has worked on past the snapshot.
            wait_for_user_work(&capture);
            write_atomically(&dir.join("ran-on"), b"1");
            // Keep the guest running until the parent kills this process.
            loop {
                std::thread::sleep(Duration::from_secs(1));
                assert_eq!(machine.failure(), None);
            }
        }
        "restore" => {
            let snap = PathBuf::from(std::env::var(CHILD_SNAPSHOT).expect("child snapshot"));
            let before = std::fs::read_to_string(dir.join("console.txt")).expect("console");
            let at_pause = parse(&before).last().expect("a line").counter;
            let loaded = snapshot::load(&snap, RestoreMode::Lazy).expect("load");
            let after = Capture::default();
            let console = Console::new().with_sink(Box::new(after.clone()));
            let restored = Machine::restore(&loaded.state, loaded.memory, console, RestoreOptions::default())
                .expect("restore");
            after.wait_until(TIMEOUT, |t| {
                parse(&format!("{before}{t}"))
                    .last()
                    .is_some_and(|l| l.counter >= at_pause + 3)
            });
            let name = snap.file_name().expect("name").to_string_lossy().into_owned();
            std::fs::write(dir.join(format!("restored-{name}.txt")), after.text()).expect("write");
            assert_eq!(restored.failure(), None);
        }
        other => panic!("unknown child role {other:?}"),
    }
}

fn child(role: &str, dir: &Path, vcpus: u8) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "guest_child_process", "--ignored", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_DIR, dir)
        .env(CHILD_VCPUS, vcpus.to_string());
    cmd
}

fn restore_child(dir: &Path, snap: &Path, vcpus: u8) {
    let out = child("restore", dir, vcpus)
        .env(CHILD_SNAPSHOT, snap)
        .output()
        .expect("run restore child");
    assert!(
        out.status.success(),
        "restore child of {} failed: {}\n{}",
        snap.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let before = std::fs::read_to_string(dir.join("console.txt")).expect("console");
    let name = snap.file_name().expect("name").to_string_lossy().into_owned();
    let after = std::fs::read_to_string(dir.join(format!("restored-{name}.txt"))).expect("console");
    let at_pause = parse(&before).last().expect("a line").counter;
    let all = parse(&format!("{before}{after}"));
    assert!(
        all.last().is_some_and(|l| l.counter >= at_pause + 3),
        "guest restored from {} did not reach COUNTER {}:\n{after}",
        snap.display(),
        at_pause + 3
    );
    assert_consistent(&all, usize::from(vcpus));
}

fn restore_in_new_process(vcpus: u8) {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut booted = child("boot", dir.path(), vcpus)
        .spawn()
        .expect("spawn boot child");
    let deadline = Instant::now() + TIMEOUT;
    while !dir.path().join("leaf").exists() {
        if let Some(status) = booted.try_wait().expect("poll boot child") {
            panic!("boot child ended before its snapshots: {status}");
        }
        assert!(Instant::now() < deadline, "no snapshot chain within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest runs on after the snapshot (the child says so); then the process dies without
    // warning.
    let deadline = Instant::now() + TIMEOUT;
    while !dir.path().join("ran-on").exists() {
        if let Some(status) = booted.try_wait().expect("poll boot child") {
            panic!("boot child ended after its snapshots: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not run on past its snapshot within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    booted.kill().expect("kill -9 the boot child");
    booted.wait().expect("reap boot child");

    let leaf = PathBuf::from(std::fs::read_to_string(dir.path().join("leaf")).expect("leaf"));
    restore_child(dir.path(), &leaf, vcpus);
    let merged = dir.path().join("merged");
    merge(std::slice::from_ref(&leaf), &merged).expect("merge");
    restore_child(dir.path(), &merged, vcpus);
}

#[test]
fn test_should_restore_running_guest_in_a_new_process_after_kill_9() {
    restore_in_new_process(2);
}

// ---- initrd ----------------------------------------------------------------------------------

/// Where the zero page says the initrd is: `(ramdisk_image, ramdisk_size)` of `boot_params.hdr`.
fn ramdisk_fields(machine: &Machine) -> (u64, u64) {
    use vm_memory::{Bytes, GuestAddress};
    // struct setup_header starts at 0x1f1 of the zero page; ramdisk_image is at 0x218 and
    // ramdisk_size at 0x21c (Linux's boot protocol, x86/boot.rst).
    let zero_page = squib_machine::layout::ZERO_PAGE_ADDR;
    let image: u32 = machine
        .memory()
        .read_obj(GuestAddress(zero_page + 0x218))
        .unwrap();
    let size: u32 = machine
        .memory()
        .read_obj(GuestAddress(zero_page + 0x21c))
        .unwrap();
    (u64::from(image), u64::from(size))
}

#[test]
fn test_should_load_an_initrd_at_the_top_of_ram_and_name_it_in_the_zero_page_then_boot_the_guest() {
    if !squib_kvm::kvm_or_skip("machine_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = dir.path().join("initrd.img");
    let bytes: Vec<u8> = (0..300_001u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    std::fs::write(&initrd, &bytes).unwrap();
    let capture = Capture::default();
    let config = MachineConfig {
        mem_size: 64 << 20,
        vcpus: 1,
        cmdline: "console=ttyS0".to_owned(),
        track_dirty_pages: false,
        initrd: Some(initrd),
    };
    let machine = Machine::boot(
        &config,
        Path::new(GUEST_KERNEL),
        Console::new().with_sink(Box::new(capture.clone())),
    )
    .expect("boot with an initrd");
    let (addr, size) = ramdisk_fields(&machine);
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(addr % 4096, 0, "page-aligned");
    assert!(
        addr + size <= 64 << 20 && addr + size > (64 << 20) - 4096,
        "at the top of RAM: {addr:#x}"
    );
    let mut loaded = vec![0u8; bytes.len()];
    use vm_memory::{Bytes, GuestAddress};
    machine
        .memory()
        .read_slice(&mut loaded, GuestAddress(addr))
        .unwrap();
    assert!(
        loaded == bytes,
        "the initrd's bytes are in guest memory where the zero page says"
    );
    wait_for_counter(&machine, &capture, 2);
}

#[test]
fn test_should_refuse_an_initrd_that_does_not_fit_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = dir.path().join("huge.img");
    std::fs::write(&initrd, vec![1u8; 5 << 20]).unwrap();
    let config = MachineConfig {
        mem_size: 4 << 20,
        vcpus: 1,
        cmdline: String::new(),
        track_dirty_pages: false,
        initrd: Some(initrd.clone()),
    };
    let err = match Machine::boot(&config, Path::new(GUEST_KERNEL), Console::new()) {
        Ok(_) => panic!("a 5 MiB initrd cannot fit in 4 MiB of RAM"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&initrd.display().to_string()) && err.contains("do not fit"),
        "{err}"
    );
}
