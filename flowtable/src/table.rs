//! The flow table: open addressing, ordered linear probing (Robin Hood),
//! one 64-byte entry per flow.
//!
//! # Contract
//! * **Single writer.** The table belongs to one fast-path thread; lookups
//!   take `&mut self` only to bump the hit counters in the entry they just
//!   read. Nobody else touches it, so no lookup takes a lock. Other threads
//!   see its contents through messages to the owner (dumps, installs).
//! * **One hash per packet.** The caller hashes a key once
//!   ([`FlowTable::hash`]), may [`prefetch`](FlowTable::prefetch) the home
//!   slot for a whole batch, then probes with
//!   [`lookup_hashed`](FlowTable::lookup_hashed).
//! * **Bounded.** Capacity is fixed at construction; the slot array never
//!   grows. A full table refuses inserts with [`InsertError::Full`]: live
//!   flows are never evicted to make room, the new flow simply stays on the
//!   slow path until idle expiry frees space.
//! * **Generations.** Each entry records the table generation it was
//!   installed under. [`FlowTable::bump_generation`] makes every older
//!   entry miss (so its traffic is punted and recompiled under the new
//!   policy); reinstalling a key refreshes it in place, the sweep in
//!   [`FlowTable::expire`] removes the rest.
//!
//! # Layout
//! Entries sit sorted by home bucket with no gaps in a run (the Robin Hood
//! invariant), so a lookup stops as soon as it meets an entry that is
//! closer to its home than the key would be: misses are as cheap as hits.
//! The array has `MAX_PSL` spare slots after the last home bucket, so a
//! probe never wraps around. A 32-bit tag (the hash's high half) is
//! compared before the key.

use thiserror::Error;

use crate::action::{Action, ActionId, ActionTable};
use crate::key::{FlowHasher, FlowKey};
use crate::slots::{SlotArray, Zeroable};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("vswitch's flow table assumes 64-bit pointers");

/// Longest probe sequence an entry may have. Inserting a key that would
/// need more fails with [`InsertError::ProbeLimit`] (never seen below the
/// load factor the table keeps; it bounds the worst case of a lookup).
pub const MAX_PSL: u16 = 128;

/// Fraction of slots that may be occupied, as `LOAD_NUM / LOAD_DEN`.
/// At 1/2 a successful lookup probes 1.5 slots on average (linear
/// probing: ½(1 + 1/(1 − α))), so the two lines [`FlowTable::prefetch`]
/// fetches nearly always hold the entry. Measured at 1M flows: 2/3 load
/// (92 MiB) cost 83 ns per encapsulated packet, 1/2 (122 MiB) 54 ns —
/// probes past the prefetched lines are serial DRAM misses.
const LOAD_NUM: usize = 1;
const LOAD_DEN: usize = 2;

/// The largest capacity [`FlowTable::new`] accepts.
pub const MAX_CAPACITY: usize = 1 << 28;

/// Per-flow counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    /// Caller's clock (nanoseconds in the fast path) at the last hit, or at
    /// install time if the flow never hit.
    pub last_used: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
struct Slot {
    key: FlowKey,
    tag: u32,
    action: u32,
    generation: u32,
    /// Probe sequence length + 1; 0 marks an empty slot.
    psl: u16,
    _pad: [u8; 6],
    stats: FlowStats,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

// SAFETY: FlowKey, FlowStats and Slot are integers and arrays of integers
// only; the all-zero Slot is Slot::EMPTY (tested).
unsafe impl Zeroable for Slot {}

impl Slot {
    const EMPTY: Slot = Slot {
        key: FlowKey {
            ctx: 0,
            src_ip: 0,
            dst_ip: 0,
            src_port: 0,
            dst_port: 0,
            proto: 0,
            flags: 0,
            pad: 0,
        },
        tag: 0,
        action: 0,
        generation: 0,
        psl: 0,
        _pad: [0; 6],
        stats: FlowStats {
            packets: 0,
            bytes: 0,
            last_used: 0,
        },
    };
}

/// Why a table could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("flow table capacity {0} is out of range 1..={MAX_CAPACITY}")]
    OutOfRange(usize),
}

/// Why an insert was refused. The table is unchanged in every case.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InsertError {
    #[error("flow table is full ({capacity} flows)")]
    Full { capacity: usize },
    #[error("flow would need a probe sequence longer than {MAX_PSL} slots")]
    ProbeLimit,
    /// The flow's ingress port holds its share of the table (see
    /// [`FlowTable::set_port_share`]).
    #[error("port {port} holds its share of the flow table ({share} flows)")]
    ShareFull { port: u16, share: usize },
}

