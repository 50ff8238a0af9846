//! The load balancer's figures that need no switch (`benches/lb` runs
//! this): the time to build a Maglev table for 1,000 equally weighted
//! backends (median of 21 builds), the share of 100,000 connections that
//! change backend when one of 100 backends is removed (ideal: its own
//! 1 %), and the memory one tracked load-balanced connection takes in the
//! coprocessor (conntrack's slot, key index and timer, and the VIP's
//! count), counted by the allocator over a million connections opened
//! through the real decision path. Prints
//! `maglev_build_ms=<n> maglev_build_skewed_ms=<n> maglev_disruption_pct=<n> bytes_per_conn=<n>`
//! (skewed: 1,000 backends, one of weight 1,000 and the rest weight 1,
//! the fill's worst case: a round per entry of the heavy backend).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use coprocessor::conntrack::{Limits, Timeouts};
use coprocessor::maglev::{flow_hash, Backend, Table};
use coprocessor::services::{BackendSpec, ServiceSpec};
use coprocessor::topology::{LocalVm, Network, Subnet, Topology};
use coprocessor::{Coprocessor, Shared};
use dpif::{PuntMsg, PuntReason};
use fastpath::synth::{self, UdpFlow};
use flowtable::{FlowKey, PortId, Vni};

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting.
struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Memory per load-balanced connection: `n` TCP SYNs from 250 client VMs
/// to a VIP of 100 backends, each a new connection, through
/// `Coprocessor::handle`; the bytes still allocated afterwards over `n`.
fn bytes_per_conn(n: u32) -> f64 {
    let vni = Vni::new(100).unwrap();
    let mut t = Topology::new(None);
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
        snat: false,
    })
    .unwrap();
    let clients = 250u16;
    for i in 0..clients + 100 {
        let [a, b] = i.to_be_bytes();
        t.add_vm(LocalVm {
            name: format!("vm{i}"),
            port: PortId(i + 1),
            mac: [2, 0, 0, 0, a, b],
            ips: vec![Ipv4Addr::new(10, 0, 1 + a, b)],
            vni,
            hostname: None,
            groups: vec![],
            floating_ip: None,
        })
        .unwrap();
    }
    let vip = Ipv4Addr::new(10, 0, 0, 100);
    let backends = (clients..clients + 100)
        .map(|i| {
            let [a, b] = i.to_be_bytes();
            BackendSpec {
                ip: Ipv4Addr::new(10, 0, 1 + a, b),
                port: 8080,
                weight: 1,
            }
        })
        .collect();
    // Every connection stays half-open (no SYN-ACK comes): room for them
    // all (half-open ones may fill a sixteenth of the table, or of a VM's
    // quota).
    let limits = Limits {
        max: 16 * n as usize,
        per_vm: n,
    };
    let sh = Shared::new(t, Default::default(), Timeouts::default(), limits);
    sh.services()
        .insert(ServiceSpec {
            name: "lb".into(),
            vni: 100,
            vip,
            proto: 6,
            port: 80,
            backends,
            max_connections: 0,
            health: None,
            external_vip: None,
        })
        .unwrap();
    let mut cp = Coprocessor::with_shared(Arc::new(coprocessor::SharedLock::new(sh)));
    let classifier = fastpath::Classifier {
        uplink: PortId(0),
        decap: vxlan::DecapConfig {
            local_vtep: 1,
            udp_port: 4789,
        },
    };
    let before = LIVE.load(Ordering::Relaxed);
    for c in 0..n {
        let vm = u16::try_from(c % u32::from(clients)).unwrap();
        let [a, b] = vm.to_be_bytes();
        let sport = u16::try_from(1024 + c / u32::from(clients)).unwrap();
        let f = synth::tcp_frame(
            &UdpFlow {
                src_mac: [2, 0, 0, 0, a, b],
                dst_mac: [2, 0, 0, 0, 0, 0xfe],
                src_ip: Ipv4Addr::new(10, 0, 1 + a, b),
                dst_ip: vip,
                src_port: sport,
                dst_port: 80,
            },
            0x02,
            b"",
        );
        let port = PortId(vm + 1);
        let mut key = FlowKey::default();
        classifier.classify(port, &f, &mut key);
        let out = cp.handle(&PuntMsg::of(port, PuntReason::Miss, 1, &f, Some(key)));
        assert!(out.drop.is_none(), "{:?}", out.drop);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let sh = cp.shared().write();
    assert_eq!(sh.ct.len(), n as usize);
    (after - before) as f64 / f64::from(n)
}

fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<(Backend, u32)> {
    (0..n)
        .map(|i| {
            let b = Backend {
                ip: Ipv4Addr::from(0x0a00_0000 + i),
                port: 8080,
            };
            (b, weight(i))
        })
        .collect()
}

fn median_build_ms(set: &[(Backend, u32)]) -> f64 {
    let mut ms: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let table = Table::build(set).expect("valid set");
            std::hint::black_box(table);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    // CONNS_ONLY=N: only open N connections (to count the instructions
    // of N setups under callgrind, without the tables' builds).
    if let Some(n) = std::env::var("CONNS_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        println!("bytes_per_conn={:.0}", bytes_per_conn(n));
        return;
    }
    let even = median_build_ms(&backends(1000, |_| 1));
    let skewed = median_build_ms(&backends(1000, |i| if i == 0 { 1000 } else { 1 }));
    let set = backends(100, |_| 1);
    let before = Table::build(&set).unwrap().unwrap();
    let after = Table::build(&set[1..]).unwrap().unwrap();
    let n = 100_000u32;
    let moved = (0..n)
        .filter(|&i| {
            let src = Ipv4Addr::from(0xc0a8_0000 + i);
            let h = flow_hash(src, 40_000, Ipv4Addr::new(10, 9, 9, 9), 80, 6);
            before.pick(h) != after.pick(h)
        })
        .count();
    let per_conn = bytes_per_conn(1_000_000);
    println!(
        "maglev_build_ms={even:.2} maglev_build_skewed_ms={skewed:.2} maglev_disruption_pct={:.2} bytes_per_conn={per_conn:.0}",
        moved as f64 * 100.0 / f64::from(n)
    );
}
