//! The control socket: a root-only Unix socket taking one JSON request per
//! connection (`{"cmd": "stats"}`, `{"cmd": "flows"}`) and answering with
//! one JSON document. Its command-line client is `ctl`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coprocessor::acl::{Direction, Peer, Rule};
use coprocessor::topology::Topology;
use coprocessor::{lock, Coprocessor};
use crossbeam_queue::ArrayQueue;
use fastpath::dataplane::{FlowDump, Request, Snapshot, Update};
use fastpath::wake::Wake;
use fastpath::PuntReason;
use flowtable::{Ingress, Output, PortId};
use live_migrate::protocol;
use serde_json::{json, Value};
use tracing::{info, warn};

/// Largest request accepted (a bulk change of 100 000 endpoints is ~15 MiB).
const MAX_REQUEST: u64 = 64 << 20;
/// How long a client has to send its whole request (a per-read timeout
/// would let a client trickling a byte at a time hold the control thread).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

pub struct Server {
    listener: UnixListener,
    /// The switch was handed over to a new binary (which serves this
    /// socket now: do not remove its path on exit).
    handed_over: bool,
    /// The last top-talkers sample, for rates: (vni, dst, vtep) → bytes.
    talkers: (Instant, std::collections::HashMap<(u32, u32, u32), u64>),
    links: Links,
}

/// What the control thread reaches.
pub struct Links {
    /// Questions to the fast-path thread.
    pub requests: Sender<Request>,
    pub wake: Arc<Wake>,
    /// Flow changes for the fast path (policy revalidation).
    pub installs: Arc<ArrayQueue<Update>>,
    /// A coprocessor on the switch's shared state (policy changes, views).
    pub coprocessor: Coprocessor,
    /// Time zero of the fast path's clock.
    pub epoch: Instant,
    /// Port names → ids (VMs name their port).
    pub ports: std::collections::HashMap<String, PortId>,
    /// The id the next port added at run time gets.
    pub next_port: u16,
    /// CLOCK_MONOTONIC at this switch's clock zero.
    pub epoch_mono_ns: u64,
    /// The configuration text the switch started from (handed over).
    pub config_text: String,
    /// Why this switch cannot be handed over, if it cannot.
    pub handover_refused: Option<String>,
    /// The bpf_links keeping this switch's XDP programs attached (owned by
    /// the daemon for the whole run), passed on in a handover.
    pub xdp_links: Vec<i32>,
    /// The last handover into this process, for `ctl stats`.
    pub last_handover: Option<Value>,
    /// The kernel's routes and neighbours: a VTEP a change introduces is
    /// resolved before the change applies, so its first packet can go.
    pub netlink: Option<crate::neighbor::Netlink>,
    /// The vhost-user ports' protocol sides (handed over with the pause).
    pub vhost: Vec<crate::vhost::Link>,
}

