//! Coprocessor decisions, checked end to end: keys come from the fast
//! path's own classifier, and installed flows are run through the real
//! pipeline to see where frames end up.

use std::net::Ipv4Addr;

use fastpath::synth::{self, UdpFlow};
use fastpath::{BatchOut, Class, Desc, Pipeline, PipelineConfig, SliceMem};
use flowtable::{FlowHasher, FlowTable, Output, PortId, Vni};
use proptest::prelude::*;

use super::*;
use crate::topology::{LocalVm, Network, RemoteVm, Subnet, Uplink};

const UPLINK: PortId = PortId(0);
const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const UPLINK_MAC: [u8; 6] = [2, 0xaa, 0, 0, 0, 1];
const NEXT_HOP: [u8; 6] = [2, 0xaa, 0, 0, 0, 2];
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
const R_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x01];
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const R_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const E_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0e];
const E_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const R2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x02];
const R2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const VNI: u32 = 100;
const VNI2: u32 = 200;

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap()
}

fn network(v: u32) -> Network {
    Network {
        vni: vni(v),
        subnets: vec![
            Subnet {
                cidr: "10.0.0.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            Subnet {
                cidr: "10.0.1.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 1, 1),
            },
        ],
        gateway_mac: GW_MAC,
        dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
        lease_secs: 600,
        routes: vec![],
        gateway_vtep: None,
        snat: false,
    }
}

/// A (port 1) and B (port 2) in network 100, C (port 3) in network 200
/// with B's address, R behind the remote VTEP in network 100.
fn coprocessor() -> Coprocessor {
    let mut t = Topology::new(Some(Uplink {
        port: UPLINK,
        mac: UPLINK_MAC,
        local_vtep: LOCAL_VTEP,
        mtu: 1500,
        ttl: 64,
    }));
    t.add_network(network(VNI)).unwrap();
    t.add_network(network(VNI2)).unwrap();
    for (name, port, mac, ip, v) in [
        ("a", 1, A_MAC, A_IP, VNI),
        ("b", 2, B_MAC, B_IP, VNI),
        ("c", 3, [2, 0, 0, 0, 0, 0x0c], B_IP, VNI2),
        ("e", 4, E_MAC, E_IP, VNI),
    ] {
        t.add_vm(LocalVm {
            name: name.into(),
            port: PortId(port),
            mac,
            ips: vec![ip],
            vni: vni(v),
            hostname: (name == "a").then(|| "vm-a".to_string()),
            groups: vec![],
            floating_ip: None,
        })
        .unwrap();
    }
    t.add_remote(RemoteVm {
        ip: R_IP,
        mac: R_MAC,
        vni: vni(VNI),
        vtep: REMOTE_VTEP,
        groups: vec![],
    })
    .unwrap();
    t.add_remote(RemoteVm {
        ip: R2_IP,
        mac: R2_MAC,
        vni: vni(VNI),
        vtep: REMOTE_VTEP,
        groups: vec![],
    })
    .unwrap();
    t.set_neighbor(REMOTE_VTEP, NEXT_HOP);
    Coprocessor::new(t)
}

fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    synth::udp_frame(
        &UdpFlow {
            src_mac,
            dst_mac: GW_MAC,
            src_ip: src,
            dst_ip: dst,
            src_port: 4000,
            dst_port: 5000,
        },
        64,
    )
}

fn from_remote(inner: &[u8], vtep: Ipv4Addr, v: u32) -> Vec<u8> {
    synth::vxlan_frame(
        inner,
        &vxlan::TemplateSpec {
            src_mac: NEXT_HOP,
            dst_mac: UPLINK_MAC,
            local_vtep: vtep,
            remote_vtep: LOCAL_VTEP,
            vni: v,
            ttl: 64,
        },
        0,
    )
}

/// Run `frame` from `port` through a pipeline: classify (for the key),
/// punt to the coprocessor, install its flows, reinject, and return the
/// outcome and where the frame went (port and bytes).
fn through(c: &mut Coprocessor, port: PortId, frame: &[u8]) -> (Update, Option<(PortId, Vec<u8>)>) {
    through_at(c, port, frame, 0)
}

