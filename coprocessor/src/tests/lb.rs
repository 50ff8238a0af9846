//! Load-balanced services end to end: backend selection, the DNAT and
//! reverse SNAT flows, pinning, changes of the backend set, limits and
//! the answers a VIP gives itself.

use super::*;
use crate::maglev;
use crate::ops::Op;
use crate::services::{BackendSpec, ServiceSpec, VipKey};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

fn backend(ip: Ipv4Addr, port: u16, weight: u32) -> BackendSpec {
    BackendSpec { ip, port, weight }
}

/// `web`: VIP:80 over B:80 (local, filtered web), C:8080 (local, another
/// subnet) and R:80 (remote).
fn web(backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        vni: VNI,
        vip: VIP,
        proto: 6,
        port: 80,
        backends,
        max_connections: 0,
        health: None,
        external_vip: None,
    }
}

fn three() -> Vec<BackendSpec> {
    vec![
        backend(B_IP, 80, 1),
        backend(C_IP, 8080, 1),
        backend(R_IP, 80, 1),
    ]
}

fn with_service(spec: ServiceSpec) -> Net {
    let mut n = default_switch();
    n.cp.apply(vec![Op::AddService(spec)]).unwrap();
    n
}

/// The inner frame of VXLAN frame `wire`, which must be for `vtep`.
fn inner_for(wire: &[u8], vtep: Ipv4Addr) -> Vec<u8> {
    let d = vxlan::decap(
        wire,
        &vxlan::DecapConfig {
            local_vtep: u32::from(vtep),
            udp_port: 4789,
        },
    )
    .unwrap_or_else(|e| panic!("not VXLAN for {vtep}: {e:?}"));
    wire[d.inner()].to_vec()
}

/// Which backend a delivered SYN reached: (address, port), checked for
/// the DNAT's rewrite and checksums.
fn reached(w: Went) -> (Ipv4Addr, u16) {
    let f = match w {
        Went::To(UPLINK, wire) => inner_for(&wire, REMOTE_VTEP),
        Went::To(_, f) => f,
        other => panic!("not forwarded: {other:?}"),
    };
    checksums_ok(&f);
    assert_eq!(f[6..12], GW_MAC, "a VIP's traffic is routed");
    (ip_at(&f, 30), port_at(&f, 36))
}

fn syn_to_vip(sport: u16) -> Vec<u8> {
    tcp(A_MAC, A_IP, VIP, sport, 80, SYN)
}

