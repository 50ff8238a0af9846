//! The handover's state at scale: 1 000 000 flows and 100 000 tracked
//! connections (half through SNAT) on a switch with 1 000 remote
//! endpoints. Times what the handover's pre-copy does with it — dump the
//! flow table, save the shared state, encode the snapshot into a sealed
//! memfd, pass it through a Unix socket, decode, restore (the flows into a
//! new table on one thread, topology, policy, connections and NAT
//! bindings on another, as the new binary does) — and prints
//! `handover_1m_ms=<total> snapshot_1m_mib=<size>` with the phases.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use coprocessor::acl::Policy;
use coprocessor::conntrack::{
    Admission, Conn, ConnState, Limits, NatBinding, Side, TcpState, Timeouts,
};
use coprocessor::shared::Shared;
use coprocessor::topology::{External, LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use flowtable::{
    Action, EncapTemplate, FlowHasher, FlowKey, FlowTable, Ingress, Nat, NatSide, PortId, Vni,
};
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
    let sh = Shared::new(t, Policy::default(), Timeouts::default(), limits);
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
            let (ip, port) = sh
                .nat
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .allocate(PortId(0), 6)
                .unwrap();
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
            installed: 1,
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
    // The old binary's flow table: 1 000 000 flows over those actions.
    let mut old = FlowTable::new(1 << 21).unwrap();
    for i in 0..1_000_000u32 {
        let key = FlowKey::new(
            Ingress::Port(PortId(0)),
            17,
            0x0a00_000a,
            0x0a00_1000 + i % 1000,
            u16::try_from(i % 65_000).unwrap(),
            u16::try_from(i / 65_000).unwrap(),
        );
        old.insert(key, &encaps[(i % 200) as usize], 5).unwrap();
    }

    // The new binary's table, prepared as it does at its start, before it
    // asks for anything (huge pages advised, memory faulted in).
    let mut new = FlowTable::new(1 << 21).unwrap();
    let _ = fastpath::hugepage::advise_flow_table(&new);
    fastpath::hugepage::populate_flow_table(&new).unwrap();

    // The old binary's snapshot memory, made ready before it holds its
    // coprocessors (src/control.rs).
    let file = live_migrate::memfd::SnapshotFile::create(1_000_000 * 48 + 100_000 * 256).unwrap();

    // What the handover's pre-copy does, in order (src/handover.rs).
    let t0 = Instant::now();
    // The fast-path thread dumps its table while the control thread saves
    // the shared state (src/control.rs).
    let (dumped, actions, saved) = std::thread::scope(|sc| {
        let d = sc.spawn(|| fastpath::dataplane::dump_flows(&old));
        let shared = sh.save();
        let (dumped, actions) = d.join().unwrap();
        (dumped, actions, shared)
    });
    let state = SwitchState {
        clock_ns: 10_000_000_000,
        config: String::new(),
        shared: saved,
        actions,
        flows: live_migrate::Flows::default(),
        since2: None,
    };
    let t_save = t0.elapsed();
    let records = dumped
        .iter()
        .map(|(key, action, stats)| live_migrate::FlowRecord {
            key: *key,
            action: *action,
            stats: *stats,
        });
    let written = file.write(&state, records).unwrap();
    let (snap, len, section) = (written.fd, written.snapshot_len, written.flows);
    let t_encode = t0.elapsed();
    // The sealed memfd crosses a Unix socket as a descriptor.
    let (a, b) = UnixStream::pair().unwrap();
    live_migrate::fdpass::send(&a, &[1], &[snap.as_raw_fd()]).unwrap();
    let (_, mut got) = live_migrate::fdpass::recv(&b, &mut [0u8; 1]).unwrap();
    let got = got.pop().unwrap();
    let t_transfer = t0.elapsed();
    let back = live_migrate::memfd::decode_fd(got.as_fd(), len).unwrap();
    let mapped = live_migrate::memfd::MappedFlows::map(got.as_fd(), section).unwrap();
    let t_decode = t0.elapsed();
    // As the new binary does: the flows into the fast path's table on its
    // thread, the shared state on the main thread, at once.
    let n_conns = back.shared.conns.len();
    let seed = old.hasher().seed();
    let table = std::thread::spawn(move || {
        let t = Instant::now();
        assert!(new.set_hasher(FlowHasher::with_seed(seed)));
        let flows = mapped.into_records().map(|r| (r.key, r.action, r.stats));
        let r = new.restore(&back.actions, flows);
        (new, r, t.elapsed())
    });
    let t_shared = Instant::now();
    let restored = Shared::restore(back.shared, Vec::new(), back.clock_ns).unwrap();
    let t_shared = t_shared.elapsed();
    let (new, (inserted, refused), t_table) = table.join().unwrap();
    let t_restore = t0.elapsed();
    assert_eq!(n_conns, 100_000);
    assert_eq!(restored.ct.len(), 100_000);
    assert_eq!(
        restored.nat.lock().unwrap().as_ref().unwrap().in_use(),
        50_000
    );
    assert_eq!((inserted, refused), (1_000_000, 0));
    assert_eq!(new.len(), 1_000_000);
    assert_eq!(new.action_count(), 200);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "dump and save {:.1} ms, encode into a memfd (flows as raw records) {:.1} ms, pass it {:.1} ms, decode (flows mapped in place) {:.1} ms, restore {:.1} ms (flows into a table {:.1} ms ∥ shared state {:.1} ms)",
        ms(t_save),
        ms(t_encode - t_save),
        ms(t_transfer - t_encode),
        ms(t_decode - t_transfer),
        ms(t_restore - t_decode),
        ms(t_table),
        ms(t_shared)
    );
    println!(
        "handover_1m_ms={:.1} snapshot_1m_mib={:.1}",
        ms(t_restore),
        (len + section.count * live_migrate::FLOW_BYTES) as f64 / (1 << 20) as f64
    );
}
