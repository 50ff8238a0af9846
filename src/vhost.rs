//! vhost-user ports in the daemon: opening them (config or `port-add`),
//! and their part of a live handover — the old binary gives out each
//! port's protocol state with the pause, the new one adopts it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use fastpath::dataplane::PortIo;
use fastpath::vhost::endpoint::{Endpoint, Handed, Mode};
use fastpath::vhost::port::{Shared, VhostPort};
use fastpath::vhost::record::{Record, WireMessage};
use fastpath::wake::Wake;
use live_migrate::protocol as wire;
use serde_json::{json, Value};

use crate::config::VhostMode;

/// What a vhost-user port is, as configured.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub socket: PathBuf,
    pub mode: VhostMode,
    /// The device's MAC (the guest reads it from the config space).
    pub mac: [u8; 6],
}

/// A running vhost-user port's protocol side.
pub struct Link {
    pub spec: Spec,
    pub endpoint: Endpoint,
    shared: Arc<Shared>,
}

impl Link {
    /// What `ctl stats` shows of the port's protocol side.
    pub fn status(&self) -> Value {
        let last_error = self.shared.last_error();
        json!({
            "name": self.spec.name,
            "socket": self.spec.socket,
            "mode": mode_name(self.spec.mode),
            "guest_connected": self.shared.published(),
            "connections_ended": self.shared.connections.load(std::sync::atomic::Ordering::Relaxed),
            "last_error": last_error,
        })
    }

    /// Wake the fast-path threads on the guest's kicks.
    pub fn wake_on_kick(&self, wakes: &[Arc<Wake>]) {
        let w = wakes.to_vec();
        self.shared
            .on_kick(Arc::new(move || w.iter().for_each(|w| w.notify())));
    }
}

/// Open the port: listen on (or connect to) its socket. Returns the
/// fast path's side too, one for each of `threads` fast-path threads.
pub fn open(spec: Spec, threads: usize) -> Result<(Link, Vec<PortIo>)> {
    let shared = Shared::new(spec.mac);
    let what = || {
        format!(
            "port {}: field `socket`: {}",
            spec.name,
            spec.socket.display()
        )
    };
    let endpoint = match spec.mode {
        VhostMode::Server => Endpoint::listen(&spec.socket, shared.clone()).with_context(what)?,
        VhostMode::Client => {
            Endpoint::start(Mode::Client(spec.socket.clone()), shared.clone()).with_context(what)?
        }
    };
    Ok(link(spec, endpoint, shared, threads))
}

/// The port's protocol side, and its fast-path side for each of `threads`.
fn link(
    spec: Spec,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    threads: usize,
) -> (Link, Vec<PortIo>) {
    let ios = (0..threads.max(1))
        .map(|t| PortIo::VhostUser(Box::new(VhostPort::for_thread(shared.clone(), t, threads))))
        .collect();
    (
        Link {
            spec,
            endpoint,
            shared,
        },
        ios,
    )
}

/// A port as the pause handed it over.
pub struct Given {
    pub spec: Spec,
    pub handed: Handed,
}

/// Serve a handed-over port: its connection (if one was open) is set up
/// again before this returns. Its fast-path side, for each of `threads`.
pub fn adopt(g: Given, threads: usize) -> Result<(Link, Vec<PortIo>)> {
    let shared = Shared::new(g.spec.mac);
    let mode = match (g.spec.mode, g.handed.listener) {
        (VhostMode::Server, Some(l)) => Mode::Server(std::os::unix::net::UnixListener::from(l)),
        (VhostMode::Server, None) => anyhow::bail!(
            "port {}: a server-mode port came without its listening socket",
            g.spec.name
        ),
        (VhostMode::Client, _) => Mode::Client(g.spec.socket.clone()),
    };
    let endpoint = Endpoint::adopt(mode, shared.clone(), g.handed.conn)
        .with_context(|| format!("port {}: taking its VMM connection over", g.spec.name))?;
    Ok(link(g.spec, endpoint, shared, threads))
}

/// `handed` (of `spec`'s port) as data; its descriptors are appended to
/// `fds`, which name them by index.
pub fn to_wire(spec: &Spec, handed: &Handed, fds: &mut Vec<RawFd>) -> wire::VhostPort {
    fn fd(fds: &mut Vec<RawFd>, f: &OwnedFd) -> usize {
        fds.push(f.as_raw_fd());
        fds.len() - 1
    }
    let listener = handed.listener.as_ref().map(|l| fd(fds, l));
    let conn = handed.conn.as_ref().map(|(s, record)| {
        let fd = fd(fds, s);
        let record = record
            .to_wire(fds)
            .into_iter()
            .map(|m| wire::VhostMessage {
                request: m.request,
                flags: m.flags,
                payload: m.payload,
                fds: m.fds,
            })
            .collect();
        wire::VhostConn { fd, record }
    });
    wire::VhostPort {
        name: spec.name.clone(),
        socket: spec.socket.clone(),
        mode: match spec.mode {
            VhostMode::Server => wire::VhostMode::Server,
            VhostMode::Client => wire::VhostMode::Client,
        },
        mac: spec.mac,
        listener,
        conn,
    }
}

fn mode_name(m: VhostMode) -> &'static str {
    match m {
        VhostMode::Server => "server",
        VhostMode::Client => "client",
    }
}

/// A port from its data; `take(i)` gives descriptor `i` (each once).
pub fn from_wire(
    v: wire::VhostPort,
    mut take: impl FnMut(usize) -> Result<OwnedFd>,
) -> Result<Given> {
    let field = |k: &str| format!("vhost port {}: {k}", v.name);
    let listener = v.listener.map(&mut take).transpose()?;
    let conn = match v.conn {
        Some(c) => {
            let s = take(c.fd)?;
            let wire = c
                .record
                .into_iter()
                .map(|m| WireMessage {
                    request: m.request,
                    flags: m.flags,
                    payload: m.payload,
                    fds: m.fds,
                })
                .collect();
            let record =
                Record::from_wire(wire, |i| take(i).ok()).with_context(|| field("conn.record"))?;
            Some((s, record))
        }
        None => None,
    };
    Ok(Given {
        spec: Spec {
            name: v.name,
            socket: v.socket,
            mode: match v.mode {
                wire::VhostMode::Server => VhostMode::Server,
                wire::VhostMode::Client => VhostMode::Client,
            },
            mac: v.mac,
        },
        handed: Handed { listener, conn },
    })
}
