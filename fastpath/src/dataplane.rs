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

use crate::frame::{Desc, FrameMem, BATCH};
use crate::pipeline::{BatchOut, Pipeline, PipelineCounters};
use crate::punt::{PuntReason, PuntReceiver, Punter};
use crate::tap::Tap;
use crate::umem::FramePool;
use crate::wake::{wait_readable, Wake};
use crate::xsk::XskSocket;

/// How the loop waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever (production, benchmarks): lowest latency, one core.
    Busy,
    /// Spin a while, then sleep on the port fds (tests, shared machines).
    Adaptive,
}

/// The I/O behind a port.
pub enum PortIo {
    Tap(Tap),
    /// An AF_XDP socket (the uplink); its UMEM is the thread's frame pool.
    Xsk(XskSocket),
    /// A vhost-user virtio-net port: the guest's virtqueues in its memory.
    VhostUser(Box<crate::vhost::port::VhostPort>),
    /// Removed at run time; its id is not reused.
    Closed,
}

impl PortIo {
    fn fd(&self) -> i32 {
        match self {
            PortIo::Tap(t) => t.fd(),
            PortIo::Xsk(x) => x.fd(),
            // Kicks wake the loop through the wakeup fd; poll(2) skips
            // negative descriptors.
            PortIo::VhostUser(_) => -1,
            PortIo::Closed => -1,
        }
    }
}

impl std::fmt::Debug for PortIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortIo::Tap(t) => write!(f, "tap {}", t.name()),
            PortIo::Xsk(x) => write!(f, "af_xdp fd {}", x.fd()),
            PortIo::VhostUser(_) => write!(f, "vhost-user"),
            PortIo::Closed => write!(f, "closed"),
        }
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Frames the port could not take (queue full, guest side down).
    pub tx_dropped: u64,
    /// Receives skipped because the frame pool had no free chunk.
    pub rx_no_buffer: u64,
    /// vhost-user: frames dropped because the guest had no receive buffer
    /// posted (its queue is full, or it stopped draining it).
    #[serde(default)]
    pub guest_queue_full: u64,
    /// vhost-user: frames dropped because no guest is connected (or its
    /// queues are not enabled yet).
    #[serde(default)]
    pub guest_not_ready: u64,
    /// vhost-user: guest descriptors refused (outside guest memory, too
    /// short, oversize frames).
    #[serde(default)]
    pub guest_bad_descriptor: u64,
    /// AF_XDP: refills where the frame pool could not keep the fill ring
    /// at half its share (receives may be dropped by the kernel then).
    #[serde(default)]
    pub fill_short: u64,
    /// Flows refused because the port held its share of the flow table.
    #[serde(default)]
    pub flow_share_full: u64,
}

/// A port of this thread.
#[derive(Debug)]
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub io: PortIo,
    pub counters: PortCounters,
}

pub use dpif::{CtCheck, FlowUse, Report, Update};

/// A flow as `ctl flows` shows it.
#[derive(Debug, Clone)]
pub struct FlowDump {
    pub key: FlowKey,
    pub action: Action,
    pub stats: FlowStats,
    pub current: bool,
}

/// Time from punting a flow's first packet to transmitting it after the
/// coprocessor's flow is installed (the slow path's round trip).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirstPacket {
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    pub under_100us: u64,
}

impl FirstPacket {
    fn record(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        if ns < 100_000 {
            self.under_100us += 1;
        }
    }
}

/// Counters of the whole thread, as `ctl stats` shows them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub ports: Vec<(PortId, String, PortCounters)>,
    /// The kernel's drop counters of each AF_XDP port, by port id.
    pub xsk: Vec<(PortId, crate::xsk::XskStats)>,
    /// Free chunks in the frame pool, and its size.
    pub pool_free: usize,
    pub pool_chunks: u64,
    pub pipeline: PipelineCounters,
    pub punted: [u64; PuntReason::COUNT],
    pub table_len: usize,
    pub table_capacity: usize,
    pub table: TableCounters,
    pub installs: u64,
    pub install_failures: u64,
    pub reinjected: u64,
    pub reinject_failed: u64,
    /// Conntrack reports that found the report queue full.
    pub reports_lost: u64,
    /// Flows removed by changes of topology or policy.
    pub invalidated: u64,
    /// Coprocessor answers decided under a state that changed since.
    pub stale_installs: u64,
    pub first_packet: FirstPacket,
    pub uptime_ns: u64,
    /// CLOCK_MONOTONIC of the first poll of the ports.
    pub first_poll_mono_ns: Option<u64>,
}