#[test]
fn connections_spread_over_the_backends_and_replies_come_from_the_vip() {
    let mut n = with_service(web(three()));
    let mut seen = std::collections::HashMap::new();
    for sport in 20_000..20_300u16 {
        let to = reached(n.send(A, &syn_to_vip(sport)));
        *seen.entry(to).or_insert(0) += 1;
        // The pick is the Maglev table's for this 5-tuple.
        let sh = n.cp.shared().write();
        let t = sh.services().named("web").unwrap().table.clone().unwrap();
        let b = t.pick(maglev::flow_hash(A_IP, sport, VIP, 80, 6));
        assert_eq!((b.ip, b.port), to);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (b, c) in &seen {
        assert!((60..=140).contains(c), "{b:?} took {c} of 300");
    }
    // A reply from a local backend is SNATed back to the VIP.
    let sport = (20_000..20_300u16)
        .find(|s| {
            let t =
                n.cp.shared()
                    .write()
                    .services()
                    .named("web")
                    .unwrap()
                    .table
                    .clone();
            t.unwrap().pick(maglev::flow_hash(A_IP, *s, VIP, 80, 6)).ip == C_IP
        })
        .unwrap();
    let f = delivered(
        n.send(C, &tcp(C_MAC, C_IP, A_IP, 8080, sport, SYN | ACK)),
        A,
    );
    checksums_ok(&f);
    assert_eq!((ip_at(&f, 26), port_at(&f, 34)), (VIP, 80));
    assert_eq!(f[6..12], GW_MAC);
    assert_eq!(f[..6], A_MAC);
    let sh = n.cp.shared().write();
    let key = web(vec![]).key();
    assert_eq!(sh.services().conns(&key), 300);
    assert_eq!(sh.services().get(&key).unwrap().counters.picked, 300);
}

#[test]
fn a_remote_backends_replies_are_restored_and_checked_against_its_vtep() {
    let mut n = with_service(web(vec![backend(R_IP, 80, 1)]));
    assert_eq!(reached(n.send(A, &syn_to_vip(30_000))), (R_IP, 80));
    let reply = tcp(R_MAC, R_IP, A_IP, 80, 30_000, SYN | ACK);
    let f = delivered(
        n.send(UPLINK, &super::super::from_remote(&reply, REMOTE_VTEP, VNI)),
        A,
    );
    assert_eq!((ip_at(&f, 26), port_at(&f, 34)), (VIP, 80));
    // From another VTEP: refused.
    let forged = super::super::from_remote(&reply, Ipv4Addr::new(192, 168, 0, 99), VNI);
    assert!(matches!(n.send(UPLINK, &forged), Went::Dropped(_)));
}

#[test]
fn the_same_five_tuple_picks_the_same_backend_on_another_switch() {
    let mut one = with_service(web(three()));
    // The other host lists the backends in another order.
    let mut rev = three();
    rev.reverse();
    let mut two = with_service(web(rev));
    for sport in 40_000..40_100u16 {
        assert_eq!(
            reached(one.send(A, &syn_to_vip(sport))),
            reached(two.send(A, &syn_to_vip(sport)))
        );
    }
}

#[test]
fn a_removed_backends_connections_end_with_a_reset_and_the_others_keep_theirs() {
    let mut n = with_service(web(three()));
    let mut pinned = Vec::new();
    for sport in 21_000..21_060u16 {
        pinned.push((sport, reached(n.send(A, &syn_to_vip(sport)))));
    }
    let two = web(vec![backend(B_IP, 80, 1), backend(R_IP, 80, 1)]);
    let (out, applied) = n.cp.apply(vec![Op::ChangeService(two)]).unwrap();
    n.apply(&out);
    let gone = pinned.iter().filter(|(_, b)| b.0 == C_IP).count();
    assert!(gone > 0);
    assert_eq!(applied.connections_ended, gone);
    for (sport, b) in &pinned {
        let mut seg = tcp(A_MAC, A_IP, VIP, *sport, 80, ACK);
        seg[42..46].copy_from_slice(&777u32.to_be_bytes());
        let c = synth::l4_checksum(&seg);
        seg[50..52].copy_from_slice(&c.to_be_bytes());
        match n.send(A, &seg) {
            Went::To(A, rst) if b.0 == C_IP => {
                checksums_ok(&rst);
                assert_eq!((ip_at(&rst, 26), port_at(&rst, 34)), (VIP, 80));
                assert_eq!(port_at(&rst, 36), *sport);
                assert_eq!(rst[47], RST, "a reset");
                assert_eq!(&rst[38..42], &777u32.to_be_bytes(), "at the ACK's number");
            }
            w if b.0 != C_IP => assert_eq!(reached(w), *b, "kept its backend"),
            other => panic!("{sport}: {other:?}"),
        }
    }
    let sh = n.cp.shared().write();
    assert_eq!(
        sh.services().conns(&web(vec![]).key()),
        60 - u32::try_from(gone).unwrap()
    );
}

#[test]
fn a_drained_backend_keeps_its_connections_and_takes_no_new_ones() {
    let mut n = with_service(web(three()));
    let mut on_b = Vec::new();
    for sport in 22_000..22_060u16 {
        if reached(n.send(A, &syn_to_vip(sport))) == (B_IP, 80) {
            on_b.push(sport);
        }
    }
    assert!(!on_b.is_empty());
    let drained = vec![
        backend(B_IP, 80, 0),
        backend(C_IP, 8080, 1),
        backend(R_IP, 80, 1),
    ];
    let (out, applied) = n.cp.apply(vec![Op::ChangeService(web(drained))]).unwrap();
    n.apply(&out);
    assert_eq!(applied.connections_ended, 0);
    for sport in &on_b {
        let w = n.send(A, &tcp(A_MAC, A_IP, VIP, *sport, 80, ACK));
        assert_eq!(reached(w), (B_IP, 80));
    }
    for sport in 23_000..23_200u16 {
        assert_ne!(reached(n.send(A, &syn_to_vip(sport))).0, B_IP);
    }
}

#[test]
fn the_connection_limit_refuses_new_connections_and_counts_them() {
    let mut spec = web(three());
    spec.max_connections = 2;
    let mut n = with_service(spec);
    reached(n.send(A, &syn_to_vip(1)));
    reached(n.send(A, &syn_to_vip(2)));
    assert_eq!(
        n.send(A, &syn_to_vip(3)),
        Went::Dropped(Some(DropCause::LbConnLimit))
    );
    let key = web(vec![]).key();
    let counted = |n: &Net| {
        let sh = n.cp.shared().write();
        let svcs = sh.services();
        svcs.get(&key).unwrap().counters.refused_limit
    };
    assert_eq!(counted(&n), 1);
    // Their connections end (the service is replaced by one at another
    // port, then put back): the count follows, there is room again.
    let mut moved = web(three());
    moved.port = 8080;
    moved.max_connections = 2;
    let (out, applied) = n.cp.apply(vec![Op::ChangeService(moved)]).unwrap();
    n.apply(&out);
    assert_eq!(applied.connections_ended, 2);
    let mut back = web(three());
    back.max_connections = 2;
    let (out, _) = n.cp.apply(vec![Op::ChangeService(back)]).unwrap();
    n.apply(&out);
    assert_eq!(n.cp.shared().write().services().conns(&key), 0);
    reached(n.send(A, &syn_to_vip(3)));
    assert_eq!(counted(&n), 1, "counters survive the changes");
}

#[test]
fn a_service_without_backends_refuses_and_a_vip_answers_arp_and_ping() {
    let mut n = with_service(web(vec![backend(B_IP, 80, 0)]));
    assert_eq!(
        n.send(A, &syn_to_vip(5)),
        Went::Dropped(Some(DropCause::LbNoBackend))
    );
    // A segment of no connection, and a port the VIP does not serve: reset.
    match n.send(A, &tcp(A_MAC, A_IP, VIP, 6, 81, SYN)) {
        Went::To(A, rst) => assert_eq!(rst[47], RST | ACK),
        other => panic!("{other:?}"),
    }
    // UDP to it is not TCP: dropped.
    assert!(matches!(
        n.send(A, &udp(A_MAC, A_IP, VIP, 5, 80)),
        Went::Dropped(_)
    ));
    // ARP for the VIP: the gateway's MAC.
    let mut arp = vec![0u8; 42];
    arp[..6].fill(0xff);
    arp[6..12].copy_from_slice(&A_MAC);
    arp[12..14].copy_from_slice(&[8, 6]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&A_MAC);
    arp[28..32].copy_from_slice(&A_IP.octets());
    arp[38..42].copy_from_slice(&VIP.octets());
    match n.send(A, &arp) {
        Went::To(A, r) => assert_eq!(r[22..28], GW_MAC),
        other => panic!("{other:?}"),
    }
    // The service gone, its address is nobody's: decisions see that at
    // once (they ask the addresses kept beside the services).
    n.cp.apply(vec![Op::RemoveService("web".into())]).unwrap();
    assert_eq!(
        n.send(A, &arp),
        Went::Dropped(Some(DropCause::ArpUnknownTarget))
    );
}

#[test]
fn vips_and_addresses_never_overlap_and_a_used_network_stays() {
    let mut n = with_service(web(three()));
    let vm = LocalVm {
        name: "v".into(),
        port: PortId(5),
        mac: [2, 0, 0, 0, 0, 0x55],
        ips: vec![VIP],
        vni: vni(VNI),
        hostname: None,
        groups: vec![],
        floating_ip: None,
    };
    let e = n.cp.apply(vec![Op::AddVm(vm)]).unwrap_err();
    assert!(e.to_string().contains("VIP"), "{e}");
    let e = n.cp.apply(vec![Op::RemoveNetwork(VNI)]).unwrap_err();
    assert!(e.to_string().contains("service web"), "{e}");
    let mut on_b = web(three());
    on_b.name = "other".into();
    on_b.vip = B_IP;
    let e = n.cp.apply(vec![Op::AddService(on_b)]).unwrap_err();
    assert!(e.to_string().contains("field `vip`"), "{e}");
    // A batch that fails after a change leaves the service as it was.
    let before = n.cp.shared().write().services().specs();
    n.cp.apply(vec![
        Op::ChangeService(web(vec![backend(B_IP, 80, 1)])),
        Op::RemoveService("nothing".into()),
    ])
    .unwrap_err();
    assert_eq!(n.cp.shared().write().services().specs(), before);
}

#[test]
fn services_and_their_connection_counts_survive_a_save_and_restore() {
    let mut n = with_service(web(three()));
    for sport in 24_000..24_010u16 {
        reached(n.send(A, &syn_to_vip(sport)));
    }
    let sh = n.cp.shared().write();
    let back = Shared::restore(sh.save(), sh.save_services(), n.now).unwrap();
    assert_eq!(back.services().specs(), sh.services().specs());
    assert_eq!(back.services().conns(&web(vec![]).key()), 10);
    assert!(back.services().is_vip(VNI, VIP));
    assert!(back.is_vip(VNI, VIP), "decisions see the restored VIP");
    let key: VipKey = web(vec![]).key();
    assert!(back.services().get(&key).unwrap().table.is_some());
}

#[test]
fn a_backend_reaching_its_own_vip_is_given_another_backend() {
    // B is a backend and a client of the VIP (hairpin).
    let mut n = with_service(web(vec![backend(B_IP, 80, 1), backend(C_IP, 8080, 1)]));
    for sport in 25_000..25_050u16 {
        let syn = tcp(B_MAC, B_IP, VIP, sport, 80, SYN);
        assert_eq!(reached(n.send(B, &syn)), (C_IP, 8080));
    }
    // Alone, it has nobody to reach.
    let mut n = with_service(web(vec![backend(B_IP, 80, 1)]));
    let syn = tcp(B_MAC, B_IP, VIP, 25_100, 80, SYN);
    assert_eq!(n.send(B, &syn), Went::Dropped(Some(DropCause::LbNoBackend)));
}

fn checked(tcp: bool) -> ServiceSpec {
    ServiceSpec {
        health: Some(crate::health::HealthSpec {
            tcp,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 2,
        }),
        ..web(three())
    }
}

/// Advance the clock by `ms` and run the timekeeper's tick: the probes.
fn tick(n: &mut Net, ms: u64) -> Vec<(PortId, Vec<u8>)> {
    n.now += ms * 1_000_000;
    let out = n.cp.tick(n.now);
    out.tx
}

fn down(n: &Net, ip: Ipv4Addr) -> bool {
    let sh = n.cp.shared().write();
    let svcs = sh.services();
    let s = svcs.named("web").unwrap();
    let i = s.spec.backends.iter().position(|b| b.ip == ip).unwrap();
    s.down[i]
}

#[test]
fn local_backends_are_probed_from_the_gateway_and_leave_the_table_while_down() {
    let mut n = with_service(checked(true));
    let probes = tick(&mut n, 1);
    // B and C are on this host; R is another host's to check.
    let mut to: Vec<PortId> = probes.iter().map(|(p, _)| *p).collect();
    to.sort();
    assert_eq!(to, vec![B, C]);
    let syn = &probes.iter().find(|(p, _)| *p == B).unwrap().1;
    checksums_ok(syn);
    assert_eq!(syn[47], SYN);
    assert_eq!(
        (ip_at(syn, 26), ip_at(syn, 30)),
        (Ipv4Addr::new(10, 0, 0, 1), B_IP)
    );
    assert_eq!(port_at(syn, 36), 80);
    assert_eq!(syn[..6], B_MAC);
    // B answers with a SYN-ACK: up, and the offered connection is reset.
    let sport = port_at(syn, 34);
    let synack = tcp(
        B_MAC,
        B_IP,
        Ipv4Addr::new(10, 0, 0, 1),
        80,
        sport,
        SYN | ACK,
    );
    match n.send(B, &synack) {
        Went::To(p, rst) => {
            assert_eq!(p, B);
            assert_eq!(rst[47], RST);
            checksums_ok(&rst);
        }
        other => panic!("{other:?}"),
    }
    // C never answers: after `fall` (2) timeouts it leaves the table.
    assert!(!down(&n, C_IP));
    tick(&mut n, 600);
    assert!(!down(&n, C_IP), "one failure is not enough");
    tick(&mut n, 1000);
    tick(&mut n, 600);
    assert!(down(&n, C_IP));
    for sport in 26_000..26_100u16 {
        assert_ne!(reached(n.send(A, &syn_to_vip(sport))).0, C_IP);
    }
    // It answers twice (`rise`): back in.
    for _ in 0..2 {
        let probes = tick(&mut n, 1000);
        let (_, syn) = probes.iter().find(|(p, _)| *p == C).expect("C probed");
        let synack = tcp(
            C_MAC,
            C_IP,
            Ipv4Addr::new(10, 0, 1, 1),
            8080,
            port_at(syn, 34),
            SYN | ACK,
        );
        assert!(matches!(n.send(C, &synack), Went::To(C, _)));
    }
    assert!(!down(&n, C_IP));
    let v = n.cp.shared().write().services().health.targets.len();
    assert_eq!(v, 2);
}

#[test]
fn a_refusing_backend_goes_down_and_stray_answers_are_not_counted() {
    let mut n = with_service(checked(true));
    for _ in 0..2 {
        let probes = tick(&mut n, 1000);
        let (_, syn) = probes.iter().find(|(p, _)| *p == B).unwrap();
        let rst = tcp(
            B_MAC,
            B_IP,
            Ipv4Addr::new(10, 0, 0, 1),
            80,
            port_at(syn, 34),
            RST | ACK,
        );
        n.send(B, &rst);
    }
    assert!(down(&n, B_IP));
    // A SYN-ACK with no probe outstanding is not an answer.
    let stray = tcp(
        B_MAC,
        B_IP,
        Ipv4Addr::new(10, 0, 0, 1),
        80,
        61_005,
        SYN | ACK,
    );
    assert!(matches!(n.send(B, &stray), Went::Dropped(_)));
    assert!(down(&n, B_IP));
}

#[test]
fn icmp_checks_use_echo_and_passive_counts_follow_connections() {
    let mut n = with_service(checked(false));
    let probes = tick(&mut n, 1);
    let (_, echo) = probes.iter().find(|(p, _)| *p == B).unwrap();
    assert_eq!((echo[23], echo[34]), (1, 8), "an ICMP echo request");
    // Passive: B refuses a connection, C lets one time out.
    let mut on = std::collections::HashMap::new();
    for sport in 27_000..27_100u16 {
        on.entry(reached(n.send(A, &syn_to_vip(sport))).0)
            .or_insert(sport);
    }
    let b = on[&B_IP];
    n.send(B, &tcp(B_MAC, B_IP, A_IP, 80, b, RST | ACK));
    let sh = n.cp.shared().write();
    assert_eq!(sh.services().passive_counts(VNI, B_IP, 80).refused, 1);
    drop(sh);
    // Past the SYN timeout: the fast path says the flows saw no use.
    n.now += 60 * 1_000_000_000;
    for c in n.cp.tick(n.now).checks {
        n.cp.checked(&dpif::CheckAnswer::of(c.id, c.keys, [None, None], 0), n.now);
    }
    let sh = n.cp.shared().write();
    assert!(sh.services().passive_counts(VNI, C_IP, 8080).timed_out > 0);
}

const EXT_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);

