//! The desired state as etcd holds it: the records every host reads
//! ([`Fleet`]: networks, groups, endpoints) and one host's own
//! ([`HostRecords`]: VMs, external network, Hoverboard's direct pairs).
//!
//! Changes to the fleet's records are also appended to a [`Journal`] that
//! each host's agent reads from its own cursor. A real agent is the
//! journal's only reader; in model mode a thousand simulated agents read
//! one journal, so a change is decoded and stored once, not once per host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;

use crate::layout::{Endpoint, Key, Record};

/// The records every host reads.
#[derive(Debug, Default)]
pub struct Fleet {
    pub networks: BTreeMap<u32, Arc<Value>>,
    pub groups: BTreeMap<String, Arc<Value>>,
    pub endpoints: hashbrown::HashMap<(u32, Ipv4Addr), Endpoint>,
    pub journal: Journal,
}

/// One host's records.
#[derive(Debug, Default, Clone)]
pub struct HostRecords {
    pub vms: BTreeMap<String, Arc<Value>>,
    pub external: Option<Arc<Value>>,
    pub direct: BTreeSet<(u32, Ipv4Addr)>,
}

/// The fleet's changed keys in order, each with the record it took
/// (`None`: deleted). Entries are numbered from `base`; readers keep a
/// cursor and the journal forgets what every reader has read. An entry a
/// later one for the same key supersedes is skipped by readers, so the
/// record an entry carries is the key's current one.
#[derive(Debug, Default)]
pub struct Journal {
    base: u64,
    entries: std::collections::VecDeque<Entry>,
    /// Each key's newest entry.
    last: hashbrown::HashMap<Key, u64>,
}

/// A journal entry.
#[derive(Debug)]
pub struct Entry {
    pub key: Key,
    pub record: Option<Record>,
    superseded: bool,
}

impl Journal {
    pub fn push(&mut self, key: Key, rec: Option<Record>) {
        let at = self.end();
        if let Some(prev) = self.last.insert(key.clone(), at) {
            if let Some(e) = prev
                .checked_sub(self.base)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.entries.get_mut(i))
            {
                e.superseded = true;
            }
        }
        self.entries.push_back(Entry {
            key,
            record: rec,
            superseded: false,
        });
    }

    /// The number after the last entry.
    pub fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Up to `max` entries from `cursor`, and the cursor after them.
    /// Superseded entries are counted but not returned.
    pub fn read(&self, cursor: u64, max: usize) -> (impl Iterator<Item = &Entry>, u64) {
        let skip = usize::try_from(cursor.saturating_sub(self.base)).unwrap_or(usize::MAX);
        let n = self.entries.len().saturating_sub(skip).min(max);
        let next = self.base + (skip + n) as u64;
        (
            self.entries
                .iter()
                .skip(skip)
                .take(n)
                .filter(|e| !e.superseded),
            next,
        )
    }

    /// Forget the entries before `cursor` (the slowest reader's).
    pub fn trim(&mut self, cursor: u64) {
        while self.base < cursor {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            if self.last.get(&e.key) == Some(&self.base) {
                self.last.remove(&e.key);
            }
            self.base += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Fleet {
    /// Store a fleet record (`None`: deleted) and journal it. Returns
    /// false if `key` is not a fleet key.
    pub fn set(&mut self, key: &Key, rec: Option<Record>) -> bool {
        match (key, &rec) {
            (Key::Network(v), Some(Record::Object(o))) => {
                self.networks.insert(*v, o.clone());
            }
            (Key::Network(v), None) => {
                self.networks.remove(v);
            }
            (Key::Group(n), Some(Record::Object(o))) => {
                self.groups.insert(n.clone(), o.clone());
            }
            (Key::Group(n), None) => {
                self.groups.remove(n);
            }
            (Key::Endpoint(v, ip), Some(Record::Endpoint(e))) => {
                self.endpoints.insert((*v, *ip), e.clone());
            }
            (Key::Endpoint(v, ip), None) => {
                self.endpoints.remove(&(*v, *ip));
            }
            _ => return false,
        }
        self.journal.push(key.clone(), rec);
        true
    }

    /// Does network `vni` send what its hosts do not know to a gateway
    /// VTEP (Hoverboard)?
    pub fn gatewayed(&self, vni: u32) -> bool {
        self.networks
            .get(&vni)
            .is_some_and(|n| n.get("gateway_vtep").is_some_and(|g| !g.is_null()))
    }

    /// Replace every record with `records` (a full listing), journaling
    /// exactly the keys whose record differs.
    pub fn replace(&mut self, records: Vec<(Key, Record)>) {
        let mut fresh = Fleet::default();
        for (k, r) in records {
            fresh.set(&k, Some(r));
        }
        let mut changed: Vec<(Key, Option<Record>)> = Vec::new();
        diff_maps(&self.networks, &fresh.networks, |v, r| {
            changed.push((Key::Network(*v), r.map(|o| Record::Object(o.clone()))))
        });
        diff_maps(&self.groups, &fresh.groups, |n, r| {
            changed.push((Key::Group(n.clone()), r.map(|o| Record::Object(o.clone()))))
        });
        for (k, e) in &fresh.endpoints {
            if self.endpoints.get(k) != Some(e) {
                changed.push((Key::Endpoint(k.0, k.1), Some(Record::Endpoint(e.clone()))));
            }
        }
        for k in self.endpoints.keys() {
            if !fresh.endpoints.contains_key(k) {
                changed.push((Key::Endpoint(k.0, k.1), None));
            }
        }
        self.networks = fresh.networks;
        self.groups = fresh.groups;
        self.endpoints = fresh.endpoints;
        for (k, r) in changed {
            self.journal.push(k, r);
        }
    }
}

/// Call `f` for each key of `old` or `new` whose value differs, with the
/// new value.
fn diff_maps<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut f: impl FnMut(&K, Option<&V>),
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            f(k, Some(v));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            f(k, None);
        }
    }
}

