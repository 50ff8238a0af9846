//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016) for service VIPs:
//! a lookup table of a prime size whose every entry names a backend, built
//! off the packet path whenever a service's backend set changes; a
//! connection's first packet picks `table[hash(5-tuple) % size]`.
//!
//! What the switch needs of it, and why it is written here rather than
//! taken from the `maglev` or `maglev-hash` crates:
//! - **The same table on every host** for the same backend set, across
//!   builds and versions (so ECMP may spread a VIP's connections over
//!   hosts): both crates hash with `std`'s `DefaultHasher`, whose algorithm
//!   Rust does not promise to keep. Here the hash is [`hash64`], frozen
//!   (a golden test guards it), and the backends are sorted by address
//!   before the fill, so the order they were configured in does not
//!   matter.
//! - **Weights**, which the paper leaves open ("by altering the relative
//!   frequency of the backends' turns") and neither crate has: a backend of
//!   weight `w` takes a turn in round `r` when `⌊r·w/w_max⌋` grows — the
//!   smooth weighted-frequency fill Envoy and Katran use, the paper's
//!   round robin when all weights are equal. Weight 0 (a drained backend)
//!   takes no entries.
//!
//! Each backend's preference list is the permutation `offset + j·skip
//! (mod M)` with `offset = h1 % M`, `skip = h2 % (M − 1) + 1` from two
//! hashes of its address; `M` prime makes every `skip` enumerate all of
//! `0..M`.

use std::net::Ipv4Addr;

/// The table size services use: a prime well above 100 × the backends a
/// service may have, so shares stay within a fraction of a percent.
pub const TABLE_SIZE: usize = 65_537;

/// Backends one service may have at most (table entries are `u16`).
pub const MAX_BACKENDS: usize = 4096;

/// A backend as the table knows it: where connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Backend {
    /// The 6 bytes its permutation is derived from.
    fn bytes(&self) -> [u8; 6] {
        let [a, b, c, d] = self.ip.octets();
        let [p, q] = self.port.to_be_bytes();
        [a, b, c, d, p, q]
    }
}

/// Why a backend set gives no table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("{0}:{1} is listed twice")]
    Duplicate(Ipv4Addr, u16),
    #[error("{0} backends: at most {MAX_BACKENDS}")]
    TooMany(usize),
    #[error("table size {0} is not a prime above the backends")]
    BadSize(usize),
}

/// A built lookup table: backend indices into the set it was built from,
/// as sorted by [`Table::backends`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    backends: Vec<Backend>,
    entries: Vec<u16>,
}

impl Table {
    /// The table for `set` (backend, weight) at [`TABLE_SIZE`]; `None` if
    /// no backend has a weight above 0 (nothing to pick: a connection to
    /// the service is refused).
    pub fn build(set: &[(Backend, u32)]) -> Result<Option<Table>, MaglevError> {
        Self::build_sized(set, TABLE_SIZE)
    }