impl Server {
    /// Listen on `path` with mode 0600 (a stale socket file is replaced).
    /// Bind the control socket at `path` with mode 0600 (a stale socket
    /// file is replaced).
    pub fn bind(path: &Path, links: Links) -> Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is in use by a running vswitch",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        // Made 0600 from the start (umask), not chmod-ed after: nobody
        // else can connect in between.
        // SAFETY: umask only swaps the process's file-creation mask; it is
        // put back right after. A file another thread creates meanwhile
        // gets the stricter mask, never a looser one.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Server::inherit(listener, links)
    }

    /// Serve an already bound listener (handed over by the previous
    /// binary).
    pub fn inherit(listener: UnixListener, links: Links) -> Result<Server> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            handed_over: false,
            talkers: (Instant::now(), std::collections::HashMap::new()),
            listener,
            links,
        })
    }

    /// True once this switch was handed over to a new binary.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Answer requests until `stop` is set. (Metrics are served on a
    /// thread of their own, `metrics_http`, so a slow scraper cannot hold
    /// this one.)
    pub fn serve(&mut self, stop: &AtomicBool) {
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        while !stop.load(Ordering::Relaxed) {
            // Sleep until a client connects (or a while, to see `stop`).
            fastpath::wake::wait_readable(&mut fds, 100);
            match self.listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.handle(s, stop) {
                        warn!("control request failed: {e:#}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!("control socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn handle(&mut self, s: UnixStream, stop: &AtomicBool) -> Result<()> {
        s.set_nonblocking(false)?;
        let mut line = String::new();
        // The whole request within REQUEST_DEADLINE, however it trickles in.
        let by = crate::deadline::Deadline::new(&s, REQUEST_DEADLINE);
        let n = BufReader::new(by.take(MAX_REQUEST)).read_line(&mut line);
        let reply = match n {
            Err(e) => json!({"error": format!("reading the request: {e}")}),
            Ok(n) if n as u64 >= MAX_REQUEST && !line.ends_with('\n') => {
                json!({"error": format!("request larger than {} MiB", MAX_REQUEST >> 20)})
            }
            Ok(_) if line.contains("\"handover\"") && is_cmd(&line, "handover") => {
                self.handover(&line, &s, stop);
                return Ok(());
            }
            Ok(_) => self.answer(&line, stop),
        };
        let mut w = &s;
        w.write_all(serde_json::to_string(&reply)?.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    }

    /// Hand the switch over to the binary on `s` (see `handover`); on
    /// any failure, resume as if nothing happened.
    fn handover(&mut self, line: &str, s: &UnixStream, stop: &AtomicBool) {
        let refusal = match protocol::decode::<protocol::HandoverRequest>(line.as_bytes()) {
            Err(e) => Some(e.to_string()),
            Ok(_) => self.links.handover_refused.clone(),
        };
        if let Some(why) = refusal {
            warn!("handover refused: {why}");
            let mut w = s;
            let _ = w.write_all(json!({"error": why}).to_string().as_bytes());
            return;
        }
        let t = Instant::now();
        // The snapshot's memory is made ready first, sized from what the
        // switch holds, so its page faults do not count below.
        let flows = self.ask(Request::Stats).map_or(0, |s| s.table_len);
        let conns = lock(self.links.coprocessor.shared()).ct.len();
        let file = match live_migrate::memfd::SnapshotFile::create(
            flows * 48 + conns * 256 + self.links.config_text.len() + (1 << 20),
        ) {
            Ok(f) => f,
            Err(e) => {
                warn!("handover: {e}");
                let mut w = s;
                let _ = w.write_all(json!({"error": e.to_string()}).to_string().as_bytes());
                return;
            }
        };
        // The coprocessors are held until the new binary has the state or
        // this one resumes: it cannot change under the pre-copy. The fast
        // path forwards on meanwhile, and dumps its flows while this
        // thread saves the rest.
        let shared = self.links.coprocessor.shared().clone();
        // From here new flows wait: the pre-copy's cost to the tenants.
        let held_mono_ns = fastpath::dataplane::monotonic_ns();
        let guard = lock(&shared);
        let (dump_tx, dump_rx) = mpsc::channel();
        let _ = self.links.requests.send(Request::Dump(dump_tx));
        self.links.wake.notify();
        let saved = guard.save();
        let mut dump = match dump_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(d) => d,
            Err(e) => {
                warn!("handover: the fast path did not dump its flows: {e}");
                return;
            }
        };
        // The flows go into the snapshot file's flow section, straight
        // from the dump.
        let state = live_migrate::SwitchState {
            clock_ns: dump.clock_ns,
            config: self.links.config_text.clone(),
            shared: saved,
            actions: std::mem::take(&mut dump.actions),
            flows: live_migrate::Flows::default(),
        };
        let mut paused = false;
        // The vhost-user connections given out at the pause, kept (with
        // their descriptors) until the new binary confirms.
        let mut handed: Vec<(usize, fastpath::vhost::endpoint::Handed)> = Vec::new();
        let given = crate::handover::give(
            s,
            &dump,
            file,
            &state,
            &self.listener,
            &self.links.xdp_links,
            held_mono_ns,
            || {
                paused = true;
                let p = self.ask(Request::Pause)?;
                // With the fast path paused the rings stand still; each
                // port's protocol thread stops between two requests.
                for (i, link) in self.links.vhost.iter().enumerate() {
                    let h = link.endpoint.detach().with_context(|| {
                        format!("port {}: stopping its vhost-user thread", link.spec.name)
                    })?;
                    handed.push((i, h));
                }
                let mut vhost_fds = Vec::new();
                let vhost = handed
                    .iter()
                    .map(|(i, h)| {
                        crate::vhost::to_wire(&self.links.vhost[*i].spec, h, &mut vhost_fds)
                    })
                    .collect();
                Ok(crate::handover::PauseOut {
                    paused: p,
                    vhost,
                    vhost_fds,
                })
            },
        );
        match given {
            Ok(true) => {
                info!(
                    flows = dump.flows.len(),
                    connections = state.shared.conns.len(),
                    elapsed_ms = t.elapsed().as_secs_f64() * 1e3,
                    "handed over to the new binary; exiting"
                );
                self.handed_over = true;
                stop.store(true, Ordering::Relaxed);
                // What is left here (threads finishing, memory freed) must
                // not take a core from the new binary's first polls.
                yield_cpu_to_successor();
            }
            other => {
                warn!(result = ?other.map_err(|e| format!("{e:#}")), paused, "handover failed; resuming");
                for (i, h) in handed {
                    let link = &self.links.vhost[i];
                    if let Err(e) = link.endpoint.reattach(h) {
                        warn!(port = %link.spec.name, "vhost-user connection not taken back: {e}");
                    }
                }
                let _ = self.links.requests.send(Request::Resume(None));
                self.links.wake.notify();
            }
        }
        drop(guard);
    }

    /// The new binary's first question: this switch's configuration and
    /// clock (refused if this switch cannot be handed over, or the asker
    /// speaks a protocol this binary does not).
    fn handover_prepare(&self, line: &str) -> Result<Value> {
        protocol::decode::<protocol::PrepareRequest>(line.as_bytes())?;
        if let Some(why) = &self.links.handover_refused {
            anyhow::bail!("{why}");
        }
        Ok(serde_json::to_value(protocol::PrepareAnswer {
            protocol: protocol::PROTOCOL,
            config: self.links.config_text.clone(),
            epoch_mono_ns: self.links.epoch_mono_ns,
        })?)
    }

    fn answer(&mut self, line: &str, stop: &AtomicBool) -> Value {
        // A change is read into its types directly (it may hold 100 000
        // endpoints); everything else through a JSON value.
        #[derive(serde::Deserialize)]
        struct Head {
            cmd: Option<Value>,
        }
        if let Ok(Head {
            cmd: Some(Value::String(c)),
        }) = serde_json::from_str::<Head>(line)
        {
            if c == "apply" {
                return self
                    .apply(line, stop)
                    .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            }
        }
        match serde_json::from_str::<Value>(line) {
            Err(e) => json!({"error": format!("request is not JSON: {e}")}),
            Ok(v) => match v.get("cmd").and_then(Value::as_str) {
                Some("stats") => self.ask(Request::Stats).map(|s| {
                    let mut v = stats_json(&s);
                    v["conntrack"] = self.conntrack_counters();
                    v["last_handover"] = self.links.last_handover.clone().unwrap_or(Value::Null);
                    if !self.links.vhost.is_empty() {
                        let vu: Vec<Value> =
                            self.links.vhost.iter().map(crate::vhost::Link::status).collect();
                        v["vhost_user"] = json!(vu);
                    }
                    v
                }),
                Some("flows") => FlowFilter::parse(&v).and_then(|flt| {
                    let now = self.now();
                    self.ask(Request::Flows).map(|f| flows_json(&f, &flt, now))
                }),
                Some("conntrack") => Ok(self.conntrack_json()),
                Some("nat") => Ok(self.nat_json()),
                Some("security-groups") => Ok(self.groups_json()),
                Some("security-group-set") => self.set_group(&v, stop),
                Some("trace") => self.trace(&v),
                Some("port-add") => self.port_add(&v),
                Some("handover-prepare") => self.handover_prepare(line),
                Some("port-remove") => self.port_remove(&v),
                Some("top-talkers") => self.top_talkers(&v),
                Some("topology") => Ok(self.topology_json()),
                Some("leases") => Ok(self.leases_json()),
                Some(other) => Ok(json!({"error": format!("field `cmd`: unknown command {other:?} (known: stats, flows, conntrack, nat, security-groups, security-group-set, apply, topology, leases, trace, top-talkers, port-add, port-remove)")})),
                None => Ok(json!({"error": "field `cmd` is missing or not a string"})),
            }
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
        }
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.links
            .requests
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("the fast-path thread is gone"))?;
        self.links.wake.notify();
        rx.recv_timeout(Duration::from_secs(2))
            .context("the fast-path thread did not answer within 2 s")
    }
}

/// A vhost-user port's `port-add` fields: `socket` (a path), `mode`
/// (`server`, the default, or `client`), `mac` (the device's).
fn vhost_spec(name: &str, v: &Value) -> Result<crate::vhost::Spec> {
    let socket = v
        .get("socket")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .context("field `socket`: a vhost-user port needs the path of its socket")?;
    let mode = match v.get("mode").and_then(Value::as_str) {
        None | Some("server") => crate::config::VhostMode::Server,
        Some("client") => crate::config::VhostMode::Client,
        Some(other) => bail!("field `mode`: {other:?} is neither server nor client"),
    };
    let mac = v
        .get("mac")
        .and_then(Value::as_str)
        .context("field `mac`: the device's MAC (the VM's on this port) is missing")?;
    let mac = crate::config::parse_mac(mac)
        .with_context(|| format!("field `mac`: {mac:?} is not a MAC address"))?;
    Ok(crate::vhost::Spec {
        name: name.to_string(),
        socket: socket.into(),
        mode,
        mac,
    })
}

/// Lower every thread of this process to the lowest CPU priority (nice
/// 19): after a handover it only winds down.
fn yield_cpu_to_successor() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::id_t>().ok())
        {
            // SAFETY: setpriority(2) on one of our own threads; only its
            // scheduling priority changes. Failure is harmless.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
        }
    }
}

