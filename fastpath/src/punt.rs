//! The punt path: copying frames the fast path cannot handle into
//! messages for the coprocessor, within a per-port budget.
//!
//! Messages come from a fixed pool and go back to it after the
//! coprocessor is done, so punting allocates nothing in steady state.
//! Bounded lock-free queues (`crossbeam_queue::ArrayQueue`) connect the
//! threads: a punt queue per coprocessor thread (fast path → coprocessor)
//! and the free pool (coprocessor → fast path). A frame with a key goes
//! to the thread [`dpif::steer`] names for it — the one keeping its
//! connection's shard, so a connection's decisions stay on one core —
//! others by ingress port; a thread with nothing of its own takes from
//! the others' queues. Every way a punt can fail is a counted drop: over
//! the port's budget, pool empty, queue full.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use flowtable::{FlowKey, PortId};

use crate::drop::DropReason;

pub use dpif::{PuntMsg, PuntReason};

/// Generic cell rate algorithm: a token bucket kept as one "theoretical
/// arrival time", so a check is a compare and an add, no division.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Nanoseconds per punt (1e9 / rate).
    interval: u64,
    /// How far ahead of `now` the arrival time may run: burst × interval.
    tolerance: u64,
    tat: u64,
}

impl Budget {
    /// `rate` punts per second on average, bursts of up to `burst`.
    /// A zero rate forbids punting.
    pub fn new(rate: u64, burst: u64) -> Budget {
        if rate == 0 {
            return Budget {
                interval: u64::MAX,
                tolerance: 0,
                tat: 0,
            };
        }
        let interval = (1_000_000_000 / rate).max(1);
        Budget {
            interval,
            tolerance: interval.saturating_mul(burst.max(1)),
            tat: 0,
        }
    }

    /// Take one token at time `now` (ns); false if over budget.
    #[inline]
    pub fn take(&mut self, now: u64) -> bool {
        let tat = self.tat.max(now);
        // Allowed if, after this punt, the arrival time runs at most
        // `tolerance` ahead of now.
        if (tat - now).saturating_add(self.interval) > self.tolerance {
            return false;
        }
        self.tat = tat.saturating_add(self.interval);
        true
    }
}

/// Sizes of the punt path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PuntConfig {
    /// Messages in flight at most (queue and pool size).
    pub messages: usize,
    /// Bytes a message holds; longer frames are truncated.
    pub msg_bytes: usize,
    /// Default budget per port: punts per second, and burst.
    pub rate: u64,
    pub burst: u64,
    /// Punt queues: one per coprocessor thread.
    pub queues: usize,
}

impl Default for PuntConfig {
    fn default() -> Self {
        PuntConfig {
            messages: 4096,
            msg_bytes: 2048,
            rate: 10_000,
            burst: 256,
            queues: 1,
        }
    }
}

/// The coprocessor's end: pop punted frames, give messages back.
#[derive(Debug, Clone)]
pub struct PuntReceiver {
    queues: Arc<[ArrayQueue<PuntMsg>]>,
    /// The queue of this receiver's thread.
    mine: usize,
    pool: Arc<ArrayQueue<PuntMsg>>,
}

impl PuntReceiver {
    /// The receiver of coprocessor thread `i` (of the queues there are).
    pub fn for_thread(&self, i: usize) -> PuntReceiver {
        PuntReceiver {
            queues: Arc::clone(&self.queues),
            mine: i % self.queues.len(),
            pool: Arc::clone(&self.pool),
        }
    }

    /// The next message of this thread's queue; if it has none, of
    /// another's (no punt waits behind a busy thread while one idles).
    pub fn recv(&self) -> Option<PuntMsg> {
        let n = self.queues.len();
        (0..n).find_map(|k| self.queues[(self.mine + k) % n].pop())
    }

    /// Return a message to the pool once its frame is handled.
    pub fn recycle(&self, mut m: PuntMsg) {
        m.data.clear();
        // The pool has room for every message ever made; if it were full
        // the message is simply freed.
        let _ = self.pool.push(m);
    }

    /// Messages waiting for the coprocessor.
    pub fn depth(&self) -> usize {
        self.queues.iter().map(ArrayQueue::len).sum()
    }
}

/// Buckets of per-sender budgets behind a shared port.
const SENDER_BUCKETS: usize = 1024;

/// Behind the uplink and the external port are many senders (remote
/// VTEPs and their VNIs; Internet hosts): each punts from a budget of its
/// own — a quarter of the port's rate and burst, in one of
/// [`SENDER_BUCKETS`] buckets picked by a hash of the sender — before the
/// port's, so one sender cannot use up what the others need. The bucket
/// array is fixed: a sender forging new addresses grows nothing.
#[derive(Debug, Clone)]
struct Senders {
    port: PortId,
    /// The sender is the outer source and the VNI (VXLAN), or the source.
    vxlan: bool,
    buckets: Vec<Budget>,
}

