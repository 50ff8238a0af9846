use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::key::{Ingress, PortId};

fn key(n: u32) -> FlowKey {
    FlowKey::new(
        Ingress::Port(PortId(1)),
        17,
        0x0a00_0000 | n,
        0x0a01_0000,
        1000,
        53,
    )
}

fn out(p: u16) -> Action {
    Action::output(PortId(p))
}

/// Every structural invariant the lookups rely on.
fn check_invariants(t: &FlowTable) {
    let mut occupied = 0;
    for (i, s) in t.slots.iter().enumerate() {
        if s.psl == 0 {
            continue;
        }
        occupied += 1;
        let home = t.home(s.tag);
        assert_eq!(i + 1 - home, usize::from(s.psl), "psl of slot {i}");
        assert!(s.psl <= MAX_PSL);
        assert_eq!(tag_of(t.hash(&s.key)), s.tag);
        if i > 0 {
            let prev = &t.slots[i - 1];
            // Ordered runs: no entry sits after one with a later home.
            if prev.psl != 0 {
                assert!(t.home(prev.tag) <= home, "run order at slot {i}");
            } else {
                assert_eq!(s.psl, 1, "gap before a displaced entry at {i}");
            }
        }
        assert!(t.actions.refs(ActionId(s.action)) > 0);
    }
    assert_eq!(occupied, t.len());
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, u16),
    Remove(u32),
    Lookup(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..48, 0u16..4).prop_map(|(k, p)| Op::Insert(k, p)),
        2 => (0u32..48).prop_map(Op::Remove),
        3 => (0u32..48).prop_map(Op::Lookup),
    ]
}

proptest! {
    /// The table behaves like a capacity-bounded HashMap, for any hash seed.
    #[test]
    fn matches_a_hashmap_model(seed in any::<u64>(), cap in 1usize..40, ops in prop::collection::vec(op(), 1..300)) {
        let mut t = FlowTable::with_hasher(cap, FlowHasher::with_seed(seed)).unwrap();
        let mut model: HashMap<u32, (u16, u64)> = HashMap::new();
        for (now, op) in ops.into_iter().enumerate() {
            let now = now as u64;
            match op {
                Op::Insert(k, p) => {
                    let r = t.insert(key(k), &out(p), now);
                    if model.contains_key(&k) || model.len() < cap {
                        prop_assert!(r.is_ok(), "{r:?}");
                        model.entry(k).or_insert((p, 0)).0 = p;
                    } else {
                        prop_assert_eq!(r, Err(InsertError::Full { capacity: cap }));
                    }
                }
                Op::Remove(k) => {
                    let got = t.remove(&key(k));
                    let want = model.remove(&k);
                    prop_assert_eq!(got.map(|(a, s)| (a, s.packets)), want.map(|(p, n)| (out(p), n)));
                }
                Op::Lookup(k) => {
                    let hit = t.lookup(&key(k), 100, now);
                    match model.get_mut(&k) {
                        Some((p, n)) => {
                            *n += 1;
                            let hit = hit.expect("model has the key");
                            prop_assert_eq!(t.action(hit.action), Some(&out(*p)));
                        }
                        None => prop_assert!(hit.is_none()),
                    }
                }
            }
            check_invariants(&t);
        }
        prop_assert_eq!(t.len(), model.len());
        for (k, (p, n)) in &model {
            let e = t.get(&key(*k)).unwrap();
            prop_assert_eq!(e.action, &out(*p));
            prop_assert_eq!(e.stats.packets, *n);
            prop_assert_eq!(e.stats.bytes, *n * 100);
        }
        // Only the actions still referenced survive.
        let distinct: std::collections::HashSet<u16> = model.values().map(|v| v.0).collect();
        prop_assert_eq!(t.action_count(), distinct.len());
    }
}

#[test]
fn capacity_is_hard_and_a_full_table_refuses_without_change() {
    let mut t = FlowTable::with_hasher(100, FlowHasher::with_seed(1)).unwrap();
    for n in 0..100 {
        t.insert(key(n), &out(1), 0).unwrap();
    }
    let before = t.memory_bytes();
    assert_eq!(
        t.insert(key(1000), &out(1), 0),
        Err(InsertError::Full { capacity: 100 })
    );
    // Updating an existing key still works when full.
    assert!(t.insert(key(5), &out(2), 0).is_ok());
    assert_eq!(t.len(), 100);
    assert_eq!(t.memory_bytes(), before);
    assert!(t.lookup(&key(1000), 1, 0).is_none());
    assert_eq!(t.counters().insert_full, 1);
    check_invariants(&t);
}

#[test]
fn capacity_out_of_range_is_an_error() {
    assert!(FlowTable::new(0).is_err());
    assert!(FlowTable::new(MAX_CAPACITY + 1).is_err());
}