/// Requests from the control thread; answers go back on the sender.
#[derive(Debug)]
pub enum Request {
    Stats(Sender<Snapshot>),
    Flows(Sender<Vec<FlowDump>>),
    /// Traffic towards each remote destination (flows that encapsulate),
    /// summed over the live flows.
    Talkers(Sender<Vec<Talker>>),
    /// Add a port; its id must be the next one (the number of ports).
    AddPort(Box<Port>, Sender<Result<(), String>>),
    /// Close a port and remove every flow from or to it.
    RemovePort(PortId, Sender<Result<(), String>>),
    /// What the next binary needs before the pause (a handover's
    /// pre-copy): the flows, the ports' descriptors, the frame pool's.
    /// Polling goes on.
    Dump(Sender<Dump>),
    /// Stop polling the ports (a handover is taking the switch over);
    /// installs (their flows; their frames wait) and requests are still
    /// served. Answers with what changed since the dump that matters.
    Pause(Sender<Paused>),
    /// Poll again (the handover failed, or, in the next binary, it is
    /// confirmed); frames held back meanwhile are sent. The sender, if
    /// any, is told when the first poll began (CLOCK_MONOTONIC ns).
    Resume(Option<Sender<u64>>),
    /// Stop polling, without a dump: the next binary adds its inherited
    /// ports held, and polls them only once the handover is confirmed.
    Hold,
    /// Put back the flows the previous binary handed over; answers
    /// (inserted, refused, whether the table took the previous hash seed:
    /// it cannot once it holds flows).
    Restore(Box<Warm>, Sender<(usize, usize, bool)>),
    /// Take the previous binary's frame pool and ports (in id order, next
    /// after the existing ones): one request, so the blackout does not grow
    /// with the number of ports. Refused once an AF_XDP port uses this
    /// thread's own pool or one of its frames is in use.
    Adopt(Box<Adoption>, Sender<Result<(), String>>),
    /// The action of the flow for a key, if any (not counted as a hit).
    Lookup(FlowKey, Sender<Option<Action>>),
    /// The next hop with this MAC changed or went away: remove the flows
    /// that encapsulate towards it (they are recompiled on their next packet).
    InvalidateNextHop(flowtable::Mac),
}

/// A fast path's flows and descriptors, for the next binary.
#[derive(Debug)]
pub struct Dump {
    /// The thread's clock (ns since its epoch) at the dump.
    pub clock_ns: u64,
    /// The flow table's hash seed.
    pub hash_seed: u64,
    /// The flows: key, index into `actions`, counters.
    pub flows: Vec<(FlowKey, u32, FlowStats)>,
    /// The distinct actions the flows use.
    pub actions: Vec<Action>,
    /// Each port by id: its name and descriptor (still owned here: the
    /// caller passes copies); `None` for a removed one.
    pub ports: Vec<(String, Option<HandedIo>)>,
    /// The frame pool: every AF_XDP socket's UMEM and rings point into it.
    pub pool: HandedPool,
}

/// A paused fast path: what the next binary needs at the last moment.
#[derive(Debug)]
pub struct Paused {
    /// CLOCK_MONOTONIC (ns) of the last poll, for the blackout.
    pub last_poll_mono_ns: u64,
    /// The frames user space owns now (every other is on a socket's ring).
    pub free: Vec<u64>,
    /// Each port's counters, by id.
    pub counters: Vec<PortCounters>,
    /// The pipeline's counters (drops and punts by reason).
    pub pipeline: crate::pipeline::NamedCounters,
}

/// Flows handed over: each distinct action once, then every flow as
/// (key, index into `actions`, counters).
pub struct Warm {
    /// The previous table's hash seed (see `FlowTable::set_hasher`).
    pub hash_seed: u64,
    pub actions: Vec<Action>,
    pub flows: Box<dyn Iterator<Item = (FlowKey, u32, FlowStats)> + Send>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Warm({} actions)", self.actions.len())
    }
}

