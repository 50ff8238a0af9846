//! The fields of Ethernet, IPv4, TCP, UDP and ICMP headers the fast path
//! reads and rewrites, by name: protocol numbers, offsets, big-endian
//! reads and writes that never panic, and [`Ipv4`], a view of an IPv4
//! packet inside a frame.
//!
//! Hand-written rather than `smoltcp::wire`: smoltcp's views check a
//! whole header when made (`new_checked`), while the fast path's common
//! case decides a frame after a single length check on a fixed-size
//! array (`classify`), which these offsets name; the slow path, where
//! that cost does not matter, uses smoltcp. Constants shared with the
//! VXLAN crate come from `vxlan::wire` (one definition).

pub use vxlan::wire::{ETHERTYPE_IPV4, ETH_LEN, IPPROTO_UDP};

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_SCTP: u8 = 132;

/// Where the EtherType is in an Ethernet header.
pub const ETH_TYPE: usize = 12;

/// Offsets inside an IPv4 header.
pub mod ipv4 {
    /// Version (high nibble) and header length in 32-bit words.
    pub const VER_IHL: usize = 0;
    pub const TOT_LEN: usize = 2;
    /// Flags and fragment offset.
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// A header without options.
    pub const MIN_LEN: usize = 20;
    /// `VER_IHL` of a header without options.
    pub const VER_IHL_PLAIN: u8 = 0x45;
    /// The "more fragments" bit and the offset: non-zero in any fragment.
    pub const FRAGMENTED: u16 = 0x3fff;
}

/// Offsets inside L4 headers.
pub mod l4 {
    /// TCP, UDP and SCTP ports.
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    /// ICMP type and code (one 16-bit word), and an echo's identifier.
    pub const ICMP_TYPE_CODE: usize = 0;
    pub const ICMP_ECHO_ID: usize = 4;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CSUM: usize = 16;
    pub const UDP_CSUM: usize = 6;
    pub const ICMP_CSUM: usize = 2;
}

/// Offsets in a frame of untagged Ethernet, an IPv4 header without
/// options, and L4 ports: what the classifier's common case reads.
pub mod plain {
    use super::{ipv4, l4, ETH_LEN};
    pub const IP: usize = ETH_LEN;
    pub const IP_VER_IHL: usize = IP + ipv4::VER_IHL;
    pub const IP_TOT_LEN: usize = IP + ipv4::TOT_LEN;
    pub const IP_FRAG: usize = IP + ipv4::FRAG;
    pub const IP_PROTO: usize = IP + ipv4::PROTO;
    pub const IP_SRC: usize = IP + ipv4::SRC;
    pub const IP_DST: usize = IP + ipv4::DST;
    pub const L4: usize = IP + ipv4::MIN_LEN;
    pub const SRC_PORT: usize = L4 + l4::SRC_PORT;
    pub const DST_PORT: usize = L4 + l4::DST_PORT;
    /// Bytes the common case reads.
    pub const LEN: usize = L4 + 4;
}

/// The big-endian u16 at `at`, if inside `b`.
#[inline(always)]
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at.checked_add(1)?)?,
    ]))
}

/// The big-endian u32 at `at`, if inside `b`.
#[inline(always)]
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Write `v` big-endian at `at`, if inside `b`.
#[inline(always)]
pub fn put_be16(b: &mut [u8], at: usize, v: u16) -> Option<()> {
    b.get_mut(at..at.checked_add(2)?)?
        .copy_from_slice(&v.to_be_bytes());
    Some(())
}

/// An IPv4 packet at offset `at` of a frame. Every accessor is
/// bounds-checked against the frame and returns `None` past its end.
#[derive(Debug)]
pub struct Ipv4<B> {
    buf: B,
    at: usize,
}

