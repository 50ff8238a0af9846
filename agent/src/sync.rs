//! One host's agent, without I/O: what etcd says its switch should hold
//! ([`Fleet`] and [`HostRecords`]) against what it has applied, turned into
//! change batches for a [`Switch`].
//!
//! Each [`HostAgent::step`] takes the keys that changed since the last
//! (the fleet's journal from its cursor, its own records, retries),
//! plans their operations in dependency order (groups and networks before
//! the VMs and endpoints that name them, removals of those before the
//! networks and groups), and applies them as one batch. A batch the switch
//! refuses names the operation (and entry) at fault: that record is set
//! aside with the switch's error, reported in the status, and the rest is
//! sent again; nothing one bad record does stops the others. Records set
//! aside are tried again after a later batch succeeds (it may have added
//! what they were missing) or when they change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;

use crate::desired::{Fleet, HostRecords};
use crate::layout::{Endpoint, Key, Record};
use crate::switch::{Held, Op, Remote, Switch, SwitchError};

/// Most endpoints in one `set-remotes` / `remove-remotes` operation.
pub const REMOTES_PER_OP: usize = 10_000;
/// Most keys planned into one batch (~100 000 endpoints is the switch's
/// measured bulk sweet spot; a larger backlog goes in several batches).
pub const KEYS_PER_BATCH: usize = 100_000;
/// Refusals isolated one by one before the rest is sent op by op.
const MAX_ISOLATE: usize = 64;

/// What the switch holds by this agent's doing.
#[derive(Debug, Default, Clone)]
struct Applied {
    networks: BTreeMap<u32, Arc<Value>>,
    groups: BTreeMap<String, Arc<Value>>,
    vms: BTreeMap<String, Arc<Value>>,
    external: Option<Arc<Value>>,
}

/// Counters, for the status and the benches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub batches: u64,
    pub ops: u64,
    pub keys: u64,
    pub refused: u64,
    pub resyncs: u64,
    /// Keys a resync found different (what it applied).
    pub resync_keys: u64,
}

/// A batch's operations by phase, in the order they are applied.
#[derive(Default)]
struct Phases {
    add_groups: Vec<Op>,
    networks: Vec<Op>,
    rules: Vec<Op>,
    remove_vms: Vec<Op>,
    unset: Vec<Vec<(u32, Ipv4Addr)>>,
    set: Vec<Vec<Remote>>,
    vms: Vec<Op>,
    external: Vec<Op>,
    remove_networks: Vec<Op>,
    remove_groups: Vec<Op>,
}

fn plan_remote(p: &mut Phases, vni: u32, ip: Ipv4Addr, ep: Option<&Endpoint>) {
    match ep {
        Some(ep) => chunked(&mut p.set, Remote::new(vni, ip, ep)),
        None => chunked(&mut p.unset, (vni, ip)),
    }
}

/// Whether the last network asked about exists and has a gateway VTEP
/// (a batch's endpoints are mostly of one network).
#[derive(Default)]
struct Gatewayed(Option<(u32, Option<bool>)>);

impl Gatewayed {
    /// `None`: no such network; else whether it has a gateway VTEP.
    fn of(&mut self, fleet: &Fleet, vni: u32) -> Option<bool> {
        match self.0 {
            Some((v, g)) if v == vni => g,
            _ => {
                let g = fleet
                    .networks
                    .contains_key(&vni)
                    .then(|| fleet.gatewayed(vni));
                self.0 = Some((vni, g));
                g
            }
        }
    }
}

/// Push `x` onto the last of `chunks`, or a new one when that is full.
fn chunked<T>(chunks: &mut Vec<Vec<T>>, x: T) {
    match chunks.last_mut() {
        Some(c) if c.len() < REMOTES_PER_OP => c.push(x),
        _ => {
            let mut c = Vec::with_capacity(256);
            c.push(x);
            chunks.push(c);
        }
    }
}

/// A record's state the switch does not know (after a resync): it differs
/// from every record.
fn unknown() -> Arc<Value> {
    Arc::new(Value::Null)
}

pub struct HostAgent {
    pub host: String,
    pub vtep: Ipv4Addr,
    pub records: HostRecords,
    applied: Applied,
    cursor: u64,
    dirty: BTreeSet<Key>,
    /// Keys the switch refused, with its error, until they change or a
    /// later batch succeeds (tried again then: the batch may have added
    /// what they lacked).
    refused: BTreeMap<Key, String>,
    /// Refused keys not yet tried again.
    retry: BTreeSet<Key>,
    /// Keys whose record did not parse, with the reason.
    unparsed: BTreeMap<Key, String>,
    pub counters: Counters,
}