/// What the next binary's fast path takes over (see [`Request::Adopt`]).
#[derive(Debug)]
pub struct Adoption {
    pub pool: FramePool,
    pub ports: Vec<Port>,
    /// The previous pipeline's counters, continued.
    pub counters: Option<crate::pipeline::NamedCounters>,
}

/// A port's descriptor as handed over.
#[derive(Debug, Clone, Copy)]
pub enum HandedIo {
    /// A tap queue.
    Tap(i32),
    /// A bound AF_XDP socket and its ring size.
    Xsk { fd: i32, ring_size: u32 },
    /// A vhost-user port: its connection goes with the pause (the
    /// protocol thread gives it out, [`crate::vhost::endpoint`]).
    VhostUser,
}

/// The frame pool as handed over: its memfd and shape. Which chunks user
/// space owns comes with the pause ([`Paused::free`]); every other chunk
/// is on a socket's ring, whose indices live in the shared ring memory.
#[derive(Debug, Clone)]
pub struct HandedPool {
    pub fd: i32,
    pub len: usize,
    pub huge: bool,
    pub chunk_size: u32,
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Traffic of the live flows towards one remote destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Talker {
    pub vni: u32,
    /// Inner destination address.
    pub dst: u32,
    /// The VTEP it is sent to.
    pub vtep: u32,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
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
    pub installs: Arc<ArrayQueue<Update>>,
    pub requests: Receiver<Request>,
    /// Wakes this thread (installs, requests).
    pub wake: Arc<Wake>,
    /// Coprocessor threads to unpark after punting.
    pub coprocessors: Vec<Thread>,
    /// Conntrack reports back to the coprocessors.
    pub reports: Arc<ArrayQueue<Report>>,
    /// Time zero of the clock shared with the coprocessors.
    pub epoch: Instant,
}

/// Room before each frame read from a tap: VXLAN's outer headers fit with
/// margin. (AF_XDP leaves XDP_PACKET_HEADROOM, also 256, before its frames.)
const HEADROOM: usize = 256;
/// Frames an af-xdp VM port keeps on its fill ring at most: enough for a
/// veth's bursts, and four idle ports hold 2 048 frames, not the pool.
pub const VM_FILL_SHARE: usize = 512;
/// Chunks kept on the free list for VM ports when refilling the uplink.
const VM_RESERVE: usize = 4 * BATCH;

/// One fast-path thread (see the module documentation).
pub struct Dataplane {
    ports: Vec<Port>,
    pipeline: Pipeline,
    links: Links,
    cfg: LoopConfig,
    /// All frames of this thread's ports live here.
    pool: FramePool,
    out: BatchOut,
    descs: ArrayVec<Desc, BATCH>,
    pollfds: Vec<libc::pollfd>,
    start: Instant,
    installs: u64,
    install_failures: u64,
    reinjected: u64,
    reinject_failed: u64,
    reports_lost: u64,
    first_packet: FirstPacket,
    /// The last invalidation's version (see [`Update::version`]).
    min_version: u64,
    /// Ports are not polled (handover in progress), and nothing touches
    /// them or the frame pool: the next binary may own both.
    paused: bool,
    /// Frames of installs that arrived while paused, sent on resume.
    deferred: Vec<Update>,
    /// Told the CLOCK_MONOTONIC of the first poll after a resume.
    first_poll_waiter: Option<Sender<u64>>,
    /// CLOCK_MONOTONIC of the first poll (a handover's end of blackout).
    pub first_poll_mono_ns: Option<u64>,
    invalidated: u64,
    stale_installs: u64,
}

impl Dataplane {
    /// `ports[i].id` must be `PortId(i)`.
    /// `pool` must be the region every AF_XDP port registered as its UMEM.
    pub fn new(
        ports: Vec<Port>,
        pipeline: Pipeline,
        links: Links,
        cfg: LoopConfig,
        pool: FramePool,
    ) -> Dataplane {
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
        let start = links.epoch;
        Dataplane {
            ports,
            pipeline,
            links,
            cfg,
            pool,
            out: BatchOut::new(n),
            descs: ArrayVec::new(),
            pollfds,
            start,
            installs: 0,
            install_failures: 0,
            reinjected: 0,
            reinject_failed: 0,
            reports_lost: 0,
            first_packet: FirstPacket::default(),
            min_version: 0,
            paused: false,
            deferred: Vec::new(),
            first_poll_waiter: None,
            first_poll_mono_ns: None,
            invalidated: 0,
            stale_installs: 0,
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
                // Paused, the ports are not read, so their readiness must
                // not wake the loop (it would spin on a core the next
                // binary needs): only the wakeup fd (last) counts.
                let from = if self.paused {
                    self.pollfds.len() - 1
                } else {
                    0
                };
                wait_readable(&mut self.pollfds[from..], 50);
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
        if !self.paused {
            if self.first_poll_mono_ns.is_none() {
                self.first_poll_mono_ns = Some(monotonic_ns());
            }
            for i in 0..self.ports.len() {
                work += self.poll_port(i, now);
            }
            if let Some(tx) = self.first_poll_waiter.take() {
                let _ = tx.send(self.first_poll_mono_ns.unwrap_or(0));
            }
        }
        let c = self.cfg;
        let (reports, lost) = (&self.links.reports, &mut self.reports_lost);
        self.pipeline
            .table_mut()
            .expire(now, c.idle_timeout_ns, c.expire_budget, |key, a, s| {
                if a.conntrack {
                    let used = FlowUse {
                        last_used: s.last_used,
                        packets: s.packets,
                    };
                    if reports.push(Report::FlowGone { key: *key, used }).is_err() {
                        *lost += 1;
                    }
                }
            });
        while let Ok(req) = self.links.requests.try_recv() {
            self.answer(req, now);
            work += 1;
        }
        work
    }

    fn poll_port(&mut self, i: usize, now: u64) -> usize {
        self.descs.clear();
        let port = &mut self.ports[i];
        match &mut port.io {
            PortIo::Tap(t) => {
                for _ in 0..BATCH {
                    let Some(chunk) = self.pool.alloc() else {
                        port.counters.rx_no_buffer += 1;
                        break;
                    };
                    let at = chunk + HEADROOM as u64;
                    let r = match self.pool.chunk_mut(at) {
                        Some((c, off)) => t.recv(&mut c[off..]),
                        None => Ok(None),
                    };
                    match r {
                        Ok(Some(n)) => {
                            port.counters.rx_packets += 1;
                            port.counters.rx_bytes += n as u64;
                            self.descs.push(Desc {
                                addr: at,
                                len: u32::try_from(n).unwrap_or(0),
                            });
                        }
                        Ok(None) => {
                            self.pool.release(chunk);
                            break;
                        }
                        Err(_) => {
                            self.pool.release(chunk);
                            port.counters.rx_errors += 1;
                            break;
                        }
                    }
                }
            }
            PortIo::Xsk(x) => {
                x.complete(&mut self.pool);
                // The uplink may fill its whole ring; a VM port its share.
                let cap = if port.id == self.pipeline.uplink() {
                    usize::MAX
                } else {
                    VM_FILL_SHARE
                };
                if x.refill(&mut self.pool, VM_RESERVE, cap).1 {
                    port.counters.fill_short += 1;
                }
                x.wake_rx_if_needed();
                let (descs, c) = (&mut self.descs, &mut port.counters);
                x.recv(BATCH, |d| {
                    c.rx_packets += 1;
                    c.rx_bytes += u64::from(d.len);
                    descs.push(d);
                });
            }
            PortIo::VhostUser(v) => {
                let bad = v.stats.tx_bad_chain + v.stats.tx_oversize;
                let mut sink = PoolSink {
                    pool: &mut self.pool,
                    descs: &mut self.descs,
                    counters: &mut port.counters,
                    chunk: None,
                };
                v.recv(BATCH, &mut sink);
                drop(sink);
                port.counters.guest_bad_descriptor +=
                    v.stats.tx_bad_chain + v.stats.tx_oversize - bad;
            }
            PortIo::Closed => {}
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

    /// Run `descs` (frames in the pool) through the pipeline, transmit,
    /// punt. Every frame ends in exactly one of: a TX list, the punt list,
    /// the drop list; its chunk goes back to the pool unless the uplink's
    /// TX ring took it (then it comes back on completion).
    /// Reinjected frames (`may_punt` false) that miss again are counted,
    /// not punted again, so a flow that cannot be installed cannot loop.
    fn process(&mut self, ingress: PortId, descs: &[Desc], now: u64, may_punt: bool) {
        self.pipeline
            .process(ingress, &mut self.pool, descs, now, &mut self.out);
        for (port, list) in self.out.tx.iter() {
            let Some(p) = self.ports.get_mut(usize::from(port.0)) else {
                list.iter().for_each(|d| self.pool.release(d.addr));
                continue;
            };
            transmit(p, &mut self.pool, list);
        }
        for d in &self.out.dropped {
            self.pool.release(d.addr);
        }
        if self.out.punt.is_empty() {
            return;
        }
        let mut queued = false;
        for item in &self.out.punt {
            if may_punt {
                if let Some((c, off)) = self.pool.chunk_mut(item.desc.addr) {
                    let frame = c.get(off..off + item.desc.len as usize).unwrap_or(&[]);
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
                        Err(reason) => self.pipeline.count_drop(ingress, reason),
                    }
                }
            } else {
                self.reinject_failed += 1;
            }
            self.pool.release(item.desc.addr);
        }
        if queued {
            for t in &self.links.coprocessors {
                t.unpark();
            }
        }
    }

    fn apply_install(&mut self, ins: Update, now: u64) {
        let table = self.pipeline.table_mut();
        for key in &ins.remove {
            table.remove(key);
        }
        if let Some(inv) = &ins.invalidate {
            self.invalidated += table.retain(|k, a| !inv.hits(k, a)) as u64;
            self.min_version = self.min_version.max(ins.version);
        }
        // Decided before the last change: not installed; the frame is
        // decided again.
        let stale = ins.version < self.min_version;
        for c in &ins.checks {
            let used = c.keys.map(|k| {
                k.and_then(|k| table.get(&k)).map(|e| FlowUse {
                    last_used: e.stats.last_used,
                    packets: e.stats.packets,
                })
            });
            let r = Report::Checked {
                id: c.id,
                keys: c.keys,
                used,
            };
            if self.links.reports.push(r).is_err() {
                // The coprocessor asks again.
                self.reports_lost += 1;
            }
        }
        for (key, action) in ins.flows.iter().filter(|_| !stale) {
            match self.pipeline.table_mut().insert(*key, action, now) {
                Ok(_) => self.installs += 1,
                Err(e) => {
                    self.install_failures += 1;
                    if let flowtable::InsertError::ShareFull { port, .. } = e {
                        // Its frames go on through the coprocessor (budgeted).
                        if let Some(p) = self.ports.get_mut(usize::from(port)) {
                            p.counters.flow_share_full += 1;
                        }
                    }
                }
            }
        }
        if self.paused && (!ins.tx.is_empty() || ins.frame.is_some()) {
            // Frames wait: the pool and the ports may belong to the next
            // binary by now. Sent if this one resumes.
            self.deferred.push(Update {
                tx: ins.tx,
                frame: ins.frame,
                version: ins.version,
                ..Update::default()
            });
            return;
        }
        for (port, frame) in &ins.tx {
            if let Some(d) = self.copy_in(frame) {
                match self.ports.get_mut(usize::from(port.0)) {
                    Some(p) => transmit(p, &mut self.pool, &[d]),
                    None => self.pool.release(d.addr),
                }
            }
        }
        if let Some(msg) = ins.frame {
            let d = self.copy_in(&msg.data);
            let ingress = msg.ingress;
            let punted_at = msg.punted_at;
            self.links.recycler.recycle(msg);
            if let Some(d) = d {
                self.reinjected += 1;
                if stale {
                    self.stale_installs += 1;
                }
                self.pipeline.set_reinjecting(!stale);
                self.process(ingress, &[d], now, stale);
                self.pipeline.set_reinjecting(false);
                self.first_packet
                    .record(self.now().saturating_sub(punted_at));
            }
        }
    }

    /// The flows (each distinct action once), the ports' descriptors and
    /// the pool's, for the next binary.
    fn dump(&self, now: u64) -> Dump {
        let (flows, actions) = dump_flows(self.pipeline.table());
        let ports = self
            .ports
            .iter()
            .map(|p| {
                let io = match &p.io {
                    PortIo::Tap(t) => Some(HandedIo::Tap(t.fd())),
                    PortIo::Xsk(x) => Some(HandedIo::Xsk {
                        fd: x.fd(),
                        ring_size: x.ring_size(),
                    }),
                    PortIo::VhostUser(_) => Some(HandedIo::VhostUser),
                    PortIo::Closed => None,
                };
                (p.name.clone(), io)
            })
            .collect();
        let r = self.pool.region();
        Dump {
            clock_ns: now,
            hash_seed: self.pipeline.table().hasher().seed(),
            flows,
            actions,
            ports,
            pool: HandedPool {
                fd: r.fd(),
                len: r.len(),
                huge: r.huge(),
                chunk_size: self.pool.chunk_size(),
            },
        }
    }

    /// Add `port` (its id the next) to the poll set and every per-port table.
    fn push_port(&mut self, port: Port) {
        let at = self.pollfds.len() - 1; // the wakeup fd stays last
        self.pollfds.insert(
            at,
            libc::pollfd {
                fd: port.io.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        );
        self.pipeline.add_port();
        self.out.tx.add_port();
        self.links.punter.add_port();
        self.ports.push(port);
        // The next poll is the first of this port.
        self.first_poll_mono_ns = None;
    }

    /// Take the previous binary's pool and ports (see [`Request::Adopt`]).
    fn adopt(&mut self, a: Adoption) -> Result<(), String> {
        if self.ports.iter().any(|p| matches!(p.io, PortIo::Xsk(_))) {
            return Err("an AF_XDP port already uses this thread's frame pool".into());
        }
        if self.pool.free_count() as u64 != self.pool.chunks() {
            return Err("frames of this thread's pool are in use".into());
        }
        let next = self.ports.len();
        if let Some((i, p)) = a
            .ports
            .iter()
            .enumerate()
            .find(|(i, p)| usize::from(p.id.0) != next + i)
        {
            return Err(format!(
                "port {}: id {} where {} was expected",
                p.name,
                p.id.0,
                next + i
            ));
        }
        self.pool = a.pool;
        for port in a.ports {
            self.push_port(port);
        }
        if let Some(c) = &a.counters {
            let c = crate::pipeline::PipelineCounters::from_named(c, self.ports.len());
            self.pipeline.set_counters(c);
        }
        Ok(())
    }

    /// Copy `frame` into a free chunk, after the usual headroom.
    fn copy_in(&mut self, frame: &[u8]) -> Option<Desc> {
        let chunk = self.pool.alloc()?;
        let at = chunk + HEADROOM as u64;
        let Some((c, off)) = self.pool.chunk_mut(at) else {
            self.pool.release(chunk);
            return None;
        };
        let Some(dst) = c.get_mut(off..off + frame.len()) else {
            self.pool.release(chunk);
            return None;
        };
        dst.copy_from_slice(frame);
        Some(Desc {
            addr: at,
            len: u32::try_from(frame.len()).unwrap_or(0),
        })
    }

    fn answer(&mut self, req: Request, now: u64) {
        match req {
            Request::Stats(tx) => {
                let t = self.pipeline.table();
                let pipeline = self.pipeline.counters().clone();
                let xsk = self
                    .ports
                    .iter()
                    .filter_map(|p| match &p.io {
                        PortIo::Xsk(x) => x.stats().ok().map(|s| (p.id, s)),
                        PortIo::Tap(_) | PortIo::VhostUser(_) | PortIo::Closed => None,
                    })
                    .collect();
                let _ = tx.send(Snapshot {
                    ports: self
                        .ports
                        .iter()
                        .map(|p| (p.id, p.name.clone(), p.counters.clone()))
                        .collect(),
                    xsk,
                    pool_free: self.pool.free_count(),
                    pool_chunks: self.pool.chunks(),
                    pipeline,
                    punted: self.links.punter.punted,
                    table_len: t.len(),
                    table_capacity: t.capacity(),
                    table: t.counters(),
                    installs: self.installs,
                    install_failures: self.install_failures,
                    reinjected: self.reinjected,
                    reinject_failed: self.reinject_failed,
                    reports_lost: self.reports_lost,
                    invalidated: self.invalidated,
                    stale_installs: self.stale_installs,
                    first_packet: self.first_packet,
                    uptime_ns: now,
                    first_poll_mono_ns: self.first_poll_mono_ns,
                });
            }
            Request::Talkers(tx) => {
                let mut by: std::collections::HashMap<(u32, u32, u32), Talker> =
                    std::collections::HashMap::new();
                for e in self.pipeline.table().iter() {
                    let Some(t) = &e.action.encap else { continue };
                    let b = &t.0;
                    let vni = u32::from_be_bytes([0, b[46], b[47], b[48]]);
                    let vtep = u32::from_be_bytes([b[30], b[31], b[32], b[33]]);
                    let k = (vni, e.key.dst_ip, vtep);
                    let x = by.entry(k).or_insert(Talker {
                        vni,
                        dst: e.key.dst_ip,
                        vtep,
                        flows: 0,
                        packets: 0,
                        bytes: 0,
                    });
                    x.flows += 1;
                    x.packets += e.stats.packets;
                    x.bytes += e.stats.bytes;
                }
                let _ = tx.send(by.into_values().collect());
            }
            Request::AddPort(port, tx) => {
                let r = if usize::from(port.id.0) != self.ports.len() {
                    Err(format!(
                        "port {}: id {} is not the next ({})",
                        port.name,
                        port.id.0,
                        self.ports.len()
                    ))
                } else {
                    self.push_port(*port);
                    Ok(())
                };
                let _ = tx.send(r);
            }
            Request::RemovePort(id, tx) => {
                let i = usize::from(id.0);
                let r = match self.ports.get_mut(i) {
                    Some(p) if !matches!(p.io, PortIo::Closed) => {
                        p.io = PortIo::Closed;
                        if let Some(f) = self.pollfds.get_mut(i) {
                            f.fd = -1;
                        }
                        let ctx = flowtable::Ingress::Port(id).ctx();
                        self.invalidated +=
                            self.pipeline.table_mut().retain(|k, a| {
                                k.ctx != ctx && a.output != flowtable::Output::Port(id)
                            }) as u64;
                        Ok(())
                    }
                    _ => Err(format!("port {}: no such open port", id.0)),
                };
                let _ = tx.send(r);
            }
            Request::Hold => self.paused = true,
            Request::Adopt(adoption, tx) => {
                let r = self.adopt(*adoption);
                let _ = tx.send(r);
            }
            Request::Restore(warm, tx) => {
                let Warm {
                    hash_seed,
                    actions,
                    flows,
                } = *warm;
                let t = self.pipeline.table_mut();
                let same_hash = t.set_hasher(flowtable::FlowHasher::with_seed(hash_seed));
                let (inserted, refused) = t.restore(&actions, flows);
                self.installs += inserted as u64;
                let _ = tx.send((inserted, refused, same_hash));
            }
            Request::Dump(tx) => {
                let _ = tx.send(self.dump(now));
            }
            Request::Pause(tx) => {
                self.paused = true;
                let _ = tx.send(Paused {
                    last_poll_mono_ns: monotonic_ns(),
                    free: self.pool.free_list().to_vec(),
                    counters: self.ports.iter().map(|p| p.counters.clone()).collect(),
                    pipeline: self.pipeline.counters().to_named(),
                });
            }
            Request::Resume(waiter) => {
                self.paused = false;
                self.first_poll_waiter = waiter;
                for ins in std::mem::take(&mut self.deferred) {
                    self.apply_install(ins, now);
                }
            }
            Request::Lookup(key, tx) => {
                let _ = tx.send(self.pipeline.table().get(&key).map(|e| *e.action));
            }
            Request::InvalidateNextHop(mac) => {
                self.pipeline
                    .table_mut()
                    .retain(|_, a| a.encap.as_ref().is_none_or(|t| t.0[..6] != mac));
            }
            Request::Flows(tx) => {
                let flows = self
                    .pipeline
                    .table()
                    .iter()
                    .map(|e| FlowDump {
                        key: e.key,
                        action: *e.action,
                        stats: e.stats,
                        current: e.current,
                    })
                    .collect();
                let _ = tx.send(flows);
            }
        }
    }
}

/// Every flow of `t` as (key, index into the actions, counters), and each
/// distinct action once (the table's own action ids, made dense: no
/// hashing).
pub fn dump_flows(t: &flowtable::FlowTable) -> (Vec<(FlowKey, u32, FlowStats)>, Vec<Action>) {
    let mut dense: Vec<u32> = Vec::new();
    let mut actions = Vec::new();
    let mut flows = Vec::with_capacity(t.len());
    for e in t.iter() {
        let id = e.action_id.0 as usize;
        if dense.len() <= id {
            dense.resize(id + 1, u32::MAX);
        }
        if dense[id] == u32::MAX {
            dense[id] = u32::try_from(actions.len()).unwrap_or(u32::MAX);
            actions.push(*e.action);
        }
        flows.push((e.key, dense[id], e.stats));
    }
    (flows, actions)
}

/// Guest frames of a vhost-user port, written straight into pool chunks:
/// the frame after the usual headroom, its virtio-net header at the end of
/// the headroom (scratch space until an encap writes there). Takes no more
/// than the pool can spare: what the guest hands over is gone from its
/// queue.
struct PoolSink<'a> {
    pool: &'a mut FramePool,
    descs: &'a mut ArrayVec<Desc, BATCH>,
    counters: &'a mut PortCounters,
    /// The chunk handed out by `room`, not yet committed.
    chunk: Option<u64>,
}

impl crate::vhost::virtq::FrameSink for PoolSink<'_> {
    fn room(&mut self) -> Option<&mut [u8]> {
        if self.descs.is_full() {
            return None;
        }
        let chunk = match self.chunk {
            Some(c) => c,
            None => {
                if self.pool.free_count() <= VM_RESERVE / 2 {
                    self.counters.rx_no_buffer += 1;
                    return None;
                }
                let c = self.pool.alloc()?;
                self.chunk = Some(c);
                c
            }
        };
        let hdr = crate::vhost::virtq::HDR_LEN as u64;
        let (b, off) = self.pool.chunk_mut(chunk + HEADROOM as u64 - hdr)?;
        b.get_mut(off..)
    }

    fn commit(&mut self, len: usize) {
        if let Some(chunk) = self.chunk.take() {
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += len as u64;
            // Capacity checked in `room`.
            let _ = self.descs.try_push(Desc {
                addr: chunk + HEADROOM as u64,
                len: u32::try_from(len).unwrap_or(0),
            });
        }
    }
}

impl Drop for PoolSink<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.chunk.take() {
            self.pool.release(c);
        }
    }
}

