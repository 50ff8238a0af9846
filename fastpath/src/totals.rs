//! The fast-path threads' counters summed into one [`Snapshot`], for the
//! views and metrics that show the switch as a whole (each thread's own
//! share — core, busy time, queues, packets — is shown beside it).

use crate::pipeline::PipelineCounters;
use crate::request::{FirstPacket, Snapshot, Talker};
use crate::xsk::XskStats;

/// Every counter of `parts` summed (the first thread's for what is not a
/// count: uptime the longest, the first poll once every thread polled).
/// `None` for no parts.
pub fn total(mut parts: Vec<Snapshot>) -> Option<Snapshot> {
    let rest = parts.split_off(1.min(parts.len()));
    let mut t = parts.pop()?;
    for s in rest {
        for (id, name, c) in s.ports {
            match t.ports.iter_mut().find(|p| p.0 == id) {
                Some(p) => p.2.add(&c),
                None => t.ports.push((id, name, c)),
            }
        }
        for (id, x) in s.xsk {
            match t.xsk.iter_mut().find(|p| p.0 == id) {
                Some(p) => add_xsk(&mut p.1, &x),
                None => t.xsk.push((id, x)),
            }
        }
        t.pool_free += s.pool_free;
        t.pool_chunks += s.pool_chunks;
        // Through their by-name form, which already sums (a handover's).
        let mut named = t.pipeline.to_named();
        named.add(&s.pipeline.to_named());
        let ports = t.pipeline.port_drops.len().max(s.pipeline.port_drops.len());
        t.pipeline = PipelineCounters::from_named(&named, ports);
        add(&mut t.punted, &s.punted);
        t.table_len += s.table_len;
        t.table_capacity += s.table_capacity;
        let (a, b) = (&mut t.table, &s.table);
        a.stale_lookups += b.stale_lookups;
        a.inserts += b.inserts;
        a.updates += b.updates;
        a.insert_full += b.insert_full;
        a.insert_probe_limit += b.insert_probe_limit;
        a.removals += b.removals;
        a.expired += b.expired;
        t.installs += s.installs;
        t.install_failures += s.install_failures;
        t.reinjected += s.reinjected;
        t.reinject_failed += s.reinject_failed;
        t.reports_lost += s.reports_lost;
        t.invalidated += s.invalidated;
        t.stale_installs += s.stale_installs;
        add_first_packet(&mut t.first_packet, &s.first_packet);
        t.uptime_ns = t.uptime_ns.max(s.uptime_ns);
        t.first_poll_mono_ns = t
            .first_poll_mono_ns
            .zip(s.first_poll_mono_ns)
            .map(|(a, b)| a.max(b));
    }
    Some(t)
}

/// The threads' top talkers, one entry per destination (network, inner
/// address, VTEP) with the threads' flows and traffic summed.
pub fn talkers(parts: Vec<Vec<Talker>>) -> Vec<Talker> {
    let mut by: std::collections::HashMap<(u32, u32, u32), Talker> = Default::default();
    for t in parts.into_iter().flatten() {
        by.entry((t.vni, t.dst, t.vtep))
            .and_modify(|a| {
                a.flows += t.flows;
                a.packets += t.packets;
                a.bytes += t.bytes;
            })
            .or_insert(t);
    }
    by.into_values().collect()
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

fn add_xsk(a: &mut XskStats, b: &XskStats) {
    a.rx_dropped += b.rx_dropped;
    a.rx_invalid_descs += b.rx_invalid_descs;
    a.tx_invalid_descs += b.tx_invalid_descs;
    a.rx_ring_full += b.rx_ring_full;
    a.rx_fill_ring_empty_descs += b.rx_fill_ring_empty_descs;
    a.tx_ring_empty_descs += b.tx_ring_empty_descs;
}

fn add_first_packet(a: &mut FirstPacket, b: &FirstPacket) {
    a.count += b.count;
    a.sum_ns += b.sum_ns;
    a.max_ns = a.max_ns.max(b.max_ns);
    a.under_100us += b.under_100us;
    add(&mut a.buckets, &b.buckets);
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::PortId;

    fn snap(thread: u16, n: u64) -> Snapshot {
        let mut first_packet = FirstPacket::default();
        first_packet.record(n * 1000);
        let port = crate::port::PortCounters {
            rx_packets: n,
            tx_dropped: n,
            ..Default::default()
        };
        let mut pipeline = PipelineCounters {
            rx_packets: n,
            ..Default::default()
        };
        pipeline
            .port_drops
            .resize(usize::from(thread) + 1, Default::default());
        pipeline.port_drops[usize::from(thread)].0[0] = n;
        Snapshot {
            thread,
            ports: vec![(PortId(0), "p".into(), port)],
            xsk: vec![(
                PortId(0),
                XskStats {
                    rx_dropped: n,
                    ..Default::default()
                },
            )],
            pool_free: 1,
            pool_chunks: 2,
            pipeline,
            punted: [n; crate::punt::PuntReason::COUNT],
            table_len: 3,
            table_capacity: 4,
            table: Default::default(),
            installs: n,
            install_failures: 0,
            reinjected: 0,
            reinject_failed: 0,
            reports_lost: 0,
            invalidated: n,
            stale_installs: 0,
            first_packet,
            uptime_ns: n,
            first_poll_mono_ns: Some(n),
            busy_permille: 0,
            cpu: None,
        }
    }

    #[test]
    fn the_threads_counters_are_summed() {
        assert!(total(Vec::new()).is_none());
        let t = total(vec![snap(0, 5), snap(1, 7)]).unwrap();
        assert_eq!(t.ports.len(), 1, "one port, two threads' queues of it");
        assert_eq!((t.ports[0].2.rx_packets, t.ports[0].2.tx_dropped), (12, 12));
        assert_eq!(t.xsk[0].1.rx_dropped, 12);
        assert_eq!(
            (t.pool_free, t.pool_chunks, t.table_len, t.table_capacity),
            (2, 4, 6, 8)
        );
        assert_eq!(t.pipeline.rx_packets, 12);
        assert_eq!(t.pipeline.port_drops.len(), 2);
        assert_eq!(
            (t.pipeline.port_drops[0].0[0], t.pipeline.port_drops[1].0[0]),
            (5, 7)
        );
        assert_eq!(t.punted[0], 12);
        assert_eq!((t.installs, t.invalidated), (12, 12));
        assert_eq!((t.first_packet.count, t.first_packet.max_ns), (2, 7000));
        assert_eq!((t.uptime_ns, t.first_poll_mono_ns), (7, Some(7)));
        let mut late = snap(1, 9);
        late.first_poll_mono_ns = None;
        assert_eq!(
            total(vec![snap(0, 5), late]).unwrap().first_poll_mono_ns,
            None
        );
    }
}