/// [`through`] at fast-path time `now` (ns).
fn through_at(
    c: &mut Coprocessor,
    port: PortId,
    frame: &[u8],
    now: u64,
) -> (Update, Option<(PortId, Vec<u8>)>) {
    let cfg = PipelineConfig {
        uplink: UPLINK,
        local_vtep: LOCAL_VTEP,
        udp_port: 4789,
        ports: 5,
    };
    let mut p = Pipeline::new(
        &cfg,
        FlowTable::with_hasher(64, FlowHasher::with_seed(3)).unwrap(),
    );
    let mut key = flowtable::FlowKey::default();
    let k = (p.classifier().classify(port, frame, &mut key).kind == fastpath::Kind::Flow)
        .then_some(key);
    let out = c.handle(&PuntMsg::of(port, PuntReason::Miss, now, frame, k));
    for (k, a) in &out.flows {
        p.table_mut().insert(*k, a, 0).unwrap();
    }
    if !out.reinject {
        return (out, None);
    }
    let mut mem = vec![0u8; 2048];
    mem[256..256 + frame.len()].copy_from_slice(frame);
    let mut b = BatchOut::new(5);
    let d = [Desc::new(256, u32::try_from(frame.len()).unwrap())];
    p.process(
        port,
        &mut SliceMem::new(&mut mem, 2048).unwrap(),
        &d,
        1,
        &mut b,
    );
    let sent = b.tx.iter().next().map(|(port, l)| {
        let d = l[0];
        let at = usize::try_from(d.addr).unwrap();
        (port, mem[at..at + d.len as usize].to_vec())
    });
    (out, sent)
}

#[test]
fn local_vm_to_local_vm() {
    let mut c = coprocessor();
    let f = udp(A_MAC, A_IP, B_IP);
    let (out, sent) = through(&mut c, PortId(1), &f);
    assert_eq!(out.drop, None);
    assert_eq!(out.flows.len(), 1);
    let (port, bytes) = sent.expect("forwarded");
    assert_eq!(port, PortId(2));
    assert_eq!(bytes[..6], B_MAC);
    assert_eq!(bytes[6..12], A_MAC);
    assert_eq!(bytes[12..], f[12..]);
}

#[test]
fn local_vm_to_remote_vm_is_encapsulated() {
    let mut c = coprocessor();
    let f = udp(A_MAC, A_IP, R_IP);
    let (out, sent) = through(&mut c, PortId(1), &f);
    assert_eq!(out.drop, None);
    let (port, wire) = sent.expect("forwarded");
    assert_eq!(port, UPLINK);
    assert_eq!(wire[..6], NEXT_HOP);
    assert_eq!(wire[6..12], UPLINK_MAC);
    let d = vxlan::decap(
        &wire,
        &vxlan::DecapConfig {
            local_vtep: u32::from(REMOTE_VTEP),
            udp_port: 4789,
        },
    )
    .unwrap();
    assert_eq!((d.vni, d.outer_src), (VNI, u32::from(LOCAL_VTEP)));
    assert_eq!(wire[d.inner()][..6], R_MAC);
    let a = &out.flows[0].1;
    assert_eq!(a.max_len, 1500 - 36);
    assert_eq!(a.output, Output::Port(UPLINK));
}

#[test]
fn unknown_next_hop_is_a_counted_drop() {
    let mut c = coprocessor();
    c.update_topology(|t| t.remove_neighbor(REMOTE_VTEP));
    let (out, sent) = through(&mut c, PortId(1), &udp(A_MAC, A_IP, R_IP));
    assert_eq!(out.drop, Some(DropCause::NoNeighbor));
    assert!(sent.is_none());
    assert_eq!(c.stats().drops[DropCause::NoNeighbor.index()], 1);
}

#[test]
fn remote_vm_to_local_vm_is_decapsulated_and_checked_against_its_vtep() {
    let mut c = coprocessor();
    let inner = udp(R_MAC, R_IP, A_IP);
    let (out, sent) = through(&mut c, UPLINK, &from_remote(&inner, REMOTE_VTEP, VNI));
    assert_eq!(out.drop, None);
    let (port, bytes) = sent.expect("delivered");
    assert_eq!(port, PortId(1));
    assert_eq!(bytes[..6], A_MAC);
    assert_eq!(bytes[6..12], R_MAC);
    assert_eq!(bytes[12..], inner[12..]);
    // The same inner packet from another VTEP is refused.
    let (out, sent) = through(
        &mut c,
        UPLINK,
        &from_remote(&inner, Ipv4Addr::new(192, 168, 0, 66), VNI),
    );
    assert_eq!(out.drop, Some(DropCause::VtepMismatch));
    assert!(sent.is_none());
    // An unknown VNI, and an unknown source.
    let (out, _) = through(&mut c, UPLINK, &from_remote(&inner, REMOTE_VTEP, 999));
    assert_eq!(out.drop, Some(DropCause::UnknownVni));
    let stranger = udp(R_MAC, Ipv4Addr::new(10, 0, 0, 99), A_IP);
    let (out, _) = through(&mut c, UPLINK, &from_remote(&stranger, REMOTE_VTEP, VNI));
    assert_eq!(out.drop, Some(DropCause::UnknownRemoteSource));
}

