//! `vswitch ctl`: the control socket's command-line client — one request,
//! its answer printed as tables (or as JSON with `--json`) — and the
//! helpers that build requests from the command line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::command::Command;

/// Send one request to the socket at `path` and return the answer.
pub fn request(path: &Path, req: &Command) -> Result<Value> {
    let s =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = &s;
    w.write_all(req.to_line().as_bytes())?;
    w.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the answer is not JSON")?;
    if let Some(e) = v.get("error") {
        bail!("vswitch: {}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// `vswitch ctl`: send `req`, print the answer as a table, or as JSON.
pub fn ctl(path: &Path, req: &Command, as_json: bool, ports_only: bool) -> Result<()> {
    let v = request(path, req)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match req {
        Command::Stats if ports_only => print_ports(&v),
        Command::Stats => print_stats(&v),
        Command::Flows { .. } => print_flows(&v),
        Command::Topology => print_topology(&v),
        Command::TopTalkers { .. } => {
            println!(
                "{:>8} {:<16} {:<16} {:>6} {:>12} {:>14} {:>14}",
                "vni", "destination", "vtep", "flows", "packets", "bytes", "bytes/s"
            );
            for t in v["talkers"].as_array().into_iter().flatten() {
                let via = if t["via_gateway"] == true {
                    " (gateway)"
                } else {
                    ""
                };
                println!(
                    "{:>8} {:<16} {:<16} {:>6} {:>12} {:>14} {:>14.0}{via}",
                    n(t, "vni"),
                    s(t, "dst"),
                    s(t, "vtep"),
                    n(t, "flows"),
                    n(t, "packets"),
                    n(t, "bytes"),
                    t["bytes_per_s"].as_f64().unwrap_or(0.0)
                );
            }
            println!("window {:.1} s", v["window_s"].as_f64().unwrap_or(0.0));
        }
        Command::Trace { .. } => {
            for st in v["steps"].as_array().into_iter().flatten() {
                println!("{:<16} {}", s(st, "stage"), s(st, "what"));
            }
            println!("=> {}", s(&v, "verdict"));
        }
        Command::Leases => print_leases(&v),
        Command::PortAdd(_) => println!("port added (id {})", n(&v, "id")),
        Command::PortRemove { .. } => println!("port removed"),
        Command::Apply { .. } => println!(
            "applied {} operations (version {}): {} connections ended, {} flows removed, {:.0} µs",
            n(&v, "ops"),
            n(&v, "version"),
            n(&v, "connections_ended"),
            n(&v, "flows_removed"),
            v["applied_us"].as_f64().unwrap_or(0.0)
        ),
        Command::Conntrack => print_conntrack(&v),
        Command::Nat => print_nat(&v),
        Command::SecurityGroups => print_groups(&v),
        Command::Services => print_services(&v),
        Command::SecurityGroupSet { .. } => {
            println!("ok: {} flows removed", n(&v, "flows_removed"))
        }
        Command::Remotes { .. } | Command::HandoverPrepare(_) | Command::Handover(_) => {
            println!("{}", serde_json::to_string_pretty(&v)?)
        }
    }
    Ok(())
}

/// The `apply` request from `file` (or standard input): an array of
/// operations, or an object with `ops`.
pub fn apply_request(file: Option<&Path>) -> Result<Command> {
    let text = match file {
        Some(f) if f != Path::new("-") => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        _ => {
            let mut t = String::new();
            std::io::stdin().read_to_string(&mut t)?;
            t
        }
    };
    let v: Value = serde_json::from_str(&text).context("the changes are not JSON")?;
    let ops = match v {
        Value::Array(ops) => ops,
        Value::Object(mut o) => match o.remove("ops") {
            Some(Value::Array(ops)) => ops,
            Some(_) => bail!("`ops` in the changes is not an array of operations"),
            None => bail!("no `ops` in the changes"),
        },
        _ => bail!("the changes must be an array of operations or an object with `ops`"),
    };
    Ok(Command::Apply { ops })
}

/// A rule from "direction=ingress,protocol=tcp,ports=80,cidr=10.0.0.0/8"
/// (the fields of a `[[security_group.rule]]`).
pub fn parse_rule_arg(s: &str) -> Result<Value> {
    let mut m = serde_json::Map::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("rule {s:?}: {part:?} is not FIELD=VALUE"))?;
        m.insert(k.trim().to_string(), json!(v.trim()));
    }
    Ok(Value::Object(m))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn print_conntrack(v: &Value) {
    println!(
        "{:>5} {:<12} {:<44} {:<44} {:<10} {:<22} {:<10} {:>8}",
        "proto", "state", "original", "reply", "vm", "nat", "rule", "idle_s"
    );
    for c in v["connections"].as_array().into_iter().flatten() {
        println!(
            "{:>5} {:<12} {:<44} {:<44} {:<10} {:<22} {:<10} {:>8.1}",
            n(c, "proto"),
            s(c, "state"),
            s(c, "original"),
            s(c, "reply"),
            s(c, "vm"),
            s(c, "nat"),
            s(c, "rule"),
            c["idle_s"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{} connections ({} shown)", n(v, "total"), n(v, "shown"));
}

fn print_nat(v: &Value) {
    let addrs: Vec<String> = v["snat_addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    println!(
        "SNAT addresses: {}; ports in use: {}",
        list_or_none(addrs),
        n(v, "ports_in_use")
    );
    println!(
        "{:<16} {:>12} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "vm", "connections", "nat_ports", "nat_quota", "nat_exhaust", "conn_refused", "acl_denied"
    );
    for r in v["vms"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:>12} {:>10} {:>12} {:>12} {:>12} {:>10}",
            s(r, "vm"),
            n(r, "connections"),
            n(r, "nat_ports"),
            n(r, "nat_refused_quota"),
            n(r, "nat_refused_exhausted"),
            n(r, "conn_refused"),
            n(r, "acl_denied")
        );
    }
}

fn print_services(v: &Value) {
    let svcs = v["services"].as_array().map_or(&[][..], |s| &s[..]);
    if svcs.is_empty() {
        println!("no services");
    }
    for svc in svcs {
        let limit = match n(svc, "max_connections") {
            0 => "none".to_string(),
            m => m.to_string(),
        };
        let ext = svc["external_vip"]
            .as_str()
            .map(|e| format!(" (external {e})"))
            .unwrap_or_default();
        println!(
            "service {}  vni {}  {}{ext}:{}/{}  connections {} (limit {})  picked {}  refused: limit {} no_backend {}  resets {}",
            s(svc, "name"),
            n(svc, "network"),
            s(svc, "vip"),
            n(svc, "port"),
            s(svc, "protocol"),
            n(svc, "connections"),
            limit,
            n(svc, "picked"),
            n(svc, "refused_limit"),
            n(svc, "refused_no_backend"),
            n(svc, "resets")
        );
        if let Some(h) = svc["health"].as_object() {
            println!(
                "  health check: {} every {} ms, timeout {} ms, rise {} fall {} (backends on this host)",
                h.get("protocol").and_then(Value::as_str).unwrap_or("?"),
                n(&svc["health"], "interval_ms"),
                n(&svc["health"], "timeout_ms"),
                n(&svc["health"], "rise"),
                n(&svc["health"], "fall")
            );
        }
        println!(
            "  {:<22} {:>7} {:<8} {:>8} {:>11} {:>8} {:>9} {:>7} {:>9}",
            "backend",
            "weight",
            "state",
            "share",
            "connections",
            "refused",
            "timed_out",
            "probes",
            "failures"
        );
        let opt = |v: &Value| v.as_u64().map_or("-".to_string(), |x| x.to_string());
        for b in svc["backends"].as_array().into_iter().flatten() {
            println!(
                "  {:<22} {:>7} {:<8} {:>7.2}% {:>11} {:>8} {:>9} {:>7} {:>9}",
                format!("{}:{}", s(b, "ip"), n(b, "port")),
                n(b, "weight"),
                s(b, "state"),
                b["share_pct"].as_f64().unwrap_or(0.0),
                n(b, "connections"),
                n(b, "refused"),
                n(b, "timed_out"),
                opt(&b["probes"]),
                opt(&b["probe_failures"])
            );
        }
    }
}

fn print_groups(v: &Value) {
    for g in v["groups"].as_array().into_iter().flatten() {
        println!("security group {}", s(g, "name"));
        let rules = g["rules"].as_array().map_or(&[][..], |r| &r[..]);
        if rules.is_empty() {
            println!("  (no rules: everything new is denied)");
        }
        for (i, r) in rules.iter().enumerate() {
            let peer = r
                .get("remote_group")
                .and_then(Value::as_str)
                .map(|g| format!("group {g}"))
                .unwrap_or_else(|| s(r, "cidr").to_string());
            println!(
                "  #{i:<3} {:<8} {:<5} ports {:<12} {}",
                s(r, "direction"),
                s(r, "protocol"),
                r.get("ports").and_then(Value::as_str).unwrap_or("all"),
                peer
            );
        }
    }
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

fn print_port_table(v: &Value) {
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
}

/// One line per vhost-user port: its socket, whether a guest is there,
/// and what went wrong last.
fn print_vhost(v: &Value) {
    for p in v["vhost_user"].as_array().into_iter().flatten() {
        let guest = if p["guest_connected"] == true {
            "guest connected"
        } else {
            "no guest"
        };
        let err = p["last_error"]
            .as_str()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default();
        println!(
            "  vhost-user {}: {guest} ({} {}), {} connections ended{err}",
            s(p, "name"),
            s(p, "mode"),
            s(p, "socket"),
            n(p, "connections_ended")
        );
    }
}

/// One line per port that cut, merged or completed frames for offloads.
fn print_offloads(v: &Value) {
    for p in v["ports"].as_array().into_iter().flatten() {
        let keys = [
            "tx_segments",
            "tx_coalesced",
            "tx_csum_completed",
            "tx_offload_dropped",
        ];
        if keys.iter().all(|k| n(p, k) == 0) {
            continue;
        }
        println!(
            "  offloads on {}: {} segments cut, {} segments merged (GRO), {} checksums completed, {} lost",
            s(p, "name"),
            n(p, "tx_segments"),
            n(p, "tx_coalesced"),
            n(p, "tx_csum_completed"),
            n(p, "tx_offload_dropped")
        );
    }
}

/// Each thread's cores, the core it was last seen on and its busy share
/// over the last second.
fn print_threads(v: &Value) {
    let Some(threads) = v["threads"].as_array() else {
        return;
    };
    println!("threads:");
    for t in threads {
        let mut line = format!(
            "  {:<12} {:<12} cores {}",
            t["name"].as_str().unwrap_or("?"),
            t["role"]
                .as_str()
                .unwrap_or("?")
                .split(',')
                .next()
                .unwrap_or("?"),
            t["cores"].as_str().unwrap_or("?")
        );
        if let Some(c) = t["cpu"].as_u64() {
            line += &format!(", on {c}");
        }
        if let Some(b) = t["busy_pct"].as_f64() {
            line += &format!(", busy {b:.1}%");
        }
        if let Some(d) = t["decisions"].as_u64() {
            line += &format!(", decided {d}");
        }
        if let Some(q) = t["queues"].as_array() {
            let q: Vec<&str> = q.iter().filter_map(Value::as_str).collect();
            line += &format!(", polls {}", q.join(" "));
        }
        println!("{line}");
    }
}

fn print_stats(v: &Value) {
    print_port_table(v);
    print_offloads(v);
    print_vhost(v);
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
        "first packets through the coprocessor: {} (p50 {:.0} µs, p99 {:.0} µs, max {:.1} µs, avg {:.1} µs, {} under 100 µs)",
        n(fp, "count"),
        fp["p50_us"].as_f64().unwrap_or(0.0),
        fp["p99_us"].as_f64().unwrap_or(0.0),
        fp["max_us"].as_f64().unwrap_or(0.0),
        fp["avg_us"].as_f64().unwrap_or(0.0),
        n(fp, "under_100us")
    );
    print_threads(v);
    let pool = &v["frame_pool"];
    println!(
        "frame pool: {} of {} chunks free",
        n(pool, "free"),
        n(pool, "chunks")
    );
    println!("drops: {}", list_or_none(counters(&v["drops"], "")));
    let h = &v["last_handover"];
    if !h.is_null() {
        println!(
            "last handover into this process: blackout {:.0} µs, {} flows and {} connections carried, snapshot {} bytes",
            h["blackout_us"].as_f64().unwrap_or(0.0),
            n(h, "flows"),
            n(h, "connections"),
            n(h, "snapshot_bytes")
        );
    }
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
        "{:<10} {:>5} {:<22} {:<22} {:<10} {:<6} {:<26} {:>10} {:>12} {:>8} {:>6}",
        "ingress",
        "proto",
        "src",
        "dst",
        "output",
        "tunnel",
        "nat",
        "packets",
        "bytes",
        "idle_s",
        "thread"
    );
    for f in v["flows"].as_array().into_iter().flatten() {
        let tunnel = match (f["encap"].as_bool(), f["decap"].as_bool()) {
            (Some(true), _) => "encap",
            (_, Some(true)) => "decap",
            _ => "-",
        };
        println!(
            "{:<10} {:>5} {:<22} {:<22} {:<10} {:<6} {:<26} {:>10} {:>12} {:>8.1} {:>6}",
            s(f, "ingress"),
            n(f, "proto"),
            s(f, "src"),
            s(f, "dst"),
            s(f, "output"),
            tunnel,
            s(f, "nat"),
            n(f, "packets"),
            n(f, "bytes"),
            f["idle_s"].as_f64().unwrap_or(0.0),
            n(f, "thread")
        );
    }
    println!("{} flows ({} shown)", n(v, "total"), n(v, "shown"));
}

fn print_topology(v: &Value) {
    println!("networks:");
    for net in v["networks"].as_array().into_iter().flatten() {
        let subnets: Vec<String> = net["subnets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{} gw {}", s(x, "cidr"), s(x, "gateway")))
            .collect();
        println!(
            "  vni {:<8} {}  routes {}  snat {}",
            n(net, "vni"),
            subnets.join(", "),
            n(net, "routes"),
            net["snat"]
        );
    }
    println!(
        "{:<16} {:>5} {:<18} {:<18} {:>8} {:<16} security_groups",
        "vm", "port", "mac", "ips", "network", "floating_ip"
    );
    for vm in v["vms"].as_array().into_iter().flatten() {
        let list = |k: &str| -> String {
            vm[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{:<16} {:>5} {:<18} {:<18} {:>8} {:<16} {}",
            s(vm, "name"),
            n(vm, "port"),
            s(vm, "mac"),
            list("ips"),
            n(vm, "network"),
            s(vm, "floating_ip"),
            list("security_groups")
        );
    }
    println!("remote endpoints: {}", n(v, "remotes_total"));
}

fn print_leases(v: &Value) {
    println!(
        "{:<18} {:<16} {:<16} {:>12}",
        "mac", "ip", "vm", "expires_in_s"
    );
    for l in v["leases"].as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<16} {:<16} {:>12.0}",
            s(l, "mac"),
            s(l, "ip"),
            s(l, "vm"),
            l["expires_in_s"].as_f64().unwrap_or(0.0)
        );
    }
}

fn print_ports(v: &Value) {
    print_port_table(v);
    print_vhost(v);
    for p in v["ports"].as_array().into_iter().flatten() {
        let mut d = counters(&p["drops"], "");
        d.extend(counters(&p["af_xdp"], "kernel "));
        d.extend(counters(&p["guest"], "guest "));
        if !d.is_empty() {
            println!("  drops on {}: {}", s(p, "name"), d.join(", "));
        }
        let rings = counters(&p["af_xdp_rings"], "");
        if !rings.is_empty() {
            println!(
                "  kernel ring statistics on {}: {}",
                s(p, "name"),
                rings.join(", ")
            );
        }
    }
}
