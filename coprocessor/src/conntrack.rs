//! Connection tracking: the state of every connection a security group
//! or NAT decision depends on.
//!
//! A connection has two sides, each a fast-path flow: side 0 carries the
//! original direction (keyed at the originator's ingress), side 1 the
//! replies (keyed at the responder's ingress, after NAT). Both keys map to
//! the connection, so a miss on either finds it.
//!
//! The fast path does not punt every packet: it punts TCP segments with
//! SYN, FIN or RST (the state changes), and reports when a flow of a
//! connection expires idle, with its last use. Timers live in a
//! [`Wheel`]: when a connection's deadline comes and its flows may still
//! be in use, the owner asks the fast path for their last use
//! ([`Expiry::Check`]) and reschedules from the answer; otherwise the
//! connection ends. Each local VM holds at most `per_vm` connections, so
//! one VM cannot fill the table for the others.

use flowtable::{Action, FlowKey, PortId};

use crate::acl::RuleRef;

/// Idle timeouts by state, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    /// After a FIN (either side) and until both sides closed.
    pub tcp_closing: u64,
    /// After both FINs, or a RST.
    pub tcp_closed: u64,
    /// UDP before and after the first reply.
    pub udp_first: u64,
    pub udp_stream: u64,
    pub icmp: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for Timeouts {
    /// Close to OVS's userspace conntrack defaults.
    fn default() -> Self {
        Timeouts {
            tcp_syn: 30 * SEC,
            tcp_established: 24 * 3600 * SEC,
            tcp_closing: 30 * SEC,
            tcp_closed: 10 * SEC,
            udp_first: 30 * SEC,
            udp_stream: 120 * SEC,
            icmp: 30 * SEC,
        }
    }
}

/// Table limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub max: usize,
    pub per_vm: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max: 262_144,
            per_vm: 32_768,
        }
    }
}

/// TCP connection states, as far as the coprocessor sees them (Linux's
/// conntrack's, from SYN_SENT through SYN_RECV to ESTABLISHED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TcpState {
    /// The originator's SYN was seen.
    SynSent,
    /// The originator spoke again after the responder's SYN-ACK.
    Established,
    /// One side sent FIN.
    Closing,
    /// Both sides sent FIN, or one sent RST.
    Closed,
    /// The responder's SYN-ACK was seen at `since`; the originator's ACK is
    /// awaited (with SynSent, a half-open connection). Last, so snapshots
    /// of the states before it read the same.
    SynRecv { since: u64 },
}

/// A handshake not yet complete: counted apart, so a flood of them cannot
/// take the room established connections need.
pub fn half_open(s: &ConnState) -> bool {
    matches!(
        s,
        ConnState::Tcp(TcpState::SynSent | TcpState::SynRecv { .. })
    )
}

/// Half-open connections one owner may hold: a sixteenth of its quota.
pub fn half_open_per_vm(l: &Limits) -> u32 {
    (l.per_vm / 16).max(1)
}

/// Half-open connections the table holds at most: a sixteenth of it.
pub fn half_open_max(l: &Limits) -> usize {
    (l.max / 16).max(1)
}

/// A connection's protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConnState {
    Tcp(TcpState),
    Udp { replied: bool },
    Icmp { replied: bool },
}

impl ConnState {
    pub fn name(&self) -> &'static str {
        match self {
            ConnState::Tcp(TcpState::SynSent) => "syn_sent",
            ConnState::Tcp(TcpState::SynRecv { .. }) => "syn_recv",
            ConnState::Tcp(TcpState::Established) => "established",
            ConnState::Tcp(TcpState::Closing) => "closing",
            ConnState::Tcp(TcpState::Closed) => "closed",
            ConnState::Udp { replied: false } | ConnState::Icmp { replied: false } => "new",
            ConnState::Udp { replied: true } | ConnState::Icmp { replied: true } => "replied",
        }
    }

    fn timeout(&self, t: &Timeouts) -> u64 {
        match self {
            ConnState::Tcp(TcpState::SynSent | TcpState::SynRecv { .. }) => t.tcp_syn,
            ConnState::Tcp(TcpState::Established) => t.tcp_established,
            ConnState::Tcp(TcpState::Closing) => t.tcp_closing,
            ConnState::Tcp(TcpState::Closed) => t.tcp_closed,
            ConnState::Udp { replied: false } => t.udp_first,
            ConnState::Udp { replied: true } => t.udp_stream,
            ConnState::Icmp { .. } => t.icmp,
        }
    }

    fn replied(&mut self) {
        match self {
            ConnState::Udp { replied } | ConnState::Icmp { replied } => *replied = true,
            ConnState::Tcp(_) => {}
        }
    }
}