/// Send `frames` (chunks of `pool`) on `p`, releasing every chunk that
/// is not handed to the kernel.
fn transmit(p: &mut Port, pool: &mut FramePool, frames: &[Desc]) {
    match &mut p.io {
        PortIo::Closed => {
            p.counters.tx_dropped += frames.len() as u64;
            frames.iter().for_each(|d| pool.release(d.addr));
        }
        PortIo::Tap(t) => {
            for d in frames {
                let r = match pool.chunk_mut(d.addr) {
                    Some((c, off)) => match c.get(off..off + d.len as usize) {
                        Some(f) => t.send(f),
                        None => Ok(false),
                    },
                    None => Ok(false),
                };
                match r {
                    Ok(true) => {
                        p.counters.tx_packets += 1;
                        p.counters.tx_bytes += u64::from(d.len);
                    }
                    Ok(false) => p.counters.tx_dropped += 1,
                    Err(_) => p.counters.tx_errors += 1,
                }
                pool.release(d.addr);
            }
        }
        PortIo::Xsk(x) => {
            let n = x.send(frames);
            for d in &frames[..n] {
                p.counters.tx_packets += 1;
                p.counters.tx_bytes += u64::from(d.len);
            }
            for d in &frames[n..] {
                p.counters.tx_dropped += 1;
                pool.release(d.addr);
            }
        }
        PortIo::VhostUser(v) => {
            let before = (v.stats, v.not_ready);
            let (sent, bytes) = v.send(frames.iter().filter_map(|d| {
                let (c, off) = pool.chunk_ro(d.addr)?;
                c.get(off..off + d.len as usize)
            }));
            let c = &mut p.counters;
            c.tx_packets += sent as u64;
            c.tx_bytes += bytes;
            c.guest_queue_full += v.stats.rx_no_buffer - before.0.rx_no_buffer;
            c.guest_not_ready += v.not_ready - before.1;
            c.guest_bad_descriptor += (v.stats.rx_bad_chain + v.stats.rx_oversize)
                - (before.0.rx_bad_chain + before.0.rx_oversize);
            c.tx_dropped += (frames.len() - sent) as u64;
            frames.iter().for_each(|d| pool.release(d.addr));
        }
    }
}
