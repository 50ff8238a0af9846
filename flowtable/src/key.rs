//! Flow keys and the one hash the fast path computes per packet.
//!
//! A [`FlowKey`] is 20 bytes with no padding the compiler could leave
//! uninitialised, so equality is a plain field compare. The coprocessor
//! chooses the granularity when it compiles a flow: a 5-tuple key for
//! stateful (conntracked) flows, or the same key with ports zeroed and
//! [`KeyFlags::L3`] set when only addresses matter (Andromeda's 3-tuple).

use std::hash::{BuildHasher, RandomState};

/// A port of the switch (VM port, uplink). Small and dense: it indexes
/// per-port arrays in the fast path.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct PortId(pub u16);

/// A VXLAN network identifier. Only the low 24 bits are meaningful; the
/// constructor refuses anything wider.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl TryFrom<u32> for Vni {
    type Error = String;
    fn try_from(v: u32) -> Result<Vni, String> {
        Vni::new(v).ok_or_else(|| format!("VNI {v} does not fit in 24 bits"))
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl Vni {
    /// The largest VNI a 24-bit field can carry.
    pub const MAX: u32 = 0x00ff_ffff;

    /// A VNI, or `None` if `v` does not fit in 24 bits.
    pub const fn new(v: u32) -> Option<Vni> {
        if v <= Self::MAX {
            Some(Vni(v))
        } else {
            None
        }
    }

    /// The numeric value (always ≤ [`Vni::MAX`]).
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// Where a frame entered the switch: a VM port, or the uplink with the
/// VNI it was decapsulated from. This is the first field of every key, so
/// a flow never matches traffic of another tenant or another VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ingress {
    Port(PortId),
    Vni(Vni),
}

const CTX_PORT: u32 = 1 << 24;
const CTX_VNI: u32 = 2 << 24;

impl Ingress {
    /// The 32-bit encoding used inside keys: kind in the top byte, id below.
    pub const fn ctx(self) -> u32 {
        match self {
            Ingress::Port(p) => CTX_PORT | p.0 as u32,
            Ingress::Vni(v) => CTX_VNI | v.0,
        }
    }

    /// Inverse of [`Ingress::ctx`]; `None` for an encoding no key can hold.
    pub fn from_ctx(ctx: u32) -> Option<Ingress> {
        let id = ctx & 0x00ff_ffff;
        match ctx & 0xff00_0000 {
            CTX_PORT => u16::try_from(id).ok().map(|p| Ingress::Port(PortId(p))),
            CTX_VNI => Some(Ingress::Vni(Vni(id))),
            _ => None,
        }
    }
}

/// Bits of [`FlowKey::flags`].
pub struct KeyFlags;

impl KeyFlags {
    /// The packet is an IPv4 fragment: ports are zero because only the
    /// first fragment carries them.
    pub const FRAGMENT: u8 = 1 << 0;
    /// A coarse (address-only) flow: ports are zero by construction.
    pub const L3: u8 = 1 << 1;
}

/// The exact-match key: ingress context plus the IPv4 header fields that
/// identify a flow. Addresses and ports are host-order numbers.
///
/// For ICMP, `src_port` is the echo identifier (0 for other types) and
/// `dst_port` is `type << 8 | code`, so echo requests and replies of one
/// ping session are distinct, reversible flows.
#[derive(Clone, Copy, Debug, Eq, Default, serde::Serialize, serde::Deserialize)]
#[repr(C)]
pub struct FlowKey {
    pub ctx: u32,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub flags: u8,
    /// Always zero; present so the struct has no implicit padding.
    pub pad: u16,
}

const _: () = assert!(std::mem::size_of::<FlowKey>() == 20);

impl PartialEq for FlowKey {
    /// Compared as two 64-bit words and one 32-bit word.
    #[inline(always)]
    fn eq(&self, o: &FlowKey) -> bool {
        self.words() == o.words()
    }
}

impl std::hash::Hash for FlowKey {
    /// Hashes the same words equality compares, so the two agree.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.words().hash(state);
    }
}

impl FlowKey {
    /// A 5-tuple key.
    pub const fn new(
        ingress: Ingress,
        proto: u8,
        src_ip: u32,
        dst_ip: u32,
        src_port: u16,
        dst_port: u16,
    ) -> FlowKey {
        FlowKey {
            ctx: ingress.ctx(),
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
            flags: 0,
            pad: 0,
        }
    }

    /// The same flow at address granularity (ports dropped, L3 flag set).
    pub const fn to_l3(self) -> FlowKey {
        FlowKey {
            src_port: 0,
            dst_port: 0,
            flags: self.flags | KeyFlags::L3,
            ..self
        }
    }

    /// The key's 20 bytes as they sit in memory.
    #[inline(always)]
    pub fn as_bytes(&self) -> &[u8; 20] {
        // SAFETY: FlowKey is repr(C) with fields of 4+4+4+2+2+1+1+2 = 20
        // bytes (size asserted above), so it has no padding and every byte
        // is initialised; u8 has alignment 1, and the reference borrows self.
        unsafe { &*(self as *const FlowKey).cast::<[u8; 20]>() }
    }

