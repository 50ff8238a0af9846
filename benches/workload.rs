//! Benchmark workloads for the fast-path pipeline, shared by the criterion
//! bench (`pipeline.rs`) and the callgrind driver (`instr.rs`).
//!
//! A workload owns a pipeline whose table holds `n` flows (capacity `n`:
//! the table is as full as it is allowed to be), a list of the flows'
//! tuples in random order, and a small ring of 64-byte frames. Before each
//! timed window, [`Workload::prepare`] writes the next tuples into the
//! frames (as a NIC would have just delivered them: in cache, addresses
//! all over the table); [`Workload::run`] is what is timed.

use std::net::Ipv4Addr;

use fastpath::synth::{self, at, UdpFlow};
use fastpath::{
    punt_path, BatchOut, Desc, Pipeline, PipelineConfig, PuntConfig, PuntReceiver, Punter,
    SliceMem, BATCH,
};
use flowtable::{Action, EncapTemplate, FlowHasher, FlowKey, FlowTable, Ingress, PortId, Vni};
use vxlan::{TemplateSpec, OUTER_LEN, UDP_PORT};

/// Batches per timed window.
pub const GROUP: usize = 16;
const CHUNK: usize = 2048;
const HEADROOM: usize = 256;
const FRAME_LEN: usize = 64;
const UPLINK: PortId = PortId(0);
const VM: PortId = PortId(1);
const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE_VTEP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const VNI: u32 = 5001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// VM port → lookup → VXLAN encap → uplink.
    Encap,
    /// Uplink → VXLAN decap → lookup → VM port.
    Decap,
    /// VM port → lookup miss → copy into a punt message.
    Miss,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        match s {
            "encap" => Some(Scenario::Encap),
            "decap" => Some(Scenario::Decap),
            "miss" => Some(Scenario::Miss),
            _ => None,
        }
    }
}

/// The i-th flow's tuple: injective for i < 2^20.
fn tuple(i: u32) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let src = Ipv4Addr::from(0x0a00_0000 | (i >> 12));
    let dst = Ipv4Addr::from(0x0a01_0000 | ((i >> 6) & 0x3f));
    let sport = 1024 + u16::try_from(i & 0x3f).unwrap_or(0);
    (src, dst, sport, 80)
}

/// Deterministic shuffle (xorshift64*), so runs are comparable.
fn shuffle(v: &mut [u32], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let r = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let j = usize::try_from(r % (i as u64 + 1)).unwrap_or(0);
        v.swap(i, j);
    }
}

pub struct Workload {
    pub scenario: Scenario,
    pipeline: Pipeline,
    punter: Punter,
    punt_rx: PuntReceiver,
    mem: Vec<u8>,
    descs: Vec<Desc>,
    order: Vec<u32>,
    cursor: usize,
    out: BatchOut,
    now: u64,
    ingress: PortId,
    /// Offset of the inner frame within each frame (0, or OUTER_LEN).
    inner: usize,
}

fn base_flow() -> UdpFlow {
    UdpFlow {
        src_mac: [0x02, 0, 0, 0, 0, 0x01],
        dst_mac: [0x02, 0, 0, 0, 0, 0xfe],
        src_ip: Ipv4Addr::new(10, 0, 0, 1),
        dst_ip: Ipv4Addr::new(10, 1, 0, 1),
        src_port: 1024,
        dst_port: 80,
    }
}