#[test]
fn spoofing_is_dropped_and_a_spoofed_flow_is_pinned_to_drop() {
    let mut c = coprocessor();
    let (out, sent) = through(
        &mut c,
        PortId(1),
        &udp(A_MAC, Ipv4Addr::new(10, 0, 0, 99), B_IP),
    );
    assert_eq!(out.drop, Some(DropCause::SpoofedIp));
    assert!(sent.is_none());
    assert_eq!(out.flows[0].1.output, Output::Drop);
    // Pinned for the address pair, not the 5-tuple: the ports do not
    // matter to the denial.
    let k = out.flows[0].0;
    assert_eq!(k.flags & flowtable::KeyFlags::L3, flowtable::KeyFlags::L3);
    assert_eq!((k.src_port, k.dst_port), (0, 0));
    let (out, _) = through(&mut c, PortId(1), &udp(B_MAC, A_IP, B_IP));
    assert_eq!(out.drop, Some(DropCause::SpoofedMac));
    assert!(out.flows.is_empty());
    let (out, _) = through(&mut c, PortId(3), &udp([2, 0, 0, 0, 0, 0x0c], A_IP, B_IP));
    assert_eq!(out.drop, Some(DropCause::SpoofedIp));
    let (out, _) = through(&mut c, PortId(9), &udp(A_MAC, A_IP, B_IP));
    assert_eq!(out.drop, Some(DropCause::UnknownPort));
}

#[test]
fn tenants_with_the_same_addresses_are_isolated() {
    let mut c = coprocessor();
    // C (network 200) has B's address; from C, A's address does not exist.
    let (out, sent) = through(&mut c, PortId(3), &udp([2, 0, 0, 0, 0, 0x0c], B_IP, A_IP));
    assert_eq!(out.drop, Some(DropCause::UnknownDestination));
    assert!(sent.is_none());
    // And A reaching "B_IP" gets B on network 100, never C.
    let (_, sent) = through(&mut c, PortId(1), &udp(A_MAC, A_IP, B_IP));
    assert_eq!(sent.unwrap().0, PortId(2));
}

/// The drop cause (if any) of a UDP packet from VM A to `dst`.
fn drop_from_a(c: &mut Coprocessor, dst: Ipv4Addr) -> Option<DropCause> {
    through(c, PortId(1), &udp(A_MAC, A_IP, dst)).0.drop
}

fn ttl_of(f: &[u8]) -> u8 {
    f[22]
}

#[test]
fn the_distributed_router_routes_between_subnets() {
    let mut c = coprocessor();
    // Local VM in another subnet: gateway MAC as source, TTL − 1.
    let f = udp(A_MAC, A_IP, E_IP);
    let (out, sent) = through(&mut c, PortId(1), &f);
    assert_eq!(out.drop, None);
    let (port, g) = sent.expect("routed");
    assert_eq!(port, PortId(4));
    assert_eq!(
        (g[..6].to_vec(), g[6..12].to_vec()),
        (E_MAC.to_vec(), GW_MAC.to_vec())
    );
    assert_eq!(ttl_of(&g), ttl_of(&f) - 1);
    assert_eq!(
        vxlan::checksum::fold(vxlan::checksum::sum(&g[14..34])),
        0xffff
    );
    // Remote VM in another subnet: routed here, then encapsulated.
    let (out, sent) = through(&mut c, PortId(1), &udp(A_MAC, A_IP, R2_IP));
    assert_eq!(out.drop, None);
    let (port, wire) = sent.expect("routed and encapsulated");
    assert_eq!(port, UPLINK);
    let inner = &wire[vxlan::OUTER_LEN..];
    assert_eq!(
        (inner[..6].to_vec(), inner[6..12].to_vec()),
        (R2_MAC.to_vec(), GW_MAC.to_vec())
    );
    assert_eq!(ttl_of(inner), 63);
    // Routed by the remote host, arriving by tunnel: from the gateway MAC.
    let (out, sent) = through(
        &mut c,
        UPLINK,
        &from_remote(&udp(GW_MAC, R2_IP, A_IP), REMOTE_VTEP, VNI),
    );
    assert_eq!(out.drop, None);
    let (port, g) = sent.expect("delivered");
    assert_eq!((port, g[6..12].to_vec()), (PortId(1), GW_MAC.to_vec()));
    // Outside every subnet of the network: no route; broadcast: refused.
    assert_eq!(
        drop_from_a(&mut c, Ipv4Addr::new(192, 168, 9, 9)),
        Some(DropCause::NoRoute)
    );
    assert_eq!(
        drop_from_a(&mut c, Ipv4Addr::new(10, 0, 1, 255)),
        Some(DropCause::BroadcastIp)
    );
    assert_eq!(
        drop_from_a(&mut c, Ipv4Addr::BROADCAST),
        Some(DropCause::BroadcastIp)
    );
}