/// A successful lookup: where the entry is and what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub slot: u32,
    pub action: ActionId,
}

/// A read-only view of one entry.
#[derive(Clone, Copy, Debug)]
pub struct FlowEntry<'a> {
    pub key: FlowKey,
    pub action: &'a Action,
    pub action_id: ActionId,
    pub stats: FlowStats,
    /// False if the entry predates the current generation (it misses).
    pub current: bool,
}

/// Table-level counters, for observability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    /// Lookups that found their key but under an old generation.
    pub stale_lookups: u64,
    pub inserts: u64,
    pub updates: u64,
    pub insert_full: u64,
    pub insert_probe_limit: u64,
    pub removals: u64,
    pub expired: u64,
}

/// The exact-match flow table. See the module documentation.
pub struct FlowTable {
    slots: SlotArray<Slot>,
    /// Number of home buckets (`slots.len() - MAX_PSL`).
    n_home: u64,
    len: usize,
    capacity: usize,
    generation: u32,
    hasher: FlowHasher,
    actions: ActionTable,
    sweep_cursor: usize,
    counters: TableCounters,
    /// Flows per ingress port (by port id), and how many one may hold
    /// (0: no limit). Flows entering by the uplink (keyed by VNI) are no
    /// port's.
    per_port: Vec<u32>,
    port_share: usize,
    /// Entries with address-granularity keys ([`crate::KeyFlags::L3`]).
    l3_len: usize,
}

/// The port a flow is charged to: its ingress port, if it is one.
#[inline(always)]
fn port_of(key: &FlowKey) -> Option<usize> {
    match key.ingress() {
        Some(crate::Ingress::Port(p)) => Some(usize::from(p.0)),
        _ => None,
    }
}

#[inline(always)]
fn tag_of(hash: u64) -> u32 {
    // The high half of the hash; the shift leaves exactly 32 bits.
    #[allow(clippy::cast_possible_truncation)]
    let t = (hash >> 32) as u32;
    t
}

