// Test-only casts of small in-memory offsets.
#![allow(clippy::cast_possible_truncation)]

use std::net::Ipv4Addr;

use flowtable::{EncapTemplate, FlowHasher, Ingress, Vni};
use proptest::prelude::*;
use vxlan::{TemplateSpec, UDP_PORT};

use super::*;
use crate::classify::{classify_l2, Class};
use crate::frame::SliceMem;
use crate::synth::{self, UdpFlow};

const UPLINK: PortId = PortId(0);
const VM1: PortId = PortId(1);
const VM2: PortId = PortId(2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const VNI: u32 = 100;
const CHUNK: usize = 2048;
const HEADROOM: usize = 256;
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const VM1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const VM2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const REMOTE_VM_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];

fn cfg() -> PipelineConfig {
    PipelineConfig {
        uplink: UPLINK,
        local_vtep: LOCAL,
        udp_port: UDP_PORT,
        ports: 3,
    }
}

fn pipeline() -> Pipeline {
    Pipeline::new(
        &cfg(),
        FlowTable::with_hasher(1024, FlowHasher::with_seed(1)).unwrap(),
    )
}

fn vm1_flow() -> UdpFlow {
    UdpFlow {
        src_mac: VM1_MAC,
        dst_mac: GW_MAC,
        src_ip: Ipv4Addr::new(10, 0, 0, 1),
        dst_ip: Ipv4Addr::new(10, 0, 0, 9),
        src_port: 5000,
        dst_port: 6000,
    }
}

/// Outer headers as the remote hypervisor sends them to us.
fn from_remote() -> TemplateSpec {
    TemplateSpec {
        src_mac: [0x02, 0xaa, 0, 0, 0, 2],
        dst_mac: [0x02, 0xaa, 0, 0, 0, 1],
        local_vtep: REMOTE,
        remote_vtep: LOCAL,
        vni: VNI,
        ttl: 64,
    }
}

/// Outer headers towards the remote hypervisor.
fn to_remote() -> TemplateSpec {
    TemplateSpec {
        src_mac: [0x02, 0xaa, 0, 0, 0, 1],
        dst_mac: [0x02, 0xaa, 0, 0, 0, 2],
        local_vtep: LOCAL,
        remote_vtep: REMOTE,
        vni: VNI,
        ttl: 64,
    }
}

/// Frames in chunks at HEADROOM; returns the memory and descriptors.
fn load(frames: &[Vec<u8>]) -> (Vec<u8>, Vec<Desc>) {
    let mut mem = vec![0u8; CHUNK * frames.len().max(1)];
    let mut descs = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let at = i * CHUNK + HEADROOM;
        mem[at..at + f.len()].copy_from_slice(f);
        descs.push(Desc::new(at as u64, u32::try_from(f.len()).unwrap()));
    }
    (mem, descs)
}

/// `frames` loaded as by [`load`] and run through `p` from `port` at
/// time 1: the memory, the descriptors and what came out.
fn run(p: &mut Pipeline, port: PortId, frames: &[Vec<u8>]) -> (Vec<u8>, Vec<Desc>, BatchOut) {
    let (mut mem, descs) = load(frames);
    let mut out = BatchOut::new(3);
    p.process(
        port,
        &mut SliceMem::new(&mut mem, CHUNK).unwrap(),
        &descs,
        1,
        &mut out,
    );
    (mem, descs, out)
}

fn bytes(mem: &[u8], d: Desc) -> &[u8] {
    &mem[d.addr as usize..d.addr as usize + d.len as usize]
}

fn key_of(frame: &[u8], ingress: Ingress) -> FlowKey {
    match classify_l2(frame, ingress) {
        Class::Flow(k) => k,
        c => panic!("not a flow: {c:?}"),
    }
}

fn encap_action() -> Action {
    Action {
        set_eth_dst: Some(REMOTE_VM_MAC),
        encap: Some(EncapTemplate(
            *vxlan::Template::new(&to_remote()).unwrap().bytes(),
        )),
        ..Action::output(UPLINK)
    }
}

