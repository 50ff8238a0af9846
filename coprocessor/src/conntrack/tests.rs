use super::*;
use flowtable::Ingress;

const S: u64 = SEC;

fn key(ingress: u16, sport: u16) -> FlowKey {
    FlowKey::new(Ingress::Port(PortId(ingress)), 6, 1, 2, sport, 80)
}

fn conn(sport: u16, state: ConnState) -> Conn {
    let side = |k| Side {
        key: k,
        action: Action::drop(),
        installed: 1,
    };
    let rev = FlowKey::new(Ingress::Port(PortId(2)), 6, 2, 1, 80, sport);
    let adm = Admission {
        vni: 1,
        src: 1,
        dst: 2,
        proto: 6,
        port: 80,
        egress: Some(PortId(1)),
        ingress: None,
        rule: None,
    };
    Conn::new([side(key(1, sport)), side(rev)], state, adm, 0)
}

fn syn() -> ConnState {
    ConnState::Tcp(TcpState::SynSent)
}

#[test]
fn both_keys_find_the_connection_and_removal_forgets_them() {
    let mut ct = Conntrack::new(Timeouts::default(), Limits::default(), 0);
    let c = conn(1000, syn());
    let rev = c.sides[1].key;
    let id = ct.insert(c, Some(PortId(1)), 0).unwrap();
    assert_eq!(ct.lookup(&key(1, 1000)), Some((id, 0)));
    assert_eq!(ct.lookup(&rev), Some((id, 1)));
    assert_eq!(ct.per_owner().get(&PortId(1)), Some(&1));
    assert_eq!(
        ct.insert(conn(1000, syn()), None, 0),
        Err(CtRefused::Clash),
        "a key belongs to one connection"
    );
    assert!(ct.remove(id).is_some());
    assert!(ct.lookup(&rev).is_none());
    assert!(ct.get(id).is_none());
    assert!(ct.remove(id).is_none(), "an id is not reused");
    assert!(ct.per_owner().is_empty());
    let again = ct.insert(conn(1000, syn()), None, 0).unwrap();
    assert_ne!(again, id, "a reused slot has a new generation");
    assert!(ct.get(id).is_none());
}

#[test]
fn quota_is_per_owner_and_capacity_is_global() {
    let limits = Limits { max: 5, per_vm: 2 };
    let ct = Conntrack::new(Timeouts::default(), limits, 0);
    let udp = || ConnState::Udp { replied: false };
    ct.insert(conn(1, udp()), Some(PortId(1)), 0).unwrap();
    ct.insert(conn(2, udp()), Some(PortId(1)), 0).unwrap();
    assert_eq!(
        ct.insert(conn(3, udp()), Some(PortId(1)), 0),
        Err(CtRefused::Quota)
    );
    // Another VM is not affected by the first one's quota.
    let mut c = conn(4, udp());
    c.sides[0].key.ctx = Ingress::Port(PortId(7)).ctx();
    ct.insert(c, Some(PortId(7)), 0).unwrap();
    ct.insert(conn(5, udp()), None, 0).unwrap();
    ct.insert(conn(6, udp()), None, 0).unwrap();
    assert_eq!(ct.insert(conn(7, udp()), None, 0), Err(CtRefused::Full));
    assert_eq!(ct.counters().refused_quota, 1);
    assert_eq!(ct.counters().refused_full, 1);
}

#[test]
fn tcp_states_follow_syn_ack_fin_and_rst() {
    let mut ct = Conntrack::new(Timeouts::default(), Limits::default(), 0);
    let id = ct.insert(conn(1, syn()), None, 0).unwrap();
    let st = |ct: &mut Conntrack| ct.get(id).unwrap().state;
    ct.tcp_event(id, 0, 0x02, S); // SYN retransmit: no change
    assert_eq!(st(&mut ct), syn());
    ct.tcp_event(id, 1, 0x12, S); // SYN-ACK from the responder
    assert_eq!(st(&mut ct), ConnState::Tcp(TcpState::SynRecv { since: S }));
    assert_eq!(ct.half_open_len(), 1, "still half-open");
    ct.seen(id, 1, S + 1); // the responder again: still waiting
    assert_eq!(st(&mut ct), ConnState::Tcp(TcpState::SynRecv { since: S }));
    ct.seen(id, 0, S + 2); // the originator's ACK
    assert_eq!(st(&mut ct), ConnState::Tcp(TcpState::Established));
    assert_eq!(ct.half_open_len(), 0);
    ct.tcp_event(id, 0, 0x11, 2 * S); // FIN
    assert_eq!(st(&mut ct), ConnState::Tcp(TcpState::Closing));
    ct.tcp_event(id, 1, 0x11, 3 * S); // FIN back
    assert_eq!(st(&mut ct), ConnState::Tcp(TcpState::Closed));
    let id2 = ct.insert(conn(2, syn()), None, 0).unwrap();
    ct.tcp_event(id2, 1, 0x04, S); // RST
    assert_eq!(ct.get(id2).unwrap().state, ConnState::Tcp(TcpState::Closed));
}

