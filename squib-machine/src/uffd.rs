//! Guest memory whose pages another process serves through userfaultfd: Firecracker's
//! page-fault-handler handshake, and what the machine does when that process goes away.
//!
//! Why this exists: Firecracker users restore snapshots with `mem_backend` `Uffd` and a
//! page-fault handler of their own (on-demand loading, memory shared between clones, pages
//! fetched over the network). For those handlers to serve squib's guest unchanged, squib has to
//! speak Firecracker's handshake byte for byte: one message on a Unix stream socket whose body
//! is the JSON array of [`GuestRegionUffdMapping`] and whose `SCM_RIGHTS` carries the
//! userfaultfd. Squib's own on-demand page server (issue 17) is meant to build on the same
//! plumbing, which is why it lives here and not in the API handler.
//!
//! # The pieces
//!
//! - [`UffdMemory::new`] maps anonymous, unpopulated guest RAM (no page is touched, and it is not
//!   advised for transparent huge pages as booted RAM is: a missing-page fault on a registered
//!   range goes to the handler, which resolves it 4 KiB at a time) and registers every region with a
//!   userfaultfd in `MISSING` mode. The descriptor is close-on-exec and non-blocking, reports
//!   faults squib's own threads and KVM take in kernel mode as well as user-mode ones (KVM reads
//!   guest memory on the vCPU's behalf), and asks for `UFFD_FEATURE_EVENT_REMOVE`, the features
//!   Firecracker asks for.
//! - [`UffdMemory::handshake`] connects to the handler's socket, sends the mappings and the
//!   descriptor, and waits until the handler has read them ([`HANDSHAKE_TIMEOUT`] at most, so a
//!   handler that never accepts is an error, not a hang). The region offsets describe squib's
//!   full-snapshot memory file, whose regions sit back to back at their layout's file offsets
//!   (spec 17 §3): a handler maps that file and copies from `offset + (fault - base)`.
//! - [`Machine::restore_served`](crate::Machine::restore_served) builds the machine over that
//!   memory and keeps the connection and a copy of the descriptor for its whole life.
//!
//! # When the handler dies
//!
//! Squib keeps its own copy of the userfaultfd, as Firecracker does: if the handler's copy were
//! the only one, its death would release the descriptor, the kernel would unregister the ranges,
//! and the guest would silently run on zero pages. With squib's copy alive, a fault nobody serves
//! blocks the faulting thread instead. Firecracker leaves it at that (the guest freezes, and its
//! docs suggest the handler kill Firecracker when it fails). Squib watches the connection: the
//! handshake's socket stays open on both sides for as long as the handler serves (Firecracker's
//! example handlers keep it), so a hang-up is the handler's end. The watcher then records the
//! failure and stops the vCPUs. A vCPU blocked on a fault that KVM's MMU takes in user context
//! waits interruptibly and leaves `KVM_RUN` on the kick signal; one blocked on a fault taken in
//! kernel mode (KVM's instruction emulator reading guest memory, which is how PVM runs guest
//! kernel code on this host) waits through every signal but a fatal one. So once the vCPUs have
//! stopped, or after [`KICK_GRACE`], the watcher unregisters the ranges: that wakes every thread
//! still blocked on a fault (such a vCPU, or squib's own thread copying memory into a snapshot)
//! and lets it finish on zero pages; the kick still pending makes the vCPU leave `KVM_RUN` before
//! it enters the guest again. The machine never runs again, and a snapshot taken across the
//! failure is discarded (`snapshot::save` checks the failure after writing). A handler that
//! closes its end of the connection but keeps serving is therefore taken for dead: keep the
//! socket open while serving. (A handler that stays connected but stops serving holds the
//! blocked vCPUs; a pause then cannot complete, and [`Machine::pause`] says so within its bound.)
//!
//! [`Machine::pause`]: crate::Machine::pause

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, eventfd, poll};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
    SocketType, connect, sendmsg, socket_with,
};
use serde::{Deserialize, Serialize};
use squib_snapshot::snapshot::RegionLayout;
use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use squib_kvm::pause::{Kick, Rendezvous};

