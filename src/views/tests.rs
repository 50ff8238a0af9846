use std::collections::HashMap;
use std::net::Ipv4Addr;

use coprocessor::{Coprocessor, PuntMsg, PuntReason, Shared};
use fastpath::dataplane::{FlowDump, Talker};
use fastpath::synth::{self, UdpFlow};
use flowtable::{Action, FlowKey, FlowStats, Ingress, PortId, Vni};

use super::*;
use crate::command::FlowFilter;
use crate::config::Config;

/// Two VMs in network 100, B in group "web" (TCP 80 in), a remote VM.
const CONFIG: &str = r#"
    [switch]
    control_socket = "/tmp/views-test.sock"
    [[port]]
    name = "tap-a"
    type = "tap"
    [[port]]
    name = "tap-b"
    type = "tap"
    [uplink]
    interface = "eth9"
    vtep = "192.168.0.1"
    [[network]]
    vni = 100
    gateway_mac = "02:00:00:00:00:fe"
    [[network.subnet]]
    cidr = "10.0.0.0/24"
    gateway = "10.0.0.1"
    [[security_group]]
    name = "web"
    [[security_group.rule]]
    direction = "ingress"
    protocol = "udp"
    ports = "80"
    [[security_group.rule]]
    direction = "egress"
    [[vm]]
    name = "b"
    port = "tap-b"
    mac = "02:00:00:00:00:0b"
    ips = ["10.0.0.11"]
    network = 100
    security_groups = ["web"]
    [[vm]]
    name = "a"
    port = "tap-a"
    mac = "02:00:00:00:00:0a"
    ips = ["10.0.0.10"]
    network = 100
    [[remote]]
    network = 100
    ip = "10.0.0.20"
    mac = "02:00:00:00:00:20"
    vtep = "192.168.0.2"
"#;

fn shared() -> Shared {
    let built = Config::parse(CONFIG).unwrap().build().unwrap();
    Shared::new(built.topo, built.policy, built.timeouts, built.limits)
}

/// `shared` after A opened a UDP connection to B's port 80 (tracked: B is
/// in a group).
fn with_a_connection() -> Shared {
    let sh = std::sync::Arc::new(coprocessor::SharedLock::new(shared()));
    let mut cp = Coprocessor::with_shared(sh.clone());
    let frame = synth::udp_frame(
        &UdpFlow {
            src_mac: [2, 0, 0, 0, 0, 0x0a],
            dst_mac: [2, 0, 0, 0, 0, 0xfe],
            src_ip: Ipv4Addr::new(10, 0, 0, 10),
            dst_ip: Ipv4Addr::new(10, 0, 0, 11),
            src_port: 4000,
            dst_port: 80,
        },
        64,
    );
    let key = FlowKey {
        ctx: Ingress::Port(PortId(0)).ctx(),
        src_ip: u32::from(Ipv4Addr::new(10, 0, 0, 10)),
        dst_ip: u32::from(Ipv4Addr::new(10, 0, 0, 11)),
        src_port: 4000,
        dst_port: 80,
        proto: 17,
        ..FlowKey::default()
    };
    let out = cp.handle(&PuntMsg::of(
        PortId(0),
        PuntReason::Miss,
        5_000_000_000,
        &frame,
        Some(key),
    ));
    assert!(out.drop.is_none(), "{:?}", out.drop);
    drop(cp);
    let sh = std::sync::Arc::try_unwrap(sh).ok().unwrap();
    sh.into_inner()
}

#[test]
fn the_topology_lists_networks_vms_by_port_and_remotes() {
    let v = topology(&shared());
    assert_eq!(v["networks"][0]["vni"], 100);
    assert_eq!(v["networks"][0]["subnets"][0]["cidr"], "10.0.0.0/24");
    // By port, whatever the config's order.
    assert_eq!(v["vms"][0]["name"], "a");
    assert_eq!(v["vms"][1]["name"], "b");
    assert_eq!(v["vms"][1]["security_groups"], json!(["web"]));
    assert_eq!(v["remotes_total"], 1);
    assert_eq!(v["remotes"][0]["vtep"], "192.168.0.2");
}

