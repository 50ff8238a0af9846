//! Decapsulation: validate the outer headers of a frame from the uplink
//! and locate the inner frame. Nothing is copied or written; the caller
//! moves its frame start to [`Decapped::inner_start`].
//!
//! Every check has its own error, so the fast path counts drops by reason.
//! The outer IPv4 header checksum is verified (20 bytes, a few ns); the
//! optional UDP checksum is not (RFC 7348 §5 makes it optional on receipt,
//! and the inner packet's own checksums protect the payload end to end).

use std::ops::Range;

use thiserror::Error;

use crate::checksum;
use crate::wire::{
    outer, Header, HeaderError, ETHERTYPE_IPV4, ETH_LEN, IPPROTO_UDP, IPV4_LEN, IP_MF, IP_OFFSET,
    MIN_INNER_LEN, OUTER_LEN, UDP_LEN,
};

/// What the receiving side expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecapConfig {
    /// Our VTEP address (host-order IPv4).
    pub local_vtep: u32,
    /// The VXLAN UDP port, normally [`crate::wire::UDP_PORT`].
    pub udp_port: u16,
}

/// A validated VXLAN packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapped {
    pub vni: u32,
    /// Outer source address: the sending VTEP (host order).
    pub outer_src: u32,
    /// Offset of the inner Ethernet frame within the outer frame.
    pub inner_start: usize,
    /// Length of the inner frame (bounded by the UDP length, so Ethernet
    /// padding after the outer packet is not part of it).
    pub inner_len: usize,
}

impl Decapped {
    /// The inner frame's byte range within the outer frame.
    pub fn inner(&self) -> Range<usize> {
        self.inner_start..self.inner_start + self.inner_len
    }
}