fn echo_request(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = udp(src_mac, src, dst);
    f[23] = 1;
    f[24..26].fill(0);
    let c = vxlan::checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut f[34..];
    icmp[..8].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
    let c = vxlan::checksum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn gateways_answer_ping_and_flows_get_icmp_errors() {
    let mut c = coprocessor();
    for gw in [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 1, 1)] {
        let (out, sent) = through(&mut c, PortId(1), &echo_request(A_MAC, A_IP, gw));
        assert!(
            sent.is_none() && out.flows.is_empty(),
            "answered by the coprocessor, no flow"
        );
        let (port, r) = &out.tx[0];
        assert_eq!(*port, PortId(1));
        assert_eq!(
            (r[23], r[34], r[26..30].to_vec()),
            (1, 0, gw.octets().to_vec()),
            "echo reply from {gw}"
        );
    }
    // TTL 1 on a routed flow: the fast path punts it, the gateway of the
    // sender's subnet answers "time exceeded".
    let mut f = udp(A_MAC, A_IP, E_IP);
    through(&mut c, PortId(1), &f);
    f[22] = 1;
    let key = match fastpath::classify::classify_l2(&f, flowtable::Ingress::Port(PortId(1))) {
        Class::Flow(k) => k,
        other => panic!("{other:?}"),
    };
    let ask = |c: &mut Coprocessor, kind, frame: &[u8], port| {
        c.handle(&PuntMsg::of(port, kind, 0, frame, Some(key)))
    };
    let out = ask(&mut c, PuntReason::TtlExpired, &f, PortId(1));
    let r = &out.tx[0].1;
    assert_eq!(
        (r[34], r[26..30].to_vec(), r[30..34].to_vec()),
        (11, vec![10, 0, 0, 1], A_IP.octets().to_vec())
    );
    assert!(out.flows.is_empty(), "the flow stays as it is");
    // Too big for the tunnel with DF: "fragmentation needed", MTU 1450.
    let mut big = udp(A_MAC, A_IP, R2_IP);
    big[20] = 0x40;
    let out = ask(&mut c, PuntReason::TooBig, &big, PortId(1));
    let r = &out.tx[0].1;
    assert_eq!(
        (r[34], r[35], u16::from_be_bytes([r[40], r[41]])),
        (3, 4, 1450)
    );
    // Without DF: a counted drop. From the uplink: a counted drop.
    big[20] = 0;
    assert_eq!(
        ask(&mut c, PuntReason::TooBig, &big, PortId(1)).drop,
        Some(DropCause::TooBig)
    );
    assert_eq!(
        ask(&mut c, PuntReason::TtlExpired, &f, UPLINK).drop,
        Some(DropCause::TtlExpired)
    );
    assert_eq!(c.stats().icmp_replies, 4);
    assert_eq!(c.shared().write().counters().icmp_replies, 4);
}

fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn answered_mac(out: &Update) -> Option<[u8; 6]> {
    let (_, f) = out.tx.first()?;
    let arp = &f[14..];
    Some(arp[8..14].try_into().unwrap())
}

