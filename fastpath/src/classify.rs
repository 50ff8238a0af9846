//! Frame classification: any byte sequence becomes a flow key to look up,
//! a reason to punt without a lookup, or a counted drop.
//!
//! The classifier reads only what the key needs: Ethernet type, the IPv4
//! header, and the first 4 bytes of the L4 header (ports, or ICMP type,
//! code and — for echo — identifier). Every read is bounds-checked
//! against the length the previous check established; nothing panics.

use flowtable::{FlowKey, Ingress, KeyFlags, PortId, Vni};
use vxlan::DecapConfig;

use crate::drop::DropReason;
use crate::packet::{be16, ipv4, l4, plain, Ipv4};
use crate::packet::{ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ};
use crate::packet::{ETHERTYPE_VLAN, ETH_LEN, ETH_TYPE, IPPROTO_ICMP, IPPROTO_SCTP};
use crate::packet::{IPPROTO_TCP, IPPROTO_UDP};
use crate::punt::PuntReason;

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Look this key up.
    Flow(FlowKey),
    /// Hand to the coprocessor without a lookup (ARP).
    Punt(PuntReason),
    Drop(DropReason),
}

/// [`Class`] without the key, which the hot path writes in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Flow,
    Punt(PuntReason),
    Drop(DropReason),
}

/// A classified frame: its kind, and where its inner frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    pub kind: Kind,
    /// Offset of the (inner) Ethernet header in the frame: 0 for VM ports,
    /// the outer header length for decapsulated uplink frames.
    pub inner_start: u16,
    pub inner_len: u32,
    /// Outer source VTEP (uplink frames), 0 otherwise.
    pub outer_src: u32,
}

/// Classify an Ethernet frame that entered through `ingress`.
pub fn classify_l2(f: &[u8], ingress: Ingress) -> Class {
    let mut key = FlowKey::default();
    match classify_into(f, ingress.ctx(), &mut key) {
        Kind::Flow => Class::Flow(key),
        Kind::Punt(r) => Class::Punt(r),
        Kind::Drop(r) => Class::Drop(r),
    }
}

/// Classify `f` (ingress context `ctx`, see [`Ingress::ctx`]); for
/// [`Kind::Flow`] the key is written to `key`.
///
/// The common case — untagged IPv4 without options, not a fragment, TCP
/// or UDP with its ports inside the packet — is decided after a single
/// length check on a fixed-size array; everything else goes through
/// [`classify_general`], which checks each field.
#[inline(always)]
pub fn classify_into(f: &[u8], ctx: u32, key: &mut FlowKey) -> Kind {
    if let Some(h) = f.first_chunk::<{ plain::LEN }>() {
        // Indices into a fixed-size array: checked at compile time.
        let u16_at = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let u32_at = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let tot_len = usize::from(u16_at(plain::IP_TOT_LEN));
        let proto = h[plain::IP_PROTO];
        if u16_at(ETH_TYPE) == ETHERTYPE_IPV4
            && h[plain::IP_VER_IHL] == ipv4::VER_IHL_PLAIN
            && u16_at(plain::IP_FRAG) & ipv4::FRAGMENTED == 0
            && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
            && tot_len >= ipv4::MIN_LEN + 4
            && ETH_LEN + tot_len <= f.len()
        {
            *key = FlowKey {
                ctx,
                src_ip: u32_at(plain::IP_SRC),
                dst_ip: u32_at(plain::IP_DST),
                src_port: u16_at(plain::SRC_PORT),
                dst_port: u16_at(plain::DST_PORT),
                proto,
                flags: 0,
                pad: 0,
            };
            return Kind::Flow;
        }
    }
    classify_general(f, ctx, key)
}

/// Every case, each field checked on its own (ARP, ICMP, options,
/// fragments, other protocols, and all malformed frames).
#[inline(never)]
fn classify_general(f: &[u8], ctx: u32, key: &mut FlowKey) -> Kind {
    let Some(ethertype) = be16(f, ETH_TYPE) else {
        return Kind::Drop(DropReason::TooShort);
    };
    match ethertype {
        ETHERTYPE_IPV4 => classify_ipv4(f, ctx, key),
        ETHERTYPE_ARP => Kind::Punt(PuntReason::Arp),
        ETHERTYPE_IPV6 => Kind::Drop(DropReason::Ipv6),
        ETHERTYPE_VLAN | ETHERTYPE_QINQ => Kind::Drop(DropReason::VlanTagged),
        _ => Kind::Drop(DropReason::UnsupportedEthertype),
    }
}