impl HostAgent {
    pub fn new(host: &str, vtep: Ipv4Addr, fleet: &Fleet) -> HostAgent {
        HostAgent {
            host: host.to_string(),
            vtep,
            records: HostRecords::default(),
            applied: Applied::default(),
            cursor: fleet.journal.end(),
            dirty: BTreeSet::new(),
            refused: BTreeMap::new(),
            retry: BTreeSet::new(),
            unparsed: BTreeMap::new(),
            counters: Counters::default(),
        }
    }

    /// The journal entry this agent reads next.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Read no journal entry written so far (the next [`HostAgent::resync`]
    /// compares every record instead).
    pub fn skip_journal(&mut self, fleet: &Fleet) {
        self.cursor = fleet.journal.end();
    }

    /// A key changed (a host record, or a fleet record of a journal this
    /// agent does not read).
    pub fn touch(&mut self, key: Key) {
        self.refused.remove(&key);
        self.unparsed.remove(&key);
        self.dirty.insert(key);
    }

    /// The record at `key` did not parse: the switch keeps what it had.
    pub fn unparsed(&mut self, key: Key, why: String) {
        self.unparsed.insert(key, why);
    }

    /// Records set aside, with why: (key, error).
    pub fn errors(&self) -> impl Iterator<Item = (&Key, &String)> {
        self.unparsed.iter().chain(self.refused.iter())
    }

    /// Is there anything to apply?
    pub fn pending(&self, fleet: &Fleet) -> bool {
        !self.dirty.is_empty() || self.cursor < fleet.journal.end()
    }