#[test]
fn a_due_connection_with_flows_is_checked_then_kept_or_ended() {
    let t = Timeouts::default();
    let mut ct = Conntrack::new(t, Limits::default(), 0);
    let id = ct.insert(conn(1, syn()), None, 0).unwrap();
    assert!(ct.tick(t.tcp_syn - S).is_empty(), "not due yet");
    let ex = ct.tick(t.tcp_syn);
    let Some(Expiry::Check { id: cid, keys }) = ex.first().cloned() else {
        panic!("expected a check, got {ex:?}");
    };
    assert_eq!(cid, id);
    // The flows were used 5 s ago: the connection lives on.
    let used = [Some((t.tcp_syn - 5 * S, 3)), Some((t.tcp_syn - 5 * S, 2))];
    assert!(ct.checked(id, keys, used, [1, 1], t.tcp_syn).is_none());
    // Replies were seen but no SYN-ACK event: still syn_sent (timeout 30 s).
    let due = t.tcp_syn - 5 * S + t.tcp_syn;
    assert!(ct.tick(due - S).is_empty());
    let ex = ct.tick(due);
    assert!(matches!(ex.as_slice(), [Expiry::Check { .. }]), "{ex:?}");
    // No use since: it ends, and the caller learns which flows to remove.
    let used = [Some((t.tcp_syn - 5 * S, 3)), None];
    let gone = ct.checked(id, keys, used, [1, 0], due).expect("ended");
    assert_eq!(gone.installed_keys().count(), 1);
    assert!(ct.is_empty());
    assert_eq!(ct.counters().expired, 1);
}

#[test]
fn without_flows_a_connection_ends_at_its_deadline_without_asking() {
    let t = Timeouts::default();
    let mut ct = Conntrack::new(t, Limits::default(), 0);
    let c = conn(1, ConnState::Udp { replied: false });
    let (k0, k1) = (c.sides[0].key, c.sides[1].key);
    let id = ct.insert(c, Some(PortId(1)), 0).unwrap();
    ct.flow_gone(&k0, (10 * S, 5), 0);
    ct.flow_gone(&k1, (12 * S, 1), 0);
    assert_eq!(ct.get(id).unwrap().state, ConnState::Udp { replied: true });
    // Replied UDP lives udp_stream after its last use.
    assert!(ct.tick(12 * S + t.udp_stream - S).is_empty());
    let ex = ct.tick(12 * S + t.udp_stream);
    assert!(matches!(ex.as_slice(), [Expiry::Ended(_)]), "{ex:?}");
    assert!(ct.per_owner().is_empty());
}

#[test]
fn a_flow_gone_from_one_thread_is_asked_about_while_another_thread_holds_it() {
    let t = Timeouts::default();
    let mut ct = Conntrack::new(t, Limits::default(), 0);
    let mut c = conn(1, ConnState::Udp { replied: false });
    // Both sides in the tables of fast-path threads 0 and 1.
    c.sides.iter_mut().for_each(|s| s.installed = 0b11);
    let (k0, k1) = (c.sides[0].key, c.sides[1].key);
    let id = ct.insert(c, Some(PortId(1)), 0).unwrap();
    ct.flow_gone(&k0, (10 * S, 5), 0);
    ct.flow_gone(&k1, (12 * S, 1), 0);
    assert_eq!(ct.get(id).unwrap().sides.map(|s| s.installed), [0b10, 0b10]);
    // Thread 1 may still forward it: at the deadline, a check, not an end.
    let due = 12 * S + t.udp_stream;
    let ex = ct.tick(due);
    let Some(Expiry::Check { keys, .. }) = ex.first().cloned() else {
        panic!("expected a check, got {ex:?}");
    };
    // Thread 1 used the reply's flow a moment ago: kept, held by it only.
    let used = [None, Some((due - S, 9))];
    assert!(ct.checked(id, keys, used, [0, 0b10], due).is_none());
    assert_eq!(ct.get(id).unwrap().sides.map(|s| s.installed), [0, 0b10]);
    // Gone from thread 1 too: it ends at its deadline without asking.
    ct.flow_gone(&k1, (due - S, 9), 1);
    let ex = ct.tick(due - S + t.udp_stream);
    assert!(matches!(ex.as_slice(), [Expiry::Ended(_)]), "{ex:?}");
}

