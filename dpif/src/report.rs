//! What the fast path tells the coprocessor about tracked connections'
//! flows.

use flowtable::FlowKey;

/// When a flow was last used, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowUse {
    pub last_used: u64,
    pub packets: u64,
}

/// A report on flows of tracked connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A conntrack flow expired idle (or its generation ended) on
    /// fast-path thread `thread`.
    FlowGone {
        key: FlowKey,
        used: FlowUse,
        thread: u16,
    },
    /// Fast-path thread `thread`'s answer to a [`crate::CtCheck`]: each
    /// key's use in its table, `None` if absent. (Every thread answers
    /// every check; the answers are gathered, see `fastpath::report`.)
    Checked {
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<FlowUse>; 2],
        thread: u16,
    },
}

/// Every fast-path thread's answer to one check, gathered: each key's
/// latest use and packets over all threads (`None` if no thread holds
/// it), and the threads holding it, one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckAnswer {
    pub id: u64,
    pub keys: [Option<FlowKey>; 2],
    pub used: [Option<FlowUse>; 2],
    pub on: [u64; 2],
}

impl CheckAnswer {
    /// Thread `thread`'s answer alone (as if it were the only one).
    pub fn of(
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<FlowUse>; 2],
        thread: u16,
    ) -> CheckAnswer {
        let bit = 1u64 << thread.min(63);
        CheckAnswer {
            id,
            keys,
            used,
            on: used.map(|u| if u.is_some() { bit } else { 0 }),
        }
    }

    /// Fold another thread's answer to the same check in.
    pub fn merge(&mut self, other: &CheckAnswer) {
        for i in 0..2 {
            self.on[i] |= other.on[i];
            self.used[i] = match (self.used[i], other.used[i]) {
                (Some(a), Some(b)) => Some(FlowUse {
                    last_used: a.last_used.max(b.last_used),
                    packets: a.packets.saturating_add(b.packets),
                }),
                (a, b) => a.or(b),
            };
        }
    }
}
