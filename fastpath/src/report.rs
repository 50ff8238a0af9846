//! The fast path's reports on tracked connections' flows (an idle flow
//! gone, the answer to a check), a bounded lock-free queue per
//! coprocessor thread like the punts (`punt`): a report goes to the
//! thread [`dpif::steer`] names for its connection — the one keeping the
//! connection's conntrack shard — and a thread with none of its own
//! takes the others'.

use crossbeam_queue::ArrayQueue;

pub use dpif::{FlowUse, Report};

/// See the module documentation.
#[derive(Debug)]
pub struct Reports {
    queues: Box<[ArrayQueue<Report>]>,
}

/// The key a report is steered by: the connection's original key where
/// the report has it (a check), else the flow's.
fn key_of(r: &Report) -> Option<&flowtable::FlowKey> {
    match r {
        Report::FlowGone { key, .. } => Some(key),
        Report::Checked { keys, .. } => keys[0].as_ref().or(keys[1].as_ref()),
    }
}

impl Reports {
    /// `total` reports waiting at most, over `threads` queues.
    pub fn new(threads: usize, total: usize) -> Reports {
        let n = threads.clamp(1, 64);
        let each = (total / n).max(1024);
        Reports {
            queues: (0..n).map(|_| ArrayQueue::new(each)).collect(),
        }
    }

    /// Queue `r` for its connection's thread; given back if that queue is
    /// full.
    pub fn push(&self, r: Report) -> Result<(), Report> {
        let n = self.queues.len();
        let q = key_of(&r).map_or(0, |k| dpif::steer::thread(k, n));
        self.queues[q].push(r)
    }

    /// The next report for thread `thread`: of its own queue, else of
    /// another's.
    pub fn pop(&self, thread: usize) -> Option<Report> {
        let n = self.queues.len();
        (0..n).find_map(|k| self.queues[(thread + k) % n].pop())
    }

    /// Reports waiting, all threads.
    pub fn len(&self) -> usize {
        self.queues.iter().map(ArrayQueue::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::{FlowKey, Ingress, PortId};

    #[test]
    fn a_report_goes_to_its_connections_thread_and_idle_threads_help() {
        let r = Reports::new(2, 4096);
        let used = FlowUse {
            last_used: 1,
            packets: 2,
        };
        let mut seen = [0; 2];
        for sport in 1000..1100u16 {
            let out = FlowKey::new(Ingress::Port(PortId(1)), 17, 10, 20, sport, 53);
            let back = FlowKey::new(Ingress::Port(PortId(2)), 17, 20, 10, 53, sport);
            let t = dpif::steer::thread(&out, 2);
            r.push(Report::FlowGone { key: back, used }).unwrap();
            r.push(Report::Checked {
                id: 7,
                keys: [Some(out), None],
                used: [None; 2],
            })
            .unwrap();
            // Both, the reply's flow and the check, on the thread that
            // keeps the connection.
            assert_eq!(r.queues[t].len(), 2);
            assert!(r.queues[1 - t].is_empty());
            seen[t] += 1;
            while r.queues[t].pop().is_some() {}
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        let key = FlowKey::new(Ingress::Port(PortId(1)), 17, 10, 20, 999, 53);
        r.push(Report::FlowGone { key, used }).unwrap();
        let t = dpif::steer::thread(&key, 2);
        assert!(r.pop(1 - t).is_some(), "the other thread helps");
        assert!(r.is_empty());
    }
}
