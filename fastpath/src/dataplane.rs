//! The fast-path thread: its ports, the poll loop, and what comes back
//! from the coprocessor.
//!
//! One `Dataplane` runs on one thread and owns everything it touches: the
//! ports' receive queues, the frame memory, the pipeline and its flow
//! table. Other threads reach it only through queues: flows to install
//! (and frames to reinject or transmit) from the coprocessor, requests
//! from the control socket. Each loop iteration: drain installs, poll every
//! port for a batch, run it through the pipeline, transmit, punt, sweep a
//! slice of the table for idle flows, answer control requests. In
//! `adaptive` mode an idle loop sleeps in poll(2) on the ports and a
//! wakeup eventfd; in `busy` mode it spins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use arrayvec::ArrayVec;
use crossbeam_queue::ArrayQueue;
use flowtable::{Action, FlowKey, FlowStats, PortId, TableCounters};

use crate::frame::{Desc, SliceMem, BATCH};
use crate::pipeline::{BatchOut, Pipeline, PipelineCounters};
use crate::punt::{PuntMsg, PuntReason, PuntReceiver, Punter};
use crate::tap::Tap;
use crate::wake::{wait_readable, Wake};

/// How the loop waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever (production, benchmarks): lowest latency, one core.
    Busy,
    /// Spin a while, then sleep on the port fds (tests, shared machines).
    Adaptive,
}

/// The I/O behind a port.
#[derive(Debug)]
pub enum PortIo {
    Tap(Tap),
}

impl PortIo {
    fn fd(&self) -> i32 {
        match self {
            PortIo::Tap(t) => t.fd(),
        }
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Frames the port could not take (queue full, guest side down).
    pub tx_dropped: u64,
}

/// A port of this thread.
#[derive(Debug)]
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub io: PortIo,
    pub counters: PortCounters,
}

/// The coprocessor's answer, as the fast path applies it.
#[derive(Debug, Default)]
pub struct Install {
    pub flows: Vec<(FlowKey, Action)>,
    /// Frames to transmit as they are.
    pub tx: Vec<(PortId, Vec<u8>)>,
    /// The punted frame, to run through the pipeline again once `flows`
    /// are in (it then hits them).
    pub reinject: Option<PuntMsg>,
}

/// A flow as `ctl flows` shows it.
#[derive(Debug, Clone)]
pub struct FlowDump {
    pub key: FlowKey,
    pub action: Action,
    pub stats: FlowStats,
    pub current: bool,
}

/// Counters of the whole thread, as `ctl stats` shows them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub ports: Vec<(PortId, String, PortCounters)>,
    pub pipeline: PipelineCounters,
    pub punted: [u64; PuntReason::COUNT],
    pub table_len: usize,
    pub table_capacity: usize,
    pub table: TableCounters,
    pub installs: u64,
    pub install_failures: u64,
    pub reinjected: u64,
    pub reinject_failed: u64,
    pub uptime_ns: u64,
}

/// Requests from the control thread; answers go back on the sender.
#[derive(Debug)]
pub enum Request {
    Stats(Sender<Snapshot>),
    Flows(Sender<Vec<FlowDump>>),
}

/// Tunables of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    pub mode: PollMode,
    /// Flows idle this long are removed.
    pub idle_timeout_ns: u64,
    /// Table slots examined for expiry per loop iteration.
    pub expire_budget: usize,
    /// Idle iterations before an adaptive loop sleeps.
    pub spin_before_sleep: u32,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            mode: PollMode::Adaptive,
            idle_timeout_ns: 30_000_000_000,
            expire_budget: 256,
            spin_before_sleep: 200,
        }
    }
}

/// How the thread is connected to the others.
pub struct Links {
    pub punter: Punter,
    /// Used only to return reinjected messages to the punt pool.
    pub recycler: PuntReceiver,
    pub installs: Arc<ArrayQueue<Install>>,
    pub requests: Receiver<Request>,
    /// Wakes this thread (installs, requests).
    pub wake: Arc<Wake>,
    /// Coprocessor threads to unpark after punting.
    pub coprocessors: Vec<Thread>,
}

