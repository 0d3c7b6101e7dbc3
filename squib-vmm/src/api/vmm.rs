//! The state machine behind Firecracker's endpoints: configure, start or load,
//! pause, snapshot, resume.
//!
//! As in Firecracker, configuration is accepted only before the guest starts,
//! a snapshot is taken only while paused, and a load is accepted only by a
//! process that has not started a guest. Request bodies use Firecracker's
//! field names; unknown fields are refused, so a typo is an error rather than
//! a silently ignored setting.
//!
//! # Snapshot paths: Firecracker's two files anywhere
//!
//! squib writes one snapshot format everywhere (`specs/17-snapshot-files.md`):
//! a state file that records where its memory file and its parent's state
//! file are, and a memory file carrying the snapshot's id. The API takes
//! Firecracker's fields as Firecracker does:
//!
//! - `snapshot_path` is the state file and `mem_file_path` the memory file,
//!   each any path (relative paths are taken from this process's working
//!   directory). A file already at either path is replaced, atomically.
//!   Without `mem_file_path`, or with `DIR/state` and `DIR/memory` for a `DIR`
//!   that does not exist yet, the snapshot is squib's directory `DIR`, which
//!   appears atomically.
//! - A `Diff` is a diff of the last snapshot this process created or loaded,
//!   and records where that snapshot's state file is. Naming that snapshot's
//!   memory file as `mem_file_path` merges the diff into it in place (it must
//!   be a full snapshot): the result is a full snapshot at `snapshot_path`,
//!   and the old state file no longer loads (refused by name).
//! - Loading a diff loads its chain: the base mapped copy-on-write, the diffs
//!   applied on top. `mem_file_path` (or `mem_backend.backend_path` with
//!   `backend_type` `File`) names the leaf's memory file; without it the one
//!   its state file records is used.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use squib_machine::snapshot::{self, Target};
use squib_machine::{Console, Machine, MachineConfig, RestoreOptions};
use squib_snapshot::report::{ErrorChain, error_chain};
use squib_snapshot::snapshot::{
    LoadedSnapshot, MEMORY_FILE, ParentLink, Placement, RestoreMode, STATE_FILE, SnapshotId, SnapshotKind,
};

use super::http::{Request, Response};

/// Makes the console for each guest this process starts (terminal, file...).
pub type ConsoleFactory = Box<dyn Fn() -> std::io::Result<Console> + Send>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfigBody {
    vcpu_count: u8,
    mem_size_mib: u64,
    #[serde(default)]
    smt: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    cpu_template: Option<String>,
    #[serde(default)]
    huge_pages: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSourceBody {
    kernel_image_path: PathBuf,
    #[serde(default)]
    boot_args: Option<String>,
    #[serde(default)]
    initrd_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    #[serde(default)]
    snapshot_type: Option<String>,
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackendBody {
    backend_path: PathBuf,
    backend_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemBackendBody>,
    #[serde(default)]
    enable_diff_snapshots: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
}

/// The guest this process serves, from configuration to running.
pub struct Vmm {
    config: MachineConfig,
    kernel: Option<PathBuf>,
    machine: Option<Machine>,
    console: ConsoleFactory,
    /// The newest snapshot of this guest (created or loaded): what a diff chains to.
    last_snapshot: Option<LastSnapshot>,
}

/// The snapshot a diff follows: where its files are (absolute), its id, whether it is full, and
/// (once a diff has been merged into it) its loaded state, kept so that the next in-place merge
/// need not read the state file back.
#[derive(Debug)]
struct LastSnapshot {
    state: PathBuf,
    memory: PathBuf,
    id: SnapshotId,
    full: bool,
    loaded: Option<LoadedSnapshot>,
}

impl LastSnapshot {
    fn new(state: &Path, memory: &Path, id: SnapshotId, kind: SnapshotKind) -> Self {
        Self {
            state: absolute(state),
            memory: absolute(memory),
            id,
            full: kind == SnapshotKind::Full,
            loaded: None,
        }
    }
}

/// `path` made absolute against this process's working directory (as given when that fails).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("config", &self.config)
            .field("kernel", &self.kernel)
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

type Reply = Result<Response, Response>;

fn bad(message: impl Into<String>) -> Response {
    Response::fault(400, &message.into())
}

fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body)
        .map_err(|e| bad(format!("{} {}: invalid body: {e}", req.method, req.path)))
}