#[test]
fn vm_to_remote_vm_is_encapsulated_towards_the_remote_vtep() {
    let mut p = pipeline();
    let frame = synth::udp_frame(&vm1_flow(), 64);
    let key = key_of(&frame, Ingress::Port(VM1));
    p.table_mut().insert(key, &encap_action(), 0).unwrap();
    let (mut mem, descs) = load(&[frame.clone(), frame.clone()]);
    let mut out = BatchOut::new(3);
    let n = p.process(
        VM1,
        &mut SliceMem::new(&mut mem, CHUNK).unwrap(),
        &descs,
        10,
        &mut out,
    );
    assert_eq!(n, 2);
    let tx: Vec<_> = out.tx.iter().collect();
    assert_eq!(tx.len(), 1);
    let (port, list) = tx[0];
    assert_eq!((port, list.len()), (UPLINK, 2));
    let d = list[0];
    assert_eq!(d.addr, descs[0].addr - 50);
    assert_eq!(d.len, 64 + 50);
    // The remote end accepts it and finds our inner frame, dst MAC rewritten.
    let remote_cfg = vxlan::DecapConfig {
        local_vtep: u32::from(REMOTE),
        udp_port: UDP_PORT,
    };
    let wire = bytes(&mem, d);
    let dec = vxlan::decap(wire, &remote_cfg).unwrap();
    assert_eq!((dec.vni, dec.outer_src), (VNI, u32::from(LOCAL)));
    let inner = &wire[dec.inner()];
    assert_eq!(inner[..6], REMOTE_VM_MAC);
    assert_eq!(inner[6..], frame[6..]);
    // Outer source port comes from the flow hash.
    let sport = u16::from_be_bytes([wire[34], wire[35]]);
    assert_eq!(sport, vxlan::source_port(p.table().hash(&key)));
    let e = p.table().get(&key).unwrap();
    assert_eq!(
        (e.stats.packets, e.stats.bytes, e.stats.last_used),
        (2, 128, 10)
    );
    assert_eq!(
        (
            p.counters().hits,
            p.counters().tx_packets,
            p.counters().rx_packets
        ),
        (2, 2, 2)
    );
}

#[test]
fn remote_vm_to_vm_is_decapsulated_and_delivered() {
    let mut p = pipeline();
    let mut flow = vm1_flow();
    flow.src_mac = REMOTE_VM_MAC;
    flow.dst_mac = [0xff; 6];
    let inner = synth::udp_frame(&flow, 64);
    let wire = synth::vxlan_frame(&inner, &from_remote(), 3);
    let key = key_of(&inner, Ingress::Vni(Vni::new(VNI).unwrap()));
    let action = Action {
        decap: Some(u32::from(REMOTE)),
        set_eth_dst: Some(VM2_MAC),
        set_eth_src: Some(GW_MAC),
        ..Action::output(VM2)
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let (mem, descs, out) = run(&mut p, UPLINK, &[wire]);
    let tx: Vec<_> = out.tx.iter().collect();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].0, VM2);
    let d = tx[0].1[0];
    assert_eq!((d.addr, d.len), (descs[0].addr + 50, 64));
    let got = bytes(&mem, d);
    assert_eq!(got[..6], VM2_MAC);
    assert_eq!(got[6..12], GW_MAC);
    assert_eq!(got[12..], inner[12..]);
}