#[test]
fn arp_proxy_answers_for_known_addresses_only() {
    let mut c = coprocessor();
    let ask = |c: &mut Coprocessor, target| {
        c.handle(&PuntMsg::of(
            PortId(1),
            PuntReason::Miss,
            0,
            &arp_request(A_MAC, A_IP, target),
            None,
        ))
    };
    assert_eq!(answered_mac(&ask(&mut c, B_IP)), Some(B_MAC));
    assert_eq!(answered_mac(&ask(&mut c, R_IP)), Some(R_MAC));
    assert_eq!(
        answered_mac(&ask(&mut c, Ipv4Addr::new(10, 0, 0, 1))),
        Some(GW_MAC)
    );
    let out = ask(&mut c, Ipv4Addr::new(10, 0, 0, 77));
    assert_eq!(
        (out.tx.len(), out.drop),
        (0, Some(DropCause::ArpUnknownTarget))
    );
    let out = ask(&mut c, A_IP);
    assert_eq!((out.tx.len(), out.drop), (0, Some(DropCause::ArpForSelf)));
    // The reply goes back to the asking port, addressed to the asker.
    let out = ask(&mut c, B_IP);
    assert_eq!(out.tx[0].0, PortId(1));
    assert_eq!(out.tx[0].1[..6], A_MAC);
    // A spoofed sender gets nothing.
    let out = c.handle(&PuntMsg::of(
        PortId(1),
        PuntReason::Miss,
        0,
        &arp_request(A_MAC, Ipv4Addr::new(10, 0, 0, 50), B_IP),
        None,
    ));
    assert_eq!((out.tx.len(), out.drop), (0, Some(DropCause::SpoofedIp)));
    // An address probe (sender 0.0.0.0) is allowed and answered.
    let out = c.handle(&PuntMsg::of(
        PortId(1),
        PuntReason::Miss,
        0,
        &arp_request(A_MAC, Ipv4Addr::UNSPECIFIED, B_IP),
        None,
    ));
    assert_eq!(answered_mac(&out), Some(B_MAC));
    assert_eq!(c.stats().arp_replies, 5);
    // In the totals all threads share too (what the metrics export).
    assert_eq!(c.shared().write().counters().arp_replies, 5);
}

#[test]
fn arp_from_a_remote_host_is_answered_through_the_tunnel() {
    let mut c = coprocessor();
    let req = from_remote(&arp_request(R_MAC, R_IP, A_IP), REMOTE_VTEP, VNI);
    let out = c.handle(&PuntMsg::of(UPLINK, PuntReason::Miss, 0, &req, None));
    assert_eq!(out.drop, None);
    let (port, wire) = &out.tx[0];
    assert_eq!(*port, UPLINK);
    assert_eq!(wire[..6], NEXT_HOP, "back through the hop it came from");
    let d = vxlan::decap(
        wire,
        &vxlan::DecapConfig {
            local_vtep: u32::from(REMOTE_VTEP),
            udp_port: 4789,
        },
    )
    .unwrap();
    assert_eq!(d.vni, VNI);
    let inner = &wire[d.inner()];
    assert_eq!(inner[..6], R_MAC);
    assert_eq!(inner[14 + 8..14 + 14], A_MAC);
    // The remote side is not told about its own remote endpoints.
    let req = from_remote(&arp_request(R_MAC, R_IP, R_IP), REMOTE_VTEP, VNI);
    let out = c.handle(&PuntMsg::of(UPLINK, PuntReason::Miss, 0, &req, None));
    assert_eq!(out.drop, Some(DropCause::ArpUnknownTarget));
}

#[test]
fn the_key_must_match_the_ingress() {
    let mut c = coprocessor();
    let f = udp(A_MAC, A_IP, B_IP);
    let Class::Flow(k) = fastpath::classify::classify_l2(&f, flowtable::Ingress::Port(PortId(2)))
    else {
        panic!("not a flow");
    };
    let out = c.handle(&PuntMsg::of(PortId(1), PuntReason::Miss, 0, &f, Some(k)));
    assert_eq!(out.drop, Some(DropCause::Malformed));
}

proptest! {
    #[test]
    fn arbitrary_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), port in 0u16..5, keyed in any::<bool>()) {
        let mut c = coprocessor();
        let key = keyed.then(|| flowtable::FlowKey::new(flowtable::Ingress::Port(PortId(port)), 17, u32::from(A_IP), u32::from(B_IP), 1, 2));
        let out = c.handle(&PuntMsg::of(PortId(port), PuntReason::Miss, 0, &bytes, key));
        prop_assert!(out.drop.is_some() || !out.flows.is_empty() || !out.tx.is_empty());
    }
}

/// Send a DHCP message from port `port` as the fast path would punt it.
fn dhcp(c: &mut Coprocessor, port: u16, frame: &[u8], now: u64) -> Update {
    let (out, sent) = through_at(c, PortId(port), frame, now);
    assert!(sent.is_none(), "DHCP must not be forwarded");
    assert!(out.flows.is_empty(), "DHCP must not install flows");
    out
}

