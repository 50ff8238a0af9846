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

use std::collections::HashMap;

use flowtable::{Action, FlowKey, PortId};

use crate::acl::RuleRef;
use crate::wheel::Wheel;

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
    /// The flow is (as far as we know) in the fast path's table.
    pub installed: bool,
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
        self.sides.iter().filter(|s| s.installed).map(|s| s.key)
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

/// When the fast path does not answer a check, ask again after this.
const CHECK_RETRY: u64 = 2 * SEC;

/// The connection table.
#[derive(Debug, Clone)]
pub struct Conntrack {
    slots: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    by_key: index::KeyIndex,
    per_owner: HashMap<PortId, u32>,
    /// Half-open connections, per owner and in all.
    half_open_per_owner: HashMap<PortId, u32>,
    half_open_len: usize,
    wheel: Wheel,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub counters: CtCounters,
    len: usize,
}

fn id_of(idx: u32, gen: u32) -> u64 {
    u64::from(gen) << 32 | u64::from(idx)
}

fn split(id: u64) -> (u32, u32) {
    // The two halves of a u64, by construction.
    #[allow(clippy::cast_possible_truncation)]
    let r = (id as u32, (id >> 32) as u32);
    r
}

impl Conntrack {
    pub fn new(timeouts: Timeouts, limits: Limits, now: u64) -> Conntrack {
        Conntrack {
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            by_key: index::KeyIndex::default(),
            per_owner: HashMap::new(),
            half_open_per_owner: HashMap::new(),
            half_open_len: 0,
            // 250 ms ticks, ~17 minutes per turn.
            wheel: Wheel::new(SEC / 4, 4096, now),
            timeouts,
            limits,
            counters: CtCounters::default(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Connections held by each owner.
    pub fn per_owner(&self) -> &HashMap<PortId, u32> {
        &self.per_owner
    }

    /// Half-open connections held by `owner`.
    pub fn half_open_of(&self, owner: PortId) -> u32 {
        self.half_open_per_owner.get(&owner).copied().unwrap_or(0)
    }

    /// Half-open connections in all.
    pub fn half_open_len(&self) -> usize {
        self.half_open_len
    }

    /// Count a connection of `owner` into (`true`) or out of the
    /// half-open ones.
    fn count_half_open(&mut self, owner: Option<PortId>, into: bool) {
        if into {
            self.half_open_len += 1;
        } else {
            self.half_open_len = self.half_open_len.saturating_sub(1);
        }
        if let Some(o) = owner {
            let n = self.half_open_per_owner.entry(o).or_default();
            if into {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.half_open_per_owner.remove(&o);
                }
            }
        }
    }

    /// Change connection `id`'s state with `f`, keeping the half-open
    /// counts right.
    fn change_state(&mut self, id: u64, f: impl FnOnce(&mut Conn)) {
        let Some(c) = self.get_mut(id) else { return };
        let was = half_open(&c.state);
        f(c);
        let (is, owner) = (half_open(&c.state), c.owner);
        if was != is {
            self.count_half_open(owner, is);
        }
    }

    /// The connection and side a fast-path key belongs to.
    pub fn lookup(&self, key: &FlowKey) -> Option<(u64, usize)> {
        let (idx, side) = self.by_key.get(&self.slots, key)?;
        let gen = *self.gens.get(idx as usize)?;
        Some((id_of(idx, gen), usize::from(side)))
    }

    pub fn get(&self, id: u64) -> Option<&Conn> {
        let (idx, gen) = split(id);
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get(idx as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Conn> {
        let (idx, gen) = split(id);
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get_mut(idx as usize)?.as_mut()
    }

    /// Every connection with its id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Conn)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, c)| {
            let idx = u32::try_from(i).ok()?;
            Some((id_of(idx, self.gens[i]), c.as_ref()?))
        })
    }

    /// Would `owner` be refused a new connection?
    pub fn admit(&self, owner: Option<PortId>) -> Result<(), CtRefused> {
        if self.len >= self.limits.max {
            return Err(CtRefused::Full);
        }
        if let Some(o) = owner {
            if self.per_owner.get(&o).copied().unwrap_or(0) >= self.limits.per_vm {
                return Err(CtRefused::Quota);
            }
        }
        Ok(())
    }

    /// Add `conn`, charged to `owner`.
    pub fn insert(
        &mut self,
        mut conn: Conn,
        owner: Option<PortId>,
        now: u64,
    ) -> Result<u64, CtRefused> {
        let mut admitted = self.admit(owner);
        if admitted.is_ok() && half_open(&conn.state) {
            // A handshake takes room from the half-open share only.
            if self.half_open_len >= half_open_max(&self.limits) {
                admitted = Err(CtRefused::Full);
            } else if owner.is_some_and(|o| self.half_open_of(o) >= half_open_per_vm(&self.limits))
            {
                admitted = Err(CtRefused::Quota);
            }
        }
        if let Err(e) = admitted {
            match e {
                CtRefused::Full => self.counters.refused_full += 1,
                _ => self.counters.refused_quota += 1,
            }
            return Err(e);
        }
        if conn.sides[0].key == conn.sides[1].key
            || conn
                .sides
                .iter()
                .any(|s| self.by_key.get(&self.slots, &s.key).is_some())
        {
            return Err(CtRefused::Clash);
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| i < index::MAX_SLOTS)
                    .ok_or(CtRefused::Full)?;
                self.slots.push(None);
                self.gens.push(0);
                i
            }
        };
        let id = id_of(idx, self.gens[idx as usize]);
        conn.owner = owner;
        conn.deadline = now + conn.state.timeout(&self.timeouts);
        self.wheel.schedule(id, conn.deadline);
        if let Some(o) = owner {
            *self.per_owner.entry(o).or_default() += 1;
        }
        if half_open(&conn.state) {
            self.count_half_open(owner, true);
        }
        self.slots[idx as usize] = Some(conn);
        self.by_key.insert(&self.slots, idx);
        self.len += 1;
        self.counters.created += 1;
        Ok(id)
    }

    /// Remove a connection; the caller frees its NAT binding and flows.
    pub fn remove(&mut self, id: u64) -> Option<Conn> {
        let (idx, gen) = split(id);
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get(idx as usize)?.as_ref()?;
        self.by_key.remove(&self.slots, idx);
        let conn = self.slots.get_mut(idx as usize)?.take()?;
        self.wheel.cancel(id);
        if half_open(&conn.state) {
            self.count_half_open(conn.owner, false);
        }
        if let Some(o) = conn.owner {
            if let Some(n) = self.per_owner.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    self.per_owner.remove(&o);
                }
            }
        }
        self.gens[idx as usize] = gen.wrapping_add(1);
        self.free.push(idx);
        self.len -= 1;
        Some(conn)
    }

    fn reschedule(&mut self, id: u64) {
        let t = self.timeouts;
        if let Some(c) = self.get_mut(id) {
            let d = c.last_seen + c.state.timeout(&t);
            if d != c.deadline {
                c.deadline = d;
                self.wheel.schedule(id, d);
            }
        }
    }

    /// Give connection `id` new sides (recompiled after a topology
    /// change): its keys are re-indexed; false (nothing changed) if a new
    /// key belongs to another connection.
    pub fn replace_sides(&mut self, id: u64, sides: [Side; 2]) -> bool {
        let (idx, _) = split(id);
        if self.get(id).is_none()
            || sides[0].key == sides[1].key
            || sides.iter().any(|s| {
                self.by_key
                    .get(&self.slots, &s.key)
                    .is_some_and(|(i, _)| i != idx)
            })
        {
            return false;
        }
        self.by_key.remove(&self.slots, idx);
        if let Some(c) = self.get_mut(id) {
            c.sides = sides;
        }
        self.by_key.insert(&self.slots, idx);
        true
    }

    /// A packet of side `side` was seen by the coprocessor (a miss).
    pub fn seen(&mut self, id: u64, side: usize, now: u64) {
        self.change_state(id, |c| {
            c.last_seen = c.last_seen.max(now);
            if side == 1 {
                c.state.replied();
            } else if matches!(c.state, ConnState::Tcp(TcpState::SynRecv { .. })) {
                // The originator speaks after the SYN-ACK: its ACK.
                c.state = ConnState::Tcp(TcpState::Established);
            }
        });
        self.reschedule(id);
    }

    /// A TCP segment with control flags `flags` on side `side`.
    pub fn tcp_event(&mut self, id: u64, side: usize, flags: u8, now: u64) {
        const FIN: u8 = 0x01;
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        self.counters.events += 1;
        self.change_state(id, |c| {
            c.last_seen = c.last_seen.max(now);
            let ConnState::Tcp(st) = &mut c.state else {
                return;
            };
            if flags & RST != 0 {
                *st = TcpState::Closed;
            } else if flags & FIN != 0 {
                c.fin[side.min(1)] = true;
                *st = if c.fin == [true, true] {
                    TcpState::Closed
                } else {
                    TcpState::Closing
                };
            } else if flags & (SYN | ACK) == SYN | ACK && side == 1 && *st == TcpState::SynSent {
                *st = TcpState::SynRecv { since: now };
            } else if flags & SYN == 0 && side == 0 && matches!(*st, TcpState::SynRecv { .. }) {
                // The originator's ACK of the SYN-ACK.
                *st = TcpState::Established;
            }
        });
        self.reschedule(id);
    }

    /// The fast path removed side `key` after it went idle.
    pub fn flow_gone(&mut self, key: &FlowKey, last_used: u64, packets: u64) {
        let Some((id, side)) = self.lookup(key) else {
            return;
        };
        if let Some(c) = self.get_mut(id) {
            c.sides[side].installed = false;
            c.last_seen = c.last_seen.max(last_used);
            if side == 1 && packets > 0 {
                c.state.replied();
            }
        }
        self.reschedule(id);
    }

    /// The fast path's answer to a check: each key's (last use, packets),
    /// `None` for a flow that is not installed. Returns the connection if
    /// it ended.
    pub fn checked(
        &mut self,
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<(u64, u64)>; 2],
        now: u64,
    ) -> Option<Conn> {
        let t = self.timeouts;
        let c = self.get_mut(id)?;
        // An answer about keys the connection no longer has is stale.
        if keys
            .iter()
            .zip(&c.sides)
            .any(|(k, s)| k.is_some_and(|k| k != s.key))
        {
            return None;
        }
        let mut acked = false;
        for (side, k) in keys.iter().enumerate() {
            if k.is_none() {
                continue;
            }
            c.sides[side].installed = used[side].is_some();
            if let Some((last, packets)) = used[side] {
                c.last_seen = c.last_seen.max(last);
                if side == 1 && packets > 0 {
                    c.state.replied();
                }
                // The originator's flow carried a packet after the SYN-ACK.
                if let ConnState::Tcp(TcpState::SynRecv { since }) = c.state {
                    acked |= side == 0 && last > since;
                }
            }
        }
        if acked {
            self.change_state(id, |c| c.state = ConnState::Tcp(TcpState::Established));
        }
        let c = self.get_mut(id)?;
        if c.last_seen + c.state.timeout(&t) <= now {
            self.counters.expired += 1;
            return self.remove(id);
        }
        self.reschedule(id);
        None
    }

    /// Advance the timers to `now`.
    pub fn tick(&mut self, now: u64) -> Vec<Expiry> {
        let mut due = Vec::new();
        self.wheel
            .advance(now, |id, deadline| due.push((id, deadline)));
        let t = self.timeouts;
        let mut out = Vec::new();
        for (id, deadline) in due {
            let Some(c) = self.get_mut(id) else { continue };
            if c.deadline != deadline {
                continue; // rescheduled since
            }
            if c.sides.iter().any(|s| s.installed) {
                let keys = c.sides.map(|s| s.installed.then_some(s.key));
                c.deadline = now + CHECK_RETRY;
                let d = c.deadline;
                self.wheel.schedule(id, d);
                self.counters.checks += 1;
                out.push(Expiry::Check { id, keys });
            } else if c.last_seen + c.state.timeout(&t) <= now {
                if let Some(c) = self.remove(id) {
                    self.counters.expired += 1;
                    out.push(Expiry::Ended(Box::new(c)));
                }
            } else {
                self.reschedule(id);
            }
        }
        out
    }

    /// Every connection, for a snapshot.
    pub fn to_parts(&self) -> Vec<Conn> {
        self.slots.iter().flatten().cloned().collect()
    }

    /// Rebuild from [`Conntrack::to_parts`]: the same connections, keys,
    /// owners and timers (times are the clock the snapshot was taken on,
    /// which the restoring process continues).
    pub fn from_parts(
        timeouts: Timeouts,
        limits: Limits,
        counters: CtCounters,
        conns: Vec<Conn>,
        now: u64,
    ) -> Conntrack {
        let mut ct = Conntrack::new(timeouts, limits, now);
        // Sized once: no rehashing while 100 000 connections go in.
        ct.by_key.reserve(&ct.slots, 2 * conns.len());
        ct.slots.reserve(conns.len());
        ct.gens.reserve(conns.len());
        for c in conns {
            let Some(idx) = u32::try_from(ct.slots.len())
                .ok()
                .filter(|&i| i < index::MAX_SLOTS)
            else {
                break;
            };
            // A snapshot with one key twice (not one this switch wrote):
            // the later connection is left out.
            if c.sides[0].key == c.sides[1].key
                || c.sides
                    .iter()
                    .any(|s| ct.by_key.get(&ct.slots, &s.key).is_some())
            {
                continue;
            }
            let id = id_of(idx, 0);
            if let Some(o) = c.owner {
                *ct.per_owner.entry(o).or_default() += 1;
            }
            if half_open(&c.state) {
                ct.count_half_open(c.owner, true);
            }
            ct.wheel.schedule(id, c.deadline.max(now));
            ct.slots.push(Some(c));
            ct.by_key.insert(&ct.slots, idx);
            ct.gens.push(0);
            ct.len += 1;
        }
        ct.counters = counters;
        ct
    }

    /// Timers waiting (for tests and stats).
    pub fn timers(&self) -> usize {
        self.wheel.len()
    }
}

mod index;

#[cfg(test)]
mod tests;
