//! The connection table's limits, counted across its shards: the table's
//! size, each owner's connections, and the half-open share of both.
//!
//! The counts are atomics ([`Quotas`]). A shard does not touch them for
//! every connection: it takes room in chunks into a [`Reserve`] of its
//! own (kept under its lock) and spends from that, giving a chunk back
//! when it holds two — as Linux's per-CPU counters do — so two threads
//! setting up connections in their own shards do not write one word
//! for each. No limit is ever passed: the global counts include what
//! the shards hold in reserve. The price: a VM may be refused while
//! other shards hold unused room of its quota — at most two chunks less
//! one per shard, and a chunk is at most a 512th of the limit (32), none
//! for small limits, which are then counted one by one. Half-open
//! connections (a small share) are counted one by one.
//!
//! Owners are local VMs' ports: port numbers below [`DIRECT`] have their
//! counts in an array, found without a lock; others in a map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use flowtable::PortId;
use rustc_hash::FxHashMap;

use super::{half_open_max, half_open_per_vm, CtRefused, Limits};

/// Owners whose counts are in the array.
const DIRECT: usize = 1024;

/// The most a chunk holds.
const MAX_CHUNK: usize = 32;

#[derive(Debug, Default)]
struct Owner {
    conns: AtomicUsize,
    half_open: AtomicUsize,
}

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Quotas {
    pub limits: Limits,
    total: AtomicUsize,
    half_open: AtomicUsize,
    direct: Box<[Owner]>,
    /// (Keyed by our own port numbers, not by tenants' bytes: a fast
    /// unkeyed hash.)
    others: RwLock<FxHashMap<PortId, Arc<Owner>>>,
    chunk_total: usize,
    chunk_owner: usize,
}

/// Room a shard holds: taken from the [`Quotas`] in chunks.
#[derive(Debug, Default)]
pub(super) struct Reserve {
    total: usize,
    owners: FxHashMap<PortId, usize>,
}

/// Add up to `want` to `n` without passing `max`; how much was added.
fn take(n: &AtomicUsize, want: usize, max: usize) -> usize {
    let mut got = 0;
    let _ = n.fetch_update(Relaxed, Relaxed, |v| {
        got = want.min(max.saturating_sub(v));
        (got > 0).then_some(v + got)
    });
    got
}

fn give(n: &AtomicUsize, k: usize) {
    let _ = n.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(k)));
}

impl Quotas {
    pub fn new(limits: Limits) -> Quotas {
        let chunk = |limit: usize| (limit / (super::SHARDS * 32)).min(MAX_CHUNK);
        Quotas {
            limits,
            total: AtomicUsize::new(0),
            half_open: AtomicUsize::new(0),
            direct: (0..DIRECT).map(|_| Owner::default()).collect(),
            others: RwLock::default(),
            chunk_total: chunk(limits.max),
            chunk_owner: chunk(limits.per_vm as usize),
        }
    }

