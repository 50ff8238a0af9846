//! The control socket: a root-only Unix socket taking one JSON request per
//! connection (`{"cmd": "stats"}`, `{"cmd": "flows"}`) and answering with
//! one JSON document; and `vswitch ctl`, its command-line client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fastpath::dataplane::{FlowDump, Request, Snapshot};
use fastpath::wake::Wake;
use fastpath::PuntReason;
use flowtable::{Ingress, Output};
use serde_json::{json, Value};
use tracing::warn;

/// Largest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;

pub struct Server {
    listener: UnixListener,
    requests: Sender<Request>,
    wake: Arc<Wake>,
}

impl Server {
    /// Listen on `path` with mode 0600 (a stale socket file is replaced).
    pub fn bind(path: &Path, requests: Sender<Request>, wake: Arc<Wake>) -> Result<Server> {
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
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            requests,
            wake,
        })
    }

    /// Answer requests until `stop` is set.
    pub fn serve(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.handle(s) {
                        warn!("control request failed: {e:#}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    warn!("control socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn handle(&self, s: UnixStream) -> Result<()> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new((&s).take(MAX_REQUEST)).read_line(&mut line)?;
        let reply = match serde_json::from_str::<Value>(&line) {
            Err(e) => json!({"error": format!("request is not JSON: {e}")}),
            Ok(v) => match v.get("cmd").and_then(Value::as_str) {
                Some("stats") => self.ask(Request::Stats).map(|s| stats_json(&s)),
                Some("flows") => self.ask(Request::Flows).map(|f| flows_json(&f)),
                Some(other) => Ok(json!({"error": format!("field `cmd`: unknown command {other:?} (known: stats, flows)")})),
                None => Ok(json!({"error": "field `cmd` is missing or not a string"})),
            }
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
        };
        let mut w = &s;
        w.write_all(serde_json::to_string(&reply)?.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(make(tx))
            .context("the fast-path thread is gone")?;
        self.wake.notify();
        rx.recv_timeout(Duration::from_secs(2))
            .context("the fast-path thread did not answer within 2 s")
    }
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
                   "drops": drops});
            if let Some((_, k)) = s.xsk.iter().find(|(p, _)| p == id) {
                v["af_xdp"] = json!({"rx_dropped": k.rx_dropped, "rx_invalid_descs": k.rx_invalid_descs,
                    "tx_invalid_descs": k.tx_invalid_descs, "rx_ring_full": k.rx_ring_full,
                    "rx_fill_ring_empty": k.rx_fill_ring_empty_descs, "tx_ring_empty": k.tx_ring_empty_descs});
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

fn flows_json(f: &[FlowDump]) -> Value {
    Value::Array(
        f.iter()
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
                json!({
                    "ingress": ingress, "proto": k.proto,
                    "src": format!("{}:{}", std::net::Ipv4Addr::from(k.src_ip), k.src_port),
                    "dst": format!("{}:{}", std::net::Ipv4Addr::from(k.dst_ip), k.dst_port),
                    "output": output, "encap": a.encap.is_some(), "decap": a.decap.is_some(),
                    "packets": d.stats.packets, "bytes": d.stats.bytes, "current": d.current,
                })
            })
            .collect(),
    )
}

/// Send one request to the socket at `path` and return the answer.
pub fn request(path: &Path, cmd: &str) -> Result<Value> {
    let s =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = &s;
    w.write_all(json!({ "cmd": cmd }).to_string().as_bytes())?;
    w.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the answer is not JSON")?;
    if let Some(e) = v.get("error") {
        bail!("vswitch: {}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// `vswitch ctl`: print the answer as a table, or as JSON.
pub fn ctl(path: &Path, cmd: &str, as_json: bool) -> Result<()> {
    let v = request(path, cmd)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match cmd {
        "stats" => print_stats(&v),
        _ => print_flows(&v),
    }
    Ok(())
}

/// "a, b, c", or "none".
fn list_or_none(items: Vec<String>) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn print_stats(v: &Value) {
    println!(
        "{:<4} {:<16} {:>10} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8}",
        "id", "port", "rx_pkts", "rx_bytes", "tx_pkts", "tx_bytes", "rx_err", "tx_err", "tx_drop"
    );
    for p in v["ports"].as_array().into_iter().flatten() {
        println!(
            "{:<4} {:<16} {:>10} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8}",
            n(p, "id"),
            p["name"].as_str().unwrap_or("?"),
            n(p, "rx_packets"),
            n(p, "rx_bytes"),
            n(p, "tx_packets"),
            n(p, "tx_bytes"),
            n(p, "rx_errors"),
            n(p, "tx_errors"),
            n(p, "tx_dropped")
        );
    }
    let pl = &v["pipeline"];
    println!(
        "\npipeline: rx {} hits {} misses {} tx {}",
        n(pl, "rx_packets"),
        n(pl, "hits"),
        n(pl, "misses"),
        n(pl, "tx_packets")
    );
    let f = &v["flows"];
    println!(
        "flows: {} active of {} ({} installed, {} install failures, {} expired)",
        n(f, "active"),
        n(f, "capacity"),
        n(f, "installed"),
        n(f, "install_failures"),
        n(f, "expired")
    );
    println!("punted: {}", list_or_none(counters(&v["punted"], "")));
    let fp = &v["first_packet"];
    println!(
        "first packets through the coprocessor: {} (avg {:.1} µs, max {:.1} µs, {} under 100 µs)",
        n(fp, "count"),
        fp["avg_us"].as_f64().unwrap_or(0.0),
        fp["max_us"].as_f64().unwrap_or(0.0),
        n(fp, "under_100us")
    );
    let pool = &v["frame_pool"];
    println!(
        "frame pool: {} of {} chunks free",
        n(pool, "free"),
        n(pool, "chunks")
    );
    println!("drops: {}", list_or_none(counters(&v["drops"], "")));
    for p in v["ports"].as_array().into_iter().flatten() {
        let mut d = counters(&p["drops"], "");
        d.extend(counters(&p["af_xdp"], "kernel "));
        if !d.is_empty() {
            println!(
                "  on {}: {}",
                p["name"].as_str().unwrap_or("?"),
                d.join(", ")
            );
        }
    }
}

/// The non-zero counters of a JSON object as "name value" strings.
fn counters(obj: &Value, prefix: &str) -> Vec<String> {
    obj.as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c.as_u64() != Some(0))
        .map(|(k, c)| format!("{prefix}{k} {c}"))
        .collect()
}

fn print_flows(v: &Value) {
    println!(
        "{:<10} {:>5} {:<22} {:<22} {:<10} {:<12} {:>10} {:>12}",
        "ingress", "proto", "src", "dst", "output", "tunnel", "packets", "bytes"
    );
    for f in v.as_array().into_iter().flatten() {
        let tunnel = match (f["encap"].as_bool(), f["decap"].as_bool()) {
            (Some(true), _) => "encap",
            (_, Some(true)) => "decap",
            _ => "-",
        };
        println!(
            "{:<10} {:>5} {:<22} {:<22} {:<10} {:<12} {:>10} {:>12}",
            f["ingress"].as_str().unwrap_or("?"),
            n(f, "proto"),
            f["src"].as_str().unwrap_or("?"),
            f["dst"].as_str().unwrap_or("?"),
            f["output"].as_str().unwrap_or("?"),
            tunnel,
            n(f, "packets"),
            n(f, "bytes")
        );
    }
}