impl Senders {
    /// The bucket of `frame`'s sender; `None` for a frame too short to
    /// have one (the port's budget alone applies).
    fn bucket(&mut self, frame: &[u8]) -> Option<&mut Budget> {
        // The (outer) IPv4 source; behind the uplink also the VNI.
        let mut sender = u64::from(crate::packet::Ipv4::new(frame, crate::packet::ETH_LEN).src()?);
        if self.vxlan {
            // The VXLAN header's second word: the VNI, then a reserved byte.
            let word = crate::packet::be32(frame, vxlan::wire::outer::VXLAN + 4)?;
            sender = sender << 24 | u64::from(word >> 8);
        }
        let h = sender.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54;
        let i = usize::try_from(h).ok()? % SENDER_BUCKETS;
        self.buckets.get_mut(i)
    }
}

/// The fast path's end.
#[derive(Debug)]
pub struct Punter {
    queues: Arc<[ArrayQueue<PuntMsg>]>,
    pool: Arc<ArrayQueue<PuntMsg>>,
    /// Queues given a message since [`Punter::take_queued`], a bit each.
    queued: u64,
    budgets: Vec<Budget>,
    default_budget: Budget,
    senders: Vec<Senders>,
    cfg: PuntConfig,
    /// The fast-path thread punting ([`PuntMsg::origin`]).
    origin: u16,
    /// Frames punted, by reason.
    pub punted: [u64; PuntReason::COUNT],
}

/// A connected punt path for `ports` ports (ids `0..ports`).
pub fn punt_path(cfg: &PuntConfig, ports: u16) -> (Punter, PuntReceiver) {
    let n = cfg.messages.max(1);
    // (At most 64: the threads to wake are a bit each.)
    let queues: Arc<[ArrayQueue<PuntMsg>]> = (0..cfg.queues.clamp(1, 64))
        .map(|_| ArrayQueue::new(n))
        .collect();
    let pool = Arc::new(ArrayQueue::new(n));
    for _ in 0..n {
        let _ = pool.push(PuntMsg::with_capacity(cfg.msg_bytes));
    }
    let budget = Budget::new(cfg.rate, cfg.burst);
    (
        Punter {
            queues: Arc::clone(&queues),
            pool: pool.clone(),
            queued: 0,
            budgets: vec![budget; usize::from(ports)],
            default_budget: budget,
            senders: Vec::new(),
            cfg: *cfg,
            origin: 0,
            punted: [0; PuntReason::COUNT],
        },
        PuntReceiver {
            queues,
            mine: 0,
            pool,
        },
    )
}

impl Punter {
    /// A punter for fast-path thread `origin` on the same queues and
    /// message pool, with budgets like this one's (each thread keeps its
    /// own: its receive queues are its own).
    pub fn for_thread(&self, origin: u16) -> Punter {
        Punter {
            queues: Arc::clone(&self.queues),
            pool: Arc::clone(&self.pool),
            queued: 0,
            budgets: self.budgets.clone(),
            default_budget: self.default_budget,
            senders: self.senders.clone(),
            cfg: self.cfg,
            origin,
            punted: [0; PuntReason::COUNT],
        }
    }

    /// Change one port's budget (ports beyond the configured count are
    /// added).
    pub fn set_budget(&mut self, port: PortId, b: Budget) {
        let i = usize::from(port.0);
        if i >= self.budgets.len() {
            self.budgets.resize(i + 1, self.default_budget);
        }
        self.budgets[i] = b;
    }

    /// Budget `port`'s punts per sender too (see [`Senders`]): the
    /// uplink's per remote VTEP and VNI (`vxlan`), the external port's per
    /// source address.
    pub fn share_by_sender(&mut self, port: PortId, vxlan: bool) {
        let b = Budget::new((self.cfg.rate / 4).max(1), (self.cfg.burst / 4).max(1));
        self.senders.retain(|s| s.port != port);
        self.senders.push(Senders {
            port,
            vxlan,
            buckets: vec![b; SENDER_BUCKETS],
        });
    }

    /// A budget for one more port (id = the current count).
    pub fn add_port(&mut self) {
        self.budgets.push(self.default_budget);
    }

