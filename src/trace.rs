//! `vswitch ctl trace`: describe a packet, see every decision the switch
//! would take for it, like OVS's ofproto/trace. Nothing changes: the
//! fast path is asked whether the packet's key hits a flow (without
//! counting it), and a miss is decided by a coprocessor working on a copy
//! of the shared state.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use coprocessor::acl::Direction;
use coprocessor::forward::{self, Next};
use coprocessor::topology::{mac_str, Endpoint, Topology};
use coprocessor::{Coprocessor, Shared};
use dpif::{PuntMsg, PuntReason};
use fastpath::synth::{self, UdpFlow};
use fastpath::{Classifier, Kind};
use flowtable::{Action, FlowKey, NatSide, Output, PortId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A packet to trace (the request's fields and `vswitch ctl trace`'s
/// options; the command line has its own defaults for the ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TracePacket {
    /// Ingress: a VM port by name...
    #[serde(default)]
    #[arg(long)]
    pub port: Option<String>,
    /// ...or the overlay (VXLAN with this VNI, from `vtep`, or the
    /// VTEP the source is known behind).
    #[serde(default)]
    #[arg(long)]
    pub vni: Option<u32>,
    /// Sending VTEP (overlay ingress; default: the source's).
    #[serde(default)]
    #[arg(long)]
    pub vtep: Option<Ipv4Addr>,
    #[arg(long)]
    pub src: Ipv4Addr,
    #[arg(long)]
    pub dst: Ipv4Addr,
    /// "tcp", "udp" (default) or "icmp" (an echo request).
    #[serde(default = "udp")]
    #[arg(long, default_value = "udp")]
    pub proto: String,
    #[serde(default)]
    #[arg(long, default_value_t = 40000)]
    pub sport: u16,
    #[serde(default)]
    #[arg(long, default_value_t = 80)]
    pub dport: u16,
    /// TCP flags: "syn" (default), "ack", "fin", "rst", "synack".
    #[serde(default)]
    #[arg(long)]
    pub flags: Option<String>,
    /// Ethernet source (default: the sender's bound MAC).
    #[serde(default)]
    #[arg(long)]
    pub src_mac: Option<String>,
}

fn udp() -> String {
    "udp".into()
}

/// Steps of a trace, in order.
struct Steps(Vec<Value>);

impl Steps {
    fn add(&mut self, stage: &str, what: impl Into<String>) {
        self.0.push(json!({"stage": stage, "what": what.into()}));
    }
}

/// Describe an action in one line.
pub fn describe(a: &Action) -> String {
    let mut parts = Vec::new();
    if let Some(v) = a.decap {
        parts.push(format!("decap (from VTEP {})", Ipv4Addr::from(v)));
    }
    if a.conntrack {
        parts.push("tracked".into());
    }
    if let Some(n) = a.nat {
        let side = if n.side == NatSide::Src {
            "snat"
        } else {
            "dnat"
        };
        parts.push(match n.port {
            Some(p) => format!("{side} {}:{p}", Ipv4Addr::from(n.ip)),
            None => format!("{side} {}", Ipv4Addr::from(n.ip)),
        });
    }
    if a.dec_ttl {
        parts.push("ttl-1".into());
    }
    if let Some(m) = a.set_eth_src {
        parts.push(format!("eth src {}", mac_str(&m)));
    }
    if let Some(m) = a.set_eth_dst {
        parts.push(format!("eth dst {}", mac_str(&m)));
    }
    if let Some(t) = &a.encap {
        let b = &t.0;
        parts.push(format!(
            "encap vni {} to VTEP {}",
            u32::from_be_bytes([0, b[46], b[47], b[48]]),
            Ipv4Addr::new(b[30], b[31], b[32], b[33])
        ));
    }
    if a.max_len != u16::MAX {
        parts.push(format!("max {} bytes", a.max_len));
    }
    parts.push(match a.output {
        Output::Port(p) => format!("output port {}", p.0),
        Output::Drop => "drop".into(),
        Output::Punt => "punt".into(),
    });
    parts.join(", ")
}

fn tcp_flags(s: Option<&str>) -> Result<u8> {
    Ok(match s.unwrap_or("syn") {
        "syn" => 0x02,
        "synack" => 0x12,
        "ack" => 0x10,
        "fin" => 0x11,
        "rst" => 0x04,
        other => bail!("field `flags`: {other:?} is not syn, synack, ack, fin or rst"),
    })
}

/// The frame the packet describes, and its ingress port.
fn frame(
    p: &TracePacket,
    topo: &Topology,
    ports: &std::collections::HashMap<String, PortId>,
) -> Result<(Vec<u8>, PortId, u32)> {
    let (ingress, vni, src_mac) = match (&p.port, p.vni) {
        (Some(name), None) => {
            let port = *ports
                .get(name)
                .with_context(|| format!("field `port`: {name:?} is not a port of the switch"))?;
            let vm = topo.vm_on(port);
            (port, vm.map_or(0, |v| v.vni.get()), vm.map(|v| v.mac))
        }
        (None, Some(vni)) => {
            let up = topo
                .uplink
                .as_ref()
                .context("field `vni`: the switch has no uplink")?;
            let mac = match topo.lookup(vni, p.src) {
                Some(Endpoint::Remote { mac, .. }) => Some(mac),
                _ => None,
            };
            (up.port, vni, mac)
        }
        _ => bail!("give exactly one of `port` (a VM port) and `vni` (from the overlay)"),
    };
    let src_mac = match &p.src_mac {
        Some(m) => crate::config::parse_mac(m)
            .with_context(|| format!("field `src_mac`: {m:?} is not a MAC address"))?,
        None => src_mac.unwrap_or([2, 0, 0, 0, 0, 1]),
    };
    let gw_mac = topo
        .network(vni)
        .map_or([2, 0, 0, 0, 0, 0xfe], |n| n.gateway_mac);
    let f = UdpFlow {
        src_mac,
        dst_mac: gw_mac,
        src_ip: p.src,
        dst_ip: p.dst,
        src_port: p.sport,
        dst_port: p.dport,
    };
    let inner = match p.proto.as_str() {
        "udp" => synth::udp_frame(&f, 64),
        "tcp" => synth::tcp_frame(&f, tcp_flags(p.flags.as_deref())?, b""),
        "icmp" => {
            let mut v = synth::udp_frame(&f, 64);
            v[23] = 1;
            v[24..26].fill(0);
            let c = vxlan::checksum::checksum(&v[14..34]);
            v[24..26].copy_from_slice(&c.to_be_bytes());
            v[34..42].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
            let c = vxlan::checksum::checksum(&v[34..]);
            v[36..38].copy_from_slice(&c.to_be_bytes());
            v
        }
        other => bail!("field `proto`: {other:?} is not tcp, udp or icmp"),
    };
    if p.vni.is_none() {
        return Ok((inner, ingress, vni));
    }
    let up = topo.uplink.as_ref().context("no uplink")?;
    let vtep = match (p.vtep, topo.lookup(vni, p.src)) {
        (Some(v), _) => v,
        (None, Some(Endpoint::Remote { vtep, .. })) => vtep,
        _ => bail!(
            "field `vtep`: needed, {} is not a known remote endpoint",
            p.src
        ),
    };
    let outer = synth::vxlan_frame(
        &inner,
        &vxlan::TemplateSpec {
            src_mac: [2, 0xbb, 0, 0, 0, 1],
            dst_mac: up.mac,
            local_vtep: vtep,
            remote_vtep: up.local_vtep,
            vni,
            ttl: 64,
        },
        0,
    );
    Ok((outer, ingress, vni))
}

/// Trace `p`: `lookup` asks the fast path for the flow of a key.
pub fn trace(
    p: &TracePacket,
    shared: &Arc<coprocessor::SharedLock>,
    ports: &std::collections::HashMap<String, PortId>,
    lookup: impl FnOnce(FlowKey) -> Result<Option<Action>>,
) -> Result<Value> {
    // A copy to decide on: nothing the real switch holds changes.
    let snapshot = {
        let sh = coprocessor::read(shared);
        Shared::restore(sh.save(), sh.save_services(), 0)
            .map_err(|e| anyhow::anyhow!("copying the state: {e}"))?
    };
    let topo = Arc::clone(&snapshot.topo);
    let (frame, ingress, vni) = frame(p, &topo, ports)?;
    let mut steps = Steps(Vec::new());
    steps.add(
        "ingress",
        match &p.port {
            Some(name) => format!("port {name} (id {})", ingress.0),
            None => format!("uplink (id {}), VXLAN vni {vni}", ingress.0),
        },
    );
    let classifier = Classifier {
        uplink: topo.uplink.as_ref().map_or(PortId(u16::MAX), |u| u.port),
        decap: vxlan::DecapConfig {
            local_vtep: topo.uplink.as_ref().map_or(0, |u| u32::from(u.local_vtep)),
            udp_port: vxlan::UDP_PORT,
        },
    };
    let mut key = FlowKey::default();
    let c = classifier.classify(ingress, &frame, &mut key);
    let key = match c.kind {
        Kind::Flow => {
            steps.add(
                "classify",
                format!(
                    "key: proto {} {}:{} > {}:{}",
                    key.proto,
                    Ipv4Addr::from(key.src_ip),
                    key.src_port,
                    Ipv4Addr::from(key.dst_ip),
                    key.dst_port
                ),
            );
            key
        }
        Kind::Punt(r) => {
            steps.add("classify", format!("punted without a key ({})", r.name()));
            return Ok(json!({"steps": steps.0, "verdict": "punted"}));
        }
        Kind::Drop(r) => {
            steps.add("classify", format!("dropped: {}", r.name()));
            return Ok(json!({"steps": steps.0, "verdict": format!("drop ({})", r.name())}));
        }
    };
    if let Some(a) = lookup(key)? {
        steps.add("flow table", format!("hit: {}", describe(&a)));
        return Ok(json!({"steps": steps.0, "verdict": describe(&a)}));
    }
    steps.add("flow table", "miss: punted to the coprocessor");
    explain(&mut steps, &snapshot, &topo, ingress, vni, &key);
    let mut cp = Coprocessor::with_shared(Arc::new(coprocessor::SharedLock::new(snapshot)));
    let out = cp.handle(&PuntMsg::of(
        ingress,
        PuntReason::Miss,
        1,
        &frame,
        Some(key),
    ));
    for (k, a) in &out.flows {
        let which = if *k == key {
            "this flow"
        } else {
            "reverse flow"
        };
        steps.add("compile", format!("{which}: {}", describe(a)));
    }
    for (port, f) in &out.tx {
        steps.add(
            "answer",
            format!("the coprocessor sends {} bytes on port {}", f.len(), port.0),
        );
    }
    let verdict = match (out.drop, out.flows.iter().find(|(k, _)| *k == key)) {
        (Some(cause), _) => format!("drop ({})", cause.name()),
        (None, Some((_, a))) if out.reinject => describe(a),
        (None, _) if !out.tx.is_empty() => "answered by the coprocessor".to_string(),
        _ => "consumed by the coprocessor".to_string(),
    };
    Ok(json!({"steps": steps.0, "verdict": verdict}))
}

/// The coprocessor's reasoning, stage by stage, for a key that missed.
fn explain(
    steps: &mut Steps,
    sh: &Shared,
    topo: &Topology,
    ingress: PortId,
    vni: u32,
    key: &FlowKey,
) {
    let (src, dst) = (Ipv4Addr::from(key.src_ip), Ipv4Addr::from(key.dst_ip));
    if let Some((_, side)) = sh.ct.lookup(key) {
        steps.add(
            "conntrack",
            format!(
                "{} of a tracked connection: its flow is reinstalled",
                if side == 0 {
                    "original direction"
                } else {
                    "reply"
                }
            ),
        );
        return;
    }
    let vm = topo.vm_on(ingress);
    if let Some(vm) = vm {
        steps.add(
            "anti-spoof",
            if vm.ips.contains(&src) {
                format!("{src} is bound to vm {}", vm.name)
            } else {
                format!("{src} is not bound to vm {}: spoofed", vm.name)
            },
        );
        if sh.services().is_vip(vni, dst) {
            let vk = coprocessor::services::VipKey {
                vni,
                vip: key.dst_ip,
                proto: key.proto,
                port: key.dst_port,
            };
            steps.add(
                "load balancer",
                match sh.services().get(&vk) {
                    Some(s) => format!(
                        "service {}: a new connection takes the backend the Maglev table gives its 5-tuple ({} of {} backends take new ones)",
                        s.spec.name,
                        s.spec
                            .backends
                            .iter()
                            .zip(&s.down)
                            .filter(|(b, d)| b.weight > 0 && !**d)
                            .count(),
                        s.spec.backends.len()
                    ),
                    None => format!("{dst} is a VIP, but no service of it has this protocol and port"),
                },
            );
            return;
        }
        let next = forward::decide(topo, vni, src, dst);
        steps.add(
            "route",
            match &next {
                Ok(Next::Local { port, routed, .. }) => format!(
                    "to vm {} on port {}{}",
                    topo.vm_on(*port).map_or("?", |v| v.name.as_str()),
                    port.0,
                    if *routed { " (routed)" } else { "" }
                ),
                Ok(Next::Remote { vtep, routed, .. }) => {
                    format!(
                        "to a remote endpoint behind VTEP {vtep}{}",
                        if *routed { " (routed)" } else { "" }
                    )
                }
                Ok(Next::GatewayVtep { vtep, .. }) => format!("to the gateway VTEP {vtep}"),
                Ok(Next::External) => "out to the external network (NAT)".into(),
                Err(e) => format!("no way: {}", e.name()),
            },
        );
        if !vm.groups.is_empty() {
            let port = if key.proto == 1 {
                key.dst_port >> 8
            } else {
                key.dst_port
            };
            let r = sh.policy.admits(
                &vm.groups,
                Direction::Egress,
                vni,
                key.dst_ip,
                key.proto,
                port,
            );
            steps.add(
                "security groups",
                match r {
                    Some(r) => format!(
                        "egress admitted by {}#{}",
                        sh.policy.group_name(r.group).unwrap_or("?"),
                        r.rule
                    ),
                    None => format!(
                        "egress denied: no rule of vm {}'s groups admits it",
                        vm.name
                    ),
                },
            );
        }
        if let Ok(Next::Local { port, .. }) = next {
            ingress_rules(steps, sh, topo, port, vni, key);
        }
    } else if let Some(Endpoint::Local { port, .. }) = topo.lookup(vni, dst) {
        ingress_rules(steps, sh, topo, port, vni, key);
    }
}

fn ingress_rules(
    steps: &mut Steps,
    sh: &Shared,
    topo: &Topology,
    port: PortId,
    vni: u32,
    key: &FlowKey,
) {
    let Some(d) = topo.vm_on(port) else { return };
    if d.groups.is_empty() {
        steps.add("security groups", format!("vm {} is not filtered", d.name));
        return;
    }
    let p = if key.proto == 1 {
        key.dst_port >> 8
    } else {
        key.dst_port
    };
    let r = sh
        .policy
        .admits(&d.groups, Direction::Ingress, vni, key.src_ip, key.proto, p);
    steps.add(
        "security groups",
        match r {
            Some(r) => format!(
                "ingress to vm {} admitted by {}#{}",
                d.name,
                sh.policy.group_name(r.group).unwrap_or("?"),
                r.rule
            ),
            None => format!("ingress to vm {} denied (default deny)", d.name),
        },
    );
}
