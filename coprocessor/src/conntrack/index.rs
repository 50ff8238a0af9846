//! Conntrack's key index: which connection, and which side of it, a
//! fast-path key belongs to. Each connection has two entries (its
//! original and reply keys), so at a million connections this index is
//! two million entries — as a `HashMap<FlowKey, (u32, u8)>` 28 bytes
//! each plus control bytes and the table's slack, about 120 bytes per
//! connection. Here an entry is only the slot and side (4 bytes); the key
//! it stands for is the one the slot holds, compared on lookup (the slot
//! is read next anyway). Keys come from tenants: hashed with std's
//! randomly keyed SipHash, as before, so nobody can aim collisions.
//!
//! `hashbrown::HashTable` rather than std's map because the key lives
//! outside the table. The invariant the table relies on when it grows
//! (it rehashes entries by their keys): every entry names a slot that
//! holds a connection, with that key on that side.

use std::hash::{BuildHasher, RandomState};

use flowtable::FlowKey;
use hashbrown::HashTable;

use super::Conn;

#[derive(Debug, Clone)]
pub(super) struct KeyIndex {
    table: HashTable<u32>,
    hasher: RandomState,
}

fn entry(idx: u32, side: usize) -> u32 {
    idx << 1 | u32::from(side == 1)
}

/// The key entry `e` stands for.
fn key_at(slots: &[Option<Conn>], e: u32) -> Option<&FlowKey> {
    let c = slots.get(usize::try_from(e >> 1).ok()?)?.as_ref()?;
    Some(&c.sides[usize::from(e & 1 == 1)].key)
}

impl KeyIndex {
    /// An empty index hashing with `hasher` (the shards of one table
    /// share it, so a key's hash is computed once for all of them).
    pub fn new(hasher: RandomState) -> KeyIndex {
        KeyIndex {
            table: HashTable::new(),
            hasher,
        }
    }

    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The slot and side `key` (hashed `h`) belongs to.
    pub fn get(&self, slots: &[Option<Conn>], key: &FlowKey, h: u64) -> Option<(u32, u8)> {
        let e = self.table.find(h, |&e| key_at(slots, e) == Some(key))?;
        Some((e >> 1, u8::from(e & 1 == 1)))
    }

    /// Index both keys of the connection now in slot `idx` (< [`MAX_SLOTS`]).
    pub fn insert(&mut self, slots: &[Option<Conn>], idx: u32) {
        let Some(c) = slots.get(idx as usize).and_then(Option::as_ref) else {
            return;
        };
        let h = c.sides.map(|s| self.hash(&s.key));
        self.insert_hashed(slots, idx, h);
    }

    /// [`KeyIndex::insert`] with the keys' hashes known.
    pub fn insert_hashed(&mut self, slots: &[Option<Conn>], idx: u32, h: [u64; 2]) {
        let Some(c) = slots.get(idx as usize).and_then(Option::as_ref) else {
            return;
        };
        for (side, h) in h.into_iter().enumerate().take(c.sides.len()) {
            let hasher = &self.hasher;
            self.table.insert_unique(h, entry(idx, side), |&e| {
                key_at(slots, e).map_or(0, |k| hasher.hash_one(k))
            });
        }
    }

    /// Remove the entries of the connection in slot `idx` (while the slot
    /// still holds it).
    pub fn remove(&mut self, slots: &[Option<Conn>], idx: u32) {
        let Some(c) = slots.get(idx as usize).and_then(Option::as_ref) else {
            return;
        };
        for (side, s) in c.sides.iter().enumerate() {
            let want = entry(idx, side);
            if let Ok(e) = self.table.find_entry(self.hash(&s.key), |&e| e == want) {
                e.remove();
            }
        }
    }

    /// Room for `n` more entries without growing.
    pub fn reserve(&mut self, slots: &[Option<Conn>], n: usize) {
        let hasher = &self.hasher;
        self.table
            .reserve(n, |&e| key_at(slots, e).map_or(0, |k| hasher.hash_one(k)));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }
}