    /// [`Table::build`] at another prime size (tests).
    pub fn build_sized(set: &[(Backend, u32)], size: usize) -> Result<Option<Table>, MaglevError> {
        if set.len() > MAX_BACKENDS {
            return Err(MaglevError::TooMany(set.len()));
        }
        if size <= set.len() || size > 1 << 22 || !is_prime(size) {
            return Err(MaglevError::BadSize(size));
        }
        let mut sorted: Vec<(Backend, u32)> = set.to_vec();
        sorted.sort_unstable_by_key(|(b, _)| *b);
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(MaglevError::Duplicate(w[0].0.ip, w[0].0.port));
        }
        let max_w = sorted.iter().map(|(_, w)| *w).max().unwrap_or(0);
        if max_w == 0 {
            return Ok(None);
        }
        let m = size as u64;
        // Each backend's permutation (offset, skip), both below `size`, and
        // how far along it it is.
        let below = |h: u64| usize::try_from(h).unwrap_or(0);
        let perm: Vec<(usize, usize)> = sorted
            .iter()
            .map(|(b, _)| {
                let bytes = b.bytes();
                (
                    below(hash64(&bytes, 0) % m),
                    below(hash64(&bytes, 1) % (m - 1)) + 1,
                )
            })
            .collect();
        let mut next = vec![0usize; sorted.len()];
        let mut entries = vec![u16::MAX; size];
        // Backend i's k-th turn comes in round ⌈k·max/w⌉; within a round
        // backends go in address order. A heap of (round, i) gives the
        // turns in that order without visiting every backend every round
        // (one heavy backend among light ones would make that a round per
        // entry).
        let max_w = u64::from(max_w);
        let turn_round = |k: u64, w: u32| (k * max_w).div_ceil(u64::from(w));
        let mut turns: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize, u64)>> = sorted
            .iter()
            .enumerate()
            .filter(|(_, (_, w))| *w > 0)
            .map(|(i, (_, w))| std::cmp::Reverse((turn_round(1, *w), i, 1)))
            .collect();
        let mut filled = 0;
        while filled < size {
            let Some(std::cmp::Reverse((_, i, k))) = turns.pop() else {
                break;
            };
            let (offset, skip) = perm[i];
            // The next slot of i's preference list still empty (the table
            // is not full, so one is).
            let slot = loop {
                let s = (offset + next[i] * skip) % size;
                next[i] += 1;
                if entries[s] == u16::MAX {
                    break s;
                }
            };
            // i < MAX_BACKENDS (checked above): a u16.
            entries[slot] = u16::try_from(i).unwrap_or(u16::MAX - 1);
            filled += 1;
            turns.push(std::cmp::Reverse((
                turn_round(k + 1, sorted[i].1),
                i,
                k + 1,
            )));
        }
        Ok(Some(Table {
            backends: sorted.into_iter().map(|(b, _)| b).collect(),
            entries,
        }))
    }

    /// The backend for a connection whose 5-tuple hashes to `h`
    /// ([`flow_hash`]).
    pub fn pick(&self, h: u64) -> Backend {
        let len = self.entries.len() as u64;
        let i = self.entries[usize::try_from(h % len).unwrap_or(0)];
        self.backends[usize::from(i)]
    }

    /// The first backend `ok` accepts from `h`'s entry on (the entries
    /// after it, wrapping): deterministic, so every host makes the same
    /// choice; `None` if `ok` accepts none of the table's backends.
    pub fn pick_where(&self, h: u64, ok: impl Fn(&Backend) -> bool) -> Option<Backend> {
        let len = self.entries.len();
        let start = usize::try_from(h % len as u64).unwrap_or(0);
        self.entries[start..]
            .iter()
            .chain(&self.entries[..start])
            .map(|&i| self.backends[usize::from(i)])
            .find(|b| ok(b))
    }

    /// The backends, sorted by address (the indices of [`Table::entries`]).
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The table itself: one backend index per entry.
    pub fn entries(&self) -> &[u16] {
        &self.entries
    }

    /// Entries each backend holds (its share of new connections).
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.backends.len()];
        for &e in &self.entries {
            c[usize::from(e)] += 1;
        }
        c
    }
}

/// The hash of a connection's 5-tuple that picks its entry: the same on
/// every host and version (see [`hash64`]).
pub fn flow_hash(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> u64 {
    let mut b = [0u8; 13];
    b[..4].copy_from_slice(&src.octets());
    b[4..6].copy_from_slice(&sport.to_be_bytes());
    b[6..10].copy_from_slice(&dst.octets());
    b[10..12].copy_from_slice(&dport.to_be_bytes());
    b[12] = proto;
    hash64(&b, 2)
}

/// A 64-bit hash of `bytes` for `purpose` (0, 1: a backend's offset and
/// skip; 2: a connection): FNV-1a over the bytes, then the SplitMix64
/// finaliser for its avalanche. **Frozen**: hosts of one cloud and
/// successive versions must agree on it, or connections move.
pub fn hash64(bytes: &[u8], purpose: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ purpose.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests;