impl Server {
    fn now(&self) -> u64 {
        u64::try_from(self.links.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn conntrack_counters(&self) -> Value {
        let sh = lock(self.links.coprocessor.shared());
        let c = sh.ct.counters;
        json!({"connections": sh.ct.len(), "max": sh.ct.limits.max, "per_vm": sh.ct.limits.per_vm,
               "created": c.created, "expired": c.expired, "revoked": c.revoked,
               "refused_full": c.refused_full, "refused_quota": c.refused_quota,
               "tcp_events": c.events, "checks": c.checks, "timers": sh.ct.timers(),
               "nat_ports_in_use": sh.nat.as_ref().map_or(0, |n| n.in_use())})
    }

    /// Every tracked connection (the first 10 000).
    fn conntrack_json(&self) -> Value {
        const MAX: usize = 10_000;
        let now = self.now();
        let sh = lock(self.links.coprocessor.shared());
        let policy = &sh.policy;
        let conns: Vec<Value> = sh
            .ct
            .iter()
            .take(MAX)
            .map(|(id, c)| {
                let (o, r) = (&c.sides[0].key, &c.sides[1].key);
                let rule = c.admission.rule.map(|r| {
                    format!(
                        "{}#{}",
                        policy.group_name(r.group).unwrap_or("?"),
                        r.rule
                    )
                });
                json!({
                    "id": id, "proto": o.proto, "state": c.state.name(),
                    "original": format!("{}:{} > {}:{}", Ipv4Addr::from(o.src_ip), o.src_port, Ipv4Addr::from(o.dst_ip), o.dst_port),
                    "reply": format!("{}:{} > {}:{}", Ipv4Addr::from(r.src_ip), r.src_port, Ipv4Addr::from(r.dst_ip), r.dst_port),
                    "vm": c.owner.map(|p| vm_name(&sh.topo, p)),
                    "nat": c.nat.map(|n| format!("{}:{}", Ipv4Addr::from(n.ip), n.port)),
                    "rule": rule,
                    "age_s": now.saturating_sub(c.created) as f64 / 1e9,
                    "idle_s": now.saturating_sub(c.last_seen) as f64 / 1e9,
                    "flows_installed": c.sides.iter().filter(|s| s.installed).count(),
                })
            })
            .collect();
        json!({"total": sh.ct.len(), "shown": conns.len(), "connections": conns})
    }

    /// Per VM: connections, NAT ports, refusals; the heaviest first.
    fn nat_json(&self) -> Value {
        let sh = lock(self.links.coprocessor.shared());
        let mut ports: Vec<PortId> = sh.ct.per_owner().keys().copied().collect();
        if let Some(n) = &sh.nat {
            ports.extend(n.vms().keys());
        }
        ports.extend(sh.vm_drops.keys());
        ports.sort();
        ports.dedup();
        let mut rows: Vec<(u32, u32, Value)> = ports
            .into_iter()
            .map(|p| {
                let conns = sh.ct.per_owner().get(&p).copied().unwrap_or(0);
                let nat = sh
                    .nat
                    .as_ref()
                    .and_then(|n| n.vms().get(&p).copied())
                    .unwrap_or_default();
                let d = sh.vm_drops.get(&p).copied().unwrap_or_default();
                let v = json!({"vm": vm_name(&sh.topo, p), "port": p.0, "connections": conns,
                    "nat_ports": nat.ports, "nat_refused_quota": nat.refused_quota,
                    "nat_refused_exhausted": nat.refused_exhausted,
                    "conn_refused": d.ct_refused, "acl_denied": d.acl_denied});
                (nat.ports, conns, v)
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
        json!({
            "snat_addresses": sh.nat.as_ref().map(|n| n.addrs().map(|a| a.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
            "ports_in_use": sh.nat.as_ref().map_or(0, |n| n.in_use()),
            "vms": rows.into_iter().map(|r| r.2).collect::<Vec<_>>(),
        })
    }

    fn groups_json(&self) -> Value {
        let sh = lock(self.links.coprocessor.shared());
        let groups: Vec<Value> = sh
            .policy
            .groups()
            .map(|g| {
                let rules: Vec<Value> = g.rules.iter().map(rule_json).collect();
                json!({"name": g.name, "rules": rules})
            })
            .collect();
        json!({"version": sh.policy.version, "groups": groups})
    }

    /// `{"cmd": "security-group-set", "name": N, "rules": [...]}`: one
    /// `set-rules` operation through [`Server::apply`].
    fn set_group(&mut self, v: &Value, stop: &AtomicBool) -> Result<Value> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .context("field `name` is missing or not a string")?;
        let rules = v.get("rules").context("field `rules` is missing")?;
        let req =
            json!({"cmd": "apply", "ops": [{"op": "set-rules", "name": name, "rules": rules}]});
        self.apply(&req.to_string(), stop)
    }
}

/// Is `line` the JSON request `{"cmd": cmd}`?
fn is_cmd(line: &str, cmd: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["cmd"] == cmd)
}

/// A VM's name, or its port's number.
fn vm_name(topo: &Topology, port: PortId) -> String {
    topo.vm_on(port)
        .map_or_else(|| format!("port {}", port.0), |v| v.name.clone())
}

impl Server {
    /// `{"cmd": "apply", "ops": [...]}`: a batch of changes (see `api`),
    /// whole or not at all; the fast path drops exactly the flows it
    /// affects.
    fn apply(&mut self, text: &str, stop: &AtomicBool) -> Result<Value> {
        let t = Instant::now();
        let ops = crate::api::ApplyRequest::parse(text)?.ops;
        let parsed = t.elapsed();
        let shared = std::sync::Arc::clone(self.links.coprocessor.shared());
        let ops = crate::api::build_ops(ops, &self.links.ports, &lock(&shared).policy)?;
        let checked = t.elapsed();
        let resolved = self.resolve_vteps(&ops, &shared);
        let mut sh = lock(&shared);
        if !resolved.is_empty() {
            let topo = std::sync::Arc::make_mut(&mut sh.topo);
            for (vtep, mac) in resolved {
                topo.set_neighbor(vtep, mac);
            }
        }
        let mut out = coprocessor::Update::default();
        let applied = sh
            .apply(ops, &mut out)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let version = sh.version;
        drop(sh);
        let done = t.elapsed();
        let removed = out.remove.len();
        if !crate::install::send_update(&self.links.installs, out, &self.links.wake, stop) {
            bail!("the switch is stopping");
        }
        info!(
            ops = applied.ops,
            connections_ended = applied.connections_ended,
            version,
            "applied"
        );
        Ok(
            json!({"ok": true, "ops": applied.ops, "connections_ended": applied.connections_ended,
                  "flows_removed": removed, "version": version,
                  "applied_us": t.elapsed().as_secs_f64() * 1e6,
                  "phases_us": {"parse": parsed.as_secs_f64() * 1e6,
                                "check": (checked - parsed).as_secs_f64() * 1e6,
                                "apply": (done - checked).as_secs_f64() * 1e6}}),
        )
    }

    /// `{"cmd": "trace", "packet": {...}}`: every decision the switch
    /// would take for the packet (see `trace`).
    fn trace(&self, v: &Value) -> Result<Value> {
        let p: crate::trace::TracePacket = serde_json::from_value(
            v.get("packet")
                .cloned()
                .context("field `packet` is missing")?,
        )
        .map_err(|e| anyhow::anyhow!("packet: {e}"))?;
        crate::trace::trace(
            &p,
            self.links.coprocessor.shared(),
            &self.links.ports,
            |key| self.ask(|tx| Request::Lookup(key, tx)),
        )
    }

    /// Remote destinations by the traffic of their live flows, with the
    /// byte rate since the previous query (the window), heaviest first;
    /// whether each goes through the network's gateway VTEP (Hoverboard:
    /// the hot ones deserve a direct route).
    fn top_talkers(&mut self, v: &Value) -> Result<Value> {
        let limit = v.get("limit").and_then(Value::as_u64).unwrap_or(20);
        let mut talkers = self.ask(Request::Talkers)?;
        let now = Instant::now();
        let window = now.duration_since(self.talkers.0).as_secs_f64().max(1e-3);
        talkers.sort_by_key(|t| std::cmp::Reverse(t.bytes));
        let sh = lock(self.links.coprocessor.shared());
        let rows: Vec<Value> = talkers
            .iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|t| {
                let before = self
                    .talkers
                    .1
                    .get(&(t.vni, t.dst, t.vtep))
                    .copied()
                    .unwrap_or(0);
                let gw = sh.topo.network(t.vni).and_then(|n| n.gateway_vtep);
                json!({"vni": t.vni, "dst": Ipv4Addr::from(t.dst).to_string(),
                       "vtep": Ipv4Addr::from(t.vtep).to_string(),
                       "via_gateway": gw == Some(Ipv4Addr::from(t.vtep)),
                       "flows": t.flows, "packets": t.packets, "bytes": t.bytes,
                       "bytes_per_s": t.bytes.saturating_sub(before) as f64 / window})
            })
            .collect();
        drop(sh);
        self.talkers = (
            now,
            talkers
                .iter()
                .map(|t| ((t.vni, t.dst, t.vtep), t.bytes))
                .collect(),
        );
        Ok(json!({"window_s": window, "destinations": talkers.len(), "talkers": rows}))
    }

    /// `{"cmd": "port-add", "name": N, "type": "tap"}`: a new VM port
    /// (VMs are then attached to it with `apply`).
    fn port_add(&mut self, v: &Value) -> Result<Value> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .context("field `name` is missing or not a string")?;
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("tap");
        match kind {
            "tap" | "vhost-user" => {}
            "af-xdp" => bail!(
                "field `type`: af-xdp ports are opened at start (they join the frame pool's UMEM); add them to the config"
            ),
            other => bail!("field `type`: {other:?} is neither tap nor vhost-user"),
        }
        if name.is_empty() || name.len() > 15 {
            bail!("field `name`: {name:?} is not an interface name (1 to 15 bytes)");
        }
        if self.links.ports.contains_key(name) {
            bail!("field `name`: port {name:?} already exists");
        }
        let id = PortId(self.links.next_port);
        let mut link = None;
        let io = if kind == "vhost-user" {
            let spec = vhost_spec(name, v)?;
            if self
                .links
                .vhost
                .iter()
                .any(|l| l.spec.socket == spec.socket)
            {
                bail!(
                    "field `socket`: {} is already another port's",
                    spec.socket.display()
                );
            }
            let (l, io) = crate::vhost::open(spec)?;
            l.wake_on_kick(&self.links.wake);
            link = Some(l);
            io
        } else {
            if let Some(f) = ["socket", "mode", "mac"]
                .into_iter()
                .find(|f| v.get(*f).is_some_and(|x| !x.is_null()))
            {
                bail!("field `{f}`: only vhost-user ports have one");
            }
            fastpath::dataplane::PortIo::Tap(
                fastpath::tap::Tap::open(name).with_context(|| format!("port {name}"))?,
            )
        };
        let port = fastpath::dataplane::Port {
            id,
            name: name.to_string(),
            io,
            counters: Default::default(),
        };
        let added = self
            .ask(|tx| Request::AddPort(Box::new(port), tx))
            .and_then(|r| r.map_err(|e| anyhow::anyhow!("{e}")));
        if let Err(e) = added {
            // The endpoint's thread ends with it; its socket goes too.
            if let Some(l) = link {
                if l.spec.mode == crate::config::VhostMode::Server {
                    let _ = std::fs::remove_file(&l.spec.socket);
                }
            }
            return Err(e);
        }
        self.links.next_port += 1;
        self.links.ports.insert(name.to_string(), id);
        self.links.vhost.extend(link);
        info!(port = name, id = id.0, "port added");
        Ok(json!({"ok": true, "id": id.0}))
    }

    /// `{"cmd": "port-remove", "name": N}`: close a port no VM uses.
    fn port_remove(&mut self, v: &Value) -> Result<Value> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .context("field `name` is missing or not a string")?;
        let id = *self
            .links
            .ports
            .get(name)
            .with_context(|| format!("field `name`: no port {name:?}"))?;
        {
            let sh = lock(self.links.coprocessor.shared());
            if let Some(vm) = sh.topo.vm_on(id) {
                bail!(
                    "port {name}: vm {} is attached to it (remove the VM first)",
                    vm.name
                );
            }
            if sh.topo.external.as_ref().is_some_and(|e| e.port == id) {
                bail!("port {name}: it is the external network's port");
            }
        }
        self.ask(|tx| Request::RemovePort(id, tx))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.links.ports.remove(name);
        if let Some(i) = self.links.vhost.iter().position(|l| l.spec.name == name) {
            // Its thread gives the connection out and ends; dropping it
            // closes the VMM's connection and the listener.
            let link = self.links.vhost.remove(i);
            drop(link.endpoint.detach());
            if link.spec.mode == crate::config::VhostMode::Server {
                let _ = std::fs::remove_file(&link.spec.socket);
            }
        }
        info!(port = name, id = id.0, "port removed");
        Ok(json!({"ok": true}))
    }

    /// Next-hop MACs of the VTEPs `ops` introduce that the switch does not
    /// know yet, from the kernel's tables (those it has).
    fn resolve_vteps(
        &mut self,
        ops: &[coprocessor::ops::Op],
        shared: &std::sync::Mutex<coprocessor::Shared>,
    ) -> Vec<(Ipv4Addr, flowtable::Mac)> {
        use coprocessor::ops::Op;
        let mut want: Vec<Ipv4Addr> = ops
            .iter()
            .flat_map(|op| match op {
                Op::SetRemotes(list) => list.iter().map(|r| r.vtep).collect::<Vec<_>>(),
                Op::AddNetwork(n) | Op::ChangeNetwork(n) => n.gateway_vtep.into_iter().collect(),
                _ => Vec::new(),
            })
            .collect();
        want.sort();
        want.dedup();
        {
            let sh = lock(shared);
            if sh.topo.uplink.is_none() {
                return Vec::new();
            }
            want.retain(|v| sh.topo.neighbor(*v).is_none());
        }
        let Some(nl) = self.links.netlink.as_mut() else {
            return Vec::new();
        };
        if want.is_empty() {
            return Vec::new();
        }
        let table = nl.neighbors().unwrap_or_default();
        want.into_iter()
            .filter_map(|v| {
                let hop = nl.next_hop(v).unwrap_or(v);
                table.get(&hop).map(|m| (v, *m))
            })
            .collect()
    }

    /// Networks, VMs and remote endpoints as the switch knows them now.
    fn topology_json(&self) -> Value {
        let sh = lock(self.links.coprocessor.shared());
        let t = &sh.topo;
        let group = |g: &u16| sh.policy.group_name(*g).unwrap_or("?").to_string();
        let mut nets: Vec<Value> = t
            .networks()
            .map(|n| {
                json!({"vni": n.vni.get(), "subnets": n.subnets.iter().map(|s| json!({"cidr": s.cidr.to_string(), "gateway": s.gateway.to_string()})).collect::<Vec<_>>(),
                       "dns": n.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>(), "lease_s": n.lease_secs,
                       "routes": n.routes.len(), "gateway_vtep": n.gateway_vtep.map(|g| g.to_string()), "snat": n.snat})
            })
            .collect();
        nets.sort_by_key(|n| n["vni"].as_u64());
        let mut vms: Vec<Value> = t
            .vms()
            .map(|v| {
                json!({"name": v.name, "port": v.port.0, "mac": coprocessor::topology::mac_str(&v.mac),
                       "ips": v.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(), "network": v.vni.get(),
                       "security_groups": v.groups.iter().map(group).collect::<Vec<_>>(),
                       "floating_ip": v.floating_ip.map(|f| f.to_string())})
            })
            .collect();
        vms.sort_by_key(|v| v["port"].as_u64());
        const MAX: usize = 10_000;
        let remotes: Vec<Value> = t
            .remotes()
            .take(MAX)
            .map(|r| {
                json!({"network": r.vni.get(), "ip": r.ip.to_string(), "vtep": r.vtep.to_string(),
                             "mac": coprocessor::topology::mac_str(&r.mac)})
            })
            .collect();
        json!({"version": sh.version, "networks": nets, "vms": vms,
               "remotes_total": t.remotes().count(), "remotes": remotes})
    }

    fn leases_json(&self) -> Value {
        let now = self.now();
        let sh = lock(self.links.coprocessor.shared());
        let leases: Vec<Value> = sh
            .leases
            .iter()
            .map(|l| {
                let vm = sh.topo.vms().find(|v| v.mac == l.mac).map(|v| v.name.clone());
                json!({"mac": coprocessor::topology::mac_str(&l.mac), "ip": l.ip.to_string(), "vm": vm,
                       "expires_in_s": l.expires.saturating_sub(now) as f64 / 1e9})
            })
            .collect();
        json!({"leases": leases})
    }
}

fn rule_json(r: &Rule) -> Value {
    let proto = match r.proto {
        None => "any".to_string(),
        Some(6) => "tcp".into(),
        Some(17) => "udp".into(),
        Some(1) => "icmp".into(),
        Some(n) => n.to_string(),
    };
    let ports = if r.ports == (0, u16::MAX) {
        None
    } else if r.ports.0 == r.ports.1 {
        Some(r.ports.0.to_string())
    } else {
        Some(format!("{}-{}", r.ports.0, r.ports.1))
    };
    let mut v = json!({"direction": match r.direction { Direction::Ingress => "ingress", Direction::Egress => "egress" },
                       "protocol": proto});
    if let Some(p) = ports {
        v["ports"] = json!(p);
    }
    match &r.peer {
        Peer::Cidr(c) => v["cidr"] = json!(c.to_string()),
        Peer::Group(g) => v["remote_group"] = json!(g),
    }
    v
}

fn stats_json(s: &Snapshot) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(id, name, c)| {
            let drops: serde_json::Map<String, Value> = s
                .pipeline
                .port_drops
                .get(usize::from(id.0))
                .map(|d| d.nonzero().map(|(n, v)| (n.to_string(), json!(v))).collect())
                .unwrap_or_default();
            let mut v = json!({"id": id.0, "name": name, "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
                   "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes, "rx_errors": c.rx_errors,
                   "tx_errors": c.tx_errors, "tx_dropped": c.tx_dropped, "rx_no_buffer": c.rx_no_buffer,
                   "flow_share_full": c.flow_share_full, "drops": drops});
            if c.guest_queue_full + c.guest_not_ready + c.guest_bad_descriptor > 0 {
                v["guest"] = json!({"queue_full": c.guest_queue_full, "not_ready": c.guest_not_ready,
                    "bad_descriptor": c.guest_bad_descriptor});
            }
            if let Some((_, k)) = s.xsk.iter().find(|(p, _)| p == id) {
                v["af_xdp"] = json!({"rx_dropped": k.rx_dropped, "rx_invalid_descs": k.rx_invalid_descs,
                    "tx_invalid_descs": k.tx_invalid_descs, "rx_ring_full": k.rx_ring_full,
                    "rx_fill_ring_empty": k.rx_fill_ring_empty_descs, "tx_ring_empty": k.tx_ring_empty_descs,
                    "fill_short": c.fill_short});
            }
            v
        })
        .collect();
    let drops: serde_json::Map<String, Value> = s
        .pipeline
        .drops
        .nonzero()
        .map(|(n, v)| (n.to_string(), json!(v)))
        .collect();
    let punts: serde_json::Map<String, Value> = PuntReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), json!(s.punted[r.index()])))
        .collect();
    json!({
        "uptime_s": s.uptime_ns as f64 / 1e9,
        "pid": std::process::id(),
        "ports": ports,
        "pipeline": {"rx_packets": s.pipeline.rx_packets, "hits": s.pipeline.hits, "misses": s.pipeline.misses,
                     "tx_packets": s.pipeline.tx_packets},
        "punted": punts,
        "drops": drops,
        "flows": {"active": s.table_len, "capacity": s.table_capacity, "installed": s.installs,
                  "install_failures": s.install_failures, "expired": s.table.expired},
        "frame_pool": {"free": s.pool_free, "chunks": s.pool_chunks},
        "reinjected": s.reinjected,
        "reinject_failed": s.reinject_failed,
        "first_packet": {
            "count": s.first_packet.count,
            "avg_us": if s.first_packet.count == 0 { 0.0 } else { s.first_packet.sum_ns as f64 / s.first_packet.count as f64 / 1e3 },
            "max_us": s.first_packet.max_ns as f64 / 1e3,
            "under_100us": s.first_packet.under_100us,
        },
    })
}

