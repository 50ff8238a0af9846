//! What the control thread reaches: the fast-path threads (questions and
//! flow updates), the coprocessors' shared state, the ports, and what a
//! handover passes on.

use std::time::Instant;

use coprocessor::Coprocessor;
use flowtable::PortId;
use serde_json::Value;

use crate::fastpaths::FastPaths;

pub struct Links {
    /// The fast-path threads: questions, flow changes (policy
    /// revalidation).
    pub fast: FastPaths,
    /// A coprocessor on the switch's shared state (policy changes, views).
    pub coprocessor: Coprocessor,
    /// Time zero of the fast path's clock.
    pub epoch: Instant,
    /// Port names → ids (VMs name their port).
    pub ports: std::collections::HashMap<String, PortId>,
    /// The id the next port added at run time gets.
    pub next_port: u16,
    /// CLOCK_MONOTONIC at this switch's clock zero.
    pub epoch_mono_ns: u64,
    /// The configuration text the switch started from (handed over).
    pub config_text: String,
    /// Why this switch cannot be handed over, if it cannot.
    pub handover_refused: Option<String>,
    /// The bpf_links keeping this switch's XDP programs attached (owned by
    /// the daemon for the whole run), passed on in a handover.
    pub xdp_links: Vec<i32>,
    /// The XDP programs' socket maps by interface (owned by the daemon
    /// too), passed on in a handover.
    pub socket_maps: Vec<(String, i32)>,
    /// The last handover into this process, for `ctl stats`.
    pub last_handover: Option<Value>,
    /// The kernel's routes and neighbours: a VTEP a change introduces is
    /// resolved before the change applies, so its first packet can go.
    pub netlink: Option<crate::neighbor::Netlink>,
    /// The vhost-user ports' protocol sides (handed over with the pause).
    pub vhost: Vec<crate::vhost::Link>,
    /// Where the threads run and the coprocessors' loads.
    pub threads: crate::cores::Threads,
}

impl Links {
    /// The fast path's clock (ns since its zero).
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
