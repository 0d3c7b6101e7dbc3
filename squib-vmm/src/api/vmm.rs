//! The state machine behind Firecracker's endpoints: configure, start or load,
//! pause, snapshot, resume; and the endpoints around them (instance info,
//! version, configuration, logger, metrics).
//!
//! # Order rules (Firecracker's)
//!
//! - Configuration (`/machine-config`, `/boot-source`, `/logger`, `/metrics`,
//!   `/serial`) only before the guest starts or is loaded.
//! - `PUT /snapshot/load` only into a fresh process: no guest yet, and no
//!   boot-specific resource configured (`/machine-config`, `/boot-source`);
//!   the logger and the metrics may be configured first.
//! - `PATCH /vm`, `PUT /snapshot/create` and `FlushMetrics` only once a guest
//!   runs; a snapshot only while it is paused.
//!
//! Request bodies use Firecracker's field names; unknown fields are refused,
//! so a typo is an error rather than a silently ignored setting. What squib
//! does not have (block, network, vsock, balloon, MMDS, entropy, pmem, memory
//! hotplug devices, CPU templates, the i8042 for `SendCtrlAltDel`, the
//! snapshot overrides of those devices) is a 400 whose `fault_message` says
//! so, never a 404 or a silently ignored field. An unknown path is a 400 as in
//! Firecracker. Spec: `specs/19-firecracker-api.md`.
//!
//! # After a guest failure
//!
//! Firecracker ends its process when a vCPU fails. squib stops every vCPU for
//! good, logs the failure, and keeps answering: `GET /` reports the guest
//! `Paused` with a `failure` field, and every request that would run or save
//! the guest says why it cannot.
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
//! - `mem_backend` `Uffd`: `backend_path` is a page-fault handler's socket; the
//!   full snapshot's memory is whatever that handler serves
//!   ([`squib_machine::uffd`]).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use squib_machine::console::{DRAINED_CAPACITY, Drained};
use squib_machine::snapshot::{self, Target};
use squib_machine::uffd::{HANDSHAKE_TIMEOUT, UffdMemory};
use squib_machine::{Console, Machine, MachineConfig, RestoreOptions};
use squib_snapshot::report::{ErrorChain, error_chain};
use squib_snapshot::snapshot::load::resolve_recorded;
use squib_snapshot::snapshot::{
    LoadedSnapshot, MEMORY_FILE, ParentLink, Placement, RestoreMode, STATE_FILE, SnapshotId, SnapshotKind,
    state_file_of,
};

use super::http::{Request, Response};
use super::metrics::{Latencies, Metrics, MetricsConfig, Op};
use crate::log;

/// Makes the console for each guest this process starts (terminal, file...).
pub type ConsoleFactory = Box<dyn Fn() -> std::io::Result<Console> + Send>;

/// How often the metrics are written without a `FlushMetrics` (Firecracker's period).
pub const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// How long the server's housekeeping waits for a failed guest's vCPUs to end at a time.
const HALT_WAIT: Duration = Duration::from_millis(100);

/// What `GET /version` and `GET /` report as the VMM's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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

/// `PATCH /machine-config`: every field optional, at least one given.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfigPatch {
    #[serde(default)]
    vcpu_count: Option<u8>,
    #[serde(default)]
    mem_size_mib: Option<u64>,
    #[serde(default)]
    smt: Option<bool>,
    #[serde(default)]
    track_dirty_pages: Option<bool>,
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

#[derive(Debug, Clone, Copy, Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmState,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackendBody {
    backend_path: PathBuf,
    backend_type: MemBackendType,
}

/// Firecracker's `NetworkOverride`: parsed so that its presence gets squib's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkOverride {
    iface_id: String,
    #[allow(
        dead_code,
        reason = "parsed for Firecracker's shape; squib has no network device"
    )]
    host_dev_name: String,
}

