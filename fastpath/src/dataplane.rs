//! The fast-path thread's loop, and what comes back from the coprocessor.
//! (Its port drivers are `port`, the control thread's requests `request`,
//! the handover's parts `handoff`.)
//!
//! One `Dataplane` runs on one thread and owns everything it touches: the
//! ports' receive queues, the frame memory, the pipeline and its flow
//! table. Other threads reach it only through queues: flows to install
//! (and frames to reinject or transmit) from the coprocessor, requests
//! from the control socket. Each loop iteration: drain installs, poll every
//! port for a batch, run it through the pipeline, transmit, punt, sweep a
//! slice of the table for idle flows, answer control requests. In
//! `adaptive` mode an idle loop sleeps in poll(2) on the ports and a
//! wakeup eventfd; in `busy` mode it spins — unless it has nothing to
//! poll (no ports yet, or paused for a handover), when it sleeps too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use arrayvec::ArrayVec;
use crossbeam_queue::ArrayQueue;
use flowtable::PortId;

use crate::frame::{Desc, FrameMem, BATCH};
use crate::pipeline::{BatchOut, Pipeline};
use crate::punt::{PuntReceiver, Punter};
use crate::umem::FramePool;
use crate::wake::{wait_readable, Wake};
use crate::{port, request};

pub use crate::handoff::{
    dump_flows, monotonic_ns, Adoption, Dump, HandedIo, HandedPool, Paused, Warm,
};
pub use crate::port::{transmit, MemPort, Port, PortCounters, PortIo, VM_FILL_SHARE};
pub use crate::request::{FirstPacket, FlowDump, Request, Snapshot, Talker};
pub use dpif::{CtCheck, FlowUse, Report, Update};

/// How the loop waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever (production, benchmarks): lowest latency, one core.
    Busy,
    /// Spin a while, then sleep on the port fds (tests, shared machines).
    Adaptive,
}

/// Tunables of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    pub mode: PollMode,
    /// Flows idle this long are removed.
    pub idle_timeout_ns: u64,
    /// Table slots examined for expiry in one loop iteration at most (the
    /// sweep's pace is time's, see `sweep`).
    pub expire_budget: usize,
    /// Idle iterations before an adaptive loop sleeps.
    pub spin_before_sleep: u32,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            mode: PollMode::Adaptive,
            idle_timeout_ns: 30_000_000_000,
            expire_budget: 1024,
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
    /// Coprocessor threads to unpark after punting, in the order of the
    /// punt queues (thread `i` takes queue `i`).
    pub coprocessors: Vec<Thread>,
    /// Conntrack reports back to the coprocessors.
    pub reports: Arc<crate::report::Reports>,
    /// Time zero of the clock shared with the coprocessors.
    pub epoch: Instant,
    /// This thread's index among the fast-path threads (stamped on its
    /// punts and reports).
    pub thread: u16,
}

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
    busy: crate::busy::BusyMeter,
    sweep: crate::sweep::SweepPace,
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
    /// Ports whose frames of a protocol family the switch does not carry
    /// were logged once already (by port id).
    announced: Vec<bool>,
    /// When the ports' drops are next looked at for that (clock ns).
    next_announce: u64,
    /// A frame pool replaced by an adopted one, dropped after the next
    /// poll (see `adopt`).
    retired: Option<FramePool>,
}

