//! Offload metadata: what a virtio-net header says of a frame, carried
//! with the frame from the port it came in on to the one it leaves by —
//! as that very header, in the [`VNET_HDR_LEN`] bytes before the frame
//! ([`of`], [`attach`]): where a tap's read and a guest's descriptor put
//! it anyway, so receiving costs no copy; an encapsulation moves it in
//! front of the outer headers.
//!
//! Whether frames have it is a property of a batch, not of each frame:
//! every frame a port with offloads receives gets metadata (all zero when
//! there is nothing to do), frames from other ports have none, and the
//! fast path tells the pipeline and the transmit code which it is. So a
//! batch from a port without offloads — the uplink, 64-byte traffic —
//! pays for them with one test per batch, not per frame.
//!
//! A tap opened with `IFF_VNET_HDR` (and a vhost-user guest) hands over
//! frames whose L4 checksum is still to be computed ("needs checksum":
//! the field holds the pseudo-header's sum, and `csum_start`/`csum_offset`
//! say what to sum and where to put it), frames whose checksum the sender
//! already verified ("data valid"), and TCP super-frames of up to 64 KiB
//! to be cut into `gso_size` segments (GSO). A port that takes such
//! frames gets them as they are; for one that does not, the frame is
//! completed ([`complete_checksum`]) or segmented (`gso`) on its way out.
//!
//! Everything here comes from a tenant: [`check`] validates it against
//! the frame before the pipeline looks at either, and what does not hold
//! is a counted drop with its own reason.
//!
//! The header (`struct virtio_net_hdr_v1`, little-endian) is read field by
//! field here, as the validation names each; its constants are checked
//! against `virtio-bindings` in the tests.

use crate::drop::DropReason;
use crate::frame::{Desc, FrameMem};
use crate::packet::{be16, ipv4, ETHERTYPE_IPV4, ETH_LEN, ETH_TYPE, IPPROTO_TCP, IPPROTO_UDP};

/// Length of the header a tap (after `TUNSETVNETHDRSZ`) or a
/// VERSION_1 guest puts before each frame: `struct virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;

/// Segments one super-frame may become. A 64 KiB frame cut at the
/// smallest MSS a sane stack uses on a 1,500-byte path (536) is 123.
pub const MAX_SEGS: usize = 128;

/// The offload metadata of `d`, a frame in `mem` of a batch that has it.
#[inline]
pub fn of<M: FrameMem + ?Sized>(mem: &mut M, d: &Desc) -> Offload {
    mem.chunk_mut(d.addr)
        .map_or(Offload::PLAIN, |(c, at)| Offload::before(c, at))
}

/// Keep `o` as the metadata of `d`, a frame in `mem`; false (and none
/// kept) if there is no room for it before the frame.
#[inline]
pub fn attach<M: FrameMem + ?Sized>(mem: &mut M, d: &Desc, o: Offload) -> bool {
    mem.chunk_mut(d.addr)
        .is_some_and(|(c, at)| o.put_before(c, at))
}