/// One direction of a connection: its fast-path flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Side {
    pub key: FlowKey,
    pub action: Action,
    /// The fast-path threads whose tables hold the flow (as far as we
    /// know), one bit each ([`thread_bit`]).
    #[serde(with = "installed_on")]
    pub installed: u64,
}

/// Fast-path thread `t`'s bit in [`Side::installed`] (threads past 63
/// share the last bit).
pub fn thread_bit(t: u16) -> u64 {
    1 << t.min(63)
}

/// A side's threads go into a snapshot as "installed or not" (the format
/// of one thread's days, kept), and "installed" comes back as every
/// thread's: the next check asks them all and their answers set the bits
/// exactly, and until then no thread's report of the flow gone can end
/// the connection while another may still hold it.
mod installed_on {
    pub fn serialize<S: serde::Serializer>(on: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*on != 0)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let b: bool = serde::Deserialize::deserialize(d)?;
        Ok(if b { u64::MAX } else { 0 })
    }
}

/// A NAT binding held by a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NatBinding {
    /// The translated (external) address and port of the VM's side.
    pub ip: u32,
    pub port: u16,
    /// From the SNAT pool (released with the connection); false for a
    /// floating IP (1:1, nothing to release).
    pub pooled: bool,
}

/// What admitted a connection, to check again when the policy changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Admission {
    pub vni: u32,
    /// Original direction's addresses (before NAT) and protocol.
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    /// Destination port, or ICMP type.
    pub port: u16,
    /// The filtered local VM that opened it (egress rules), if any.
    pub egress: Option<PortId>,
    /// The filtered local VM it goes to (ingress rules), if any.
    pub ingress: Option<PortId>,
    /// The ingress rule that admitted it, if any.
    pub rule: Option<RuleRef>,
}

impl Admission {
    /// Would `policy` admit this connection if it opened now in `topo`?
    /// (Asked of every tracked connection when the policy changes.)
    pub fn still_admitted(
        &self,
        topo: &crate::topology::Topology,
        policy: &crate::acl::Policy,
    ) -> bool {
        let check = |port, dir, peer| {
            topo.vm_on(port).is_none_or(|vm| {
                vm.groups.is_empty()
                    || policy
                        .admits(&vm.groups, dir, self.vni, peer, self.proto, self.port)
                        .is_some()
            })
        };
        self.egress
            .is_none_or(|p| check(p, crate::acl::Direction::Egress, self.dst))
            && self
                .ingress
                .is_none_or(|p| check(p, crate::acl::Direction::Ingress, self.src))
    }
}

/// A tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conn {
    pub sides: [Side; 2],
    pub state: ConnState,
    /// The local VM charged for it (quota).
    pub owner: Option<PortId>,
    pub admission: Admission,
    pub nat: Option<NatBinding>,
    pub created: u64,
    /// Last time either side was known to be used.
    pub last_seen: u64,
    fin: [bool; 2],
    deadline: u64,
}

impl Conn {
    pub fn new(sides: [Side; 2], state: ConnState, admission: Admission, now: u64) -> Conn {
        Conn {
            sides,
            state,
            owner: None,
            admission,
            nat: None,
            created: now,
            last_seen: now,
            fin: [false; 2],
            deadline: 0,
        }
    }

    /// Keys of the sides currently in the fast path.
    pub fn installed_keys(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.sides
            .iter()
            .filter(|s| s.installed != 0)
            .map(|s| s.key)
    }
}

/// Why a connection could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtRefused {
    /// The table is full.
    Full,
    /// The owner holds its quota of connections.
    Quota,
    /// One of its keys already belongs to another connection.
    Clash,
}

/// Something the owner must do for an expiring connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// Ask the fast path how recently these flows were used.
    Check { id: u64, keys: [Option<FlowKey>; 2] },
    /// The connection ended: free what it held, remove its flows.
    Ended(Box<Conn>),
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtCounters {
    pub created: u64,
    pub expired: u64,
    pub revoked: u64,
    pub refused_full: u64,
    pub refused_quota: u64,
    pub events: u64,
    pub checks: u64,
    /// ICMP errors let through as related to a connection.
    pub related: u64,
}

impl CtCounters {
    /// Add `o`'s counts to these.
    pub fn add(&mut self, o: &CtCounters) {
        self.created += o.created;
        self.expired += o.expired;
        self.revoked += o.revoked;
        self.refused_full += o.refused_full;
        self.refused_quota += o.refused_quota;
        self.events += o.events;
        self.checks += o.checks;
        self.related += o.related;
    }
}

mod index;
mod quota;
mod shards;
mod table;

pub use shards::{Conntrack, Found, SHARDS};

#[cfg(test)]
mod tests;