#[test]
fn stale_answers_are_ignored() {
    let mut ct = Conntrack::new(Timeouts::default(), Limits::default(), 0);
    let id = ct.insert(conn(1, syn()), None, 0).unwrap();
    let c = ct.remove(id).unwrap();
    let keys = c.sides.map(|s| Some(s.key));
    assert!(ct
        .checked(id, keys, [None, None], [0, 0], 100 * S)
        .is_none());
    let id2 = ct.insert(conn(2, syn()), None, 0).unwrap();
    // Keys of another connection in the same slot: ignored.
    assert!(ct
        .checked(id2, keys, [None, None], [0, 0], 100 * S)
        .is_none());
    assert!(ct.get(id2).is_some());
}

#[test]
fn expiry_cost_follows_what_is_due() {
    let t = Timeouts::default();
    let mut ct = Conntrack::new(
        t,
        Limits {
            max: 200_000,
            per_vm: 200_000,
        },
        0,
    );
    for i in 0..100_000u32 {
        let mut c = conn(0, ConnState::Tcp(TcpState::Established));
        c.sides[0].key.src_ip = i;
        c.sides[1].key.dst_ip = i;
        ct.insert(c, None, 0).unwrap();
    }
    // Ticking through the first minute fires nothing: only slots are visited.
    for s in 0..60 {
        assert!(ct.tick(s * S).is_empty());
    }
    assert_eq!(ct.len(), 100_000);
}

#[test]
fn a_connection_keeps_one_timer_however_often_its_segments_move_it() {
    // A VM with one tracked connection sends SYN and FIN segments on it
    // at its punt budget's rate for a minute: each one moves the deadline.
    let mut ct = Conntrack::new(Timeouts::default(), Limits::default(), 0);
    let id = ct.insert(conn(1, syn()), Some(PortId(1)), 0).unwrap();
    ct.tcp_event(id, 1, 0x12, 1); // SYN-ACK: established
    let other = ct.insert(conn(2, syn()), Some(PortId(1)), 0).unwrap();
    let mut now = 1;
    for n in 0..600_000u64 {
        now += SEC / 10_000;
        let flags = if n % 2 == 0 { 0x02 } else { 0x11 };
        ct.tcp_event(id, 0, flags, now);
        if n % 1000 == 0 {
            ct.tick(now);
        }
    }
    assert_eq!(ct.timers(), 2, "one wheel entry per live connection");
    // A removed connection leaves none behind.
    ct.remove(other).unwrap();
    assert_eq!(ct.timers(), 1);
}

#[test]
fn half_open_connections_have_a_share_of_their_own() {
    // A SYN flood at one VM (its SYN-ACKs never acknowledged) fills only
    // the half-open share: its other connections, and every other VM's,
    // keep their room; completed handshakes leave the share.
    let limits = Limits {
        max: 1024,
        per_vm: 64,
    };
    let cap = half_open_per_vm(&limits);
    assert_eq!(cap, 4);
    let ct = Conntrack::new(Timeouts::default(), limits, 0);
    let victim = Some(PortId(1));
    let mut ids = Vec::new();
    for sport in 0..100u16 {
        if let Ok(id) = ct.insert(conn(sport, syn()), victim, 0) {
            ct.tcp_event(id, 1, 0x12, S); // the VM answers: SYN-ACK
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), cap as usize, "the flood got its share only");
    assert_eq!(ct.half_open_of(PortId(1)), cap);
    assert_eq!(ct.counters().refused_quota, 100 - u64::from(cap));
    // The rest of the VM's quota is there for connections that are not
    // handshakes.
    for sport in 1000..1000 + u16::try_from(limits.per_vm - cap).unwrap() {
        ct.insert(conn(sport, ConnState::Udp { replied: false }), victim, 0)
            .unwrap();
    }
    // A handshake that completes leaves the share: the next one fits.
    ct.seen(ids[0], 0, 2 * S);
    assert_eq!(ct.half_open_of(PortId(1)), cap - 1);
    // Expired or removed half-open connections leave it too.
    ct.remove(ids[1]).unwrap();
    assert_eq!(ct.half_open_of(PortId(1)), cap - 2);
    assert_eq!(ct.half_open_len(), (cap - 2) as usize);
}

