//! State every coprocessor thread of a switch shares: the topology, DHCP
//! leases, the security-group policy, the connection table, the SNAT pool,
//! the external network's neighbours and the load-balanced services.
//!
//! It sits behind one reader-writer lock ([`SharedLock`]), whose read
//! side is split in slots, one per coprocessor thread: a decision takes
//! its own thread's slot, so decisions on several threads run at once
//! without writing to one shared word. A change (an `apply` batch, a
//! policy change and its revalidation, the timers' sweep, a handover's
//! snapshot) holds it for writing, so it is atomic with respect to every
//! decision: one made under the old topology and policy is committed
//! before the change starts. What a decision writes has its own locks
//! inside: the connection table by shard ([`crate::conntrack`]), and
//! short ones for the SNAT pool, the external neighbours, the leases,
//! the services and the refusal counts; the decision counters are one
//! slot per thread.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use flowtable::{Mac, PortId};

use crate::acl::Policy;
use crate::conntrack::{Conn, Conntrack, Limits, Timeouts};
use crate::dhcp::Leases;
use crate::nat::NatPool;
use crate::topology::Topology;
use dpif::{DropCause, Update};

/// Per-VM refusals, for `ctl` (who is being denied what).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmDrops {
    pub acl_denied: u64,
    pub ct_refused: u64,
    pub nat_refused: u64,
}

/// A reader slot of [`SharedLock`], on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct ReadSlot(RwLock<()>);

/// Reader slots of [`SharedLock`] (threads beyond share them).
const READ_SLOTS: usize = 16;

/// The shared state as the threads hold it: a reader-writer lock whose
/// read side is one lock per slot (a "big-reader" lock). A reader locks
/// its slot for reading; a writer locks every slot for writing, in
/// order. Readers on different slots touch no common memory; a writer
/// (an `apply`, the timers' sweep) pays one lock per slot.
pub struct SharedLock {
    slots: Box<[ReadSlot]>,
    data: UnsafeCell<Shared>,
}

// `data` is reached only through the guards below: shared (`&`) while one
// slot is read-locked, which excludes a writer (it holds every slot
// write-locked), and exclusive (`&mut`) while every slot is write-locked,
// which excludes every reader and every other writer.
// SAFETY: so `&` and `&mut` never meet; and `Shared` is `Sync` (asserted
// below: its own interior mutability is locks and atomics).
unsafe impl Sync for SharedLock {}

/// What the `Sync` impl above relies on: `Shared` may be shared.
const _: fn() = || {
    fn sync<T: Sync + Send>() {}
    sync::<Shared>();
};

impl std::fmt::Debug for SharedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLock").finish_non_exhaustive()
    }
}

/// The shared state, read-locked on one slot.
pub struct ReadGuard<'a> {
    _slot: RwLockReadGuard<'a, ()>,
    data: &'a Shared,
}

/// The shared state, write-locked on every slot.
pub struct WriteGuard<'a> {
    _slots: Vec<RwLockWriteGuard<'a, ()>>,
    lock: &'a SharedLock,
}

impl SharedLock {
    pub fn new(shared: Shared) -> SharedLock {
        SharedLock {
            slots: (0..READ_SLOTS).map(|_| ReadSlot::default()).collect(),
            data: UnsafeCell::new(shared),
        }
    }

    /// Read-lock slot `slot` (modulo the slots there are). A poisoned
    /// lock only means another thread panicked mid-update; the tables
    /// themselves stay usable.
    pub fn read(&self, slot: usize) -> ReadGuard<'_> {
        let s = &self.slots[slot % self.slots.len()];
        let g = s.0.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a slot is read-locked: no writer holds every slot (see
        // the `Sync` impl), so nothing has `&mut` to the data while the
        // guard lives.
        let data = unsafe { &*self.data.get() };
        ReadGuard { _slot: g, data }
    }

    /// Write-lock every slot, in order.
    pub fn write(&self) -> WriteGuard<'_> {
        let slots = self
            .slots
            .iter()
            .map(|s| s.0.write().unwrap_or_else(|e| e.into_inner()))
            .collect();
        WriteGuard {
            _slots: slots,
            lock: self,
        }
    }

    /// The state, for its owner (no other reference exists).
    pub fn into_inner(self) -> Shared {
        self.data.into_inner()
    }
}

impl Deref for ReadGuard<'_> {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        self.data
    }
}

impl Deref for WriteGuard<'_> {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        // SAFETY: every slot is write-locked by this guard: no reader and
        // no other writer exists while it lives.
        unsafe { &*self.lock.data.get() }
    }
}

impl DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shared {
        // SAFETY: as for `deref`; `&mut self` makes this the only
        // reference taken through the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

/// Lock `m`. A poisoned lock only means another thread panicked
/// mid-update; the tables themselves stay usable.
pub fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `m`'s contents, for the holder of the write lock (no locking).
pub fn inner<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|e| e.into_inner())
}