use super::GuestMemory;

/// How long [`UffdMemory::handshake`] waits for the handler to accept and read the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the watcher kicks vCPUs after the handler died before it unregisters guest memory
/// anyway (to free threads blocked on faults that a signal does not interrupt).
pub const KICK_GRACE: Duration = Duration::from_secs(1);

/// The page size the handler serves in: the x86-64 host page (guest memory is plain anonymous
/// memory, not hugetlbfs).
pub const PAGE_SIZE: u64 = 4096;

/// The handshake's largest body: Firecracker's example handlers read it into 1 KiB.
pub const MAX_HANDSHAKE: usize = 1024;

/// One guest memory region as Firecracker describes it to a page-fault handler: where the region
/// is mapped in the VMM, how long it is, and where its bytes are in the memory file.
///
/// The field names, their order and their meaning are Firecracker's (`GuestRegionUffdMapping` in
/// its `persist.rs`); handlers parse exactly this JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address (in squib's process) of the region's first byte.
    pub base_host_virt_addr: u64,
    /// Region length in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the snapshot's memory file.
    pub offset: u64,
    /// The page size faults are served in, in bytes.
    pub page_size: u64,
    /// The same page size, in bytes despite its name: Firecracker keeps this deprecated field for
    /// handlers written against its first version of the handshake.
    pub page_size_kib: u64,
}

