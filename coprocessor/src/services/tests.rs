use super::*;
use crate::topology::{LocalVm, Network, Subnet};
use flowtable::{PortId, Vni};

fn topo() -> Topology {
    let mut t = Topology::new(None);
    t.add_network(Network {
        vni: Vni::new(7).unwrap(),
        subnets: vec![Subnet {
            cidr: "10.1.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 1, 0, 1),
        }],
        gateway_mac: [2, 0, 0, 0, 0, 1],
        dns: vec![],
        lease_secs: 60,
        routes: vec![],
        gateway_vtep: None,
        snat: false,
    })
    .unwrap();
    t.add_vm(LocalVm {
        name: "a".into(),
        port: PortId(1),
        mac: [2, 0, 0, 0, 0, 2],
        ips: vec![Ipv4Addr::new(10, 1, 0, 5)],
        vni: Vni::new(7).unwrap(),
        hostname: None,
        groups: vec![],
        floating_ip: None,
    })
    .unwrap();
    t
}

fn spec(name: &str, vip: [u8; 4], backends: &[(u8, u32)]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vni: 7,
        vip: Ipv4Addr::from(vip),
        proto: 6,
        port: 443,
        backends: backends
            .iter()
            .map(|(last, weight)| BackendSpec {
                ip: Ipv4Addr::new(10, 1, 0, *last),
                port: 8443,
                weight: *weight,
            })
            .collect(),
        max_connections: 0,
        health: None,
        external_vip: None,
    }
}

#[test]
fn every_bad_field_is_refused_by_name() {
    let t = topo();
    let s = Services::default();
    let cases: Vec<(ServiceSpec, &str)> = vec![
        (
            ServiceSpec {
                proto: 1,
                ..spec("x", [10, 1, 0, 9], &[])
            },
            "field `protocol`",
        ),
        (
            ServiceSpec {
                port: 0,
                ..spec("x", [10, 1, 0, 9], &[])
            },
            "field `port`",
        ),
        (
            ServiceSpec {
                vni: 8,
                ..spec("x", [10, 1, 0, 9], &[])
            },
            "field `network`",
        ),
        (spec("x", [10, 2, 0, 9], &[]), "in no subnet"),
        (spec("x", [10, 1, 0, 1], &[]), "is a gateway"),
        (spec("x", [10, 1, 0, 5], &[]), "a VM's address"),
        (spec("", [10, 1, 0, 9], &[]), "field `name`"),
        (spec("x", [10, 1, 0, 9], &[(9, 1)]), "field `backends[0]`"),
    ];
    for (bad, what) in cases {
        let e = s.check(&bad, &t, None).unwrap_err().to_string();
        assert!(e.contains(what), "{e} lacks {what}");
    }
    let mut s = Services::default();
    let dup = spec("x", [10, 1, 0, 9], &[(5, 1), (5, 2)]);
    let e = s.insert(dup).unwrap_err().to_string();
    assert!(e.contains("field `backends`") && e.contains("twice"), "{e}");
    assert!(s.is_empty());
}

#[test]
fn names_and_vips_are_unique_and_an_address_serves_several_ports() {
    let t = topo();
    let mut s = Services::default();
    let a = spec("a", [10, 1, 0, 9], &[(5, 1)]);
    s.check(&a, &t, None).unwrap();
    s.insert(a.clone()).unwrap();
    assert!(s.check(&a, &t, None).is_err(), "same name");
    let same_vip = ServiceSpec {
        name: "b".into(),
        ..a.clone()
    };
    assert!(s
        .check(&same_vip, &t, None)
        .unwrap_err()
        .to_string()
        .contains("service a"));
    let other_port = ServiceSpec {
        port: 80,
        ..same_vip
    };
    s.check(&other_port, &t, None).unwrap();
    s.insert(other_port).unwrap();
    assert!(s.is_vip(7, Ipv4Addr::new(10, 1, 0, 9)));
    s.remove("a").unwrap();
    assert!(s.is_vip(7, Ipv4Addr::new(10, 1, 0, 9)), "b still holds it");
    s.remove("b").unwrap();
    assert!(!s.is_vip(7, Ipv4Addr::new(10, 1, 0, 9)));
}