/// Decision counters: one slot per coprocessor thread, each on its own
/// cache line.
#[derive(Debug)]
#[repr(align(128))]
struct CounterSlot(Mutex<crate::Stats>);

/// Slots of decision counters (threads beyond share them).
const COUNTER_SLOTS: usize = 16;

/// See the module documentation.
#[derive(Debug)]
pub struct Shared {
    /// The tenant world. Copy on write: a view or a probe holds a
    /// snapshot; a change made while nobody holds one is in place.
    pub topo: Arc<Topology>,
    pub leases: Mutex<Leases>,
    pub policy: Policy,
    pub ct: Conntrack,
    pub nat: Mutex<Option<NatPool>>,
    /// External hosts (and the external gateway) resolved by ARP.
    pub ext_neighbors: Mutex<crate::ext_neighbors::ExtNeighbors>,
    pub vm_drops: Mutex<HashMap<PortId, VmDrops>>,
    /// Load-balanced services (VIPs and their Maglev tables).
    services: Mutex<crate::services::Services>,
    /// The services' addresses, kept beside them (see
    /// [`Shared::services_changed`]): a decision asks whether an address
    /// is a VIP without locking the services.
    vip_addresses: crate::services::VipAddresses,
    /// Bumped by every change of topology or policy; decisions carry the
    /// version they were made under.
    pub version: u64,
    /// Decisions and drops of all coprocessor threads.
    counters: Box<[CounterSlot]>,
    next_slot: AtomicUsize,
}

/// Everything [`Shared`] holds, as plain data (what a live handover
/// carries to the next binary).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedState {
    pub topology: crate::topology::TopologyParts,
    pub leases: Leases,
    pub groups: Vec<crate::acl::SecurityGroup>,
    pub members: Vec<Vec<(u32, u32)>>,
    pub policy_version: u64,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub conns: Vec<Conn>,
    pub ct_counters: crate::conntrack::CtCounters,
    pub ext_neighbors: Vec<(Ipv4Addr, Mac)>,
    pub vm_drops: Vec<(PortId, VmDrops)>,
    pub version: u64,
    pub counters: crate::Stats,
}

impl Shared {
    /// The state as plain data.
    pub fn save(&self) -> SharedState {
        let (groups, members) = self.policy.to_parts();
        let mut ext_neighbors: Vec<(Ipv4Addr, Mac)> = guard(&self.ext_neighbors).iter().collect();
        ext_neighbors.sort();
        let mut vm_drops: Vec<(PortId, VmDrops)> = guard(&self.vm_drops)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        vm_drops.sort_by_key(|(p, _)| *p);
        SharedState {
            topology: self.topo.to_parts(),
            leases: guard(&self.leases).clone(),
            groups,
            members,
            policy_version: self.policy.version,
            timeouts: self.ct.timeouts,
            limits: self.ct.limits,
            conns: self.ct.to_parts(),
            ct_counters: self.ct.counters(),
            ext_neighbors,
            vm_drops,
            version: self.version,
            counters: self.counters(),
        }
    }

    /// The services (what a snapshot of format 2 adds to [`SharedState`]).
    pub fn save_services(&self) -> Vec<crate::services::ServiceSpec> {
        guard(&self.services).specs()
    }

    /// Rebuild from [`Shared::save`] and [`Shared::save_services`] at time
    /// `now` of the same clock: everything is checked again as it is
    /// rebuilt; NAT bindings are claimed back from the connections that
    /// hold them, and services count their connections again.
    pub fn restore(
        s: SharedState,
        services_in: Vec<crate::services::ServiceSpec>,
        now: u64,
    ) -> Result<Shared, String> {
        let topo = Topology::from_parts(s.topology).map_err(|e| format!("topology: {e}"))?;
        let policy = Policy::from_parts(s.groups, s.members, s.policy_version)
            .map_err(|e| format!("security groups: {e}"))?;
        let mut sh = Shared::new(topo, policy, s.timeouts, s.limits);
        sh.ct = Conntrack::from_parts(s.timeouts, s.limits, s.ct_counters, s.conns, now);
        let topo = Arc::clone(&sh.topo);
        let Shared {
            ct, nat, services, ..
        } = &mut sh;
        if let Some(pool) = inner(nat).as_mut() {
            for (_, c) in ct.iter() {
                if let (Some(b), Some(owner)) = (c.nat, c.owner) {
                    if b.pooled {
                        pool.claim(owner, c.admission.proto, b.ip, b.port);
                    }
                }
            }
        }
        let svcs = inner(services);
        for spec in services_in {
            svcs.check(&spec, &topo, None)
                .and_then(|()| svcs.insert(spec))
                .map_err(|e| e.to_string())?;
        }
        for (_, c) in ct.iter() {
            if let Some(k) = crate::lb::vip_of(c) {
                svcs.opened(&k);
            }
        }
        sh.services_changed();
        sh.leases = Mutex::new(s.leases);
        sh.ext_neighbors = Mutex::new(s.ext_neighbors.into_iter().collect());
        sh.vm_drops = Mutex::new(s.vm_drops.into_iter().collect());
        sh.version = s.version;
        let mut counters = s.counters;
        // A previous release counted fewer drop causes.
        counters.drops.resize(DropCause::ALL.len(), 0);
        *inner(&mut sh.counters[0].0) = counters;
        Ok(sh)
    }