/// Firecracker's `VsockOverride`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockOverride {
    #[allow(
        dead_code,
        reason = "parsed for Firecracker's shape; squib has no vsock device"
    )]
    uds_path: String,
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
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    clock_realtime: bool,
    #[serde(default)]
    huge_pages: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggerBody {
    #[serde(default)]
    log_path: Option<PathBuf>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    show_level: Option<bool>,
    #[serde(default)]
    show_log_origin: Option<bool>,
    #[serde(default)]
    module: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialBody {
    #[serde(default)]
    serial_out_path: Option<PathBuf>,
    #[serde(default)]
    rate_limiter: Option<serde_json::Value>,
}

/// The guest this process serves, from configuration to running.
pub struct Vmm {
    config: MachineConfig,
    kernel: Option<PathBuf>,
    boot_args: Option<String>,
    machine: Option<Machine>,
    console: ConsoleFactory,
    /// `PUT /serial`: where the console is also written.
    serial_out: Option<PathBuf>,
    /// The newest snapshot of this guest (created or loaded): what a diff chains to.
    last_snapshot: Option<LastSnapshot>,
    /// A boot-specific resource was configured: a load is no longer allowed.
    boot_configured: bool,
    latencies: Latencies,
    metrics: Option<Metrics>,
    last_metrics: Instant,
    logger: Option<log::LogConfig>,
    /// The failure the guest stopped on, once handled (vCPUs stopped, logged).
    failed: Option<String>,
    /// Set by a handler that succeeded at a timed operation: which, and its time in the VMM.
    timed: Option<(Op, Duration)>,
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

fn json(value: &serde_json::Value) -> Response {
    Response::ok(value.to_string())
}

/// The answer for a Firecracker resource squib does not have, by the path's first component.
fn missing_device(first: &str) -> Option<&'static str> {
    Some(match first {
        "drives" => "squib has no block devices (virtio-block)",
        "network-interfaces" => "squib has no network devices (virtio-net)",
        "vsock" => "squib has no vsock device",
        "balloon" => "squib has no balloon device",
        "mmds" => "squib has no MMDS (it has no network device to serve it on)",
        "entropy" => "squib has no entropy device (virtio-rng)",
        "pmem" => "squib has no pmem devices",
        "hotplug" => "squib has no memory hotplug device (virtio-mem)",
        "cpu-config" => "squib has no CPU templates (the guest sees the CPUID KVM supports)",
        _ => return None,
    })
}

/// The guest's only device, said with every missing-device answer.
const ONLY_DEVICE: &str = "the guest's only device is its COM1 serial console";

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
            boot_args: None,
            machine: None,
            console,
            serial_out: None,
            last_snapshot: None,
            boot_configured: false,
            latencies: Latencies::default(),
            metrics: None,
            last_metrics: Instant::now(),
            logger: None,
            failed: None,
            timed: None,
        }
    }

    /// Set what `PUT /machine-config` and `PUT /boot-source` would (for `squib run --kernel`).
    pub fn configure(&mut self, config: MachineConfig, kernel: PathBuf) {
        self.boot_args = Some(config.cmdline.clone()).filter(|c| !c.is_empty());
        self.config = config;
        self.kernel = Some(kernel);
        self.boot_configured = true;
    }

    /// The failure the guest stopped on, if it has failed.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.failed
            .clone()
            .or_else(|| self.machine.as_ref().and_then(Machine::failure))
    }

    /// Housekeeping the server runs every few milliseconds: stop a guest that has failed (once,
    /// logging why), and write the metrics every [`METRICS_PERIOD`] while a guest exists.
    pub fn tick(&mut self) {
        if self.failed.is_none()
            && let Some(m) = &self.machine
            && let Some(why) = m.failure()
        {
            // A vCPU held inside KVM_RUN ends when it returns; the stop request stays.
            if let Err(e) = m.halt(HALT_WAIT) {
                tracing::warn!("stopping the failed guest: {e}");
            }
            tracing::error!("the guest failed and was stopped (the API still answers): {why}");
            self.failed = Some(why);
        }
        if self.machine.is_some() && self.last_metrics.elapsed() >= METRICS_PERIOD {
            self.last_metrics = Instant::now();
            if let Some(m) = self.metrics.as_mut()
                && let Err(e) = m.flush(log::INSTANCE_ID, &self.latencies, log::missed())
            {
                tracing::warn!("periodic metrics flush: {}", ErrorChain(&e));
            }
        }
    }

    fn new_console(&self) -> std::io::Result<Console> {
        let console = (self.console)()?;
        Ok(match &self.serial_out {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("serial_out_path {}: {e}", path.display()))
                    })?;
                console.with_sink(Box::new(Drained::new(Box::new(file), DRAINED_CAPACITY)?))
            }
            None => console,
        })
    }

    /// Boot the configured kernel (`InstanceStart`).
    ///
    /// # Errors
    /// A message saying what is missing or failed.
    pub fn start(&mut self) -> Result<(), String> {
        if self.machine.is_some() {
            return Err("InstanceStart: the guest has already started or been loaded".to_owned());
        }
        let kernel = self
            .kernel
            .clone()
            .ok_or("InstanceStart: no kernel configured (PUT /boot-source first)")?;
        let console = self
            .new_console()
            .map_err(|e| format!("opening the console: {e}"))?;
        let machine = Machine::boot(&self.config, &kernel, console)
            .map_err(|e| format!("booting {}: {}", kernel.display(), ErrorChain(&e)))?;
        self.machine = Some(machine);
        self.last_metrics = Instant::now();
        Ok(())
    }

    /// Refuse `what` once a guest exists (configuration is pre-boot only).
    fn pre_boot(&self, what: &str) -> Result<(), Response> {
        if self.machine.is_some() {
            return Err(bad(format!(
                "{what}: not supported after the guest has started or been loaded \
                 (configure before InstanceStart or PUT /snapshot/load)"
            )));
        }
        Ok(())
    }

    /// The guest, for `what`, which needs one that has not failed.
    fn running(&self, what: &str) -> Result<&Machine, Response> {
        let machine = self.machine.as_ref().ok_or_else(|| {
            bad(format!(
                "{what}: not supported before the guest starts (InstanceStart) or a snapshot is loaded"
            ))
        })?;
        if let Some(why) = self.failure() {
            return Err(bad(format!(
                "{what}: the guest has failed and stays stopped: {why}"
            )));
        }
        Ok(machine)
    }

    fn state_name(&self) -> &'static str {
        match &self.machine {
            None => "Not started",
            Some(m) if m.is_paused() || self.failure().is_some() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Serve one request.
    pub fn handle(&mut self, req: &Request) -> Response {
        let t0 = Instant::now();
        self.timed = None;
        tracing::info!(
            "The API server received a {} request on {:?}.",
            req.method,
            req.path
        );
        let response = match self.route(req) {
            Ok(r) | Err(r) => r,
        };
        if response.status < 300 {
            if let Some((op, vmm)) = self.timed.take() {
                let api = t0.elapsed();
                self.latencies.record(op, api, vmm);
                tracing::info!("'{op:?}' API request took {} us.", api.as_micros());
            }
            tracing::info!(
                "The request was executed successfully. Status code: {}.",
                response.status
            );
        } else {
            tracing::error!(
                "Received Error. Status code: {}. Message: {}",
                response.status,
                response.body.as_deref().unwrap_or("")
            );
        }
        response
    }

    fn route(&mut self, req: &Request) -> Reply {
        let method = req.method.as_str();
        let mut tokens = req.path.trim_start_matches('/').split_terminator('/');
        let first = tokens.next().unwrap_or("");
        let second = tokens.next();
        let extra = tokens.next().is_some();
        if let Some(device) = missing_device(first) {
            return Err(bad(format!("{method} {}: {device}; {ONLY_DEVICE}", req.path)));
        }
        let has_body = !req.body.is_empty();
        match (method, first, second, extra) {
            ("GET", ..) if has_body => Err(bad("GET request cannot have a body.")),
            ("PUT" | "PATCH", ..) if !has_body => Err(bad(format!("Empty {method} request."))),
            ("GET", "", None, false) => Ok(self.instance_info()),
            ("GET", "version", None, false) => {
                Ok(json(&serde_json::json!({ "firecracker_version": VERSION })))
            }
            ("GET", "vm", Some("config"), false) => Ok(json(&self.full_config())),
            ("GET", "machine-config", None, false) => Ok(json(&self.machine_config_json())),
            ("PUT", "machine-config", None, false) => self.put_machine_config(req),
            ("PATCH", "machine-config", None, false) => self.patch_machine_config(req),
            ("PUT", "boot-source", None, false) => self.put_boot_source(req),
            ("PUT", "actions", None, false) => self.put_action(req),
            ("PATCH", "vm", None, false) => self.patch_vm(req),
            ("PUT", "snapshot", Some("create"), false) => self.snapshot_create(req),
            ("PUT", "snapshot", Some("load"), false) => self.snapshot_load(req),
            ("PUT", "logger", None, false) => self.put_logger(req),
            ("PUT", "metrics", None, false) => self.put_metrics(req),
            ("PUT", "serial", None, false) => self.put_serial(req),
            _ => Err(bad(format!(
                "Invalid request method and/or path: {method} {}.",
                req.path
            ))),
        }
    }

    fn instance_info(&self) -> Response {
        let mut info = serde_json::json!({
            "id": log::INSTANCE_ID,
            "state": self.state_name(),
            "vmm_version": VERSION,
            "app_name": "squib",
        });
        if let Some(why) = self.failure() {
            info["failure"] = why.into();
        }
        json(&info)
    }

    fn machine_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "vcpu_count": self.config.vcpus,
            "mem_size_mib": self.config.mem_size >> 20,
            "smt": false,
            "track_dirty_pages": self.config.track_dirty_pages,
            "huge_pages": "None",
        })
    }

    /// `GET /vm/config`: Firecracker's `FullVmConfiguration`, with every device squib lacks
    /// empty. After a load, the boot source is empty, as in Firecracker.
    fn full_config(&self) -> serde_json::Value {
        let logger = self.logger.as_ref().map(|l| {
            serde_json::json!({
                "log_path": l.path,
                "level": log::level_name(l.level),
                "show_level": l.show_level,
                "show_log_origin": l.show_origin,
                "module": l.module,
            })
        });
        serde_json::json!({
            "balloon": null,
            "drives": [],
            "boot-source": {
                "kernel_image_path": self.kernel.as_ref().map(|k| k.display().to_string()).unwrap_or_default(),
                "initrd_path": self.config.initrd,
                "boot_args": self.boot_args,
            },
            "cpu-config": null,
            "logger": logger,
            "machine-config": self.machine_config_json(),
            "metrics": self.metrics.as_ref().map(Metrics::config),
            "mmds-config": null,
            "network-interfaces": [],
            "vsock": null,
            "entropy": null,
            "pmem": [],
            "memory-hotplug": null,
        })
    }

    fn put_machine_config(&mut self, req: &Request) -> Reply {
        self.pre_boot("PUT /machine-config")?;
        let b: MachineConfigBody = body(req)?;
        // A PUT sets every field: the optional ones to their defaults.
        self.apply_machine_config(MachineConfigPatch {
            vcpu_count: Some(b.vcpu_count),
            mem_size_mib: Some(b.mem_size_mib),
            smt: Some(b.smt),
            track_dirty_pages: Some(b.track_dirty_pages),
            cpu_template: b.cpu_template,
            huge_pages: b.huge_pages,
        })
    }

    fn patch_machine_config(&mut self, req: &Request) -> Reply {
        self.pre_boot("PATCH /machine-config")?;
        let patch: MachineConfigPatch = body(req)?;
        if patch == MachineConfigPatch::default() {
            return Err(bad("Empty PATCH request."));
        }
        self.apply_machine_config(patch)
    }

    fn apply_machine_config(&mut self, p: MachineConfigPatch) -> Reply {
        if p.smt == Some(true) {
            return Err(bad("smt: squib does not support simultaneous multithreading"));
        }
        if let Some(t) = p.cpu_template.filter(|t| t != "None") {
            return Err(bad(format!(
                "cpu_template {t:?}: squib has no CPU templates (the guest sees the CPUID KVM supports)"
            )));
        }
        if let Some(h) = p.huge_pages.filter(|h| h != "None") {
            return Err(bad(format!(
                "huge_pages {h:?}: not supported (squib backs guest RAM with anonymous memory and \
                 leaves huge pages to the kernel)"
            )));
        }
        let mem_size = match p.mem_size_mib {
            Some(mib) => mib
                .checked_mul(1 << 20)
                .ok_or_else(|| bad(format!("mem_size_mib {mib}: too large")))?,
            None => self.config.mem_size,
        };
        let config = MachineConfig {
            mem_size,
            vcpus: p.vcpu_count.unwrap_or(self.config.vcpus),
            cmdline: self.config.cmdline.clone(),
            track_dirty_pages: p.track_dirty_pages.unwrap_or(self.config.track_dirty_pages),
            initrd: self.config.initrd.clone(),
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        self.config = config;
        self.boot_configured = true;
        Ok(Response::no_content())
    }

    fn put_boot_source(&mut self, req: &Request) -> Reply {
        self.pre_boot("PUT /boot-source")?;
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
        self.config.cmdline = b.boot_args.clone().unwrap_or_default();
        self.boot_args = b.boot_args;
        self.config.initrd = b.initrd_path;
        self.boot_configured = true;
        Ok(Response::no_content())
    }

    fn put_action(&mut self, req: &Request) -> Reply {
        let b: ActionBody = body(req)?;
        match b.action_type {
            ActionType::InstanceStart => {
                self.start().map_err(bad)?;
                Ok(Response::no_content())
            }
            ActionType::FlushMetrics => {
                self.running_or_failed("FlushMetrics")?;
                let Some(m) = self.metrics.as_mut() else {
                    // As Firecracker: without a metrics destination there is nothing to write.
                    tracing::warn!("FlushMetrics: no metrics destination (PUT /metrics); nothing written");
                    return Ok(Response::no_content());
                };
                m.flush(log::INSTANCE_ID, &self.latencies, log::missed())
                    .map_err(|e| bad(format!("FlushMetrics: {}", ErrorChain(&e))))?;
                Ok(Response::no_content())
            }
            ActionType::SendCtrlAltDel => Err(bad(format!(
                "SendCtrlAltDel: squib has no i8042 keyboard controller to send it to; {ONLY_DEVICE}"
            ))),
        }
    }

    /// A guest must exist (it may have failed): for requests that only report.
    fn running_or_failed(&self, what: &str) -> Result<(), Response> {
        if self.machine.is_none() {
            return Err(bad(format!(
                "{what}: not supported before the guest starts (InstanceStart) or a snapshot is loaded"
            )));
        }
        Ok(())
    }

    fn patch_vm(&mut self, req: &Request) -> Reply {
        let b: VmBody = body(req)?;
        let machine = self.running("PATCH /vm")?;
        let t = Instant::now();
        let op = match b.state {
            VmState::Paused => {
                machine
                    .pause()
                    .map_err(|e| bad(format!("PATCH /vm Paused: {}", ErrorChain(&e))))?;
                Op::Pause
            }
            VmState::Resumed => {
                machine.resume();
                Op::Resume
            }
        };
        self.timed = Some((op, t.elapsed()));
        Ok(Response::no_content())
    }

    fn put_logger(&mut self, req: &Request) -> Reply {
        self.pre_boot("PUT /logger")?;
        let b: LoggerBody = body(req)?;
        let old = self.logger.as_ref();
        let path = b
            .log_path
            .or_else(|| old.map(|o| o.path.clone()))
            .ok_or_else(|| {
                bad(
                    "PUT /logger: log_path is required the first time (squib's own log goes to \
                     standard error as SQUIB_LOG says; the API's log goes to a file or named pipe)",
                )
            })?;
        let level = match b.level {
            Some(l) => log::parse_level(&l).map_err(bad)?,
            None => tracing::level_filters::LevelFilter::INFO,
        };
        let config = log::LogConfig {
            path,
            level,
            show_level: b.show_level.or(old.map(|o| o.show_level)).unwrap_or(false),
            show_origin: b.show_log_origin.or(old.map(|o| o.show_origin)).unwrap_or(false),
            module: b.module.or_else(|| old.and_then(|o| o.module.clone())),
        };
        log::configure(&config).map_err(bad)?;
        self.logger = Some(config);
        Ok(Response::no_content())
    }

    fn put_metrics(&mut self, req: &Request) -> Reply {
        self.pre_boot("PUT /metrics")?;
        let config: MetricsConfig = body(req)?;
        if let Some(m) = &self.metrics {
            return Err(bad(format!(
                "PUT /metrics: {}",
                super::metrics::MetricsError::AlreadyInitialized(m.path().to_path_buf())
            )));
        }
        self.metrics =
            Some(Metrics::open(config).map_err(|e| bad(format!("PUT /metrics: {}", ErrorChain(&e))))?);
        Ok(Response::no_content())
    }

    fn put_serial(&mut self, req: &Request) -> Reply {
        self.pre_boot("PUT /serial")?;
        let b: SerialBody = body(req)?;
        if b.rate_limiter.is_some() {
            return Err(bad("PUT /serial: rate_limiter: squib has no rate limiters"));
        }
        self.serial_out = b.serial_out_path;
        Ok(Response::no_content())
    }

    fn snapshot_create(&mut self, req: &Request) -> Reply {
        let b: SnapshotCreateBody = body(req)?;
        let _ = b.version; // Firecracker's deprecated field: accepted, unused.
        // `running` checks the guest (started, not failed); the machine is then borrowed as a
        // field, apart from the last snapshot, which is borrowed mutably below.
        self.running("PUT /snapshot/create")?;
        let machine = self
            .machine
            .as_ref()
            .ok_or_else(|| bad("PUT /snapshot/create: no guest has been started or loaded"))?;
        let diff = match b.snapshot_type.as_deref().unwrap_or("Full") {
            "Full" => false,
            "Diff" if machine.tracks_dirty_pages() => true,
            "Diff" => {
                return Err(bad(
                    "snapshot_type Diff: needs track_dirty_pages (PUT /machine-config, or \
                     PUT /snapshot/load when the guest was loaded)",
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
        let t = Instant::now();
        let saved = snapshot::save(machine, target).map_err(|e| bad(error_chain(&e)))?;
        self.timed = Some((if diff { Op::DiffCreate } else { Op::FullCreate }, t.elapsed()));
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
        if self.machine.is_some() {
            return Err(bad(
                "PUT /snapshot/load: not supported after the guest has started or been loaded \
                 (a load needs a fresh process)",
            ));
        }
        if self.boot_configured {
            return Err(bad(
                "PUT /snapshot/load: not allowed after configuring boot-specific resources \
                 (PUT /machine-config, /boot-source); only the logger and the metrics may be \
                 configured before a load",
            ));
        }
        let b: SnapshotLoadBody = body(req)?;
        if let Some(o) = b.network_overrides.first() {
            return Err(bad(format!(
                "network_overrides (iface_id {:?}): squib has no network devices to override; {ONLY_DEVICE}",
                o.iface_id
            )));
        }
        if b.vsock_override.is_some() {
            return Err(bad(format!(
                "vsock_override: squib has no vsock device to override; {ONLY_DEVICE}"
            )));
        }
        if b.clock_realtime {
            return Err(bad(
                "clock_realtime: not supported (squib resumes guest time where the snapshot \
                 stopped it, never by the wall-clock time since)",
            ));
        }
        if let Some(h) = b
            .huge_pages
            .as_deref()
            .filter(|h| !matches!(*h, "Snapshot" | "None"))
        {
            return Err(bad(format!(
                "huge_pages {h:?}: not supported (squib maps the memory file or plain anonymous \
                 memory; Snapshot and None are accepted)"
            )));
        }
        let track_dirty_pages = b.enable_diff_snapshots || b.track_dirty_pages;
        let options = RestoreOptions {
            paused: !b.resume_vm,
            track_dirty_pages,
        };
        let t = Instant::now();
        let (machine, last, mem_size) = match (&b.mem_file_path, &b.mem_backend) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
                ));
            }
            (None, Some(m)) if m.backend_type == MemBackendType::Uffd => {
                self.load_served(&b.snapshot_path, &m.backend_path, options)?
            }
            (mem_file, backend) => {
                let mem_path = mem_file
                    .as_deref()
                    .or(backend.as_ref().map(|m| m.backend_path.as_path()));
                self.load_file(&b.snapshot_path, mem_path, options)?
            }
        };
        let vcpus = u8::try_from(machine.vcpu_count()).unwrap_or(u8::MAX);
        self.timed = Some((Op::Load, t.elapsed()));
        self.config.vcpus = vcpus;
        self.config.mem_size = mem_size;
        self.config.track_dirty_pages = track_dirty_pages;
        self.last_snapshot = Some(last);
        self.machine = Some(machine);
        self.last_metrics = Instant::now();
        Ok(Response::no_content())
    }

    /// Load from squib's files: the chain ending at the snapshot, the base mapped lazily.
    fn load_file(
        &self,
        snapshot_path: &Path,
        mem_path: Option<&Path>,
        options: RestoreOptions,
    ) -> Result<(Machine, LastSnapshot, u64), Response> {
        if snapshot_path.as_os_str().is_empty() {
            return Err(bad("snapshot_path: empty"));
        }
        let loaded = snapshot::load_files(snapshot_path, mem_path, RestoreMode::Lazy)
            .map_err(|e| bad(error_chain(&e)))?;
        let console = self
            .new_console()
            .map_err(|e| bad(format!("opening the console: {e}")))?;
        let machine = Machine::restore(&loaded.state, loaded.memory, console, options)
            .map_err(|e| bad(format!("loading {}: {}", snapshot_path.display(), ErrorChain(&e))))?;
        let last = LastSnapshot::new(
            &loaded.state_path,
            &loaded.memory_path,
            loaded.snapshot.id,
            loaded.snapshot.kind,
        );
        Ok((machine, last, loaded.state.mem_size))
    }

    /// Load a full snapshot's state and hand its memory to the page-fault handler at `socket`.
    fn load_served(
        &self,
        snapshot_path: &Path,
        socket: &Path,
        options: RestoreOptions,
    ) -> Result<(Machine, LastSnapshot, u64), Response> {
        if snapshot_path.as_os_str().is_empty() {
            return Err(bad("snapshot_path: empty"));
        }
        let state_path = state_file_of(snapshot_path);
        let (state, snap) = snapshot::load_state(&state_path).map_err(|e| bad(error_chain(&e)))?;
        let memory = UffdMemory::new(&snap.layout).map_err(|e| bad(error_chain(&e)))?;
        let served = memory
            .handshake(socket, HANDSHAKE_TIMEOUT)
            .map_err(|e| bad(format!("mem_backend Uffd: {}", ErrorChain(&e))))?;
        let console = self
            .new_console()
            .map_err(|e| bad(format!("opening the console: {e}")))?;
        let machine = Machine::restore_served(&state, served, console, options)
            .map_err(|e| bad(format!("loading {}: {}", snapshot_path.display(), ErrorChain(&e))))?;
        // A diff taken later records this state file; its memory file is where the state file
        // says (the handler's business meanwhile).
        let memory = resolve_recorded(&state_path, &snap.memory);
        let last = LastSnapshot::new(&state_path, &memory, snap.id, snap.kind);
        Ok((machine, last, state.mem_size))
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
