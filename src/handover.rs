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
//! Wire: 8 bytes (header length, u64 LE) carrying the descriptors, the
//! JSON header, the snapshot; then one line back from the new binary.
//! Not built yet: handing over AF_XDP sockets (the uplink and AF_XDP VM
//! ports share the old process's UMEM memory); a switch that has them
//! refuses the handover with that reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fastpath::dataplane::Paused;
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
) -> Result<bool> {
    let snap = live_migrate::encode(state).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fds = Vec::new();
    let mut ports = Vec::new();
    for (name, fd) in &paused.ports {
        let Some(fd) = fd else {
            bail!("port {name} is not a tap: it cannot be handed over yet");
        };
        ports.push(json!({"name": name, "fd": fds.len()}));
        fds.push(*fd);
    }
    let listener_fd = fds.len();
    fds.push(listener.as_raw_fd());
    let header = json!({
        "ports": ports,
        "listener_fd": listener_fd,
        "snapshot": snap.len(),
        "paused_mono_ns": paused.last_poll_mono_ns,
        "packed_mono_ns": fastpath::dataplane::monotonic_ns(),
    })
    .to_string();
    fdpass::send(s, &(header.len() as u64).to_le_bytes(), &fds)?;
    let mut w = s;
    w.write_all(header.as_bytes())?;
    w.write_all(&snap)?;
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

/// What the new binary received.
pub struct Taken {
    pub state: SwitchState,
    /// Tap queues by port id, with their names.
    pub ports: Vec<(String, OwnedFd)>,
    pub listener: UnixListener,
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
        let fd = take_fd(p["fd"].as_u64().context("port fd")?)?;
        ports.push((name, fd));
    }
    let listener = UnixListener::from(take_fd(h["listener_fd"].as_u64().context("listener fd")?)?);
    Ok(Taken {
        state,
        ports,
        listener,
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