    /// Copy `frame` into a message and queue it. `inner_start` locates the
    /// inner Ethernet header in `frame`.
    #[inline]
    pub fn punt(
        &mut self,
        ingress: PortId,
        reason: PuntReason,
        frame: &[u8],
        inner_start: u16,
        now: u64,
    ) -> Result<(), DropReason> {
        self.punt_keyed(ingress, reason, frame, inner_start, None, now)
    }

    /// [`Punter::punt`] with the key the fast path looked up.
    #[inline]
    pub fn punt_keyed(
        &mut self,
        ingress: PortId,
        reason: PuntReason,
        frame: &[u8],
        inner_start: u16,
        key: Option<FlowKey>,
        now: u64,
    ) -> Result<(), DropReason> {
        let orig_len = u32::try_from(frame.len()).map_err(|_| DropReason::FrameTooLong)?;
        if let Some(s) = self.senders.iter_mut().find(|s| s.port == ingress) {
            if let Some(b) = s.bucket(frame) {
                if !b.take(now) {
                    return Err(DropReason::PuntSenderOverBudget);
                }
            }
        }
        let budget = match self.budgets.get_mut(usize::from(ingress.0)) {
            Some(b) => b,
            None => &mut self.default_budget,
        };
        if !budget.take(now) {
            return Err(DropReason::PuntOverBudget);
        }
        let Some(mut m) = self.pool.pop() else {
            return Err(DropReason::PuntPoolEmpty);
        };
        let n = frame.len().min(m.data.capacity());
        m.data.clear();
        m.data.extend_from_slice(&frame[..n]);
        m.ingress = ingress;
        m.reason = reason;
        m.key = key;
        m.punted_at = now;
        m.origin = self.origin;
        m.inner_start = inner_start;
        m.orig_len = orig_len;
        let n = self.queues.len();
        let q = match &m.key {
            Some(k) => dpif::steer::thread(k, n),
            None => usize::from(ingress.0) % n,
        };
        if let Err(m) = self.queues[q].push(m) {
            let _ = self.pool.push(m);
            return Err(DropReason::PuntQueueFull);
        }
        self.queued |= 1 << q;
        self.punted[reason.index()] += 1;
        Ok(())
    }

