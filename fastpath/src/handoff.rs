//! What a fast-path thread gives to, and takes from, the next binary in
//! a live handover: its flows and descriptors (the pre-copy), what only a
//! paused thread knows (the pause), and the flows, pool and ports the
//! next one adopts.

use flowtable::{Action, FlowKey, FlowStats};

use crate::port::{Port, PortCounters, PortIo};
use crate::umem::FramePool;

/// A fast path's flows and descriptors, for the next binary.
#[derive(Debug)]
pub struct Dump {
    /// The thread's clock (ns since its epoch) at the dump.
    pub clock_ns: u64,
    /// The flow table's hash seed.
    pub hash_seed: u64,
    /// The flows: key, index into `actions`, counters.
    pub flows: Vec<(FlowKey, u32, FlowStats)>,
    /// The distinct actions the flows use.
    pub actions: Vec<Action>,
    /// Each port by id: its name and descriptor (still owned here: the
    /// caller passes copies); `None` for a removed one.
    pub ports: Vec<(String, Option<HandedIo>)>,
    /// The frame pool: every AF_XDP socket's UMEM and rings point into it.
    pub pool: HandedPool,
}

/// A paused fast path: what the next binary needs at the last moment.
#[derive(Debug)]
pub struct Paused {
    /// CLOCK_MONOTONIC (ns) of the last poll, for the blackout.
    pub last_poll_mono_ns: u64,
    /// The frames user space owns now (every other is on a socket's ring).
    pub free: Vec<u64>,
    /// Each port's counters, by id.
    pub counters: Vec<PortCounters>,
    /// The pipeline's counters (drops and punts by reason).
    pub pipeline: crate::pipeline::NamedCounters,
}

/// Flows handed over: each distinct action once, then every flow as
/// (key, index into `actions`, counters).
pub struct Warm {
    /// The previous table's hash seed (see `FlowTable::set_hasher`).
    pub hash_seed: u64,
    pub actions: Vec<Action>,
    pub flows: Box<dyn Iterator<Item = (FlowKey, u32, FlowStats)> + Send>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Warm({} actions)", self.actions.len())
    }
}

/// What the next binary's fast path takes over (see [`Request::Adopt`]).
#[derive(Debug)]
pub struct Adoption {
    pub pool: FramePool,
    pub ports: Vec<Port>,
    /// The previous pipeline's counters, continued.
    pub counters: Option<crate::pipeline::NamedCounters>,
}

/// A port's descriptor as handed over.
#[derive(Debug, Clone, Copy)]
pub enum HandedIo {
    /// A tap queue.
    Tap(i32),
    /// A bound AF_XDP socket, its ring size, and whether it was bound
    /// with multi-buffer.
    Xsk { fd: i32, ring_size: u32, sg: bool },
    /// A vhost-user port: its connection goes with the pause (the
    /// protocol thread gives it out, [`crate::vhost::endpoint`]).
    VhostUser,
}

/// The frame pool as handed over: its memfd and shape. Which chunks user
/// space owns comes with the pause ([`Paused::free`]); every other chunk
/// is on a socket's ring, whose indices live in the shared ring memory.
#[derive(Debug, Clone)]
pub struct HandedPool {
    pub fd: i32,
    pub len: usize,
    pub huge: bool,
    pub chunk_size: u32,
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Every flow of `t` as (key, index into the actions, counters), and each
/// distinct action once (the table's own action ids, made dense: no
/// hashing).
pub fn dump_flows(t: &flowtable::FlowTable) -> (Vec<(FlowKey, u32, FlowStats)>, Vec<Action>) {
    let mut dense: Vec<u32> = Vec::new();
    let mut actions = Vec::new();
    let mut flows = Vec::with_capacity(t.len());
    for e in t.iter() {
        let id = e.action_id.0 as usize;
        if dense.len() <= id {
            dense.resize(id + 1, u32::MAX);
        }
        if dense[id] == u32::MAX {
            dense[id] = u32::try_from(actions.len()).unwrap_or(u32::MAX);
            actions.push(*e.action);
        }
        flows.push((e.key, dense[id], e.stats));
    }
    (flows, actions)
}

/// `io`'s descriptor as a handover passes it on (`None`: nothing to pass,
/// the port is closed or in memory).
pub fn handed(io: &PortIo) -> Option<HandedIo> {
    match io {
        PortIo::Tap(t) => Some(HandedIo::Tap(t.fd())),
        PortIo::Xsk(x) => Some(HandedIo::Xsk {
            fd: x.fd(),
            ring_size: x.ring_size(),
            sg: x.sg(),
        }),
        PortIo::VhostUser(_) => Some(HandedIo::VhostUser),
        PortIo::Memory(_) | PortIo::Closed => None,
    }
}