impl HostRecords {
    /// Store a host record (`None`: deleted). Returns false if `key` is
    /// not a host key.
    pub fn set(&mut self, key: &Key, rec: Option<Record>) -> bool {
        match (key, rec) {
            (Key::Vm(n), Some(Record::Object(o))) => {
                self.vms.insert(n.clone(), o);
            }
            (Key::Vm(n), None) => {
                self.vms.remove(n);
            }
            (Key::External, Some(Record::Object(o))) => self.external = Some(o),
            (Key::External, None) => self.external = None,
            (Key::Direct(v, ip), Some(_)) => {
                self.direct.insert((*v, *ip));
            }
            (Key::Direct(v, ip), None) => {
                self.direct.remove(&(*v, *ip));
            }
            _ => return false,
        }
        true
    }

    /// The keys whose record differs between `self` and `other`.
    pub fn changed_keys(&self, other: &HostRecords) -> Vec<Key> {
        let mut out = Vec::new();
        diff_maps(&self.vms, &other.vms, |n, _| out.push(Key::Vm(n.clone())));
        if self.external != other.external {
            out.push(Key::External);
        }
        for d in self.direct.symmetric_difference(&other.direct) {
            out.push(Key::Direct(d.0, d.1));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(vtep: u8) -> Record {
        Record::Endpoint(Endpoint {
            mac: [2, 0, 0, 0, 0, 1],
            vtep: Ipv4Addr::new(192, 168, 0, vtep),
            security_groups: None,
        })
    }

    #[test]
    fn a_listing_journals_only_the_difference() {
        let mut f = Fleet::default();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        f.set(&Key::Endpoint(1, a), Some(ep(1)));
        f.set(&Key::Endpoint(1, b), Some(ep(1)));
        let end = f.journal.end();
        // a unchanged, b moved, c new, and b's old copy gone.
        let c = Ipv4Addr::new(10, 0, 0, 3);
        f.replace(vec![
            (Key::Endpoint(1, a), ep(1)),
            (Key::Endpoint(1, b), ep(2)),
            (Key::Endpoint(1, c), ep(1)),
        ]);
        let mut keys: Vec<Key> = f.journal.read(end, 100).0.map(|e| e.key.clone()).collect();
        keys.sort();
        assert_eq!(keys, vec![Key::Endpoint(1, b), Key::Endpoint(1, c)]);
        f.replace(vec![]);
        assert_eq!(f.journal.read(end + 2, 100).0.count(), 3);
        assert!(f.endpoints.is_empty());
    }

    #[test]
    fn the_journal_forgets_what_was_read_and_skips_what_was_superseded() {
        let mut j = Journal::default();
        for i in 0..5 {
            j.push(Key::Network(i), None);
        }
        j.trim(3);
        assert_eq!(j.len(), 2);
        let (read, next) = j.read(3, 10);
        let read: Vec<Key> = read.map(|e| e.key.clone()).collect();
        assert_eq!(read, vec![Key::Network(3), Key::Network(4)]);
        assert_eq!(next, 5);
        // A cursor behind the base reads from the base.
        assert_eq!(j.read(0, 10).0.count(), 2);
        assert_eq!(j.end(), 5);
        // Network 3 again: its older entry is skipped, still counted.
        j.push(Key::Network(3), Some(Record::Direct));
        let (read, next) = j.read(3, 2);
        assert_eq!(
            read.map(|e| e.key.clone()).collect::<Vec<_>>(),
            vec![Key::Network(4)]
        );
        assert_eq!(next, 5);
        let (read, next) = j.read(5, 10);
        let read: Vec<&Entry> = read.collect();
        assert_eq!((read.len(), read[0].record.is_some(), next), (1, true, 6));
        j.trim(6);
        assert!(j.is_empty() && j.last.is_empty());
    }
}
