//! Live handover, both sides (`shared/DESIGN.md` §7).
//!
//! The new binary (`vswitch run --config F --takeover`) first asks the
//! running switch for its configuration and clock (`handover-prepare`),
//! starts everything it can (frame pool, fast path, coprocessors), then
//! asks `{"cmd": "handover"}`. The old
//! one stops polling its ports (the fast path finishes its batch; frames
//! wait in the tap queues), saves its state (config, topology, policy,
//! connections with NAT bindings, leases, flows) as a versioned snapshot
//! (`live-migrate`), and sends it with its open tap queues and control
//! listener (SCM_RIGHTS). The new one restores, starts polling, and
//! confirms; the old one then exits. If the new one fails, hangs past the
//! deadline or dies before confirming, the old one polls again with its
//! state intact: it never closed anything.
//!
//! AF_XDP ports (the uplink, VM veths) go over whole: the frame pool is a
//! memfd, so the new binary maps the same frames the sockets' UMEM points
//! into; each socket's rings keep their producer and consumer indices in
//! the ring memory, so the new side continues where the old one stopped;
//! the old side's free list says which frames user space owns (all others
//! are on a ring); the XDP programs' bpf_links go along and keep them
//! attached after the old process is gone. Nothing the NIC delivers
//! meanwhile is lost: it waits on the RX ring. The new side polls only
//! after confirming, so the two never touch the rings at once.
//!
//! Wire: 8 bytes (header length, u64 LE) carrying the descriptors, the
//! JSON header, the snapshot, the free list (u64 LE each); then one line
//! back from the new binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fastpath::dataplane::{HandedIo, Paused};
use live_migrate::{fdpass, FlowRecord, SwitchState};
use serde_json::{json, Value};

/// How long the old binary waits for the new one's confirmation.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The old side: send everything to the new binary on `s`; true once it
/// confirmed (the caller then exits), false if it did not (resume).
pub fn give(
    s: &UnixStream,
    paused: &Paused,
    state: &SwitchState,
    listener: &UnixListener,
    xdp_links: &[i32],
) -> Result<bool> {
    let snap = live_migrate::encode(state).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fds = Vec::new();
    let mut ports = Vec::new();
    for (name, io) in &paused.ports {
        ports.push(match io {
            Some(HandedIo::Tap(fd)) => {
                fds.push(*fd);
                json!({"name": name, "kind": "tap", "fd": fds.len() - 1})
            }
            Some(HandedIo::Xsk { fd, ring_size }) => {
                fds.push(*fd);
                json!({"name": name, "kind": "af_xdp", "fd": fds.len() - 1, "ring_size": ring_size})
            }
            None => json!({"name": name, "kind": "closed"}),
        });
    }
    let listener_fd = fds.len();
    fds.push(listener.as_raw_fd());
    let pool = &paused.pool;
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
                 "chunk_size": pool.chunk_size, "free": pool.free.len()},
        "xdp_links": links,
        "snapshot": snap.len(),
        "paused_mono_ns": paused.last_poll_mono_ns,
        "packed_mono_ns": fastpath::dataplane::monotonic_ns(),
    })
    .to_string();
    fdpass::send(s, &(header.len() as u64).to_le_bytes(), &fds)?;
    let free: Vec<u8> = pool.free.iter().flat_map(|a| a.to_le_bytes()).collect();
    let mut w = s;
    w.write_all(header.as_bytes())?;
    w.write_all(&snap)?;
    w.write_all(&free)?;
    s.set_read_timeout(Some(CONFIRM_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim() == "confirm")
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
    /// Removed at run time (its id stays taken).
    Closed,
}

/// The frame pool as received.
pub struct TakenPool {
    pub fd: OwnedFd,
    pub len: usize,
    pub huge: bool,
    pub chunk_size: u32,
    pub free: Vec<u64>,
}

/// What the new binary received.
pub struct Taken {
    pub state: SwitchState,
    /// Ports by id, with their names.
    pub ports: Vec<(String, TakenPort)>,
    pub listener: UnixListener,
    pub pool: TakenPool,
    /// The bpf_links keeping the XDP programs attached: held for as long
    /// as this binary runs (and handed on).
    pub xdp_links: Vec<OwnedFd>,
    /// CLOCK_MONOTONIC of the old binary's last poll, of the end of its
    /// packing (state saved and encoded), of this side's having it all.
    pub paused_mono_ns: u64,
    pub packed_mono_ns: u64,
    pub received_mono_ns: u64,
    pub snapshot_bytes: usize,
    /// The connection to confirm on.
    pub conn: UnixStream,
}

/// The new side: ask the switch on `socket` to hand over, and take it.
pub fn take(socket: &Path) -> Result<Taken> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the running switch at {}", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    (&conn).write_all(b"{\"cmd\": \"handover\"}\n")?;
    let mut len = [0u8; 8];
    let (n, fds) = fdpass::recv(&conn, &mut len)?;
    if n == 0 {
        bail!("the running switch closed the connection");
    }
    if n < 8 {
        (&conn).read_exact(&mut len[n..])?;
    }
    let hlen = usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX);
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
    if hlen > 1 << 20 {
        bail!("handover header of {hlen} bytes: not a vswitch");
    }
    let mut header = vec![0u8; hlen];
    (&conn).read_exact(&mut header)?;
    let h: Value = serde_json::from_slice(&header).context("handover header")?;
    let snap_len = h["snapshot"]
        .as_u64()
        .context("handover header: snapshot")?;
    let mut snap = vec![0u8; usize::try_from(snap_len).context("snapshot size")?];
    (&conn).read_exact(&mut snap)?;
    let free_chunks = h["pool"]["free"]
        .as_u64()
        .context("handover header: pool")?;
    if free_chunks > 1 << 24 {
        bail!("handover header: {free_chunks} free frames: not a vswitch");
    }
    let mut free = vec![0u8; 8 * usize::try_from(free_chunks)?];
    (&conn).read_exact(&mut free)?;
    let received_mono_ns = fastpath::dataplane::monotonic_ns();
    let state = live_migrate::decode(&snap).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take_fd = |i: u64| -> Result<OwnedFd> {
        fds.get_mut(usize::try_from(i).unwrap_or(usize::MAX))
            .and_then(Option::take)
            .context("a descriptor the header names is missing")
    };
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
        free: free
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
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
        ports,
        listener,
        pool,
        xdp_links,
        paused_mono_ns: h["paused_mono_ns"].as_u64().unwrap_or(0),
        packed_mono_ns: h["packed_mono_ns"].as_u64().unwrap_or(0),
        received_mono_ns,
        snapshot_bytes: snap.len(),
        conn,
    })
}

/// The flows of a paused fast path, packed for the snapshot.
pub fn flows(p: &Paused) -> live_migrate::Flows {
    let mut f = live_migrate::Flows::with_capacity(p.flows.len());
    for (key, action, stats) in &p.flows {
        f.push(&FlowRecord {
            key: *key,
            action: *action,
            stats: *stats,
        });
    }
    f
}

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
        if let Ok(v) = crate::control::request(&sock, &json!({"cmd": "stats"})) {
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
