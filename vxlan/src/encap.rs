//! Encapsulation: prepend prebuilt outer headers in the frame's headroom.
//!
//! A [`Template`] holds the 50 outer bytes with every per-destination field
//! final (MACs, VTEP addresses, TTL, DF, VNI, UDP destination port). Its
//! IPv4 checksum field holds the checksum computed with a total length of
//! zero, so [`encap`] finishes it with one RFC 1624 update instead of
//! summing the header per packet. The UDP checksum is zero, as RFC 7348
//! recommends for IPv4.

use std::net::Ipv4Addr;

use thiserror::Error;

use crate::checksum;
use crate::wire::{
    outer, Header, Repr, ETHERTYPE_IPV4, IPPROTO_UDP, IPV4_LEN, IP_DF, OUTER_LEN, UDP_LEN, UDP_PORT,
};

/// What a template is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateSpec {
    /// Our uplink's MAC.
    pub src_mac: [u8; 6],
    /// The next hop's MAC towards the remote VTEP.
    pub dst_mac: [u8; 6],
    pub local_vtep: Ipv4Addr,
    pub remote_vtep: Ipv4Addr,
    pub vni: u32,
    pub ttl: u8,
}

/// Why a template could not be built.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TemplateError {
    #[error("VNI {0} does not fit in 24 bits")]
    VniTooLarge(u32),
    #[error("outer TTL must be at least 1")]
    ZeroTtl,
}

/// Prebuilt outer headers (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Template([u8; OUTER_LEN]);

impl Template {
    /// Build the outer headers for `spec`.
    pub fn new(spec: &TemplateSpec) -> Result<Template, TemplateError> {
        if spec.vni > 0x00ff_ffff {
            return Err(TemplateError::VniTooLarge(spec.vni));
        }
        if spec.ttl == 0 {
            return Err(TemplateError::ZeroTtl);
        }
        let mut b = [0u8; OUTER_LEN];
        b[outer::ETH_DST].copy_from_slice(&spec.dst_mac);
        b[outer::ETH_SRC].copy_from_slice(&spec.src_mac);
        b[outer::ETH_TYPE].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        b[outer::IP_VER_IHL] = 0x45;
        b[outer::IP_FRAG].copy_from_slice(&IP_DF.to_be_bytes());
        b[outer::IP_TTL] = spec.ttl;
        b[outer::IP_PROTO] = IPPROTO_UDP;
        b[outer::IP_SRC].copy_from_slice(&spec.local_vtep.octets());
        b[outer::IP_DST].copy_from_slice(&spec.remote_vtep.octets());
        let c = checksum::checksum(&b[outer::IP_HDR]);
        b[outer::IP_CSUM].copy_from_slice(&c.to_be_bytes());
        b[outer::UDP_DST].copy_from_slice(&UDP_PORT.to_be_bytes());
        Repr { vni: spec.vni }.emit(&mut Header::new_unchecked(&mut b[outer::VXLAN..]));
        Ok(Template(b))
    }

    /// Wrap bytes produced by [`Template::bytes`] (e.g. stored in a flow).
    pub const fn from_bytes(b: [u8; OUTER_LEN]) -> Template {
        Template(b)
    }

    /// The outer header bytes.
    pub const fn bytes(&self) -> &[u8; OUTER_LEN] {
        &self.0
    }
}

/// Why a frame could not be encapsulated. The frame is untouched.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EncapError {
    #[error("frame at offset {start} has less than {OUTER_LEN} bytes of headroom")]
    NoHeadroom { start: usize },
    #[error("frame {start}+{len} lies outside its {buf_len}-byte buffer")]
    OutOfBounds {
        start: usize,
        len: usize,
        buf_len: usize,
    },
    #[error("inner frame of {len} bytes is too long for an IPv4 packet")]
    TooLong { len: usize },
}

