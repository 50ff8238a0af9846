//! Read-only views for the control socket: pure functions of the state
//! (the coprocessors' shared state, a fast-path snapshot) into the JSON
//! documents `vswitch ctl` prints. No locks taken here, no I/O: the
//! server gathers, these describe.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use coprocessor::acl::{Direction, Peer, Rule};
use coprocessor::shared::guard;
use coprocessor::topology::Topology;
use coprocessor::Shared;
use fastpath::dataplane::{FlowDump, Snapshot, Talker};
use fastpath::PuntReason;
use flowtable::{Ingress, Output, PortId};
use serde_json::{json, Value};

use crate::command::FlowFilter;

pub fn conntrack_counters(sh: &Shared) -> Value {
    let c = sh.ct.counters();
    json!({"connections": sh.ct.len(), "max": sh.ct.limits.max, "per_vm": sh.ct.limits.per_vm,
           "created": c.created, "expired": c.expired, "revoked": c.revoked,
           "refused_full": c.refused_full, "refused_quota": c.refused_quota,
           "tcp_events": c.events, "checks": c.checks, "timers": sh.ct.timers(),
           "shard_connections": sh.ct.shard_lens(),
           "nat_ports_in_use": guard(&sh.nat).as_ref().map_or(0, |n| n.in_use())})
}

/// Every tracked connection (the first 10 000).
pub fn conntrack(sh: &Shared, now: u64) -> Value {
    const MAX: usize = 10_000;
    let policy = &sh.policy;
    let mut conns: Vec<Value> = Vec::new();
    sh.ct.for_each(|id, c| {
        if conns.len() >= MAX {
            return;
        }
            let (o, r) = (&c.sides[0].key, &c.sides[1].key);
            let rule = c.admission.rule.map(|r| {
                format!(
                    "{}#{}",
                    policy.group_name(r.group).unwrap_or("?"),
                    r.rule
                )
            });
            let row = json!({
                "id": id, "proto": o.proto, "state": c.state.name(),
                "original": format!("{}:{} > {}:{}", Ipv4Addr::from(o.src_ip), o.src_port, Ipv4Addr::from(o.dst_ip), o.dst_port),
                "reply": format!("{}:{} > {}:{}", Ipv4Addr::from(r.src_ip), r.src_port, Ipv4Addr::from(r.dst_ip), r.dst_port),
                "vm": c.owner.map(|p| vm_name(&sh.topo, p)),
                "nat": c.nat.map(|n| format!("{}:{}", Ipv4Addr::from(n.ip), n.port)),
                "rule": rule,
                "age_s": now.saturating_sub(c.created) as f64 / 1e9,
                "idle_s": now.saturating_sub(c.last_seen) as f64 / 1e9,
                "flows_installed": c.sides.iter().filter(|s| s.installed != 0).count(),
        });
        conns.push(row);
    });
    json!({"total": sh.ct.len(), "shown": conns.len(), "connections": conns})
}