fn from_outside(sport: u16, flags: u8) -> Vec<u8> {
    let mut f = tcp(ROUTER_MAC, SERVER, EXT_VIP, sport, 80, flags);
    f[..6].copy_from_slice(&EXT_MAC);
    f
}

#[test]
fn an_external_vip_balances_to_this_hosts_backends_and_answers_from_itself() {
    let mut n = with_service(ServiceSpec {
        external_vip: Some(EXT_VIP),
        ..web(three())
    });
    let mut seen = std::collections::HashMap::new();
    for sport in 28_000..28_100u16 {
        let to = match n.send(EXT, &from_outside(sport, SYN)) {
            Went::To(p, f) => {
                checksums_ok(&f);
                assert_eq!(ip_at(&f, 26), SERVER, "the client's address is kept");
                (p, ip_at(&f, 30), port_at(&f, 36))
            }
            other => panic!("{other:?}"),
        };
        assert_ne!(to.0, UPLINK, "only this host's backends");
        *seen.entry(to).or_insert(0) += 1;
        if sport == 28_000 {
            // The backend's answer leaves by the external port, from the
            // external VIP, to the hop the SYN came through.
            let (port, ip, bport) = to;
            let mac = if port == B { B_MAC } else { C_MAC };
            let back = delivered(
                n.send(port, &tcp(mac, ip, SERVER, bport, sport, SYN | ACK)),
                EXT,
            );
            assert_eq!((ip_at(&back, 26), port_at(&back, 34)), (EXT_VIP, 80));
            assert_eq!(back[..6], ROUTER_MAC);
            checksums_ok(&back);
        }
    }
    assert_eq!(seen.len(), 2, "B and C: {seen:?}");
    let sh = n.cp.shared().write();
    let spec = sh.services().named("web").unwrap().spec.clone();
    assert_eq!(sh.services().service_conns(&spec), 100);
    drop(sh);
    // ARP for it on the external port is answered; removing the service
    // ends its connections from outside too.
    let (_, applied) = n.cp.apply(vec![Op::RemoveService("web".into())]).unwrap();
    assert_eq!(applied.connections_ended, 100);
    assert_eq!(
        n.send(EXT, &from_outside(28_500, SYN)),
        Went::Dropped(Some(DropCause::ExtUnsolicited))
    );
}

