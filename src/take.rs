//! Live handover, the new binary's side: asking the running switch for
//! its configuration, taking its pre-copy, then its pause, and confirming
//! (see `give` for the conversation as a whole, `live_migrate::protocol`
//! for its messages).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coprocessor::Shared;
use fastpath::dataplane::{monotonic_ns, Port, PortCounters, PortIo, Request};
use fastpath::pipeline::NamedCounters;
use fastpath::tap::Tap;
use fastpath::umem::FramePool;
use fastpath::xsk::XskSocket;
use flowtable::PortId;
use live_migrate::protocol::{self, Offer, PauseHeader, PipelineCounters, PortEntry};
use live_migrate::{fdpass, SwitchState};
use tracing::{info, warn};

use crate::command::Command;
use crate::deadline::Deadline;
use crate::fastpaths::FastPaths;

/// The new side, before anything pauses: the running switch's
/// configuration and clock zero (CLOCK_MONOTONIC ns), so this binary can
/// start everything first and keep the blackout to the state transfer.
pub fn prepare(socket: &Path) -> Result<(String, u64)> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = Command::HandoverPrepare(Default::default()).to_line() + "\n";
    (&conn).write_all(req.as_bytes())?;
    let mut line = String::new();
    BufReader::new((&conn).take(protocol::MAX_HEADER)).read_line(&mut line)?;
    refused(line.as_bytes())?;
    let a: protocol::PrepareAnswer = protocol::decode(line.as_bytes())?;
    Ok((a.config, a.epoch_mono_ns))
}

/// An error answer from the running switch, as an error.
fn refused(answer: &[u8]) -> Result<()> {
    match serde_json::from_slice::<protocol::ErrorAnswer>(answer) {
        Ok(e) => bail!("the running switch refused: {}", e.error),
        Err(_) => Ok(()),
    }
}

/// A port as received, by id.
pub enum TakenPort {
    Tap(OwnedFd),
    Xsk {
        fd: OwnedFd,
        ring_size: u32,
        sg: bool,
    },
    /// vhost-user: the connection comes with the pause.
    VhostUser,
    /// Removed at run time (its id stays taken).
    Closed,
}

/// The frame pool as received (which frames are free comes with the
/// pause).
pub struct TakenPool {
    pub fd: OwnedFd,
    pub len: usize,
    pub huge: bool,
    pub chunk_size: u32,
}

/// One fast-path thread's part of the pre-copy.
pub struct TakenThread {
    /// Its queue of each port, by id, with the port's name.
    pub ports: Vec<(String, TakenPort)>,
    pub pool: TakenPool,
    /// Its flow table's hash seed (flows keep their hashes).
    pub hash_seed: u64,
    /// Its flows: these records of the flow section.
    pub flows: std::ops::Range<usize>,
}

/// The pre-copy, as the new binary received it.
pub struct Taken {
    pub state: SwitchState,
    /// The fast path's flows, read in place from the snapshot file (every
    /// thread's, thread after thread).
    pub flows: live_migrate::memfd::MappedFlows,
    /// Each fast-path thread's ports, pool and flows (thread 0 first).
    pub threads: Vec<TakenThread>,
    pub listener: UnixListener,
    /// The bpf_links keeping the XDP programs attached: held for as long
    /// as this binary runs (and handed on).
    pub xdp_links: Vec<OwnedFd>,
    /// The XDP programs' socket maps, by interface.
    pub socket_maps: Vec<(String, OwnedFd)>,
    /// CLOCK_MONOTONIC of the old binary's holding its coprocessors (new
    /// flows wait from then on; a binary that did not send it: its start
    /// of the pre-copy), of its start of the pre-copy (flows dumped, state
    /// saved), of the end of its packing, of this side's having it all.
    pub held_mono_ns: u64,
    pub started_mono_ns: u64,
    pub packed_mono_ns: u64,
    pub received_mono_ns: u64,
    pub snapshot_bytes: usize,
    /// The connection to confirm on.
    pub conn: UnixStream,
    /// The running switch acknowledges the confirm (see [`confirm`]).
    pub confirm_ack: bool,
}

/// One fast-path thread's part of the pause.
pub struct ThreadPause {
    /// The frames user space owns.
    pub free: Vec<u64>,
    pub counters: Vec<PortCounters>,
    pub pipeline: NamedCounters,
}

