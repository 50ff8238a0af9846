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
//! Wire: 8 bytes (header length, u64 LE) carrying the descriptors (the
//! snapshot is a sealed memfd among them, see `live_migrate::memfd`), the
//! JSON header; `ready` back; 8 bytes (length), the JSON
//! pause header, the free list (u64 LE each); `confirm` back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use anyhow::{bail, Context, Result};
use fastpath::dataplane::{monotonic_ns, Dump, HandedIo, Paused, PortCounters};
use live_migrate::{fdpass, FlowRecord, SwitchState};
use serde_json::{json, Value};

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
    let section = written.flows;
    let mut fds = vec![written.fd.as_raw_fd()];
    let mut ports = Vec::new();
    for (name, io) in &dump.ports {
        ports.push(match io {
            Some(HandedIo::Tap(fd)) => {
                fds.push(*fd);
                json!({"name": name, "kind": "tap", "fd": fds.len() - 1})
            }
            Some(HandedIo::Xsk { fd, ring_size }) => {
                fds.push(*fd);
                json!({"name": name, "kind": "af_xdp", "fd": fds.len() - 1, "ring_size": ring_size})
            }
            Some(HandedIo::VhostUser) => json!({"name": name, "kind": "vhost_user"}),
            None => json!({"name": name, "kind": "closed"}),
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
    let header = json!({
        "ports": ports,
        "listener_fd": listener_fd,
        "pool": {"fd": listener_fd + 1, "len": pool.len, "huge": pool.huge,
                 "chunk_size": pool.chunk_size},
        "xdp_links": links,
        "snapshot_fd": 0,
        "hash_seed": dump.hash_seed,
        "snapshot": written.snapshot_len,
        "flows": {"offset": section.offset, "count": section.count, "crc": section.crc},
        "held_mono_ns": held_mono_ns,
        // This side answers a confirm with "ack" (a binary that does not
        // say so does not: the new side then does not wait for one).
        "confirm_ack": true,
        "started_mono_ns": started,
        "packed_mono_ns": monotonic_ns(),
    })
    .to_string();
    fdpass::send_many(s, &(header.len() as u64).to_le_bytes(), &fds)?;
    let mut w = s;
    w.write_all(header.as_bytes())?;
    // More flows take longer to put back: 2 µs each on top (measured:
    // well under 1 µs). The whole answer by then, however it trickles in
    // (the coprocessors are held meanwhile), and one short line at most.
    let flows_allowance = Duration::from_micros(2 * dump.flows.len() as u64);
    let mut r = BufReader::new(Deadline::new(s, READY_TIMEOUT + flows_allowance).take(0));
    let mut line = String::new();
    r.get_mut().set_limit(MAX_LINE);
    r.read_line(&mut line)?;
    if line.trim() != "ready" {
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
    let header = json!({
        "paused_mono_ns": paused.last_poll_mono_ns,
        "free": paused.free.len(),
        "counters": paused.counters,
        "pipeline": paused.pipeline,
        "vhost": vhost,
        "packed_mono_ns": monotonic_ns(),
    })
    .to_string();
    let len = (header.len() as u64).to_le_bytes();
    let mut msg = Vec::with_capacity(8 + header.len() + free.len());
    if vhost_fds.is_empty() {
        msg.extend_from_slice(&len);
    } else {
        // The vhost-user connections' descriptors come with the length.
        fdpass::send_many(s, &len, &vhost_fds)?;
    }
    msg.extend_from_slice(header.as_bytes());
    msg.extend_from_slice(&free);
    w.write_all(&msg)?;
    line.clear();
    r.get_mut().get_mut().at = Instant::now() + CONFIRM_TIMEOUT;
    r.get_mut().set_limit(MAX_LINE);
    r.read_line(&mut line)?;
    if line.trim() != "confirm" {
        return Ok(false);
    }
    // Acknowledged: the new binary polls only once it has this, so a
    // confirm that came too late (this side resumed and never answers)
    // cannot leave both polling the same rings. If it cannot be told, it
    // never polls: resume.
    Ok(w.write_all(ACK).is_ok())
}

/// The old side's answer to a confirm that arrived in time.
const ACK: &[u8] = b"ack\n";
/// The longest line either side reads from the other in the handover.
const MAX_LINE: u64 = 64;

/// What the old binary's pause gives out besides the fast path's part:
/// the vhost-user ports' protocol state (data, and the descriptors it
/// names by index, which stay open until the handover ends).
pub struct PauseOut {
    pub paused: Paused,
    pub vhost: Vec<Value>,
    pub vhost_fds: Vec<std::os::fd::RawFd>,
}

/// The new side, before anything pauses: the running switch's
/// configuration and clock zero (CLOCK_MONOTONIC ns), so this binary can
/// start everything first and keep the blackout to the state transfer.
pub fn prepare(socket: &Path) -> Result<(String, u64)> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&conn).write_all(b"{\"cmd\": \"handover-prepare\"}\n")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the running switch's answer")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("the running switch refused: {e}");
    }
    Ok((
        v["config"]
            .as_str()
            .context("no config in the answer")?
            .to_string(),
        v["epoch_mono_ns"]
            .as_u64()
            .context("no clock in the answer")?,
    ))
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
    pub pipeline: fastpath::pipeline::NamedCounters,
    /// The vhost-user ports' connections.
    pub vhost: Vec<crate::vhost::Given>,
    /// CLOCK_MONOTONIC of the old binary's last poll, of the end of its
    /// packing, of this side's having it all.
    pub paused_mono_ns: u64,
    pub packed_mono_ns: u64,
    pub received_mono_ns: u64,
}