/// Why a frame is not a VXLAN packet for us.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DecapError {
    #[error("frame of {0} bytes is shorter than the outer headers plus an inner Ethernet header")]
    TooShort(usize),
    #[error("outer ethertype {0:#06x} is not IPv4")]
    NotIpv4(u16),
    #[error("outer IP version {0} is not 4")]
    BadIpVersion(u8),
    #[error("outer IPv4 header length {0} words is below the minimum of 5")]
    BadIpHeaderLen(u8),
    #[error("outer IPv4 header has options ({0} words)")]
    IpOptions(u8),
    #[error("outer IPv4 total length {tot_len} does not fit the {frame_len}-byte frame")]
    BadIpTotalLen { tot_len: u16, frame_len: usize },
    #[error("outer IPv4 packet is a fragment (flags/offset {0:#06x})")]
    Fragment(u16),
    #[error("outer IPv4 header checksum is wrong")]
    BadIpChecksum,
    #[error("outer IP protocol {0} is not UDP")]
    NotUdp(u8),
    #[error("outer destination {0:#010x} is not our VTEP")]
    NotLocalVtep(u32),
    #[error("UDP destination port {0} is not the VXLAN port")]
    NotVxlanPort(u16),
    #[error("UDP length {udp_len} is inconsistent with the IP payload of {ip_payload} bytes")]
    BadUdpLen { udp_len: u16, ip_payload: u16 },
    #[error(transparent)]
    Header(#[from] HeaderError),
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Validate `frame` (starting at the outer Ethernet header) as a VXLAN
/// packet addressed to `cfg`, and locate its inner frame.
///
/// A valid packet is recognised with a handful of whole-word compares on
/// the fixed 50-byte header; anything else goes through
/// [`decap_checked`], which tests one field at a time to name the defect.
/// Both accept exactly the same packets (property-tested).
#[inline(always)]
pub fn decap(frame: &[u8], cfg: &DecapConfig) -> Result<Decapped, DecapError> {
    if let (Some(f), true) = (
        frame.first_chunk::<OUTER_LEN>(),
        frame.len() >= OUTER_LEN + MIN_INNER_LEN,
    ) {
        let w = |i: usize| u32::from_be_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
        let tot_len = be16(f, outer::IP_TOT_LEN.start);
        let udp_len = be16(f, outer::UDP_LEN.start);
        let min = IPV4_LEN + UDP_LEN + crate::wire::HEADER_LEN + MIN_INNER_LEN;
        // Ethertype 0x0800, version 4, IHL 5 (TOS is free).
        let ok = w(12) & 0xffff_ff00 == 0x0800_4500
            // No MF, no fragment offset (DF is free); protocol UDP (TTL free).
            && w(20) & 0x3fff_00ff == u32::from(IPPROTO_UDP)
            && w(outer::IP_DST.start) == cfg.local_vtep
            && be16(f, outer::UDP_DST.start) == cfg.udp_port
            && w(outer::VXLAN) == u32::from(crate::wire::FLAG_I) << 24
            && f[outer::VXLAN + 7] == 0
            && usize::from(tot_len) >= min
            && usize::from(tot_len) <= frame.len() - ETH_LEN
            && u32::from(udp_len) + 20 == u32::from(tot_len)
            && f[outer::IP_HDR].first_chunk::<20>().is_some_and(checksum::ipv4_header_ok);
        if ok {
            return Ok(Decapped {
                vni: w(outer::VXLAN + 4) >> 8,
                outer_src: w(outer::IP_SRC.start),
                inner_start: OUTER_LEN,
                inner_len: usize::from(udp_len) - UDP_LEN - crate::wire::HEADER_LEN,
            });
        }
    }
    decap_checked(frame, cfg)
}

/// [`decap`] one field at a time, returning the first defect found.
#[inline(never)]
pub fn decap_checked(frame: &[u8], cfg: &DecapConfig) -> Result<Decapped, DecapError> {
    if frame.len() < OUTER_LEN + MIN_INNER_LEN {
        return Err(DecapError::TooShort(frame.len()));
    }
    // From here on every fixed offset below OUTER_LEN is in bounds.
    let f = &frame[..OUTER_LEN];
    let ethertype = be16(f, outer::ETH_TYPE.start);
    if ethertype != ETHERTYPE_IPV4 {
        return Err(DecapError::NotIpv4(ethertype));
    }
    let ver_ihl = f[outer::IP_VER_IHL];
    if ver_ihl >> 4 != 4 {
        return Err(DecapError::BadIpVersion(ver_ihl >> 4));
    }
    let ihl = ver_ihl & 0x0f;
    if ihl < 5 {
        return Err(DecapError::BadIpHeaderLen(ihl));
    }
    if ihl > 5 {
        return Err(DecapError::IpOptions(ihl));
    }
    let tot_len = be16(f, outer::IP_TOT_LEN.start);
    let min = IPV4_LEN + UDP_LEN + crate::wire::HEADER_LEN + MIN_INNER_LEN;
    if usize::from(tot_len) < min || usize::from(tot_len) > frame.len() - ETH_LEN {
        return Err(DecapError::BadIpTotalLen {
            tot_len,
            frame_len: frame.len(),
        });
    }
    let frag = be16(f, outer::IP_FRAG.start);
    if frag & (IP_MF | IP_OFFSET) != 0 {
        return Err(DecapError::Fragment(frag));
    }
    if checksum::fold(checksum::sum(&f[outer::IP_HDR])) != 0xffff {
        return Err(DecapError::BadIpChecksum);
    }
    let proto = f[outer::IP_PROTO];
    if proto != IPPROTO_UDP {
        return Err(DecapError::NotUdp(proto));
    }
    let dst = be32(f, outer::IP_DST.start);
    if dst != cfg.local_vtep {
        return Err(DecapError::NotLocalVtep(dst));
    }
    let dport = be16(f, outer::UDP_DST.start);
    if dport != cfg.udp_port {
        return Err(DecapError::NotVxlanPort(dport));
    }
    let udp_len = be16(f, outer::UDP_LEN.start);
    // tot_len ≥ min > 20, so this cannot underflow.
    let ip_payload = tot_len - 20;
    if udp_len != ip_payload {
        return Err(DecapError::BadUdpLen {
            udp_len,
            ip_payload,
        });
    }
    let vx = Header::new_unchecked(&f[outer::VXLAN..]);
    vx.check_flags()?;
    Ok(Decapped {
        vni: vx.vni(),
        outer_src: be32(f, outer::IP_SRC.start),
        inner_start: OUTER_LEN,
        inner_len: usize::from(udp_len) - UDP_LEN - crate::wire::HEADER_LEN,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::encap::{encap, Template, TemplateSpec};
    use crate::wire::UDP_PORT;

    const LOCAL: u32 = 0x0a00_0002;

    fn cfg() -> DecapConfig {
        DecapConfig {
            local_vtep: LOCAL,
            udp_port: UDP_PORT,
        }
    }

    /// A valid packet: 64-byte inner frame from 10.0.0.1 to us, VNI 0x1234.
    fn packet() -> Vec<u8> {
        let t = Template::new(&TemplateSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            local_vtep: Ipv4Addr::new(10, 0, 0, 1),
            remote_vtep: Ipv4Addr::from(LOCAL),
            vni: 0x1234,
            ttl: 64,
        })
        .unwrap();
        let mut buf = vec![0u8; OUTER_LEN + 64];
        for (i, b) in buf[OUTER_LEN..].iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap();
        }
        let s = encap(&mut buf, OUTER_LEN, 64, t.bytes(), 7).unwrap();
        assert_eq!(s, 0);
        buf
    }

    /// Set a 16-bit field and fix the IPv4 checksum, so only the intended
    /// defect is present.
    fn set16(p: &mut [u8], at: usize, v: u16) {
        p[at..at + 2].copy_from_slice(&v.to_be_bytes());
        fix_csum(p);
    }

    fn fix_csum(p: &mut [u8]) {
        p[outer::IP_CSUM].fill(0);
        let c = checksum::checksum(&p[outer::IP_HDR]);
        p[outer::IP_CSUM].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn valid_packet_round_trips() {
        let p = packet();
        let d = decap(&p, &cfg()).unwrap();
        assert_eq!(d.vni, 0x1234);
        assert_eq!(d.outer_src, 0x0a00_0001);
        assert_eq!(d.inner(), OUTER_LEN..OUTER_LEN + 64);
        assert_eq!(p[d.inner()][..4], [0, 1, 2, 3]);
    }

    #[test]
    fn ethernet_padding_is_not_part_of_the_inner_frame() {
        let mut p = packet();
        p.extend_from_slice(&[0; 10]);
        assert_eq!(decap(&p, &cfg()).unwrap().inner_len, 64);
    }

    #[test]
    fn truncated() {
        let p = packet();
        for n in [0, 13, 33, 49, 63] {
            assert_eq!(decap(&p[..n], &cfg()), Err(DecapError::TooShort(n)));
        }
        // Long enough for the headers, but shorter than the IP length says.
        assert!(matches!(
            decap(&p[..100], &cfg()),
            Err(DecapError::BadIpTotalLen { tot_len: 100, .. })
        ));
    }

    #[test]
    fn wrong_lengths() {
        let mut p = packet();
        set16(&mut p, outer::IP_TOT_LEN.start, 49);
        assert!(matches!(
            decap(&p, &cfg()),
            Err(DecapError::BadIpTotalLen { tot_len: 49, .. })
        ));
        let mut p = packet();
        set16(&mut p, outer::IP_TOT_LEN.start, 0xffff);
        assert!(matches!(
            decap(&p, &cfg()),
            Err(DecapError::BadIpTotalLen { .. })
        ));
        let mut p = packet();
        set16(&mut p, outer::UDP_LEN.start, 81);
        assert_eq!(
            decap(&p, &cfg()),
            Err(DecapError::BadUdpLen {
                udp_len: 81,
                ip_payload: 80
            })
        );
        let mut p = packet();
        set16(&mut p, outer::UDP_LEN.start, 3);
        assert!(matches!(
            decap(&p, &cfg()),
            Err(DecapError::BadUdpLen { udp_len: 3, .. })
        ));
    }

    #[test]
    fn bad_flags() {
        let mut p = packet();
        p[outer::VXLAN] = 0;
        assert_eq!(
            decap(&p, &cfg()),
            Err(DecapError::Header(HeaderError::MissingIFlag(0)))
        );
        let mut p = packet();
        p[outer::VXLAN + 7] = 1;
        assert!(matches!(
            decap(&p, &cfg()),
            Err(DecapError::Header(HeaderError::ReservedBits { .. }))
        ));
    }

    #[test]
    fn ip_options_and_bad_ihl() {
        let mut p = packet();
        p[outer::IP_VER_IHL] = 0x46;
        fix_csum(&mut p);
        assert_eq!(decap(&p, &cfg()), Err(DecapError::IpOptions(6)));
        p[outer::IP_VER_IHL] = 0x44;
        assert_eq!(decap(&p, &cfg()), Err(DecapError::BadIpHeaderLen(4)));
        p[outer::IP_VER_IHL] = 0x65;
        assert_eq!(decap(&p, &cfg()), Err(DecapError::BadIpVersion(6)));
    }

    #[test]
    fn fragments() {
        for frag in [0x2000, 0x0001, 0x4001, 0x3fff] {
            let mut p = packet();
            set16(&mut p, outer::IP_FRAG.start, frag);
            assert_eq!(decap(&p, &cfg()), Err(DecapError::Fragment(frag)));
        }
    }

    #[test]
    fn checksum_protocol_address_and_port() {
        let mut p = packet();
        p[outer::IP_CSUM.start] ^= 1;
        assert_eq!(decap(&p, &cfg()), Err(DecapError::BadIpChecksum));
        let mut p = packet();
        p[outer::IP_PROTO] = 6;
        fix_csum(&mut p);
        assert_eq!(decap(&p, &cfg()), Err(DecapError::NotUdp(6)));
        let mut c = cfg();
        c.local_vtep = 0x0a00_0003;
        assert_eq!(decap(&packet(), &c), Err(DecapError::NotLocalVtep(LOCAL)));
        let mut p = packet();
        p[outer::UDP_DST].copy_from_slice(&4790u16.to_be_bytes());
        assert_eq!(decap(&p, &cfg()), Err(DecapError::NotVxlanPort(4790)));
        let mut p = packet();
        p[outer::ETH_TYPE].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(decap(&p, &cfg()), Err(DecapError::NotIpv4(0x86dd)));
    }

    proptest! {
        /// Any bytes give a result, and an accepted packet's inner range is
        /// inside the frame.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(d) = decap(&bytes, &cfg()) {
                prop_assert!(d.inner().end <= bytes.len());
            }
        }

        /// Mutating a valid packet anywhere never panics, and the fast
        /// path accepts exactly what the field-by-field check accepts.
        #[test]
        fn mutated_packets_never_panic_and_paths_agree(
            muts in prop::collection::vec((0usize..114, any::<u8>()), 0..3),
            cut in 0usize..200,
            fix in any::<bool>(),
        ) {
            let mut p = packet();
            for (at, v) in muts {
                p[at] = v;
            }
            if fix {
                fix_csum(&mut p);
            }
            p.resize(cut.max(1), 0);
            let fast = decap(&p, &cfg());
            prop_assert_eq!(fast.is_ok(), decap_checked(&p, &cfg()).is_ok());
            if let Ok(d) = fast {
                prop_assert_eq!(Ok(d), decap_checked(&p, &cfg()));
                prop_assert!(d.inner().end <= p.len());
            }
        }
    }
}
