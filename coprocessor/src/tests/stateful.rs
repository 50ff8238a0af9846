//! Security groups, connection tracking and NAT, run end to end: frames
//! go through a real pipeline whose misses and connection events are
//! handed to the coprocessor, whose answers are applied the way the
//! fast-path thread applies them.

use std::net::Ipv4Addr;
use std::sync::Arc;

use fastpath::synth::{self, UdpFlow};
use fastpath::{BatchOut, Desc, Pipeline, PipelineConfig, PuntReason, SliceMem};
use flowtable::{FlowHasher, FlowKey, FlowTable, Ingress, PortId};

use super::{vni, GW_MAC, LOCAL_VTEP, NEXT_HOP, REMOTE_VTEP, UPLINK, UPLINK_MAC};
use crate::acl::{Direction, Peer, Policy, Rule, SecurityGroup};
use crate::conntrack::{ConnState, Limits, TcpState, Timeouts};
use crate::topology::{External, LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use crate::{Coprocessor, DropCause, PuntMsg, Shared, Update};

const A: PortId = PortId(1);
const B: PortId = PortId(2);
const C: PortId = PortId(3);
const EXT: PortId = PortId(4);
const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
const C_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
const EXT_MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 0xfe];
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const C_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 12);
const R_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const R_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x01];
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const FIP_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
const ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VNI: u32 = 100;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

fn rule(direction: Direction, proto: Option<u8>, ports: (u16, u16)) -> Rule {
    Rule {
        direction,
        proto,
        ports,
        peer: Peer::Cidr("0.0.0.0/0".parse().unwrap()),
    }
}

fn web_rules() -> Vec<Rule> {
    vec![
        rule(Direction::Ingress, Some(6), (80, 80)),
        rule(Direction::Egress, None, (0, u16::MAX)),
    ]
}

/// Groups: web (ingress TCP 80, all egress), client (all egress), db
/// (ingress anything from members of client).
fn policy() -> Policy {
    Policy::new(vec![
        SecurityGroup {
            name: "web".into(),
            rules: web_rules(),
        },
        SecurityGroup {
            name: "client".into(),
            rules: vec![rule(Direction::Egress, None, (0, u16::MAX))],
        },
        SecurityGroup {
            name: "db".into(),
            rules: vec![Rule {
                direction: Direction::Ingress,
                proto: None,
                ports: (0, u16::MAX),
                peer: Peer::Group("client".into()),
            }],
        },
    ])
    .unwrap()
}

/// A (client) and B (web, floating IP) in 10.0.0.0/24, C (not filtered)
/// in 10.0.1.0/24, R remote (client member); an external network on
/// port 4 with one SNAT address.
fn switch(limits: Limits, nat_ports: (u16, u16), per_vm_ports: u32) -> Net {
    let mut t = Topology::new(Some(Uplink {
        port: UPLINK,
        mac: UPLINK_MAC,
        local_vtep: LOCAL_VTEP,
        mtu: 1500,
        ttl: 64,
    }));
    t.external = Some(External {
        port: EXT,
        mac: EXT_MAC,
        cidr: "203.0.113.0/24".parse().unwrap(),
        gateway: Some(ROUTER),
        snat: vec![SNAT_IP],
        ports: nat_ports,
        per_vm_ports,
    });
    t.add_network(Network {
        vni: vni(VNI),
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
        dns: vec![],
        lease_secs: 600,
        routes: vec![],
        gateway_vtep: None,
        snat: true,
    })
    .unwrap();
    let mut pol = policy();
    for (name, port, mac, ip, groups, fip) in [
        ("a", A, A_MAC, A_IP, vec![1u16], None),
        ("b", B, B_MAC, B_IP, vec![0u16], Some(FIP_B)),
        ("c", C, C_MAC, C_IP, vec![], None),
    ] {
        for g in &groups {
            pol.add_member(*g, VNI, ip);
        }
        t.add_vm(LocalVm {
            name: name.into(),
            port,
            mac,
            ips: vec![ip],
            vni: vni(VNI),
            hostname: None,
            groups,
            floating_ip: fip,
        })
        .unwrap();
    }
    pol.add_member(1, VNI, R_IP);
    t.add_remote(RemoteVm {
        ip: R_IP,
        mac: R_MAC,
        vni: vni(VNI),
        vtep: REMOTE_VTEP,
        groups: vec![1],
    })
    .unwrap();
    t.set_neighbor(REMOTE_VTEP, NEXT_HOP);
    let shared = Shared::new(t, pol, Timeouts::default(), limits);
    let cp = Coprocessor::with_shared(Arc::new(crate::SharedLock::new(shared)));
    let cfg = PipelineConfig {
        uplink: UPLINK,
        local_vtep: LOCAL_VTEP,
        udp_port: 4789,
        ports: 6,
    };
    let p = Pipeline::new(
        &cfg,
        FlowTable::with_hasher(4096, FlowHasher::with_seed(5)).unwrap(),
    );
    Net {
        cp,
        p,
        now: 1_000,
        outcomes: Vec::new(),
        punts: 0,
    }
}

fn default_switch() -> Net {
    switch(Limits::default(), (1024, 65535), 1000)
}

/// Where a frame went through the pipeline: sent, or punted (why, key).
type RunResult = (
    Option<(PortId, Vec<u8>)>,
    Option<PuntReason>,
    Option<flowtable::FlowKey>,
);

/// The pipeline and the coprocessor, wired as the fast-path thread wires
/// them.
struct Net {
    cp: Coprocessor,
    p: Pipeline,
    now: u64,
    /// Every outcome of the last `send`.
    outcomes: Vec<Update>,
    /// Punts of the last `send`.
    punts: usize,
}

/// Where a frame went.
#[derive(Debug, PartialEq, Eq)]
enum Went {
    To(PortId, Vec<u8>),
    Dropped(Option<DropCause>),
}

impl Net {
    fn run(&mut self, port: PortId, frame: &[u8], reinjecting: bool) -> RunResult {
        let mut mem = vec![0u8; 4096];
        mem[256..256 + frame.len()].copy_from_slice(frame);
        let mut b = BatchOut::new(6);
        let d = [Desc::new(256, u32::try_from(frame.len()).unwrap())];
        self.p.set_reinjecting(reinjecting);
        self.p.process(
            port,
            &mut SliceMem::new(&mut mem, 4096).unwrap(),
            &d,
            self.now,
            &mut b,
        );
        self.p.set_reinjecting(false);
        if let Some((port, l)) = b.tx.iter().next() {
            let d = l[0];
            let at = usize::try_from(d.addr).unwrap();
            return (
                Some((port, mem[at..at + d.len as usize].to_vec())),
                None,
                None,
            );
        }
        match b.punt.first() {
            Some(item) => (None, Some(item.reason), item.key),
            None => (None, None, None),
        }
    }