/// Offload metadata of one frame (see the module documentation). (The
/// header's `hdr_len` is not kept: it is measured from the frame where
/// needed.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// `NEEDS_CSUM`, `DATA_VALID`, and vswitch's own `ENCAPSULATED`.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6` or `GSO_UDP_L4`.
    pub gso_type: u8,
    /// Payload bytes per segment (GSO only).
    pub gso_size: u16,
    /// Where the checksummed data starts, from the frame's start.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl Offload {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
    pub const NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_F_DATA_VALID`.
    pub const DATA_VALID: u8 = 2;
    /// Not virtio's: the frame starts with the VXLAN outer headers this
    /// switch wrote, and every offset above counts them. Never taken from
    /// a header.
    pub const ENCAPSULATED: u8 = 0x80;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    /// UFO (IP fragmentation offload): deprecated, refused.
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_UDP_L4: u8 = 5;
    /// `VIRTIO_NET_HDR_GSO_ECN`: the super-frame's first segment carries
    /// CWR, which segmentation already keeps on the first segment only.
    pub const GSO_ECN: u8 = 0x80;

    /// A frame with nothing to do: its checksums are complete.
    pub const PLAIN: Offload = Offload {
        flags: 0,
        gso_type: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Nothing to complete or segment (a "data valid" mark may be set).
    #[inline(always)]
    pub fn is_plain(&self) -> bool {
        (self.flags & Self::NEEDS_CSUM) | self.gso_type == 0
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & Self::NEEDS_CSUM != 0
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != Self::GSO_NONE
    }

    pub fn encapsulated(&self) -> bool {
        self.flags & Self::ENCAPSULATED != 0
    }

    /// The metadata kept before the frame at `chunk[at..]` (none if
    /// there is no room for it there).
    #[inline]
    pub fn before(chunk: &[u8], at: usize) -> Offload {
        at.checked_sub(VNET_HDR_LEN)
            .and_then(|h| chunk.get(h..at))
            .and_then(|h| h.first_chunk::<VNET_HDR_LEN>())
            .map_or(Offload::PLAIN, Offload::from_vnet)
    }

    /// Keep this metadata before the frame at `chunk[at..]` (the header's
    /// layout, with the switch's own flag; `hdr_len` and `num_buffers`
    /// zero); false if there is no room.
    #[inline]
    pub fn put_before(&self, chunk: &mut [u8], at: usize) -> bool {
        let Some(h) = at
            .checked_sub(VNET_HDR_LEN)
            .and_then(|h| chunk.get_mut(h..at))
        else {
            return false;
        };
        h.fill(0);
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        true
    }

    /// The header as it came, unvalidated (see [`check`]).
    pub fn from_vnet(h: &[u8; VNET_HDR_LEN]) -> Offload {
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Offload {
            flags: h[0],
            gso_type: h[1],
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// The header for a port that takes offloads, for `frame`, which it
    /// describes (offsets from the frame's start; `num_buffers` zero).
    pub fn to_vnet(&self, frame: &[u8]) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = self.flags & (Self::NEEDS_CSUM | Self::DATA_VALID);
        h[1] = self.gso_type;
        let hdr_len = u16::try_from(self.hdr_len(frame).unwrap_or(0)).unwrap_or(0);
        h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        h
    }

    /// The same metadata for the frame once `n` bytes of outer headers
    /// are written before it.
    pub fn shifted(&self, n: u16) -> Option<Offload> {
        Some(Offload {
            flags: self.flags | Self::ENCAPSULATED,
            csum_start: self.csum_start.checked_add(n)?,
            ..*self
        })
    }

    /// The headers before a GSO frame's payload (its L4 header ends
    /// there: `csum_start` plus the TCP data offset, or 8 for UDP);
    /// `None` for other frames or if `frame` is cut short.
    pub fn hdr_len(&self, frame: &[u8]) -> Option<usize> {
        let l4 = usize::from(self.csum_start);
        match self.gso_type {
            Self::GSO_TCPV4 | Self::GSO_TCPV6 => {
                Some(l4 + usize::from(*frame.get(l4 + 12)? >> 4) * 4)
            }
            Self::GSO_UDP_L4 => Some(l4 + 8),
            _ => None,
        }
    }

    /// The length of each segment `frame` becomes (GSO), or its length.
    #[inline]
    pub fn segment_len(&self, frame: &[u8]) -> usize {
        match self.hdr_len(frame) {
            Some(h) => h + usize::from(self.gso_size),
            None => frame.len(),
        }
    }
}

/// Validate `off`, as a tap or guest gave it, against `frame`; the
/// metadata the switch keeps (its own flags cleared, a "super-frame" of
/// one segment made a plain frame). Hostile values are
/// drops with their own reason; nothing here panics or reads out of
/// bounds.
pub fn check(frame: &[u8], off: Offload) -> Result<Offload, DropReason> {
    let mut o = Offload {
        flags: off.flags & (Offload::NEEDS_CSUM | Offload::DATA_VALID),
        gso_type: off.gso_type & !Offload::GSO_ECN,
        ..off
    };
    if o.needs_csum() {
        let field = usize::from(o.csum_start) + usize::from(o.csum_offset);
        if usize::from(o.csum_start) < ETH_LEN || field + 2 > frame.len() {
            return Err(DropReason::OffloadBadCsumOffsets);
        }
    } else {
        o.csum_start = 0;
        o.csum_offset = 0;
    }
    match o.gso_type {
        Offload::GSO_NONE => {
            o.gso_size = 0;
            return Ok(o);
        }
        Offload::GSO_TCPV4 | Offload::GSO_UDP_L4 => {}
        // IPv6 is not carried (the classifier counts it), so its GSO
        // frames are passed on for that drop.
        Offload::GSO_TCPV6 => return Ok(o),
        _ => return Err(DropReason::OffloadBadGsoType),
    }
    let tcp = o.gso_type == Offload::GSO_TCPV4;
    let h = headers(frame, 0).ok_or(DropReason::OffloadBadHeaders)?;
    let wanted = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    // GSO needs its checksum completed per segment, at the L4 header.
    if h.proto != wanted
        || !o.needs_csum()
        || usize::from(o.csum_start) != h.l4
        || usize::from(o.csum_offset) != if tcp { 16 } else { 6 }
        || h.frag
    {
        return Err(DropReason::OffloadBadHeaders);
    }
    if o.gso_size == 0 {
        return Err(DropReason::OffloadBadGsoSize);
    }
    let payload = h.end - h.hdr_len;
    if payload <= usize::from(o.gso_size) {
        // One segment: an ordinary frame that still needs its checksum.
        o.gso_type = Offload::GSO_NONE;
        o.gso_size = 0;
        return Ok(o);
    }
    if payload.div_ceil(usize::from(o.gso_size)) > MAX_SEGS {
        return Err(DropReason::OffloadTooManySegments);
    }
    Ok(o)
}

/// Where the headers of an Ethernet + IPv4 + TCP/UDP frame starting at
/// `at` end, as the frame's own fields say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    /// The IPv4 header's offset.
    pub ip: usize,
    /// The L4 header's offset.
    pub l4: usize,
    /// Where the payload starts.
    pub hdr_len: usize,
    /// Where the IPv4 packet ends (≤ the frame's length).
    pub end: usize,
    pub proto: u8,
    /// A fragment (no L4 header to segment).
    pub frag: bool,
}

/// Parse the headers of the frame at `frame[at..]` (see [`Headers`]);
/// `None` unless it is untagged IPv4 carrying TCP or UDP whose headers
/// lie inside the frame and inside the IP packet.
pub fn headers(frame: &[u8], at: usize) -> Option<Headers> {
    if be16(frame, at + ETH_TYPE)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = at + ETH_LEN;
    let v = crate::packet::Ipv4::new(frame, ip);
    let ver_ihl = v.ver_ihl()?;
    let ihl = v.header_len()?;
    if ver_ihl >> 4 != 4 || ihl < ipv4::MIN_LEN {
        return None;
    }
    let end = ip + usize::from(v.total_len()?);
    let l4 = ip + ihl;
    let proto = v.proto()?;
    let l4_len = match proto {
        IPPROTO_TCP => usize::from(*frame.get(l4 + 12)? >> 4) * 4,
        IPPROTO_UDP => 8,
        _ => return None,
    };
    if proto == IPPROTO_TCP && l4_len < 20 {
        return None;
    }
    let hdr_len = l4 + l4_len;
    if hdr_len > end || end > frame.len() {
        return None;
    }
    Some(Headers {
        ip,
        l4,
        hdr_len,
        end,
        proto,
        frag: v.frag()? & ipv4::FRAGMENTED != 0,
    })
}

/// Fill in the checksum of a "needs checksum" frame (`off` validated by
/// [`check`], shifted by any encapsulation): the ones'-complement sum from
/// `csum_start` to the end of the IP packet (or the frame), whose field
/// holds the pseudo-header's sum, stored complemented. Linux's
/// `skb_checksum_help`, with its rule that a zero result is sent as
/// 0xffff (zero means "no checksum" to UDP).
pub fn complete_checksum(frame: &mut [u8], off: &Offload) -> Result<(), DropReason> {
    let inner = if off.encapsulated() {
        vxlan::OUTER_LEN
    } else {
        0
    };
    let end = headers(frame, inner).map_or(frame.len(), |h| h.end);
    let start = usize::from(off.csum_start);
    let at = start + usize::from(off.csum_offset);
    let data = frame
        .get(start..end.max(at + 2))
        .ok_or(DropReason::OffloadBadCsumOffsets)?;
    let c = !vxlan::checksum::fold(vxlan::checksum::sum_wide(data));
    let c = if c == 0 { 0xffff } else { c };
    crate::packet::put_be16(frame, at, c).ok_or(DropReason::OffloadBadCsumOffsets)
}

/// The pseudo-header's sum of an IPv4 packet (for a "needs checksum"
/// field): addresses, protocol and L4 length.
pub fn pseudo_sum(src: u32, dst: u32, proto: u8, l4_len: u16) -> u32 {
    let w = |v: u32| (v >> 16) + (v & 0xffff);
    w(src) + w(dst) + u32::from(proto) + u32::from(l4_len)
}

/// The offload fuzz target's body (`fuzz/fuzz_targets/offload.rs`, and
/// its corpus replayed by `cargo test`): `data` is a virtio-net header
/// then a frame. Whatever [`check`] lets through is cut into segments or
/// has its checksum completed; panics (the asserts) are the findings.
/// True if the metadata was taken.
#[doc(hidden)]
pub fn exercise(data: &[u8]) -> bool {
    let Some((hdr, frame)) = data.split_first_chunk::<VNET_HDR_LEN>() else {
        return false;
    };
    let _ = crate::gro::segment(frame);
    let Ok(off) = check(frame, Offload::from_vnet(hdr)) else {
        return false;
    };
    let mut f = frame.to_vec();
    if off.is_gso() && off.gso_type != Offload::GSO_TCPV6 {
        let Ok(plan) = crate::gso::plan(&f, &off) else {
            return true;
        };
        assert!(plan.segs <= MAX_SEGS);
        let mut buf = vec![0u8; 70_000];
        for i in 0..plan.segs {
            let n = crate::gso::write_segment(&f, &plan, i, &mut buf)
                .expect("a segment fits 70,000 bytes");
            assert!(n <= off.segment_len(&f));
            let ip: &[u8; 20] = buf[ETH_LEN..ETH_LEN + 20].try_into().expect("20 bytes");
            if ip[0] == ipv4::VER_IHL_PLAIN {
                assert!(vxlan::checksum::ipv4_header_ok(ip));
            }
            let _ = crate::gro::segment(&buf[..n]);
        }
    } else if off.needs_csum() {
        assert!(complete_checksum(&mut f, &off).is_ok());
        assert_eq!(f.len(), frame.len());
    }
    true
}

#[cfg(test)]
pub(crate) mod tests;