/// Read the JSON header whose length (8 bytes, LE) is `len`.
fn read_header(conn: &UnixStream, len: [u8; 8]) -> Result<Value> {
    let hlen = usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX);
    if hlen > 1 << 20 {
        bail!("handover header of {hlen} bytes: not a vswitch");
    }
    let mut header = vec![0u8; hlen];
    (&*conn).read_exact(&mut header)?;
    serde_json::from_slice(&header).context("handover header")
}

/// The new side: ask the switch on `socket` to hand over, and take the
/// pre-copy.
pub fn take(socket: &Path) -> Result<Taken> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    (&conn).write_all(b"{\"cmd\": \"handover\"}\n")?;
    let mut len = [0u8; 8];
    let (n, fds) = fdpass::recv_many(&conn, &mut len)?;
    if n == 0 {
        bail!("the running switch closed the connection");
    }
    if fds.is_empty() {
        // An error answer (JSON) rather than a handover.
        let mut rest = Vec::new();
        let _ = (&conn).read_to_end(&mut rest);
        let text =
            String::from_utf8_lossy(&len[..n]).into_owned() + &String::from_utf8_lossy(&rest);
        let v: Value = serde_json::from_str(&text).unwrap_or(json!({"error": text}));
        bail!(
            "the running switch refused: {}",
            v["error"].as_str().unwrap_or("?")
        );
    }
    let h = read_header(&conn, len)?;
    let received_mono_ns = monotonic_ns();
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take_fd = |i: u64| -> Result<OwnedFd> {
        fds.get_mut(usize::try_from(i).unwrap_or(usize::MAX))
            .and_then(Option::take)
            .context("a descriptor the header names is missing")
    };
    let snap_len = h["snapshot"]
        .as_u64()
        .and_then(|l| usize::try_from(l).ok())
        .context("handover header: snapshot")?;
    let snap = take_fd(h["snapshot_fd"].as_u64().context("snapshot fd")?)?;
    let state = live_migrate::memfd::decode_fd(snap.as_fd(), snap_len)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let fh = &h["flows"];
    let num = |k: &str| -> Result<usize> {
        fh[k]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| format!("handover header: flows.{k}"))
    };
    let section = live_migrate::memfd::FlowSection {
        offset: num("offset")?,
        count: num("count")?,
        crc: u32::try_from(num("crc")?).context("handover header: flows.crc")?,
    };
    let flows = live_migrate::memfd::MappedFlows::map(snap.as_fd(), section)
        .map_err(|e| anyhow::anyhow!("the flow section: {e}"))?;
    let mut ports = Vec::new();
    for p in h["ports"].as_array().context("handover header: ports")? {
        let name = p["name"].as_str().context("port name")?.to_string();
        let mut fd = || take_fd(p["fd"].as_u64().context("port fd")?);
        let port = match p["kind"].as_str() {
            Some("tap") => TakenPort::Tap(fd()?),
            Some("af_xdp") => TakenPort::Xsk {
                fd: fd()?,
                ring_size: p["ring_size"]
                    .as_u64()
                    .and_then(|r| u32::try_from(r).ok())
                    .context("port ring_size")?,
            },
            Some("vhost_user") => TakenPort::VhostUser,
            Some("closed") => TakenPort::Closed,
            other => bail!("handover header: port {name}: unknown kind {other:?}"),
        };
        ports.push((name, port));
    }
    let listener = UnixListener::from(take_fd(h["listener_fd"].as_u64().context("listener fd")?)?);
    let ph = &h["pool"];
    let pool = TakenPool {
        fd: take_fd(ph["fd"].as_u64().context("pool fd")?)?,
        len: usize::try_from(ph["len"].as_u64().context("pool len")?)?,
        huge: ph["huge"].as_bool().unwrap_or(false),
        chunk_size: u32::try_from(ph["chunk_size"].as_u64().context("pool chunk_size")?)?,
    };
    let mut xdp_links = Vec::new();
    for l in h["xdp_links"]
        .as_array()
        .context("handover header: xdp_links")?
    {
        xdp_links.push(take_fd(l.as_u64().context("xdp link fd")?)?);
    }
    Ok(Taken {
        state,
        flows,
        ports,
        listener,
        pool,
        xdp_links,
        held_mono_ns: h["held_mono_ns"]
            .as_u64()
            .or(h["started_mono_ns"].as_u64())
            .unwrap_or(0),
        started_mono_ns: h["started_mono_ns"].as_u64().unwrap_or(0),
        packed_mono_ns: h["packed_mono_ns"].as_u64().unwrap_or(0),
        received_mono_ns,
        snapshot_bytes: snap_len + section.count * live_migrate::FLOW_BYTES,
        hash_seed: h["hash_seed"]
            .as_u64()
            .context("handover header: hash_seed")?,
        confirm_ack: h["confirm_ack"].as_bool().unwrap_or(false),
        conn,
    })
}

