//! Coprocessor flow setup rate on one thread: a punted miss is classified,
//! decided (anti-spoof, forwarding or routing), checked against a
//! security group of 100 rules, tracked (conntrack insert), translated
//! where it leaves for the external network (SNAT port allocation),
//! compiled into its forward and reverse flows, and both flows installed
//! by a real fast-path thread: each answer goes as the daemon sends it
//! (a `dpif::Update` on the bounded queue, a wakeup), and the timer
//! stops only when that thread has applied the last one to its table.
//!
//! The rule set makes every rule count: all 100 are egress rules for the
//! traffic's protocol and port, and the first 99 differ from it only in
//! their peer, the last field compared, so each is checked to its end
//! before the 100th admits.
//!
//! Half the new connections go to remote VMs (VXLAN, half of those
//! routed), half to external addresses through SNAT. Every timed setup is
//! a new connection into a fresh flow table: shared state, table and
//! fast-path thread are made anew (untimed) for each timed batch.
//!
//! A third, `lb_setup`, is TCP connections from that VM in no group to a
//! load-balanced VIP of 100 backends (`benches/lb`): Maglev pick,
//! conntrack, DNAT forward and reverse flows.
//!
//! A second figure, `baseline`, is the same traffic from a VM in no
//! security group to remote VMs only (stateless, one flow per setup),
//! through the same queue.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use coprocessor::acl::{Direction, Peer, Policy, Rule, SecurityGroup};
use coprocessor::conntrack::{Limits, Timeouts};
use coprocessor::services::{BackendSpec, ServiceSpec, Services};
use coprocessor::topology::{External, LocalVm, Network, RemoteVm, Subnet, Topology, Uplink};
use coprocessor::{Coprocessor, Shared};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use dpif::{PuntMsg, PuntReason, Update};
use fastpath::dataplane::{Dataplane, Links, LoopConfig, Request};
use fastpath::synth::{self, UdpFlow};
use fastpath::umem::FramePool;
use fastpath::wake::Wake;
use fastpath::{Classifier, Kind, Pipeline, PipelineConfig};
use flowtable::{FlowHasher, FlowKey, FlowTable, PortId, Vni};

// The daemon's own hand-off to the fast path (the binary has no library
// target to import it from).
#[path = "pin.rs"]
mod pin;
use pin::pin_to;

#[path = "../src/fastpaths.rs"]
#[allow(dead_code)]
mod fastpaths;

const FLOWS: usize = 4096;
const EXT: PortId = PortId(2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// 99 egress rules for UDP port 80 whose peer (compared last) does not
/// match the benchmark's traffic, then one that does.
fn hundred_rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = (0..99u16)
        .map(|i| Rule {
            direction: Direction::Egress,
            proto: Some(17),
            ports: (80 - i % 8, 80 + i % 8),
            peer: Peer::Cidr(format!("172.{}.{}.0/24", 16 + i % 16, i).parse().unwrap()),
        })
        .collect();
    rules.push(Rule {
        direction: Direction::Egress,
        proto: Some(17),
        ports: (80, 80),
        peer: Peer::Cidr("0.0.0.0/0".parse().unwrap()),
    });
    rules
}

fn topology(filtered: bool) -> Topology {
    let vni = Vni::new(100).unwrap();
    let mut t = Topology::new(Some(Uplink {
        port: PortId(0),
        mac: [2, 0xaa, 0, 0, 0, 1],
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        mtu: 1500,
        ttl: 64,
    }));
    t.external = Some(External {
        port: EXT,
        mac: [2, 0xee, 0, 0, 0, 1],
        cidr: "203.0.113.0/24".parse().unwrap(),
        gateway: Some(ROUTER),
        snat: vec![
            Ipv4Addr::new(203, 0, 113, 10),
            Ipv4Addr::new(203, 0, 113, 11),
        ],
        ports: (1024, 65535),
        per_vm_ports: 100_000,
    });
    t.add_network(Network {
        vni,
        subnets: vec![
            Subnet {
                cidr: "10.0.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            Subnet {
                cidr: "10.1.0.0/16".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 1, 0, 1),
            },
        ],
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
        port: PortId(1),
        mac: [2, 0, 0, 0, 0, 1],
        ips: vec![Ipv4Addr::new(10, 0, 0, 10)],
        vni,
        hostname: None,
        groups: if filtered { vec![0] } else { vec![] },
        floating_ip: None,
    })
    .unwrap();
    // 1 000 remote VMs on 16 hypervisors, half of them in the other subnet
    // (routed), half in ours.
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(if i % 2 == 0 { 0x0a00_1000 } else { 0x0a01_1000 } + i);
        let vtep = Ipv4Addr::new(192, 168, 1, u8::try_from(i % 16).unwrap());
        let b = i.to_be_bytes();
        t.add_remote(RemoteVm {
            ip,
            mac: [2, 1, 0, 0, b[2], b[3]],
            vni,
            vtep,
            groups: vec![],
        })
        .unwrap();
        t.set_neighbor(vtep, [2, 0xbb, 0, 0, 0, u8::try_from(i % 16).unwrap()]);
    }
    t
}