fn classify_ipv4(f: &[u8], ctx: u32, key: &mut FlowKey) -> Kind {
    let ip = Ipv4::new(f, ETH_LEN);
    let (Some(ver_ihl), Some(tot_len), Some(frag), Some(proto), Some(src), Some(dst), Some(l4)) = (
        ip.ver_ihl(),
        ip.total_len(),
        ip.frag(),
        ip.proto(),
        ip.src(),
        ip.dst(),
        ip.l4(),
    ) else {
        return Kind::Drop(DropReason::TooShort);
    };
    if ver_ihl >> 4 != 4 {
        return Kind::Drop(DropReason::BadIpVersion);
    }
    let hdr_len = l4 - ETH_LEN;
    if hdr_len < ipv4::MIN_LEN {
        return Kind::Drop(DropReason::BadIpHeaderLen);
    }
    let tot_len = usize::from(tot_len);
    if tot_len < hdr_len || ETH_LEN + tot_len > f.len() {
        return Kind::Drop(DropReason::BadIpTotalLen);
    }
    let mut k = FlowKey {
        ctx,
        src_ip: src,
        dst_ip: dst,
        src_port: 0,
        dst_port: 0,
        proto,
        flags: 0,
        pad: 0,
    };
    if frag & ipv4::FRAGMENTED != 0 {
        // MF set or a non-zero offset: only the first fragment has ports,
        // so all fragments share one port-less key.
        k.flags |= KeyFlags::FRAGMENT;
        *key = k;
        return Kind::Flow;
    }
    // The L4 bytes we read must lie inside the IP packet, not in padding.
    let l4_end = ETH_LEN + tot_len;
    let l4_word = |at: usize| if at + 2 <= l4_end { be16(f, at) } else { None };
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let (Some(sp), Some(dp)) = (l4_word(l4 + l4::SRC_PORT), l4_word(l4 + l4::DST_PORT))
            else {
                return Kind::Drop(DropReason::L4TooShort);
            };
            k.src_port = sp;
            k.dst_port = dp;
        }
        IPPROTO_ICMP => {
            let Some(type_code) = l4_word(l4 + l4::ICMP_TYPE_CODE) else {
                return Kind::Drop(DropReason::L4TooShort);
            };
            k.dst_port = type_code;
            // Echo reply (0) and echo request (8) carry an identifier.
            if matches!(type_code >> 8, 0 | 8) {
                let Some(id) = l4_word(l4 + l4::ICMP_ECHO_ID) else {
                    return Kind::Drop(DropReason::L4TooShort);
                };
                k.src_port = id;
            }
        }
        _ => {}
    }
    *key = k;
    Kind::Flow
}

/// Classifies frames by the port they arrived on.
#[derive(Clone, Copy, Debug)]
pub struct Classifier {
    /// The uplink port: its frames must be VXLAN for us.
    pub uplink: PortId,
    pub decap: DecapConfig,
}

