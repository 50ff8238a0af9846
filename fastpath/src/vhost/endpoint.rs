//! The protocol side of a vhost-user port: a thread per port that waits
//! for the VMM — listening on the port's socket (server mode) or
//! connecting to the VMM's (client mode, retried every second, so a
//! restarted switch finds its running VMs again) — and serves one
//! connection at a time through [`super::shim`] to `vhost-user-backend`'s
//! request handler.
//!
//! A live connection can be handed over ([`Endpoint::detach`]): the
//! thread stops between two requests, notes where each running ring is,
//! ends its handler, and gives out the VMM's socket with the
//! [`Record`] of what the VMM set up. The next binary (or this one, if the
//! handover fails: [`Endpoint::reattach`]) replays the record into a
//! fresh handler ([`Endpoint::adopt`]) and goes on pumping the same
//! socket; the VMM sees nothing.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::port::{NetBackend, Shared};
use super::record::Record;
use super::shim::{self, Pumped};

/// How the port reaches its VMM.
pub enum Mode {
    /// The VMM connects to this listener (QEMU `-chardev socket,path=P`).
    Server(UnixListener),
    /// This side connects to the VMM's socket (QEMU `-chardev
    /// socket,path=P,server=on`), again after every disconnect.
    Client(PathBuf),
}

/// A port's protocol side, as handed over.
pub struct Handed {
    /// Server mode: the listening socket.
    pub listener: Option<OwnedFd>,
    /// The VMM's connection and what it set up, if one was open.
    pub conn: Option<(OwnedFd, Record)>,
}

/// A running port's protocol thread.
pub struct Endpoint {
    stop: EventFd,
    reattach: mpsc::Sender<Handed>,
    detached: mpsc::Receiver<io::Result<Handed>>,
    /// Whether a detach that timed out was called off (see
    /// [`Endpoint::detach`]).
    cancel: Arc<std::sync::Mutex<Detach>>,
}

/// Where a detach stands, shared by the endpoint and its thread. The lock
/// makes the two outcomes exclusive: the thread either gives the
/// connection out (and the endpoint takes it, late or not) or finds the
/// detach called off and serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detach {
    Serving,
    /// A detach timed out and was called off: the thread, once it gets
    /// to it (its VMM was stalled mid-request), serves on.
    Cancelled,
}

/// How long [`Endpoint::detach`] and [`Endpoint::adopt`] wait.
const TIMEOUT: Duration = Duration::from_secs(2);