fn reply_of(out: &Update) -> dhcp::ParsedReply {
    assert_eq!(out.tx.len(), 1, "{out:?}");
    dhcp::parse_reply(&out.tx[0].1).expect("a DHCP reply")
}

fn opt(opts: &[(u8, Vec<u8>)], kind: u8) -> Option<Vec<u8>> {
    opts.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.clone())
}

#[test]
fn dhcp_hands_out_the_binding_with_router_dns_mtu_hostname() {
    use smoltcp::wire::DhcpMessageType as M;
    let mut c = coprocessor();
    let any = Ipv4Addr::UNSPECIFIED;
    let out = dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Discover, 7, any, None, None),
        0,
    );
    let (kind, yiaddr, opts) = reply_of(&out);
    assert_eq!((kind, yiaddr), (M::Offer, A_IP));
    assert_eq!(opt(&opts, 1), Some(vec![255, 255, 255, 0]), "mask");
    assert_eq!(opt(&opts, 3), Some(vec![10, 0, 0, 1]), "router");
    assert_eq!(opt(&opts, 6), Some(vec![10, 0, 0, 53]), "dns");
    assert_eq!(
        opt(&opts, 26),
        Some(1450u16.to_be_bytes().to_vec()),
        "MTU leaves room for VXLAN"
    );
    assert_eq!(opt(&opts, 12), Some(b"vm-a".to_vec()), "hostname");
    assert_eq!(opt(&opts, 51), Some(600u32.to_be_bytes().to_vec()), "lease");
    assert_eq!(opt(&opts, 54), Some(vec![10, 0, 0, 1]), "server id");
    // Broadcast from the gateway, with valid IPv4 and UDP checksums.
    let f = &out.tx[0].1;
    assert_eq!(f[..6], [0xff; 6]);
    assert_eq!(f[6..12], GW_MAC);
    assert_eq!(
        vxlan::checksum::fold(vxlan::checksum::sum(&f[14..34])),
        0xffff
    );
    assert_eq!(out.tx[0].0, PortId(1));
    assert!(lease_of(&c, &A_MAC).is_none(), "an offer is not a lease");

    let gw = Some(Ipv4Addr::new(10, 0, 0, 1));
    let out = dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Request, 7, any, Some(A_IP), gw),
        5,
    );
    assert_eq!(reply_of(&out).0, M::Ack);
    let lease = lease_of(&c, &A_MAC).expect("lease");
    assert_eq!((lease.ip, lease.expires), (A_IP, 5 + 600_000_000_000));

    // Renewal: unicast from a configured client, answered unicast.
    let out = dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Request, 8, A_IP, None, None),
        10,
    );
    assert_eq!(reply_of(&out).0, M::Ack);
    assert_eq!(out.tx[0].1[..6], A_MAC);
    assert_eq!(lease_of(&c, &A_MAC).unwrap().expires, 10 + 600_000_000_000);

    // Asking for someone else's address: NAK, lease unchanged.
    let out = dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Request, 9, any, Some(B_IP), gw),
        11,
    );
    assert_eq!(reply_of(&out).0, M::Nak);
    // A REQUEST for another server's offer: silence.
    let other = Some(Ipv4Addr::new(10, 0, 0, 99));
    assert!(dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Request, 9, any, Some(A_IP), other),
        11
    )
    .tx
    .is_empty());
    // INFORM: configuration without a lease.
    let out = dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Inform, 10, A_IP, None, None),
        12,
    );
    let (kind, yiaddr, opts) = reply_of(&out);
    assert_eq!((kind, yiaddr, opt(&opts, 51)), (M::Ack, any, None));
    // RELEASE: the lease is gone.
    assert!(dhcp(
        &mut c,
        1,
        &dhcp::client_message(A_MAC, M::Release, 11, A_IP, None, gw),
        13
    )
    .tx
    .is_empty());
    assert!(lease_of(&c, &A_MAC).is_none());
    assert_eq!(c.stats().dhcp_replies, 5);
    assert_eq!(c.shared().write().counters().dhcp_replies, 5);
}