    fn apply(&mut self, out: &Update) {
        let t = self.p.table_mut();
        for k in &out.remove {
            t.remove(k);
        }
        if let Some(inv) = &out.invalidate {
            t.retain(|k, a| !inv.hits(k, a));
        }
        for (k, a) in &out.flows {
            t.insert(*k, a, self.now).unwrap();
        }
    }

    /// Send `frame` in on `port`; follow punts and reinjection.
    /// SNAT ports in use.
    fn nat_in_use(&self) -> u64 {
        let sh = self.cp.shared().write();
        let nat = sh.nat.lock().unwrap();
        nat.as_ref().map_or(0, |p| p.in_use())
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> Went {
        self.now += 1_000_000;
        self.outcomes.clear();
        self.punts = 0;
        let (sent, punt, key) = self.run(port, frame, false);
        if let Some((p, f)) = sent {
            return Went::To(p, f);
        }
        let Some(reason) = punt else {
            return Went::Dropped(None);
        };
        self.punts += 1;
        let out = self
            .cp
            .handle(&PuntMsg::of(port, reason, self.now, frame, key));
        self.apply(&out);
        let reinject = out.reinject;
        let drop = out.drop;
        let made = out.tx.first().cloned();
        self.outcomes.push(out);
        if reinject {
            let (sent, punt, _) = self.run(port, frame, true);
            assert!(
                punt.is_none(),
                "a reinjected frame was punted again: {punt:?}"
            );
            if let Some((p, f)) = sent {
                return Went::To(p, f);
            }
        }
        if let Some((p, f)) = made {
            return Went::To(p, f);
        }
        Went::Dropped(drop)
    }

    fn ct_len(&self) -> usize {
        self.cp.shared().write().ct.len()
    }

    fn state_of(&self, key: &FlowKey) -> Option<ConnState> {
        let mut sh = self.cp.shared().write();
        let (id, _) = sh.ct.lookup(key)?;
        sh.ct.get(id).map(|c| c.state)
    }
}

fn flow(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> UdpFlow {
    UdpFlow {
        src_mac,
        dst_mac: GW_MAC,
        src_ip: src,
        dst_ip: dst,
        src_port: sport,
        dst_port: dport,
    }
}

fn tcp(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    synth::tcp_frame(&flow(src_mac, src, dst, sport, dport), flags, b"data")
}

fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = synth::udp_frame(&flow(src_mac, src, dst, sport, dport), 80);
    let c = synth::l4_checksum(&f);
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

fn key_of(port: PortId, f: &[u8]) -> FlowKey {
    let mut k = FlowKey::default();
    let c = fastpath::Classifier {
        uplink: UPLINK,
        decap: vxlan::DecapConfig {
            local_vtep: u32::from(LOCAL_VTEP),
            udp_port: 4789,
        },
    };
    c.classify(port, f, &mut k);
    k
}

fn ip_at(f: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3])
}

fn port_at(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// Checksums of a delivered frame are right.
fn checksums_ok(f: &[u8]) {
    let ip: &[u8; 20] = f[14..34].try_into().unwrap();
    assert!(vxlan::checksum::ipv4_header_ok(ip), "IPv4 checksum");
    let at = if f[23] == 6 { 50 } else { 40 };
    assert_eq!(port_at(f, at), synth::l4_checksum(f), "L4 checksum");
}

fn delivered(w: Went, port: PortId) -> Vec<u8> {
    match w {
        Went::To(p, f) if p == port => f,
        other => panic!("expected delivery to port {}, got {other:?}", port.0),
    }
}

#[test]
fn an_allowed_connection_passes_both_ways_and_its_replies_need_no_rule() {
    let mut n = default_switch();
    // A (client) opens TCP to B's port 80 (web admits it).
    let syn = tcp(A_MAC, A_IP, B_IP, 40000, 80, SYN);
    let f = delivered(n.send(A, &syn), B);
    assert_eq!(f[..6], B_MAC);
    assert_eq!(n.ct_len(), 1);
    let k = key_of(A, &syn);
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::SynSent)));
    // SYN-ACK: the reverse flow is in place; the segment is punted only
    // so the connection's state follows it, then forwarded.
    let synack = tcp(B_MAC, B_IP, A_IP, 80, 40000, SYN | ACK);
    delivered(n.send(B, &synack), A);
    assert_eq!(n.punts, 1);
    assert_eq!(n.outcomes[0].flows.len(), 0, "no new flow for a reply");
    assert!(matches!(
        n.state_of(&k),
        Some(ConnState::Tcp(TcpState::SynRecv { .. }))
    ));
    // Until A acknowledges, A's packets go through the coprocessor: its
    // flow leaves the fast path.
    assert_eq!(n.outcomes[0].remove, vec![k]);
    delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK)), B);
    assert_eq!(n.punts, 1, "the handshake's ACK is seen");
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::Established)));
    // Data both ways: flow hits, no punt.
    delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK)), B);
    assert_eq!(n.punts, 0);
    delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, ACK)), A);
    assert_eq!(n.punts, 0);
    // Close: FIN each way, each punted once and delivered.
    delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, FIN | ACK)), B);
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::Closing)));
    delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, FIN | ACK)), A);
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::Closed)));
}

#[test]
fn denied_ports_and_default_ingress_deny_are_counted_drops() {
    let mut n = default_switch();
    // B is web: only port 80 comes in.
    let ssh = tcp(A_MAC, A_IP, B_IP, 40001, 22, SYN);
    assert_eq!(n.send(A, &ssh), Went::Dropped(Some(DropCause::AclDenied)));
    // The denial is a drop flow: the retransmission does not punt.
    assert_eq!(n.send(A, &ssh), Went::Dropped(None));
    assert_eq!(n.punts, 0);
    // An unfiltered VM (C, another subnet) gets the same answer from B.
    let from_c = tcp(C_MAC, C_IP, B_IP, 40002, 22, SYN);
    assert_eq!(
        n.send(C, &from_c),
        Went::Dropped(Some(DropCause::AclDenied))
    );
    delivered(n.send(C, &tcp(C_MAC, C_IP, B_IP, 40003, 80, SYN)), B);
    // Traffic into an unfiltered VM from an unfiltered VM stays stateless.
    let before = n.ct_len();
    let d = udp(C_MAC, C_IP, A_IP, 5000, 6000);
    // A is client: no ingress rule, so this is denied; C itself is free.
    assert_eq!(n.send(C, &d), Went::Dropped(Some(DropCause::AclDenied)));
    assert_eq!(n.ct_len(), before);
    let sh = n.cp.shared().write();
    assert_eq!(sh.vm_drops.lock().unwrap()[&B].acl_denied, 2);
    assert_eq!(sh.vm_drops.lock().unwrap()[&A].acl_denied, 1);
}