impl Vmm {
    /// A VMM with Firecracker's defaults (1 vCPU, 128 MiB) and no guest yet.
    #[must_use]
    pub fn new(console: ConsoleFactory) -> Self {
        Self {
            config: MachineConfig {
                mem_size: 128 << 20,
                vcpus: 1,
                cmdline: String::new(),
                track_dirty_pages: false,
                initrd: None,
            },
            kernel: None,
            machine: None,
            console,
            last_snapshot: None,
        }
    }

    /// Set what `PUT /machine-config` and `PUT /boot-source` would (for `squib run --kernel`).
    pub fn configure(&mut self, config: MachineConfig, kernel: PathBuf) {
        self.config = config;
        self.kernel = Some(kernel);
    }

    /// The first fatal error of the running guest, if any.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.machine.as_ref().and_then(Machine::failure)
    }

    /// Boot the configured kernel (`InstanceStart`).
    ///
    /// # Errors
    /// A message saying what is missing or failed.
    pub fn start(&mut self) -> Result<(), String> {
        if self.machine.is_some() {
            return Err("InstanceStart: the guest has already started".to_owned());
        }
        let kernel = self
            .kernel
            .clone()
            .ok_or("InstanceStart: no kernel configured (PUT /boot-source first)")?;
        let console = (self.console)().map_err(|e| format!("opening the console: {e}"))?;
        let machine = Machine::boot(&self.config, &kernel, console)
            .map_err(|e| format!("booting {}: {}", kernel.display(), ErrorChain(&e)))?;
        self.machine = Some(machine);
        Ok(())
    }

    fn not_started(&self, what: &str) -> Result<(), Response> {
        if self.machine.is_some() {
            return Err(bad(format!(
                "{what}: not allowed after the guest has started or been loaded"
            )));
        }
        Ok(())
    }

    fn running(&self, what: &str) -> Result<&Machine, Response> {
        self.machine
            .as_ref()
            .ok_or_else(|| bad(format!("{what}: no guest has been started or loaded")))
    }

    fn state_name(&self) -> &'static str {
        match &self.machine {
            None => "Not started",
            Some(m) if m.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Serve one request.
    pub fn handle(&mut self, req: &Request) -> Response {
        match self.route(req) {
            Ok(r) | Err(r) => r,
        }
    }

    fn route(&mut self, req: &Request) -> Reply {
        match (req.method.as_str(), req.path.trim_end_matches('/')) {
            ("GET", "") => Ok(Response::ok(
                serde_json::json!({
                    "id": "anonymous-instance",
                    "state": self.state_name(),
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "squib",
                })
                .to_string(),
            )),
            ("GET", "/machine-config") => Ok(Response::ok(
                serde_json::json!({
                    "vcpu_count": self.config.vcpus,
                    "mem_size_mib": self.config.mem_size >> 20,
                    "smt": false,
                    "track_dirty_pages": self.config.track_dirty_pages,
                })
                .to_string(),
            )),
            ("PUT", "/machine-config") => self.put_machine_config(req),
            ("PUT", "/boot-source") => self.put_boot_source(req),
            ("PUT", "/actions") => self.put_action(req),
            ("PATCH", "/vm") => self.patch_vm(req),
            ("PUT", "/snapshot/create") => self.snapshot_create(req),
            ("PUT", "/snapshot/load") => self.snapshot_load(req),
            (
                _,
                "/machine-config" | "/boot-source" | "/actions" | "/vm" | "/snapshot/create"
                | "/snapshot/load",
            ) => Err(Response::fault(
                405,
                &format!("{} {}: method not allowed", req.method, req.path),
            )),
            _ => Err(Response::fault(
                404,
                &format!("{} {}: no such endpoint in squib", req.method, req.path),
            )),
        }
    }

    fn put_machine_config(&mut self, req: &Request) -> Reply {
        self.not_started("PUT /machine-config")?;
        let b: MachineConfigBody = body(req)?;
        if b.smt {
            return Err(bad("smt: not supported"));
        }
        if let Some(t) = b.cpu_template.filter(|t| t != "None") {
            return Err(bad(format!("cpu_template {t:?}: not supported")));
        }
        if let Some(h) = b.huge_pages.filter(|h| h != "None") {
            return Err(bad(format!("huge_pages {h:?}: not supported")));
        }
        let mem_size = b
            .mem_size_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| bad(format!("mem_size_mib {}: too large", b.mem_size_mib)))?;
        let config = MachineConfig {
            mem_size,
            vcpus: b.vcpu_count,
            cmdline: self.config.cmdline.clone(),
            track_dirty_pages: b.track_dirty_pages,
            initrd: self.config.initrd.clone(),
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        self.config = config;
        Ok(Response::no_content())
    }

    fn put_boot_source(&mut self, req: &Request) -> Reply {
        self.not_started("PUT /boot-source")?;
        let b: BootSourceBody = body(req)?;
        if let Some(initrd) = &b.initrd_path
            && !initrd.is_file()
        {
            return Err(bad(format!(
                "initrd_path {}: not a readable file",
                initrd.display()
            )));
        }
        if !b.kernel_image_path.is_file() {
            return Err(bad(format!(
                "kernel_image_path {}: not a readable file",
                b.kernel_image_path.display()
            )));
        }
        self.kernel = Some(b.kernel_image_path);
        self.config.cmdline = b.boot_args.unwrap_or_default();
        self.config.initrd = b.initrd_path;
        Ok(Response::no_content())
    }

    fn put_action(&mut self, req: &Request) -> Reply {
        let b: ActionBody = body(req)?;
        match b.action_type.as_str() {
            "InstanceStart" => {
                self.start().map_err(bad)?;
                Ok(Response::no_content())
            }
            other => Err(bad(format!("action_type {other:?}: not supported"))),
        }
    }

    fn patch_vm(&mut self, req: &Request) -> Reply {
        let b: VmBody = body(req)?;
        let machine = self.running("PATCH /vm")?;
        match b.state.as_str() {
            "Paused" => machine.pause().map_err(|e| {
                bad(format!(
                    "pausing the guest: {}",
                    squib_snapshot::report::ErrorChain(&e)
                ))
            })?,
            "Resumed" => machine.resume(),
            other => return Err(bad(format!("state {other:?}: expected Paused or Resumed"))),
        }
        Ok(Response::no_content())
    }

    fn snapshot_create(&mut self, req: &Request) -> Reply {
        let b: SnapshotCreateBody = body(req)?;
        let _ = b.version; // Firecracker's deprecated field: accepted, unused.
        // Fields apart, not `self.running()`: the last snapshot is borrowed mutably below.
        let machine = self
            .machine
            .as_ref()
            .ok_or_else(|| bad("PUT /snapshot/create: no guest has been started or loaded"))?;
        let diff = match b.snapshot_type.as_deref().unwrap_or("Full") {
            "Full" => false,
            "Diff" if machine.tracks_dirty_pages() => true,
            "Diff" => {
                return Err(bad(
                    "snapshot_type Diff: needs track_dirty_pages (PUT /machine-config) \
                     or enable_diff_snapshots (PUT /snapshot/load)",
                ));
            }
            other => return Err(bad(format!("snapshot_type {other:?}: expected Full or Diff"))),
        };
        if !machine.is_paused() {
            return Err(bad("PUT /snapshot/create: the guest must be paused (PATCH /vm)"));
        }
        let placement = create_placement(&b.snapshot_path, b.mem_file_path.as_deref())?;
        let mut merged = false;
        let target = if diff {
            let last = self.last_snapshot.as_mut().ok_or_else(|| {
                bad("snapshot_type Diff: no earlier snapshot of this guest to chain to (create a Full first)")
            })?;
            match placement {
                Placement::Files { state, memory } if memory.exists() => {
                    merged = true;
                    Target::MergeInPlace(state, merge_base(last, memory)?)
                }
                _ => Target::Diff(
                    placement,
                    ParentLink {
                        id: last.id,
                        state: last.state.clone(),
                    },
                ),
            }
        } else {
            Target::Full(placement)
        };
        let saved = snapshot::save(machine, target).map_err(|e| bad(error_chain(&e)))?;
        match self.last_snapshot.as_mut() {
            // The loaded base now describes the merge (same memory file, new state and id).
            Some(last) if merged => {
                last.state = absolute(&saved.state_path);
                last.id = saved.id;
                last.full = true;
                if let Some(l) = last.loaded.as_mut() {
                    l.state_path.clone_from(&last.state);
                }
            }
            _ => {
                self.last_snapshot = Some(LastSnapshot::new(
                    &saved.state_path,
                    &saved.memory_path,
                    saved.id,
                    saved.kind,
                ));
            }
        }
        Ok(Response::no_content())
    }

    fn snapshot_load(&mut self, req: &Request) -> Reply {
        self.not_started("PUT /snapshot/load")?;
        let b: SnapshotLoadBody = body(req)?;
        let track_dirty_pages = b.enable_diff_snapshots || b.track_dirty_pages;
        let mem_path: Option<&Path> = match (&b.mem_file_path, &b.mem_backend) {
            (Some(p), None) => Some(p),
            (None, Some(m)) if m.backend_type == "File" => Some(&m.backend_path),
            (None, Some(m)) => {
                return Err(bad(format!(
                    "mem_backend.backend_type {:?}: only File is supported",
                    m.backend_type
                )));
            }
            (None, None) => None,
            (Some(_), Some(_)) => return Err(bad("give at most one of mem_file_path and mem_backend")),
        };
        if b.snapshot_path.as_os_str().is_empty() {
            return Err(bad("snapshot_path: empty"));
        }
        let loaded = snapshot::load_files(&b.snapshot_path, mem_path, RestoreMode::Lazy)
            .map_err(|e| bad(error_chain(&e)))?;
        let console = (self.console)().map_err(|e| bad(format!("opening the console: {e}")))?;
        let vcpus = u8::try_from(loaded.state.vcpus.len()).unwrap_or(u8::MAX);
        let machine = Machine::restore(
            &loaded.state,
            loaded.memory,
            console,
            RestoreOptions {
                paused: !b.resume_vm,
                track_dirty_pages,
            },
        )
        .map_err(|e| {
            bad(format!(
                "loading {}: {}",
                b.snapshot_path.display(),
                ErrorChain(&e)
            ))
        })?;
        self.config.vcpus = vcpus;
        self.config.mem_size = loaded.state.mem_size;
        self.config.track_dirty_pages = track_dirty_pages;
        self.last_snapshot = Some(LastSnapshot::new(
            &loaded.state_path,
            &loaded.memory_path,
            loaded.snapshot.id,
            loaded.snapshot.kind,
        ));
        self.machine = Some(machine);
        Ok(Response::no_content())
    }
}