#[test]
fn update_keeps_counters_and_swaps_the_action() {
    let mut t = FlowTable::with_hasher(8, FlowHasher::with_seed(2)).unwrap();
    t.insert(key(1), &out(1), 0).unwrap();
    t.lookup(&key(1), 60, 5).unwrap();
    t.insert(key(1), &out(2), 6).unwrap();
    let e = t.get(&key(1)).unwrap();
    assert_eq!(e.action, &out(2));
    assert_eq!(
        e.stats,
        FlowStats {
            packets: 1,
            bytes: 60,
            last_used: 5
        }
    );
    assert_eq!(t.action_count(), 1, "the old action was released");
}

#[test]
fn idle_flows_expire_and_busy_ones_stay() {
    let mut t = FlowTable::with_hasher(1000, FlowHasher::with_seed(3)).unwrap();
    for n in 0..1000 {
        t.insert(key(n), &out(1), 0).unwrap();
    }
    // Even keys are used at t=50; at t=100 with idle=60 only odd ones expire.
    for n in (0..1000).step_by(2) {
        t.lookup(&key(n), 1, 50).unwrap();
    }
    let mut gone = Vec::new();
    // The sweep is incremental: small budgets, many calls.
    let mut calls = 0;
    while gone.len() < 500 {
        t.expire(100, 60, 64, |k, _, s| gone.push((*k, *s)));
        calls += 1;
        assert!(calls < 10_000, "sweep did not converge");
    }
    check_invariants(&t);
    assert_eq!(t.len(), 500);
    assert!(gone
        .iter()
        .all(|(k, s)| (k.src_ip & 1) == 1 && s.packets == 0));
    // One more full pass removes nothing.
    assert_eq!(t.expire(100, 60, t.slots.len(), |_, _, _| ()), 0);
    for n in 0..1000 {
        assert_eq!(t.get(&key(n)).is_some(), n % 2 == 0, "key {n}");
    }
    assert_eq!(t.counters().expired, 500);
}

#[test]
fn expire_budget_bounds_the_work() {
    let mut t = FlowTable::with_hasher(1000, FlowHasher::with_seed(4)).unwrap();
    for n in 0..1000 {
        t.insert(key(n), &out(1), 0).unwrap();
    }
    let removed = t.expire(1_000, 1, 10, |_, _, _| ());
    assert!(removed <= 10);
}

#[test]
fn a_new_generation_makes_old_flows_miss_until_reinstalled() {
    let mut t = FlowTable::with_hasher(64, FlowHasher::with_seed(5)).unwrap();
    t.insert(key(1), &out(1), 0).unwrap();
    t.insert(key(2), &out(1), 0).unwrap();
    assert!(t.lookup(&key(1), 1, 0).is_some());
    t.bump_generation();
    assert!(t.lookup(&key(1), 1, 0).is_none());
    assert!(t.lookup(&key(2), 1, 0).is_none());
    assert_eq!(t.counters().stale_lookups, 2);
    assert!(!t.get(&key(1)).unwrap().current);
    // Recompiled under the new policy: hits again.
    t.insert(key(1), &out(3), 1).unwrap();
    let hit = t.lookup(&key(1), 1, 1).unwrap();
    assert_eq!(t.action(hit.action), Some(&out(3)));
    // The sweep removes the stale entry even though it is not idle.
    assert_eq!(t.expire(1, u64::MAX, t.slots.len(), |_, _, _| ()), 1);
    assert!(t.get(&key(2)).is_none());
    assert_eq!(t.len(), 1);
}

#[test]
fn retain_removes_exactly_the_rejected_flows() {
    let mut t = FlowTable::with_hasher(200, FlowHasher::with_seed(6)).unwrap();
    for n in 0..200 {
        t.insert(key(n), &out(u16::try_from(n % 4).unwrap()), 0)
            .unwrap();
    }
    let removed = t.retain(|_, a| *a != out(2));
    assert_eq!(removed, 50);
    check_invariants(&t);
    assert!(t.iter().all(|e| *e.action != out(2)));
    assert_eq!(t.iter().count(), 150);
    assert_eq!(t.action_count(), 3);
}

#[test]
fn batch_lookup_matches_single_lookups() {
    let mut t = FlowTable::with_hasher(512, FlowHasher::with_seed(7)).unwrap();
    for n in 0..300 {
        t.insert(key(n), &out(u16::try_from(n % 7).unwrap()), 0)
            .unwrap();
    }
    let keys: Vec<FlowKey> = (0..100).map(|n| key(n * 5)).collect();
    let bytes = vec![64u32; keys.len()];
    let mut res = vec![None; keys.len()];
    t.lookup_batch(&keys, &bytes, 9, &mut res);
    for (k, r) in keys.iter().zip(&res) {
        let n = k.src_ip & 0xffff;
        assert_eq!(r.is_some(), n < 300);
        if let Some(h) = r {
            assert_eq!(
                t.action(h.action),
                Some(&out(u16::try_from(n % 7).unwrap()))
            );
            assert_eq!(t.get(k).unwrap().stats.last_used, 9);
        }
    }
}

