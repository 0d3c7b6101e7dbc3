//! The test guest on the KVM machine: boots, ticks on a real timer interrupt,
//! keeps its checksum, and carries on across a capture and restore.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::Path;
use std::time::Duration;

use squib_kvm_sim::machine::{
    Capture, Console, GUEST_KERNEL, Machine, MachineConfig, MachineState, copy_memory,
};

/// Generous: CPL0 code is emulated on nested hosts and CI machines are busy.
const TIMEOUT: Duration = Duration::from_secs(60);

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("SQUIB_REQUIRE_KVM").as_deref() != Ok("1"),
            "SQUIB_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
        );
        eprintln!("skipped: /dev/kvm cannot be opened");
    }
    ok
}

/// One `COUNTER` line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    counter: u64,
    cpus: Vec<CpuLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CpuLine {
    ck: u64,
    ok: u64,
    bad: u64,
    back: u64,
}

/// Complete lines only: the last one may still be being printed.
fn parse(text: &str) -> Vec<Line> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("COUNTER "))
        .filter_map(|rest| {
            let mut words = rest.split(' ');
            let counter = words.next()?.parse().ok()?;
            let mut cpus: Vec<CpuLine> = Vec::new();
            for w in words {
                let (key, value) = w.split_once('=')?;
                let (name, cpu) = key.split_at(key.len() - 1);
                let cpu: usize = cpu.parse().ok()?;
                if cpus.len() <= cpu {
                    cpus.resize(
                        cpu + 1,
                        CpuLine {
                            ck: 0,
                            ok: 0,
                            bad: 0,
                            back: 0,
                        },
                    );
                }
                let c = &mut cpus[cpu];
                match name {
                    "ck" => c.ck = u64::from_str_radix(value, 16).ok()?,
                    "ok" => c.ok = value.parse().ok()?,
                    "bad" => c.bad = value.parse().ok()?,
                    "back" => c.back = value.parse().ok()?,
                    _ => return None,
                }
            }
            Some(Line { counter, cpus })
        })
        .collect()
}

fn boot(vcpus: u8) -> (Machine, Capture) {
    let capture = Capture::default();
    let console = Console::new().with_sink(Box::new(capture.clone()));
    let config = MachineConfig {
        mem_size: 64 << 20,
        vcpus,
        cmdline: "console=ttyS0 squib.test=1".to_owned(),
    };
    let machine = Machine::boot(&config, Path::new(GUEST_KERNEL), console).expect("boot");
    (machine, capture)
}

fn wait_for_counter(machine: &Machine, capture: &Capture, n: u64) -> Vec<Line> {
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

/// Counter goes up by one per line, the guest's re-checks all agree, time never
/// went backwards, and every CPU made progress.
fn assert_consistent(lines: &[Line], vcpus: usize) {
    for w in lines.windows(2) {
        assert_eq!(w[1].counter, w[0].counter + 1, "counter skipped: {w:?}");
    }
    for l in lines {
        assert_eq!(l.cpus.len(), vcpus, "every CPU reports: {l:?}");
        for c in &l.cpus {
            assert_eq!(c.bad, 0, "checksum re-check failed: {l:?}");
            assert_eq!(c.back, 0, "TSC went backwards: {l:?}");
        }
    }
    for w in lines.windows(2) {
        for (a, b) in w[0].cpus.iter().zip(&w[1].cpus) {
            assert!(b.ok >= a.ok, "re-check count went back: {w:?}");
        }
    }
    let (first, last) = (&lines[0], &lines[lines.len() - 1]);
    for cpu in 0..vcpus {
        assert!(
            last.cpus[cpu].ok > first.cpus[cpu].ok,
            "CPU {cpu} did no work between {first:?} and {last:?}"
        );
    }
}

fn boot_and_count(vcpus: u8) {
    if !kvm_available() {
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
    if !kvm_available() {
        return;
    }
    let (machine, capture) = boot(vcpus);
    wait_for_counter(&machine, &capture, 2);
    machine.pause();
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
    let restored = Machine::restore(&state, memory, console).expect("restore");
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
fn test_should_continue_guest_counter_and_checksum_after_in_process_restore() {
    capture_and_restore_in_process(1);
}

#[test]
fn test_should_continue_guest_on_two_vcpus_after_in_process_restore() {
    capture_and_restore_in_process(2);
}