/// Where a create's files go. `snapshot_path` is the state file and `mem_file_path` the memory
/// file, anywhere; without `mem_file_path` (squib's own use), or when the two are `DIR/state` and
/// `DIR/memory` of a `DIR` that does not exist yet, the snapshot is the directory `DIR`, which
/// appears atomically.
fn create_placement<'a>(
    snapshot_path: &'a Path,
    mem_path: Option<&'a Path>,
) -> Result<Placement<'a>, Response> {
    if snapshot_path.as_os_str().is_empty() {
        return Err(bad("snapshot_path: empty"));
    }
    let named_state = snapshot_path.file_name().is_some_and(|n| n == STATE_FILE);
    let dir = if named_state {
        snapshot_path.parent().filter(|d| !d.as_os_str().is_empty())
    } else {
        None
    };
    match (mem_path, dir) {
        (None, Some(dir)) => Ok(Placement::Dir(dir)),
        (None, None) => Ok(Placement::Dir(snapshot_path)),
        (Some(mem), Some(dir)) if mem == dir.join(MEMORY_FILE) && !dir.exists() => Ok(Placement::Dir(dir)),
        (Some(memory), _) => Ok(Placement::Files {
            state: snapshot_path,
            memory,
        }),
    }
}

/// The base a diff merges into when its `mem_file_path` names an existing file: that file must
/// be the memory file of the snapshot the diff follows, and that snapshot full. Its state is
/// read once and kept (the merge updates it).
fn merge_base<'a>(last: &'a mut LastSnapshot, memory: &Path) -> Result<&'a mut LoadedSnapshot, Response> {
    let same = match (std::fs::canonicalize(memory), std::fs::canonicalize(&last.memory)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(bad(format!(
            "mem_file_path {}: exists and is not the memory file of the snapshot this diff follows ({}); \
             name a new file, or {} to merge the diff into it",
            memory.display(),
            last.state.display(),
            last.memory.display()
        )));
    }
    if !last.full {
        return Err(bad(format!(
            "mem_file_path {}: is the memory file of the diff {}; a diff merges in place only into a full snapshot's memory file",
            memory.display(),
            last.state.display()
        )));
    }
    let stale = last
        .loaded
        .as_ref()
        .is_none_or(|l| l.state.id != last.id || l.state_path != last.state);
    if stale {
        let loaded = LoadedSnapshot::open_with_memory(&last.state, Some(&last.memory))
            .map_err(|e| bad(error_chain(&e)))?;
        last.loaded = Some(loaded);
    }
    last.loaded
        .as_mut()
        .ok_or_else(|| bad("internal: the merge base was not loaded"))
}
