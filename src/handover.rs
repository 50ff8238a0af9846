//! Live handover, both sides (`shared/DESIGN.md` §7).
//!
//! The new binary (`vswitch run --config F --takeover`) first asks the
//! running switch for its configuration and clock (`handover-prepare`),
//! starts everything it can (frame pool, fast path, coprocessors), then
//! asks `{"cmd": "handover"}`, which runs in two steps:
//!
//! 1. **Pre-copy, traffic flowing.** The old binary holds its
//!    coprocessors (new decisions wait; the fast path keeps forwarding
//!    every installed flow), so the state cannot change under it; dumps
//!    its flows, saves the state (config, topology, policy, connections
//!    with NAT bindings, leases) as a versioned snapshot (`live-migrate`)
//!    and sends it with every descriptor: tap queues, AF_XDP sockets, the
//!    frame pool's memfd, the XDP programs' bpf_links, the control
//!    listener (SCM_RIGHTS). The new one restores it, installs the flows
//!    in its (held) fast path, maps the pool and the sockets' rings, and
//!    says `ready`.
//! 2. **The pause.** The old one stops polling (the fast path finishes its
//!    batch; frames wait in the tap queues and on the RX rings) and sends
//!    what only now is known: which frames user space owns, the port
//!    counters. The new one takes the pool and the ports in one request,
//!    confirms, and polls; the old one exits on the confirmation.
//!
//! The blackout is step 2 only. If the new binary fails, hangs past a
//! deadline or dies before confirming, the old one polls again (and its
//! coprocessors go on) with its state intact: it never closed anything.
//! The new one polls only after confirming, so the two never touch the
//! rings at once.
//!
//! AF_XDP ports (the uplink, VM veths) go over whole: the frame pool is a
//! memfd, so the new binary maps the same frames the sockets' UMEM points
//! into; each socket's rings keep their producer and consumer indices in
//! the ring memory, so the new side continues where the old one stopped;
//! the XDP programs' links keep them attached after the old process is
//! gone. Nothing the NIC delivers meanwhile is lost: it waits on the RX
//! ring.
//!
//! The messages, their versions and framing are `live_migrate::protocol`'s
//! (typed, each checked as it is read); this module holds the two sides'
//! steps and what each message is built from and turned into.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use anyhow::{bail, Context, Result};
use fastpath::dataplane::{monotonic_ns, Dump, HandedIo, Paused, PortCounters};
use fastpath::pipeline::NamedCounters;
use live_migrate::protocol::PipelineCounters;
use live_migrate::protocol::{self, Offer, PauseHeader, PoolEntry, PortEntry, VhostPort};
use live_migrate::{fdpass, FlowRecord, SwitchState};
use serde_json::json;
use std::collections::BTreeMap;