#[test]
fn remote_group_membership_admits_and_replies_go_back_through_the_tunnel() {
    let mut n = default_switch();
    // Make B a db (ingress from client members) at run time.
    n.cp.shared()
        .write()
        .policy
        .set_rules(
            "web",
            vec![Rule {
                direction: Direction::Ingress,
                proto: None,
                ports: (0, u16::MAX),
                peer: Peer::Group("client".into()),
            }],
        )
        .unwrap();
    let inner = udp(R_MAC, R_IP, B_IP, 7000, 5432);
    let outer = super::from_remote(&inner, REMOTE_VTEP, VNI);
    let f = delivered(n.send(UPLINK, &outer), B);
    assert_eq!(f[14..], inner[14..]);
    // B's answer is encapsulated back to R's VTEP without a punt.
    let back = delivered(n.send(B, &udp(B_MAC, B_IP, R_IP, 5432, 7000)), UPLINK);
    assert_eq!(n.punts, 0);
    assert_eq!(ip_at(&back, 30), REMOTE_VTEP);
    // C is no member: denied.
    let c_inner = udp(C_MAC, C_IP, B_IP, 7001, 5432);
    assert_eq!(
        n.send(C, &c_inner),
        Went::Dropped(Some(DropCause::AclDenied))
    );
}

#[test]
fn a_forged_rst_from_another_vtep_does_not_close_a_connection() {
    let mut n = default_switch();
    // R (behind REMOTE_VTEP) connects to B (web: TCP 80 in), B answers:
    // established.
    let syn = tcp(R_MAC, R_IP, B_IP, 41000, 80, SYN);
    let key = key_of(UPLINK, &super::from_remote(&syn, REMOTE_VTEP, VNI));
    delivered(
        n.send(UPLINK, &super::from_remote(&syn, REMOTE_VTEP, VNI)),
        B,
    );
    delivered(
        n.send(B, &tcp(B_MAC, B_IP, R_IP, 80, 41000, SYN | ACK)),
        UPLINK,
    );
    let ack = tcp(R_MAC, R_IP, B_IP, 41000, 80, ACK);
    delivered(
        n.send(UPLINK, &super::from_remote(&ack, REMOTE_VTEP, VNI)),
        B,
    );
    let established = Some(ConnState::Tcp(TcpState::Established));
    assert_eq!(n.state_of(&key), established);
    // The flows idle out of the fast path; the connection stays tracked.
    n.p.table_mut().retain(|_, _| false);
    // Anyone on the underlay sends R's RST with the right VNI and tuple.
    let rst = tcp(R_MAC, R_IP, B_IP, 41000, 80, RST | ACK);
    let forged = super::from_remote(&rst, Ipv4Addr::new(192, 168, 0, 66), VNI);
    assert_eq!(
        n.send(UPLINK, &forged),
        Went::Dropped(Some(DropCause::VtepMismatch))
    );
    assert_eq!(
        n.state_of(&key),
        established,
        "the forged RST changed nothing"
    );
    // R's own segments still pass.
    delivered(
        n.send(UPLINK, &super::from_remote(&ack, REMOTE_VTEP, VNI)),
        B,
    );
}

#[test]
fn tcp_without_a_connection_is_invalid() {
    let mut n = default_switch();
    let ack = tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK);
    assert_eq!(n.send(A, &ack), Went::Dropped(Some(DropCause::CtInvalid)));
    assert_eq!(n.ct_len(), 0);
}

#[test]
fn a_rule_removed_at_run_time_cuts_existing_connections() {
    let mut n = default_switch();
    let syn = tcp(A_MAC, A_IP, B_IP, 40000, 80, SYN);
    delivered(n.send(A, &syn), B);
    delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, SYN | ACK)), A);
    delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK)), B);
    // Another, stateless ICMP flow admitted by the rules.
    let out =
        n.cp.set_rules("web", vec![rule(Direction::Egress, None, (0, u16::MAX))])
            .unwrap();
    assert_eq!(out.remove.len(), 2, "both flows of the connection");
    assert!(out.invalidate.as_ref().is_some_and(|i| i.acl));
    n.apply(&out);
    assert_eq!(n.ct_len(), 0);
    assert_eq!(n.cp.shared().write().ct.counters().revoked, 1);
    // The established connection no longer passes, either way.
    assert_eq!(
        n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK)),
        Went::Dropped(Some(DropCause::CtInvalid))
    );
    assert_eq!(
        n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, ACK)),
        Went::Dropped(Some(DropCause::CtInvalid))
    );
    // And a new one is denied.
    assert_eq!(
        n.send(A, &tcp(A_MAC, A_IP, B_IP, 40001, 80, SYN)),
        Went::Dropped(Some(DropCause::AclDenied))
    );
    // Put the rule back: the denial's drop flow goes, the port opens.
    let out = n.cp.set_rules("web", web_rules()).unwrap();
    n.apply(&out);
    delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40001, 80, SYN)), B);
    // Bad rules change nothing.
    let bad = vec![Rule {
        direction: Direction::Ingress,
        proto: None,
        ports: (0, 1),
        peer: Peer::Group("nope".into()),
    }];
    assert!(n.cp.set_rules("web", bad).is_err());
    assert_eq!(n.ct_len(), 1);
}

#[test]
fn rst_closes_and_a_new_syn_reopens_under_the_rules() {
    let mut n = default_switch();
    let syn = tcp(A_MAC, A_IP, B_IP, 40000, 80, SYN);
    let k = key_of(A, &syn);
    delivered(n.send(A, &syn), B);
    delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, RST | ACK)), A);
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::Closed)));
    // The same tuple opens again: a fresh connection.
    delivered(n.send(A, &syn), B);
    assert_eq!(n.state_of(&k), Some(ConnState::Tcp(TcpState::SynSent)));
    assert_eq!(n.ct_len(), 1);
}

