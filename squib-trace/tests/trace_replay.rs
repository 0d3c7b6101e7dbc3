//! Trace replay: exact fault and byte counts for `fine` and `coarse` on hand-made traces, the
//! epoch rules, input handling and errors.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;

use proptest::prelude::*;
use squib_arch::PageGeometry;
use squib_snapshot::Policy;
use squib_trace::{ReplayConfig, ReplayReport, TraceError, TraceFormat, replay, replay_path};

const MS: u64 = 1_000_000;
const EPOCH: u64 = 100 * MS;

fn run(text: &str, policy: Policy, mem: u64) -> Result<ReplayReport, TraceError> {
    replay(text.as_bytes(), &ReplayConfig::new(policy), mem)
}

fn run_with(text: &str, cfg: &ReplayConfig, mem: Option<u64>) -> Result<ReplayReport, TraceError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    replay_path(f.path(), cfg, mem, &mut |r, _, _| r)
}

#[test]
fn test_should_fault_once_per_distinct_unit_per_epoch_under_fine() {
    let trace = format!(
        "0 0x0 8\n10 0x10 8\n20 0x4000 8\n{} 0x0 8\n{} 0x3ffc 8\n",
        EPOCH - 1,
        EPOCH
    );
    let r = run(&trace, Policy::Fine, 4 << 20).unwrap();
    // Epoch 0: units 0 and 1 (the write at EPOCH-1 hits unit 0 again). Epoch 1 (the write at
    // exactly EPOCH belongs to it): units 0 and 1, spanning.
    assert_eq!(r.faults, 4);
    assert_eq!(r.dirty_bytes, 4 * 0x4000);
    assert_eq!(r.checkpoints, 2);
    assert_eq!(r.protect_calls, 1 + 2, "start, then one per dirty epoch");
    assert_eq!(r.writes, 5);
    let cost = 4.0 * 4.0 + 3.0 * 120.0 + (4.0 * 16384.0) / 500.0;
    assert!((r.modelled_cost_us - cost).abs() < 1e-6);
}

#[test]
fn test_should_fault_once_per_distinct_block_per_epoch_under_coarse() {
    let trace = format!(
        "0 0x0 8\n1 0x1ffff8 8\n2 0x200000 1\n{EPOCH} 0x100 4\n{} 0x3ffffc 8\n",
        EPOCH + 1
    );
    let r = run(&trace, Policy::Coarse, 6 << 20).unwrap();
    // Epoch 0: blocks 0 and 1. Epoch 1: block 0, then a write spanning blocks 1 and 2.
    assert_eq!(r.faults, 5);
    assert_eq!(r.dirty_bytes, 5 * (2 << 20));
}

#[test]
fn test_should_close_epochs_at_checkpoint_lines() {
    let trace = "0 0x0 8\n5 checkpoint\n5 0x0 8\n6 0x0 8\n";
    let r = run(trace, Policy::Fine, 2 << 20).unwrap();
    assert_eq!((r.faults, r.checkpoints), (2, 2));
    // A checkpoint line at a periodic boundary just taken is that same checkpoint.
    let trace = format!("0 0x0 8\n{EPOCH} checkpoint\n{EPOCH} 0x0 8\n");
    let r = run(&trace, Policy::Fine, 2 << 20).unwrap();
    assert_eq!((r.faults, r.checkpoints), (2, 2));
}

#[test]
fn test_should_give_the_zero_result_for_a_trace_without_writes() {
    for text in ["", "# nothing\n\n", "5 checkpoint\n"] {
        let r = run_with(text, &ReplayConfig::new(Policy::Adaptive), None).unwrap();
        assert_eq!(
            (r.writes, r.faults, r.protect_calls, r.dirty_bytes, r.checkpoints),
            (0, 0, 0, 0, 0),
            "{text:?}"
        );
        assert_eq!(r.modelled_cost_us, 0.0);
    }
}