#[test]
fn an_external_vip_must_be_a_free_external_address() {
    let mut n = default_switch();
    for (ip, what) in [
        (Ipv4Addr::new(198, 51, 100, 1), "not a free address"),
        (FIP_B, "not a free address"),
        (SNAT_IP, "not a free address"),
    ] {
        let e =
            n.cp.apply(vec![Op::AddService(ServiceSpec {
                external_vip: Some(ip),
                ..web(three())
            })])
            .unwrap_err();
        assert!(e.to_string().contains(what), "{ip}: {e}");
    }
}

#[test]
fn load_balanced_connections_count_against_the_clients_quota() {
    // 32 connections a VM, 2 of them half-open (a sixteenth).
    let limits = Limits {
        max: 1000,
        per_vm: 32,
    };
    let mut n = switch(limits, (1024, 65535), 1000);
    n.cp.apply(vec![Op::AddService(web(three()))]).unwrap();
    reached(n.send(A, &syn_to_vip(1)));
    reached(n.send(A, &syn_to_vip(2)));
    assert_eq!(
        n.send(A, &syn_to_vip(3)),
        Went::Dropped(Some(DropCause::CtQuota))
    );
    // Another client is not held back by A's share.
    let from_c = tcp(C_MAC, C_IP, VIP, 3, 80, SYN);
    assert!(matches!(n.send(C, &from_c), Went::To(..)));
    let sh = n.cp.shared().write();
    assert_eq!(sh.ct.per_owner().get(&A), Some(&2));
}