/// Per VM: connections, NAT ports, refusals; the heaviest first.
pub fn nat(sh: &Shared) -> Value {
    let per_owner = sh.ct.per_owner();
    let pool = guard(&sh.nat);
    let drops = guard(&sh.vm_drops);
    let mut ports: Vec<PortId> = per_owner.keys().copied().collect();
    if let Some(n) = pool.as_ref() {
        ports.extend(n.vms().keys());
    }
    ports.extend(drops.keys());
    ports.sort();
    ports.dedup();
    let mut rows: Vec<(u32, u32, Value)> = ports
        .into_iter()
        .map(|p| {
            let conns = per_owner.get(&p).copied().unwrap_or(0);
            let nat = pool
                .as_ref()
                .and_then(|n| n.vms().get(&p).copied())
                .unwrap_or_default();
            let d = drops.get(&p).copied().unwrap_or_default();
            let v = json!({"vm": vm_name(&sh.topo, p), "port": p.0, "connections": conns,
                "nat_ports": nat.ports, "nat_refused_quota": nat.refused_quota,
                "nat_refused_exhausted": nat.refused_exhausted,
                "conn_refused": d.ct_refused, "acl_denied": d.acl_denied});
            (nat.ports, conns, v)
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
    json!({
        "snat_addresses": pool.as_ref().map(|n| n.addrs().map(|a| a.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
        "ports_in_use": pool.as_ref().map_or(0, |n| n.in_use()),
        "vms": rows.into_iter().map(|r| r.2).collect::<Vec<_>>(),
    })
}

/// Load-balanced services: each one's VIP, limit and counters, and its
/// backends with their weight, state, share of the Maglev table and live
/// connections (counted from conntrack, which pins each connection to
/// its backend).
pub fn services(sh: &Shared) -> Value {
    let mut per_backend: HashMap<(coprocessor::services::VipKey, u32, u16), u64> = HashMap::new();
    let svcs = sh.services();
    sh.ct.for_each(|_, c| {
        if let (Some(k), Some((ip, port))) =
            (coprocessor::lb::vip_of(c), coprocessor::lb::backend_of(c))
        {
            // An external VIP's connections count with its service's.
            let k = svcs.external(&k).map_or(k, |s| s.spec.key());
            *per_backend.entry((k, ip, port)).or_default() += 1;
        }
    });
    let list: Vec<Value> = svcs
        .iter()
        .map(|svc| {
            let spec = &svc.spec;
            let key = spec.key();
            let share = |ip: Ipv4Addr, port: u16| -> f64 {
                svc.table.as_ref().map_or(0.0, |t| {
                    let counts = t.counts();
                    let i = t.backends().iter().position(|b| (b.ip, b.port) == (ip, port));
                    i.map_or(0.0, |i| counts[i] as f64 * 100.0 / t.entries().len() as f64)
                })
            };
            let backends: Vec<Value> = spec
                .backends
                .iter()
                .zip(&svc.down)
                .map(|(b, down)| {
                    let state = if *down {
                        "down"
                    } else if b.weight == 0 {
                        "drained"
                    } else {
                        "up"
                    };
                    let passive = svcs.passive_counts(spec.vni, b.ip, b.port);
                    let probes = spec.health.and_then(|h| {
                        let t = coprocessor::health::Target {
                            vni: spec.vni,
                            ip: u32::from(b.ip),
                            port: if h.tcp { b.port } else { 0 },
                        };
                        svcs.health.targets.get(&t)
                    });
                    json!({"ip": b.ip.to_string(), "port": b.port, "weight": b.weight,
                        "state": state, "share_pct": share(b.ip, b.port),
                        "connections": per_backend.get(&(key, u32::from(b.ip), b.port)).copied().unwrap_or(0),
                        "refused": passive.refused, "timed_out": passive.timed_out, "ejections": passive.ejections,
                        "probes": probes.map(|p| p.probes), "probe_failures": probes.map(|p| p.failures)})
                })
                .collect();
            let c = svc.counters;
            let health = spec.health.map(|h| {
                json!({"protocol": if h.tcp { "tcp" } else { "icmp" }, "interval_ms": h.interval_ms,
                    "timeout_ms": h.timeout_ms, "rise": h.rise, "fall": h.fall})
            });
            json!({"name": spec.name, "network": spec.vni, "vip": spec.vip.to_string(), "health": health,
                "protocol": if spec.proto == 6 { "tcp" } else { "udp" }, "port": spec.port,
                "max_connections": spec.max_connections,
                "connections": svcs.service_conns(spec),
                "external_vip": spec.external_vip.map(|ip| ip.to_string()),
                "picked": c.picked, "refused_limit": c.refused_limit,
                "refused_no_backend": c.refused_no_backend, "resets": c.resets,
                "backends": backends})
        })
        .collect();
    json!({"services": list})
}

/// Security groups and their rules.
pub fn groups(sh: &Shared) -> Value {
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

/// Networks, VMs and remote endpoints as the switch knows them now.
pub fn topology(sh: &Shared) -> Value {
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
    json!({"version": sh.version, "vtep": t.uplink.as_ref().map(|u| u.local_vtep.to_string()),
           "networks": nets, "vms": vms, "remotes_total": t.remotes().count(), "remotes": remotes})
}

/// Every remote endpoint (of one network, if given): a machine's read (the
/// fleet agent's resync), where `topology` shows a person the first
/// 10 000.
pub fn remotes(sh: &Shared, network: Option<u32>) -> Value {
    let remotes: Vec<Value> = sh
        .topo
        .remotes()
        .filter(|r| network.is_none_or(|n| r.vni.get() == n))
        .map(|r| {
            json!({"network": r.vni.get(), "ip": r.ip.to_string(), "vtep": r.vtep.to_string(),
                   "mac": coprocessor::topology::mac_str(&r.mac)})
        })
        .collect();
    json!({"version": sh.version, "remotes": remotes})
}

/// DHCP leases, with the VM holding each.
pub fn leases(sh: &Shared, now: u64) -> Value {
    let leases: Vec<Value> = guard(&sh.leases)
        .iter()
        .map(|l| {
            let vm = sh
                .topo
                .vms()
                .find(|v| v.mac == l.mac)
                .map(|v| v.name.clone());
            json!({"mac": coprocessor::topology::mac_str(&l.mac), "ip": l.ip.to_string(), "vm": vm,
                   "expires_in_s": l.expires.saturating_sub(now) as f64 / 1e9})
        })
        .collect();
    json!({"leases": leases})
}

/// A VM's name, or its port's number.
pub fn vm_name(topo: &Topology, port: PortId) -> String {
    topo.vm_on(port)
        .map_or_else(|| format!("port {}", port.0), |v| v.name.clone())
}

pub fn rule_json(r: &Rule) -> Value {
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

/// Counters of the switch, its ports and the pipeline.
pub fn stats(s: &Snapshot) -> Value {
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
                   "flow_share_full": c.flow_share_full, "tx_segments": c.tx_segments,
                   "tx_coalesced": c.tx_coalesced, "tx_csum_completed": c.tx_csum_completed,
                   "tx_offload_dropped": c.tx_offload_dropped, "drops": drops});
            if c.guest_queue_full + c.guest_not_ready + c.guest_bad_descriptor > 0 {
                v["guest"] = json!({"queue_full": c.guest_queue_full, "not_ready": c.guest_not_ready,
                    "bad_descriptor": c.guest_bad_descriptor});
            }
            if let Some((_, k)) = s.xsk.iter().find(|(p, _)| p == id) {
                // The kernel's counts of frames lost...
                v["af_xdp"] = json!({"rx_dropped": k.rx_dropped, "rx_invalid_descs": k.rx_invalid_descs,
                    "tx_invalid_descs": k.tx_invalid_descs, "rx_ring_full": k.rx_ring_full,
                    "rx_fill_ring_empty": k.rx_fill_ring_empty_descs, "fill_short": c.fill_short});
                // ...and of ring states that lose nothing (a wakeup found
                // the TX ring empty): shown apart from drops.
                v["af_xdp_rings"] = json!({"tx_ring_empty": k.tx_ring_empty_descs});
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
            "p50_us": s.first_packet.quantile_ns(500) as f64 / 1e3,
            "p99_us": s.first_packet.quantile_ns(990) as f64 / 1e3,
            "under_100us": s.first_packet.under_100us,
        },
    })
}

/// The flows `flt` keeps (at most its limit, 10 000 by default).
pub fn flows(f: &[FlowDump], flt: &FlowFilter, now: u64) -> Value {
    let shown: Vec<Value> = f
        .iter()
        .filter(|d| keeps(flt, d))
        .take(flt.limit.unwrap_or(10_000))
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
                "thread": d.thread,
            })
        })
        .collect();
    json!({"total": f.len(), "shown": shown.len(), "flows": shown})
}