#[test]
fn test_should_size_ram_from_the_trace_and_refuse_writes_outside_mem() {
    let trace = "0 0x0 8\n1 0x500000 8\n";
    let r = run_with(trace, &ReplayConfig::new(Policy::Fine), None).unwrap();
    assert_eq!(r.mem_bytes, 6 << 20);
    match run_with(trace, &ReplayConfig::new(Policy::Fine), Some(4 << 20)) {
        Err(TraceError::OutsideRam {
            line: 2,
            gpa: 0x50_0000,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_should_report_malformed_lines_and_time_going_backwards_by_line() {
    let err = run_with("0 0x0 8\n1 0x0 eight\n", &ReplayConfig::new(Policy::Fine), None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("line 2") && msg.contains("1 0x0 eight"), "{msg}");
    let err = run_with("5 0x0 8\n# c\n3 0x0 8\n", &ReplayConfig::new(Policy::Fine), None).unwrap_err();
    assert!(matches!(err, TraceError::TimeBackwards { line: 3, .. }), "{err}");
}

#[test]
fn test_should_read_gzip_directly() {
    let trace = "0 0x0 8\n1 0x8000 8\n200000000 0x0 8\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(trace.as_bytes()).unwrap();
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&gz.finish().unwrap()).unwrap();
    let cfg = ReplayConfig::new(Policy::Fine);
    let zipped = replay_path(f.path(), &cfg, None, &mut |r, _, _| r).unwrap();
    assert_eq!(zipped, run_with(trace, &cfg, None).unwrap());
    assert_eq!(zipped.faults, 3);
}

#[test]
fn test_should_name_a_missing_trace_file() {
    let err = replay_path(
        Path::new("/nonexistent/t.trace"),
        &ReplayConfig::new(Policy::Fine),
        None,
        &mut |r, _, _| r,
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/t.trace"), "{err}");
}

#[test]
fn test_should_count_the_epochs_of_a_long_gap_exactly_and_quickly() {
    let trace = "0 0x0 8\n1000000000000000 0x0 8\n";
    let r = run(trace, Policy::Adaptive, 2 << 20).unwrap();
    // 10^7 boundaries before the second write, and the end of the trace closes one more.
    assert_eq!(r.checkpoints, 10_000_000 + 1);
    assert_eq!(r.faults, 2);
}

#[test]
fn test_should_replay_lackey_with_packing_and_instruction_time() {
    // Two process blocks far apart pack into guest blocks 0 and 1; 2e8 instructions at 0.5 ns
    // make the second half land one epoch later.
    let mut t = String::from("==7== Lackey, an example Valgrind tool\n");
    t.push_str("I  04000000,4\n S 7ff000000,8\n M 04100000,4\n");
    let mut cfg = ReplayConfig::new(Policy::Fine);
    cfg.format = TraceFormat::Lackey;
    cfg.ns_per_instr = 0.5;
    let r = run_with(&t, &cfg, None).unwrap();
    assert_eq!((r.mem_bytes, r.faults, r.checkpoints), (4 << 20, 2, 1));
    cfg.ns_per_instr = 1e8; // EPOCH
    t.push_str("I  04000004,4\n S 7ff000000,8\n");
    let r = run_with(&t, &cfg, None).unwrap();
    // Time is EPOCH after the first I and 2·EPOCH after the second, and a write at exactly a
    // boundary belongs to the epoch after it: epoch 0 is empty, epoch 1 takes two faults, epoch 2
    // one.
    assert_eq!((r.faults, r.checkpoints), (3, 3));
}

#[test]
fn test_should_replay_the_committed_lackey_sample() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample.lackey.gz");
    let mut cfg = ReplayConfig::new(Policy::Fine);
    cfg.format = TraceFormat::Lackey;
    cfg.checkpoint_every = std::time::Duration::from_micros(1);
    let fine = replay_path(&path, &cfg, None, &mut |r, _, _| r).unwrap();
    cfg.tracking.policy = Policy::Coarse;
    let coarse = replay_path(&path, &cfg, None, &mut |r, _, _| r).unwrap();
    assert!(fine.writes > 100, "{fine:?}");
    assert_eq!(fine.writes, coarse.writes);
    assert!(coarse.faults <= fine.faults);
    assert!(coarse.dirty_bytes >= fine.dirty_bytes);
}

/// Exact counts from an independent model: per epoch, the set of distinct units touched.
fn expected(writes: &[(u64, u64, u64)], unit: u64) -> (u64, u64) {
    let mut faults = 0;
    let mut epoch = None;
    let mut set = BTreeSet::new();
    let mut flush = |set: &mut BTreeSet<u64>| {
        faults += set.len() as u64;
        set.clear();
    };
    for &(t, gpa, len) in writes {
        let e = t / EPOCH;
        if epoch != Some(e) {
            flush(&mut set);
            epoch = Some(e);
        }
        for u in gpa / unit..=(gpa + len - 1) / unit {
            set.insert(u);
        }
    }
    flush(&mut set);
    (faults, faults * unit)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn test_should_match_the_distinct_unit_model_exactly(
        deltas in proptest::collection::vec((0u64..60 * MS, 0u64..(8 << 20) - 64, 1u64..20_000), 1..120),
        x86 in any::<bool>(),
    ) {
        let mem = 8u64 << 20;
        let mut t = 0;
        let mut writes = Vec::new();
        let mut text = String::new();
        for (dt, gpa, len) in deltas {
            t += dt;
            let len = len.min(mem - gpa);
            writes.push((t, gpa, len));
            text.push_str(&format!("{t} {gpa:#x} {len}\n"));
        }
        let geometry = if x86 { PageGeometry::X86_64 } else { PageGeometry::APPLE_SILICON };
        for (policy, unit) in [(Policy::Fine, geometry.tracking_hot), (Policy::Coarse, geometry.tracking_default)] {
            let mut cfg = ReplayConfig::new(policy);
            cfg.geometry = geometry;
            let r = replay(text.as_bytes(), &cfg, mem).unwrap();
            let (faults, bytes) = expected(&writes, unit);
            prop_assert_eq!(r.faults, faults, "{}", policy);
            prop_assert_eq!(r.dirty_bytes, bytes, "{}", policy);
        }
    }

    #[test]
    fn test_should_never_panic_on_arbitrary_input(bytes in proptest::collection::vec(any::<u8>(), 0..400), lackey in any::<bool>()) {
        let mut cfg = ReplayConfig::new(Policy::Adaptive);
        if lackey {
            cfg.format = TraceFormat::Lackey;
        }
        let _ = replay(bytes.as_slice(), &cfg, 4 << 20);
    }

    #[test]
    fn test_should_never_panic_on_near_miss_lines(
        lines in proptest::collection::vec("[0-9 xXa-fA-F#ISLM,checkpoint\t-]{0,30}", 0..20),
        lackey in any::<bool>(),
    ) {
        let mut cfg = ReplayConfig::new(Policy::Region);
        if lackey {
            cfg.format = TraceFormat::Lackey;
        }
        let _ = replay(lines.join("\n").as_bytes(), &cfg, 4 << 20);
    }
}

#[test]
fn test_should_report_the_json_fields_design_md_names() {
    let r = run("0 0x0 8\n1 0x4000 8\n", Policy::Fine, 2 << 20).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    for (field, want) in [
        ("writes", 2.0),
        ("faults", 2.0),
        ("protect_calls", 2.0),
        ("dirty_bytes", 32768.0),
        ("checkpoints", 1.0),
        ("step_downs", 0.0),
        ("modelled_cost_us", 8.0 + 240.0 + 32768.0 / 500.0),
    ] {
        let got = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing from {v}"));
        assert!((got - want).abs() < 1e-9, "{field}: {got} != {want}");
    }
}