/// Which flows `ctl flows` shows: by ingress port or VNI, address,
/// protocol; at most `limit` of them.
#[derive(Debug, Default)]
struct FlowFilter {
    port: Option<u16>,
    vni: Option<u32>,
    ip: Option<Ipv4Addr>,
    proto: Option<u8>,
    limit: usize,
}

impl FlowFilter {
    fn parse(v: &Value) -> Result<FlowFilter> {
        let f = &v["filter"];
        let num = |k: &str| -> Result<Option<u64>> {
            match f.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .with_context(|| format!("filter: field `{k}`: not a number")),
            }
        };
        let ip = match f.get("ip").and_then(Value::as_str) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| anyhow::anyhow!("filter: field `ip`: {s:?} is not an address"))?,
            ),
        };
        Ok(FlowFilter {
            port: num("port")?.map(|p| u16::try_from(p).unwrap_or(u16::MAX)),
            vni: num("vni")?.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
            ip,
            proto: num("proto")?.map(|p| u8::try_from(p).unwrap_or(u8::MAX)),
            limit: num("limit")?.map_or(10_000, |l| usize::try_from(l).unwrap_or(usize::MAX)),
        })
    }

    fn keeps(&self, d: &FlowDump) -> bool {
        let k = &d.key;
        let ingress = k.ingress();
        self.port
            .is_none_or(|p| ingress == Some(Ingress::Port(PortId(p))))
            && self
                .vni
                .is_none_or(|v| matches!(ingress, Some(Ingress::Vni(x)) if x.get() == v))
            && self
                .ip
                .is_none_or(|ip| k.src_ip == u32::from(ip) || k.dst_ip == u32::from(ip))
            && self.proto.is_none_or(|p| k.proto == p)
    }
}