/// The key index against a model (a plain map) under random inserts,
/// removals and re-keyings: every key finds its connection and side, and
/// the index holds exactly two entries per connection, through its
/// growth (which rehashes by the keys the slots hold).
#[test]
fn the_key_index_follows_every_change() {
    use std::collections::HashMap;
    let limits = Limits {
        max: 100_000,
        per_vm: 100_000,
    };
    let mut ct = Conntrack::new(Timeouts::default(), limits, 0);
    let mut model: HashMap<FlowKey, (u64, usize)> = HashMap::new();
    let mut ids: Vec<u64> = Vec::new();
    let mut x: u64 = 7;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..20_000u32 {
        match next(10) {
            0..=5 => {
                let sport = u16::try_from(next(60_000)).unwrap();
                let udp = ConnState::Udp { replied: false };
                // Half of them NATed: their reply key in another shard.
                let c = if next(2) == 0 {
                    conn(sport, udp)
                } else {
                    nat_conn(u32::from(sport), udp)
                };
                let keys = [c.sides[0].key, c.sides[1].key];
                match ct.insert(c, None, 0) {
                    Ok(id) => {
                        ids.push(id);
                        model.insert(keys[0], (id, 0));
                        model.insert(keys[1], (id, 1));
                    }
                    Err(e) => {
                        assert_eq!(e, CtRefused::Clash);
                        assert!(keys.iter().any(|k| model.contains_key(k)), "step {step}");
                    }
                }
            }
            6..=8 if !ids.is_empty() => {
                let id = ids.swap_remove(usize::try_from(next(ids.len() as u64)).unwrap());
                let c = ct.remove(id).unwrap();
                model.remove(&c.sides[0].key);
                model.remove(&c.sides[1].key);
            }
            _ if !ids.is_empty() => {
                // Re-keyed (an endpoint moved): its reply side's ingress
                // changes, and now and then its port (its shard with it).
                let id = ids[usize::try_from(next(ids.len() as u64)).unwrap()];
                let mut sides = ct.get(id).unwrap().sides;
                let old = sides[1].key;
                sides[1].key = FlowKey::new(
                    Ingress::Port(PortId(u16::try_from(next(5)).unwrap() + 2)),
                    old.proto,
                    old.src_ip,
                    old.dst_ip,
                    old.src_port,
                    old.dst_port.wrapping_add(u16::try_from(next(3)).unwrap()),
                );
                if ct.replace_sides(id, sides) {
                    model.remove(&old);
                    model.insert(sides[1].key, (id, 1));
                }
            }
            _ => {}
        }
    }
    ct.check_index();
    assert_eq!(model.len(), 2 * ct.len());
    for (k, want) in &model {
        assert_eq!(ct.lookup(k), Some(*want));
    }
}

/// A connection whose reply key is unrelated to its original one (as
/// after NAT): its keys land in shards of their own.
fn nat_conn(n: u32, state: ConnState) -> Conn {
    let mut c = conn(0, state);
    let port = |x: u32| u16::try_from(x % 60_000).unwrap() + 1024;
    c.sides[0].key = FlowKey::new(Ingress::Port(PortId(1)), 17, 10, 20 + n, port(n), 53);
    c.sides[1].key = FlowKey::new(Ingress::Port(PortId(9)), 17, 20 + n, 99, 53, port(n * 7));
    c
}