#[test]
fn dhcp_answers_only_the_bound_vm() {
    use smoltcp::wire::DhcpMessageType as M;
    let mut c = coprocessor();
    let any = Ipv4Addr::UNSPECIFIED;
    // A port with no VM: no offer.
    let out = dhcp(
        &mut c,
        9,
        &dhcp::client_message([2, 0, 0, 0, 0, 9], M::Discover, 1, any, None, None),
        0,
    );
    assert_eq!((out.tx.len(), out.drop), (0, Some(DropCause::UnknownPort)));
    // B's MAC in the DHCP payload but A's port and Ethernet source.
    let mut f = dhcp::client_message(B_MAC, M::Discover, 1, any, None, None);
    f[6..12].copy_from_slice(&A_MAC);
    let out = dhcp(&mut c, 1, &f, 0);
    assert_eq!((out.tx.len(), out.drop), (0, Some(DropCause::SpoofedMac)));
    // Truncated DHCP payload: counted drop.
    let f = dhcp::client_message(A_MAC, M::Discover, 1, any, None, None);
    let mut short = f[..80].to_vec();
    short[16..18].copy_from_slice(&66u16.to_be_bytes());
    short[38..40].copy_from_slice(&46u16.to_be_bytes());
    let out = c.handle(&PuntMsg::of(
        PortId(1),
        PuntReason::Miss,
        0,
        &short,
        Some(flowtable::FlowKey::new(
            flowtable::Ingress::Port(PortId(1)),
            17,
            0,
            u32::MAX,
            68,
            67,
        )),
    ));
    assert_eq!((out.tx.len(), out.drop), (0, Some(DropCause::Malformed)));
}

#[test]
fn the_first_packet_of_a_flow_gets_its_icmp_answer_too() {
    let mut c = coprocessor();
    // TTL 1 on a new routed flow: flow installed, time exceeded answered.
    let mut f = udp(A_MAC, A_IP, E_IP);
    f[22] = 1;
    let (out, sent) = through(&mut c, PortId(1), &f);
    assert!(sent.is_none() && !out.reinject);
    assert_eq!(out.flows.len(), 1);
    assert_eq!(out.tx[0].1[34], 11);
    // Too big with DF on a new flow to a remote VM: frag needed.
    let mut big = synth::udp_frame(
        &UdpFlow {
            src_mac: A_MAC,
            dst_mac: GW_MAC,
            src_ip: A_IP,
            dst_ip: R_IP,
            src_port: 1,
            dst_port: 2,
        },
        1514,
    );
    big[20] = 0x40;
    let (out, sent) = through(&mut c, PortId(1), &big);
    assert!(sent.is_none());
    assert_eq!((out.tx[0].1[34], out.tx[0].1[35]), (3, 4));
}