fn flows_json(f: &[FlowDump], flt: &FlowFilter, now: u64) -> Value {
    let shown: Vec<Value> = f
        .iter()
        .filter(|d| flt.keeps(d))
        .take(flt.limit)
        .map(|d| {
            let k = &d.key;
            let ingress = match k.ingress() {
                Some(Ingress::Port(p)) => format!("port {}", p.0),
                Some(Ingress::Vni(v)) => format!("vni {}", v.get()),
                None => "?".into(),
            };
            let a = &d.action;
            let output = match a.output {
                Output::Port(p) => format!("port {}", p.0),
                Output::Punt => "punt".into(),
                Output::Drop => "drop".into(),
            };
            let nat = a.nat.map(|n| {
                let side = match n.side {
                    flowtable::NatSide::Src => "snat",
                    flowtable::NatSide::Dst => "dnat",
                };
                match n.port {
                    Some(p) => format!("{side} {}:{p}", Ipv4Addr::from(n.ip)),
                    None => format!("{side} {}", Ipv4Addr::from(n.ip)),
                }
            });
            json!({
                "ingress": ingress, "proto": k.proto,
                "src": format!("{}:{}", Ipv4Addr::from(k.src_ip), k.src_port),
                "dst": format!("{}:{}", Ipv4Addr::from(k.dst_ip), k.dst_port),
                "output": output, "encap": a.encap.is_some(), "decap": a.decap.is_some(),
                "nat": nat, "tracked": a.conntrack, "routed": a.dec_ttl,
                "packets": d.stats.packets, "bytes": d.stats.bytes, "current": d.current,
                "idle_s": now.saturating_sub(d.stats.last_used) as f64 / 1e9,
            })
        })
        .collect();
    json!({"total": f.len(), "shown": shown.len(), "flows": shown})
}
