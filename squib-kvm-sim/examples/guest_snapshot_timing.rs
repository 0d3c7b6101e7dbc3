//! How long the steps of a snapshot of squib's test guest take on this machine.
//!
//! Boots the guest (2 vCPUs, 512 MiB, dirty tracking on), then times: pause,
//! state capture, a Full snapshot (files fsynced), three Diff snapshots taken
//! ~300 ms of guest time apart, the merge, the load and the restore, up to the
//! first new `COUNTER` line. Needs `/dev/kvm`. Run:
//!
//! `cargo run -p squib-kvm-sim --example guest_snapshot_timing`
#![cfg_attr(not(all(target_os = "linux", target_arch = "x86_64")), allow(missing_docs))]

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use squib_kvm_sim::machine::files::{self, SnapshotPaths, SnapshotType};
    use squib_kvm_sim::machine::guest::{check, parse};
    use squib_kvm_sim::machine::{Capture, Console, GUEST_KERNEL, Machine, MachineConfig, RestoreOptions};

    let timeout = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = |name: &str| SnapshotPaths {
        state: dir.path().join(format!("{name}.state")),
        mem: dir.path().join(format!("{name}.mem")),
    };
    let config = MachineConfig {
        mem_size: 512 << 20,
        vcpus: 2,
        cmdline: String::new(),
        track_dirty_pages: true,
    };
    let capture = Capture::default();
    let t = Instant::now();
    let machine = Machine::boot(
        &config,
        Path::new(GUEST_KERNEL),
        Console::new().with_sink(Box::new(capture.clone())),
    )
    .expect("boot");
    let boot_call = t.elapsed();
    assert!(capture.wait_until(timeout, |t| !parse(t).is_empty()));
    println!(
        "boot call {boot_call:?}, first COUNTER line after {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    machine.pause();
    println!("pause {:?}", t.elapsed());
    let t = Instant::now();
    let state = machine.capture().expect("capture");
    let bytes = state.to_bytes().len();
    println!("capture {:?} ({bytes} bytes encoded)", t.elapsed());
    let base = snap("base");
    let t = Instant::now();
    files::save(&machine, SnapshotType::Full, &base.state, &base.mem).expect("full");
    println!("full snapshot of 512 MiB {:?}", t.elapsed());
    machine.resume();
    let mut diffs = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        machine.pause();
        let paused = t.elapsed();
        let d = snap(&format!("diff{i}"));
        files::save(&machine, SnapshotType::Diff, &d.state, &d.mem).expect("diff");
        let held: u64 = files::read_state(&d.state)
            .expect("state")
            .extents
            .iter()
            .map(|e| e.len())
            .sum();
        let total = t.elapsed();
        if i < 2 {
            machine.resume();
        }
        println!(
            "diff {i}: {} KiB of guest memory, pause {paused:?}, pause to saved {total:?}",
            held >> 10
        );
        diffs.push(d);
    }
    let before = capture.text();
    let at_pause = parse(&before).last().expect("a line").counter;
    drop(machine);

    let merged = snap("merged");
    let t = Instant::now();
    files::merge(&base, &diffs, &merged).expect("merge");
    println!("merge of base + 3 diffs {:?}", t.elapsed());
    let t = Instant::now();
    let (state, memory) = files::load(&merged.state, &merged.mem).expect("load");
    println!("load files {:?}", t.elapsed());
    let after = Capture::default();
    let t = Instant::now();
    let restored = Machine::restore(
        &state,
        memory,
        Console::new().with_sink(Box::new(after.clone())),
        RestoreOptions::default(),
    )
    .expect("restore");
    let restore_call = t.elapsed();
    assert!(after.wait_until(timeout, |t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter > at_pause)
    }));
    println!(
        "restore call {restore_call:?}, next COUNTER line after {:?}",
        t.elapsed()
    );
    assert!(after.wait_until(timeout, |t| {
        parse(&format!("{before}{t}"))
            .last()
            .is_some_and(|l| l.counter >= at_pause + 3)
    }));
    check(&parse(&format!("{before}{}", after.text())), 2).expect("consistent run");
    assert_eq!(restored.failure(), None);
    println!("restored guest consistent through COUNTER {}", at_pause + 3);
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    eprintln!("needs KVM on x86-64 Linux");
}