const CHUNK: usize = 2048;
/// Room before each received frame: VXLAN's outer headers fit with margin.
const HEADROOM: usize = 256;

/// One fast-path thread (see the module documentation).
pub struct Dataplane {
    ports: Vec<Port>,
    pipeline: Pipeline,
    links: Links,
    cfg: LoopConfig,
    /// BATCH receive chunks plus one for reinjection.
    mem: Vec<u8>,
    out: BatchOut,
    descs: ArrayVec<Desc, BATCH>,
    pollfds: Vec<libc::pollfd>,
    start: Instant,
    installs: u64,
    install_failures: u64,
    reinjected: u64,
    reinject_failed: u64,
    /// Drops on the punt path (budget, pool, queue), by reason.
    punt_drops: crate::DropCounters,
}

impl Dataplane {
    /// `ports[i].id` must be `PortId(i)`.
    pub fn new(ports: Vec<Port>, pipeline: Pipeline, links: Links, cfg: LoopConfig) -> Dataplane {
        let mut pollfds: Vec<libc::pollfd> = ports
            .iter()
            .map(|p| libc::pollfd {
                fd: p.io.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        pollfds.push(libc::pollfd {
            fd: links.wake.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let n = u16::try_from(ports.len()).unwrap_or(u16::MAX);
        Dataplane {
            ports,
            pipeline,
            links,
            cfg,
            mem: vec![0u8; CHUNK * (BATCH + 1)],
            out: BatchOut::new(n),
            descs: ArrayVec::new(),
            pollfds,
            start: Instant::now(),
            installs: 0,
            install_failures: 0,
            reinjected: 0,
            reinject_failed: 0,
            punt_drops: crate::DropCounters::default(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Run until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut idle = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let work = self.poll_once();
            if work > 0 {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if self.cfg.mode == PollMode::Adaptive && idle >= self.cfg.spin_before_sleep {
                wait_readable(&mut self.pollfds, 50);
                self.links.wake.drain();
                idle = 0;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// One loop iteration; returns the amount of work done.
    pub fn poll_once(&mut self) -> usize {
        let now = self.now();
        let mut work = 0;
        while let Some(ins) = self.links.installs.pop() {
            self.apply_install(ins, now);
            work += 1;
        }
        for i in 0..self.ports.len() {
            work += self.poll_port(i, now);
        }
        let c = self.cfg;
        self.pipeline
            .table_mut()
            .expire(now, c.idle_timeout_ns, c.expire_budget, |_, _| ());
        while let Ok(req) = self.links.requests.try_recv() {
            self.answer(req, now);
            work += 1;
        }
        work
    }

    fn poll_port(&mut self, i: usize, now: u64) -> usize {
        self.descs.clear();
        let port = &mut self.ports[i];
        for slot in 0..BATCH {
            let at = slot * CHUNK + HEADROOM;
            let buf = &mut self.mem[at..(slot + 1) * CHUNK];
            let r = match &mut port.io {
                PortIo::Tap(t) => t.recv(buf),
            };
            match r {
                Ok(Some(n)) => {
                    port.counters.rx_packets += 1;
                    port.counters.rx_bytes += n as u64;
                    self.descs.push(Desc {
                        addr: at as u64,
                        len: u32::try_from(n).unwrap_or(0),
                    });
                }
                Ok(None) => break,
                Err(_) => {
                    port.counters.rx_errors += 1;
                    break;
                }
            }
        }
        let n = self.descs.len();
        if n > 0 {
            let id = port.id;
            let descs = std::mem::take(&mut self.descs);
            self.process(id, &descs, now, true);
            self.descs = descs;
        }
        n
    }

    /// Run `descs` (in `self.mem`) through the pipeline, transmit, punt.
    /// Reinjected frames (`may_punt` false) that miss again are counted,
    /// not punted again, so a flow that cannot be installed cannot loop.
    fn process(&mut self, ingress: PortId, descs: &[Desc], now: u64, may_punt: bool) {
        let mut mem = match SliceMem::new(&mut self.mem, CHUNK) {
            Some(m) => m,
            None => return,
        };
        self.pipeline
            .process(ingress, &mut mem, descs, now, &mut self.out);
        for (port, list) in self.out.tx.iter() {
            let Some(p) = self.ports.get_mut(usize::from(port.0)) else {
                continue;
            };
            for d in list {
                let Some(frame) = frame_at(&self.mem, *d) else {
                    continue;
                };
                let r = match &mut p.io {
                    PortIo::Tap(t) => t.send(frame),
                };
                match r {
                    Ok(true) => {
                        p.counters.tx_packets += 1;
                        p.counters.tx_bytes += u64::from(d.len);
                    }
                    Ok(false) => p.counters.tx_dropped += 1,
                    Err(_) => p.counters.tx_errors += 1,
                }
            }
        }
        if self.out.punt.is_empty() {
            return;
        }
        if !may_punt {
            self.reinject_failed += self.out.punt.len() as u64;
            return;
        }
        let mut queued = false;
        for item in &self.out.punt {
            let Some(frame) = frame_at(&self.mem, item.desc) else {
                continue;
            };
            let r = self.links.punter.punt_keyed(
                ingress,
                item.reason,
                frame,
                usize::from(item.inner_start),
                item.key,
                now,
            );
            match r {
                Ok(()) => queued = true,
                Err(reason) => self.punt_drops.bump(reason),
            }
        }
        if queued {
            for t in &self.links.coprocessors {
                t.unpark();
            }
        }
    }

    fn apply_install(&mut self, ins: Install, now: u64) {
        for (key, action) in &ins.flows {
            match self.pipeline.table_mut().insert(*key, action, now) {
                Ok(_) => self.installs += 1,
                Err(_) => self.install_failures += 1,
            }
        }
        for (port, frame) in &ins.tx {
            if let Some(p) = self.ports.get_mut(usize::from(port.0)) {
                let r = match &mut p.io {
                    PortIo::Tap(t) => t.send(frame),
                };
                match r {
                    Ok(true) => {
                        p.counters.tx_packets += 1;
                        p.counters.tx_bytes += frame.len() as u64;
                    }
                    Ok(false) => p.counters.tx_dropped += 1,
                    Err(_) => p.counters.tx_errors += 1,
                }
            }
        }
        if let Some(msg) = ins.reinject {
            let at = BATCH * CHUNK + HEADROOM;
            let n = msg.data.len().min(CHUNK - HEADROOM);
            self.mem[at..at + n].copy_from_slice(&msg.data[..n]);
            let d = [Desc {
                addr: at as u64,
                len: u32::try_from(n).unwrap_or(0),
            }];
            let ingress = msg.ingress;
            self.links.recycler.recycle(msg);
            self.reinjected += 1;
            self.process(ingress, &d, now, false);
        }
    }

    fn answer(&mut self, req: Request, now: u64) {
        match req {
            Request::Stats(tx) => {
                let t = self.pipeline.table();
                let mut pipeline = self.pipeline.counters().clone();
                for (i, n) in self.punt_drops.0.iter().enumerate() {
                    pipeline.drops.0[i] += n;
                }
                let _ = tx.send(Snapshot {
                    ports: self
                        .ports
                        .iter()
                        .map(|p| (p.id, p.name.clone(), p.counters.clone()))
                        .collect(),
                    pipeline,
                    punted: self.links.punter.punted,
                    table_len: t.len(),
                    table_capacity: t.capacity(),
                    table: t.counters(),
                    installs: self.installs,
                    install_failures: self.install_failures,
                    reinjected: self.reinjected,
                    reinject_failed: self.reinject_failed,
                    uptime_ns: now,
                });
            }
            Request::Flows(tx) => {
                let flows = self
                    .pipeline
                    .table()
                    .iter()
                    .map(|e| FlowDump {
                        key: e.key,
                        action: e.action.clone(),
                        stats: e.stats,
                        current: e.current,
                    })
                    .collect();
                let _ = tx.send(flows);
            }
        }
    }
}

fn frame_at(mem: &[u8], d: Desc) -> Option<&[u8]> {
    let a = usize::try_from(d.addr).ok()?;
    mem.get(a..a.checked_add(d.len as usize)?)
}
