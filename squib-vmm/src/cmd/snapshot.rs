//! `squib snapshot ...`: inspect, verify, merge and restore snapshot directories.
//!
//! Every command validates what it reads (see `squib_snapshot::snapshot`); errors name the file
//! and the reason and the exit status is non-zero. `verify` exits 0 only when the whole chain is
//! sound. `--json` output goes to standard output only.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use squib_snapshot::snapshot::load::geometry_name;
use squib_snapshot::snapshot::restore::{bytes_to_read, dump_memory, restore_chain_with};
use squib_snapshot::snapshot::{
    Chain, LoadedSnapshot, RestoreMode, SnapshotState, merge_bytes, merge_chain, verify,
};

use super::CmdResult;
use super::run::BackendKind;

/// `squib snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Show a snapshot's type, id, parent, backend, geometry, regions, extents and size.
    Inspect {
        /// The snapshot directory.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot and its chain: CRCs, links to a full base, extents, every checksum.
    Verify {
        /// The snapshot directory (its whole chain is checked).
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Squash a chain into one full snapshot.
    Merge {
        /// The chain's directories (base first); the chain ending at the last one is merged.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where the full snapshot goes (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a snapshot chain into fresh guest memory.
    Restore {
        /// The newest snapshot of the chain.
        dir: PathBuf,
        /// Map the base's memory file copy-on-write instead of reading it.
        #[arg(long)]
        lazy: bool,
        /// Refuse the chain unless it was taken by this backend.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Write the restored guest memory as one raw file (regions in address order).
        #[arg(long)]
        dump_memory: Option<PathBuf>,
        /// Resume the guest of a booted-kernel snapshot (`squib run --kernel`) and run it this
        /// long, its console on standard output.
        #[arg(long = "for", value_parser = super::run::parse_duration, conflicts_with_all = ["dump_memory", "backend"])]
        run_for: Option<Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `squib snapshot` subcommand.
///
/// # Errors
/// Whatever the subcommand reports.
pub fn run(c: SnapshotCommand) -> CmdResult {
    match c {
        SnapshotCommand::Inspect { dir, json } => inspect(&dir, json),
        SnapshotCommand::Verify { dir, json } => verify_cmd(&dir, json),
        SnapshotCommand::Merge { dirs, out } => {
            let started = Instant::now();
            let Some((leaf, members)) = dirs.split_last() else {
                anyhow::bail!("merge needs at least one snapshot directory");
            };
            let chain = Chain::load(leaf)?;
            let bar = progress_bar(merge_bytes(&chain), "merge");
            let saved = merge_chain(&chain, members, &out, &mut |n| bar.inc(n));
            bar.finish_and_clear();
            let saved = saved?;
            eprintln!(
                "merged {} into {} ({} bytes, {} written) in {:.1?}",
                dirs.last().map(|d| d.display().to_string()).unwrap_or_default(),
                saved.path.display(),
                saved.extent_bytes,
                saved.written_bytes,
                started.elapsed()
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Restore {
            dir,
            lazy,
            backend,
            dump_memory: dump,
            run_for,
            json,
        } => match run_for {
            Some(d) => {
                // Only a booted kernel's snapshot carries vCPU state to resume; a workload run's
                // snapshot (soft, or a KVM workload) holds guest memory alone.
                let snap = LoadedSnapshot::open(&dir)?;
                if snap.state.vcpus.is_empty() {
                    anyhow::bail!(
                        "{}: --for resumes the guest of a booted-kernel snapshot (squib run --kernel); this {} snapshot holds guest memory only, no vCPU state to resume: restore it without --for",
                        dir.display(),
                        snap.state.backend
                    );
                }
                super::run_kernel::resume(&dir, lazy, d, json)
            }
            None => restore_cmd(&dir, lazy, backend, dump, json),
        },
    }
}

/// A bar over `total` bytes on standard error, drawn only when standard error is a terminal (so
/// scripts and pipes see none of it); hidden otherwise.
fn progress_bar(total: u64, what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg:>7} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what);
    bar
}

fn backend_name(b: BackendKind) -> &'static str {
    match b {
        BackendKind::Soft => "soft",
        BackendKind::Kvm => "kvm",
        BackendKind::Hvf => "hvf",
    }
}

fn created(s: &SnapshotState) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(s.created_unix_ms)).to_string()
}

fn inspect(dir: &std::path::Path, as_json: bool) -> CmdResult {
    let mut o = std::io::stdout().lock();
    let snap = LoadedSnapshot::open(dir)?;
    let s = &snap.state;
    if as_json {
        let v = json!({
            "dir": snap.path,
            "state_file": snap.state_path,
            "memory_file": snap.memory_path,
            "type": s.kind.name(),
            "id": s.id.to_string(),
            "parent": s.parent.as_ref().map(|p| json!({"id": p.id.to_string(), "state": p.state})),
            "backend": s.backend,
            "geometry": s.geometry,
            "regions": s.layout.iter().map(|r| json!({"gpa": r.gpa, "len": r.len, "file_offset": r.file_offset})).collect::<Vec<_>>(),
            "extents": s.extents.iter().map(|e| json!({"gpa": e.gpa, "len": e.len, "xxh3": format!("{:016x}", e.xxh3)})).collect::<Vec<_>>(),
            "extent_count": s.extents.len(),
            "dirty_bytes": s.extent_bytes(),
            "memory_bytes": s.layout_bytes(),
            "vcpus": s.vcpus.len(),
            "devices": s.devices.iter().map(|d| json!({"name": d.name, "bytes": d.data.len()})).collect::<Vec<_>>(),
            "created_unix_ms": s.created_unix_ms,
            "created": created(s),
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(o, "snapshot  {}", snap.path.display())?;
    writeln!(o, "state     {}", snap.state_path.display())?;
    writeln!(o, "memory    {}", snap.memory_path.display())?;
    writeln!(o, "type      {}", s.kind.name())?;
    writeln!(o, "id        {}", s.id)?;
    match &s.parent {
        Some(p) => writeln!(o, "parent    {} ({})", p.state, p.id)?,
        None => writeln!(o, "parent    -")?,
    }
    writeln!(o, "backend   {}", s.backend)?;
    writeln!(o, "geometry  {}", geometry_name(&s.geometry))?;
    writeln!(o, "created   {}", created(s))?;
    writeln!(o, "regions   {}", s.layout.len())?;
    for r in &s.layout {
        writeln!(
            o,
            "  {:#014x}..{:#014x}  {:>12} bytes  at file offset {:#x}",
            r.gpa,
            r.gpa + r.len,
            r.len,
            r.file_offset
        )?;
    }
    writeln!(o, "extents   {}", s.extents.len())?;
    writeln!(o, "dirty     {} bytes of {}", s.extent_bytes(), s.layout_bytes())?;
    writeln!(o, "vcpus     {}", s.vcpus.len())?;
    writeln!(
        o,
        "devices   {}",
        s.devices
            .iter()
            .map(|d| format!("{} ({} bytes)", d.name, d.data.len()))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(dir: &std::path::Path, as_json: bool) -> CmdResult {
    let mut o = std::io::stdout().lock();
    let report = verify(dir)?;
    if as_json {
        let v = json!({
            "sound": report.is_sound(),
            "chain": report.chain,
            "extents_checked": report.extents_checked,
            "bytes_checked": report.bytes_checked,
            "problems": report.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        for p in &report.problems {
            eprintln!("squib: {p}");
        }
        writeln!(
            o,
            "{}: {} ({} snapshots, {} extents, {} bytes checked)",
            dir.display(),
            if report.is_sound() { "sound" } else { "CORRUPT" },
            report.chain.len(),
            report.extents_checked,
            report.bytes_checked
        )?;
    }
    Ok(if report.is_sound() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn restore_cmd(
    dir: &std::path::Path,
    lazy: bool,
    backend: Option<BackendKind>,
    dump: Option<PathBuf>,
    as_json: bool,
) -> CmdResult {
    let mut o = std::io::stdout().lock();
    let started = Instant::now();
    let chain = Chain::load(dir)?;
    chain.check_target(backend.map(backend_name), None)?;
    let mode = if lazy {
        RestoreMode::Lazy
    } else {
        RestoreMode::Eager
    };
    let bar = progress_bar(bytes_to_read(&chain, mode), "restore");
    let restored = restore_chain_with(&chain, mode, &mut |n| bar.inc(n));
    bar.finish_and_clear();
    let restored = restored?;
    let elapsed = started.elapsed();
    if let Some(out) = &dump {
        dump_memory(&restored.memory, out).with_context(|| format!("dumping memory to {}", out.display()))?;
    }
    let mode_name = if lazy { "lazy" } else { "eager" };
    if as_json {
        let v = json!({
            "dir": dir,
            "mode": mode_name,
            "chain": chain.members.iter().map(|m| m.path.clone()).collect::<Vec<_>>(),
            "memory_bytes": restored.state.layout_bytes(),
            "bytes_read": restored.bytes_read,
            "vcpus": restored.state.vcpus.len(),
            "restore_us": u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "dump": dump,
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            o,
            "restored {} ({} snapshots, {} bytes of guest memory, {} read, {mode_name}) in {:.2?}",
            dir.display(),
            chain.members.len(),
            restored.state.layout_bytes(),
            restored.bytes_read,
            elapsed
        )?;
        if let Some(out) = dump {
            writeln!(o, "guest memory written to {}", out.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use squib_arch::{GpaRange, PageGeometry};
    use squib_snapshot::snapshot::{ChainWriter, SnapshotMeta};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

    /// A chain of a full snapshot and one diff; returns the leaf and the live memory.
    fn chain(dir: &std::path::Path) -> (PathBuf, Vec<u8>) {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        mem.write_slice(&[7u8; 0x3000], GuestAddress(0x1000)).unwrap();
        let meta = SnapshotMeta::new("soft", PageGeometry::X86_64);
        let mut w = ChainWriter::create(dir).unwrap();
        w.save(&mem, &[], &meta).unwrap();
        mem.write_slice(&[9u8; 0x10], GuestAddress(0x8000)).unwrap();
        let d = w
            .save(&mem, &[GpaRange::new(0x8000, 0x1000).unwrap()], &meta)
            .unwrap();
        let mut live = vec![0u8; 2 << 20];
        mem.read_slice(&mut live, GuestAddress(0)).unwrap();
        (d.path, live)
    }

    #[test]
    fn test_should_exit_zero_from_verify_only_when_the_chain_is_sound() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, _) = chain(dir.path());
        let ok = run(SnapshotCommand::Verify {
            dir: leaf.clone(),
            json: false,
        })
        .unwrap();
        assert_eq!(ok, ExitCode::SUCCESS);
        let mem = dir.path().join("000000-full").join("memory");
        let mut bytes = std::fs::read(&mem).unwrap();
        bytes[0x1800] ^= 1;
        std::fs::write(&mem, bytes).unwrap();
        let bad = run(SnapshotCommand::Verify {
            dir: leaf.clone(),
            json: true,
        })
        .unwrap();
        assert_eq!(bad, ExitCode::FAILURE);
        std::fs::remove_file(dir.path().join("000000-full").join("state")).unwrap();
        let err = run(SnapshotCommand::Verify {
            dir: leaf,
            json: false,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("000000-full"), "{err:#}");
    }

    #[test]
    fn test_should_dump_the_restored_memory_of_a_chain_and_its_merge() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, live) = chain(&dir.path().join("c"));
        let out = dir.path().join("merged");
        run(SnapshotCommand::Merge {
            dirs: vec![leaf.clone()],
            out: out.clone(),
        })
        .unwrap();
        for (src, lazy, name) in [(&leaf, false, "a"), (&leaf, true, "b"), (&out, false, "c")] {
            let dump = dir.path().join(format!("dump-{name}"));
            let code = run(SnapshotCommand::Restore {
                dir: src.clone(),
                lazy,
                backend: Some(BackendKind::Soft),
                dump_memory: Some(dump.clone()),
                run_for: None,
                json: true,
            })
            .unwrap();
            assert_eq!(code, ExitCode::SUCCESS);
            assert_eq!(std::fs::read(&dump).unwrap(), live, "{name}");
        }
        let err = run(SnapshotCommand::Restore {
            dir: leaf,
            lazy: false,
            backend: Some(BackendKind::Kvm),
            dump_memory: None,
            run_for: None,
            json: false,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("backend mismatch"), "{err:#}");
    }

    #[test]
    fn test_should_inspect_a_diff_naming_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, _) = chain(dir.path());
        assert_eq!(
            run(SnapshotCommand::Inspect {
                dir: leaf.clone(),
                json: true
            })
            .unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            run(SnapshotCommand::Inspect {
                dir: leaf,
                json: false
            })
            .unwrap(),
            ExitCode::SUCCESS
        );
        let err = run(SnapshotCommand::Inspect {
            dir: dir.path().join("nope"),
            json: false,
        })
        .unwrap_err();
        // Not a directory, so the path names a state file: the error names it.
        assert!(format!("{err:#}").contains("nope: open failed"), "{err:#}");
    }
}
