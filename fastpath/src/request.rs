//! What the control thread asks of a fast-path thread, and the answers:
//! counters, flows, top talkers, ports added and removed, and the
//! handover's steps (`handoff`).

use std::sync::mpsc::Sender;

use flowtable::{Action, FlowKey, FlowStats, PortId, TableCounters};

use crate::handoff::{Adoption, Dump, Paused, Warm};
use crate::pipeline::PipelineCounters;
use crate::port::{Port, PortCounters};
use crate::punt::PuntReason;

/// A flow as `ctl flows` shows it.
#[derive(Debug, Clone)]
pub struct FlowDump {
    /// The fast-path thread whose table holds it.
    pub thread: u16,
    pub key: FlowKey,
    pub action: Action,
    pub stats: FlowStats,
    pub current: bool,
}

/// Time from punting a flow's first packet to transmitting it after the
/// coprocessor's flow is installed (the slow path's round trip), with a
/// histogram: bucket `i` counts round trips under [`FirstPacket::bound_ns`]`(i)`
/// (1, 2, 5, 10, 20, 50 … µs up to 10 s; the last bucket is everything
/// longer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirstPacket {
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    pub under_100us: u64,
    pub buckets: [u64; FirstPacket::BUCKETS],
}

impl FirstPacket {
    /// 1-2-5 steps from 1 µs to 10 s, and one past them.
    pub const BUCKETS: usize = 23;

    /// The upper bound of bucket `i` (ns); `u64::MAX` for the last.
    pub fn bound_ns(i: usize) -> u64 {
        if i + 1 >= Self::BUCKETS {
            return u64::MAX;
        }
        const STEPS: [u64; 3] = [1, 2, 5];
        1_000 * STEPS[i % 3] * 10u64.pow(u32::try_from(i / 3).unwrap_or(0))
    }

    /// One first packet's round trip.
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        if ns < 100_000 {
            self.under_100us += 1;
        }
        let i = (0..Self::BUCKETS)
            .find(|&i| ns < Self::bound_ns(i))
            .unwrap_or(Self::BUCKETS - 1);
        self.buckets[i] += 1;
    }

    /// The quantile `per_mille`/1000 as the upper bound of its bucket
    /// (ns; the maximum if that is lower, as in the last bucket); 0 with no
    /// samples.
    pub fn quantile_ns(&self, per_mille: u64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The rank of the quantile's sample, 1-based.
        let rank = (self.count.saturating_mul(per_mille.min(1000)))
            .div_ceil(1000)
            .clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::bound_ns(i).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// Counters of the whole thread, as `ctl stats` shows them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The fast-path thread's index.
    pub thread: u16,
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
    /// The thread's busy share of the last full second, per mille.
    pub busy_permille: u32,
    /// The core the thread runs on.
    pub cpu: Option<usize>,
}

/// Requests from the control thread; answers go back on the sender.
#[derive(Debug)]
pub enum Request {
    Stats(Sender<Snapshot>),
    Flows(Sender<Vec<FlowDump>>),
    /// Traffic towards each remote destination (flows that encapsulate),
    /// summed over the live flows.
    Talkers(Sender<Vec<Talker>>),
    /// The tap ports whose queue carries a virtio-net header before each
    /// frame (offloads on): a binary that does not read one must not be
    /// handed them.
    HeaderTaps(Sender<Vec<String>>),
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

/// Traffic towards each remote destination, summed over the flows of
/// `table` that encapsulate.
pub fn talkers(table: &flowtable::FlowTable) -> Vec<Talker> {
    let mut by: std::collections::HashMap<(u32, u32, u32), Talker> =
        std::collections::HashMap::new();
    for e in table.iter() {
        let Some(t) = &e.action.encap else { continue };
        let (vni, vtep) = (t.vni(), t.remote_vtep());
        let x = by.entry((vni, e.key.dst_ip, vtep)).or_insert(Talker {
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
    by.into_values().collect()
}

/// Every flow of `table`, as `ctl flows` shows them.
pub fn flows(table: &flowtable::FlowTable, thread: u16) -> Vec<FlowDump> {
    table
        .iter()
        .map(|e| FlowDump {
            thread,
            key: e.key,
            action: *e.action,
            stats: e.stats,
            current: e.current,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::FirstPacket;

    #[test]
    fn first_packets_fall_in_1_2_5_buckets_and_give_their_quantiles() {
        assert_eq!(FirstPacket::bound_ns(0), 1_000);
        assert_eq!(FirstPacket::bound_ns(4), 20_000);
        assert_eq!(FirstPacket::bound_ns(21), 10_000_000_000);
        assert_eq!(FirstPacket::bound_ns(22), u64::MAX);
        let mut f = FirstPacket::default();
        assert_eq!(f.quantile_ns(990), 0);
        // 98 at 30 µs, one at 150 µs, one at 3 ms.
        for _ in 0..98 {
            f.record(30_000);
        }
        f.record(150_000);
        f.record(3_000_000);
        assert_eq!(f.buckets[5], 98, "under 50 µs");
        assert_eq!(f.quantile_ns(500), 50_000);
        assert_eq!(f.quantile_ns(990), 200_000);
        assert_eq!(f.quantile_ns(1000), 3_000_000, "the maximum, not 5 ms");
        assert_eq!(f.under_100us, 98);
        f.record(99_000_000_000);
        assert_eq!(f.buckets[22], 1, "past 10 s");
        assert_eq!(f.quantile_ns(1000), 99_000_000_000);
    }
}
