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
    /// A conntrack flow expired idle (or its generation ended).
    FlowGone { key: FlowKey, used: FlowUse },
    /// The answer to a [`crate::CtCheck`]: each key's use, `None` if absent.
    Checked {
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<FlowUse>; 2],
    },
}