#[test]
fn a_remote_backend_that_refuses_is_ejected_for_a_while() {
    let mut n = with_service(checked(true));
    tick(&mut n, 1);
    let mut refused = 0;
    for sport in 29_000..29_200u16 {
        if refused == 2 {
            break;
        }
        if reached(n.send(A, &syn_to_vip(sport))).0 != R_IP {
            continue;
        }
        let rst = tcp(R_MAC, R_IP, A_IP, 80, sport, RST | ACK);
        n.send(UPLINK, &super::super::from_remote(&rst, REMOTE_VTEP, VNI));
        refused += 1;
    }
    assert_eq!(refused, 2);
    assert!(down(&n, R_IP), "fall = 2 refusals in a row");
    for sport in 29_200..29_300u16 {
        assert_ne!(reached(n.send(A, &syn_to_vip(sport))).0, R_IP);
    }
    // Ten check intervals later it is given connections again.
    for _ in 0..11 {
        tick(&mut n, 1000);
    }
    assert!(!down(&n, R_IP));
    let sh = n.cp.shared().write();
    let p = sh.services().passive_counts(VNI, R_IP, 80);
    assert_eq!((p.refused, p.ejections), (2, 1));
}

#[test]
fn a_connection_keeps_its_backend_when_the_backend_moves_to_another_host() {
    let mut n = with_service(web(vec![backend(R_IP, 80, 1)]));
    let new_vtep = Ipv4Addr::new(192, 168, 0, 77);
    n.cp.update_topology(|t| t.set_neighbor(new_vtep, NEXT_HOP));
    assert_eq!(reached(n.send(A, &syn_to_vip(35_000))), (R_IP, 80));
    let moved = RemoteVm {
        ip: R_IP,
        mac: R_MAC,
        vni: vni(VNI),
        vtep: new_vtep,
        groups: vec![1],
    };
    let (out, applied) = n.cp.apply(vec![Op::SetRemotes(vec![moved])]).unwrap();
    n.apply(&out);
    assert_eq!(applied.connections_ended, 0, "recompiled, not ended");
    // The next segment goes to the backend's new host, still DNATed.
    match n.send(A, &tcp(A_MAC, A_IP, VIP, 35_000, 80, ACK)) {
        Went::To(UPLINK, wire) => {
            let inner = inner_for(&wire, new_vtep);
            assert_eq!((ip_at(&inner, 30), port_at(&inner, 36)), (R_IP, 80));
        }
        other => panic!("{other:?}"),
    }
}
