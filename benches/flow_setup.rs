//! Coprocessor flow setup rate: a punted miss is decided (anti-spoof,
//! forwarding or routing, flow compile with a VXLAN template) and the
//! resulting flow installed in a flow table — one setup per new flow, on
//! one thread. Stages not built yet (security groups with 100 rules,
//! conntrack, NAT) are not in this figure; `benches/flow-setup` says so.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;

use coprocessor::topology::{LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use coprocessor::{Coprocessor, PuntKind, Punted};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastpath::synth::{self, UdpFlow};
use flowtable::{FlowHasher, FlowKey, FlowTable, Ingress, PortId, Vni};

const FLOWS: usize = 4096;

fn setup() -> (Coprocessor, Vec<(Vec<u8>, FlowKey)>) {
    let vni = Vni::new(100).unwrap();
    let mut t = Topology::new(Some(Uplink {
        port: PortId(0),
        mac: [2, 0xaa, 0, 0, 0, 1],
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        mtu: 1500,
        ttl: 64,
    }));
    t.add_network(Network {
        vni,
        subnets: vec![
            Subnet {
                cidr: "10.0.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            Subnet {
                cidr: "10.1.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 1, 0, 1),
            },
        ],
        gateway_mac: [2, 0, 0, 0, 0, 0xfe],
        dns: vec![],
        lease_secs: 3600,
        routes: vec![],
        gateway_vtep: None,
        snat: false,
    })
    .unwrap();
    t.add_vm(LocalVm {
        name: "a".into(),
        port: PortId(1),
        mac: [2, 0, 0, 0, 0, 1],
        ips: vec![Ipv4Addr::new(10, 0, 0, 10)],
        vni,
        hostname: None,
        groups: vec![],
        floating_ip: None,
    })
    .unwrap();
    // 1 000 remote VMs on 16 hypervisors, half of them in the other subnet
    // (routed), half in ours.
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(if i % 2 == 0 { 0x0a00_1000 } else { 0x0a01_1000 } + i);
        let vtep = Ipv4Addr::new(192, 168, 1, u8::try_from(i % 16).unwrap());
        let b = i.to_be_bytes();
        t.add_remote(RemoteVm {
            ip,
            mac: [2, 1, 0, 0, b[2], b[3]],
            vni,
            vtep,
            groups: vec![],
        })
        .unwrap();
        t.set_neighbor(vtep, [2, 0xbb, 0, 0, 0, u8::try_from(i % 16).unwrap()]);
    }
    let frames = (0..FLOWS)
        .map(|n| {
            let i = u32::try_from(n % 1000).unwrap();
            let dst = Ipv4Addr::from(if i % 2 == 0 { 0x0a00_1000 } else { 0x0a01_1000 } + i);
            let f = synth::udp_frame(
                &UdpFlow {
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 0, 0xfe],
                    src_ip: Ipv4Addr::new(10, 0, 0, 10),
                    dst_ip: dst,
                    src_port: 1024 + u16::try_from(n).unwrap(),
                    dst_port: 80,
                },
                64,
            );
            let key = FlowKey::new(
                Ingress::Port(PortId(1)),
                17,
                0x0a00_000a,
                u32::from(dst),
                1024 + u16::try_from(n).unwrap(),
                80,
            );
            (f, key)
        })
        .collect();
    (Coprocessor::new(t), frames)
}

fn bench(c: &mut Criterion) {
    let (mut cp, frames) = setup();
    let mut table = FlowTable::with_hasher(FLOWS * 2, FlowHasher::with_seed(1)).unwrap();
    let mut g = c.benchmark_group("coprocessor");
    g.throughput(Throughput::Elements(FLOWS as u64));
    g.bench_function("flow_setup", |b| {
        b.iter(|| {
            for (f, key) in &frames {
                let out = cp.handle(&Punted {
                    ingress: PortId(1),
                    kind: PuntKind::Miss,
                    now: 0,
                    frame: f,
                    key: Some(*key),
                });
                for (k, a) in &out.flows {
                    // Installing over an existing key updates it in place, so
                    // every iteration does the same work.
                    black_box(table.insert(*k, a, 0).ok());
                }
                assert!(out.drop.is_none() && out.reinject);
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = flow_setup;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(flow_setup);