/// New-connection frames from VM a: to remote VMs, and (if `external`)
/// every other one to an external address.
fn frames(external: bool) -> Vec<Vec<u8>> {
    (0..FLOWS)
        .map(|n| {
            let i = u32::try_from(n % 1000).unwrap();
            let dst = if external && n % 2 == 1 {
                Ipv4Addr::from(0xc633_6400 + i % 200) // 198.51.100.x
            } else {
                Ipv4Addr::from(if i % 2 == 0 { 0x0a00_1000 } else { 0x0a01_1000 } + i)
            };
            synth::udp_frame(
                &UdpFlow {
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 0, 0xfe],
                    src_ip: Ipv4Addr::new(10, 0, 0, 10),
                    dst_ip: dst,
                    src_port: 1024 + u16::try_from(n).unwrap(),
                    dst_port: 80,
                },
                64,
            )
        })
        .collect()
}

/// A service (VIP 10.0.0.100, TCP 80) over 100 of the remote VMs (port
/// 8080), and TCP SYNs from VM a to it, each a new connection: the LB
/// stage picks a backend from the Maglev table, conntrack pins it, and
/// the DNAT and reverse flows are compiled (`benches/lb`).
fn service(topo: &Topology) -> (Services, Vec<Vec<u8>>) {
    let vip = Ipv4Addr::new(10, 0, 0, 100);
    let spec = ServiceSpec {
        name: "bench".into(),
        vni: 100,
        vip,
        proto: 6,
        port: 80,
        backends: (0..100u32)
            .map(|i| BackendSpec {
                ip: Ipv4Addr::from(0x0a00_1000 + 2 * i),
                port: 8080,
                weight: 1,
            })
            .collect(),
        max_connections: 0,
        health: None,
        external_vip: None,
    };
    let mut s = Services::default();
    s.check(&spec, topo, None).expect("a valid service");
    s.insert(spec).expect("a valid service");
    let frames = (0..FLOWS)
        .map(|n| {
            let f = UdpFlow {
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: [2, 0, 0, 0, 0, 0xfe],
                src_ip: Ipv4Addr::new(10, 0, 0, 10),
                dst_ip: vip,
                src_port: 1024 + u16::try_from(n).unwrap(),
                dst_port: 80,
            };
            synth::tcp_frame(&f, 0x02, b"")
        })
        .collect();
    (s, frames)
}

/// A coprocessor with fresh shared state (no connections yet).
fn fresh(topo: &Topology, policy: &Policy, services: &Services) -> Coprocessor {
    // One VM opens every connection: its quota is the table's (a batch of
    // TCP SYNs is 4,096 half-open connections, above a sixteenth of the
    // default per-VM quota).
    let limits = Limits {
        per_vm: u32::try_from(Limits::default().max).unwrap_or(u32::MAX),
        ..Limits::default()
    };
    let mut sh = Shared::new(topo.clone(), policy.clone(), Timeouts::default(), limits);
    sh.set_services(services.clone());
    coprocessor::shared::inner(&mut sh.ext_neighbors).insert(ROUTER, [2, 0xee, 0, 0, 0, 0xfe]);
    Coprocessor::with_shared(Arc::new(coprocessor::SharedLock::new(sh)))
}

/// The coprocessor (the bench's own thread) and the fast-path thread each
/// on a core of their own, as a deployment places them: left to the
/// scheduler, they shared a core in some samples and not in others
/// (setups/s then 360k or 780k from one sample to the next).
const COPROCESSOR_CPU: usize = 0;
const FASTPATH_CPU: usize = 1;