#[inline(always)]
fn prefetch_slot(p: *const Slot) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is only a hint to the cache; it does not
        // dereference the pointer and cannot fault whatever its value.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl FlowTable {
    /// A table that holds at most `capacity` flows, with a random hash seed.
    pub fn new(capacity: usize) -> Result<FlowTable, CapacityError> {
        FlowTable::with_hasher(capacity, FlowHasher::random())
    }

    /// A table with the given hasher (fixed seeds for tests, benchmarks, and
    /// restoring a table whose flows must keep their hashes).
    pub fn with_hasher(capacity: usize, hasher: FlowHasher) -> Result<FlowTable, CapacityError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(CapacityError::OutOfRange(capacity));
        }
        let n_home = (capacity * LOAD_DEN).div_ceil(LOAD_NUM).max(8);
        // Zeroed lazily, so a large table's owner can advise huge pages
        // (see `memory_region`) before the first touch.
        let slots = SlotArray::zeroed(n_home + usize::from(MAX_PSL));
        Ok(FlowTable {
            slots,
            n_home: n_home as u64,
            len: 0,
            capacity,
            generation: 0,
            hasher,
            actions: ActionTable::with_capacity(1024.min(capacity)),
            sweep_cursor: 0,
            counters: TableCounters::default(),
            per_port: Vec::new(),
            port_share: 0,
            l3_len: 0,
        })
    }

    /// Let no ingress port hold more than `share` flows (0: no limit), so
    /// one tenant filling the table degrades to punts alone, never the
    /// others. Flows already in stay.
    pub fn set_port_share(&mut self, share: usize) {
        self.port_share = share;
    }

    /// Whether any entry has an address-granularity key: only then is a
    /// miss looked up again at that granularity.
    #[inline(always)]
    pub fn has_l3(&self) -> bool {
        self.l3_len > 0
    }

    /// Flows charged to ingress port `port`.
    pub fn port_flows(&self, port: u16) -> usize {
        self.per_port
            .get(usize::from(port))
            .map_or(0, |&n| n as usize)
    }

    /// The hasher; its seed is part of the state a handover carries.
    /// Hash with `hasher` from now on; only while the table is empty
    /// (false otherwise). A handed-over table takes its predecessor's, so
    /// every flow keeps its hash: its VXLAN source port (no path change in
    /// the underlay) and its order (the dump, in slot order, then inserts
    /// in home order: each lands at the end of its run, nothing shifts).
    pub fn set_hasher(&mut self, hasher: FlowHasher) -> bool {
        if self.len > 0 {
            return false;
        }
        self.hasher = hasher;
        true
    }

    pub fn hasher(&self) -> &FlowHasher {
        &self.hasher
    }

    /// Hash a key for [`FlowTable::lookup_hashed`] and [`FlowTable::prefetch`].
    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash(key)
    }

    #[inline(always)]
    fn home(&self, tag: u32) -> usize {
        // Multiply-shift range reduction: (tag * n_home) >> 32 < n_home,
        // and n_home fits in usize on the 64-bit targets we build for.
        #[allow(clippy::cast_possible_truncation)]
        let h = ((u64::from(tag) * self.n_home) >> 32) as usize;
        h
    }

    /// Bring the first two slots of `hash`'s probe sequence towards the
    /// cache ahead of the probe.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        let home = self.home(tag_of(hash));
        // home + 1 exists: there are MAX_PSL slots after the last home.
        if let Some(s) = self.slots.get(home..home + 2) {
            prefetch_slot(&s[0]);
            prefetch_slot(&s[1]);
        }
    }

    /// Look a hashed key up and, on a hit, count `bytes` and stamp `now`.
    /// `hash` must be [`FlowTable::hash`] of `key`.
    #[inline(always)]
    pub fn lookup_hashed(&mut self, key: &FlowKey, hash: u64, bytes: u32, now: u64) -> Option<Hit> {
        let i = self.probe(key, hash)?;
        let generation = self.generation;
        let s = self.slots.get_mut(i)?;
        if s.generation != generation {
            self.counters.stale_lookups += 1;
            return None;
        }
        s.stats.packets += 1;
        s.stats.bytes += u64::from(bytes);
        s.stats.last_used = now;
        // i < slots.len() ≤ u32::MAX (capacity is capped well below).
        #[allow(clippy::cast_possible_truncation)]
        let slot = i as u32;
        Some(Hit {
            slot,
            action: ActionId(s.action),
        })
    }

    /// The slot holding `key` (whose hash is `hash`), if any. Stops at the
    /// first entry closer to its home than the key would be.
    #[inline(always)]
    fn probe(&self, key: &FlowKey, hash: u64) -> Option<usize> {
        let tag = tag_of(hash);
        let mut i = self.home(tag);
        let mut d: u16 = 1;
        loop {
            let s = self.slots.get(i)?;
            if s.psl < d {
                return None;
            }
            if s.tag == tag && s.key == *key {
                return Some(i);
            }
            i += 1;
            d += 1;
        }
    }

    /// Hash, look up and count one key.
    pub fn lookup(&mut self, key: &FlowKey, bytes: u32, now: u64) -> Option<Hit> {
        let h = self.hash(key);
        self.lookup_hashed(key, h, bytes, now)
    }

    /// Look up a batch: pass 1 hashes every key and prefetches its home
    /// slot, pass 2 probes. `bytes[i]` is counted for `keys[i]`; `out[i]`
    /// receives the result. Slices shorter than `keys` limit the batch.
    pub fn lookup_batch(
        &mut self,
        keys: &[FlowKey],
        bytes: &[u32],
        now: u64,
        out: &mut [Option<Hit>],
    ) {
        const B: usize = 64;
        let mut hashes = [0u64; B];
        for ((keys, bytes), out) in keys.chunks(B).zip(bytes.chunks(B)).zip(out.chunks_mut(B)) {
            for (h, k) in hashes.iter_mut().zip(keys) {
                *h = self.hash(k);
                self.prefetch(*h);
            }
            for (((k, h), b), o) in keys.iter().zip(&hashes).zip(bytes).zip(out.iter_mut()) {
                *o = self.lookup_hashed(k, *h, *b, now);
            }
        }
    }

    /// The action behind a hit.
    #[inline(always)]
    pub fn action(&self, id: ActionId) -> Option<&Action> {
        self.actions.get(id)
    }

    fn find(&self, key: &FlowKey) -> Option<usize> {
        self.probe(key, self.hash(key))
    }

    fn entry_at(&self, i: usize) -> Option<FlowEntry<'_>> {
        let s = self.slots.get(i).filter(|s| s.psl != 0)?;
        let action = self.actions.get(ActionId(s.action))?;
        Some(FlowEntry {
            key: s.key,
            action,
            action_id: ActionId(s.action),
            stats: s.stats,
            current: s.generation == self.generation,
        })
    }

    /// The entry for `key`, without counting a hit.
    pub fn get(&self, key: &FlowKey) -> Option<FlowEntry<'_>> {
        self.find(key).and_then(|i| self.entry_at(i))
    }

    /// Install `action` for `key` under the current generation. An existing
    /// entry keeps its counters and gets the new action.
    pub fn insert(
        &mut self,
        key: FlowKey,
        action: &Action,
        now: u64,
    ) -> Result<ActionId, InsertError> {
        let stats = FlowStats {
            packets: 0,
            bytes: 0,
            last_used: now,
        };
        self.place(key, |t| t.acquire(action), stats)
    }

    /// Put back flows a previous binary handed over: each of `actions`
    /// is interned once, then each flow (key, index into `actions`, its
    /// counters as they were) goes in without hashing its action again.
    /// Returns (inserted, refused): a flow whose index is out of range or
    /// that does not fit is refused.
    pub fn restore(
        &mut self,
        actions: &[Action],
        flows: impl Iterator<Item = (FlowKey, u32, FlowStats)>,
    ) -> (usize, usize) {
        let ids: Vec<ActionId> = actions.iter().map(|a| self.actions.acquire(a)).collect();
        let (mut ok, mut refused) = (0, 0);
        for (key, i, stats) in flows {
            let Some(&id) = ids.get(i as usize) else {
                refused += 1;
                continue;
            };
            match self.place(
                key,
                |t| {
                    t.add_ref(id);
                    id
                },
                stats,
            ) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        // The interning references (actions no flow took are freed).
        for id in ids {
            self.actions.release(id);
        }
        (ok, refused)
    }

    /// Insert or update `key` with the action `acquire` interns (called
    /// only once the key has a place); a new entry starts with `stats`.
    #[inline(always)]
    fn place(
        &mut self,
        key: FlowKey,
        acquire: impl FnOnce(&mut ActionTable) -> ActionId,
        stats: FlowStats,
    ) -> Result<ActionId, InsertError> {
        let tag = tag_of(self.hash(&key));
        let mut i = self.home(tag);
        let mut d: u16 = 1;
        // 1. Find the key, or the first slot whose resident is closer to
        //    its home than we would be (that is where the key belongs).
        loop {
            let s = &mut self.slots[i];
            if s.psl < d {
                break;
            }
            if s.tag == tag && s.key == key {
                let new = acquire(&mut self.actions);
                let old = std::mem::replace(&mut s.action, new.0);
                s.generation = self.generation;
                self.actions.release(ActionId(old));
                self.counters.updates += 1;
                return Ok(new);
            }
            i += 1;
            d += 1;
            if d > MAX_PSL {
                self.counters.insert_probe_limit += 1;
                return Err(InsertError::ProbeLimit);
            }
        }
        if self.len >= self.capacity {
            self.counters.insert_full += 1;
            return Err(InsertError::Full {
                capacity: self.capacity,
            });
        }
        let port = port_of(&key);
        if let Some(p) = port {
            if self.port_share > 0 && self.port_flows_at(p) >= self.port_share {
                return Err(InsertError::ShareFull {
                    port: u16::try_from(p).unwrap_or(u16::MAX),
                    share: self.port_share,
                });
            }
        }
        // 2. The run from i to the next empty slot shifts right by one;
        //    check that nobody in it goes past MAX_PSL before moving anything.
        let mut e = i;
        loop {
            let Some(s) = self.slots.get(e) else {
                self.counters.insert_probe_limit += 1;
                return Err(InsertError::ProbeLimit);
            };
            if s.psl == 0 {
                break;
            }
            if s.psl >= MAX_PSL {
                self.counters.insert_probe_limit += 1;
                return Err(InsertError::ProbeLimit);
            }
            e += 1;
        }
        self.slots.copy_within(i..e, i + 1);
        for s in &mut self.slots[i + 1..=e] {
            s.psl += 1;
        }
        let id = acquire(&mut self.actions);
        self.slots[i] = Slot {
            key,
            tag,
            action: id.0,
            generation: self.generation,
            psl: d,
            _pad: [0; 6],
            stats,
        };
        self.len += 1;
        if key.flags & crate::KeyFlags::L3 != 0 {
            self.l3_len += 1;
        }
        if let Some(p) = port {
            if p >= self.per_port.len() {
                // Once per port id: ids are at most u16::MAX.
                self.per_port.resize(p + 1, 0);
            }
            self.per_port[p] += 1;
        }
        self.counters.inserts += 1;
        Ok(id)
    }

    fn port_flows_at(&self, p: usize) -> usize {
        self.per_port.get(p).map_or(0, |&n| n as usize)
    }

    /// Remove the entry at `i` (occupied) by shifting its run back.
    fn remove_at(&mut self, i: usize) -> (FlowKey, ActionId, FlowStats) {
        let gone = self.slots[i];
        let mut j = i + 1;
        while j < self.slots.len() && self.slots[j].psl > 1 {
            j += 1;
        }
        self.slots.copy_within(i + 1..j, i);
        for s in &mut self.slots[i..j - 1] {
            s.psl -= 1;
        }
        self.slots[j - 1] = Slot::EMPTY;
        self.len -= 1;
        if gone.key.flags & crate::KeyFlags::L3 != 0 {
            self.l3_len -= 1;
        }
        if let Some(n) = port_of(&gone.key).and_then(|p| self.per_port.get_mut(p)) {
            *n = n.saturating_sub(1);
        }
        self.actions.release(ActionId(gone.action));
        (gone.key, ActionId(gone.action), gone.stats)
    }

    /// Remove `key`; returns its action and counters if it was present.
    pub fn remove(&mut self, key: &FlowKey) -> Option<(Action, FlowStats)> {
        let i = self.find(key)?;
        let action = self.actions.get(ActionId(self.slots[i].action)).cloned()?;
        let (_, _, stats) = self.remove_at(i);
        self.counters.removals += 1;
        Some((action, stats))
    }

    /// Keep only the entries for which `keep` is true; returns how many were
    /// removed. A full scan: for control-plane changes, not per packet.
    pub fn retain(&mut self, mut keep: impl FnMut(&FlowKey, &Action) -> bool) -> usize {
        let mut removed = 0;
        let mut i = 0;
        while i < self.slots.len() {
            let s = &self.slots[i];
            let drop = s.psl != 0
                && match self.actions.get(ActionId(s.action)) {
                    Some(a) => !keep(&s.key, a),
                    None => true,
                };
            if drop {
                // The next entry of the run moved into slot i: look again.
                self.remove_at(i);
                removed += 1;
            } else {
                i += 1;
            }
        }
        self.counters.removals += removed as u64;
        removed
    }

    /// Incremental idle expiry: examine up to `budget` slots from where the
    /// last call stopped, removing entries idle for at least `idle` (by the
    /// caller's clock) and entries of an old generation. `expired` sees
    /// each removed flow's key, action and final counters. Cost is bounded by
    /// `budget`, so the owner can call it once per poll without stalling.
    pub fn expire(
        &mut self,
        now: u64,
        idle: u64,
        budget: usize,
        mut expired: impl FnMut(&FlowKey, &Action, &FlowStats),
    ) -> usize {
        let n = self.slots.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            if self.sweep_cursor >= n {
                self.sweep_cursor = 0;
            }
            let s = &self.slots[self.sweep_cursor];
            let stale = s.generation != self.generation;
            if s.psl != 0 && (stale || now.saturating_sub(s.stats.last_used) >= idle) {
                let action = self.actions.get(ActionId(s.action)).copied();
                let (key, _, stats) = self.remove_at(self.sweep_cursor);
                if let Some(a) = action {
                    expired(&key, &a, &stats);
                }
                removed += 1;
            } else {
                self.sweep_cursor += 1;
            }
        }
        self.counters.expired += removed as u64;
        removed
    }

    /// Start a new generation: every existing entry misses from now on
    /// until it is reinstalled or swept.
    pub fn bump_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }

    /// The current generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// All entries, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = FlowEntry<'_>> + '_ {
        (0..self.slots.len()).filter_map(|i| self.entry_at(i))
    }

    /// Number of flows held (current or stale).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no flow is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most flows the table will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Size of one entry in bytes.
    pub const fn entry_size() -> usize {
        std::mem::size_of::<Slot>()
    }

    /// Start and length in bytes of the slot array, for memory advice
    /// (huge pages) by an owner that may make system calls. The table
    /// itself never makes one.
    pub fn memory_region(&self) -> (*const u8, usize) {
        (self.slots.as_ptr().cast::<u8>(), self.memory_bytes())
    }

    /// Bytes of the slot array (the table's memory, fixed at construction).
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * Self::entry_size()
    }

    /// Table-level counters.
    pub fn counters(&self) -> TableCounters {
        self.counters
    }

    /// Number of distinct actions in use.
    pub fn action_count(&self) -> usize {
        self.actions.len()
    }

    /// Longest probe sequence currently in the table (diagnostics).
    pub fn max_probe_len(&self) -> u16 {
        self.slots.iter().map(|s| s.psl).max().unwrap_or(0)
    }
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("generation", &self.generation)
            .field("actions", &self.actions.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