#[test]
fn one_vm_at_its_connection_quota_does_not_stop_another() {
    let mut n = switch(
        Limits {
            max: 100,
            per_vm: 3,
        },
        (1024, 65535),
        1000,
    );
    for sport in 0..3 {
        delivered(n.send(A, &udp(A_MAC, A_IP, C_IP, 9000 + sport, 53)), C);
    }
    assert_eq!(n.ct_len(), 3);
    assert_eq!(
        n.send(A, &udp(A_MAC, A_IP, C_IP, 9100, 53)),
        Went::Dropped(Some(DropCause::CtQuota))
    );
    // B still opens connections.
    delivered(n.send(B, &udp(B_MAC, B_IP, C_IP, 9000, 53)), C);
    assert_eq!(
        n.cp.shared().write().vm_drops.lock().unwrap()[&A].ct_refused,
        1
    );
}

fn arp_reply_from_router() -> Vec<u8> {
    let req = crate::arp::Request {
        sender_mac: EXT_MAC,
        sender_ip: SNAT_IP,
        target_ip: ROUTER,
    };
    crate::arp::reply(&req, ROUTER_MAC)
}

/// The switch has asked for the router (as its first packet out would
/// make it), and the router answers.
fn learn_router(n: &mut Net) {
    let now = n.now;
    let (_, asked) =
        n.cp.shared()
            .write()
            .ext_neighbors
            .lock()
            .unwrap()
            .resolve(ROUTER, now);
    assert!(asked, "a question for the router goes out");
    assert_eq!(n.send(EXT, &arp_reply_from_router()), Went::Dropped(None));
}

#[test]
fn the_external_router_cannot_be_repointed_and_a_changed_mac_moves_connections() {
    let mut n = default_switch();
    // Anyone on the external segment claims to be the router: ignored.
    let mut liar = arp_reply_from_router();
    liar[6..12].copy_from_slice(&[2, 0x66, 0, 0, 0, 1]);
    liar[22..28].copy_from_slice(&[2, 0x66, 0, 0, 0, 1]);
    assert_eq!(
        n.send(EXT, &liar),
        Went::Dropped(Some(DropCause::ArpNotRequest))
    );
    assert_eq!(
        n.cp.shared()
            .write()
            .ext_neighbors
            .lock()
            .unwrap()
            .get(&ROUTER),
        None
    );
    learn_router(&mut n);
    let out = udp(A_MAC, A_IP, SERVER, 5555, 53);
    assert_eq!(delivered(n.send(A, &out), EXT)[..6], ROUTER_MAC);
    // Long after, a new connection still leaves (the MAC is used while it
    // is confirmed again), and the router is asked again.
    n.now += crate::ext_neighbors::REACHABLE;
    let second = udp(A_MAC, A_IP, SERVER, 5556, 53);
    assert_eq!(delivered(n.send(A, &second), EXT)[..6], ROUTER_MAC);
    let asked = &n.outcomes[0].tx;
    assert!(
        asked.iter().any(|(p, f)| *p == EXT && f[..6] == [0xff; 6]),
        "a question for the router: {asked:?}"
    );
    // Its answer has a new MAC.
    let new_mac = [2, 0xee, 0, 0, 0, 0xfd];
    let req = crate::arp::Request {
        sender_mac: EXT_MAC,
        sender_ip: SNAT_IP,
        target_ip: ROUTER,
    };
    let moved = n.send(EXT, &crate::arp::reply(&req, new_mac));
    assert_eq!(moved, Went::Dropped(None));
    assert_eq!(
        n.outcomes[0].remove.len(),
        2,
        "both connections' flows out go"
    );
    // Their next packets leave for the new MAC.
    assert_eq!(delivered(n.send(A, &out), EXT)[..6], new_mac);
    assert_eq!(delivered(n.send(A, &second), EXT)[..6], new_mac);
}