/// A fast-path thread with no ports and a fresh table, applying what
/// arrives on its install queue (adaptive: it sleeps until woken, as the
/// switch's does when idle).
struct FastPath {
    fast: fastpaths::FastPaths,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FastPath {
    fn start() -> FastPath {
        let installs = Arc::new(ArrayQueue::new(4096));
        let wake = Arc::new(Wake::new().unwrap());
        let (req_tx, req_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (punter, recycler) = fastpath::punt_path(&fastpath::PuntConfig::default(), 0);
        let links = Links {
            punter,
            recycler,
            installs: installs.clone(),
            requests: req_rx,
            wake: wake.clone(),
            coprocessors: Vec::new(),
            reports: Arc::new(fastpath::report::Reports::new(1, 1024)),
            epoch: Instant::now(),
            thread: 0,
        };
        let table = FlowTable::with_hasher(FLOWS * 4, FlowHasher::with_seed(1)).unwrap();
        let cfg = PipelineConfig {
            uplink: PortId(0),
            local_vtep: Ipv4Addr::new(192, 168, 0, 1),
            udp_port: 4789,
            ports: 0,
        };
        let pool = FramePool::new(64, 2048, false).unwrap();
        let mut dp = Dataplane::new(
            Vec::new(),
            Pipeline::new(&cfg, table),
            links,
            LoopConfig::default(),
            pool,
        );
        let s = stop.clone();
        let thread = Some(thread::spawn(move || {
            pin_to(FASTPATH_CPU);
            dp.run(&s)
        }));
        FastPath {
            fast: fastpaths::FastPaths::new(vec![fastpaths::FastPath {
                requests: req_tx,
                installs,
                wake,
            }]),
            stop,
            thread,
        }
    }

    /// As the daemon sends it: queued (waiting while the queue is full),
    /// the thread woken.
    fn send(&self, update: Update) {
        self.fast.send_update(None, update, &self.stop);
    }

    /// Flows the thread has installed so far.
    fn installed(&self) -> u64 {
        let s = self.fast.ask_first(Request::Stats).unwrap();
        assert_eq!(s.install_failures, 0, "the table refused flows");
        s.installs
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.fast.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fast path's classifier, as the bench's switch has it.
fn classifier() -> Classifier {
    Classifier {
        uplink: PortId(0),
        decap: vxlan::DecapConfig {
            local_vtep: 0xc0a8_0001,
            udp_port: 4789,
        },
    }
}

/// `msg` made the punt of frame `f` from VM port 1, as the fast path makes
/// it (classified, copied).
fn punted(classifier: &Classifier, msg: &mut PuntMsg, f: &[u8]) {
    let mut key = FlowKey::default();
    let c = classifier.classify(PortId(1), f, &mut key);
    assert_eq!(c.kind, Kind::Flow);
    msg.data.clear();
    msg.data.extend_from_slice(f);
    msg.key = Some(key);
}

/// Time `iters` batches of FLOWS setups, each batch on fresh state and a
/// fresh fast-path thread.
fn run(
    topo: &Topology,
    policy: &Policy,
    services: &Services,
    frames: &[Vec<u8>],
    iters: u64,
    expect: usize,
) -> Duration {
    let classifier = classifier();
    let mut total = Duration::ZERO;
    let want = (frames.len() * expect) as u64;
    for _ in 0..iters {
        let mut cp = fresh(topo, policy, services);
        let fp = FastPath::start();
        // One message, refilled as the fast path fills its pooled ones.
        let mut msg = PuntMsg::of(PortId(1), PuntReason::Miss, 1, &[], None);
        msg.data.reserve(2048);
        let t = Instant::now();
        for f in frames {
            punted(&classifier, &mut msg, f);
            let out = cp.handle(&msg);
            assert!(out.drop.is_none() && out.reinject, "{:?}", out.drop);
            assert_eq!(out.flows.len(), expect);
            fp.send(out);
        }
        // Until the fast path has applied the last install.
        while fp.installed() < want {
            thread::yield_now();
        }
        total += t.elapsed();
        drop(fp);
        drop(cp);
    }
    total
}

/// Decisions alone (no install path), on `threads` coprocessor threads
/// sharing one state, each pinned to a core of its own and given the
/// frames the fast path steers to it: how setups scale with coprocessor
/// threads (issue 17, item 4). The state lives through a sample's
/// batches; each batch's connections end (untimed) after it.
fn decide(
    topo: &Topology,
    policy: &Policy,
    frames: &[Vec<u8>],
    iters: u64,
    threads: usize,
) -> Duration {
    let classifier = classifier();
    // Each thread gets the frames the fast path would punt to it: those
    // of the connections whose shard it keeps (`dpif::steer`).
    let mut parts: Vec<Vec<&[u8]>> = vec![Vec::new(); threads];
    let mut msg = PuntMsg::of(PortId(1), PuntReason::Miss, 1, &[], None);
    for f in frames {
        punted(&classifier, &mut msg, f);
        let key = msg.key.expect("a classified frame");
        parts[dpif::steer::thread(&key, threads)].push(f);
    }
    let first = fresh(topo, policy, &Services::default());
    let shared = Arc::clone(first.shared());
    let mut cps = vec![first];
    cps.extend((1..threads).map(|_| Coprocessor::with_shared(Arc::clone(&shared))));
    let mut total = Duration::ZERO;
    // Round 0 is not timed: every timed round finds the tables as a
    // running switch has them (their memory touched, connections come
    // and gone), not as a new process does (each thread faulting pages
    // in, which measures the kernel).
    for round in 0..=iters {
        let start = std::sync::Barrier::new(threads + 1);
        let took = thread::scope(|s| {
            let workers: Vec<_> = cps
                .iter_mut()
                .enumerate()
                .zip(&parts)
                .map(|((i, cp), part)| {
                    let (start, classifier) = (&start, &classifier);
                    s.spawn(move || {
                        pin_to(i % 2);
                        let mut msg = PuntMsg::of(PortId(1), PuntReason::Miss, 1, &[], None);
                        msg.data.reserve(2048);
                        start.wait();
                        for f in part {
                            punted(classifier, &mut msg, f);
                            let out = cp.handle(&msg);
                            assert!(out.drop.is_none(), "{:?}", out.drop);
                        }
                        let end = Instant::now();
                        // Untimed: the round's connections end (on the
                        // thread that made them, as their shards are its).
                        let sh = coprocessor::read(cp.shared());
                        let mut out = Update::default();
                        for f in part {
                            punted(classifier, &mut msg, f);
                            let key = msg.key.expect("a classified frame");
                            let conn = sh.ct.lookup(&key).and_then(|(id, _)| sh.ct.remove(id));
                            if let Some(c) = conn {
                                sh.end(&c, &mut out);
                            }
                        }
                        end
                    })
                })
                .collect();
            start.wait();
            let t = Instant::now();
            let ends: Vec<Instant> = workers.into_iter().map(|w| w.join().unwrap()).collect();
            ends.into_iter().max().map_or(Duration::ZERO, |e| e - t)
        });
        if round > 0 {
            total += took;
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    pin_to(COPROCESSOR_CPU);
    let policy = Policy::new(vec![SecurityGroup {
        name: "bench".into(),
        rules: hundred_rules(),
    }])
    .unwrap();
    let (filtered, plain) = (topology(true), topology(false));
    let (mixed, remote_only) = (frames(true), frames(false));
    let none = Services::default();
    let (services, to_vip) = service(&plain);
    let mut g = c.benchmark_group("coprocessor");
    g.throughput(Throughput::Elements(FLOWS as u64));
    g.bench_function("flow_setup", |b| {
        b.iter_custom(|iters| run(&filtered, &policy, &none, &mixed, iters, 2))
    });
    g.bench_function("baseline", |b| {
        b.iter_custom(|iters| run(&plain, &policy, &none, &remote_only, iters, 1))
    });
    g.bench_function("lb_setup", |b| {
        b.iter_custom(|iters| run(&plain, &policy, &services, &to_vip, iters, 2))
    });
    g.bench_function("decide_1t", |b| {
        b.iter_custom(|iters| decide(&filtered, &policy, &mixed, iters, 1))
    });
    g.bench_function("decide_2t", |b| {
        b.iter_custom(|iters| decide(&filtered, &policy, &mixed, iters, 2))
    });
    g.finish();
}

criterion_group! {
    name = flow_setup;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(flow_setup);