/// The last top-talkers sample: when, and bytes by (vni, dst, vtep).
pub type TalkerSample = (std::time::Instant, HashMap<(u32, u32, u32), u64>);

/// Remote destinations by the traffic of their live flows (`talkers`,
/// heaviest first), with the byte rate since `before` was taken `window_s`
/// ago; whether each goes through the network's gateway VTEP (Hoverboard:
/// the hot ones deserve a direct route).
pub fn top_talkers(
    talkers: &[Talker],
    before: &HashMap<(u32, u32, u32), u64>,
    window_s: f64,
    sh: &Shared,
    limit: usize,
) -> Value {
    let rows: Vec<Value> = talkers
        .iter()
        .take(limit)
        .map(|t| {
            let before = before.get(&(t.vni, t.dst, t.vtep)).copied().unwrap_or(0);
            let gw = sh.topo.network(t.vni).and_then(|n| n.gateway_vtep);
            json!({"vni": t.vni, "dst": Ipv4Addr::from(t.dst).to_string(),
                   "vtep": Ipv4Addr::from(t.vtep).to_string(),
                   "via_gateway": gw == Some(Ipv4Addr::from(t.vtep)),
                   "flows": t.flows, "packets": t.packets, "bytes": t.bytes,
                   "bytes_per_s": t.bytes.saturating_sub(before) as f64 / window_s})
        })
        .collect();
    json!({"window_s": window_s, "destinations": talkers.len(), "talkers": rows})
}

/// Does `flt` keep the flow `d`?
fn keeps(flt: &FlowFilter, d: &FlowDump) -> bool {
    let k = &d.key;
    let ingress = k.ingress();
    flt.port
        .is_none_or(|p| ingress == Some(Ingress::Port(PortId(p))))
        && flt
            .vni
            .is_none_or(|v| matches!(ingress, Some(Ingress::Vni(x)) if x.get() == v))
        && flt
            .ip
            .is_none_or(|ip| k.src_ip == u32::from(ip) || k.dst_ip == u32::from(ip))
        && flt.proto.is_none_or(|p| k.proto == p)
}

#[cfg(test)]
mod tests;