#[test]
fn static_routes_and_the_gateway_vtep() {
    use crate::topology::{Route, Via};
    let c = coprocessor();
    // Network 200 gets routes: 172.16/12 via the appliance VM C itself
    // (10.0.0.11), 172.16.5/24 (longer) and 0/0 via the gateway VTEP.
    let gw_vtep = Ipv4Addr::new(192, 168, 0, 9);
    let mut t = Topology::new(c.topology().uplink.clone());
    for n in c.topology().networks() {
        let mut n = n.clone();
        if n.vni.get() == VNI2 {
            n.gateway_vtep = Some(gw_vtep);
            n.routes = vec![
                Route {
                    cidr: "172.16.0.0/12".parse().unwrap(),
                    via: Via::Vm(B_IP),
                },
                Route {
                    cidr: "172.16.5.0/24".parse().unwrap(),
                    via: Via::GatewayVtep,
                },
                Route {
                    cidr: "0.0.0.0/0".parse().unwrap(),
                    via: Via::GatewayVtep,
                },
            ];
        }
        t.add_network(n).unwrap();
    }
    for vm in c.topology().vms() {
        t.add_vm(vm.clone()).unwrap();
    }
    t.set_neighbor(gw_vtep, [2, 0xaa, 0, 0, 0, 9]);
    t.set_neighbor(REMOTE_VTEP, NEXT_HOP);
    let mut c = Coprocessor::new(t);
    let c_mac = [2, 0, 0, 0, 0, 0x0c];
    // C (10.0.0.11 in network 200) is the sender.
    let from_c = |dst: Ipv4Addr| udp(c_mac, B_IP, dst);
    // Via a VM: routed to the appliance (C itself here: hairpin to port 3).
    let (out, sent) = through(&mut c, PortId(3), &from_c(Ipv4Addr::new(172, 17, 0, 1)));
    assert_eq!(out.drop, None, "{out:?}");
    let (port, f) = sent.expect("routed to the appliance");
    assert_eq!(
        (port, f[6..12].to_vec(), f[22]),
        (PortId(3), GW_MAC.to_vec(), 63)
    );
    // Longer prefix wins: to the gateway VTEP, addressed to the router MAC.
    let (out, sent) = through(&mut c, PortId(3), &from_c(Ipv4Addr::new(172, 16, 5, 1)));
    assert_eq!(out.drop, None);
    let (port, wire) = sent.expect("to the gateway VTEP");
    assert_eq!(port, UPLINK);
    assert_eq!(wire[30..34], gw_vtep.octets(), "outer destination");
    assert_eq!(wire[vxlan::OUTER_LEN..vxlan::OUTER_LEN + 6], GW_MAC);
    // Default route.
    let (_, sent) = through(&mut c, PortId(3), &from_c(Ipv4Addr::new(8, 8, 8, 8)));
    assert_eq!(sent.expect("default route").1[30..34], gw_vtep.octets());
    // An address of the subnet this host does not know: the gateway VTEP.
    let (_, sent) = through(&mut c, PortId(3), &from_c(Ipv4Addr::new(10, 0, 0, 77)));
    assert_eq!(
        sent.expect("unknown in-subnet address").1[30..34],
        gw_vtep.octets()
    );
    // The replies come back through the gateway VTEP from addresses this
    // host does not know: delivered (routed: from the gateway MAC) to C,
    // which is in no security group.
    let reply = udp([2, 0xbb, 0, 0, 0, 1], Ipv4Addr::new(8, 8, 8, 8), B_IP);
    let (out, sent) = through(&mut c, UPLINK, &from_remote(&reply, gw_vtep, VNI2));
    assert_eq!(out.drop, None, "{out:?}");
    let (port, f) = sent.expect("a reply through the gateway VTEP");
    assert_eq!((port, f[6..12].to_vec()), (PortId(3), GW_MAC.to_vec()));
    // A source this host reaches directly (promoted here, not on its
    // host) may still come through the gateway VTEP: delivered.
    let mut t = Topology::clone(&c.topology());
    t.add_remote(RemoteVm {
        ip: Ipv4Addr::new(10, 0, 0, 78),
        mac: [2, 0xbb, 0, 0, 0, 2],
        vni: vni(VNI2),
        vtep: REMOTE_VTEP,
        groups: vec![],
    })
    .unwrap();
    let mut c = Coprocessor::new(t);
    let promoted = udp([2, 0xbb, 0, 0, 0, 2], Ipv4Addr::new(10, 0, 0, 78), B_IP);
    let (out, sent) = through(&mut c, UPLINK, &from_remote(&promoted, gw_vtep, VNI2));
    assert_eq!(out.drop, None, "{out:?}");
    assert_eq!(sent.expect("relayed by the gateway").0, PortId(3));
    // From any other VTEP an unknown source stays refused.
    let (out, sent) = through(&mut c, UPLINK, &from_remote(&reply, REMOTE_VTEP, VNI2));
    assert_eq!(
        (out.drop, sent.is_none()),
        (Some(DropCause::UnknownRemoteSource), true)
    );
    // C asks for that address: the gateway's MAC (the gateway VTEP routes
    // it on); outside the network's subnets, nothing.
    let ask = |c: &mut Coprocessor, target| {
        c.handle(&PuntMsg::of(
            PortId(3),
            PuntReason::Miss,
            0,
            &arp_request(c_mac, B_IP, target),
            None,
        ))
    };
    assert_eq!(
        answered_mac(&ask(&mut c, Ipv4Addr::new(10, 0, 0, 77))),
        Some(GW_MAC)
    );
    assert_eq!(
        ask(&mut c, Ipv4Addr::new(10, 9, 0, 77)).drop,
        Some(DropCause::ArpUnknownTarget)
    );
    // Network 100 has neither: unknown stays a counted drop.
    assert_eq!(
        drop_from_a(&mut c, Ipv4Addr::new(10, 0, 0, 77)),
        Some(DropCause::UnknownDestination)
    );
    assert_eq!(
        drop_from_a(&mut c, Ipv4Addr::new(8, 8, 8, 8)),
        Some(DropCause::NoRoute)
    );
}

#[path = "tests/stateful.rs"]
mod stateful;

/// The lease of `mac`, if it has one.
fn lease_of(c: &Coprocessor, mac: &flowtable::Mac) -> Option<dhcp::Lease> {
    let sh = c.shared().write();
    let leases = sh.leases.lock().unwrap();
    leases.get(mac).cloned()
}
