//! One shard of the connection table: its connections in slots, their
//! keys' index and their timers. A shard knows nothing of the others; the
//! limits it charges against are the whole table's ([`Quotas`]).

use std::hash::RandomState;
use std::sync::Arc;

use flowtable::{FlowKey, PortId};

use super::quota::{Quotas, Reserve};
use super::{half_open, index, Conn, ConnState, CtCounters, CtRefused, Expiry, Side, TcpState};
use super::{thread_bit, Timeouts, SEC};
use crate::wheel::Wheel;
use rustc_hash::FxHashMap;

/// When the fast path does not answer a check, ask again after this.
const CHECK_RETRY: u64 = 2 * SEC;

/// Room a shard starts with: a burst of new connections does not grow
/// (copy, rehash) a shard's slots and index while its lock is held until
/// it has this many. (Reserved, not touched: memory comes as it is used.)
const INITIAL_SLOTS: usize = 1024;

/// Slots per shard fit in 27 bits; the id's low word holds the shard
/// above them.
pub(super) const SHARD_SHIFT: u32 = 27;
const SLOT_MASK: u32 = (1 << SHARD_SHIFT) - 1;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Table {
    shard: u32,
    slots: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    by_key: index::KeyIndex,
    wheel: Wheel,
    quotas: Arc<Quotas>,
    /// Room taken from the quotas, not yet used.
    reserve: Reserve,
    /// Connections of each owner here.
    owners: FxHashMap<PortId, u32>,
    pub timeouts: Timeouts,
    pub counters: CtCounters,
    len: usize,
}

/// The shard an id belongs to.
pub(super) fn shard_of_id(id: u64) -> usize {
    (split(id).0 >> SHARD_SHIFT) as usize
}

fn split(id: u64) -> (u32, u32) {
    // The two halves of a u64, by construction.
    #[allow(clippy::cast_possible_truncation)]
    let r = (id as u32, (id >> 32) as u32);
    r
}

impl Table {
    pub fn new(
        shard: u32,
        timeouts: Timeouts,
        quotas: Arc<Quotas>,
        hasher: RandomState,
        now: u64,
    ) -> Table {
        let mut by_key = index::KeyIndex::new(hasher);
        let slots = Vec::with_capacity(INITIAL_SLOTS);
        by_key.reserve(&slots, 2 * INITIAL_SLOTS);
        Table {
            shard,
            slots,
            gens: Vec::with_capacity(INITIAL_SLOTS),
            free: Vec::new(),
            by_key,
            // 250 ms ticks, ~17 minutes per turn.
            wheel: Wheel::new(SEC / 4, 4096, now),
            quotas,
            reserve: Reserve::default(),
            owners: FxHashMap::default(),
            timeouts,
            counters: CtCounters::default(),
            len: 0,
        }
    }

    fn id_of(&self, idx: u32, gen: u32) -> u64 {
        u64::from(gen) << 32 | u64::from(self.shard << SHARD_SHIFT | idx)
    }

    /// The slot and generation of an id of this shard.
    fn slot(&self, id: u64) -> Option<(u32, u32)> {
        let (low, gen) = split(id);
        (low >> SHARD_SHIFT == self.shard).then_some((low & SLOT_MASK, gen))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Keys indexed (two per connection).
    #[cfg(test)]
    pub fn index_len(&self) -> usize {
        self.by_key.len()
    }

    /// Change connection `id`'s state with `f`, keeping the half-open
    /// counts right.
    fn change_state(&mut self, id: u64, f: impl FnOnce(&mut Conn)) {
        let Some(c) = self.get_mut(id) else { return };
        let was = half_open(&c.state);
        f(c);
        let (is, owner) = (half_open(&c.state), c.owner);
        if was != is {
            self.quotas.half_open(owner, is);
        }
    }

    /// The connection and side `key` (hashed `h`) belongs to.
    pub fn lookup(&self, key: &FlowKey, h: u64) -> Option<(u64, usize)> {
        let (idx, side) = self.by_key.get(&self.slots, key, h)?;
        let gen = *self.gens.get(idx as usize)?;
        Some((self.id_of(idx, gen), usize::from(side)))
    }

    pub fn get(&self, id: u64) -> Option<&Conn> {
        let (idx, gen) = self.slot(id)?;
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get(idx as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Conn> {
        let (idx, gen) = self.slot(id)?;
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get_mut(idx as usize)?.as_mut()
    }

    /// Every connection with its id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Conn)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, c)| {
            let idx = u32::try_from(i).ok()?;
            Some((self.id_of(idx, self.gens[i]), c.as_ref()?))
        })
    }

    /// Charge a new connection of `owner` (see [`Quotas::charge`]),
    /// counting a refusal.
    pub fn charge(&mut self, owner: Option<PortId>, half: bool) -> Result<(), CtRefused> {
        let r = self.quotas.charge(&mut self.reserve, owner, half);
        match r {
            Err(CtRefused::Full) => self.counters.refused_full += 1,
            Err(_) => self.counters.refused_quota += 1,
            Ok(()) => {}
        }
        r
    }

    /// Give back a charge for a connection that did not go in.
    pub fn uncharge(&mut self, owner: Option<PortId>, half: bool) {
        self.quotas.refund(&mut self.reserve, owner, half);
    }