#[test]
fn threads_adding_finding_and_removing_at_once_keep_every_key_findable() {
    let ct = Conntrack::new(Timeouts::default(), Limits::default(), 0);
    let udp = || ConnState::Udp { replied: false };
    let kept: Vec<Vec<(u64, [FlowKey; 2])>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u32)
            .map(|t| {
                let ct = &ct;
                s.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..2000u32 {
                        let c = nat_conn(t * 10_000 + i, udp());
                        let keys = c.sides.map(|s| s.key);
                        let id = ct.insert(c, Some(PortId(1)), 0).unwrap();
                        // Both keys find it, from any thread, at once.
                        assert_eq!(ct.lookup(&keys[1]), Some((id, 1)));
                        let mut f = ct.find(&keys[1]).expect("found by its reply key");
                        f.seen(1);
                        drop(f);
                        if i % 2 == 0 {
                            assert!(ct.remove(id).is_some());
                            assert!(ct.lookup(&keys[0]).is_none());
                            assert!(ct.lookup(&keys[1]).is_none());
                        } else {
                            kept.push((id, keys));
                        }
                    }
                    kept
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut ct = ct;
    ct.check_index();
    assert_eq!(ct.len(), 4 * 1000);
    assert_eq!(ct.per_owner().get(&PortId(1)), Some(&4000));
    for (id, keys) in kept.into_iter().flatten() {
        assert_eq!(ct.lookup(&keys[0]), Some((id, 0)));
        assert_eq!(ct.lookup(&keys[1]), Some((id, 1)));
    }
    let lens = ct.shard_lens();
    assert_eq!(lens.len(), SHARDS);
    assert!(
        lens.iter().all(|&n| n > 0),
        "connections spread over the shards: {lens:?}"
    );
}

#[test]
fn threads_at_a_quota_never_pass_it() {
    let limits = Limits {
        max: 1000,
        per_vm: 100,
    };
    let ct = Conntrack::new(Timeouts::default(), limits, 0);
    let syn = || ConnState::Tcp(TcpState::SynSent);
    let ok: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u32)
            .map(|t| {
                let ct = &ct;
                s.spawn(move || {
                    (0..500u32)
                        .filter(|i| {
                            let state = if i % 2 == 0 {
                                syn()
                            } else {
                                ConnState::Udp { replied: false }
                            };
                            ct.insert(nat_conn(t * 1000 + i, state), Some(PortId(3)), 0)
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // A sixteenth of the per-VM quota may be half-open; the rest of the
    // 100 are not.
    assert_eq!(ok, 100);
    assert_eq!(ct.len(), 100);
    assert_eq!(ct.half_open_of(PortId(3)), half_open_per_vm(&limits));
    let c = ct.counters();
    assert_eq!(c.created, 100);
    assert_eq!(c.refused_quota, 2000 - 100);
}

#[test]
fn shards_reserving_room_in_chunks_pass_no_limit_and_hold_back_little() {
    // A quota large enough for the shards to take room in chunks.
    let limits = Limits {
        max: 262_144,
        per_vm: 2000,
    };
    let ct = Conntrack::new(Timeouts::default(), limits, 0);
    let udp = || ConnState::Udp { replied: false };
    let fill = |base: u32| -> Vec<u64> {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..4u32)
                .map(|t| {
                    let ct = &ct;
                    s.spawn(move || {
                        (0..1000u32)
                            .filter_map(|i| {
                                let c = nat_conn(base + t * 1000 + i, udp());
                                ct.insert(c, Some(PortId(5)), 0).ok()
                            })
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        })
    };
    // Room the shards may hold unused: under two chunks each.
    let slack = SHARDS * 2 * (2000 / (SHARDS * 32));
    for round in 0..3u32 {
        let ids = fill(round * 10_000);
        assert!(
            ids.len() <= 2000,
            "the quota is never passed: {}",
            ids.len()
        );
        assert!(
            ids.len() + slack >= 2000,
            "little held back: {} of 2000",
            ids.len()
        );
        assert_eq!(ct.len(), ids.len());
        assert_eq!(
            ct.per_owner().get(&PortId(5)).copied(),
            u32::try_from(ids.len()).ok()
        );
        for id in ids {
            assert!(ct.remove(id).is_some());
        }
        assert_eq!(ct.len(), 0);
        assert!(ct.per_owner().is_empty());
    }
}
