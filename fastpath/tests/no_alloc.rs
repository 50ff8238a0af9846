//! The steady state of the fast path allocates nothing: after warm-up,
//! processing batches of hits, misses and punts (copied into punt
//! messages) makes no heap allocation on this thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use fastpath::synth::{self, UdpFlow};
use fastpath::{punt_path, BatchOut, Class, Desc, Pipeline, PipelineConfig, PuntConfig, SliceMem};
use flowtable::{Action, EncapTemplate, FlowHasher, FlowTable, Ingress, PortId};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only counts, and reading a const-initialised thread-local Cell
// neither allocates nor re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    // SAFETY: the caller upholds GlobalAlloc's contract, passed on to System as is.
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    // SAFETY: the caller upholds GlobalAlloc's contract, passed on to System as is.
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from System.alloc with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    // SAFETY: the caller upholds GlobalAlloc's contract, passed on to System as is.
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: `p` came from System.alloc with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_makes_no_allocation() {
    let cfg = PipelineConfig {
        uplink: PortId(0),
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        udp_port: 4789,
        ports: 2,
    };
    let mut p = Pipeline::new(
        &cfg,
        FlowTable::with_hasher(4096, FlowHasher::with_seed(9)).unwrap(),
    );
    let tpl = vxlan::Template::new(&vxlan::TemplateSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        local_vtep: cfg.local_vtep,
        remote_vtep: Ipv4Addr::new(192, 168, 0, 2),
        vni: 7,
        ttl: 64,
    })
    .unwrap();
    let action = Action {
        encap: Some(EncapTemplate(*tpl.bytes())),
        ..Action::output(PortId(0))
    };
    // A tracked, NATed, routed flow: the rarer rewrites run too.
    let tracked = Action {
        conntrack: true,
        dec_ttl: true,
        nat: Some(flowtable::Nat {
            side: flowtable::NatSide::Src,
            ip: 0xcb00_710a,
            port: Some(40000),
        }),
        ..Action::output(PortId(0))
    };
    const CHUNK: usize = 2048;
    let mut mem = vec![0u8; CHUNK * 32];
    let mut descs = Vec::new();
    let mut flows = Vec::new();
    for i in 0..32u16 {
        let f = UdpFlow {
            src_mac: [2, 0, 0, 0, 0, 9],
            dst_mac: [2, 0, 0, 0, 0, 8],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
            src_port: 1000 + i,
            dst_port: 80,
        };
        let at = usize::from(i) * CHUNK + 256;
        synth::write_udp_frame(&mut mem[at..], &f, 64);
        flows.push((at, f));
        descs.push(Desc::new(at as u64, 64));
        // Half the flows are installed: the rest miss and are punted.
        if i % 2 == 0 {
            let Class::Flow(k) =
                fastpath::classify::classify_l2(&mem[at..at + 64], Ingress::Port(PortId(1)))
            else {
                panic!("synthetic frame did not classify");
            };
            let a = if i % 4 == 0 { &tracked } else { &action };
            p.table_mut().insert(k, a, 0).unwrap();
        }
    }
    let (mut punter, rx) = punt_path(
        &PuntConfig {
            rate: 1_000_000,
            ..PuntConfig::default()
        },
        2,
    );
    let mut out = BatchOut::new(2);
    let mut clock = 0u64;
    let mut run = |rounds: u64, p: &mut Pipeline, mem: &mut Vec<u8>| {
        for _ in 0..rounds {
            clock += 1_000_000;
            let r = clock;
            // Fresh frames each round (NAT and TTL rewrite them in place).
            for (at, f) in &flows {
                synth::write_udp_frame(&mut mem[*at..], f, 64);
            }
            let mut m = SliceMem::new(mem, CHUNK).unwrap();
            p.process(PortId(1), &mut m, &descs, r, &mut out);
            for item in &out.punt {
                let (chunk, off) = fastpath::FrameMem::chunk_mut(&mut m, item.desc.addr).unwrap();
                let frame = &chunk[off..off + item.desc.len as usize];
                punter
                    .punt(PortId(1), item.reason, frame, item.inner_start, r)
                    .unwrap();
            }
            while let Some(msg) = rx.recv() {
                rx.recycle(msg);
            }
        }
    };
    run(100, &mut p, &mut mem);
    COUNTING.with(|c| c.set(true));
    run(1000, &mut p, &mut mem);
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        0,
        "allocations in the steady state"
    );
    assert_eq!(p.counters().hits, 1100 * 16);
    assert_eq!(p.counters().misses, 1100 * 16);
}