/// What creating, registering or handing over a userfaultfd can fail with.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Guest memory could not be mapped.
    #[error("mapping guest memory for a page-fault handler: {0}")]
    Memory(String),
    /// The userfaultfd could not be created.
    #[error(
        "creating a userfaultfd (needs read-write access to /dev/userfaultfd, or \
         vm.unprivileged_userfaultfd=1, or CAP_SYS_PTRACE)"
    )]
    Create(#[source] userfaultfd::Error),
    /// A region could not be registered.
    #[error("registering guest memory {base:#x}+{len:#x} with the userfaultfd")]
    Register {
        /// Host address of the region.
        base: u64,
        /// Its length.
        len: u64,
        /// What the kernel said.
        #[source]
        source: userfaultfd::Error,
    },
    /// The kernel registered a region without `UFFDIO_COPY`.
    #[error("the kernel cannot resolve faults on guest memory with UFFDIO_COPY (offers {0:?})")]
    NoCopy(IoctlFlags),
    /// The handshake could not be delivered.
    #[error("page-fault handler at {socket}: {what}")]
    Handshake {
        /// The handler's socket.
        socket: PathBuf,
        /// What went wrong.
        what: String,
        /// The system error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
}

fn handshake_err(socket: &Path, what: impl Into<String>, source: Option<std::io::Error>) -> UffdError {
    UffdError::Handshake {
        socket: socket.to_path_buf(),
        what: what.into(),
        source,
    }
}

/// Anonymous, unpopulated guest RAM registered with a userfaultfd: every first touch of a page is
/// a fault for whoever holds the descriptor to resolve.
#[derive(Debug)]
pub struct UffdMemory {
    memory: GuestMemory,
    uffd: Uffd,
    mappings: Vec<GuestRegionUffdMapping>,
}

impl UffdMemory {
    /// Map RAM with `layout`'s regions (guest addresses and memory-file offsets) and register it.
    ///
    /// # Errors
    /// [`UffdError`]: the mapping, the descriptor, or a registration failed.
    pub fn new(layout: &[RegionLayout]) -> Result<Self, UffdError> {
        let memory = squib_snapshot::snapshot::restore::anonymous(layout)
            .map_err(|e| UffdError::Memory(e.to_string()))?;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM reads and writes guest memory from kernel mode on the vCPU's behalf.
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .map_err(UffdError::Create)?;
        let mut mappings = Vec::with_capacity(layout.len());
        for r in layout {
            let host = memory
                .get_host_address(GuestAddress(r.gpa))
                .map_err(|e| UffdError::Memory(format!("region {:#x}: {e}", r.gpa)))?;
            let region = memory
                .find_region(GuestAddress(r.gpa))
                .ok_or_else(|| UffdError::Memory(format!("region {:#x}: not mapped", r.gpa)))?;
            let len = usize::try_from(region.len()).map_err(|e| UffdError::Memory(e.to_string()))?;
            let base = host as u64;
            let ioctls = uffd
                .register_with_mode(host.cast(), len, RegisterMode::MISSING)
                .map_err(|source| UffdError::Register {
                    base,
                    len: region.len(),
                    source,
                })?;
            if !ioctls.contains(IoctlFlags::COPY) {
                return Err(UffdError::NoCopy(ioctls));
            }
            mappings.push(GuestRegionUffdMapping {
                base_host_virt_addr: base,
                size: region.len(),
                offset: r.file_offset,
                page_size: PAGE_SIZE,
                page_size_kib: PAGE_SIZE,
            });
        }
        Ok(Self {
            memory,
            uffd,
            mappings,
        })
    }

    /// The regions as the handler will be told them.
    #[must_use]
    pub fn mappings(&self) -> &[GuestRegionUffdMapping] {
        &self.mappings
    }

    /// The registered guest memory (for a handler in this process, such as a test's).
    #[must_use]
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The userfaultfd (for a handler in this process).
    #[must_use]
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Hand the memory to the handler listening on `socket`: connect, send the JSON mappings
    /// with the userfaultfd attached (`SCM_RIGHTS`), and wait until the handler has read them.
    /// Everything together takes at most `timeout`.
    ///
    /// # Errors
    /// [`UffdError::Handshake`] naming the socket: nothing listens there, the handler did not
    /// accept or read the message within `timeout`, or it hung up right after.
    pub fn handshake(self, socket: &Path, timeout: Duration) -> Result<ServedMemory, UffdError> {
        let deadline = Instant::now() + timeout;
        let body = serde_json::to_vec(&self.mappings)
            .map_err(|e| handshake_err(socket, format!("encoding the mappings: {e}"), None))?;
        if body.len() > MAX_HANDSHAKE {
            return Err(handshake_err(
                socket,
                format!(
                    "{} regions make a {}-byte handshake; Firecracker's handlers read at most {MAX_HANDSHAKE}",
                    self.mappings.len(),
                    body.len()
                ),
                None,
            ));
        }
        let stream = connect_until(socket, deadline)?;
        send_until(&stream, &body, &self.uffd, socket, deadline)?;
        wait_taken(&stream, socket, deadline, timeout)?;
        let regions = self
            .mappings
            .iter()
            .map(|m| {
                usize::try_from(m.base_host_virt_addr)
                    .and_then(|b| usize::try_from(m.size).map(|s| (b, s)))
                    .map_err(|e| UffdError::Memory(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServedMemory {
            memory: self.memory,
            server: PageServer {
                uffd: self.uffd,
                stream,
                socket: socket.to_path_buf(),
                regions,
            },
        })
    }
}

/// A non-blocking stream socket connected to `socket`, retrying while the listener's backlog is
/// full (a Unix socket's non-blocking connect says `EAGAIN` then, and cannot be polled for).
fn connect_until(socket: &Path, deadline: Instant) -> Result<OwnedFd, UffdError> {
    let addr = SocketAddrUnix::new(socket)
        .map_err(|e| handshake_err(socket, "not a usable socket path", Some(e.into())))?;
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| handshake_err(socket, "creating a socket", Some(e.into())))?;
    loop {
        match connect(&fd, &addr) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(rustix::io::Errno::AGAIN) => {
                return Err(handshake_err(
                    socket,
                    "the handler's listen queue stayed full: it is not accepting connections",
                    None,
                ));
            }
            Err(e) => {
                return Err(handshake_err(
                    socket,
                    "cannot connect (is a page-fault handler listening there?)",
                    Some(e.into()),
                ));
            }
        }
    }
}

fn send_until(
    fd: &OwnedFd,
    body: &[u8],
    uffd: &Uffd,
    socket: &Path,
    deadline: Instant,
) -> Result<(), UffdError> {
    let uffd_fd = uffd_borrowed(uffd);
    let fds = [uffd_fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    loop {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(handshake_err(socket, "building the SCM_RIGHTS message", None));
        }
        match sendmsg(
            fd,
            &[std::io::IoSlice::new(body)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) if n == body.len() => return Ok(()),
            Ok(n) => {
                return Err(handshake_err(
                    socket,
                    format!("sent {n} of the handshake's {} bytes", body.len()),
                    None,
                ));
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(handshake_err(socket, "sending the handshake", Some(e.into()))),
        }
    }
}

fn uffd_borrowed(uffd: &Uffd) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: `uffd` owns this open descriptor and outlives the returned borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(uffd.as_raw_fd()) }
}

/// Bytes sent on `fd` that the peer has not read yet (`SIOCOUTQ`).
fn unread(fd: &OwnedFd) -> std::io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) on an open socket writes one int through the pointer, which
    // points to a live local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

