//! Which coprocessor thread decides for a connection, and which shard of
//! the connection table holds it: one hash of a key, the same for both
//! directions of a connection that is not translated (its endpoints are
//! taken in order, and the ingress is left out), so the fast path punts
//! a connection's misses to one thread and that thread finds the
//! connection in the shards it keeps to itself — nothing of it moves
//! between cores' caches. (A NATed connection's reply key hashes
//! elsewhere; its replies rarely miss.)
//!
//! The hash is seeded once per process: a tenant cannot aim all its
//! connections at one thread. Both ends call it in the same process; a
//! new binary after a handover places the connections it is given with
//! its own seed.

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;

use flowtable::FlowKey;

/// Shards of the connection table (a power of two, more than there are
/// coprocessor threads, so each thread keeps a few).
pub const SHARDS: usize = 16;

fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| RandomState::new().hash_one(0x5eed_u64))
}

/// The steering hash of `key` (see the module documentation).
pub fn hash(key: &FlowKey) -> u64 {
    // An endpoint: the address and, but for ICMP (whose "ports" are the
    // echo identifier on one side and the type on the other), the port.
    let icmp = key.proto == 1;
    let end = |ip: u32, port: u16| u64::from(ip) << 16 | if icmp { 0 } else { u64::from(port) };
    let (a, b) = (end(key.src_ip, key.src_port), end(key.dst_ip, key.dst_port));
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut x = seed()
        ^ lo.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ hi.rotate_left(31)
        ^ u64::from(key.proto) << 56;
    // MurmurHash3's 64-bit finaliser: every input bit moves the output.
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ x >> 33
}

/// The shard of the connection table `key` belongs to.
pub fn shard(key: &FlowKey) -> usize {
    // The low bits of the hash.
    #[allow(clippy::cast_possible_truncation)]
    let s = hash(key) as usize;
    s & (SHARDS - 1)
}

/// Which of `threads` coprocessor threads decides for `key`: the one
/// that keeps its shard.
pub fn thread(key: &FlowKey, threads: usize) -> usize {
    shard(key) % threads.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::{Ingress, PortId, Vni};

    #[test]
    fn both_directions_of_a_connection_go_to_one_shard() {
        let mut spread = [0u32; SHARDS];
        for sport in 1000..3000u16 {
            let out = FlowKey::new(
                Ingress::Port(PortId(1)),
                6,
                0x0a00_0001,
                0x0a00_0102,
                sport,
                80,
            );
            let back = FlowKey::new(
                Ingress::Vni(Vni::new(7).unwrap()),
                6,
                0x0a00_0102,
                0x0a00_0001,
                80,
                sport,
            );
            assert_eq!(shard(&out), shard(&back));
            spread[shard(&out)] += 1;
        }
        // 2,000 connections: every shard gets some, none a double share.
        assert!(spread.iter().all(|&n| n > 60 && n < 250), "{spread:?}");
        // ICMP echo: the identifier is one side's "port" only.
        let ping = FlowKey::new(Ingress::Port(PortId(1)), 1, 1, 2, 77, 8 << 8);
        let pong = FlowKey::new(Ingress::Port(PortId(2)), 1, 2, 1, 77, 0);
        assert_eq!(shard(&ping), shard(&pong));
        assert!((0..10).all(|n| thread(&out_key(n), 3) < 3));
    }

    fn out_key(n: u16) -> FlowKey {
        FlowKey::new(Ingress::Port(PortId(1)), 17, 1, 2, n, 53)
    }
}