#[test]
fn a_tracked_connection_shows_with_its_rule_vm_and_age() {
    let sh = with_a_connection();
    let v = conntrack(&sh, 7_000_000_000);
    assert_eq!(v["total"], 1, "{v}");
    let c = &v["connections"][0];
    assert_eq!(c["original"], "10.0.0.10:4000 > 10.0.0.11:80");
    assert_eq!(c["reply"], "10.0.0.11:80 > 10.0.0.10:4000");
    assert_eq!(c["rule"], "web#0");
    assert_eq!(c["age_s"], 2.0);
    let counters = conntrack_counters(&sh);
    assert_eq!(counters["connections"], 1);
    assert_eq!(counters["created"], 1);
    // In one shard of 16, both its keys (no NAT).
    let shards = counters["shard_connections"].as_array().unwrap();
    assert_eq!(shards.len(), 16);
    assert_eq!(shards.iter().filter(|n| **n == 1).count(), 1, "{counters}");
    // The owner is the VM that opened it (A: it has no group, so none).
    let n = nat(&sh);
    assert_eq!(n["ports_in_use"], 0);
    assert_eq!(conntrack(&shared(), 0)["total"], 0);
}

#[test]
fn groups_show_their_rules_in_the_config_s_words() {
    let v = groups(&shared());
    assert_eq!(v["groups"][0]["name"], "web");
    let rules = &v["groups"][0]["rules"];
    assert_eq!(rules[0]["direction"], "ingress");
    assert_eq!(rules[0]["protocol"], "udp");
    assert_eq!(rules[1]["direction"], "egress");
}

fn dump(ingress: Ingress, src: [u8; 4], dst: [u8; 4], proto: u8) -> FlowDump {
    FlowDump {
        thread: 0,
        key: FlowKey {
            ctx: ingress.ctx(),
            src_ip: u32::from(Ipv4Addr::from(src)),
            dst_ip: u32::from(Ipv4Addr::from(dst)),
            proto,
            ..FlowKey::default()
        },
        action: Action::output(PortId(1)),
        stats: FlowStats {
            packets: 3,
            bytes: 300,
            last_used: 1_000_000_000,
        },
        current: true,
    }
}

#[test]
fn the_flow_filter_keeps_what_it_names_and_no_more_than_its_limit() {
    let vni = Ingress::Vni(Vni::new(100).unwrap());
    let f = [
        dump(Ingress::Port(PortId(0)), [10, 0, 0, 10], [10, 0, 0, 11], 17),
        dump(Ingress::Port(PortId(1)), [10, 0, 0, 11], [10, 0, 0, 10], 6),
        dump(vni, [10, 0, 0, 20], [10, 0, 0, 10], 17),
    ];
    let count = |flt: FlowFilter| flows(&f, &flt, 2_000_000_000)["shown"].clone();
    assert_eq!(count(FlowFilter::default()), 3);
    let on = |port| FlowFilter {
        port: Some(port),
        ..Default::default()
    };
    assert_eq!(count(on(1)), 1);
    assert_eq!(
        count(FlowFilter {
            vni: Some(100),
            ..Default::default()
        }),
        1
    );
    let ip = Some(Ipv4Addr::new(10, 0, 0, 11));
    assert_eq!(
        count(FlowFilter {
            ip,
            ..Default::default()
        }),
        2
    );
    assert_eq!(
        count(FlowFilter {
            ip,
            proto: Some(6),
            ..Default::default()
        }),
        1
    );
    assert_eq!(
        count(FlowFilter {
            limit: Some(2),
            ..Default::default()
        }),
        2
    );
    let v = flows(&f, &FlowFilter::default(), 2_000_000_000);
    assert_eq!(v["total"], 3);
}

#[test]
fn top_talkers_give_rates_since_the_last_sample_and_name_the_gateway() {
    let sh = shared();
    let t = |dst: [u8; 4], bytes| Talker {
        vni: 100,
        dst: u32::from(Ipv4Addr::from(dst)),
        vtep: u32::from(Ipv4Addr::new(192, 168, 0, 2)),
        flows: 1,
        packets: 10,
        bytes,
    };
    let talkers = [t([10, 0, 0, 20], 5000), t([10, 0, 0, 21], 100)];
    let mut before = HashMap::new();
    before.insert((100, talkers[0].dst, talkers[0].vtep), 1000u64);
    let v = top_talkers(&talkers, &before, 2.0, &sh, 1);
    assert_eq!(v["destinations"], 2);
    assert_eq!(v["talkers"].as_array().unwrap().len(), 1);
    assert_eq!(v["talkers"][0]["bytes_per_s"], 2000.0);
    assert_eq!(v["talkers"][0]["via_gateway"], false);
}