#[test]
fn full_load_keeps_probe_sequences_short() {
    let cap = 100_000;
    let mut t = FlowTable::with_hasher(cap, FlowHasher::with_seed(8)).unwrap();
    for n in 0..u32::try_from(cap).unwrap() {
        t.insert(key(n), &out(1), 0).unwrap();
    }
    assert!(
        t.max_probe_len() < MAX_PSL / 2,
        "max psl {}",
        t.max_probe_len()
    );
    assert_eq!(FlowTable::entry_size(), 64);
    // 64-byte entries at 1/2 load: 128 bytes of table per flow (+ the tail).
    assert!(t.memory_bytes() <= cap * 128 + 64 * (usize::from(MAX_PSL) + 1));
}

#[test]
fn a_new_table_is_all_empty_slots() {
    let t = FlowTable::with_hasher(1000, FlowHasher::with_seed(10)).unwrap();
    assert!(t.slots.iter().all(|s| *s == Slot::EMPTY));
    let (p, len) = t.memory_region();
    assert_eq!(p as usize % 64, 0, "entries are cache-line aligned");
    assert_eq!(len, t.slots.len() * 64);
}

#[test]
fn restored_flows_keep_their_counters_and_share_their_actions() {
    let mut t = FlowTable::new(8).unwrap();
    let actions = [out(1), out(2), out(3)];
    let st = |p| FlowStats {
        packets: p,
        bytes: p * 100,
        last_used: 7,
    };
    let flows = vec![
        (key(1), 0, st(5)),
        (key(2), 0, st(6)),
        (key(3), 1, st(7)),
        (key(4), 9, st(8)), // no such action
    ];
    assert_eq!(t.restore(&actions, flows.into_iter()), (3, 1));
    check_invariants(&t);
    let e = t.get(&key(2)).unwrap();
    assert_eq!((*e.action, e.stats), (out(1), st(6)));
    assert_eq!(*t.get(&key(3)).unwrap().action, out(2));
    assert!(t.get(&key(4)).is_none());
    // out(3) was taken by no flow: not kept; out(1) goes with its last flow.
    assert_eq!(t.action_count(), 2);
    t.remove(&key(1));
    t.remove(&key(2));
    assert_eq!(t.action_count(), 1);
    // A full table refuses the rest and counts them.
    let many = (10..30).map(|n| (key(n), 2u32, st(1)));
    let (ok, refused) = t.restore(&actions, many);
    assert_eq!((ok + 1, ok + refused), (8, 20));
    check_invariants(&t);
}

#[test]
fn a_port_holds_at_most_its_share_and_gets_it_back_as_flows_go() {
    let mut t = FlowTable::with_hasher(1000, FlowHasher::with_seed(1)).unwrap();
    t.set_port_share(10);
    let on = |port: u16, n: u32| {
        FlowKey::new(
            Ingress::Port(PortId(port)),
            17,
            0x0a00_0000 | n,
            0x0a01_0000,
            1000,
            53,
        )
    };
    // Port 1 sends to random ports: ten flows, then refusals.
    for n in 0..10 {
        t.insert(on(1, n), &out(9), 0).unwrap();
    }
    assert_eq!(
        t.insert(on(1, 10), &out(9), 0),
        Err(InsertError::ShareFull { port: 1, share: 10 })
    );
    assert_eq!(t.port_flows(1), 10);
    // Updating one of its flows still works; other ports are untouched,
    // and flows from the uplink (by VNI) are no port's.
    assert!(t.insert(on(1, 3), &out(8), 0).is_ok());
    for n in 0..10 {
        t.insert(on(2, n), &out(9), 0).unwrap();
    }
    let by_vni = FlowKey::new(Ingress::Vni(crate::Vni::new(100).unwrap()), 17, 1, 2, 3, 4);
    t.insert(by_vni, &out(1), 0).unwrap();
    // Flows that go (removed, retained out, expired) give the share back.
    t.remove(&on(1, 0)).unwrap();
    assert_eq!(t.port_flows(1), 9);
    t.insert(on(1, 10), &out(9), 0).unwrap();
    t.retain(|k, _| *k != on(1, 1));
    assert_eq!(t.port_flows(1), 9);
    let mut gone = 0;
    t.expire(1_000_000_000, 1, t.slots.len(), |_, _, _| gone += 1);
    assert_eq!(gone, 20, "port 1: 9, port 2: 10, by VNI: 1");
    assert_eq!((t.port_flows(1), t.port_flows(2)), (0, 0));
    check_invariants(&t);
}