#[test]
fn a_backend_down_leaves_the_table_and_its_health_survives_a_reweight() {
    let mut s = Services::default();
    let checked = |mut sp: ServiceSpec| {
        sp.health = Some(crate::health::HealthSpec {
            tcp: true,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 2,
        });
        sp
    };
    s.insert(checked(spec("a", [10, 1, 0, 9], &[(20, 1), (21, 1)])))
        .unwrap();
    let b20 = Ipv4Addr::new(10, 1, 0, 20);
    assert!(s.set_down("a", b20, 8443, true));
    assert!(!s.set_down("a", b20, 8443, true), "no change");
    let only_21 = |s: &Services| {
        let t = s.named("a").unwrap().table.clone().unwrap();
        t.counts()[t.backends().iter().position(|b| b.ip == b20).unwrap()] == 0
    };
    assert!(only_21(&s));
    s.insert(checked(spec(
        "a",
        [10, 1, 0, 9],
        &[(20, 5), (21, 1), (22, 1)],
    )))
    .unwrap();
    assert!(only_21(&s), "still down after the change");
    assert!(s.set_down("a", b20, 8443, false));
    assert!(!only_21(&s));
    // Without a health check any more, nothing is held down.
    s.set_down("a", b20, 8443, true);
    s.insert(spec("a", [10, 1, 0, 9], &[(20, 5), (21, 1)]))
        .unwrap();
    assert!(!only_21(&s));
    // All down: no table, nothing to pick.
    s.insert(spec("a", [10, 1, 0, 9], &[(20, 0)])).unwrap();
    assert!(s.named("a").unwrap().table.is_none());
}

#[test]
fn counts_are_per_vip_and_never_underflow() {
    let mut s = Services::default();
    let k = spec("a", [10, 1, 0, 9], &[]).key();
    s.opened(&k);
    s.opened(&k);
    s.closed(&k);
    assert_eq!(s.conns(&k), 1);
    s.closed(&k);
    s.closed(&k);
    assert_eq!(s.conns(&k), 0);
}

#[test]
fn passive_counts_of_a_backend_no_service_lists_are_forgotten() {
    use crate::conntrack::{Admission, Conn, ConnState, Side};
    use flowtable::{Action, FlowKey, Ingress, Nat, NatSide};
    let t = topo();
    let mut s = Services::default();
    s.insert(spec("a", [10, 1, 0, 9], &[(20, 1)])).unwrap();
    let key = FlowKey::new(
        Ingress::Port(PortId(1)),
        6,
        1,
        u32::from(Ipv4Addr::new(10, 1, 0, 9)),
        5,
        443,
    );
    let dnat = Action {
        nat: Some(Nat {
            side: NatSide::Dst,
            ip: u32::from(Ipv4Addr::new(10, 1, 0, 20)),
            port: Some(8443),
        }),
        ..Action::output(PortId(2))
    };
    let side = |key, action| Side {
        key,
        action,
        installed: 1,
    };
    let admission = Admission {
        vni: 7,
        src: 1,
        dst: 2,
        proto: 6,
        port: 8443,
        egress: None,
        ingress: None,
        rule: None,
    };
    let c = Conn::new(
        [side(key, dnat), side(key, Action::output(PortId(1)))],
        ConnState::Udp { replied: false },
        admission,
        0,
    );
    s.passive(&c, Passive::Refused, 0);
    assert_eq!(
        s.passive_counts(7, Ipv4Addr::new(10, 1, 0, 20), 8443)
            .refused,
        1
    );
    s.insert(spec("a", [10, 1, 0, 9], &[(21, 1)])).unwrap();
    s.health_tick(&t, 1);
    assert_eq!(
        s.passive_counts(7, Ipv4Addr::new(10, 1, 0, 20), 8443)
            .refused,
        0
    );
    // Not listed: not counted at all.
    s.passive(&c, Passive::Refused, 0);
    assert!(s.passive.is_empty());
}