    /// State for `topo` (the SNAT pool comes from its external network).
    pub fn new(topo: Topology, policy: Policy, timeouts: Timeouts, limits: Limits) -> Shared {
        let nat = topo
            .external
            .as_ref()
            .filter(|e| !e.snat.is_empty())
            .map(|e| NatPool::new(e.snat.clone(), e.ports.0, e.ports.1, e.per_vm_ports));
        Shared {
            topo: Arc::new(topo),
            leases: Mutex::default(),
            policy,
            ct: Conntrack::new(timeouts, limits, 0),
            nat: Mutex::new(nat),
            ext_neighbors: Mutex::default(),
            vm_drops: Mutex::default(),
            services: Mutex::default(),
            vip_addresses: Default::default(),
            version: 0,
            counters: (0..COUNTER_SLOTS)
                .map(|_| CounterSlot(Mutex::new(crate::Stats::new())))
                .collect(),
            next_slot: AtomicUsize::new(0),
        }
    }

    /// The services, locked.
    pub fn services(&self) -> MutexGuard<'_, crate::services::Services> {
        guard(&self.services)
    }

    /// The services, for a change (under the write lock). A change of
    /// their addresses is seen by decisions once
    /// [`Shared::services_changed`] is called (an `apply` does).
    pub(crate) fn services_mut(&mut self) -> &mut crate::services::Services {
        inner(&mut self.services)
    }

    /// Replace the services (the start, a snapshot restored).
    pub fn set_services(&mut self, s: crate::services::Services) {
        *inner(&mut self.services) = s;
        self.services_changed();
    }

    /// Is `ip` a VIP of network `vni`?
    pub fn is_vip(&self, vni: u32, ip: Ipv4Addr) -> bool {
        self.vip_addresses.is_vip(vni, ip)
    }

    /// Are there (perhaps) services?
    pub fn any_services(&self) -> bool {
        !self.vip_addresses.is_empty()
    }

    /// Is `ip` an external VIP?
    pub fn is_external_vip(&self, ip: Ipv4Addr) -> bool {
        self.vip_addresses.is_external_vip(ip)
    }

    /// After a change of services: their addresses, for decisions.
    pub fn services_changed(&mut self) {
        self.vip_addresses = inner(&mut self.services).addresses();
    }

    /// A slot of decision counters for a new coprocessor thread.
    pub fn counter_slot(&self) -> usize {
        self.next_slot.fetch_add(1, Ordering::Relaxed) % COUNTER_SLOTS
    }

    /// Count on slot `slot`'s decision counters.
    pub fn count(&self, slot: usize, f: impl FnOnce(&mut crate::Stats)) {
        if let Some(s) = self.counters.get(slot) {
            f(&mut guard(&s.0));
        }
    }

    /// Decisions and drops of all coprocessor threads.
    pub fn counters(&self) -> crate::Stats {
        let mut all = crate::Stats::new();
        for s in self.counters.iter() {
            all.add(&guard(&s.0));
        }
        all
    }

    /// Free what an ended connection held and remove its flows.
    pub fn end(&self, conn: &Conn, out: &mut Update) {
        if let (Some(b), Some(owner)) = (conn.nat, conn.owner) {
            if let (true, Some(pool)) = (b.pooled, guard(&self.nat).as_mut()) {
                pool.release(owner, conn.admission.proto, b.ip, b.port);
            }
        }
        if self.any_services() {
            if let Some(k) = crate::lb::vip_of(conn) {
                self.services().closed(&k);
            }
        }
        out.remove.extend(conn.installed_keys());
    }

    /// A connection's timer ran out: end it; one whose handshake never
    /// completed counts against its backend, if load-balanced.
    pub fn expired(&self, conn: &Conn, out: &mut Update, now: u64) {
        if self.any_services() && crate::conntrack::half_open(&conn.state) {
            self.services()
                .passive(conn, crate::services::Passive::TimedOut, now);
        }
        self.end(conn, out);
    }

    /// Count a refusal against the VM on `port`.
    pub fn vm_drop(&self, port: PortId, cause: DropCause) {
        let mut drops = guard(&self.vm_drops);
        let d = drops.entry(port).or_default();
        match cause {
            DropCause::AclDenied => d.acl_denied += 1,
            DropCause::CtFull | DropCause::CtQuota | DropCause::CtClash => d.ct_refused += 1,
            DropCause::NatQuota | DropCause::NatExhausted => d.nat_refused += 1,
            _ => {}
        }
    }
}