/// Whether the peer has hung up (or the socket has an error pending), without waiting.
fn hung_up(fd: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::RDHUP)];
    matches!(poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
}

/// Wait until the handler has read the whole handshake (nothing left unread on the socket).
fn wait_taken(fd: &OwnedFd, socket: &Path, deadline: Instant, timeout: Duration) -> Result<(), UffdError> {
    loop {
        let left = unread(fd).map_err(|e| handshake_err(socket, "SIOCOUTQ", Some(e)))?;
        if left == 0 {
            break;
        }
        if hung_up(fd) {
            return Err(handshake_err(
                socket,
                "the handler hung up without reading the handshake",
                None,
            ));
        }
        if Instant::now() >= deadline {
            return Err(handshake_err(
                socket,
                format!(
                    "the handler did not accept and read the handshake within {timeout:?} \
                     ({left} bytes still unread)"
                ),
                None,
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if hung_up(fd) {
        return Err(handshake_err(
            socket,
            "the handler hung up right after the handshake (a handler keeps its end of the \
             connection open while it serves; squib takes a hang-up for its end)",
            None,
        ));
    }
    Ok(())
}

/// Guest memory handed to a page-fault handler, and the link to that handler.
#[derive(Debug)]
pub struct ServedMemory {
    /// The guest memory (registered; its pages arrive as the handler copies them in).
    pub memory: GuestMemory,
    /// The handler's connection and squib's copy of the userfaultfd.
    pub server: PageServer,
}

/// A page-fault handler serving guest memory: the connection of the handshake and squib's own
/// copy of the userfaultfd (see the module docs for why squib keeps one).
#[derive(Debug)]
pub struct PageServer {
    uffd: Uffd,
    stream: OwnedFd,
    socket: PathBuf,
    /// Host address and length of each registered region.
    regions: Vec<(usize, usize)>,
}

impl PageServer {
    /// The handler's socket path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Unregister every region: threads blocked on faults resume (on zero pages) and later
    /// first touches are ordinary anonymous faults.
    fn release(&self) {
        for &(base, len) in &self.regions {
            if let Err(e) = self.uffd.unregister(base as *mut libc::c_void, len) {
                tracing::error!(error = %e, base, len, "UFFDIO_UNREGISTER of guest memory failed");
            }
        }
    }

    /// Wait for the handler to hang up, or for `stop` to become readable. Returns why the handler
    /// is gone, or `None` when stopped.
    fn wait_hangup(&self, stop: &OwnedFd) -> Option<String> {
        loop {
            let mut fds = [
                PollFd::new(&self.stream, PollFlags::IN | PollFlags::RDHUP),
                PollFd::new(stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Some(format!("cannot be watched (poll: {e})")),
            }
            if !fds[1].revents().is_empty() {
                return None;
            }
            let ev = fds[0].revents();
            if ev.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
                return Some("hung up".to_owned());
            }
            if ev.contains(PollFlags::IN) {
                // Firecracker's protocol has nothing for the handler to say; drain what it sends.
                let mut buf = [0u8; 512];
                match rustix::io::read(&self.stream, &mut buf) {
                    Ok(0) => return Some("hung up".to_owned()),
                    Ok(n) => {
                        tracing::debug!(bytes = n, socket = %self.socket.display(), "page-fault handler sent bytes; ignored")
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => return Some(format!("connection failed ({e})")),
                }
            }
        }
    }
}

/// Stops a machine's vCPUs from the watcher thread, which does not own them: records the
/// failure, asks for a final stop, and kicks the threads.
///
/// It holds the threads' `pthread_t`s, so the machine stops its watcher before it joins (or
/// leaves behind) any vCPU thread.
#[derive(Debug)]
pub(crate) struct Halter {
    control: Arc<Rendezvous>,
    threads: Vec<libc::pthread_t>,
}

impl Halter {
    /// A halter for the threads of `handles`, which `control` rules.
    pub(crate) fn new(control: Arc<Rendezvous>, handles: &[JoinHandle<()>]) -> Self {
        use std::os::unix::thread::JoinHandleExt;
        Self {
            control,
            threads: handles.iter().map(JoinHandleExt::as_pthread_t).collect(),
        }
    }

    /// Record `why` as the machine's failure, ask every vCPU to stop for good, and kick them.
    fn fail(&self, why: String) {
        self.control.halt(why);
        self.kick();
    }

    fn kick(&self) {
        for &t in &self.threads {
            Kick::kick(t);
        }
    }

    /// Wait until every vCPU thread has ended (`true`), `limit` has passed or `cancel` became
    /// readable (`false`), kicking again each slice (a kick is cheap; threads that ended are
    /// joined only after the watcher stops, so their ids stay valid).
    fn wait_stopped(&self, limit: Duration, cancel: &impl AsFd) -> bool {
        let start = Instant::now();
        loop {
            if self
                .control
                .wait_settled(self.threads.len(), Duration::from_millis(20))
                .is_ok()
            {
                return true;
            }
            if start.elapsed() >= limit || readable(cancel) {
                return false;
            }
            self.kick();
        }
    }
}

fn readable(fd: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0)
}

/// The thread that watches a page server for the machine, and how to stop it.
#[derive(Debug)]
pub(crate) struct Watch {
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Watch `server` for the machine whose vCPUs `halter` stops.
    pub(crate) fn start(server: PageServer, halter: Halter) -> std::io::Result<Self> {
        let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("squib-uffd-watch".to_owned())
                .spawn(move || watch(&server, &halter, &stop))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop watching (the machine is being dropped) and wait for the thread.
    pub(crate) fn stop(&mut self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(server: &PageServer, halter: &Halter, stop: &OwnedFd) {
    let Some(why) = server.wait_hangup(stop) else {
        return;
    };
    let why = format!(
        "the page-fault handler at {} {why}: guest memory it has not served can never arrive, \
         so the guest was stopped",
        server.socket.display()
    );
    tracing::error!("{why}");
    halter.fail(why);
    let stopped = halter.wait_stopped(KICK_GRACE, stop);
    if !stopped {
        tracing::warn!(
            "vCPUs still blocked on unserved page faults after {KICK_GRACE:?}: unregistering guest memory to free them"
        );
    }
    // Every thread still blocked on a fault (a vCPU in a kernel-mode fault, or squib's own thread
    // copying memory into a snapshot) resumes; the machine never runs guest code again.
    server.release();
    if !stopped {
        halter.wait_stopped(Duration::MAX, stop);
    }
}