/// The new side: say on `conn` that the pre-copy is in place; the old
/// binary pauses and sends the rest.
pub fn ready(conn: &UnixStream) -> Result<Pause> {
    (&*conn)
        .write_all(b"ready\n")
        .context("telling the running switch the pre-copy is in")?;
    let mut len = [0u8; 8];
    let (n, fds) = fdpass::recv_many(conn, &mut len).context("the running switch did not pause")?;
    if n < len.len() {
        bail!("the running switch did not pause (it closed the connection)");
    }
    let h = read_header(conn, len)?;
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut vhost = Vec::new();
    for v in h["vhost"].as_array().map(Vec::as_slice).unwrap_or_default() {
        vhost.push(crate::vhost::from_wire(v, |i| {
            fds.get_mut(usize::try_from(i).unwrap_or(usize::MAX))
                .and_then(Option::take)
                .context("a descriptor the pause header names is missing")
        })?);
    }
    let n = h["free"].as_u64().context("pause header: free")?;
    if n > 1 << 24 {
        bail!("pause header: {n} free frames: not a vswitch");
    }
    let mut free = vec![0u8; 8 * usize::try_from(n)?];
    (&*conn).read_exact(&mut free)?;
    let received_mono_ns = monotonic_ns();
    Ok(Pause {
        free: free
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        counters: serde_json::from_value(h["counters"].clone())
            .context("pause header: counters")?,
        pipeline: serde_json::from_value(h["pipeline"].clone())
            .context("pause header: pipeline")?,
        vhost,
        paused_mono_ns: h["paused_mono_ns"].as_u64().unwrap_or(0),
        packed_mono_ns: h["packed_mono_ns"].as_u64().unwrap_or(0),
        received_mono_ns,
    })
}

/// The new side's commit point: from here the old binary exits and this
/// one owns the ports, the rings and the frames.
pub fn confirm(conn: &UnixStream, acknowledged: bool) -> Result<()> {
    (&*conn)
        .write_all(b"confirm\n")
        .context("confirming the handover")?;
    if !acknowledged {
        // A binary from before the acknowledgement: it exits on the confirm.
        return Ok(());
    }
    // Poll only once the old side says it will not: a confirm it took too
    // late is refused by its silence (it resumed).
    let mut line = String::new();
    BufReader::new(Deadline::new(conn, ACK_TIMEOUT).take(MAX_LINE))
        .read_line(&mut line)
        .context("waiting for the running switch to acknowledge the confirm")?;
    anyhow::ensure!(
        line.as_bytes() == ACK,
        "the running switch did not acknowledge the confirm ({:?}): it resumed",
        line.trim()
    );
    Ok(())
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