    fn with_owner<R>(&self, o: PortId, f: impl FnOnce(&Owner) -> R) -> R {
        if let Some(w) = self.direct.get(usize::from(o.0)) {
            return f(w);
        }
        let found = self
            .others
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&o)
            .cloned();
        let w = found.unwrap_or_else(|| {
            let mut w = self.others.write().unwrap_or_else(|e| e.into_inner());
            Arc::clone(w.entry(o).or_default())
        });
        f(&w)
    }

    /// Would `owner` be refused a new connection? (Counting what the
    /// shards hold in reserve: an early answer, the shard's is final.)
    pub fn admit(&self, owner: Option<PortId>) -> Result<(), CtRefused> {
        if self.total.load(Relaxed) >= self.limits.max {
            return Err(CtRefused::Full);
        }
        let per_vm = self.limits.per_vm as usize;
        if owner.is_some_and(|o| self.with_owner(o, |w| w.conns.load(Relaxed)) >= per_vm) {
            return Err(CtRefused::Quota);
        }
        Ok(())
    }

    /// Charge a new connection of `owner` (half-open or not) to shard
    /// reserve `r`, or say why not (then nothing is charged).
    pub fn charge(
        &self,
        r: &mut Reserve,
        owner: Option<PortId>,
        half_open: bool,
    ) -> Result<(), CtRefused> {
        let charged = self.take_room(r, owner, half_open);
        if charged.is_err() {
            self.settle(r, owner);
        }
        charged
    }

    /// Where limits are counted one by one, a reserve holds nothing
    /// between connections: give back what a refused one took.
    fn settle(&self, r: &mut Reserve, owner: Option<PortId>) {
        if self.chunk_total == 0 {
            give(&self.total, r.total);
            r.total = 0;
        }
        if let (0, Some(o)) = (self.chunk_owner, owner) {
            if let Some(n) = r.owners.remove(&o) {
                self.with_owner(o, |w| give(&w.conns, n));
            }
        }
    }

    fn take_room(
        &self,
        r: &mut Reserve,
        owner: Option<PortId>,
        half_open: bool,
    ) -> Result<(), CtRefused> {
        if r.total == 0 {
            r.total = take(&self.total, self.chunk_total.max(1), self.limits.max);
            if r.total == 0 {
                return Err(CtRefused::Full);
            }
        }
        if let Some(o) = owner {
            let mine = r.owners.entry(o).or_default();
            if *mine == 0 {
                let max = self.limits.per_vm as usize;
                *mine = self.with_owner(o, |w| take(&w.conns, self.chunk_owner.max(1), max));
                if *mine == 0 {
                    return Err(CtRefused::Quota);
                }
            }
        }
        if half_open {
            if take(&self.half_open, 1, half_open_max(&self.limits)) == 0 {
                return Err(CtRefused::Full);
            }
            let per_vm = half_open_per_vm(&self.limits) as usize;
            if let Some(o) = owner {
                if self.with_owner(o, |w| take(&w.half_open, 1, per_vm)) == 0 {
                    give(&self.half_open, 1);
                    return Err(CtRefused::Quota);
                }
            }
        }
        r.total -= 1;
        if let Some(m) = owner.and_then(|o| r.owners.get_mut(&o)) {
            *m -= 1;
        }
        Ok(())
    }

    /// A connection charged to reserve `r` left: its room goes back to
    /// the reserve, and a chunk to the counts if the reserve holds two.
    pub fn refund(&self, r: &mut Reserve, owner: Option<PortId>, half_open: bool) {
        r.total += 1;
        let chunk = self.chunk_total.max(1);
        if r.total >= 2 * chunk || self.chunk_total == 0 {
            let back = if self.chunk_total == 0 {
                r.total
            } else {
                chunk
            };
            give(&self.total, back);
            r.total -= back;
        }
        if let Some(o) = owner {
            let chunk = self.chunk_owner.max(1);
            let mine = r.owners.entry(o).or_default();
            *mine += 1;
            if *mine >= 2 * chunk || self.chunk_owner == 0 {
                let back = if self.chunk_owner == 0 { *mine } else { chunk };
                *mine -= back;
                if *mine == 0 {
                    r.owners.remove(&o);
                }
                self.with_owner(o, |w| give(&w.conns, back));
            }
        }
        if half_open {
            self.half_open(owner, false);
        }
    }

    /// Charge a connection whatever the limits (one restored from a
    /// snapshot).
    pub fn force_charge(&self, owner: Option<PortId>, half_open: bool) {
        self.total.fetch_add(1, Relaxed);
        if let Some(o) = owner {
            self.with_owner(o, |w| w.conns.fetch_add(1, Relaxed));
        }
        if half_open {
            self.half_open(owner, true);
        }
    }

    /// A connection of `owner` went into (`true`) or out of the
    /// half-open ones.
    pub fn half_open(&self, owner: Option<PortId>, into: bool) {
        if into {
            self.half_open.fetch_add(1, Relaxed);
        } else {
            give(&self.half_open, 1);
        }
        if let Some(o) = owner {
            self.with_owner(o, |w| {
                if into {
                    w.half_open.fetch_add(1, Relaxed);
                } else {
                    give(&w.half_open, 1);
                }
            });
        }
    }

    pub fn half_open_len(&self) -> usize {
        self.half_open.load(Relaxed)
    }

    pub fn half_open_of(&self, owner: PortId) -> u32 {
        let n = self.with_owner(owner, |w| w.half_open.load(Relaxed));
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Each owner's connections, summed from shards' exact counts.
pub(super) fn add_owners(into: &mut HashMap<PortId, u32>, from: &FxHashMap<PortId, u32>) {
    for (o, n) in from {
        *into.entry(*o).or_default() += n;
    }
}