    fn count_owner(&mut self, owner: Option<PortId>, add: bool) {
        let Some(o) = owner else { return };
        let n = self.owners.entry(o).or_default();
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.owners.remove(&o);
            }
        }
    }

    /// Connections of each owner in this shard.
    pub fn owners(&self) -> &FxHashMap<PortId, u32> {
        &self.owners
    }

    /// Is `key` (hashed `h`) indexed here?
    pub fn has_key(&self, key: &FlowKey, h: u64) -> bool {
        self.by_key.get(&self.slots, key, h).is_some()
    }

    /// Add `conn` (its keys hashed `h`), charged to `owner` already (the
    /// caller refunds the charge on an error). `clash`: one of its keys
    /// belongs to a connection of another shard.
    pub fn insert(
        &mut self,
        mut conn: Conn,
        h: [u64; 2],
        owner: Option<PortId>,
        now: u64,
        clash: bool,
    ) -> Result<u64, CtRefused> {
        if clash
            || conn.sides[0].key == conn.sides[1].key
            || conn
                .sides
                .iter()
                .zip(h)
                .any(|(s, h)| self.has_key(&s.key, h))
        {
            return Err(CtRefused::Clash);
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let Some(i) = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| i <= SLOT_MASK)
                else {
                    return Err(CtRefused::Full);
                };
                self.slots.push(None);
                self.gens.push(0);
                i
            }
        };
        let id = self.id_of(idx, self.gens[idx as usize]);
        self.count_owner(owner, true);
        conn.owner = owner;
        conn.deadline = now + conn.state.timeout(&self.timeouts);
        self.wheel.schedule(id, conn.deadline);
        self.slots[idx as usize] = Some(conn);
        self.by_key.insert_hashed(&self.slots, idx, h);
        self.len += 1;
        self.counters.created += 1;
        Ok(id)
    }

    /// Remove a connection; the caller frees its NAT binding and flows.
    pub fn remove(&mut self, id: u64) -> Option<Conn> {
        let (idx, gen) = self.slot(id)?;
        if self.gens.get(idx as usize) != Some(&gen) {
            return None;
        }
        self.slots.get(idx as usize)?.as_ref()?;
        self.by_key.remove(&self.slots, idx);
        let conn = self.slots.get_mut(idx as usize)?.take()?;
        self.wheel.cancel(id);
        self.quotas
            .refund(&mut self.reserve, conn.owner, half_open(&conn.state));
        self.count_owner(conn.owner, false);
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
        let Some((idx, _)) = self.slot(id) else {
            return false;
        };
        if self.get(id).is_none()
            || sides[0].key == sides[1].key
            || sides.iter().any(|s| {
                self.by_key
                    .get(&self.slots, &s.key, self.by_key.hash(&s.key))
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

    /// Fast-path thread `thread` removed side `key` after it went idle.
    pub fn flow_gone(&mut self, id: u64, side: usize, used: (u64, u64), thread: u16) {
        let (last_used, packets) = used;
        if let Some(c) = self.get_mut(id) {
            c.sides[side].installed &= !thread_bit(thread);
            c.last_seen = c.last_seen.max(last_used);
            if side == 1 && packets > 0 {
                c.state.replied();
            }
        }
        self.reschedule(id);
    }

    /// The fast path's answer to a check: each key's (last use, packets),
    /// `None` for a flow no thread holds, and the threads holding it.
    /// Returns the connection if it ended.
    pub fn checked(
        &mut self,
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<(u64, u64)>; 2],
        on: [u64; 2],
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
            c.sides[side].installed = if used[side].is_some() { on[side] } else { 0 };
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
            if c.sides.iter().any(|s| s.installed != 0) {
                let keys = c.sides.map(|s| (s.installed != 0).then_some(s.key));
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

    /// Room for `n` more connections, sized once (no rehashing while a
    /// snapshot's connections go in).
    pub fn reserve(&mut self, n: usize) {
        self.by_key.reserve(&self.slots, 2 * n);
        self.slots.reserve(n);
        self.gens.reserve(n);
    }

    /// Put back a connection from a snapshot, keys, owner and timer as
    /// they were (times are the clock the snapshot was taken on, which
    /// the restoring process continues); charged whatever the limits.
    /// `None`: left out (a key twice, or the shard full).
    pub fn place(&mut self, c: Conn, h: [u64; 2], clash: bool, now: u64) -> Option<u64> {
        let idx = u32::try_from(self.slots.len())
            .ok()
            .filter(|&i| i <= SLOT_MASK)?;
        if clash
            || c.sides[0].key == c.sides[1].key
            || c.sides.iter().zip(h).any(|(s, h)| self.has_key(&s.key, h))
        {
            return None;
        }
        let id = self.id_of(idx, 0);
        self.quotas.force_charge(c.owner, half_open(&c.state));
        self.count_owner(c.owner, true);
        self.wheel.schedule(id, c.deadline.max(now));
        self.slots.push(Some(c));
        self.by_key.insert(&self.slots, idx);
        self.gens.push(0);
        self.len += 1;
        Some(id)
    }

    /// Timers waiting (for tests and stats).
    pub fn timers(&self) -> usize {
        self.wheel.len()
    }
}
