//! How long the steps of a snapshot of squib's test guest take on this machine.
//!
//! Boots the guest (2 vCPUs, 512 MiB, dirty tracking on), then times: start to
//! the first `COUNTER` line, pause, a full snapshot into squib's snapshot
//! directory format (all-zero pages left as holes, files and directory
//! fsynced), three diffs taken ~300 ms apart with the guest paused
//! throughout, three live diffs (paused only to capture and copy the dirty
//! pages; written after the resume), the merge, and
//! loads to running (snapshot read or mapped, then `Machine::restore`) of the
//! full base, of the chain and of the merge. Needs `/dev/kvm`. Run (release:
//! the figures in `docs/perf.md`):
//!
//! `cargo run --release -p squib-kvm-sim --example guest_snapshot_timing`
#![cfg_attr(not(all(target_os = "linux", target_arch = "x86_64")), allow(missing_docs))]

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use squib_machine::guest::{check, parse};
    use squib_machine::snapshot::{self, Staging, Target};
    use squib_machine::{Capture, Console, GUEST_KERNEL, Machine, MachineConfig, RestoreOptions};
    use squib_snapshot::snapshot::{ChainWriter, RestoreMode, merge};

    let timeout = Duration::from_secs(60);
    let dir = tempfile::tempdir_in(std::env::var_os("SQUIB_TIMING_DIR").unwrap_or_else(|| ".".into()))
        .expect("temp dir");
    let chain_dir = dir.path().join("chain");
    let mut chain = ChainWriter::create(&chain_dir).expect("chain");
    let config = MachineConfig {
        mem_size: 512 << 20,
        vcpus: 2,
        cmdline: String::new(),
        track_dirty_pages: true,
        initrd: None,
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
        "boot call {boot_call:?}; start to first COUNTER line {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    machine.pause().expect("pause");
    println!("pause {:?}", t.elapsed());
    let t = Instant::now();
    let meta = snapshot::meta(&machine).expect("capture");
    println!("state capture and encode {:?}", t.elapsed());
    drop(meta);
    let t = Instant::now();
    let full = snapshot::save(&machine, Target::Chain(&mut chain)).expect("full");
    println!(
        "full create of 512 MiB {:?} ({} MiB written, the rest zero pages left as holes)",
        t.elapsed(),
        full.written_bytes >> 20
    );
    let base = full.path;
    machine.resume();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        machine.pause().expect("pause");
        let paused = t.elapsed();
        let t = Instant::now();
        let d = snapshot::save(&machine, Target::Chain(&mut chain)).expect("diff");
        let create = t.elapsed();
        machine.resume();
        println!(
            "diff {i} (paused throughout): {} KiB in {} extents; pause {paused:?}; diff create {create:?}",
            d.extent_bytes >> 10,
            d.extents
        );
    }
    let staging = Staging::for_machine(&machine).expect("staging");
    let mut before = String::new();
    for i in 3..6 {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let live = snapshot::save_live_diff(&machine, &mut chain, &staging, || before = capture.text())
            .expect("live diff");
        println!(
            "diff {i} (live): {} KiB in {} extents; guest paused {:?}; diff create {:?}",
            live.saved.extent_bytes >> 10,
            live.saved.extents,
            live.paused,
            t.elapsed()
        );
    }
    let leaf = chain.leaf().expect("leaf");
    let at_pause = parse(&before).last().expect("a line").counter;
    drop(machine);

    let merged = dir.path().join("merged");
    let t = Instant::now();
    merge(std::slice::from_ref(&leaf), &merged).expect("merge");
    println!("merge of base + 6 diffs {:?}", t.elapsed());

    let load = |what: &str, snap: &Path, mode: RestoreMode, check_run: bool| {
        let after = Capture::default();
        let t = Instant::now();
        let loaded = snapshot::load(snap, mode).expect("load");
        let read = t.elapsed();
        let restored = Machine::restore(
            &loaded.state,
            loaded.memory,
            Console::new().with_sink(Box::new(after.clone())),
            RestoreOptions::default(),
        )
        .expect("restore");
        let running = t.elapsed();
        println!("load {what} ({mode:?}) to running {running:?} (files {read:?})");
        if check_run {
            assert!(after.wait_until(timeout, |t| {
                parse(&format!("{before}{t}"))
                    .last()
                    .is_some_and(|l| l.counter >= at_pause + 3)
            }));
            check(&parse(&format!("{before}{}", after.text())), 2).expect("consistent run");
            assert_eq!(restored.failure(), None);
        }
    };
    load("full base", &base, RestoreMode::Lazy, false);
    load("chain of base + 6 diffs", &leaf, RestoreMode::Lazy, true);
    load("merge", &merged, RestoreMode::Lazy, true);
    load("merge", &merged, RestoreMode::Eager, true);
    println!("restored guests consistent through COUNTER {}", at_pause + 3);
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    eprintln!("needs KVM on x86-64 Linux");
}
