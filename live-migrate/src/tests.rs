use std::net::Ipv4Addr;

use coprocessor::acl::{Direction, Peer, Policy, Rule, SecurityGroup};
use coprocessor::conntrack::{Admission, Conn, ConnState, Limits, Side, TcpState, Timeouts};
use coprocessor::shared::Shared;
use coprocessor::topology::{LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use flowtable::{Action, EncapTemplate, FlowKey, FlowStats, Ingress, Nat, NatSide, PortId, Vni};

use super::*;

/// Flows with their actions interned, as the fast path's dump gives them.
fn intern(flows: impl IntoIterator<Item = (FlowKey, Action, FlowStats)>) -> (Vec<Action>, Flows) {
    let mut ids: std::collections::HashMap<Action, u32> = std::collections::HashMap::new();
    let mut actions = Vec::new();
    let mut out = Flows::default();
    for (key, a, stats) in flows {
        let action = *ids.entry(a).or_insert_with(|| {
            actions.push(a);
            u32::try_from(actions.len() - 1).unwrap_or(u32::MAX)
        });
        out.push(&FlowRecord { key, action, stats });
    }
    (actions, out)
}

/// A small but complete state, the same every time.
pub(crate) fn state() -> SwitchState {
    let vni = Vni::new(100).unwrap();
    let mut t = Topology::new(Some(Uplink {
        port: PortId(2),
        mac: [2, 0xaa, 0, 0, 0, 1],
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        mtu: 1500,
        ttl: 64,
    }));
    t.add_network(Network {
        vni,
        subnets: vec![Subnet {
            cidr: "10.0.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        }],
        gateway_mac: [2, 0, 0, 0, 0, 0xfe],
        dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
        lease_secs: 600,
        routes: vec![],
        gateway_vtep: None,
        snat: false,
    })
    .unwrap();
    t.add_vm(LocalVm {
        name: "a".into(),
        port: PortId(0),
        mac: [2, 0, 0, 0, 0, 0x0a],
        ips: vec![Ipv4Addr::new(10, 0, 0, 10)],
        vni,
        hostname: Some("vm-a".into()),
        groups: vec![0],
        floating_ip: None,
    })
    .unwrap();
    t.add_remote(RemoteVm {
        ip: Ipv4Addr::new(10, 0, 0, 20),
        mac: [2, 0, 0, 0, 1, 0x20],
        vni,
        vtep: Ipv4Addr::new(192, 168, 0, 2),
        groups: vec![],
    })
    .unwrap();
    t.set_neighbor(Ipv4Addr::new(192, 168, 0, 2), [2, 0xbb, 0, 0, 0, 2]);
    let mut policy = Policy::new(vec![SecurityGroup {
        name: "web".into(),
        rules: vec![Rule {
            direction: Direction::Ingress,
            proto: Some(6),
            ports: (80, 80),
            peer: Peer::Cidr("0.0.0.0/0".parse().unwrap()),
        }],
    }])
    .unwrap();
    policy.add_member(0, 100, Ipv4Addr::new(10, 0, 0, 10));
    let sh = Shared::new(t, policy, Timeouts::default(), Limits::default());
    let fwd = FlowKey::new(
        Ingress::Port(PortId(0)),
        6,
        0x0a00_000a,
        0x0a00_0014,
        40000,
        80,
    );
    let rev = FlowKey::new(Ingress::Vni(vni), 6, 0x0a00_0014, 0x0a00_000a, 80, 40000);
    let encap = Action {
        encap: Some(EncapTemplate([7; 50])),
        conntrack: true,
        ..Action::output(PortId(2))
    };
    let decap = Action {
        decap: Some(0xc0a8_0002),
        nat: Some(Nat {
            side: NatSide::Dst,
            ip: 0x0a00_000a,
            port: Some(40000),
        }),
        conntrack: true,
        ..Action::output(PortId(0))
    };
    let side = |key, action| Side {
        key,
        action,
        installed: u64::MAX,
    };
    let adm = Admission {
        vni: 100,
        src: 0x0a00_000a,
        dst: 0x0a00_0014,
        proto: 6,
        port: 80,
        egress: Some(PortId(0)),
        ingress: None,
        rule: None,
    };
    sh.ct
        .insert(
            Conn::new(
                [side(fwd, encap), side(rev, decap)],
                ConnState::Tcp(TcpState::Established),
                adm,
                5_000,
            ),
            Some(PortId(0)),
            5_000,
        )
        .unwrap();
    let (actions, flows) = intern([
        (
            fwd,
            encap,
            FlowStats {
                packets: 3,
                bytes: 300,
                last_used: 6_000,
            },
        ),
        (rev, decap, FlowStats::default()),
        (
            FlowKey::new(Ingress::Port(PortId(0)), 17, 1, 2, 3, 4),
            encap,
            FlowStats::default(),
        ),
    ]);
    assert_eq!(actions.len(), 2, "shared actions are stored once");
    SwitchState {
        clock_ns: 7_000_000_000,
        config: "[switch]\npoll = \"busy\"\n".into(),
        shared: sh.save(),
        actions,
        flows,
        since2: Some(Since2::default()),
    }
}

/// [`state`] with what format 2 adds: a service of two backends.
pub(crate) fn state_v2() -> SwitchState {
    use coprocessor::services::{BackendSpec, ServiceSpec};
    let mut s = state();
    s.since2 = Some(Since2::default());
    let services = vec![ServiceSpec {
        name: "web".into(),
        vni: 100,
        vip: Ipv4Addr::new(10, 0, 0, 100),
        proto: 6,
        port: 80,
        backends: vec![
            BackendSpec {
                ip: Ipv4Addr::new(10, 0, 0, 5),
                port: 8080,
                weight: 2,
            },
            BackendSpec {
                ip: Ipv4Addr::new(10, 0, 0, 6),
                port: 8080,
                weight: 0,
            },
        ],
        max_connections: 1000,
        health: Some(coprocessor::health::HealthSpec {
            tcp: true,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
        }),
        external_vip: None,
    }];
    s.since2 = Some(Since2 { services });
    s
}

#[test]
fn a_snapshot_round_trips() {
    let s = state_v2();
    let bytes = encode(&s).unwrap();
    assert_eq!(bytes[..8], MAGIC);
    assert_eq!(bytes[8..12], FORMAT.to_le_bytes());
    assert_eq!(decode(&bytes).unwrap(), s);
    assert_eq!(s.flows().filter(|(_, a)| a.encap.is_some()).count(), 2);
    // And the shared state it carries restores.
    let services = s.since2.clone().unwrap().services;
    let sh = Shared::restore(s.shared.clone(), services.clone(), s.clock_ns).unwrap();
    assert_eq!(sh.ct.len(), 1);
    assert_eq!(sh.topo.vm_named("a").map(|v| v.port), Some(PortId(0)));
    assert_eq!(sh.services().specs(), services);
}

#[test]
fn damaged_snapshots_are_refused_with_their_defect() {
    let bytes = encode(&state()).unwrap();
    assert_eq!(
        decode(b"hello, world, not a snapshot"),
        Err(SnapshotError::NotASnapshot)
    );
    for cut in [0, 7, 23, 24, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            matches!(decode(&bytes[..cut]), Err(SnapshotError::Truncated { .. })),
            "cut at {cut}"
        );
    }
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert!(matches!(
        decode(&flipped),
        Err(SnapshotError::Corrupt { .. })
    ));
    let mut future = bytes.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(
        decode(&future),
        Err(SnapshotError::UnsupportedFormat { found: 99 })
    );
    // A body that passes the checksum but does not decode.
    let mut lying = bytes[..24].to_vec();
    lying.extend_from_slice(&[0xff; 16]);
    lying[12..20].copy_from_slice(&16u64.to_le_bytes());
    let crc = crc32fast::hash(&[0xff; 16]);
    lying[20..24].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(decode(&lying), Err(SnapshotError::Body(_))));
}

/// The checked-in snapshot of format 1 (what the previous release
/// writes) still loads, with nothing of format 2's.
#[test]
fn the_format_1_fixture_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1.snap");
    let bytes = std::fs::read(&path).expect("fixtures/v1.snap is checked in");
    assert_eq!(bytes[8..12], 1u32.to_le_bytes());
    let s = decode(&bytes).expect("format 1 loads");
    // The previous release counted fewer drop causes, and had no services.
    let mut want = state();
    assert_eq!(s.shared.counters.drops.len(), 31);
    want.shared.counters.drops.truncate(31);
    want.since2 = None;
    assert_eq!(s, want);
    let sh = Shared::restore(s.shared, Vec::new(), s.clock_ns).expect("and restores");
    assert!(sh.services().is_empty());
    assert_eq!(sh.counters().drops.len(), coprocessor::DropCause::ALL.len());
}

