use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::layout::{parse_record, Key, Record};
use crate::model::ModelSwitch;

const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

fn rec(k: &Key, v: serde_json::Value) -> Record {
    parse_record(k, v.to_string().as_bytes()).unwrap()
}

fn ep(vtep: Ipv4Addr) -> serde_json::Value {
    json!({"mac": "02:00:00:00:00:09", "vtep": vtep.to_string()})
}

fn put(f: &mut Fleet, k: Key, v: serde_json::Value) {
    let r = rec(&k, v);
    assert!(f.set(&k, Some(r)));
}

fn vm(a: &mut HostAgent, name: &str, ip: &str, groups: &[&str]) {
    let k = Key::Vm(name.into());
    let r = rec(
        &k,
        json!({"port": "tap0", "mac": "02:00:00:00:01:01", "ips": [ip], "network": 100, "security_groups": groups}),
    );
    a.records.set(&k, Some(r));
    a.touch(k);
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn records_arrive_in_dependency_order_and_own_endpoints_are_skipped() {
    let mut f = Fleet::default();
    let mut sw = ModelSwitch::new(ME);
    let mut a = HostAgent::new("hv1", ME, &f);
    // The VM and endpoints come before the network and group they name:
    // one batch puts them in order.
    vm(&mut a, "web", "10.0.0.5", &["g"]);
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(OTHER));
    put(&mut f, Key::Endpoint(100, ip("10.0.0.5")), ep(ME));
    put(
        &mut f,
        Key::Network(100),
        json!({"gateway_mac": "02:00:00:00:00:01"}),
    );
    put(&mut f, Key::Group("g".into()), json!({"rule": []}));
    a.step(&f, &mut sw).unwrap();
    assert_eq!(
        a.errors().count(),
        0,
        "{:?}",
        a.errors().collect::<Vec<_>>()
    );
    assert_eq!(a.counters.batches, 1);
    assert!(sw.has_vm("web"));
    assert_eq!(
        sw.remote(100, ip("10.0.0.6")),
        Some(([2, 0, 0, 0, 0, 9], OTHER))
    );
    // Its own VM's endpoint is not a remote.
    assert_eq!(sw.remote(100, ip("10.0.0.5")), None);
    assert_eq!(sw.remote_count(), 1);
    // Nothing changed: nothing sent.
    a.step(&f, &mut sw).unwrap();
    assert_eq!(a.counters.batches, 1);
    // A move: the endpoint's VTEP changes.
    let third = Ipv4Addr::new(192, 168, 0, 3);
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(third));
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote(100, ip("10.0.0.6")).map(|r| r.1), Some(third));
    // Everything removed: VM and endpoints before the network and group.
    a.records.set(&Key::Vm("web".into()), None);
    a.touch(Key::Vm("web".into()));
    for k in [
        Key::Endpoint(100, ip("10.0.0.6")),
        Key::Endpoint(100, ip("10.0.0.5")),
        Key::Network(100),
        Key::Group("g".into()),
    ] {
        f.set(&k, None);
    }
    a.step(&f, &mut sw).unwrap();
    assert_eq!(
        a.errors().count(),
        0,
        "{:?}",
        a.errors().collect::<Vec<_>>()
    );
    assert_eq!(sw.held().unwrap(), Held::default());
}

#[test]
fn a_refused_record_is_reported_and_the_rest_applied() {
    let mut f = Fleet::default();
    let mut sw = ModelSwitch::new(ME);
    let mut a = HostAgent::new("hv1", ME, &f);
    put(&mut f, Key::Network(100), json!({}));
    vm(&mut a, "web", "10.0.0.5", &[]);
    a.step(&f, &mut sw).unwrap();
    // An endpoint of a network nobody defined is held back by the agent;
    // one with a local VM's address is refused by the switch.
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(OTHER));
    put(&mut f, Key::Endpoint(100, ip("10.0.0.5")), ep(OTHER));
    put(&mut f, Key::Endpoint(200, ip("10.0.0.7")), ep(OTHER));
    vm(&mut a, "db", "10.0.0.8", &["missing"]);
    a.step(&f, &mut sw).unwrap();
    let errors: Vec<(Key, String)> = a.errors().map(|(k, e)| (k.clone(), e.clone())).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .any(|(k, e)| *k == Key::Vm("db".into()) && e.contains("missing")));
    assert!(errors
        .iter()
        .any(|(k, e)| *k == Key::Endpoint(100, ip("10.0.0.5")) && e.contains("local VM")));
    assert!(sw.has_vm("web") && !sw.has_vm("db"));
    assert!(sw.remote(100, ip("10.0.0.6")).is_some());
    assert!(sw.remote(200, ip("10.0.0.7")).is_none());
    // The group arrives: the VM set aside goes in with it.
    put(&mut f, Key::Group("missing".into()), json!({"rule": []}));
    a.step(&f, &mut sw).unwrap();
    assert!(sw.has_vm("db"));
    assert_eq!(a.errors().count(), 1);
    // The endpoint corrected: the error is gone.
    put(&mut f, Key::Endpoint(100, ip("10.0.0.5")), ep(ME));
    a.step(&f, &mut sw).unwrap();
    assert_eq!(a.errors().count(), 0);
}