impl Workload {
    /// A workload with `flows` flows installed.
    pub fn new(scenario: Scenario, flows: u32) -> Workload {
        let cfg = PipelineConfig {
            uplink: UPLINK,
            local_vtep: LOCAL_VTEP,
            udp_port: UDP_PORT,
            ports: 8,
        };
        let table = FlowTable::with_hasher(flows as usize, FlowHasher::with_seed(0x5eed))
            .expect("table capacity");
        // As the daemon does: huge pages for the table where the kernel
        // allows (reported by the bench as thp_kib).
        if let Err(e) = fastpath::hugepage::advise_flow_table(&table) {
            eprintln!("no huge pages for the flow table: {e}");
        }
        let mut pipeline = Pipeline::new(&cfg, table);
        let vni = Vni::new(VNI).expect("VNI fits");
        // 64 remote hypervisors, one per destination address.
        let encap_actions: Vec<Action> = (0..64u8)
            .map(|h| {
                let t = vxlan::Template::new(&TemplateSpec {
                    src_mac: [0x02, 0xaa, 0, 0, 0, 1],
                    dst_mac: [0x02, 0xaa, 0, 0, 0, 2],
                    local_vtep: LOCAL_VTEP,
                    remote_vtep: Ipv4Addr::new(192, 168, 1, h),
                    vni: VNI,
                    ttl: 64,
                })
                .expect("template");
                Action {
                    set_eth_dst: Some([0x02, 0xbb, 0, 0, 0, h]),
                    encap: Some(EncapTemplate(*t.bytes())),
                    max_len: 1500,
                    ..Action::output(UPLINK)
                }
            })
            .collect();
        let decap_actions: Vec<Action> = (0..4u16)
            .map(|p| Action {
                decap: Some(u32::from(REMOTE_VTEP)),
                set_eth_dst: Some([0x02, 0xcc, 0, 0, 0, 1]),
                set_eth_src: Some([0x02, 0, 0, 0, 0, 0xfe]),
                ..Action::output(PortId(1 + p))
            })
            .collect();
        for i in 0..flows {
            let (src, dst, sport, dport) = tuple(i);
            let (ingress, action) = match scenario {
                Scenario::Encap | Scenario::Miss => {
                    (Ingress::Port(VM), &encap_actions[(i >> 6) as usize & 63])
                }
                Scenario::Decap => (Ingress::Vni(vni), &decap_actions[(i >> 6) as usize & 3]),
            };
            let key = FlowKey::new(ingress, 17, u32::from(src), u32::from(dst), sport, dport);
            pipeline
                .table_mut()
                .insert(key, action, 0)
                .expect("flow fits in the table");
        }
        // Frames traffic will use: the installed flows, or (miss) others.
        let mut order: Vec<u32> = match scenario {
            Scenario::Miss => (flows..flows + 1_000_000.min(flows.max(1) * 64)).collect(),
            _ => (0..flows).collect(),
        };
        shuffle(&mut order, 0x1234_5678);

        let frames = GROUP * BATCH;
        let mut mem = vec![0u8; frames * CHUNK];
        let inner = if scenario == Scenario::Decap {
            OUTER_LEN
        } else {
            0
        };
        let mut descs = Vec::with_capacity(frames);
        let frame = match scenario {
            Scenario::Decap => synth::vxlan_frame(
                &synth::udp_frame(&base_flow(), FRAME_LEN),
                &TemplateSpec {
                    src_mac: [0x02, 0xaa, 0, 0, 0, 2],
                    dst_mac: [0x02, 0xaa, 0, 0, 0, 1],
                    local_vtep: REMOTE_VTEP,
                    remote_vtep: LOCAL_VTEP,
                    vni: VNI,
                    ttl: 64,
                },
                0,
            ),
            _ => synth::udp_frame(&base_flow(), FRAME_LEN),
        };
        for f in 0..frames {
            let a = f * CHUNK + HEADROOM;
            mem[a..a + frame.len()].copy_from_slice(&frame);
            descs.push(Desc::new(a as u64, u32::try_from(frame.len()).unwrap_or(0)));
        }
        let (punter, punt_rx) = punt_path(
            &PuntConfig {
                messages: frames,
                rate: u64::MAX / 4,
                burst: u64::MAX / 4,
                ..PuntConfig::default()
            },
            8,
        );
        Workload {
            scenario,
            pipeline,
            punter,
            punt_rx,
            mem,
            descs,
            order,
            cursor: 0,
            out: BatchOut::new(8),
            now: 1,
            ingress: if scenario == Scenario::Decap {
                UPLINK
            } else {
                VM
            },
            inner,
        }
    }

    pub fn table(&self) -> &FlowTable {
        self.pipeline.table()
    }

    /// Write the next `GROUP * BATCH` tuples into the frames (untimed).
    pub fn prepare(&mut self) {
        for f in 0..self.descs.len() {
            let (src, dst, sport, dport) = tuple(self.order[self.cursor]);
            self.cursor = (self.cursor + 1) % self.order.len();
            let a = f * CHUNK + HEADROOM + self.inner;
            let b = &mut self.mem[a..a + FRAME_LEN];
            b[at::IP_SRC..at::IP_SRC + 4].copy_from_slice(&src.octets());
            b[at::IP_DST..at::IP_DST + 4].copy_from_slice(&dst.octets());
            b[at::UDP_SRC..at::UDP_SRC + 2].copy_from_slice(&sport.to_be_bytes());
            b[at::UDP_DST..at::UDP_DST + 2].copy_from_slice(&dport.to_be_bytes());
        }
    }

    /// Process `batches` (≤ GROUP) batches of the prepared frames: the
    /// timed region. Misses are copied into punt messages here.
    #[inline(never)]
    pub fn run(&mut self, batches: usize) -> u64 {
        let mut sent = 0u64;
        self.now += 1000;
        let mut mem = SliceMem::new(&mut self.mem, CHUNK).expect("chunk size");
        for descs in self.descs.chunks_exact(BATCH).take(batches) {
            self.pipeline
                .process(self.ingress, &mut mem, descs, self.now, &mut self.out);
            sent += self.out.tx.len() as u64;
            for item in &self.out.punt {
                if let Some((chunk, off)) = fastpath::FrameMem::chunk_mut(&mut mem, item.desc.addr)
                {
                    let frame = &chunk[off..off + item.desc.len as usize];
                    let _ = self.punter.punt(
                        self.ingress,
                        item.reason,
                        frame,
                        item.inner_start,
                        self.now,
                    );
                }
            }
        }
        sent
    }

    /// Return punted messages to the pool (the coprocessor's job; untimed).
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(m) = self.punt_rx.recv() {
            self.punt_rx.recycle(m);
            n += 1;
        }
        n
    }

    /// Check the workload does what it claims: every frame of a window is
    /// transmitted (encap, decap) or punted (miss).
    pub fn self_check(&mut self) {
        self.prepare();
        let sent = self.run(GROUP);
        let punted = self.drain();
        let total = (GROUP * BATCH) as u64;
        match self.scenario {
            Scenario::Encap | Scenario::Decap => {
                assert_eq!(sent, total, "{:?}: all frames must hit", self.scenario)
            }
            Scenario::Miss => assert_eq!(punted as u64, total, "miss: all frames must be punted"),
        }
    }
}