    /// The key as native-endian words (two of 64 bits, one of 32): what
    /// equality and the hash work on, so neither touches fields one by one.
    #[inline(always)]
    pub fn words(&self) -> (u64, u64, u32) {
        let b = self.as_bytes();
        let (a, rest) = b.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
        let (m, rest) = rest.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
        let c = rest.first_chunk::<4>().unwrap_or(&[0; 4]);
        (
            u64::from_ne_bytes(*a),
            u64::from_ne_bytes(*m),
            u32::from_ne_bytes(*c),
        )
    }

    /// Where the keyed traffic entered, if the context is well formed.
    pub fn ingress(&self) -> Option<Ingress> {
        Ingress::from_ctx(self.ctx)
    }
}

/// The seeded hash of a [`FlowKey`]. It is computed once per packet and
/// used twice: to find the bucket, and (by the encapsulation) as the
/// entropy for the outer UDP source port.
///
/// The construction is the folded 64×64→128 multiply used by wyhash; the
/// seed is random per table so a tenant cannot precompute keys that all
/// land on one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHasher {
    seed: [u64; 3],
}

const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;
const K2: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    // The low and high halves are recombined; dropping bits is the point.
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (r as u64, (r >> 64) as u64);
    lo ^ hi
}

impl FlowHasher {
    /// A hasher with a seed drawn from the OS (through std's `RandomState`).
    pub fn random() -> FlowHasher {
        let s = RandomState::new();
        FlowHasher::with_seed(s.hash_one(0x5eed_u64))
    }

    /// A hasher with a fixed seed (tests, benchmarks, and a restored table
    /// that must keep its flows' outer source ports).
    pub fn with_seed(seed: u64) -> FlowHasher {
        FlowHasher {
            seed: [
                seed ^ K0,
                seed.rotate_left(21) ^ K1,
                seed.rotate_left(42) ^ K2,
            ],
        }
    }

    /// The 64-bit seed this hasher was made from.
    pub fn seed(&self) -> u64 {
        self.seed[0] ^ K0
    }

    /// Hash one key.
    #[inline(always)]
    pub fn hash(&self, k: &FlowKey) -> u64 {
        // The same words equality compares: three loads, no shifts.
        let (a, b, c) = k.words();
        let h = fold_mul(a ^ self.seed[0], b ^ self.seed[1]);
        fold_mul(h ^ u64::from(c) ^ self.seed[2], K1 ^ self.seed[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctx_round_trips() {
        for ing in [
            Ingress::Port(PortId(0)),
            Ingress::Port(PortId(u16::MAX)),
            Ingress::Vni(Vni::new(0).unwrap()),
            Ingress::Vni(Vni::new(Vni::MAX).unwrap()),
        ] {
            assert_eq!(Ingress::from_ctx(ing.ctx()), Some(ing));
        }
        assert_eq!(Ingress::from_ctx(0), None);
        assert_eq!(Ingress::from_ctx(CTX_PORT | 0x1_0000), None);
        assert!(Vni::new(Vni::MAX + 1).is_none());
    }

    #[test]
    fn port_and_vni_contexts_never_collide() {
        let p = FlowKey::new(Ingress::Port(PortId(5)), 6, 1, 2, 3, 4);
        let v = FlowKey::new(Ingress::Vni(Vni::new(5).unwrap()), 6, 1, 2, 3, 4);
        assert_ne!(p, v);
    }

    #[test]
    fn hash_depends_on_every_field_and_the_seed() {
        let h = FlowHasher::with_seed(7);
        let base = FlowKey::new(
            Ingress::Port(PortId(1)),
            17,
            0x0a00_0001,
            0x0a00_0002,
            1000,
            53,
        );
        let variants = [
            FlowKey {
                ctx: base.ctx + 1,
                ..base
            },
            FlowKey {
                src_ip: base.src_ip + 1,
                ..base
            },
            FlowKey {
                dst_ip: base.dst_ip + 1,
                ..base
            },
            FlowKey {
                src_port: base.src_port + 1,
                ..base
            },
            FlowKey {
                dst_port: base.dst_port + 1,
                ..base
            },
            FlowKey { proto: 6, ..base },
            FlowKey { flags: 1, ..base },
        ];
        for v in variants {
            assert_ne!(h.hash(&v), h.hash(&base), "{v:?}");
        }
        assert_ne!(FlowHasher::with_seed(8).hash(&base), h.hash(&base));
        assert_eq!(FlowHasher::with_seed(7).seed(), 7);
    }

    #[test]
    fn equality_is_field_equality() {
        let a = FlowKey::new(Ingress::Port(PortId(1)), 6, 1, 2, 3, 4);
        assert_eq!(a, a);
        for b in [
            FlowKey { pad: 1, ..a },
            FlowKey { flags: 1, ..a },
            FlowKey { proto: 7, ..a },
            FlowKey { dst_port: 5, ..a },
        ] {
            assert_ne!(a, b);
        }
        assert_eq!(a.as_bytes().len(), 20);
    }

    #[test]
    fn l3_key_drops_ports() {
        let k = FlowKey::new(Ingress::Port(PortId(1)), 6, 1, 2, 3, 4).to_l3();
        assert_eq!((k.src_port, k.dst_port), (0, 0));
        assert_eq!(k.flags & KeyFlags::L3, KeyFlags::L3);
    }
}