/// Drop reasons that mean "a protocol family vswitch does not carry": the
/// first of each port is logged once, naming its counter (a guest's IPv6
/// is otherwise silent but for a counter).
const UNSUPPORTED: [crate::DropReason; 2] =
    [crate::DropReason::Ipv6, crate::DropReason::VlanTagged];

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
            busy: crate::busy::BusyMeter::default(),
            sweep: crate::sweep::SweepPace::default(),
            min_version: 0,
            paused: false,
            deferred: Vec::new(),
            first_poll_waiter: None,
            first_poll_mono_ns: None,
            invalidated: 0,
            stale_installs: 0,
            announced: Vec::new(),
            next_announce: 0,
            retired: None,
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
            // Busy mode spins, but not while there is nothing to poll: a
            // binary taking over has no ports until it adopts them, and a
            // paused one has handed them on — each spinning would take
            // the core (the same one, pinned) from the other.
            let may_sleep =
                self.cfg.mode == PollMode::Adaptive || self.paused || self.ports.is_empty();
            if may_sleep && idle >= self.cfg.spin_before_sleep {
                // From here producers write the wakeup fd; what they
                // queued before they saw that, this last look finds.
                self.links.wake.going_to_sleep();
                if self.poll_once() > 0 {
                    self.links.wake.awake();
                    idle = 0;
                    continue;
                }
                // Paused, the ports are not read, so their readiness must
                // not wake the loop (it would spin on a core the next
                // binary needs): only the wakeup fd (last) counts.
                let from = if self.paused {
                    self.pollfds.len() - 1
                } else {
                    0
                };
                wait_readable(&mut self.pollfds[from..], 50);
                self.links.wake.awake();
                self.links.wake.drain();
                if !self.paused {
                    self.retire_hung_up();
                }
                idle = 0;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Stop polling ports whose descriptor reports an error or hang-up (a
    /// tap whose device was deleted under the switch): poll(2) would
    /// return at once forever and the loop would spin. Each is logged once;
    /// its frames are gone with the device, and it stays until removed.
    fn retire_hung_up(&mut self) -> usize {
        let mut n = 0;
        for (f, p) in self.pollfds.iter_mut().zip(self.ports.iter_mut()) {
            let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            if f.fd >= 0 && f.revents & bad != 0 {
                f.fd = -1;
                p.counters.rx_errors += 1;
                tracing::warn!(
                    port = %p.name,
                    "the port's device reports an error or hang-up (deleted?): no longer polled; remove the port"
                );
                n += 1;
            }
        }
        n
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
            self.retired = None;
        }
        let c = self.cfg;
        let table = self.pipeline.table();
        let slots = table.memory_bytes() / flowtable::FlowTable::entry_size();
        let period = crate::sweep::SweepPace::period(c.idle_timeout_ns);
        let due = self.sweep.due(now, slots, period, c.expire_budget);
        let (reports, lost) = (&self.links.reports, &mut self.reports_lost);
        let thread = self.links.thread;
        self.pipeline
            .table_mut()
            .expire(now, c.idle_timeout_ns, due, |key, a, s| {
                if a.conntrack {
                    let used = FlowUse {
                        last_used: s.last_used,
                        packets: s.packets,
                    };
                    let r = Report::FlowGone {
                        key: *key,
                        used,
                        thread,
                    };
                    if reports.push(r).is_err() {
                        *lost += 1;
                    }
                }
            });
        while let Ok(req) = self.links.requests.try_recv() {
            self.answer(req, now);
            work += 1;
        }
        if now >= self.next_announce {
            self.next_announce = now + 1_000_000_000;
            self.announce_unsupported();
        }
        let _ = self.busy.iteration(now, work > 0);
        work
    }

    /// Log, once per port, the first frames of a protocol family the switch
    /// does not carry; how many ports were newly logged.
    fn announce_unsupported(&mut self) -> usize {
        let drops = &self.pipeline.counters().port_drops;
        self.announced.resize(self.ports.len(), false);
        let mut n = 0;
        for (p, done) in self.ports.iter().zip(self.announced.iter_mut()) {
            let Some(d) = drops.get(usize::from(p.id.0)) else {
                continue;
            };
            if *done {
                continue;
            }
            if let Some(r) = UNSUPPORTED.iter().find(|r| d.0[r.index()] > 0) {
                tracing::warn!(
                    port = %p.name,
                    counter = r.name(),
                    "frames of a protocol vswitch does not carry are dropped and counted (logged once per port)"
                );
                *done = true;
                n += 1;
            }
        }
        n
    }

    fn poll_port(&mut self, i: usize, now: u64) -> usize {
        self.descs.clear();
        // A retired port (see `retire_hung_up`) is not read either.
        if matches!(self.ports[i].io, PortIo::Tap(_) | PortIo::Xsk(_))
            && self.pollfds.get(i).is_some_and(|f| f.fd < 0)
        {
            return 0;
        }
        let uplink = self.pipeline.uplink();
        let port = &mut self.ports[i];
        port::receive(port, &mut self.pool, &mut self.descs, port.id == uplink);
        let n = self.descs.len();
        if n > 0 {
            let (id, meta) = (port.id, port.io.gives_offloads());
            let descs = std::mem::take(&mut self.descs);
            self.process(id, &descs, now, true, meta);
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
    /// `meta`: the frames have offload metadata (see `offload`).
    fn process(&mut self, ingress: PortId, descs: &[Desc], now: u64, may_punt: bool, meta: bool) {
        self.pipeline.set_offloaded(meta);
        self.pipeline
            .process(ingress, &mut self.pool, descs, now, &mut self.out);
        for (port, list) in self.out.tx.iter() {
            let Some(p) = self.ports.get_mut(usize::from(port.0)) else {
                list.iter().for_each(|d| self.pool.release(d.addr));
                continue;
            };
            transmit(p, &mut self.pool, list, meta);
        }
        for d in &self.out.dropped {
            self.pool.release(d.addr);
        }
        if self.out.punt.is_empty() {
            return;
        }
        let mut queued = false;
        let mut supers = ArrayVec::<Desc, BATCH>::new();
        let punts = std::mem::take(&mut self.out.punt);
        for item in &punts {
            if meta && !self.punt_ready(ingress, item, &mut supers) {
                continue;
            }
            if may_punt {
                if let Some((c, off)) = self.pool.chunk_mut(item.desc.addr) {
                    let frame = c.get(off..off + item.desc.len as usize).unwrap_or(&[]);
                    let r = self.links.punter.punt_keyed(
                        ingress,
                        item.reason,
                        frame,
                        item.inner_start,
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
            // Only the threads whose queues got work (a parked one sleeps
            // on; one looking for work takes it as it comes).
            let mut woken = self.links.punter.take_queued();
            while woken != 0 {
                let i = woken.trailing_zeros() as usize;
                woken &= woken - 1;
                if let Some(t) = self.links.coprocessors.get(i) {
                    t.unpark();
                }
            }
        }
        for d in supers {
            self.process_segments(ingress, d, now, may_punt);
        }
    }

    /// Make a punted frame with offload work one the coprocessor can see
    /// and send back whole: its partial checksum completed in place
    /// (true: punt it). A super-frame is set aside in `supers` (false),
    /// to be cut into segments that go through the pipeline on their own
    /// — but for a "too big" one, whose headers are all the coprocessor
    /// needs for its ICMP error. A frame whose checksum cannot be
    /// completed is counted and released (false).
    fn punt_ready(
        &mut self,
        ingress: PortId,
        item: &crate::PuntItem,
        supers: &mut ArrayVec<Desc, BATCH>,
    ) -> bool {
        let d = item.desc;
        let off = crate::offload::of(&mut self.pool, &d);
        if off.is_gso() {
            if item.reason == crate::PuntReason::TooBig {
                return true;
            }
            // A batch holds at most BATCH frames.
            let _ = supers.try_push(d);
            return false;
        }
        if !off.needs_csum() {
            return true;
        }
        let done = self
            .pool
            .chunk_mut(d.addr)
            .and_then(|(c, o)| c.get_mut(o..o + d.len as usize))
            .map(|f| crate::offload::complete_checksum(f, &off));
        match done {
            Some(Ok(())) => true,
            Some(Err(r)) => {
                self.pipeline.count_drop(ingress, r);
                self.pool.release(d.addr);
                false
            }
            None => {
                self.pipeline
                    .count_drop(ingress, crate::DropReason::BadDescriptor);
                self.pool.release(d.addr);
                false
            }
        }
    }

    /// Cut the super-frame `d` into segments and run them through the
    /// pipeline a batch at a time (they are plain frames, so this goes
    /// no deeper); `d`'s chunk is released. (No allocation: the fast
    /// path's threads allocate nothing once running — seccomp would stop
    /// glibc's first allocation in a thread, which reads the CPU count.)
    fn process_segments(&mut self, ingress: PortId, d: Desc, now: u64, may_punt: bool) {
        let mut segs = ArrayVec::<Desc, { crate::offload::MAX_SEGS }>::new();
        let off = crate::offload::of(&mut self.pool, &d);
        // `cut` makes at most MAX_SEGS segments.
        let lost = port::cut(&mut self.pool, d, &off, |_, s| {
            let _ = segs.try_push(s);
        });
        self.pool.release(d.addr);
        for group in segs.chunks(BATCH) {
            self.process(ingress, group, now, may_punt, false);
        }
        if lost > 0 {
            self.pipeline
                .count_drop(ingress, crate::DropReason::OffloadNoRoom);
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
                thread: self.links.thread,
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
                    Some(p) => transmit(p, &mut self.pool, &[d], false),
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
                self.process(ingress, &[d], now, stale, false);
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
            .map(|p| (p.name.clone(), crate::handoff::handed(&p.io)))
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
        // The pool made at start (the placeholder a new binary runs with
        // until it adopts) is unmapped after the first poll: dropping its
        // mapped regions here would lengthen the blackout.
        self.retired = Some(std::mem::replace(&mut self.pool, a.pool));
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
        port::copy_in(&mut self.pool, frame)
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
                        _ => None,
                    })
                    .collect();
                let _ = tx.send(Snapshot {
                    thread: self.links.thread,
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
                    busy_permille: self.busy.permille(),
                    // SAFETY: no arguments; -1 on failure.
                    cpu: usize::try_from(unsafe { libc::sched_getcpu() }).ok(),
                });
            }
            Request::Talkers(tx) => {
                let _ = tx.send(request::talkers(self.pipeline.table()));
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
                    .retain(|_, a| a.encap.as_ref().is_none_or(|t| t.next_hop_mac() != mac));
            }
            Request::HeaderTaps(tx) => {
                let _ = tx.send(
                    self.ports
                        .iter()
                        .filter(|p| matches!(&p.io, PortIo::Tap(t) if t.vnet()))
                        .map(|p| p.name.clone())
                        .collect(),
                );
            }
            Request::Flows(tx) => {
                let _ = tx.send(request::flows(self.pipeline.table(), self.links.thread));
            }
        }
    }
}

#[cfg(test)]
mod tests;