/// How long the old binary waits for the new one's confirmation.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the old binary holds its coprocessors for the new one to
/// restore the pre-copy, plus an allowance per flow (1M flows and 100k
/// connections take about a fifth of a second here): a hung new binary
/// delays new connections no longer than this.
pub const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The old side: send everything to the new binary on `s`, pausing (with
/// `pause`) only once it restored the pre-copy; true once it confirmed
/// (the caller then exits), false if it did not (resume).
// Each argument is a different thing the new binary gets; bundling them
// would only move the list.
#[allow(clippy::too_many_arguments)]
pub fn give(
    s: &UnixStream,
    dump: &Dump,
    file: live_migrate::memfd::SnapshotFile,
    state: &SwitchState,
    listener: &UnixListener,
    xdp_links: &[i32],
    held_mono_ns: u64,
    pause: impl FnOnce() -> Result<PauseOut>,
) -> Result<bool> {
    let started = monotonic_ns();
    let records = dump.flows.iter().map(|(key, action, stats)| FlowRecord {
        key: *key,
        action: *action,
        stats: *stats,
    });
    let written = file
        .write(state, records)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fds = vec![written.fd.as_raw_fd()];
    let mut ports = Vec::new();
    for (name, io) in &dump.ports {
        let name = name.clone();
        ports.push(match io {
            Some(HandedIo::Tap(fd)) => {
                fds.push(*fd);
                PortEntry::Tap {
                    name,
                    fd: fds.len() - 1,
                }
            }
            Some(HandedIo::Xsk { fd, ring_size }) => {
                fds.push(*fd);
                PortEntry::AfXdp {
                    name,
                    fd: fds.len() - 1,
                    ring_size: *ring_size,
                }
            }
            Some(HandedIo::VhostUser) => PortEntry::VhostUser { name },
            None => PortEntry::Closed { name },
        });
    }
    let listener_fd = fds.len();
    fds.push(listener.as_raw_fd());
    let pool = &dump.pool;
    fds.push(pool.fd);
    let links: Vec<usize> = xdp_links
        .iter()
        .map(|fd| {
            fds.push(*fd);
            fds.len() - 1
        })
        .collect();
    let header = protocol::encode(&Offer {
        protocol: protocol::PROTOCOL,
        ports,
        listener_fd,
        pool: PoolEntry {
            fd: listener_fd + 1,
            len: pool.len,
            huge: pool.huge,
            chunk_size: pool.chunk_size,
        },
        xdp_links: links,
        snapshot_fd: 0,
        snapshot: written.snapshot_len,
        flows: written.flows,
        hash_seed: dump.hash_seed,
        held_mono_ns: Some(held_mono_ns),
        started_mono_ns: started,
        packed_mono_ns: monotonic_ns(),
        confirm_ack: true,
    });
    fdpass::send_many(s, &(header.len() as u64).to_le_bytes(), &fds)?;
    let mut w = s;
    w.write_all(&header)?;
    // More flows take longer to put back: 2 µs each on top (measured:
    // well under 1 µs). The whole answer by then, however it trickles in
    // (the coprocessors are held meanwhile), and one short line at most.
    let flows_allowance = Duration::from_micros(2 * dump.flows.len() as u64);
    let mut r = BufReader::new(Deadline::new(s, READY_TIMEOUT + flows_allowance).take(0));
    let mut line = String::new();
    r.get_mut().set_limit(protocol::MAX_LINE);
    r.read_line(&mut line)?;
    if !is_line(&line, protocol::READY) {
        bail!(
            "the new binary did not restore the pre-copy: {:?}",
            line.trim()
        );
    }
    let PauseOut {
        paused,
        vhost,
        vhost_fds,
    } = pause()?;
    let free: Vec<u8> = paused.free.iter().flat_map(|a| a.to_le_bytes()).collect();
    let header = protocol::encode(&PauseHeader {
        protocol: protocol::PROTOCOL,
        paused_mono_ns: paused.last_poll_mono_ns,
        packed_mono_ns: monotonic_ns(),
        free: paused.free.len() as u64,
        counters: paused.counters.iter().map(counters_to_wire).collect(),
        pipeline: pipeline_to_wire(paused.pipeline),
        vhost,
    });
    let len = (header.len() as u64).to_le_bytes();
    let mut msg = Vec::with_capacity(8 + header.len() + free.len());
    if vhost_fds.is_empty() {
        msg.extend_from_slice(&len);
    } else {
        // The vhost-user connections' descriptors come with the length.
        fdpass::send_many(s, &len, &vhost_fds)?;
    }
    msg.extend_from_slice(&header);
    msg.extend_from_slice(&free);
    w.write_all(&msg)?;
    line.clear();
    r.get_mut().get_mut().at = Instant::now() + CONFIRM_TIMEOUT;
    r.get_mut().set_limit(protocol::MAX_LINE);
    r.read_line(&mut line)?;
    if !is_line(&line, protocol::CONFIRM) {
        return Ok(false);
    }
    // Acknowledged: the new binary polls only once it has this, so a
    // confirm that came too late (this side resumed and never answers)
    // cannot leave both polling the same rings. If it cannot be told, it
    // never polls: resume.
    Ok(w.write_all(protocol::ACK).is_ok())
}

/// `line` (as read, with or without its newline) is `expected`.
fn is_line(line: &str, expected: &[u8]) -> bool {
    line.as_bytes().trim_ascii_end() == expected.trim_ascii_end()
}

/// What the old binary's pause gives out besides the fast path's part:
/// the vhost-user ports' protocol state (data, and the descriptors it
/// names by index, which stay open until the handover ends).
pub struct PauseOut {
    pub paused: Paused,
    pub vhost: Vec<VhostPort>,
    pub vhost_fds: Vec<std::os::fd::RawFd>,
}

/// The new side, before anything pauses: the running switch's
/// configuration and clock zero (CLOCK_MONOTONIC ns), so this binary can
/// start everything first and keep the blackout to the state transfer.
pub fn prepare(socket: &Path) -> Result<(String, u64)> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = protocol::encode(&protocol::PrepareRequest::default());
    req.push(b'\n');
    (&conn).write_all(&req)?;
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

/// The pre-copy, as the new binary received it.
pub struct Taken {
    pub state: SwitchState,
    /// The fast path's flows, read in place from the snapshot file.
    pub flows: live_migrate::memfd::MappedFlows,
    /// Ports by id, with their names.
    pub ports: Vec<(String, TakenPort)>,
    pub listener: UnixListener,
    pub pool: TakenPool,
    /// The bpf_links keeping the XDP programs attached: held for as long
    /// as this binary runs (and handed on).
    pub xdp_links: Vec<OwnedFd>,
    /// CLOCK_MONOTONIC of the old binary's holding its coprocessors (new
    /// flows wait from then on; a binary that did not send it: its start
    /// of the pre-copy), of its start of the pre-copy (flows dumped, state
    /// saved), of the end of its packing, of this side's having it all.
    pub held_mono_ns: u64,
    pub started_mono_ns: u64,
    pub packed_mono_ns: u64,
    pub received_mono_ns: u64,
    pub snapshot_bytes: usize,
    /// The flow table's hash seed (flows keep their hashes).
    pub hash_seed: u64,
    /// The connection to confirm on.
    pub conn: UnixStream,
    /// The running switch acknowledges the confirm (see [`confirm`]).
    pub confirm_ack: bool,
}

/// What the pause brought.
pub struct Pause {
    /// The frames user space owns.
    pub free: Vec<u64>,
    pub counters: Vec<PortCounters>,
    pub pipeline: NamedCounters,
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

/// The new side: ask the switch on `socket` to hand over, and take the
/// pre-copy.
pub fn take(socket: &Path) -> Result<Taken> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = protocol::encode(&protocol::HandoverRequest::default());
    req.push(b'\n');
    (&conn).write_all(&req)?;
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
    let mut ports = Vec::new();
    for p in h.ports {
        let (name, port) = match p {
            PortEntry::Tap { name, fd } => (name, TakenPort::Tap(take_fd(fd)?)),
            PortEntry::AfXdp {
                name,
                fd,
                ring_size,
            } => (
                name,
                TakenPort::Xsk {
                    fd: take_fd(fd)?,
                    ring_size,
                },
            ),
            PortEntry::VhostUser { name } => (name, TakenPort::VhostUser),
            PortEntry::Closed { name } => (name, TakenPort::Closed),
        };
        ports.push((name, port));
    }
    let listener = UnixListener::from(take_fd(h.listener_fd)?);
    let pool = TakenPool {
        fd: take_fd(h.pool.fd)?,
        len: h.pool.len,
        huge: h.pool.huge,
        chunk_size: h.pool.chunk_size,
    };
    let xdp_links = h
        .xdp_links
        .iter()
        .map(|&l| take_fd(l))
        .collect::<Result<Vec<_>>>()?;
    Ok(Taken {
        state,
        flows,
        ports,
        listener,
        pool,
        xdp_links,
        held_mono_ns: h.held_mono_ns.unwrap_or(h.started_mono_ns),
        started_mono_ns: h.started_mono_ns,
        packed_mono_ns: h.packed_mono_ns,
        received_mono_ns,
        snapshot_bytes: h.snapshot + h.flows.count * live_migrate::FLOW_BYTES,
        hash_seed: h.hash_seed,
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
    Ok(Pause {
        free: free
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect(),
        counters: h
            .counters
            .iter()
            .map(counters_from_wire)
            .collect::<Result<_>>()?,
        pipeline: pipeline_from_wire(h.pipeline),
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
        is_line(&line, protocol::ACK),
        "the running switch did not acknowledge the confirm ({:?}): it resumed",
        line.trim()
    );
    Ok(())
}

/// A port's counters by name (the names are the fields').
fn counters_to_wire(c: &PortCounters) -> BTreeMap<String, u64> {
    match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A port's counters from their names; a counter this binary does not
/// know is dropped, one it knows and the message lacks is refused unless
/// it was added later (those default to 0).
fn counters_from_wire(m: &BTreeMap<String, u64>) -> Result<PortCounters> {
    serde_json::from_value(serde_json::to_value(m)?).context("handover pause: port counters")
}

fn pipeline_to_wire(p: NamedCounters) -> PipelineCounters {
    PipelineCounters {
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

/// How long the new side waits for the acknowledgement of its confirm.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// `vswitch upgrade`: start `binary` with `run --takeover --config
/// config`, detached (its own session; stdout/stderr to `log`), and wait
/// until it serves the control socket with a handover report, or fails.
pub fn upgrade(binary: &Path, config: &Path, log: Option<&Path>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let cfg = crate::config::Config::load(config)?;
    let sock = cfg.switch.control_socket.clone();
    let log = match log {
        Some(l) => l.to_path_buf(),
        None => config.with_extension("upgrade.log"),
    };
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["run", "--takeover", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid(2) is async-signal-safe and only detaches the child
    // from our session, so it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "the new binary exited ({status}) before taking over; the running switch carries on. Its log:\n{}",
                text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(v) = crate::ctl::request(&sock, &json!({"cmd": "stats"})) {
            if v["pid"].as_u64() == Some(u64::from(pid)) && !v["last_handover"].is_null() {
                let h = &v["last_handover"];
                println!(
                    "upgraded to {} (pid {pid}): blackout {:.0} µs, {} flows and {} connections carried, snapshot {} bytes; log {}",
                    binary.display(),
                    h["blackout_us"].as_f64().unwrap_or(0.0),
                    h["flows"],
                    h["connections"],
                    h["snapshot_bytes"],
                    log.display()
                );
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the new binary (pid {pid}) did not take over within 30 s; see {}",
        log.display()
    )
}