impl Endpoint {
    /// Listen on a socket at `path` and serve the port (server mode). A
    /// stale socket there (nobody listening) is replaced; anything else at
    /// `path` — a file, a directory, a socket in use — is an error, never
    /// removed.
    pub fn listen(path: &std::path::Path, shared: Arc<Shared>) -> io::Result<Endpoint> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Self::start(Mode::Server(UnixListener::bind(path)?), shared)
    }

    /// Serve the port in `mode` on a thread of its own.
    pub fn start(mode: Mode, shared: Arc<Shared>) -> io::Result<Endpoint> {
        Self::spawn(mode, shared, None).map(|(e, _)| e)
    }

    /// Serve a handed-over port: the connection (if any) is set up again
    /// from its record before this returns, and its rings published.
    pub fn adopt(
        mode: Mode,
        shared: Arc<Shared>,
        conn: Option<(OwnedFd, Record)>,
    ) -> io::Result<Endpoint> {
        let started = conn
            .as_ref()
            .is_some_and(|(_, r)| r.started().next().is_some());
        let replayed = conn.is_some();
        let (e, ready) = Self::spawn(mode, shared.clone(), conn)?;
        if replayed {
            ready.recv_timeout(TIMEOUT).map_err(|_| {
                io::Error::other("the vhost-user thread did not set the connection up")
            })??;
        }
        // The replay kicked the running rings; the device publishes them.
        let deadline = Instant::now() + TIMEOUT;
        while started && !shared.published() {
            if Instant::now() > deadline {
                return Err(io::Error::other("the replayed rings were not published"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(e)
    }

    fn spawn(
        mode: Mode,
        shared: Arc<Shared>,
        conn: Option<(OwnedFd, Record)>,
    ) -> io::Result<(Endpoint, mpsc::Receiver<io::Result<()>>)> {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let cancel = Arc::new(std::sync::Mutex::new(Detach::Serving));
        let (reattach_tx, reattach_rx) = mpsc::channel();
        let (detached_tx, detached_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = Thread {
            mode,
            shared,
            stop: stop.try_clone()?,
            reattach: reattach_rx,
            detached: detached_tx,
            cancel: cancel.clone(),
        };
        let name = match &thread.mode {
            Mode::Server(_) => "vhost-server",
            Mode::Client(_) => "vhost-client",
        };
        let pending = conn.map(|(fd, r)| (UnixStream::from(fd), r));
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || thread.run(pending, ready_tx))?;
        Ok((
            Endpoint {
                stop,
                reattach: reattach_tx,
                detached: detached_rx,
                cancel,
            },
            ready_rx,
        ))
    }

    /// Stop serving (between two requests; the fast path must be paused,
    /// so the rings stand still) and give out the connection.
    ///
    /// If the thread does not stop within [`TIMEOUT`] (its VMM stalled in
    /// the middle of a request), the detach is called off: the thread
    /// serves on once the VMM goes on, and nothing is left waiting for a
    /// connection nobody takes back.
    pub fn detach(&self) -> io::Result<Handed> {
        self.ask_stop()?;
        if let Ok(h) = self.detached.recv_timeout(TIMEOUT) {
            return h;
        }
        let mut d = super::port::lock(&self.cancel);
        // Given out just now, under the lock: take it after all.
        if let Ok(h) = self.detached.try_recv() {
            return h;
        }
        *d = Detach::Cancelled;
        let _ = self.stop.read();
        Err(io::Error::other(
            "the vhost-user thread did not stop (its VMM is mid-request): detach called off",
        ))
    }

    /// Ask the thread to stop (a detach called off earlier no longer
    /// holds: this one is meant).
    fn ask_stop(&self) -> io::Result<()> {
        *super::port::lock(&self.cancel) = Detach::Serving;
        self.stop.write(1)
    }

    /// Serve again what [`Endpoint::detach`] gave out (the handover
    /// failed).
    pub fn reattach(&self, h: Handed) -> io::Result<()> {
        self.reattach
            .send(h)
            .map_err(|_| io::Error::other("the vhost-user thread is gone"))
    }
}

impl Drop for Endpoint {
    /// The thread stops too: a port that goes away (removed, or never
    /// added because the fast path refused it) leaves no thread behind
    /// accepting VMM connections for it.
    fn drop(&mut self) {
        let _ = self.ask_stop();
    }
}

struct Thread {
    mode: Mode,
    shared: Arc<Shared>,
    stop: EventFd,
    reattach: mpsc::Receiver<Handed>,
    detached: mpsc::Sender<io::Result<Handed>>,
    cancel: Arc<std::sync::Mutex<Detach>>,
}

impl Thread {
    fn run(self, mut pending: Option<(UnixStream, Record)>, ready: mpsc::Sender<io::Result<()>>) {
        let mut ready = Some(ready);
        loop {
            // The next connection: a handed one (set up again from its
            // record), or a new one.
            let (vmm, record, replay) = match pending.take() {
                Some((vmm, record)) => (vmm, record, true),
                None => match self.wait_for_vmm() {
                    Ok(Some(vmm)) => (vmm, Record::default(), false),
                    Ok(None) => {
                        match self.hand_over(None) {
                            Some(back) => pending = back,
                            None => return,
                        }
                        continue;
                    }
                    Err(e) => {
                        *super::port::lock(&self.shared.last_error) = Some(e.to_string());
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                },
            };
            let mut record = record;
            let session = Session::open(&self.shared, replay.then_some(&record));
            if let Some(r) = ready.take() {
                let _ = r.send(
                    session
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| io::Error::other(e.to_string())),
                );
            }
            let outcome = match session {
                Ok(s) => s.pump(&vmm, self.stop.as_raw_fd(), &mut record, &self.shared),
                Err(e) => Pumped::Ended(Err(e)),
            };
            match outcome {
                Pumped::Detached => match self.hand_over(Some((vmm, record))) {
                    Some(back) => pending = back,
                    None => return,
                },
                Pumped::Ended(r) => {
                    // Counted before the guest is forgotten: whoever sees
                    // it gone sees it counted.
                    self.shared.connections.fetch_add(1, Ordering::Relaxed);
                    self.shared.forget_guest();
                    if let Err(e) = r {
                        if e.kind() != io::ErrorKind::UnexpectedEof {
                            *super::port::lock(&self.shared.last_error) = Some(e.to_string());
                            // A broken peer must not spin.
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            }
        }
    }

    /// A new VMM connection; `None` if a detach was asked for first.
    fn wait_for_vmm(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match &self.mode {
                Mode::Server(l) => {
                    if !wait_readable(l.as_raw_fd(), self.stop.as_raw_fd(), -1)? {
                        return Ok(None);
                    }
                    return l.accept().map(|(s, _)| Some(s));
                }
                Mode::Client(path) => match UnixStream::connect(path) {
                    Ok(s) => return Ok(Some(s)),
                    Err(e) => {
                        *super::port::lock(&self.shared.last_error) =
                            Some(format!("connecting to {}: {e}", path.display()));
                        // Again in a second (or at once on a detach).
                        if !wait_readable(-1, self.stop.as_raw_fd(), 1000)? {
                            return Ok(None);
                        }
                    }
                },
            }
        }
    }

    /// Give out the listener and `conn`, then wait: `Some` with what
    /// comes back if the handover failed (the connection, if there was
    /// one); `None` once the endpoint is dropped (handed over for good,
    /// or the port removed), which ends the thread.
    #[allow(clippy::option_option)]
    fn hand_over(
        &self,
        conn: Option<(UnixStream, Record)>,
    ) -> Option<Option<(UnixStream, Record)>> {
        let d = super::port::lock(&self.cancel);
        let _ = self.stop.read();
        if *d == Detach::Cancelled {
            // The detach timed out and was called off: serve on.
            drop(d);
            *super::port::lock(&self.cancel) = Detach::Serving;
            return Some(conn);
        }
        let listener = match &self.mode {
            Mode::Server(l) => match l.try_clone() {
                Ok(l) => Some(OwnedFd::from(l)),
                Err(e) => {
                    self.detached.send(Err(e)).ok()?;
                    return Some(conn);
                }
            },
            Mode::Client(_) => None,
        };
        let h = Handed {
            listener,
            conn: conn.map(|(s, r)| (OwnedFd::from(s), r)),
        };
        // Given out under the lock: the endpoint either takes it (in time,
        // or when it looks again before calling the detach off) or has
        // already called it off above.
        self.detached.send(Ok(h)).ok()?;
        drop(d);
        let h = self.reattach.recv().ok()?;
        Some(h.conn.map(|(fd, r)| (UnixStream::from(fd), r)))
    }
}

/// Wait until `fd` (if ≥ 0) or `stop` is readable, or `timeout_ms`
/// passes; false if `stop` is.
fn wait_readable(fd: RawFd, stop: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let [_, stopped] = shim::readable([fd, stop], timeout_ms)?;
    Ok(!stopped)
}

/// One connection's request handler.
struct Session {
    daemon: vhost_user_backend::VhostUserDaemon<Arc<NetBackend>>,
    backend_side: UnixStream,
}

impl Session {
    /// A fresh handler; set up from `replay` if given.
    fn open(shared: &Arc<Shared>, replay: Option<&Record>) -> io::Result<Session> {
        use std::os::linux::net::SocketAddrExt;
        static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let e = |e: vhost_user_backend::Error| io::Error::other(e.to_string());
        // The handler accepts on a private (abstract) address the shim
        // connects to.
        let name = format!(
            "vswitch-vhost-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let inner = UnixListener::bind_addr(&addr)?;
        let backend_side = UnixStream::connect_addr(&addr)?;
        let backend = Arc::new(NetBackend::new(shared.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            vhost_user_backend::VhostUserDaemon::new("vswitch".into(), backend, mem).map_err(e)?;
        daemon
            .start(&mut vhost::vhost_user::Listener::from(inner))
            .map_err(e)?;
        let s = Session {
            daemon,
            backend_side,
        };
        if let Some(r) = replay {
            r.replay(&s.backend_side)?;
        }
        Ok(s)
    }

    /// Pump until the connection ends or a detach; on a detach the
    /// record gets each running ring's position.
    fn pump(
        mut self,
        vmm: &UnixStream,
        stop: RawFd,
        record: &mut Record,
        shared: &Shared,
    ) -> Pumped {
        let out = shim::pump(vmm, self.backend_side, stop, record);
        if matches!(out, Pumped::Detached) {
            // The fast path is paused: the rings stand where it left them.
            // A ring never published was never touched: its recorded
            // base holds.
            if let Some(vrings) = shared.vrings() {
                let started: Vec<usize> = record.started().collect();
                for i in started {
                    if let Some(v) = vrings.get(i) {
                        record.set_base(i, v.queue_next_avail());
                    }
                }
            }
        }
        let _ = self.daemon.wait();
        for h in self.daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        if matches!(out, Pumped::Detached) {
            shared.forget_guest();
        }
        out
    }
}

#[cfg(test)]
mod tests;
