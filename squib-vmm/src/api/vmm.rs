//! The state machine behind Firecracker's endpoints: configure, start or load,
//! pause, snapshot, resume.
//!
//! As in Firecracker, configuration is accepted only before the guest starts,
//! a snapshot is taken only while paused, and a load is accepted only by a
//! process that has not started a guest. Request bodies use Firecracker's
//! field names; unknown fields are refused, so a typo is an error rather than
//! a silently ignored setting.
//!
//! # Snapshot paths: Firecracker's two files, squib's one directory
//!
//! squib writes one snapshot format everywhere (`specs/17-snapshot-files.md`):
//! a directory holding `state` and `memory`, which appears atomically. The
//! API keeps Firecracker's body fields and maps them onto it:
//!
//! - `snapshot_path` names the snapshot directory, or the `state` file inside
//!   it (`DIR/state` means `DIR`). On create, `DIR` must not exist.
//! - `mem_file_path` (or `mem_backend.backend_path` with `backend_type`
//!   `File`), when given, must be `DIR/memory`: squib keeps a snapshot's files
//!   together so that a diff can name its parent and a chain can be moved.
//! - A `Diff` is a diff of the last snapshot this process created or loaded,
//!   and must be created in the same parent directory as that snapshot (it
//!   names its parent by sibling directory name and id). Loading a diff loads
//!   its chain: the base mapped copy-on-write, the diffs applied on top.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use squib_machine::snapshot::{self, Target};
use squib_machine::{Console, Machine, MachineConfig, RestoreOptions};
use squib_snapshot::snapshot::{MEMORY_FILE, ParentRef, RestoreMode, STATE_FILE, SnapshotId};

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
    last_snapshot: Option<(PathBuf, SnapshotId)>,
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
            .map_err(|e| format!("booting {}: {e}", kernel.display()))?;
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
            "Paused" => machine.pause(),
            "Resumed" => machine.resume(),
            other => return Err(bad(format!("state {other:?}: expected Paused or Resumed"))),
        }
        Ok(Response::no_content())
    }

    fn snapshot_create(&mut self, req: &Request) -> Reply {
        let b: SnapshotCreateBody = body(req)?;
        let _ = b.version; // Firecracker's deprecated field: accepted, unused.
        let machine = self.running("PUT /snapshot/create")?;
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
        let dir = snapshot_dir(&b.snapshot_path, b.mem_file_path.as_deref())?;
        let target = if diff {
            let parent = self.diff_parent(&dir)?;
            Target::Diff(&dir, parent)
        } else {
            Target::Full(&dir)
        };
        let saved = snapshot::save(machine, target).map_err(|e| bad(e.to_string()))?;
        self.last_snapshot = Some((dir, saved.id));
        Ok(Response::no_content())
    }

    /// The parent reference of a diff at `dir`: the last snapshot, a sibling of `dir`.
    fn diff_parent(&self, dir: &Path) -> Result<ParentRef, Response> {
        let Some((last, id)) = &self.last_snapshot else {
            return Err(bad(
                "snapshot_type Diff: no earlier snapshot of this guest to chain to (create a Full first)",
            ));
        };
        let parent_of = |p: &Path| {
            p.parent().map(|d| {
                std::fs::canonicalize(if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                })
            })
        };
        let same = match (parent_of(dir), parent_of(last)) {
            (Some(Ok(a)), Some(Ok(b))) => a == b,
            _ => false,
        };
        let name = last.file_name().map(|n| n.to_string_lossy().into_owned());
        match (same, name) {
            (true, Some(name)) => Ok(ParentRef { id: *id, dir: name }),
            _ => Err(bad(format!(
                "snapshot_path {}: a Diff must be created beside its parent {} (same directory)",
                dir.display(),
                last.display()
            ))),
        }
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
        let dir = snapshot_dir(&b.snapshot_path, mem_path)?;
        let loaded = snapshot::load(&dir, RestoreMode::Lazy).map_err(|e| bad(e.to_string()))?;
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
        .map_err(|e| bad(format!("loading {}: {e}", b.snapshot_path.display())))?;
        self.config.vcpus = vcpus;
        self.config.mem_size = loaded.state.mem_size;
        self.config.track_dirty_pages = track_dirty_pages;
        self.last_snapshot = Some((loaded.dir, loaded.snapshot.id));
        self.machine = Some(machine);
        Ok(Response::no_content())
    }
}

/// The snapshot directory named by `snapshot_path` (the directory or its `state` file), after
/// checking that `mem_path`, if given, is that directory's memory file.
fn snapshot_dir(snapshot_path: &Path, mem_path: Option<&Path>) -> Result<PathBuf, Response> {
    let dir = if snapshot_path.file_name().is_some_and(|n| n == STATE_FILE) {
        snapshot_path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        snapshot_path.to_path_buf()
    };
    if dir.as_os_str().is_empty() {
        return Err(bad("snapshot_path: empty"));
    }
    if let Some(mem) = mem_path {
        let expected = dir.join(MEMORY_FILE);
        if mem != expected {
            return Err(bad(format!(
                "mem_file_path {}: squib keeps a snapshot's memory inside its directory; expected {}",
                mem.display(),
                expected.display()
            )));
        }
    }
    Ok(dir)
}