/// The outer UDP source port for a flow: RFC 7348 §5 asks for a hash of the
/// inner headers in the dynamic range 49152–65535, so that ECMP in the
/// underlay spreads flows while keeping each one on one path.
#[inline(always)]
pub fn source_port(flow_hash: u64) -> u16 {
    // The flow hash comes out of a folded 128-bit multiply, so its low bits
    // are as well mixed as any: take 14 of them.
    #[allow(clippy::cast_possible_truncation)]
    let low = (flow_hash & 0x3fff) as u16;
    0xc000 | low
}

/// Encapsulate the inner frame `buf[start..start + len]` in place: the
/// outer headers go into the 50 bytes before `start`. Returns the new
/// start; the new length is `len + OUTER_LEN`. `t` is a
/// [`Template::bytes`] (flows store templates as plain bytes).
#[inline]
pub fn encap(
    buf: &mut [u8],
    start: usize,
    len: usize,
    t: &[u8; OUTER_LEN],
    flow_hash: u64,
) -> Result<usize, EncapError> {
    if start < OUTER_LEN {
        return Err(EncapError::NoHeadroom { start });
    }
    if start.checked_add(len).is_none_or(|end| end > buf.len()) {
        return Err(EncapError::OutOfBounds {
            start,
            len,
            buf_len: buf.len(),
        });
    }
    let Ok(ip_len) = u16::try_from(len + IPV4_LEN + UDP_LEN + crate::wire::HEADER_LEN) else {
        return Err(EncapError::TooLong { len });
    };
    let new_start = start - OUTER_LEN;
    let o = outer_at(buf, new_start, t, flow_hash).ok_or(EncapError::NoHeadroom { start })?;
    let hc = u16::from_be_bytes([t[outer::IP_CSUM.start], t[outer::IP_CSUM.start + 1]]);
    let csum = checksum::update(hc, 0, ip_len).to_be_bytes();
    // ip_len ≥ 36, so the UDP length (ip_len − 20) cannot underflow.
    let udp_len = (ip_len - 20).to_be_bytes();
    let ip_len = ip_len.to_be_bytes();
    o[outer::IP_TOT_LEN.start] = ip_len[0];
    o[outer::IP_TOT_LEN.start + 1] = ip_len[1];
    o[outer::IP_CSUM.start] = csum[0];
    o[outer::IP_CSUM.start + 1] = csum[1];
    o[outer::UDP_LEN.start] = udp_len[0];
    o[outer::UDP_LEN.start + 1] = udp_len[1];
    Ok(new_start)
}

/// The template and the flow's source port written at `buf[at..]`; its
/// lengths and IPv4 checksum are the template's (those of a zero-length
/// packet). `None` if the 50 bytes do not fit.
#[inline(always)]
fn outer_at<'b>(
    buf: &'b mut [u8],
    at: usize,
    t: &[u8; OUTER_LEN],
    flow_hash: u64,
) -> Option<&'b mut [u8; OUTER_LEN]> {
    // One bounds check for the whole outer header; the fixed offsets
    // index an array and need none.
    let o = buf.get_mut(at..)?.first_chunk_mut::<OUTER_LEN>()?;
    *o = *t;
    let sport = source_port(flow_hash).to_be_bytes();
    o[outer::UDP_SRC.start] = sport[0];
    o[outer::UDP_SRC.start + 1] = sport[1];
    Some(o)
}