#[test]
fn snat_through_the_pool_with_unique_ports_and_replies_translated_back() {
    let mut n = default_switch();
    let out_a = udp(A_MAC, A_IP, SERVER, 5555, 53);
    // The router's MAC is not known yet: asked for, packet refused.
    match n.send(A, &out_a) {
        Went::To(p, f) => {
            assert_eq!(p, EXT);
            assert_eq!(f[..6], [0xff; 6], "an ARP request");
            assert_eq!(f[38..42], ROUTER.octets());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.outcomes[0].drop, Some(DropCause::ExtNeighborPending));
    assert_eq!(n.send(EXT, &arp_reply_from_router()), Went::Dropped(None));
    // A second reply is not an answer to anything: not learned.
    assert_eq!(
        n.send(EXT, &arp_reply_from_router()),
        Went::Dropped(Some(DropCause::ArpNotRequest))
    );
    // Now it leaves, translated.
    let f = delivered(n.send(A, &out_a), EXT);
    assert_eq!(f[..6], ROUTER_MAC);
    assert_eq!(f[6..12], EXT_MAC);
    assert_eq!(ip_at(&f, 26), SNAT_IP);
    let nat_port = port_at(&f, 34);
    assert_eq!(f[22], 63, "routed: TTL decremented");
    checksums_ok(&f);
    // C uses the same source port to the same server: another NAT port.
    let f2 = delivered(n.send(C, &udp(C_MAC, C_IP, SERVER, 5555, 53)), EXT);
    assert_eq!(ip_at(&f2, 26), SNAT_IP);
    assert_ne!(port_at(&f2, 34), nat_port);
    // The server's reply comes back to A with A's address and port.
    let reply = {
        let mut r = udp(ROUTER_MAC, SERVER, SNAT_IP, 53, nat_port);
        r[..6].copy_from_slice(&EXT_MAC);
        let c = synth::l4_checksum(&r);
        r[40..42].copy_from_slice(&c.to_be_bytes());
        r
    };
    let back = delivered(n.send(EXT, &reply), A);
    assert_eq!(
        n.punts, 0,
        "the reverse flow was installed with the first packet"
    );
    assert_eq!(ip_at(&back, 30), A_IP);
    assert_eq!(port_at(&back, 36), 5555);
    assert_eq!(back[..6], A_MAC);
    assert_eq!(back[6..12], GW_MAC);
    checksums_ok(&back);
    // Unsolicited traffic to the SNAT address is dropped (and pinned).
    let probe = udp(ROUTER_MAC, SERVER, SNAT_IP, 53, 1);
    assert_eq!(
        n.send(EXT, &probe),
        Went::Dropped(Some(DropCause::ExtUnsolicited))
    );
    let sh = n.cp.shared().write();
    assert_eq!(sh.nat.lock().unwrap().as_ref().unwrap().in_use(), 2);
}

#[test]
fn nat_port_quota_and_exhaustion_name_the_vm() {
    let mut n = switch(Limits::default(), (2000, 2002), 2);
    learn_router(&mut n);
    for sport in 0..2 {
        delivered(n.send(A, &udp(A_MAC, A_IP, SERVER, 100 + sport, 53)), EXT);
    }
    assert_eq!(
        n.send(A, &udp(A_MAC, A_IP, SERVER, 200, 53)),
        Went::Dropped(Some(DropCause::NatQuota))
    );
    delivered(n.send(C, &udp(C_MAC, C_IP, SERVER, 100, 53)), EXT);
    assert_eq!(
        n.send(C, &udp(C_MAC, C_IP, SERVER, 101, 53)),
        Went::Dropped(Some(DropCause::NatExhausted))
    );
    let sh = n.cp.shared().write();
    let nat = sh.nat.lock().unwrap();
    let vms = nat.as_ref().unwrap().vms();
    assert_eq!(vms[&A].refused_quota, 1);
    assert_eq!(vms[&C].refused_exhausted, 1);
    assert_eq!(vms[&A].ports, 2);
}

#[test]
fn a_floating_ip_takes_connections_in_and_translates_the_vm_out() {
    let mut n = default_switch();
    let syn = {
        let mut f = tcp(ROUTER_MAC, SERVER, FIP_B, 33000, 80, SYN);
        f[..6].copy_from_slice(&EXT_MAC);
        f
    };
    let f = delivered(n.send(EXT, &syn), B);
    assert_eq!(ip_at(&f, 30), B_IP);
    assert_eq!(port_at(&f, 36), 80);
    assert_eq!(f[..6], B_MAC);
    checksums_ok(&f);
    // B's answer leaves from its floating IP to the hop it came through.
    let back = delivered(
        n.send(B, &tcp(B_MAC, B_IP, SERVER, 80, 33000, SYN | ACK)),
        EXT,
    );
    assert_eq!(ip_at(&back, 26), FIP_B);
    assert_eq!(back[..6], ROUTER_MAC);
    checksums_ok(&back);
    // web does not admit port 22 from outside.
    let mut ssh = tcp(ROUTER_MAC, SERVER, FIP_B, 33001, 22, SYN);
    ssh[..6].copy_from_slice(&EXT_MAC);
    assert_eq!(n.send(EXT, &ssh), Went::Dropped(Some(DropCause::AclDenied)));
    // ARP for the floating IP and the SNAT address is answered; others not.
    for (ip, answered) in [
        (FIP_B, true),
        (SNAT_IP, true),
        (Ipv4Addr::new(203, 0, 113, 99), false),
    ] {
        let req = crate::arp::Request {
            sender_mac: ROUTER_MAC,
            sender_ip: ROUTER,
            target_ip: ip,
        };
        let mut f = crate::arp::request(ROUTER_MAC, ROUTER, ip);
        assert_eq!(crate::arp::parse_request(&f[14..]).unwrap(), req);
        f[..6].copy_from_slice(&[0xff; 6]);
        let went = n.send(EXT, &f);
        assert_eq!(matches!(went, Went::To(EXT, _)), answered, "{ip}: {went:?}");
    }
}

#[test]
fn idle_connections_end_on_their_timers_and_free_their_nat_ports() {
    let mut n = default_switch();
    learn_router(&mut n);
    let f = udp(A_MAC, A_IP, SERVER, 5555, 53);
    delivered(n.send(A, &f), EXT);
    assert_eq!(n.ct_len(), 1);
    let t = Timeouts::default();
    // At the deadline the coprocessor asks the fast path about the flows.
    let due = n.now + t.udp_first;
    let out = n.cp.tick(due);
    assert_eq!(out.checks.len(), 1);
    let c = out.checks[0];
    let used = c.keys.map(|k| {
        k.and_then(|k| n.p.table().get(&k))
            .map(|e| (e.stats.last_used, e.stats.packets))
    });
    assert!(
        used[0].is_some() && used[1].is_some(),
        "both flows installed"
    );
    let used = used.map(|u| u.map(|(last_used, packets)| dpif::FlowUse { last_used, packets }));
    let out =
        n.cp.checked(&dpif::CheckAnswer::of(c.id, c.keys, used, 0), due);
    assert_eq!(out.remove.len(), 2);
    n.apply(&out);
    assert_eq!(n.ct_len(), 0);
    assert_eq!(n.nat_in_use(), 0);
    // A flow the fast path expired itself reports its last use; a
    // connection without flows ends at its deadline without a check.
    delivered(n.send(A, &f), EXT);
    let last = n.now;
    let keys: Vec<FlowKey> = {
        let mut sh = n.cp.shared().write();
        let (id, _) = sh.ct.lookup(&key_of(A, &f)).unwrap();
        sh.ct.get(id).unwrap().sides.iter().map(|s| s.key).collect()
    };
    assert_eq!(keys[1].ingress(), Some(Ingress::Port(EXT)));
    for k in &keys {
        let (_, s) = n.p.table_mut().remove(k).unwrap();
        let used = dpif::FlowUse {
            last_used: s.last_used,
            packets: s.packets,
        };
        n.cp.flow_gone(k, used, 0);
    }
    assert!(n
        .cp
        .tick(last + t.udp_first - 1_000_000_000)
        .remove
        .is_empty());
    let out = n.cp.tick(last + t.udp_first);
    assert!(out.checks.is_empty(), "nothing to ask: no flows");
    assert_eq!(n.ct_len(), 0);
    assert_eq!(n.nat_in_use(), 0);
}

/// An ICMP error (type, code) from `src` to `dst` quoting the IPv4
/// header and 8 bytes of `about` (an Ethernet frame), from `src_mac`.
fn icmp_error(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: u8,
    code: u8,
    about: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![t, code, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(&about[14..14 + 28]);
    let c = vxlan::checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = synth::udp_frame(&flow(src_mac, src, dst, 0, 0), 42);
    f.truncate(34);
    f[23] = 1;
    f[16..18].copy_from_slice(&u16::try_from(20 + icmp.len()).unwrap().to_be_bytes());
    f[24..26].fill(0);
    let c = vxlan::checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn icmp_errors_about_a_connection_pass_and_are_translated_through_nat() {
    let mut n = default_switch();
    learn_router(&mut n);
    let out = udp(A_MAC, A_IP, SERVER, 5555, 53);
    let sent = delivered(n.send(A, &out), EXT);
    // A router on the way says the packet was too big.
    let mut err = icmp_error(ROUTER_MAC, ROUTER, SNAT_IP, 3, 4, &sent);
    err[..6].copy_from_slice(&EXT_MAC);
    let f = delivered(n.send(EXT, &err), A);
    assert_eq!(ip_at(&f, 30), A_IP, "outer destination translated back");
    assert_eq!(ip_at(&f, 42 + 12), A_IP, "quoted source translated back");
    assert_eq!(port_at(&f, 62), 5555, "quoted source port translated back");
    assert_eq!(f[..6], A_MAC);
    assert_eq!(
        vxlan::checksum::fold(vxlan::checksum::sum(&f[34..])),
        0xffff
    );
    // Again: still punted (no flow pins ICMP errors), still delivered.
    delivered(n.send(EXT, &err), A);
    assert_eq!(n.punts, 1);
    // Without NAT: A (no ingress rules) gets C's port-unreachable about
    // A's own packet.
    let to_c = udp(A_MAC, A_IP, C_IP, 6000, 7000);
    delivered(n.send(A, &to_c), C);
    let unreach = icmp_error(C_MAC, C_IP, A_IP, 3, 3, &to_c);
    delivered(n.send(C, &unreach), A);
    // An error about nothing A sent is denied, and not pinned by a flow.
    let other = udp(A_MAC, A_IP, C_IP, 6001, 7000);
    let stray = icmp_error(C_MAC, C_IP, A_IP, 3, 1, &other);
    assert_eq!(n.send(C, &stray), Went::Dropped(Some(DropCause::AclDenied)));
    assert_eq!(n.send(C, &stray), Went::Dropped(Some(DropCause::AclDenied)));
    assert_eq!(n.cp.shared().write().ct.counters().related, 3);
}

#[test]
fn an_icmp_error_addressed_elsewhere_is_not_related_to_the_connection_it_quotes() {
    let mut n = default_switch();
    // B may send nothing of its own (ingress TCP 80 only).
    n.cp.shared()
        .write()
        .policy
        .set_rules("web", vec![rule(Direction::Ingress, Some(6), (80, 80))])
        .unwrap();
    let syn = tcp(A_MAC, A_IP, B_IP, 42000, 80, SYN);
    delivered(n.send(A, &syn), B);
    delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 42000, SYN | ACK)), A);
    // B's error about A's packet, to A: related, delivered.
    delivered(n.send(B, &icmp_error(B_MAC, B_IP, A_IP, 3, 3, &syn)), A);
    // The same quote sent to another address of the network: not related,
    // so B's own (empty) egress rules decide.
    let forged = icmp_error(B_MAC, B_IP, C_IP, 3, 3, &syn);
    assert_eq!(
        n.send(B, &forged),
        Went::Dropped(Some(DropCause::AclDenied))
    );
    assert_eq!(n.cp.shared().write().ct.counters().related, 1);
}