/// What the pause brought.
pub struct Pause {
    /// Each fast-path thread's part (thread 0 first).
    pub threads: Vec<ThreadPause>,
    /// The vhost-user ports' connections.
    pub vhost: Vec<crate::vhost::Given>,
    /// CLOCK_MONOTONIC of the old binary's last poll, of the end of its
    /// packing, of this side's having it all.
    pub paused_mono_ns: u64,
    pub packed_mono_ns: u64,
    pub received_mono_ns: u64,
}

/// Read a framed message whose length (8 bytes, LE) is `len`.
fn read_message<M: protocol::Message>(conn: &UnixStream, len: [u8; 8]) -> Result<M> {
    let mut header = vec![0u8; protocol::frame_len::<M>(len)?];
    (&*conn)
        .read_exact(&mut header)
        .with_context(|| format!("reading the {}", M::NAME))?;
    Ok(protocol::decode(&header)?)
}

/// The new side: ask the switch on `socket` to hand over to this
/// binary's `threads` fast-path threads, and take the pre-copy.
pub fn take(socket: &Path, threads: usize) -> Result<Taken> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let req = protocol::HandoverRequest::for_threads(
        u32::try_from(threads).context("fast-path threads")?,
    );
    let req = Command::Handover(req).to_line() + "\n";
    (&conn).write_all(req.as_bytes())?;
    let mut len = [0u8; 8];
    let (n, fds) = fdpass::recv_many(&conn, &mut len)?;
    if n == 0 {
        bail!("the running switch closed the connection");
    }
    if fds.is_empty() {
        // An error answer (JSON) rather than a handover.
        let mut rest = len[..n].to_vec();
        let _ = (&conn).take(protocol::MAX_HEADER).read_to_end(&mut rest);
        refused(rest.trim_ascii_end())?;
        bail!(
            "the running switch answered neither a handover nor an error: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let h: Offer = read_message(&conn, len)?;
    let received_mono_ns = monotonic_ns();
    h.check_descriptors(fds.len())?;
    let counts = h.thread_flows()?;
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    // Each index was checked above: present, and named once.
    let mut take_fd = |i: usize| -> Result<OwnedFd> {
        fds.get_mut(i)
            .and_then(Option::take)
            .context("a descriptor the offer names is missing")
    };
    let snap = take_fd(h.snapshot_fd)?;
    let state = live_migrate::memfd::decode_fd(snap.as_fd(), h.snapshot)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let flows = live_migrate::memfd::MappedFlows::map(snap.as_fd(), h.flows)
        .map_err(|e| anyhow::anyhow!("the flow section: {e}"))?;
    let mut parts = Vec::new();
    let mut at = 0;
    for ((entries, pool, hash_seed), n) in h.thread_parts().zip(counts) {
        let mut ports = Vec::new();
        for p in entries {
            let port = match p {
                PortEntry::Tap { fd, .. } => TakenPort::Tap(take_fd(*fd)?),
                PortEntry::AfXdp {
                    fd, ring_size, sg, ..
                } => TakenPort::Xsk {
                    fd: take_fd(*fd)?,
                    ring_size: *ring_size,
                    sg: *sg,
                },
                PortEntry::VhostUser { .. } => TakenPort::VhostUser,
                PortEntry::Closed { .. } => TakenPort::Closed,
            };
            ports.push((p.name().to_string(), port));
        }
        parts.push(TakenThread {
            ports,
            pool: TakenPool {
                fd: take_fd(pool.fd)?,
                len: pool.len,
                huge: pool.huge,
                chunk_size: pool.chunk_size,
            },
            hash_seed,
            flows: at..at + n,
        });
        at += n;
    }
    let listener = UnixListener::from(take_fd(h.listener_fd)?);
    let xdp_links = h
        .xdp_links
        .iter()
        .map(|&l| take_fd(l))
        .collect::<Result<Vec<_>>>()?;
    let socket_maps = h
        .socket_maps
        .iter()
        .map(|m| Ok((m.interface.clone(), take_fd(m.fd)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Taken {
        state,
        flows,
        threads: parts,
        listener,
        xdp_links,
        socket_maps,
        held_mono_ns: h.held_mono_ns.unwrap_or(h.started_mono_ns),
        started_mono_ns: h.started_mono_ns,
        packed_mono_ns: h.packed_mono_ns,
        received_mono_ns,
        snapshot_bytes: h.snapshot + h.flows.count * live_migrate::FLOW_BYTES,
        confirm_ack: h.confirm_ack,
        conn,
    })
}

/// The new side: say on `conn` that the pre-copy is in place; the old
/// binary pauses and sends the rest.
pub fn ready(conn: &UnixStream) -> Result<Pause> {
    (&*conn)
        .write_all(protocol::READY)
        .context("telling the running switch the pre-copy is in")?;
    let mut len = [0u8; 8];
    let (n, fds) = fdpass::recv_many(conn, &mut len).context("the running switch did not pause")?;
    if n < len.len() {
        bail!("the running switch did not pause (it closed the connection)");
    }
    let h: PauseHeader = read_message(conn, len)?;
    let mut free = vec![0u8; h.free_bytes()?];
    (&*conn).read_exact(&mut free)?;
    let received_mono_ns = monotonic_ns();
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut vhost = Vec::new();
    for v in h.vhost {
        vhost.push(crate::vhost::from_wire(v, |i| {
            fds.get_mut(i)
                .and_then(Option::take)
                .context("a descriptor the pause names is missing")
        })?);
    }
    // Every thread's free list, thread after thread (their lengths add up
    // to the bytes read: `free_bytes`).
    let mut addrs = free.chunks_exact(8).map(|c| {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        u64::from_le_bytes(b)
    });
    let parts = std::iter::once((h.free, h.counters, h.pipeline)).chain(
        h.threads
            .into_iter()
            .map(|t| (t.free, t.counters, t.pipeline)),
    );
    let mut threads = Vec::new();
    for (n, counters, pipeline) in parts {
        threads.push(ThreadPause {
            free: addrs.by_ref().take(usize::try_from(n)?).collect(),
            counters: counters
                .iter()
                .map(counters_from_wire)
                .collect::<Result<_>>()?,
            pipeline: pipeline_from_wire(pipeline),
        });
    }
    Ok(Pause {
        threads,
        vhost,
        paused_mono_ns: h.paused_mono_ns,
        packed_mono_ns: h.packed_mono_ns,
        received_mono_ns,
    })
}

/// The new side's commit point: from here the old binary exits and this
/// one owns the ports, the rings and the frames.
pub fn confirm(conn: &UnixStream, acknowledged: bool) -> Result<()> {
    (&*conn)
        .write_all(protocol::CONFIRM)
        .context("confirming the handover")?;
    if !acknowledged {
        // A binary from before the acknowledgement: it exits on the confirm.
        return Ok(());
    }
    // Poll only once the old side says it will not: a confirm it took too
    // late is refused by its silence (it resumed).
    let mut line = String::new();
    BufReader::new(Deadline::new(conn, ACK_TIMEOUT).take(protocol::MAX_LINE))
        .read_line(&mut line)
        .context("waiting for the running switch to acknowledge the confirm")?;
    anyhow::ensure!(
        protocol::is_line(&line, protocol::ACK),
        "the running switch did not acknowledge the confirm ({:?}): it resumed",
        line.trim()
    );
    Ok(())
}

/// How long the new side waits for the acknowledgement of its confirm.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// A port's counters from their names; a counter this binary does not
/// know is dropped, one it knows and the message lacks is refused unless
/// it was added later (those default to 0).
fn counters_from_wire(m: &BTreeMap<String, u64>) -> Result<PortCounters> {
    serde_json::from_value(serde_json::to_value(m)?).context("handover pause: port counters")
}

fn pipeline_from_wire(p: PipelineCounters) -> NamedCounters {
    NamedCounters {
        rx_packets: p.rx_packets,
        rx_bytes: p.rx_bytes,
        hits: p.hits,
        misses: p.misses,
        tx_packets: p.tx_packets,
        punts: p.punts,
        drops: p.drops,
        port_drops: p.port_drops,
    }
}

/// A takeover in progress: this binary prepares everything, then asks
/// the running one (on `socket`) for its state and ports.
pub struct Takeover {
    pub socket: std::path::PathBuf,
    /// CLOCK_MONOTONIC at the running switch's clock zero, which this one
    /// continues.
    pub epoch_mono_ns: u64,
    pub started: std::time::Instant,
}

/// What taking over brought besides the state.
pub struct Adopted {
    /// How it went (logged, and shown by `ctl stats`).
    pub report: serde_json::Value,
    /// The control socket, bound by the first binary.
    pub listener: UnixListener,
    /// The bpf_links keeping the XDP programs attached.
    pub xdp_links: Vec<OwnedFd>,
    /// The XDP programs' socket maps, by interface (held, handed on).
    pub socket_maps: Vec<(String, fastpath::xdp::SocketMap)>,
    /// The id the next port added at run time gets.
    pub next_port: u16,
}

/// Everything is running (fast path held, coprocessors idle): take the
/// switch over from the running binary. The pre-copy goes into the
/// fast-path threads (`fast`) and the shared state while the old binary
/// forwards; then the pause brings the ports (named into `port_names`,
/// vhost-user ones into `vhost_links`) and the pools; confirmed, the fast
/// path polls.
///
/// Thread `i` takes the old binary's thread `i`: its queues, pool, flows
/// and counters. With more threads than the old binary had, each new one
/// opens its own queue of every port (a tap queue, an AF_XDP socket on
/// its NIC queue in the program's socket map, its vhost-user pairs) on a
/// pool of its own. With fewer, the flows and counters of old thread `i`
/// go to thread `i mod threads` and its queues close: a tap's kernel
/// side spreads their flows over the queues left, a vhost-user guest's
/// pairs are served by the threads left, and an AF_XDP queue has no
/// socket any more (its interface's queue count should be lowered first:
/// warned).
pub fn adopt(
    t: &Takeover,
    fast: &FastPaths,
    shared: &coprocessor::SharedLock,
    uplink_name: Option<&str>,
    port_names: &mut HashMap<String, PortId>,
    vhost_links: &mut Vec<crate::vhost::Link>,
) -> Result<Adopted> {
    let m = fast.len();
    let taken = take(&t.socket, m)?;
    let n = taken.threads.len();
    // Pre-copy (the old binary still forwards): the state, each thread's
    // flows in its held fast path, the pools and the sockets' rings
    // mapped.
    fast.tell(|| Request::Hold);
    let carried = taken.state.shared.conns.len();
    let flows = taken.state.flows.len() + taken.flows.len();
    let state = taken.state;
    let mapped = Arc::new(taken.flows);
    // Flows kept in the state itself (an old format): thread 0's.
    let mut legacy = Some(state.flows);
    let seed0 = taken.threads.first().map_or(0, |p| p.hash_seed);
    let warms: Vec<Box<fastpath::dataplane::Warm>> = (0..m)
        .map(|j| {
            // Old threads j, j + m, j + 2m, …
            let ranges: Vec<_> = taken
                .threads
                .iter()
                .skip(j)
                .step_by(m)
                .map(|p| p.flows.clone())
                .collect();
            let from = Arc::clone(&mapped);
            let records = ranges
                .into_iter()
                .flat_map(move |r| Arc::clone(&from).records_in(r));
            let records = legacy
                .take()
                .into_iter()
                .flat_map(|f| f.into_records())
                .chain(records);
            Box::new(fastpath::dataplane::Warm {
                hash_seed: taken.threads.get(j).map_or(seed0, |p| p.hash_seed),
                actions: state.actions.clone(),
                flows: Box::new(records.map(|r| (r.key, r.action, r.stats))),
            })
        })
        .collect();
    let restoring = fast.send_each(warms, Request::Restore)?;
    // The shared state meanwhile, on this thread.
    // A previous release handed over no services: this binary's config
    // has the ones to start with (as on a fresh start).
    let services = match state.since2 {
        Some(s) => s.services,
        None => coprocessor::lock(shared).services().specs(),
    };
    let restored = Shared::restore(state.shared, services, state.clock_ns)
        .map_err(|e| anyhow::anyhow!("restoring the handed-over state: {e}"))?;
    *coprocessor::lock(shared) = restored;
    let mut socket_maps = taken
        .socket_maps
        .into_iter()
        .map(|(i, fd)| {
            let map = fastpath::xdp::SocketMap::from_fd(fd)
                .with_context(|| format!("interface {i}: the handed-over socket map"))?;
            Ok((i, map))
        })
        .collect::<Result<Vec<_>>>()?;
    // Each taken thread's pool mapped, and this binary's big chunks for
    // it made (their pages touched) now rather than in the blackout; its
    // ports. Thread 0's ports name them all.
    let mut pools: Vec<Option<(fastpath::umem::Region, u32, fastpath::umem::BigChunks)>> =
        Vec::new();
    let mut adopted: Vec<Vec<Port>> = Vec::new();
    let mut kinds: Vec<(String, bool, bool)> = Vec::new();
    let mut next_port = 0;
    let mut pool_shape = None;
    for (j, part) in taken.threads.into_iter().enumerate() {
        if j == 0 {
            pool_shape = Some((part.pool.len, part.pool.chunk_size, part.pool.huge));
        }
        if j >= m {
            // Its queues close with this binary's copies (the old binary
            // still holds them until it exits).
            let xsk = part
                .ports
                .iter()
                .filter(|(_, p)| matches!(p, TakenPort::Xsk { .. }))
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>();
            if !xsk.is_empty() {
                warn!(queue = j, ports = ?xsk, threads = m, "AF_XDP queue without a socket after the handover: what the NIC steers there is dropped; lower the interface's queue count to the thread count");
            }
            continue;
        }
        let region = fastpath::umem::Region::from_fd(
            part.pool.fd.try_clone()?,
            part.pool.len,
            part.pool.huge,
        )
        .context("mapping the handed-over frame pool")?;
        let big = fastpath::umem::BigChunks::new(part.pool.huge)
            .context("making the frame pool's big chunks")?;
        pools.push(Some((region, part.pool.chunk_size, big)));
        let mut ports = Vec::new();
        for (id, (name, taken_port)) in part.ports.into_iter().enumerate() {
            let id = PortId(u16::try_from(id).context("too many ports")?);
            let closed = matches!(taken_port, TakenPort::Closed);
            if j == 0 {
                let xsk = matches!(taken_port, TakenPort::Xsk { .. });
                let tap = matches!(taken_port, TakenPort::Tap(_));
                kinds.push((name.clone(), tap, xsk));
                if uplink_name != Some(name.as_str()) && !closed {
                    port_names.insert(name.clone(), id);
                }
                next_port = id.0 + 1;
            }
            let io = match taken_port {
                TakenPort::Tap(fd) => PortIo::Tap(Tap::from_fd(fd, &name)),
                TakenPort::Xsk { fd, ring_size, sg } => PortIo::Xsk(Box::new(
                    XskSocket::from_fd(fd, ring_size, sg)
                        .with_context(|| format!("port {name}: the handed-over AF_XDP socket"))?,
                )),
                // Its connection comes with the pause.
                TakenPort::VhostUser | TakenPort::Closed => PortIo::Closed,
            };
            ports.push(Port {
                id,
                name,
                io,
                counters: PortCounters::default(),
            });
        }
        adopted.push(ports);
    }
    // Threads the old binary did not have: a pool and a queue of each
    // port of their own (vhost-user sides come with the pause).
    let mut new_pools = Vec::new();
    for j in n..m {
        let (len, chunk_size, huge) = pool_shape.context("the running switch offered no thread")?;
        let chunks = u32::try_from(len / chunk_size.max(1) as usize).context("the pool's size")?;
        let pool = FramePool::new(chunks, chunk_size, huge).context("a new thread's frame pool")?;
        let queue = u32::try_from(j).context("fast-path threads")?;
        let mut ports = Vec::new();
        for (id, (name, tap, xsk)) in kinds.iter().enumerate() {
            let io = if *tap {
                PortIo::Tap(Tap::open(name).with_context(|| format!("port {name}: queue {j}"))?)
            } else if *xsk {
                let ifindex =
                    fastpath::xsk::ifindex(name).with_context(|| format!("port {name}"))?;
                let sock = XskSocket::open(ifindex, queue, &pool, Default::default())
                    .with_context(|| format!("port {name}: an AF_XDP socket on queue {j}"))?;
                let (_, map) = socket_maps
                    .iter_mut()
                    .find(|(i, _)| i == name)
                    .with_context(|| format!("port {name}: the running switch handed over no socket map to add queue {j} to"))?;
                map.register_socket(queue, sock.fd())
                    .with_context(|| format!("port {name}: queue {j} in the socket map"))?;
                PortIo::Xsk(Box::new(sock))
            } else {
                PortIo::Closed
            };
            ports.push(Port {
                id: PortId(u16::try_from(id).context("too many ports")?),
                name: name.clone(),
                io,
                counters: PortCounters::default(),
            });
        }
        adopted.push(ports);
        new_pools.push(pool);
    }
    // The flows are in before the pause, so it does not wait for them.
    for (refused, same_hash) in restoring
        .answers(Duration::from_secs(30))
        .context("the fast path did not take the flows in within 30 s")?
        .into_iter()
        .map(|(_, refused, same_hash)| (refused, same_hash))
    {
        if refused > 0 {
            warn!(refused, "handed-over flows that did not fit the flow table");
        }
        if !same_hash {
            warn!("the flow table was not empty: flows get new VXLAN source ports");
        }
    }
    let precopy_done = fastpath::dataplane::monotonic_ns();
    // The pause: the old binary stops polling and says which frames
    // are free; the ports and the pools go to the fast path at once.
    let pause = ready(&taken.conn)?;
    // The vhost-user connections: each set up again in a fresh
    // request handler (the VMM notices nothing), its rings published
    // before the fast path gets the port (each thread its side).
    for given in pause.vhost {
        let name = given.spec.name.clone();
        let (link, ios) = crate::vhost::adopt(given, m)?;
        for (ports, io) in adopted.iter_mut().zip(ios) {
            let port = ports.iter_mut().find(|p| p.name == name).with_context(|| {
                format!("vhost-user port {name} is not among the handed-over ports")
            })?;
            port.io = io;
        }
        link.wake_on_kick(&fast.wakes());
        vhost_links.push(link);
    }
    // Each thread's counters; those of an old thread without a successor
    // of its own go to thread `i mod m`.
    let mut parts: Vec<Option<ThreadPause>> = Vec::new();
    for (i, p) in pause.threads.into_iter().enumerate() {
        if i < m {
            parts.push(Some(p));
        } else if let Some(Some(into)) = parts.get_mut(i % m) {
            for (a, b) in into.counters.iter_mut().zip(&p.counters) {
                a.add(b);
            }
            into.pipeline.add(&p.pipeline);
        }
    }
    parts.resize_with(m, || None);
    let mut new_pools = new_pools.into_iter();
    let mut adoptions = Vec::new();
    for (j, (mut ports, p)) in adopted.into_iter().zip(parts).enumerate() {
        let (pool, counters) = match (pools.get_mut(j).and_then(Option::take), p) {
            (Some((region, chunk_size, big)), Some(p)) => {
                for (port, c) in ports.iter_mut().zip(p.counters) {
                    port.counters = c;
                }
                let pool = FramePool::adopt(region, chunk_size, p.free, big)
                    .context("adopting the handed-over frame pool")?;
                (pool, Some(p.pipeline))
            }
            (None, None) => (new_pools.next().context("a new thread's pool")?, None),
            _ => bail!("fast-path thread {j}: the pause does not match the offer"),
        };
        adoptions.push(Box::new(fastpath::dataplane::Adoption {
            pool,
            ports,
            counters,
        }));
    }
    for (i, r) in fast
        .ask_each(adoptions, Request::Adopt)?
        .into_iter()
        .enumerate()
    {
        r.map_err(|e| anyhow::anyhow!("fast-path thread {i}: {e}"))?;
    }
    let adopted_mono_ns = fastpath::dataplane::monotonic_ns();
    confirm(&taken.conn, taken.confirm_ack)?;
    let first = fast
        .send(|tx| Request::Resume(Some(tx)))?
        .answers(Duration::from_secs(2))
        .context("the fast path did not poll within 2 s of the handover")?
        .into_iter()
        .max()
        .unwrap_or(0);
    let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    let blackout_us = us(pause.paused_mono_ns, first);
    let v = serde_json::json!({"blackout_us": blackout_us,
        "phases_us": {
            "pause_and_pack": us(pause.paused_mono_ns, pause.packed_mono_ns),
            "transfer": us(pause.packed_mono_ns, pause.received_mono_ns),
            "adopt": us(pause.received_mono_ns, adopted_mono_ns),
            "confirm_and_first_poll": us(adopted_mono_ns, first)},
        "precopy_us": {
            "dump_and_save": us(taken.held_mono_ns, taken.started_mono_ns),
            "save_and_encode": us(taken.started_mono_ns, taken.packed_mono_ns),
            "transfer": us(taken.packed_mono_ns, taken.received_mono_ns),
            "restore": us(taken.received_mono_ns, precopy_done),
            "held_to_restored": us(taken.held_mono_ns, precopy_done)},
        "snapshot_bytes": taken.snapshot_bytes,
        "takeover_ms": t.started.elapsed().as_secs_f64() * 1e3,
        "fastpath_threads": m, "fastpath_threads_before": n,
        "flows": flows, "connections": carried});
    info!(%v, "took the switch over");
    Ok(Adopted {
        report: v,
        listener: taken.listener,
        xdp_links: taken.xdp_links,
        socket_maps,
        next_port,
    })
}
