//! The connection table as [`SHARDS`] shards, each behind its own lock,
//! so coprocessor threads setting up different connections rarely wait
//! for each other (the shared state's lock is only read for a decision).
//!
//! A key belongs to the shard [`dpif::steer`] names: both keys of a
//! connection that is not translated name the same one, and the fast
//! path punts a connection's misses to the coprocessor thread that keeps
//! its shard, so a shard's locks and memory stay with one thread (on two
//! cores, a line written by one and read by the other costs more than
//! the rest of a decision). A connection lives in the shard of its
//! original key (its *home*, also written into its id); when its other
//! key belongs elsewhere (NAT), that shard holds a *foreign* entry
//! pointing home, so a miss on either key finds the connection with one
//! lock, or two in turn. Whatever touches two or three shards at once
//! (adding, removing, re-keying a connection) locks them in ascending
//! order, so two threads never wait on each other in a cycle. Limits
//! are the whole table's, counted across shards by [`super::quota`].

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use dpif::steer;
use flowtable::{FlowKey, PortId};
use hashbrown::HashTable;

use super::quota::Quotas;
use super::table::{shard_of_id, Table};
use super::{Conn, CtCounters, CtRefused, Expiry, Limits, Side, Timeouts};

pub use dpif::steer::SHARDS;

#[derive(Debug)]
struct Shard {
    table: Table,
    /// Keys of this shard whose connections live in another, with the
    /// connection's id and the key's side.
    foreign: HashTable<(FlowKey, u64, u8)>,
    hasher: RandomState,
}

impl Shard {
    /// The connection and side of foreign key `key` (hashed `h`).
    fn foreign(&self, key: &FlowKey, h: u64) -> Option<(u64, usize)> {
        let e = self.foreign.find(h, |e| e.0 == *key)?;
        Some((e.1, usize::from(e.2)))
    }

    fn add_foreign(&mut self, key: FlowKey, h: u64, id: u64, side: usize) {
        let hasher = &self.hasher;
        self.foreign
            .insert_unique(h, (key, id, u8::from(side == 1)), |e| hasher.hash_one(e.0));
    }

    /// Forget foreign key `key` if it is connection `id`'s.
    fn forget_foreign(&mut self, key: &FlowKey, h: u64, id: u64) {
        if let Ok(e) = self.foreign.find_entry(h, |e| e.0 == *key && e.1 == id) {
            e.remove();
        }
    }

    /// Is `key` (hashed `h`) a key of any connection, of this shard or
    /// not (`home`: this is the shard the connection would live in)?
    fn taken(&self, key: &FlowKey, h: u64, home: bool) -> bool {
        self.foreign(key, h).is_some() || (!home && self.table.has_key(key, h))
    }
}

/// A lock on its own cache line (two threads locking neighbouring shards
/// do not share one).
#[derive(Debug)]
#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// See the module documentation.
#[derive(Debug)]
pub struct Conntrack {
    shards: Box<[Padded]>,
    quotas: Arc<Quotas>,
    hasher: RandomState,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

/// A connection found by key, its shard locked until this is dropped.
pub struct Found<'a> {
    shard: MutexGuard<'a, Shard>,
    pub id: u64,
    pub side: usize,
}

impl Found<'_> {
    pub fn conn(&self) -> Option<&Conn> {
        self.shard.table.get(self.id)
    }

    pub fn conn_mut(&mut self) -> Option<&mut Conn> {
        self.shard.table.get_mut(self.id)
    }

    /// A packet of side `side` was seen by the coprocessor (a miss).
    pub fn seen(&mut self, now: u64) {
        self.shard.table.seen(self.id, self.side, now);
    }

    /// A TCP segment with control flags `flags` on this side.
    pub fn tcp_event(&mut self, flags: u8, now: u64) {
        self.shard.table.tcp_event(self.id, self.side, flags, now);
    }

    /// The counters of the connection's shard.
    pub fn counters(&mut self) -> &mut CtCounters {
        &mut self.shard.table.counters
    }
}

fn relock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn shard_mut(p: &mut Padded) -> &mut Shard {
    p.0.get_mut().unwrap_or_else(|e| e.into_inner())
}

impl Conntrack {
    pub fn new(timeouts: Timeouts, limits: Limits, now: u64) -> Conntrack {
        let quotas = Arc::new(Quotas::new(limits));
        let hasher = RandomState::new();
        let shards = (0..SHARDS)
            .filter_map(|i| u32::try_from(i).ok())
            .map(|i| {
                Padded(Mutex::new(Shard {
                    table: Table::new(i, timeouts, Arc::clone(&quotas), hasher.clone(), now),
                    foreign: HashTable::new(),
                    hasher: hasher.clone(),
                }))
            })
            .collect();
        Conntrack {
            shards,
            quotas,
            hasher,
            timeouts,
            limits,
        }
    }