mod ops {
    use super::*;
    use crate::ops::{Op, OpError};

    const D: PortId = PortId(5);
    const D_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0d];
    const D_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 13);
    const NEW_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);

    fn vm_d(groups: Vec<u16>) -> LocalVm {
        LocalVm {
            name: "d".into(),
            port: D,
            mac: D_MAC,
            ips: vec![D_IP],
            vni: vni(VNI),
            hostname: None,
            groups,
            floating_ip: None,
        }
    }

    fn remote(ip: Ipv4Addr, vtep: Ipv4Addr) -> RemoteVm {
        RemoteVm {
            ip,
            mac: R_MAC,
            vni: vni(VNI),
            vtep,
            groups: vec![],
        }
    }

    /// Apply `ops` as the control thread does, and its answer as the
    /// fast path does.
    fn apply(n: &mut Net, ops: Vec<Op>) -> Result<Update, OpError> {
        let (out, _) = n.cp.apply(ops)?;
        n.apply(&out);
        Ok(out)
    }

    #[test]
    fn a_failed_batch_changes_nothing() {
        let mut n = default_switch();
        let before = n.cp.topology();
        let version = n.cp.shared().write().version;
        let e = apply(
            &mut n,
            vec![
                Op::AddVm(vm_d(vec![1])),
                Op::SetRemotes(vec![remote(Ipv4Addr::new(10, 0, 0, 77), NEW_VTEP)]),
                Op::RemoveRemotes(vec![(VNI, R_IP)]),
                Op::RemoveVm("nope".into()),
            ],
        )
        .unwrap_err();
        assert!(matches!(e, OpError::NotFound { index: 3, .. }), "{e}");
        let after = n.cp.topology();
        assert!(after.vm_named("d").is_none());
        assert!(after.remote(VNI, Ipv4Addr::new(10, 0, 0, 77)).is_none());
        assert_eq!(after.remote(VNI, R_IP).map(|r| r.vtep), Some(REMOTE_VTEP));
        assert_eq!(after.vms().count(), before.vms().count());
        assert_eq!(n.cp.shared().write().version, version);
        // Membership was rolled back too: client (1) does not hold D.
        let sh = n.cp.shared().write();
        assert!(sh
            .policy
            .admits(&[2], Direction::Ingress, VNI, u32::from(D_IP), 6, 1)
            .is_none());
    }

    #[test]
    fn a_vm_added_at_run_time_gets_traffic_and_a_removed_one_loses_everything() {
        let mut n = default_switch();
        apply(&mut n, vec![Op::AddVm(vm_d(vec![]))]).unwrap();
        let f = delivered(n.send(C, &udp(C_MAC, C_IP, D_IP, 1, 2)), D);
        assert_eq!(f[..6], D_MAC);
        // B's established connection from A, then B goes away.
        delivered(n.send(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, SYN)), B);
        delivered(n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, SYN | ACK)), A);
        let (out, applied) = n.cp.apply(vec![Op::RemoveVm("b".into())]).unwrap();
        assert_eq!(applied.connections_ended, 1);
        let inv = out.invalidate.clone().unwrap();
        let k = key_of(A, &tcp(A_MAC, A_IP, B_IP, 40000, 80, ACK));
        assert!(
            inv.hits(&k, &flowtable::Action::output(B)),
            "the flow towards B goes"
        );
        n.apply(&out);
        assert!(n.p.table().get(&k).is_none());
        assert_eq!(
            n.send(A, &udp(A_MAC, A_IP, B_IP, 1, 2)),
            Went::Dropped(Some(DropCause::UnknownDestination))
        );
        // Its floating IP went with it.
        assert!(n.cp.topology().external_addr(FIP_B).is_none());
    }

    #[test]
    fn moving_a_remote_endpoint_moves_its_traffic() {
        let mut n = default_switch();
        n.cp.update_topology(|t| t.set_neighbor(NEW_VTEP, NEXT_HOP));
        let f = udp(C_MAC, C_IP, R_IP, 1, 2);
        let before = delivered(n.send(C, &f), UPLINK);
        assert_eq!(ip_at(&before, 30), REMOTE_VTEP);
        let out = apply(&mut n, vec![Op::SetRemotes(vec![remote(R_IP, NEW_VTEP)])]).unwrap();
        assert!(out.version > 0);
        let after = delivered(n.send(C, &f), UPLINK);
        assert_eq!(n.punts, 1, "the old flow was invalidated");
        assert_eq!(ip_at(&after, 30), NEW_VTEP);
        // In bulk, and back.
        let many: Vec<RemoteVm> = (0..1000u32)
            .map(|i| remote(Ipv4Addr::from(0x0a00_0000 + 1000 + i), NEW_VTEP))
            .collect();
        apply(&mut n, vec![Op::SetRemotes(many)]).unwrap();
        assert_eq!(n.cp.topology().remotes().count(), 1001);
        let keys: Vec<(u32, Ipv4Addr)> = (0..1000u32)
            .map(|i| (VNI, Ipv4Addr::from(0x0a00_0000 + 1000 + i)))
            .collect();
        apply(&mut n, vec![Op::RemoveRemotes(keys)]).unwrap();
        assert_eq!(n.cp.topology().remotes().count(), 1);
    }

    #[test]
    fn a_tracked_connection_follows_a_migrating_remote_endpoint() {
        let mut n = default_switch();
        n.cp.update_topology(|t| t.set_neighbor(NEW_VTEP, NEXT_HOP));
        // A (filtered) opens TCP to R; R's SYN-ACK comes over the overlay.
        let syn = tcp(A_MAC, A_IP, R_IP, 41000, 80, SYN);
        let out = delivered(n.send(A, &syn), UPLINK);
        assert_eq!(ip_at(&out, 30), REMOTE_VTEP);
        let synack = super::super::from_remote(
            &tcp(R_MAC, R_IP, A_IP, 80, 41000, SYN | ACK),
            REMOTE_VTEP,
            VNI,
        );
        delivered(n.send(UPLINK, &synack), A);
        // R migrates to another hypervisor.
        let (out, applied) =
            n.cp.apply(vec![Op::SetRemotes(vec![remote(R_IP, NEW_VTEP)])])
                .unwrap();
        assert_eq!(applied.connections_ended, 0, "recompiled, not cut");
        n.apply(&out);
        // Mid-stream segments both ways take the new path.
        let ack = tcp(A_MAC, A_IP, R_IP, 41000, 80, ACK);
        let f = delivered(n.send(A, &ack), UPLINK);
        assert_eq!(ip_at(&f, 30), NEW_VTEP);
        let back =
            super::super::from_remote(&tcp(R_MAC, R_IP, A_IP, 80, 41000, ACK), NEW_VTEP, VNI);
        delivered(n.send(UPLINK, &back), A);
        // From the old VTEP it is refused now.
        let stale =
            super::super::from_remote(&tcp(R_MAC, R_IP, A_IP, 80, 41000, ACK), REMOTE_VTEP, VNI);
        assert!(matches!(n.send(UPLINK, &stale), Went::Dropped(_)));
        assert_eq!(n.ct_len(), 1);
    }

    #[test]
    fn groups_in_use_stay_and_new_ones_apply_to_changed_vms() {
        let mut n = default_switch();
        let e = apply(&mut n, vec![Op::RemoveGroup("web".into())]).unwrap_err();
        assert!(e.to_string().contains("still used by vm b"), "{e}");
        let e = apply(&mut n, vec![Op::RemoveGroup("client".into())]).unwrap_err();
        assert!(e.to_string().contains("still used by"), "{e}");
        // A new group for C, which was unfiltered: C → B:80 was allowed
        // (web admits it); give C a group without egress rules.
        apply(
            &mut n,
            vec![Op::AddGroup(SecurityGroup {
                name: "mute".into(),
                rules: vec![],
            })],
        )
        .unwrap();
        let mute = n.cp.shared().write().policy.id("mute").unwrap();
        let c = n.cp.topology().vm_named("c").cloned().unwrap();
        apply(
            &mut n,
            vec![Op::ChangeVm(LocalVm {
                groups: vec![mute],
                ..c
            })],
        )
        .unwrap();
        assert_eq!(
            n.send(C, &tcp(C_MAC, C_IP, B_IP, 40000, 80, SYN)),
            Went::Dropped(Some(DropCause::AclDenied))
        );
        let e = apply(&mut n, vec![Op::RemoveGroup("mute".into())]).unwrap_err();
        assert!(e.to_string().contains("still used by vm c"), "{e}");
    }

    #[test]
    fn a_new_external_network_ends_nat_connections_and_takes_new_ones() {
        let mut n = default_switch();
        learn_router(&mut n);
        let f = udp(A_MAC, A_IP, SERVER, 5555, 53);
        let before = delivered(n.send(A, &f), EXT);
        assert_eq!(ip_at(&before, 26), SNAT_IP);
        let mut ext = n.cp.topology().external.clone().unwrap();
        let new_ip = Ipv4Addr::new(203, 0, 113, 11);
        ext.snat = vec![new_ip];
        // The floating IP must still fit: a pool holding it is refused.
        let clash = crate::topology::External {
            snat: vec![FIP_B],
            ..ext.clone()
        };
        let e = apply(&mut n, vec![Op::SetExternal(Some(clash))]).unwrap_err();
        assert!(e.to_string().contains("would be an SNAT address"), "{e}");
        let (out, applied) = n.cp.apply(vec![Op::SetExternal(Some(ext))]).unwrap();
        assert_eq!(applied.connections_ended, 1);
        n.apply(&out);
        // Neighbours are learned again on the new network.
        learn_router(&mut n);
        let after = delivered(n.send(A, &f), EXT);
        assert_eq!(ip_at(&after, 26), new_ip);
        assert_eq!(n.nat_in_use(), 1);
    }

    #[test]
    fn a_network_change_that_strands_a_vm_is_refused() {
        let mut n = default_switch();
        let net = n.cp.topology().network(VNI).cloned().unwrap();
        let shrunk = Network {
            subnets: net.subnets[..1].to_vec(),
            ..net.clone()
        };
        let e = apply(&mut n, vec![Op::ChangeNetwork(shrunk)]).unwrap_err();
        assert!(
            e.to_string().contains("10.0.1.12 (vm c) would be outside"),
            "{e}"
        );
        assert_eq!(n.cp.topology().network(VNI), Some(&net));
        // DHCP options change freely.
        let dns = Network {
            dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
            ..net
        };
        apply(&mut n, vec![Op::ChangeNetwork(dns)]).unwrap();
        assert_eq!(
            n.cp.topology().network(VNI).unwrap().dns,
            [Ipv4Addr::new(9, 9, 9, 9)]
        );
        let e = apply(&mut n, vec![Op::RemoveNetwork(VNI)]).unwrap_err();
        assert!(e.to_string().contains("still in use"), "{e}");
    }
}