#[test]
fn a_resync_sends_only_the_difference() {
    let mut f = Fleet::default();
    let mut sw = ModelSwitch::new(ME);
    let mut a = HostAgent::new("hv1", ME, &f);
    put(&mut f, Key::Network(100), json!({}));
    for i in 0..1000u32 {
        put(
            &mut f,
            Key::Endpoint(100, Ipv4Addr::from(0x0a00_1000 + i)),
            ep(OTHER),
        );
    }
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 1000);
    // Behind the agent's back (a compacted history's missed events): 3
    // endpoints changed, 2 deleted, 1 added in etcd; the switch lost 1.
    let mut listing: Vec<(Key, Record)> =
        vec![(Key::Network(100), rec(&Key::Network(100), json!({})))];
    for i in 0..1000u32 {
        let k = Key::Endpoint(100, Ipv4Addr::from(0x0a00_1000 + i));
        let v = match i {
            0..=2 => ep(Ipv4Addr::new(192, 168, 0, 7)),
            3 | 4 => continue,
            _ => ep(OTHER),
        };
        listing.push((k.clone(), rec(&k, v)));
    }
    let k = Key::Endpoint(100, ip("10.0.32.1"));
    listing.push((k.clone(), rec(&k, ep(OTHER))));
    // (The fleet is replaced without journaling: the agent sees it only
    // through the resync.)
    f.replace(listing);
    let end = f.journal.end();
    let mut lost = crate::switch::Op::RemoveRemotes(vec![(100, Ipv4Addr::from(0x0a00_1000 + 500))]);
    sw.apply(std::slice::from_mut(&mut lost)).unwrap();
    a.resync(&f, &mut sw).unwrap();
    assert_eq!(a.cursor(), end);
    assert_eq!(a.counters.resync_keys, 3 + 2 + 1 + 1);
    assert_eq!(sw.remote_count(), 1000 - 2 + 1);
    assert_eq!(
        sw.remote(100, Ipv4Addr::from(0x0a00_1000)).map(|r| r.1),
        Some(Ipv4Addr::new(192, 168, 0, 7))
    );
    assert!(sw.remote(100, Ipv4Addr::from(0x0a00_1000 + 500)).is_some());
}

#[test]
fn a_gateway_network_takes_only_promoted_endpoints() {
    let mut f = Fleet::default();
    let mut sw = ModelSwitch::new(ME);
    let mut a = HostAgent::new("hv1", ME, &f);
    put(
        &mut f,
        Key::Network(100),
        json!({"gateway_vtep": "192.168.0.254"}),
    );
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(OTHER));
    put(&mut f, Key::Endpoint(100, ip("10.0.0.7")), ep(OTHER));
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 0);
    // Promoted: a direct endpoint; demoted: back to the gateway.
    let d = Key::Direct(100, ip("10.0.0.6"));
    a.records.set(&d, Some(Record::Direct));
    a.touch(d.clone());
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 1);
    assert!(sw.remote(100, ip("10.0.0.6")).is_some());
    a.records.set(&d, None);
    a.touch(d);
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 0);
    // The gateway removed from the network: every endpoint comes.
    put(&mut f, Key::Network(100), json!({}));
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 2);
}

#[test]
fn an_unreachable_switch_loses_no_change() {
    struct Down;
    impl Switch for Down {
        fn apply(&mut self, _: &[Op]) -> Result<(), SwitchError> {
            Err(SwitchError::Unreachable("down".into()))
        }
        fn held(&mut self) -> Result<Held, SwitchError> {
            Err(SwitchError::Unreachable("down".into()))
        }
        fn vtep(&mut self) -> Result<Ipv4Addr, SwitchError> {
            Err(SwitchError::Unreachable("down".into()))
        }
    }
    let mut f = Fleet::default();
    let mut a = HostAgent::new("hv1", ME, &f);
    put(&mut f, Key::Network(100), json!({}));
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(OTHER));
    assert!(a.step(&f, &mut Down).is_err());
    let mut sw = ModelSwitch::new(ME);
    a.step(&f, &mut sw).unwrap();
    assert_eq!(sw.remote_count(), 1);
    let _ = Arc::new(0);
}

#[test]
fn a_refusal_that_names_nothing_is_isolated_op_by_op() {
    /// A switch whose refusals say nothing of which operation.
    struct Vague(ModelSwitch);
    impl Switch for Vague {
        fn apply(&mut self, ops: &[Op]) -> Result<(), SwitchError> {
            self.0.apply(ops).map_err(|_| SwitchError::Refused {
                op: None,
                item: None,
                message: "refused".into(),
            })
        }
        fn held(&mut self) -> Result<Held, SwitchError> {
            self.0.held()
        }
        fn vtep(&mut self) -> Result<Ipv4Addr, SwitchError> {
            self.0.vtep()
        }
    }
    let mut f = Fleet::default();
    let mut sw = Vague(ModelSwitch::new(ME));
    let mut a = HostAgent::new("hv1", ME, &f);
    put(&mut f, Key::Network(100), json!({}));
    put(&mut f, Key::Endpoint(100, ip("10.0.0.6")), ep(OTHER));
    vm(&mut a, "web", "10.0.0.5", &["nope"]);
    vm(&mut a, "db", "10.0.0.8", &[]);
    a.step(&f, &mut sw).unwrap();
    let errors: Vec<Key> = a.errors().map(|(k, _)| k.clone()).collect();
    assert_eq!(errors, vec![Key::Vm("web".into())]);
    assert!(sw.0.has_vm("db") && !sw.0.has_vm("web"));
    assert!(sw.0.remote(100, ip("10.0.0.6")).is_some());
}
