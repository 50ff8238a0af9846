//! Wire layout of a VXLAN packet over IPv4 (RFC 7348 §5): the VXLAN header
//! view, and the fixed offsets of the outer headers.
//!
//! [`Header::new_checked`] checks the length once; after it no accessor
//! can panic. Setters exist only for mutable buffers.

use thiserror::Error;

/// The IANA-assigned VXLAN UDP port.
pub const UDP_PORT: u16 = 4789;
/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// Outer Ethernet + IPv4 (no options) + UDP + VXLAN.
pub const OUTER_LEN: usize = ETH_LEN + IPV4_LEN + UDP_LEN + HEADER_LEN;
/// Smallest inner frame: an Ethernet header.
pub const MIN_INNER_LEN: usize = ETH_LEN;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;

/// Byte offsets of the outer headers inside a frame that starts with the
/// outer Ethernet header.
pub mod outer {
    use std::ops::Range;
    pub const ETH_DST: Range<usize> = 0..6;
    pub const ETH_SRC: Range<usize> = 6..12;
    pub const ETH_TYPE: Range<usize> = 12..14;
    pub const IP: usize = 14;
    pub const IP_VER_IHL: usize = IP;
    pub const IP_TOS: usize = IP + 1;
    pub const IP_TOT_LEN: Range<usize> = IP + 2..IP + 4;
    pub const IP_ID: Range<usize> = IP + 4..IP + 6;
    pub const IP_FRAG: Range<usize> = IP + 6..IP + 8;
    pub const IP_TTL: usize = IP + 8;
    pub const IP_PROTO: usize = IP + 9;
    pub const IP_CSUM: Range<usize> = IP + 10..IP + 12;
    pub const IP_SRC: Range<usize> = IP + 12..IP + 16;
    pub const IP_DST: Range<usize> = IP + 16..IP + 20;
    pub const IP_HDR: Range<usize> = IP..IP + 20;
    pub const UDP: usize = 34;
    pub const UDP_SRC: Range<usize> = UDP..UDP + 2;
    pub const UDP_DST: Range<usize> = UDP + 2..UDP + 4;
    pub const UDP_LEN: Range<usize> = UDP + 4..UDP + 6;
    pub const UDP_CSUM: Range<usize> = UDP + 6..UDP + 8;
    pub const VXLAN: usize = 42;
}

/// IPv4 "don't fragment" bit in the flags/fragment-offset word.
pub const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments" bit.
pub const IP_MF: u16 = 0x2000;
/// IPv4 fragment offset mask.
pub const IP_OFFSET: u16 = 0x1fff;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const RESERVED1: Range<usize> = 1..4;
    pub const VNI: Range<usize> = 4..7;
    pub const RESERVED2: usize = 7;
}

/// The "I" flag: the VNI is valid. RFC 7348 requires it set.
pub const FLAG_I: u8 = 0x08;

/// A VXLAN header error.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    #[error("VXLAN header needs {HEADER_LEN} bytes, got {0}")]
    Truncated(usize),
    #[error("VXLAN flags {0:#04x} lack the I flag")]
    MissingIFlag(u8),
    #[error("VXLAN reserved bits set (flags {flags:#04x}, reserved {reserved:#010x})")]
    ReservedBits { flags: u8, reserved: u32 },
}

/// A view of the 8-byte VXLAN header.
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap `buffer` without checking its length.
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wrap `buffer`, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Header<T>, HeaderError> {
        let h = Header::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }

    /// After this returns `Ok`, no accessor panics.
    pub fn check_len(&self) -> Result<(), HeaderError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            Err(HeaderError::Truncated(len))
        } else {
            Ok(())
        }
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }

    /// The 24 + 8 reserved bits after the flags and after the VNI, packed.
    pub fn reserved(&self) -> u32 {
        let b = self.buffer.as_ref();
        let r1 = &b[field::RESERVED1];
        u32::from_be_bytes([r1[0], r1[1], r1[2], b[field::RESERVED2]])
    }

    /// Check the flags as Linux does: I set, every other flag and reserved
    /// bit clear. (RFC 7348 says receivers ignore reserved bits; Linux drops
    /// packets that set bits of extensions it was not configured for, and
    /// so do we, so a GBP/GPE packet is never misread as plain VXLAN.)
    pub fn check_flags(&self) -> Result<(), HeaderError> {
        let (flags, reserved) = (self.flags(), self.reserved());
        if flags & FLAG_I == 0 {
            return Err(HeaderError::MissingIFlag(flags));
        }
        if flags != FLAG_I || reserved != 0 {
            return Err(HeaderError::ReservedBits { flags, reserved });
        }
        Ok(())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    pub fn set_flags(&mut self, f: u8) {
        self.buffer.as_mut()[field::FLAGS] = f;
    }

    /// Set the VNI (low 24 bits of `vni`) and clear both reserved fields.
    pub fn set_vni(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        let v = vni.to_be_bytes();
        b[field::RESERVED1].fill(0);
        b[field::VNI].copy_from_slice(&v[1..4]);
        b[field::RESERVED2] = 0;
    }
}

/// The VXLAN header as values (for the coprocessor and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub vni: u32,
}

impl Repr {
    /// Parse and validate a header.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Result<Repr, HeaderError> {
        h.check_len()?;
        h.check_flags()?;
        Ok(Repr { vni: h.vni() })
    }

    /// Bytes [`Repr::emit`] writes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the header (I flag, VNI, zero reserved bits).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) {
        h.set_flags(FLAG_I);
        h.set_vni(self.vni);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static BYTES: [u8; 8] = [0x08, 0x00, 0x00, 0x00, 0x12, 0x34, 0x56, 0x00];

    #[test]
    fn deconstruct() {
        let h = Header::new_checked(&BYTES[..]).unwrap();
        assert_eq!(h.flags(), 0x08);
        assert_eq!(h.vni(), 0x12_3456);
        assert_eq!(h.reserved(), 0);
        assert_eq!(Repr::parse(&h), Ok(Repr { vni: 0x12_3456 }));
    }

    #[test]
    fn construct() {
        let mut b = [0xffu8; 8];
        let mut h = Header::new_checked(&mut b[..]).unwrap();
        Repr { vni: 0x12_3456 }.emit(&mut h);
        assert_eq!(b, BYTES);
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Header::new_checked(&BYTES[..7]).unwrap_err(),
            HeaderError::Truncated(7)
        );
    }

    #[test]
    fn missing_i_flag() {
        let mut b = BYTES;
        b[0] = 0;
        let h = Header::new_checked(&b[..]).unwrap();
        assert_eq!(Repr::parse(&h), Err(HeaderError::MissingIFlag(0)));
    }

    #[test]
    fn reserved_bits_are_refused() {
        for (i, v) in [(0, 0x88), (1, 1), (3, 0x80), (7, 1)] {
            let mut b = BYTES;
            b[i] = v;
            let h = Header::new_checked(&b[..]).unwrap();
            assert!(
                matches!(Repr::parse(&h), Err(HeaderError::ReservedBits { .. })),
                "byte {i}"
            );
        }
    }
}
