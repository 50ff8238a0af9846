//! The handover's state at scale: 1 000 000 flows and 100 000 tracked
//! connections (half through SNAT) on a switch with 1 000 remote
//! endpoints. Times what the handover does with it — save the shared
//! state, encode the snapshot, move it through a Unix socket, decode,
//! restore (topology, policy, connections, NAT bindings) — and prints
//! `handover_1m_ms=<total> snapshot_1m_mib=<size>` with the phases.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use coprocessor::acl::Policy;
use coprocessor::conntrack::{
    Admission, Conn, ConnState, Limits, NatBinding, Side, TcpState, Timeouts,
};
use coprocessor::shared::Shared;
use coprocessor::topology::{External, LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use flowtable::{Action, EncapTemplate, FlowKey, FlowStats, Ingress, Nat, NatSide, PortId, Vni};
use live_migrate::SwitchState;

fn main() {
    let vni = Vni::new(100).unwrap();
    let mut t = Topology::new(Some(Uplink {
        port: PortId(2),
        mac: [2, 0xaa, 0, 0, 0, 1],
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        mtu: 1500,
        ttl: 64,
    }));
    t.external = Some(External {
        port: PortId(1),
        mac: [2, 0xee, 0, 0, 0, 1],
        cidr: "203.0.113.0/24".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
        snat: (10..20).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect(),
        ports: (1024, 65535),
        per_vm_ports: 1_000_000,
    });
    t.add_network(Network {
        vni,
        subnets: vec![Subnet {
            cidr: "10.0.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        }],
        gateway_mac: [2, 0, 0, 0, 0, 0xfe],
        dns: vec![],
        lease_secs: 3600,
        routes: vec![],
        gateway_vtep: None,
        snat: true,
    })
    .unwrap();
    t.add_vm(LocalVm {
        name: "a".into(),
        port: PortId(0),
        mac: [2, 0, 0, 0, 0, 1],
        ips: vec![Ipv4Addr::new(10, 0, 0, 10)],
        vni,
        hostname: None,
        groups: vec![],
        floating_ip: None,
    })
    .unwrap();
    for i in 0..1000u32 {
        let b = i.to_be_bytes();
        t.add_remote(RemoteVm {
            ip: Ipv4Addr::from(0x0a00_1000 + i),
            mac: [2, 1, 0, 0, b[2], b[3]],
            vni,
            vtep: Ipv4Addr::new(192, 168, 1, u8::try_from(i % 200).unwrap()),
            groups: vec![],
        })
        .unwrap();
    }
    let limits = Limits {
        max: 200_000,
        per_vm: 200_000,
    };
    let mut sh = Shared::new(t, Policy::default(), Timeouts::default(), limits);
    let encap = Action {
        encap: Some(EncapTemplate([7; 50])),
        conntrack: true,
        ..Action::output(PortId(2))
    };
    for i in 0..100_000u32 {
        let nat = i % 2 == 0;
        let dst = if nat {
            0xc633_6400 + i % 200
        } else {
            0x0a00_1000 + i % 1000
        };
        let sport = u16::try_from(1024 + i % 60_000).unwrap();
        let fwd = FlowKey::new(
            Ingress::Port(PortId(0)),
            6,
            0x0a00_000a + i / 60_000,
            dst,
            sport,
            443,
        );
        let (rev, action, binding) = if nat {
            let (ip, port) = sh.nat.as_mut().unwrap().allocate(PortId(0), 6).unwrap();
            let rev = FlowKey::new(Ingress::Port(PortId(1)), 6, dst, ip, 443, port);
            let a = Action {
                nat: Some(Nat {
                    side: NatSide::Dst,
                    ip: 0x0a00_000a,
                    port: Some(sport),
                }),
                conntrack: true,
                ..Action::output(PortId(0))
            };
            (
                rev,
                a,
                Some(NatBinding {
                    ip,
                    port,
                    pooled: true,
                }),
            )
        } else {
            let rev = FlowKey::new(Ingress::Vni(vni), 6, dst, fwd.src_ip, 443, sport);
            (
                rev,
                Action {
                    decap: Some(0xc0a8_0102),
                    ..encap
                },
                None,
            )
        };
        let side = |key, action| Side {
            key,
            action,
            installed: true,
        };
        let mut c = Conn::new(
            [side(fwd, encap), side(rev, action)],
            ConnState::Tcp(TcpState::Established),
            Admission {
                vni: 100,
                src: fwd.src_ip,
                dst,
                proto: 6,
                port: 443,
                egress: None,
                ingress: None,
                rule: None,
            },
            1,
        );
        c.nat = binding;
        sh.ct.insert(c, Some(PortId(0)), 1).unwrap();
    }
    // One encapsulation per remote VTEP, as the flow table would hold.
    let encaps: Vec<Action> = (0..200u8)
        .map(|v| Action {
            encap: Some(EncapTemplate([v; 50])),
            ..encap
        })
        .collect();
    // As the paused fast path dumps them: its own action ids, dense.
    let dumped: Vec<(FlowKey, u32, FlowStats)> = (0..1_000_000u32)
        .map(|i| {
            (
                FlowKey::new(
                    Ingress::Port(PortId(0)),
                    17,
                    0x0a00_000a,
                    0x0a00_1000 + i % 1000,
                    u16::try_from(i % 65_000).unwrap(),
                    u16::try_from(i / 65_000).unwrap(),
                ),
                i % 200,
                FlowStats {
                    packets: u64::from(i),
                    bytes: u64::from(i) * 64,
                    last_used: 5,
                },
            )
        })
        .collect();

    let t0 = Instant::now();
    let mut flows = live_migrate::Flows::with_capacity(dumped.len());
    for (key, action, stats) in &dumped {
        flows.push(&live_migrate::FlowRecord {
            key: *key,
            action: *action,
            stats: *stats,
        });
    }
    let state = SwitchState {
        clock_ns: 10_000_000_000,
        config: String::new(),
        shared: sh.save(),
        actions: encaps,
        flows,
    };
    let t_save = t0.elapsed();
    let snap = live_migrate::encode(&state).unwrap();
    let t_encode = t0.elapsed();
    let (a, mut b) = UnixStream::pair().unwrap();
    let len = snap.len();
    let writer = std::thread::spawn(move || {
        let mut a = a;
        a.write_all(&snap).unwrap();
    });
    let mut got = vec![0u8; len];
    b.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    let t_transfer = t0.elapsed();
    let back = live_migrate::decode(&got).unwrap();
    let t_decode = t0.elapsed();
    let restored = Shared::restore(back.shared, back.clock_ns).unwrap();
    let t_restore = t0.elapsed();
    assert_eq!(restored.ct.len(), 100_000);
    assert_eq!(restored.nat.as_ref().unwrap().in_use(), 50_000);
    assert_eq!(back.flows.len(), 1_000_000);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    assert_eq!(back.actions.len(), 200);
    println!(
        "save {:.1} ms, encode {:.1} ms, transfer {:.1} ms, decode {:.1} ms, restore {:.1} ms",
        ms(t_save),
        ms(t_encode - t_save),
        ms(t_transfer - t_encode),
        ms(t_decode - t_transfer),
        ms(t_restore - t_decode)
    );
    println!(
        "handover_1m_ms={:.1} snapshot_1m_mib={:.1}",
        ms(t_restore),
        len as f64 / (1 << 20) as f64
    );
}