impl<B: AsRef<[u8]>> Ipv4<B> {
    pub fn new(buf: B, at: usize) -> Self {
        Ipv4 { buf, at }
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    pub fn ver_ihl(&self) -> Option<u8> {
        self.b().get(self.at + ipv4::VER_IHL).copied()
    }

    /// The header's length in bytes (from IHL; not checked against 20).
    pub fn header_len(&self) -> Option<usize> {
        Some(usize::from(self.ver_ihl()? & 0x0f) * 4)
    }

    pub fn total_len(&self) -> Option<u16> {
        be16(self.b(), self.at + ipv4::TOT_LEN)
    }

    pub fn frag(&self) -> Option<u16> {
        be16(self.b(), self.at + ipv4::FRAG)
    }

    pub fn ttl(&self) -> Option<u8> {
        self.b().get(self.at + ipv4::TTL).copied()
    }

    pub fn proto(&self) -> Option<u8> {
        self.b().get(self.at + ipv4::PROTO).copied()
    }

    pub fn src(&self) -> Option<u32> {
        be32(self.b(), self.at + ipv4::SRC)
    }

    pub fn dst(&self) -> Option<u32> {
        be32(self.b(), self.at + ipv4::DST)
    }

    /// Where the L4 header starts in the frame (after the options).
    pub fn l4(&self) -> Option<usize> {
        Some(self.at + self.header_len()?)
    }

    /// The TCP flags byte (`None` if the TCP header is cut short).
    pub fn tcp_flags(&self) -> Option<u8> {
        self.b().get(self.l4()? + l4::TCP_FLAGS).copied()
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Ipv4<B> {
    /// Decrement the TTL, updating the header checksum (RFC 1624). The
    /// caller checked the TTL is above 1.
    pub fn dec_ttl(&mut self) -> Option<()> {
        let at = self.at;
        let b = self.buf.as_mut();
        let old = be16(b, at + ipv4::TTL)?;
        let csum = be16(b, at + ipv4::CSUM)?;
        let new = old.checked_sub(0x0100)?;
        put_be16(b, at + ipv4::TTL, new)?;
        put_be16(b, at + ipv4::CSUM, vxlan::checksum::update(csum, old, new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_none_not_panics() {
        let b = [0u8; 3];
        assert_eq!(be16(&b, 1), Some(0));
        assert_eq!(be16(&b, 2), None);
        assert_eq!(be16(&b, usize::MAX), None);
        assert_eq!(be32(&b, 0), None);
        assert_eq!(be32(&b, usize::MAX - 1), None);
        let mut m = [0u8; 2];
        assert_eq!(put_be16(&mut m, 1, 7), None);
        assert_eq!(put_be16(&mut m, 0, 0x0102), Some(()));
        assert_eq!(m, [1, 2]);
        let ip = Ipv4::new(&b[..], 0);
        assert_eq!((ip.ttl(), ip.src(), ip.l4()), (None, None, Some(0)));
    }

    #[test]
    fn the_plain_offsets_are_those_of_ethernet_and_an_option_less_header() {
        // The same fields the VXLAN crate names for an outer header.
        use vxlan::wire::outer;
        assert_eq!(plain::IP_TOT_LEN, outer::IP_TOT_LEN.start);
        assert_eq!(plain::IP_FRAG, outer::IP_FRAG.start);
        assert_eq!(plain::IP_PROTO, outer::IP_PROTO);
        assert_eq!(plain::IP_SRC, outer::IP_SRC.start);
        assert_eq!(plain::IP_DST, outer::IP_DST.start);
        assert_eq!(plain::SRC_PORT, outer::UDP_SRC.start);
        assert_eq!(plain::DST_PORT, outer::UDP_DST.start);
    }

    #[test]
    fn a_ttl_decrement_keeps_the_header_checksum_valid() {
        let mut h = [
            0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = vxlan::checksum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut ip = Ipv4::new(&mut h[..], 0);
        ip.dec_ttl().unwrap();
        assert_eq!(ip.ttl(), Some(63));
        assert_eq!(vxlan::checksum::checksum(&h), 0);
    }
}
