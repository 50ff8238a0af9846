//! The fast path's reports on tracked connections' flows (an idle flow
//! gone, the answer to a check), a bounded lock-free queue per
//! coprocessor thread like the punts (`punt`): a report goes to the
//! thread [`dpif::steer`] names for its connection — the one keeping the
//! connection's conntrack shard — and a thread with none of its own
//! takes the others'.
//!
//! With several fast-path threads, each keeps its own table, so every
//! thread answers every check; [`Gather`] folds the answers into one
//! before the coprocessor decides.

use std::collections::HashMap;
use std::sync::Mutex;

use crossbeam_queue::ArrayQueue;

pub use dpif::{CheckAnswer, FlowUse, Report};

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

/// The fast-path threads' answers to checks, gathered until every thread
/// has answered (see the module documentation). Kept by the coprocessor
/// threads, behind a lock: checks are timer events, not packets.
#[derive(Debug)]
pub struct Gather {
    threads: usize,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// By check id: when its first answer came (clock ns), the threads
    /// that answered (a bit each), the answers so far.
    answers: HashMap<u64, (u64, u64, CheckAnswer)>,
    next_purge: u64,
}

/// Answers whose siblings have not come this long after the first (a
/// report queue was full) are forgotten: the coprocessor asks again.
const GATHER_PATIENCE_NS: u64 = 10_000_000_000;

impl Gather {
    /// For `threads` fast-path threads (at most 64).
    pub fn new(threads: usize) -> Gather {
        Gather {
            threads: threads.clamp(1, 64),
            pending: Mutex::new(Pending::default()),
        }
    }

    /// Thread `thread`'s answer to check `id`, at clock `now`; the
    /// gathered answer once every thread's is in.
    pub fn answer(
        &self,
        id: u64,
        keys: [Option<flowtable::FlowKey>; 2],
        used: [Option<FlowUse>; 2],
        thread: u16,
        now: u64,
    ) -> Option<CheckAnswer> {
        let a = CheckAnswer::of(id, keys, used, thread);
        if self.threads == 1 {
            return Some(a);
        }
        let all = u64::MAX >> (64 - self.threads);
        let bit = 1u64 << thread.min(63);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if now >= p.next_purge {
            p.next_purge = now + GATHER_PATIENCE_NS;
            p.answers
                .retain(|_, e| now.saturating_sub(e.0) < GATHER_PATIENCE_NS);
        }
        let e = p.answers.entry(id).or_insert((now, 0, a));
        if e.1 != 0 && e.1 & bit == 0 {
            e.2.merge(&a);
        }
        e.1 |= bit;
        if e.1 & all != all {
            return None;
        }
        p.answers.remove(&id).map(|e| e.2)
    }

    /// Checks waiting for some thread's answer.
    pub fn waiting(&self) -> usize {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.answers.len()
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
            r.push(Report::FlowGone {
                key: back,
                used,
                thread: 0,
            })
            .unwrap();
            r.push(Report::Checked {
                id: 7,
                keys: [Some(out), None],
                used: [None; 2],
                thread: 0,
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
        r.push(Report::FlowGone {
            key,
            used,
            thread: 1,
        })
        .unwrap();
        let t = dpif::steer::thread(&key, 2);
        assert!(r.pop(1 - t).is_some(), "the other thread helps");
        assert!(r.is_empty());
    }

    #[test]
    fn a_check_is_answered_once_every_thread_has_answered_and_lost_answers_are_forgotten() {
        let g = Gather::new(3);
        let out = FlowKey::new(Ingress::Port(PortId(1)), 6, 10, 20, 1000, 80);
        let back = FlowKey::new(Ingress::Port(PortId(2)), 6, 20, 10, 80, 1000);
        let keys = [Some(out), Some(back)];
        let u = |last_used, packets| Some(FlowUse { last_used, packets });
        assert_eq!(g.answer(1, keys, [u(5, 1), None], 2, 0), None);
        // A thread answering twice is counted once.
        assert_eq!(g.answer(1, keys, [u(5, 1), None], 2, 0), None);
        assert_eq!(g.answer(1, keys, [None, None], 0, 0), None);
        let a = g.answer(1, keys, [u(9, 3), u(7, 2)], 1, 0).unwrap();
        assert_eq!(a.used, [u(9, 4), u(7, 2)]);
        assert_eq!(a.on, [0b110, 0b010], "the threads holding each side");
        assert_eq!(g.waiting(), 0);
        // One thread's answer lost: the others' wait, then are forgotten.
        assert_eq!(g.answer(2, keys, [None, None], 0, 1), None);
        assert_eq!(g.answer(2, keys, [None, None], 1, 2), None);
        assert_eq!(g.waiting(), 1);
        assert_eq!(
            g.answer(3, keys, [None, None], 0, GATHER_PATIENCE_NS + 5),
            None
        );
        assert_eq!(g.waiting(), 1, "check 2 forgotten, check 3 waits");
        // One thread: every answer is whole.
        let one = Gather::new(1)
            .answer(4, keys, [u(1, 1), None], 0, 0)
            .unwrap();
        assert_eq!(one.on, [1, 0]);
    }
}