/// The outer headers of a super-frame that will be cut into segments
/// (`buf[start..]` is the inner frame): written before `start` like
/// [`encap`], but with the template's lengths and checksum, which the
/// segmenter sets per segment (a super-frame's length may not fit them).
/// Returns the new start.
pub fn encap_for_segmentation(
    buf: &mut [u8],
    start: usize,
    t: &[u8; OUTER_LEN],
    flow_hash: u64,
) -> Result<usize, EncapError> {
    let at = start
        .checked_sub(OUTER_LEN)
        .ok_or(EncapError::NoHeadroom { start })?;
    outer_at(buf, at, t, flow_hash).ok_or(EncapError::NoHeadroom { start })?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TemplateSpec {
        TemplateSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            local_vtep: Ipv4Addr::new(10, 0, 0, 1),
            remote_vtep: Ipv4Addr::new(10, 0, 0, 2),
            vni: 0x1234,
            ttl: 64,
        }
    }

    /// The whole outer header for a 64-byte inner frame and flow hash 0,
    /// worked out by hand:
    /// IPv4 words 4500 0064 0000 4000 4011 ---- 0a00 0001 0a00 0002 sum to
    /// d978, so the checksum is ~d978 = 2687. UDP length 8+8+64 = 0x50,
    /// source port 0xc000 (hash 0), checksum 0. VXLAN: I flag, VNI 0x001234.
    const EXPECTED: [u8; OUTER_LEN] = [
        0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00, // Ethernet
        0x45, 0x00, 0x00, 0x64, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x26, 0x87, // IPv4 ...
        0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, // ... addresses
        0xc0, 0x00, 0x12, 0xb5, 0x00, 0x50, 0x00, 0x00, // UDP
        0x08, 0x00, 0x00, 0x00, 0x00, 0x12, 0x34, 0x00, // VXLAN
    ];

    #[test]
    fn byte_exact_against_a_hand_computed_vector() {
        let t = Template::new(&spec()).unwrap();
        let mut buf = [0xaau8; 256];
        let inner: Vec<u8> = (0..64u8).collect();
        buf[128..192].copy_from_slice(&inner);
        let s = encap(&mut buf, 128, 64, t.bytes(), 0).unwrap();
        assert_eq!(s, 128 - OUTER_LEN);
        assert_eq!(buf[s..128], EXPECTED);
        assert_eq!(buf[128..192], inner[..], "inner frame untouched");
        assert!(
            buf[..s].iter().all(|&b| b == 0xaa),
            "nothing written before the outer header"
        );
    }

    #[test]
    fn checksum_is_valid_for_every_length() {
        let t = Template::new(&spec()).unwrap();
        let mut buf = vec![0u8; 10_000];
        for len in [14, 60, 64, 1500, 1514, 9000] {
            let s = encap(&mut buf, 64, len, t.bytes(), 0xdead_beef).unwrap();
            assert_eq!(
                checksum::fold(checksum::sum(&buf[s + 14..s + 34])),
                0xffff,
                "len {len}"
            );
            let tot = u16::from_be_bytes([buf[s + 16], buf[s + 17]]);
            assert_eq!(usize::from(tot), len + 36);
        }
    }

    #[test]
    fn source_port_stays_in_the_dynamic_range() {
        for h in [0u64, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            assert!(source_port(h) >= 49152);
        }
        assert_ne!(source_port(1), source_port(2));
    }

    #[test]
    fn errors_leave_the_frame_alone() {
        let t = Template::new(&spec()).unwrap();
        let mut buf = [7u8; 128];
        assert_eq!(
            encap(&mut buf, 49, 10, t.bytes(), 0),
            Err(EncapError::NoHeadroom { start: 49 })
        );
        assert!(matches!(
            encap(&mut buf, 64, 65, t.bytes(), 0),
            Err(EncapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            encap(&mut buf, 64, usize::MAX, t.bytes(), 0),
            Err(EncapError::OutOfBounds { .. })
        ));
        let mut big = vec![0u8; 70_000];
        assert_eq!(
            encap(&mut big, 64, 65_500, t.bytes(), 0),
            Err(EncapError::TooLong { len: 65_500 })
        );
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn template_rejects_bad_specs() {
        let mut s = spec();
        s.vni = 1 << 24;
        assert_eq!(Template::new(&s), Err(TemplateError::VniTooLarge(1 << 24)));
        let mut s = spec();
        s.ttl = 0;
        assert_eq!(Template::new(&s), Err(TemplateError::ZeroTtl));
    }
}