#[test]
fn the_shared_state_survives_save_and_restore() {
    let mut n = default_switch();
    learn_router(&mut n);
    let syn = tcp(A_MAC, A_IP, B_IP, 40000, 80, SYN);
    delivered(n.send(A, &syn), B);
    delivered(n.send(A, &udp(A_MAC, A_IP, SERVER, 5555, 53)), EXT);
    let saved = n.cp.shared().write().save();
    let mut restored = Shared::restore(saved.clone(), Vec::new(), n.now).expect("restore");
    assert_eq!(restored.save(), saved, "save ∘ restore is the identity");
    assert_eq!(restored.ct.len(), 2);
    assert_eq!(
        restored.nat.lock().unwrap().as_ref().unwrap().in_use(),
        1,
        "the NAT port is claimed back"
    );
    let (id, side) = restored
        .ct
        .lookup(&key_of(A, &syn))
        .expect("the connection");
    assert_eq!(side, 0);
    assert_eq!(
        restored.ct.get(id).unwrap().state,
        ConnState::Tcp(TcpState::SynSent)
    );
    // A coprocessor on the restored state carries on: the reply passes.
    let mut n2 = Net {
        cp: Coprocessor::with_shared(Arc::new(crate::SharedLock::new(restored))),
        ..switch(Limits::default(), (1024, 65535), 1000)
    };
    delivered(n2.send(B, &tcp(B_MAC, B_IP, A_IP, 80, 40000, SYN | ACK)), A);
    // The next SNAT port is not the one a restored connection holds.
    let f = delivered(n2.send(A, &udp(A_MAC, A_IP, SERVER, 5556, 53)), EXT);
    let held =
        n.cp.shared()
            .write()
            .ct
            .iter()
            .find_map(|(_, c)| c.nat)
            .unwrap();
    assert_ne!(port_at(&f, 34), held.port);
}