#[test]
fn the_same_inner_flow_from_a_forged_vtep_is_dropped_not_punted() {
    let mut p = pipeline();
    let inner = synth::udp_frame(&vm1_flow(), 64);
    let mut forged = from_remote();
    forged.local_vtep = Ipv4Addr::new(192, 168, 0, 66);
    let wire = synth::vxlan_frame(&inner, &forged, 3);
    let key = key_of(&inner, Ingress::Vni(Vni::new(VNI).unwrap()));
    let action = Action {
        decap: Some(u32::from(REMOTE)),
        ..Action::output(VM2)
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let (_, _, out) = run(&mut p, UPLINK, &[wire]);
    assert!(out.tx.is_empty());
    assert!(out.punt.is_empty(), "no punt for a forged outer source");
    assert_eq!(p.counters().drops.get(DropReason::VtepMismatch), 1);
}

#[test]
fn an_address_drop_covers_every_port_and_an_exact_flow_wins() {
    let mut p = pipeline();
    let f = vm1_flow();
    let key = key_of(&synth::udp_frame(&f, 64), Ingress::Port(VM1));
    p.table_mut()
        .insert(key.to_l3(), &Action::drop(), 0)
        .unwrap();
    // One exact flow of the same pair forwards.
    let fwd = UdpFlow {
        dst_port: 7777,
        ..f
    };
    let fwd_key = key_of(&synth::udp_frame(&fwd, 64), Ingress::Port(VM1));
    p.table_mut()
        .insert(fwd_key, &Action::output(VM2), 0)
        .unwrap();
    let frames: Vec<Vec<u8>> = (0..20u16)
        .map(|i| {
            synth::udp_frame(
                &UdpFlow {
                    src_port: 30000 + i,
                    ..f
                },
                64,
            )
        })
        .chain([synth::udp_frame(&fwd, 64)])
        .collect();
    let (_, _, out) = run(&mut p, VM1, &frames);
    assert!(out.punt.is_empty(), "no frame of the pair is punted");
    assert_eq!(p.counters().drops.get(DropReason::FlowDrop), 20);
    assert_eq!(out.tx.iter().map(|(_, l)| l.len()).sum::<usize>(), 1);
    // Another pair still misses.
    let other = synth::udp_frame(
        &UdpFlow {
            dst_ip: Ipv4Addr::new(10, 0, 0, 8),
            ..f
        },
        64,
    );
    let (_, _, out) = run(&mut p, VM1, &[other]);
    assert_eq!(out.punt[0].reason, PuntReason::Miss);
}

#[test]
fn misses_and_arp_are_punted_with_their_reason() {
    let mut p = pipeline();
    let frame = synth::udp_frame(&vm1_flow(), 64);
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (_, descs, out) = run(&mut p, VM1, &[frame, arp]);
    let reasons: Vec<_> = out.punt.iter().map(|i| (i.desc, i.reason)).collect();
    assert_eq!(
        reasons,
        vec![(descs[1], PuntReason::Arp), (descs[0], PuntReason::Miss)]
    );
    assert_eq!(p.counters().misses, 1);
    assert_eq!(p.counters().punts[PuntReason::Arp.index()], 1);
}

#[test]
fn ttl_is_decremented_with_a_valid_checksum_and_expiry_is_punted() {
    let mut p = pipeline();
    let frame = synth::udp_frame(&vm1_flow(), 64);
    let key = key_of(&frame, Ingress::Port(VM1));
    let action = Action {
        dec_ttl: true,
        ..Action::output(VM2)
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let mut last = frame.clone();
    last[synth::at::IP_TTL] = 1;
    let (mem, descs, out) = run(&mut p, VM1, &[frame, last]);
    let d = out.tx.iter().next().unwrap().1[0];
    let got = bytes(&mem, d);
    assert_eq!(got[synth::at::IP_TTL], 63);
    assert_eq!(
        vxlan::checksum::fold(vxlan::checksum::sum(&got[14..34])),
        0xffff
    );
    assert_eq!(out.punt[0].reason, PuntReason::TtlExpired);
    assert_eq!(
        bytes(&mem, descs[1])[synth::at::IP_TTL],
        1,
        "punted frame untouched"
    );
}

#[test]
fn oversize_frames_are_punted_unmodified() {
    let mut p = pipeline();
    let frame = synth::udp_frame(&vm1_flow(), 1400);
    let key = key_of(&frame, Ingress::Port(VM1));
    let action = Action {
        max_len: 1000,
        ..encap_action()
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let (mem, descs, out) = run(&mut p, VM1, std::slice::from_ref(&frame));
    assert_eq!(out.punt[0].reason, PuntReason::TooBig);
    assert_eq!(bytes(&mem, descs[0]), &frame[..]);
}

#[test]
fn drop_flows_bad_ports_and_bad_descriptors_are_counted() {
    let mut p = pipeline();
    let f1 = synth::udp_frame(&vm1_flow(), 64);
    let mut flow2 = vm1_flow();
    flow2.dst_port = 7;
    let f2 = synth::udp_frame(&flow2, 64);
    p.table_mut()
        .insert(key_of(&f1, Ingress::Port(VM1)), &Action::drop(), 0)
        .unwrap();
    p.table_mut()
        .insert(
            key_of(&f2, Ingress::Port(VM1)),
            &Action::output(PortId(9)),
            0,
        )
        .unwrap();
    let (mut mem, mut descs) = load(&[f1, f2]);
    descs.push(Desc::new(1 << 40, 64));
    descs.push(Desc::new(2000, 100)); // runs past its chunk
    let mut out = BatchOut::new(3);
    p.process(
        VM1,
        &mut SliceMem::new(&mut mem, CHUNK).unwrap(),
        &descs,
        1,
        &mut out,
    );
    let c = &p.counters().drops;
    assert_eq!(c.get(DropReason::FlowDrop), 1);
    assert_eq!(c.get(DropReason::BadOutputPort), 1);
    assert_eq!(c.get(DropReason::BadDescriptor), 2);
    assert_eq!(out.dropped.len(), 4);
    // The same drops, attributed to the ingress port.
    assert_eq!(p.counters().port_drops[1].total(), 4);
    assert_eq!(p.counters().port_drops[0].total(), 0);
}

#[test]
fn a_batch_is_at_most_batch_frames() {
    let mut p = pipeline();
    let frames: Vec<_> = (0..40).map(|_| synth::udp_frame(&vm1_flow(), 64)).collect();
    let (mut mem, descs) = load(&frames);
    let mut out = BatchOut::new(3);
    let mut m = SliceMem::new(&mut mem, CHUNK).unwrap();
    assert_eq!(p.process(VM1, &mut m, &descs, 1, &mut out), BATCH);
    assert_eq!(p.process(VM1, &mut m, &descs[BATCH..], 1, &mut out), 8);
    assert_eq!(p.counters().rx_packets, 40);
}

proptest! {
    /// Any frames, from a VM port or the uplink, with flows installed that
    /// match some of them: no panic, and every frame is accounted for
    /// exactly once (transmitted, punted or dropped).
    #[test]
    fn every_frame_is_accounted_for(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..160), 1..32),
        from_uplink in any::<bool>(),
        mutate in any::<bool>(),
    ) {
        let mut p = pipeline();
        let base = synth::udp_frame(&vm1_flow(), 64);
        let wire = synth::vxlan_frame(&base, &from_remote(), 1);
        p.table_mut().insert(key_of(&base, Ingress::Port(VM1)), &encap_action(), 0).unwrap();
        let dec = Action { decap: Some(u32::from(REMOTE)), dec_ttl: true, ..Action::output(VM2) };
        p.table_mut().insert(key_of(&base, Ingress::Vni(Vni::new(VNI).unwrap())), &dec, 0).unwrap();
        let frames: Vec<Vec<u8>> = frames.into_iter().enumerate().map(|(i, mut f)| {
            // Mix in valid frames with a few bytes overwritten.
            if mutate && i % 2 == 0 {
                let mut v = if from_uplink { wire.clone() } else { base.clone() };
                for (j, b) in f.iter().take(4).enumerate() {
                    let at = usize::from(*b) % v.len();
                    v[at] = f.get(j + 4).copied().unwrap_or(0);
                }
                f = v;
            }
            f
        }).collect();
        let (mut mem, descs) = load(&frames);
        let mut out = BatchOut::new(3);
        let port = if from_uplink { UPLINK } else { VM1 };
        let n = p.process(port, &mut SliceMem::new(&mut mem, CHUNK).unwrap(), &descs, 1, &mut out);
        prop_assert_eq!(n, descs.len());
        prop_assert_eq!(out.tx.len() + out.punt.len() + out.dropped.len(), descs.len());
        let c = p.counters();
        let punts: u64 = c.punts.iter().sum();
        prop_assert_eq!(c.tx_packets + punts + c.drops.total(), descs.len() as u64);
    }
}

#[test]
fn tracked_flows_punt_state_changes_and_expiring_ttls_before_any_nat() {
    let mut p = pipeline();
    let f = vm1_flow();
    let syn = synth::tcp_frame(&f, 0x02, b"");
    let ack = synth::tcp_frame(&f, 0x10, b"");
    let mut expiring = ack.clone();
    expiring[synth::at::IP_TTL] = 1;
    let key = key_of(&syn, Ingress::Port(VM1));
    let action = Action {
        conntrack: true,
        dec_ttl: true,
        nat: Some(flowtable::Nat {
            side: flowtable::NatSide::Src,
            ip: 0xcb00_710a,
            port: Some(40000),
        }),
        ..Action::output(VM2)
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let run = |p: &mut Pipeline, frames: &[Vec<u8>]| {
        let (mem, _, out) = run(p, VM1, frames);
        let sent: Vec<Vec<u8>> = out
            .tx
            .iter()
            .flat_map(|(_, l)| {
                l.iter()
                    .map(|d| bytes(&mem, *d).to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        let punted: Vec<(PuntReason, Vec<u8>)> = out
            .punt
            .iter()
            .map(|i| (i.reason, bytes(&mem, i.desc).to_vec()))
            .collect();
        (sent, punted)
    };
    let (sent, punted) = run(&mut p, &[syn.clone(), ack.clone(), expiring.clone()]);
    // The SYN is punted as a connection event, untouched.
    assert_eq!(punted[0], (PuntReason::CtEvent, syn.clone()));
    // The expiring TTL is punted before NAT touched it.
    assert_eq!(punted[1], (PuntReason::TtlExpired, expiring));
    // The plain segment is translated, routed, with good checksums.
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s[26..30], [203, 0, 113, 10]);
    assert_eq!(u16::from_be_bytes([s[34], s[35]]), 40000);
    assert_eq!(s[synth::at::IP_TTL], 63);
    assert_eq!(u16::from_be_bytes([s[50], s[51]]), synth::l4_checksum(s));
    let ip: &[u8; 20] = s[14..34].try_into().unwrap();
    assert!(vxlan::checksum::ipv4_header_ok(ip));
    // Reinjected by the coprocessor, the SYN goes through.
    p.set_reinjecting(true);
    let (sent, punted) = run(&mut p, &[syn]);
    assert!(punted.is_empty());
    assert_eq!(sent.len(), 1);
}

#[test]
fn tracked_rewrites_stay_inside_the_ip_packet() {
    // A TCP segment whose IP total length (24) ends before its TCP flags
    // and checksum: the bytes there belong to no packet (here, what an
    // earlier frame of the chunk held) and must be neither read nor
    // written.
    let mut p = pipeline();
    let f = vm1_flow();
    let ack = synth::tcp_frame(&f, 0x10, b"");
    let key = key_of(&ack, Ingress::Port(VM1));
    let action = Action {
        conntrack: true,
        nat: Some(flowtable::Nat {
            side: flowtable::NatSide::Src,
            ip: 0xcb00_710a,
            port: Some(40000),
        }),
        ..Action::output(VM2)
    };
    p.table_mut().insert(key, &action, 0).unwrap();
    let mut short = ack.clone();
    short[16..18].copy_from_slice(&24u16.to_be_bytes());
    let run = |p: &mut Pipeline| {
        let (mem, descs, out) = run(p, VM1, std::slice::from_ref(&short));
        let tx = out.tx.iter().map(|(_, l)| l.len()).sum::<usize>();
        let punts: Vec<PuntReason> = out.punt.iter().map(|i| i.reason).collect();
        (tx, punts, bytes(&mem, descs[0]).to_vec())
    };
    // Its flags cannot be read: the coprocessor judges it, untouched.
    let (tx, punts, after) = run(&mut p);
    assert_eq!((tx, punts), (0, vec![PuntReason::CtEvent]));
    assert_eq!(after, short);
    // Reinjected, it cannot be translated: a counted drop, untouched.
    p.set_reinjecting(true);
    let before = p.counters().drops.get(DropReason::NatTooShort);
    let (tx, punts, after) = run(&mut p);
    assert_eq!((tx, punts.len()), (0, 0));
    assert_eq!(p.counters().drops.get(DropReason::NatTooShort), before + 1);
    assert_eq!(after, short, "nothing written past the packet");
}

#[test]
fn counters_go_by_name_and_fit_the_ports() {
    let mut c = PipelineCounters {
        port_drops: vec![DropCounters::default(); 3],
        rx_packets: 10,
        hits: 7,
        ..PipelineCounters::default()
    };
    c.count_drop(PortId(2), DropReason::ALL[0]);
    c.count_drop(PortId(2), DropReason::ALL[0]);
    c.punts[PuntReason::ALL[1].index()] = 4;
    let mut named = c.to_named();
    // A reason this binary does not know is left out.
    named.drops.insert("from_a_newer_binary".into(), 9);
    let back = PipelineCounters::from_named(&named, 3);
    assert_eq!(back, c);
    let fewer = PipelineCounters::from_named(&named, 2);
    assert_eq!(fewer.port_drops.len(), 2);
    assert_eq!(fewer.drops.get(DropReason::ALL[0]), 2);
}