    /// Should the switch hold the endpoint (vni, ip), and which?
    fn wanted_remote<'f>(
        &self,
        fleet: &'f Fleet,
        gw: &mut Gatewayed,
        vni: u32,
        ip: Ipv4Addr,
    ) -> Option<&'f Endpoint> {
        let ep = fleet.endpoints.get(&(vni, ip))?;
        self.wants(gw, fleet, vni, ip, ep)
    }

    /// Should the switch hold endpoint `ep` at (vni, ip)?
    fn wants<'e>(
        &self,
        gw: &mut Gatewayed,
        fleet: &Fleet,
        vni: u32,
        ip: Ipv4Addr,
        ep: &'e Endpoint,
    ) -> Option<&'e Endpoint> {
        if ep.vtep == self.vtep {
            return None;
        }
        match gw.of(fleet, vni)? {
            true if !self.records.direct.contains(&(vni, ip)) => None,
            _ => Some(ep),
        }
    }

    /// Plan the operations for up to `max` changed keys — the journal's
    /// from this agent's cursor (each with its current record), then its
    /// own — in dependency order. Returns them and how many keys it read.
    fn plan(&mut self, fleet: &Fleet, max: usize) -> (Vec<Op>, usize) {
        let mut p = Phases::default();
        let mut gw = Gatewayed::default();
        let mut n = 0;
        let (entries, next) = fleet.journal.read(self.cursor, max);
        for e in entries {
            n += 1;
            if !self.refused.is_empty() {
                self.refused.remove(&e.key);
            }
            if !self.unparsed.is_empty() {
                self.unparsed.remove(&e.key);
            }
            match (&e.key, &e.record) {
                // A journaled endpoint carries its record: no lookup.
                (Key::Endpoint(v, ip), rec) => {
                    let ep = match rec {
                        Some(Record::Endpoint(ep)) => self.wants(&mut gw, fleet, *v, *ip, ep),
                        _ => None,
                    };
                    plan_remote(&mut p, *v, *ip, ep);
                }
                (k, _) => {
                    if let Key::Network(v) = k {
                        // Its endpoints may come or go with it (or its
                        // gateway).
                        for ip in fleet.endpoints.keys().filter(|e| e.0 == *v).map(|e| e.1) {
                            n += 1;
                            let ep = self.wanted_remote(fleet, &mut gw, *v, ip);
                            plan_remote(&mut p, *v, ip, ep);
                        }
                    }
                    self.plan_key(&mut p, fleet, &mut gw, k);
                }
            }
        }
        self.cursor = next;
        // (A network set aside or found different by a resync comes
        // without its endpoints: those that differ are keys of their own.)
        while n < max {
            let Some(k) = self.dirty.pop_first() else {
                break;
            };
            n += 1;
            self.plan_key(&mut p, fleet, &mut gw, &k);
        }
        let mut ops = Vec::new();
        ops.append(&mut p.add_groups);
        ops.append(&mut p.networks);
        ops.append(&mut p.rules);
        ops.append(&mut p.remove_vms);
        ops.extend(p.unset.into_iter().map(Op::RemoveRemotes));
        ops.extend(p.set.into_iter().map(Op::SetRemotes));
        ops.append(&mut p.vms);
        ops.append(&mut p.external);
        ops.append(&mut p.remove_networks);
        ops.append(&mut p.remove_groups);
        (ops, n)
    }

    /// Plan one key from the records as they are now.
    fn plan_key(&self, p: &mut Phases, fleet: &Fleet, gw: &mut Gatewayed, k: &Key) {
        let a = &self.applied;
        match k {
            Key::Group(n) => match (fleet.groups.get(n), a.groups.get(n)) {
                (Some(w), None) => p.add_groups.push(Op::AddGroup(n.clone(), w.clone())),
                (Some(w), Some(h)) if w != h => p.rules.push(Op::SetRules(n.clone(), w.clone())),
                (None, Some(_)) => p.remove_groups.push(Op::RemoveGroup(n.clone())),
                _ => {}
            },
            Key::Network(v) => match (fleet.networks.get(v), a.networks.get(v)) {
                (Some(w), None) => p.networks.push(Op::AddNetwork(*v, w.clone())),
                (Some(w), Some(h)) if w != h => p.networks.push(Op::ChangeNetwork(*v, w.clone())),
                (None, Some(_)) => p.remove_networks.push(Op::RemoveNetwork(*v)),
                _ => {}
            },
            Key::Vm(n) => match (self.records.vms.get(n), a.vms.get(n)) {
                (Some(w), None) => p.vms.push(Op::AddVm(n.clone(), w.clone())),
                (Some(w), Some(h)) if w != h => p.vms.push(Op::ChangeVm(n.clone(), w.clone())),
                (None, Some(_)) => p.remove_vms.push(Op::RemoveVm(n.clone())),
                _ => {}
            },
            Key::External => {
                if self.records.external != a.external {
                    p.external
                        .push(Op::SetExternal(self.records.external.clone()));
                }
            }
            Key::Endpoint(v, ip) | Key::Direct(v, ip) => {
                let ep = self.wanted_remote(fleet, gw, *v, *ip);
                plan_remote(p, *v, *ip, ep);
            }
        }
    }

    /// Note what a successful batch did.
    fn commit(&mut self, ops: &[Op]) {
        let a = &mut self.applied;
        for op in ops {
            match op {
                Op::AddGroup(n, g) | Op::SetRules(n, g) => {
                    a.groups.insert(n.clone(), g.clone());
                }
                Op::RemoveGroup(n) => {
                    a.groups.remove(n);
                }
                Op::AddNetwork(v, n) | Op::ChangeNetwork(v, n) => {
                    a.networks.insert(*v, n.clone());
                }
                Op::RemoveNetwork(v) => {
                    a.networks.remove(v);
                }
                Op::AddVm(n, vm) | Op::ChangeVm(n, vm) => {
                    a.vms.insert(n.clone(), vm.clone());
                }
                Op::RemoveVm(n) => {
                    a.vms.remove(n);
                }
                Op::SetExternal(e) => a.external = e.clone(),
                Op::SetRemotes(_) | Op::RemoveRemotes(_) => {}
            }
        }
    }

    /// Apply what changed, as one batch (or a few, for a backlog larger
    /// than [`KEYS_PER_BATCH`]). An unreachable switch keeps every key for
    /// the next try.
    pub fn step(&mut self, fleet: &Fleet, sw: &mut dyn Switch) -> Result<(), SwitchError> {
        while self.pending(fleet) {
            let (mut ops, n) = self.plan(fleet, KEYS_PER_BATCH);
            if ops.is_empty() {
                continue;
            }
            self.counters.keys += n as u64;
            let applied = match self.apply_isolating(sw, &mut ops) {
                Ok(n) => n,
                Err(e) => {
                    // (A key that planned no operation needs none.)
                    self.dirty.extend(ops.iter().flat_map(|o| o.keys(None)));
                    return Err(e);
                }
            };
            if applied > 0 {
                self.commit(&ops);
                self.counters.batches += 1;
                self.counters.ops += applied as u64;
                if !self.refused.is_empty() {
                    let batch: std::collections::HashSet<Key> =
                        ops.iter().flat_map(|o| o.keys(None)).collect();
                    self.refused.retain(|k, _| !batch.contains(k));
                }
                // What an earlier batch refused may have lacked what this
                // one added (what this one refused waits for the next).
                let again = std::mem::take(&mut self.retry);
                self.dirty
                    .extend(again.into_iter().filter(|k| self.refused.contains_key(k)));
            }
            // This batch's refusals: tried after the next success.
            for k in self.refused.keys() {
                if !self.dirty.contains(k) {
                    self.retry.insert(k.clone());
                }
            }
        }
        Ok(())
    }

    /// Apply `ops`, setting aside what the switch refuses. Returns how
    /// many operations were applied; `ops` is left holding them.
    fn apply_isolating(
        &mut self,
        sw: &mut dyn Switch,
        ops: &mut Vec<Op>,
    ) -> Result<usize, SwitchError> {
        for _ in 0..MAX_ISOLATE {
            if ops.is_empty() {
                return Ok(0);
            }
            match sw.apply(ops) {
                Ok(()) => return Ok(ops.len()),
                Err(SwitchError::Refused {
                    op: Some(i),
                    item,
                    message,
                }) if i < ops.len() => {
                    self.counters.refused += 1;
                    let dropped = item.is_some_and(|j| {
                        for k in ops[i].keys(Some(j)) {
                            self.refused.insert(k, message.clone());
                        }
                        ops[i].drop_item(j)
                    });
                    if !dropped {
                        for k in ops[i].keys(None) {
                            self.refused.insert(k, message.clone());
                        }
                        ops.remove(i);
                    } else if ops[i].is_empty() {
                        ops.remove(i);
                    }
                }
                Err(SwitchError::Refused { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        // The switch did not say which (or refused too much): one by one.
        let mut kept = Vec::new();
        for op in std::mem::take(ops) {
            match sw.apply(std::slice::from_ref(&op)) {
                Ok(()) => kept.push(op),
                Err(SwitchError::Refused { message, .. }) => {
                    self.counters.refused += 1;
                    for k in op.keys(None) {
                        self.refused.insert(k, message.clone());
                    }
                }
                Err(e) => {
                    // Those applied so far stay applied: note them.
                    *ops = kept;
                    return Err(e);
                }
            }
        }
        let n = kept.len();
        *ops = kept;
        Ok(n)
    }

    /// Bring the switch to the desired state from what it holds now (a
    /// reconnect, a restart, a compacted history): only what differs is
    /// sent.
    pub fn resync(&mut self, fleet: &Fleet, sw: &mut dyn Switch) -> Result<(), SwitchError> {
        let held = sw.held()?;
        self.counters.resyncs += 1;
        let before = self.dirty.len();
        self.reconcile(fleet, &held);
        self.counters.resync_keys += (self.dirty.len() - before) as u64;
        self.step(fleet, sw)
    }

    /// Mark dirty every key where `held` differs from what this agent
    /// thinks it applied or wants.
    fn reconcile(&mut self, fleet: &Fleet, held: &Held) {
        let a = &mut self.applied;
        // What the switch lost is no longer applied; what it has that this
        // agent did not put there is of unknown content.
        a.networks.retain(|v, _| held.networks.contains(v));
        a.groups.retain(|n, _| held.groups.contains(n));
        a.vms.retain(|n, _| held.vms.contains(n));
        for v in &held.networks {
            a.networks.entry(*v).or_insert_with(unknown);
        }
        for n in &held.groups {
            a.groups.entry(n.clone()).or_insert_with(unknown);
        }
        for n in &held.vms {
            a.vms.entry(n.clone()).or_insert_with(unknown);
        }
        let mut dirty: Vec<Key> = Vec::new();
        for (v, h) in &a.networks {
            if fleet.networks.get(v) != Some(h) {
                dirty.push(Key::Network(*v));
            }
        }
        for v in fleet.networks.keys() {
            if !a.networks.contains_key(v) {
                dirty.push(Key::Network(*v));
            }
        }
        for (n, h) in &a.groups {
            if fleet.groups.get(n) != Some(h) {
                dirty.push(Key::Group(n.clone()));
            }
        }
        for n in fleet.groups.keys() {
            if !a.groups.contains_key(n) {
                dirty.push(Key::Group(n.clone()));
            }
        }
        for (n, h) in &a.vms {
            if self.records.vms.get(n) != Some(h) {
                dirty.push(Key::Vm(n.clone()));
            }
        }
        for n in self.records.vms.keys() {
            if !a.vms.contains_key(n) {
                dirty.push(Key::Vm(n.clone()));
            }
        }
        // Endpoints: by content, both ways.
        let gw = &mut Gatewayed::default();
        for ((v, ip), (mac, vtep)) in &held.remotes {
            match self.wanted_remote(fleet, gw, *v, *ip) {
                Some(e) if e.mac == *mac && e.vtep == *vtep => {}
                _ => dirty.push(Key::Endpoint(*v, *ip)),
            }
        }
        for (v, ip) in fleet.endpoints.keys() {
            if !held.remotes.contains_key(&(*v, *ip))
                && self.wanted_remote(fleet, gw, *v, *ip).is_some()
            {
                dirty.push(Key::Endpoint(*v, *ip));
            }
        }
        self.dirty.extend(dirty);
        // Everything journaled so far is in `fleet`, compared above.
        self.cursor = fleet.journal.end();
    }
}

#[cfg(test)]
mod tests;