impl Classifier {
    /// Classify `frame`, which arrived on `port`; a flow's key goes to `key`.
    #[inline(always)]
    pub fn classify(&self, port: PortId, frame: &[u8], key: &mut FlowKey) -> Classified {
        // Frames are bounded by their chunk, far below u32::MAX.
        // Frames come from descriptors with a u32 length; a longer one is
        // a counted drop, not a wrong length.
        let Ok(len) = u32::try_from(frame.len()) else {
            return Classified {
                kind: Kind::Drop(DropReason::FrameTooLong),
                inner_start: 0,
                inner_len: 0,
                outer_src: 0,
            };
        };
        if port != self.uplink {
            return Classified {
                kind: classify_into(frame, Ingress::Port(port).ctx(), key),
                inner_start: 0,
                inner_len: len,
                outer_src: 0,
            };
        }
        match vxlan::decap(frame, &self.decap) {
            Err(e) => Classified {
                kind: Kind::Drop(e.into()),
                inner_start: 0,
                inner_len: len,
                outer_src: 0,
            },
            Ok(d) => {
                // decap() only returns VNIs read from a 24-bit field, and
                // an inner range inside the frame (so its offset and
                // length fit their fields: if not, a counted drop).
                let (kind, inner_start, inner_len) = match (
                    Vni::new(d.vni),
                    frame.get(d.inner()),
                    u16::try_from(d.inner_start),
                    u32::try_from(d.inner_len),
                ) {
                    (Some(vni), Some(inner), Ok(start), Ok(len)) => (
                        classify_into(inner, Ingress::Vni(vni).ctx(), key),
                        start,
                        len,
                    ),
                    (_, _, Ok(start), Ok(len)) => {
                        (Kind::Drop(DropReason::OuterTooShort), start, len)
                    }
                    _ => (Kind::Drop(DropReason::FrameTooLong), 0, 0),
                };
                Classified {
                    kind,
                    inner_start,
                    inner_len,
                    outer_src: d.outer_src,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const P: Ingress = Ingress::Port(PortId(3));

    /// Ethernet + IPv4 (10.0.0.1 → 10.0.0.2, given protocol) + `l4` bytes.
    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        let tot = u16::try_from(20 + l4.len()).unwrap();
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f.extend_from_slice(l4);
        f
    }

    fn flow(c: Class) -> FlowKey {
        match c {
            Class::Flow(k) => k,
            other => panic!("expected a flow, got {other:?}"),
        }
    }

    #[test]
    fn udp_and_tcp_give_five_tuples() {
        for proto in [IPPROTO_UDP, IPPROTO_TCP] {
            let k = flow(classify_l2(
                &ipv4(proto, &[0x04, 0xd2, 0x00, 0x35, 0, 0, 0, 0]),
                P,
            ));
            assert_eq!(
                k,
                FlowKey::new(P, proto, 0x0a00_0001, 0x0a00_0002, 1234, 53)
            );
        }
    }

    #[test]
    fn icmp_echo_keys_on_type_code_and_identifier() {
        let k = flow(classify_l2(
            &ipv4(IPPROTO_ICMP, &[8, 0, 0xaa, 0xbb, 0x12, 0x34, 0, 1]),
            P,
        ));
        assert_eq!((k.src_port, k.dst_port), (0x1234, 0x0800));
        // Destination unreachable has no identifier.
        let k = flow(classify_l2(&ipv4(IPPROTO_ICMP, &[3, 4, 0, 0]), P));
        assert_eq!((k.src_port, k.dst_port), (0, 0x0304));
        assert_eq!(
            classify_l2(&ipv4(IPPROTO_ICMP, &[8, 0, 0, 0]), P),
            Class::Drop(DropReason::L4TooShort)
        );
    }

    #[test]
    fn fragments_have_no_ports() {
        let mut f = ipv4(IPPROTO_UDP, &[0x04, 0xd2, 0x00, 0x35]);
        f[20] = 0x20; // MF
        let k = flow(classify_l2(&f, P));
        assert_eq!(
            (k.src_port, k.dst_port, k.flags),
            (0, 0, KeyFlags::FRAGMENT)
        );
    }

    #[test]
    fn fast_and_general_paths_agree() {
        // The same TCP/UDP frames through the fast path and the general one.
        for proto in [IPPROTO_UDP, IPPROTO_TCP] {
            for len in [0usize, 3, 4, 10] {
                let f = ipv4(proto, &vec![7u8; len]);
                let (mut a, mut b) = (FlowKey::default(), FlowKey::default());
                let ka = classify_into(&f, P.ctx(), &mut a);
                let kb = classify_general(&f, P.ctx(), &mut b);
                assert_eq!(ka, kb, "proto {proto} l4 len {len}");
                if ka == Kind::Flow {
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn other_protocols_key_on_addresses() {
        let k = flow(classify_l2(&ipv4(47, &[]), P));
        assert_eq!((k.proto, k.src_port, k.dst_port), (47, 0, 0));
    }

    #[test]
    fn arp_is_punted_and_other_ethertypes_dropped() {
        let mut f = vec![0u8; 42];
        f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(classify_l2(&f, P), Class::Punt(PuntReason::Arp));
        for (et, r) in [
            (ETHERTYPE_IPV6, DropReason::Ipv6),
            (ETHERTYPE_VLAN, DropReason::VlanTagged),
            (0x88cc, DropReason::UnsupportedEthertype),
        ] {
            f[12..14].copy_from_slice(&et.to_be_bytes());
            assert_eq!(classify_l2(&f, P), Class::Drop(r));
        }
    }

    #[test]
    fn malformed_ipv4_is_dropped_by_reason() {
        assert_eq!(classify_l2(&[0; 13], P), Class::Drop(DropReason::TooShort));
        let good = ipv4(IPPROTO_UDP, &[0, 1, 0, 2]);
        assert_eq!(
            classify_l2(&good[..33], P),
            Class::Drop(DropReason::TooShort)
        );
        let mut f = good.clone();
        f[14] = 0x65;
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::BadIpVersion));
        f[14] = 0x44;
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::BadIpHeaderLen));
        let mut f = good.clone();
        f[16..18].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::BadIpTotalLen));
        let mut f = good.clone();
        f[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::BadIpTotalLen));
        // IHL says 24 bytes of header; the ports would be past the packet.
        let mut f = good.clone();
        f[14] = 0x46;
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::L4TooShort));
        // Ports in Ethernet padding (beyond the IP total length) don't count.
        let mut f = ipv4(IPPROTO_UDP, &[0, 1]);
        f.extend_from_slice(&[0, 2, 0, 0]);
        assert_eq!(classify_l2(&f, P), Class::Drop(DropReason::L4TooShort));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let c = Classifier {
                uplink: PortId(0),
                decap: DecapConfig { local_vtep: 0x0a00_0002, udp_port: 4789 },
            };
            let mut k = FlowKey::default();
            let out = c.classify(PortId(0), &bytes, &mut k);
            if out.kind == Kind::Flow {
                prop_assert!(usize::from(out.inner_start) + out.inner_len as usize <= bytes.len());
            }
            let _ = c.classify(PortId(1), &bytes, &mut k);
        }
    }
}