/// The checked-in snapshot of format 2 loads. (Regenerate only while
/// format 2 is the current one: `UPDATE_FIXTURES=1 cargo test -p
/// live-migrate`; a new format gets a new fixture and this one stays.)
#[test]
fn the_format_2_fixture_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v2.snap");
    if std::env::var_os("UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, encode(&state_v2()).unwrap()).unwrap();
    }
    let bytes = std::fs::read(&path).expect("fixtures/v2.snap is checked in");
    let s = decode(&bytes).expect("format 2 loads");
    assert_eq!(s, state_v2());
    let services = s.since2.expect("format 2 has them").services;
    let sh = Shared::restore(s.shared, services, s.clock_ns).expect("and restores");
    assert!(sh.services().named("web").is_some());
}

/// A large flow table goes through the snapshot file's flow section and
/// back into a table with the same hash seed: every flow, action and
/// counter as it was, in the same slot order.
#[test]
fn a_large_flow_table_survives_the_snapshot_file() {
    use flowtable::{FlowHasher, FlowTable};
    let mut old = FlowTable::new(300_000).unwrap();
    let encaps: Vec<Action> = (0..50u8)
        .map(|v| Action {
            encap: Some(EncapTemplate([v; 50])),
            ..Action::output(PortId(2))
        })
        .collect();
    for i in 0..200_000u32 {
        let key = FlowKey::new(
            Ingress::Port(PortId(u16::try_from(i % 3).unwrap())),
            17,
            0x0a00_0000 | i,
            0x0a01_0000 | (i * 7),
            u16::try_from(i % 60_000).unwrap(),
            53,
        );
        old.insert(key, &encaps[(i % 50) as usize], u64::from(i))
            .unwrap();
    }
    let mut state = state();
    state.flows = Flows::default();
    let dumped: Vec<FlowRecord> = old
        .iter()
        .map(|e| FlowRecord {
            key: e.key,
            action: u32::try_from(encaps.iter().position(|a| a == e.action).unwrap()).unwrap(),
            stats: e.stats,
        })
        .collect();
    state.actions = encaps.clone();
    let w = memfd::SnapshotFile::create(1 << 20)
        .unwrap()
        .write(&state, dumped.iter().copied())
        .unwrap();
    let back = memfd::decode_fd(std::os::fd::AsFd::as_fd(&w.fd), w.snapshot_len).unwrap();
    assert_eq!(back, state);
    let mapped = memfd::MappedFlows::map(std::os::fd::AsFd::as_fd(&w.fd), w.flows).unwrap();
    let mut new = FlowTable::new(300_000).unwrap();
    assert!(new.set_hasher(FlowHasher::with_seed(old.hasher().seed())));
    let records = mapped.into_records().map(|r| (r.key, r.action, r.stats));
    assert_eq!(new.restore(&back.actions, records), (200_000, 0));
    let a: Vec<_> = old.iter().map(|e| (e.key, *e.action, e.stats)).collect();
    let b: Vec<_> = new.iter().map(|e| (e.key, *e.action, e.stats)).collect();
    assert_eq!(a, b, "same flows, actions, counters, order");
    assert_eq!(new.action_count(), 50);
}