    /// A key's hash in the shards' indexes. (Keys come from tenants: the
    /// hash is randomly keyed, so nobody can aim collisions.)
    fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard `key` belongs to ([`dpif::steer`]: the one the
    /// coprocessor thread its misses go to keeps).
    pub fn shard_of(&self, key: &FlowKey) -> usize {
        steer::shard(key)
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        relock(&self.shards[i].0)
    }

    /// Lock the distinct shards of `set`, in ascending order.
    fn lock_set(&self, mut set: [usize; 3]) -> [Option<(usize, MutexGuard<'_, Shard>)>; 3] {
        set.sort_unstable();
        let mut out = [None, None, None];
        for (i, s) in set.into_iter().enumerate() {
            if i == 0 || set[i - 1] != s {
                out[i] = Some((s, self.lock(s)));
            }
        }
        out
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Shard> + '_ {
        self.shards.iter_mut().map(shard_mut)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|p| relock(&p.0).table.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections held by each owner.
    pub fn per_owner(&self) -> HashMap<PortId, u32> {
        let mut all = HashMap::new();
        for p in self.shards.iter() {
            super::quota::add_owners(&mut all, relock(&p.0).table.owners());
        }
        all
    }

    /// Half-open connections held by `owner`.
    pub fn half_open_of(&self, owner: PortId) -> u32 {
        self.quotas.half_open_of(owner)
    }

    /// Half-open connections in all.
    pub fn half_open_len(&self) -> usize {
        self.quotas.half_open_len()
    }

    /// Would `owner` be refused a new connection?
    pub fn admit(&self, owner: Option<PortId>) -> Result<(), CtRefused> {
        self.quotas.admit(owner)
    }

    /// The connection and side a fast-path key belongs to.
    pub fn lookup(&self, key: &FlowKey) -> Option<(u64, usize)> {
        let h = self.hash(key);
        let s = self.lock(steer::shard(key));
        s.table.lookup(key, h).or_else(|| s.foreign(key, h))
    }

    /// The connection `key` belongs to, its shard locked.
    pub fn find(&self, key: &FlowKey) -> Option<Found<'_>> {
        let h = self.hash(key);
        let s = self.lock(steer::shard(key));
        if let Some((id, side)) = s.table.lookup(key, h) {
            return Some(Found { shard: s, id, side });
        }
        let (id, side) = s.foreign(key, h)?;
        drop(s);
        let shard = self.home(id)?;
        // Removed while no lock was held: not found.
        let c = shard.table.get(id)?;
        (c.sides[side].key == *key).then_some(Found { shard, id, side })
    }

    pub fn get(&mut self, id: u64) -> Option<&Conn> {
        let p = self.shards.get_mut(shard_of_id(id))?;
        shard_mut(p).table.get(id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Conn> {
        let p = self.shards.get_mut(shard_of_id(id))?;
        shard_mut(p).table.get_mut(id)
    }

    /// Every connection with its id.
    pub fn iter(&mut self) -> impl Iterator<Item = (u64, &Conn)> + '_ {
        self.all_mut().flat_map(|s| s.table.iter())
    }

    /// Change every connection with `f` (each shard locked in turn; its
    /// keys must stay as they are).
    pub fn update_all(&self, mut f: impl FnMut(&mut Conn)) {
        for p in self.shards.iter() {
            let mut s = relock(&p.0);
            let ids: Vec<u64> = s.table.iter().map(|(id, _)| id).collect();
            for id in ids {
                if let Some(c) = s.table.get_mut(id) {
                    f(c);
                }
            }
        }
    }

    /// Call `f` on every connection (each shard locked in turn).
    pub fn for_each(&self, mut f: impl FnMut(u64, &Conn)) {
        for p in self.shards.iter() {
            for (id, c) in relock(&p.0).table.iter() {
                f(id, c);
            }
        }
    }

    /// Every connection, for a snapshot (each shard locked in turn), in
    /// an order of their own (by original key), not of their shards: the
    /// same connections make the same snapshot.
    pub fn to_parts(&self) -> Vec<Conn> {
        let mut out = Vec::with_capacity(self.len());
        for p in self.shards.iter() {
            out.extend(relock(&p.0).table.iter().map(|(_, c)| c.clone()));
        }
        out.sort_unstable_by(|a, b| a.sides[0].key.as_bytes().cmp(b.sides[0].key.as_bytes()));
        out
    }

    /// Add `conn`, charged to `owner`.
    pub fn insert(&self, conn: Conn, owner: Option<PortId>, now: u64) -> Result<u64, CtRefused> {
        let keys = conn.sides.map(|s| s.key);
        let h = keys.map(|k| self.hash(&k));
        let at = keys.map(|k| steer::shard(&k));
        let home = at[0];
        let half = super::half_open(&conn.state);
        let mut locked = self.lock_set([home, at[1], home]);
        let clash = (0..2).any(|i| {
            held(&mut locked, at[i]).is_some_and(|g| g.taken(&keys[i], h[i], at[i] == home))
        });
        let g = held(&mut locked, home).ok_or(CtRefused::Full)?;
        g.table.charge(owner, half)?;
        match g.table.insert(conn, h, owner, now, clash) {
            Ok(id) => {
                if at[1] != home {
                    if let Some(g) = held(&mut locked, at[1]) {
                        g.add_foreign(keys[1], h[1], id, 1);
                    }
                }
                Ok(id)
            }
            Err(e) => {
                g.table.uncharge(owner, half);
                Err(e)
            }
        }
    }

    /// Remove a connection; the caller frees its NAT binding and flows.
    pub fn remove(&self, id: u64) -> Option<Conn> {
        let home = shard_of_id(id);
        let keys = self.home(id)?.table.get(id)?.sides.map(|s| s.key);
        let h = keys.map(|k| self.hash(&k));
        let at = keys.map(|k| steer::shard(&k));
        // Keys change only under the state's write lock (`replace_sides`),
        // which no holder of `&self` here can be racing.
        let mut locked = self.lock_set([home, at[0], at[1]]);
        let conn = held(&mut locked, home)?.table.remove(id)?;
        for i in 0..2 {
            if at[i] != home {
                if let Some(g) = held(&mut locked, at[i]) {
                    g.forget_foreign(&keys[i], h[i], id);
                }
            }
        }
        Some(conn)
    }

    /// Remove the connection found.
    pub fn remove_found(&self, found: Found<'_>) -> Option<Conn> {
        let id = found.id;
        drop(found);
        self.remove(id)
    }

    /// Give connection `id` new sides (recompiled after a topology
    /// change): its keys are re-indexed; false (nothing changed) if a new
    /// key belongs to another connection.
    pub fn replace_sides(&mut self, id: u64, sides: [Side; 2]) -> bool {
        let home = shard_of_id(id);
        let Some(old) = self.get(id).map(|c| c.sides.map(|s| s.key)) else {
            return false;
        };
        let new = sides.map(|s| s.key);
        let hn = new.map(|k| self.hash(&k));
        let taken = (0..2).any(|i| {
            let s = steer::shard(&new[i]);
            let g = shard_mut(&mut self.shards[s]);
            g.foreign(&new[i], hn[i]).is_some_and(|(o, _)| o != id)
                || (s != home && g.table.lookup(&new[i], hn[i]).is_some())
        });
        if taken
            || !shard_mut(&mut self.shards[home])
                .table
                .replace_sides(id, sides)
        {
            return false;
        }
        for k in old {
            let h = self.hash(&k);
            shard_mut(&mut self.shards[steer::shard(&k)]).forget_foreign(&k, h, id);
        }
        for (side, (k, h)) in new.into_iter().zip(hn).enumerate() {
            let s = steer::shard(&k);
            if s != home {
                shard_mut(&mut self.shards[s]).add_foreign(k, h, id, side);
            }
        }
        true
    }

    /// Connection `id`'s shard, locked.
    fn home(&self, id: u64) -> Option<MutexGuard<'_, Shard>> {
        self.shards.get(shard_of_id(id)).map(|p| relock(&p.0))
    }

    /// A packet of side `side` was seen by the coprocessor (a miss).
    pub fn seen(&self, id: u64, side: usize, now: u64) {
        if let Some(mut s) = self.home(id) {
            s.table.seen(id, side, now);
        }
    }

    /// A TCP segment with control flags `flags` on side `side`.
    pub fn tcp_event(&self, id: u64, side: usize, flags: u8, now: u64) {
        if let Some(mut s) = self.home(id) {
            s.table.tcp_event(id, side, flags, now);
        }
    }

    /// The fast path removed side `key` after it went idle.
    pub fn flow_gone(&self, key: &FlowKey, used: (u64, u64), thread: u16) {
        if let Some(mut f) = self.find(key) {
            let (id, side) = (f.id, f.side);
            f.shard.table.flow_gone(id, side, used, thread);
        }
    }

    /// The fast path's answer to a check: each key's (last use, packets),
    /// `None` for a flow no thread holds, and the threads holding it.
    /// Returns the connection if it ended.
    pub fn checked(
        &self,
        id: u64,
        keys: [Option<FlowKey>; 2],
        used: [Option<(u64, u64)>; 2],
        on: [u64; 2],
        now: u64,
    ) -> Option<Conn> {
        let ended = self.home(id)?.table.checked(id, keys, used, on, now)?;
        // Gone from its home: its foreign keys now, each shard in turn (a
        // lookup meanwhile finds the id gone).
        for s in &ended.sides {
            let h = self.hash(&s.key);
            if steer::shard(&s.key) != shard_of_id(id) {
                self.lock(steer::shard(&s.key))
                    .forget_foreign(&s.key, h, id);
            }
        }
        Some(ended)
    }

    /// Advance the timers to `now`.
    pub fn tick(&mut self, now: u64) -> Vec<Expiry> {
        let mut out = Vec::new();
        for p in self.shards.iter_mut() {
            out.extend(shard_mut(p).table.tick(now));
        }
        for e in &out {
            if let Expiry::Ended(c) = e {
                // Its keys are nobody else's: any foreign entry for
                // them was this connection's.
                for side in &c.sides {
                    let h = self.hash(&side.key);
                    let g = shard_mut(&mut self.shards[steer::shard(&side.key)]);
                    if let Ok(e) = g.foreign.find_entry(h, |e| e.0 == side.key) {
                        e.remove();
                    }
                }
            }
        }
        out
    }

    /// Counters, summed over the shards.
    pub fn counters(&self) -> CtCounters {
        let mut t = CtCounters::default();
        for p in self.shards.iter() {
            t.add(&relock(&p.0).table.counters);
        }
        t
    }

    /// Change the counters (kept in the first shard).
    pub fn count(&mut self, f: impl FnOnce(&mut CtCounters)) {
        f(&mut shard_mut(&mut self.shards[0]).table.counters);
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
        let per = conns.len() / SHARDS + 1;
        for s in ct.all_mut() {
            s.table.reserve(per + per / 4);
        }
        for c in conns {
            let keys = c.sides.map(|s| s.key);
            let h = keys.map(|k| ct.hash(&k));
            let at = keys.map(|k| steer::shard(&k));
            let home = at[0];
            // A snapshot with one key twice (not one this switch wrote):
            // the later connection is left out.
            let clash = (0..2)
                .any(|i| shard_mut(&mut ct.shards[at[i]]).taken(&keys[i], h[i], at[i] == home));
            let Some(id) = shard_mut(&mut ct.shards[home])
                .table
                .place(c, h, clash, now)
            else {
                continue;
            };
            if at[1] != home {
                shard_mut(&mut ct.shards[at[1]]).add_foreign(keys[1], h[1], id, 1);
            }
        }
        ct.count(|c| *c = counters);
        ct
    }

    /// Timers waiting (for tests and stats).
    pub fn timers(&self) -> usize {
        self.shards
            .iter()
            .map(|p| relock(&p.0).table.timers())
            .sum()
    }

    /// Every key indexed once, where lookups look for it (for tests).
    #[cfg(test)]
    pub fn check_index(&mut self) {
        let mut conns = Vec::new();
        let mut foreign = 0;
        for s in self.all_mut() {
            assert_eq!(s.table.index_len(), 2 * s.table.len());
            foreign += s.foreign.len();
            conns.extend(s.table.iter().map(|(id, c)| (id, c.sides.map(|s| s.key))));
        }
        let mut away = 0;
        for (id, keys) in conns {
            for (side, k) in keys.iter().enumerate() {
                assert_eq!(self.lookup(k), Some((id, side)));
                away += usize::from(self.shard_of(k) != shard_of_id(id));
            }
        }
        assert_eq!(foreign, away, "no foreign entry left behind");
    }

    /// Connections per shard (for `ctl` and tests: how evenly they spread).
    pub fn shard_lens(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|p| relock(&p.0).table.len())
            .collect()
    }
}

/// The guard of shard `s` among those locked.
fn held<'g, 'a>(
    locked: &'g mut [Option<(usize, MutexGuard<'a, Shard>)>; 3],
    s: usize,
) -> Option<&'g mut Shard> {
    locked
        .iter_mut()
        .flatten()
        .find(|(i, _)| *i == s)
        .map(|(_, g)| &mut **g)
}