mod lb;

#[test]
fn two_threads_deciding_while_the_rules_change_leave_a_consistent_table() {
    let mut n = switch(Limits::default(), (1024, 65535), 100_000);
    learn_router(&mut n);
    let shared = Arc::clone(n.cp.shared());
    let now = n.now;
    std::thread::scope(|s| {
        for t in 0..2u16 {
            let shared = Arc::clone(&shared);
            s.spawn(move || {
                let mut cp = Coprocessor::with_shared(shared);
                for i in 0..1500u16 {
                    let sport = 10_000 + 2 * i + t;
                    // To B's web port (filtered, tracked) and out through
                    // SNAT, turn about.
                    let f = if i % 2 == 0 {
                        tcp(A_MAC, A_IP, B_IP, sport, 80, SYN)
                    } else {
                        udp(A_MAC, A_IP, SERVER, sport, 53)
                    };
                    let msg = PuntMsg::of(A, PuntReason::Miss, now, &f, Some(key_of(A, &f)));
                    let out = cp.handle(&msg);
                    // Refused only while the web rule is away.
                    assert!(
                        matches!(out.drop, None | Some(DropCause::AclDenied)),
                        "{:?}",
                        out.drop
                    );
                }
            });
        }
        // Meanwhile the web group loses its rule and gets it back, again
        // and again: each change ends the connections it no longer admits.
        for _ in 0..20 {
            n.cp.set_rules("web", vec![]).unwrap();
            n.cp.set_rules("web", web_rules()).unwrap();
        }
    });
    let mut sh = shared.write();
    sh.ct.check_index();
    let conns = sh.ct.len();
    let mut nated = 0u64;
    sh.ct.for_each(|_, c| nated += u64::from(c.nat.is_some()));
    assert_eq!(
        sh.ct.per_owner().get(&A).copied().unwrap_or(0) as usize,
        conns
    );
    assert_eq!(
        sh.nat.lock().unwrap().as_ref().unwrap().in_use(),
        nated,
        "every NAT port is held by a live connection"
    );
    assert_eq!(
        nated, 1500,
        "NATed connections are no rule change's business"
    );
    assert!(conns as u64 > nated, "some web connections were admitted");
    let handled = sh.counters().handled;
    assert!(
        handled >= 3000,
        "both threads' decisions counted: {handled}"
    );
}

#[test]
fn a_snat_connection_gets_a_port_that_keeps_both_its_keys_in_one_shard() {
    let mut n = switch(Limits::default(), (1024, 65535), 100_000);
    learn_router(&mut n);
    for sport in 30_000..30_100u16 {
        delivered(n.send(A, &udp(A_MAC, A_IP, SERVER, sport, 53)), EXT);
    }
    let mut sh = n.cp.shared().write();
    let mut keys = Vec::new();
    sh.ct.for_each(|_, c| {
        if c.nat.is_some() {
            keys.push(c.sides.map(|s| s.key));
        }
    });
    assert_eq!(keys.len(), 100);
    for k in keys {
        // Its replies' misses go to the thread its original's go to.
        assert_eq!(sh.ct.shard_of(&k[0]), sh.ct.shard_of(&k[1]), "{k:?}");
    }
    sh.ct.check_index();
}