    /// The queues given a message since the last call, a bit each (the
    /// coprocessor threads to wake).
    pub fn take_queued(&mut self) -> u64 {
        std::mem::take(&mut self.queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_bursts_then_the_rate() {
        let mut b = Budget::new(1000, 10); // 1 ms per punt, burst 10
        let t0 = 1_000_000_000;
        assert_eq!((0..20).filter(|_| b.take(t0)).count(), 10);
        assert!(!b.take(t0 + 500_000));
        assert!(b.take(t0 + 1_000_000));
        // After a long idle period the burst is available again, not more.
        assert_eq!((0..20).filter(|_| b.take(t0 + 10_000_000_000)).count(), 10);
        let mut never = Budget::new(0, 10);
        assert!(!never.take(t0 + 1));
    }

    #[test]
    fn punts_round_trip_and_every_failure_is_a_reason() {
        let cfg = PuntConfig {
            messages: 2,
            msg_bytes: 16,
            rate: 1_000_000,
            burst: 100,
            queues: 1,
        };
        let (mut p, rx) = punt_path(&cfg, 2);
        let frame: Vec<u8> = (0..40).collect();
        p.punt(PortId(1), PuntReason::Arp, &frame, 0, 1).unwrap();
        p.punt(PortId(1), PuntReason::Miss, &frame[..8], 0, 1)
            .unwrap();
        assert_eq!(
            p.punt(PortId(1), PuntReason::Miss, &frame, 0, 1),
            Err(DropReason::PuntPoolEmpty)
        );
        let m = rx.recv().unwrap();
        assert_eq!(
            (m.ingress, m.reason, m.orig_len),
            (PortId(1), PuntReason::Arp, 40)
        );
        assert_eq!(m.data, frame[..16], "truncated to the message size");
        assert_eq!(rx.depth(), 1);
        rx.recycle(m);
        p.punt(PortId(0), PuntReason::TooBig, &frame, 4, 1).unwrap();
        assert_eq!(p.punted[PuntReason::Miss.index()], 1);
        assert_eq!(p.punted[PuntReason::TooBig.index()], 1);
        let _ = rx.recv().unwrap();
        let m = rx.recv().unwrap();
        assert_eq!(m.inner(), &frame[4..16]);
    }

    #[test]
    fn queue_full_returns_the_message_to_the_pool() {
        let cfg = PuntConfig {
            messages: 1,
            ..PuntConfig::default()
        };
        let (mut p, rx) = punt_path(&cfg, 1);
        // Steal the queue's only slot with a message from outside the pool.
        rx.queues[0].push(PuntMsg::with_capacity(8)).unwrap();
        assert_eq!(
            p.punt(PortId(0), PuntReason::Miss, &[0; 8], 0, 1),
            Err(DropReason::PuntQueueFull)
        );
        assert_eq!(rx.pool.len(), 1, "no message lost");
    }

    #[test]
    fn a_connection_is_punted_to_the_thread_that_keeps_it_and_idle_threads_help() {
        use flowtable::Ingress;
        let cfg = PuntConfig {
            queues: 3,
            rate: 1_000_000,
            burst: 10_000,
            ..PuntConfig::default()
        };
        let (mut p, rx) = punt_path(&cfg, 4);
        let rx: Vec<PuntReceiver> = (0..3).map(|i| rx.for_thread(i)).collect();
        let mut woken = 0;
        for sport in 1000..1300u16 {
            let out = FlowKey::new(Ingress::Port(PortId(1)), 6, 10, 20, sport, 80);
            let back = FlowKey::new(Ingress::Port(PortId(2)), 6, 20, 10, 80, sport);
            for (port, key) in [(1, out), (2, back)] {
                let r = p.punt_keyed(PortId(port), PuntReason::Miss, &[0; 60], 0, Some(key), 5);
                assert!(r.is_ok());
                let t = dpif::steer::thread(&key, 3);
                let queued = p.take_queued();
                assert_eq!(queued, 1 << t, "one thread to wake");
                woken |= queued;
                // Its own thread gets it, both ways.
                let m = rx[t].queues[t]
                    .pop()
                    .expect("on the steered thread's queue");
                assert_eq!(m.key, Some(key));
                rx[t].recycle(m);
            }
        }
        assert_eq!(woken, 0b111, "every thread keeps some connections");
        // Unkeyed frames go by port; a thread with nothing of its own
        // takes another's.
        p.punt(PortId(2), PuntReason::Arp, &[0; 60], 0, 6).unwrap();
        assert_eq!(p.take_queued(), 1 << 2);
        assert_eq!(rx[0].depth(), 1);
        assert!(rx[0].recv().is_some(), "thread 0 helps thread 2");
        assert!(rx[2].recv().is_none());
    }

    #[test]
    fn one_port_over_budget_does_not_touch_another() {
        let cfg = PuntConfig {
            rate: 1,
            burst: 2,
            ..PuntConfig::default()
        };
        let (mut p, _rx) = punt_path(&cfg, 2);
        let flood = (0..100)
            .filter(|_| p.punt(PortId(0), PuntReason::Miss, &[0; 60], 0, 5).is_ok())
            .count();
        assert_eq!(flood, 2);
        assert!(p.punt(PortId(1), PuntReason::Miss, &[0; 60], 0, 5).is_ok());
        // Unknown ports share the default budget rather than panic.
        assert!(p
            .punt(PortId(900), PuntReason::Miss, &[0; 60], 0, 5)
            .is_ok());
    }

    #[test]
    fn one_sender_behind_a_shared_port_cannot_use_up_its_budget() {
        let cfg = PuntConfig {
            messages: 4096,
            msg_bytes: 128,
            rate: 1000,
            burst: 400,
            queues: 1,
        };
        let (mut p, rx) = punt_path(&cfg, 2);
        p.share_by_sender(PortId(0), true);
        // VXLAN frames: outer source at 26, VNI at 46.
        let from = |vtep: [u8; 4], vni: u8| {
            let mut f = vec![0u8; 64];
            f[26..30].copy_from_slice(&vtep);
            f[48] = vni;
            f
        };
        let storm = from([192, 168, 0, 66], 1);
        let passed = (0..1000)
            .filter(|_| p.punt(PortId(0), PuntReason::Miss, &storm, 50, 1).is_ok())
            .count();
        assert_eq!(passed, 100, "a quarter of the port's burst");
        // Another VTEP, and the same VTEP for another tenant, still punt.
        assert!(p
            .punt(
                PortId(0),
                PuntReason::Miss,
                &from([192, 168, 0, 2], 1),
                50,
                1
            )
            .is_ok());
        assert!(p
            .punt(
                PortId(0),
                PuntReason::Miss,
                &storm
                    .iter()
                    .enumerate()
                    .map(|(i, b)| if i == 48 { 2 } else { *b })
                    .collect::<Vec<u8>>(),
                50,
                1
            )
            .is_ok());
        // A VM port is budgeted per port only.
        assert_eq!(
            (0..500)
                .filter(|_| p.punt(PortId(1), PuntReason::Miss, &storm, 0, 1).is_ok())
                .count(),
            400
        );
        while rx.recv().is_some() {}
    }
}
