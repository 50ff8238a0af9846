//! The connection table's limits, counted across its shards: the table's
//! size, the half-open share, and each owner's connections and half-open
//! ones. The counts are atomics, so threads setting up connections in
//! different shards do not take a lock to be counted: a connection is
//! charged (add, check, take back if over) before it goes into its shard,
//! and refunded when it leaves, so no limit is ever passed — two threads
//! at a limit may both be refused where one would have fitted, which
//! only a table at its limit sees.
//!
//! Owners are local VMs' ports: at most one entry per port number, kept
//! for the switch's life.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use flowtable::PortId;
use rustc_hash::FxHashMap;

use super::{half_open_max, half_open_per_vm, CtRefused, Limits};

#[derive(Debug, Default)]
struct Owner {
    conns: AtomicU32,
    half_open: AtomicU32,
}

#[derive(Debug)]
pub(super) struct Quotas {
    pub limits: Limits,
    total: AtomicUsize,
    half_open: AtomicUsize,
    /// (Keyed by our own port numbers, not by tenants' bytes: a fast
    /// unkeyed hash.)
    owners: RwLock<FxHashMap<PortId, Arc<Owner>>>,
}

/// Add one to `n` unless it is at `max` already.
fn take_usize(n: &AtomicUsize, max: usize) -> bool {
    n.fetch_update(Relaxed, Relaxed, |v| (v < max).then_some(v + 1))
        .is_ok()
}

fn take_u32(n: &AtomicU32, max: u32) -> bool {
    n.fetch_update(Relaxed, Relaxed, |v| (v < max).then_some(v + 1))
        .is_ok()
}

fn give_usize(n: &AtomicUsize) {
    let _ = n.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
}

fn give_u32(n: &AtomicU32) {
    let _ = n.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
}

impl Quotas {
    pub fn new(limits: Limits) -> Quotas {
        Quotas {
            limits,
            total: AtomicUsize::new(0),
            half_open: AtomicUsize::new(0),
            owners: RwLock::default(),
        }
    }

    fn owner(&self, o: PortId) -> Arc<Owner> {
        let found = self
            .owners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&o)
            .cloned();
        found.unwrap_or_else(|| {
            let mut w = self.owners.write().unwrap_or_else(|e| e.into_inner());
            Arc::clone(w.entry(o).or_default())
        })
    }

    fn owner_counts(&self, o: PortId) -> (u32, u32) {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        owners.get(&o).map_or((0, 0), |w| {
            (w.conns.load(Relaxed), w.half_open.load(Relaxed))
        })
    }

    /// Would `owner` be refused a new connection?
    pub fn admit(&self, owner: Option<PortId>) -> Result<(), CtRefused> {
        if self.total.load(Relaxed) >= self.limits.max {
            return Err(CtRefused::Full);
        }
        if owner.is_some_and(|o| self.owner_counts(o).0 >= self.limits.per_vm) {
            return Err(CtRefused::Quota);
        }
        Ok(())
    }

    /// Charge a new connection of `owner` (half-open or not), or say why
    /// not (then nothing is charged). A handshake takes room from the
    /// half-open share as well.
    pub fn charge(&self, owner: Option<PortId>, half_open: bool) -> Result<(), CtRefused> {
        if !take_usize(&self.total, self.limits.max) {
            return Err(CtRefused::Full);
        }
        if half_open && !take_usize(&self.half_open, half_open_max(&self.limits)) {
            give_usize(&self.total);
            return Err(CtRefused::Full);
        }
        if let Some(o) = owner {
            let w = self.owner(o);
            let ok = take_u32(&w.conns, self.limits.per_vm);
            if !ok || (half_open && !take_u32(&w.half_open, half_open_per_vm(&self.limits))) {
                if ok {
                    give_u32(&w.conns);
                }
                give_usize(&self.total);
                if half_open {
                    give_usize(&self.half_open);
                }
                return Err(CtRefused::Quota);
            }
        }
        Ok(())
    }

    /// Charge a connection whatever the limits (one restored from a
    /// snapshot).
    pub fn force_charge(&self, owner: Option<PortId>, half_open: bool) {
        self.total.fetch_add(1, Relaxed);
        if half_open {
            self.half_open.fetch_add(1, Relaxed);
        }
        if let Some(o) = owner {
            let w = self.owner(o);
            w.conns.fetch_add(1, Relaxed);
            if half_open {
                w.half_open.fetch_add(1, Relaxed);
            }
        }
    }

    /// A connection charged with [`Quotas::charge`] left.
    pub fn refund(&self, owner: Option<PortId>, half_open: bool) {
        give_usize(&self.total);
        if half_open {
            give_usize(&self.half_open);
        }
        if let Some(o) = owner {
            let w = self.owner(o);
            give_u32(&w.conns);
            if half_open {
                give_u32(&w.half_open);
            }
        }
    }

    /// A connection of `owner` went into (`true`) or out of the
    /// half-open ones.
    pub fn half_open(&self, owner: Option<PortId>, into: bool) {
        let step = |n: &AtomicU32| {
            if into {
                n.fetch_add(1, Relaxed);
            } else {
                give_u32(n);
            }
        };
        if into {
            self.half_open.fetch_add(1, Relaxed);
        } else {
            give_usize(&self.half_open);
        }
        if let Some(o) = owner {
            step(&self.owner(o).half_open);
        }
    }

    pub fn len(&self) -> usize {
        self.total.load(Relaxed)
    }

    pub fn half_open_len(&self) -> usize {
        self.half_open.load(Relaxed)
    }

    pub fn half_open_of(&self, owner: PortId) -> u32 {
        self.owner_counts(owner).1
    }

    /// Connections of each owner holding any.
    pub fn per_owner(&self) -> HashMap<PortId, u32> {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        owners
            .iter()
            .map(|(o, w)| (*o, w.conns.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
