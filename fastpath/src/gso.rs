//! Software segmentation (GSO): a TCP (or UDP, USO) super-frame cut into
//! the segments its sender would have put on the wire, for a port that
//! cannot take it whole — the AF_XDP uplink (AF_XDP has no TSO), af-xdp VM
//! ports, guests that did not negotiate it.
//!
//! Each segment is the super-frame's headers followed by `gso_size` bytes
//! of its payload, written straight into a pool chunk, with what the
//! kernel's `tcp_gso_segment` sets: the sequence number advanced, the IP
//! ID counted up, FIN and PSH on the last segment only, CWR on the first
//! only, every checksum complete (inner IPv4 and TCP or UDP; for an
//! encapsulated super-frame the outer IPv4 length and checksum and UDP
//! length too — its UDP source port, the flow's, is copied as is).

use crate::drop::DropReason;
use crate::offload::{headers, pseudo_sum, Headers, Offload, MAX_SEGS};
use crate::packet::{be16, be32, ipv4, put_be16, IPPROTO_TCP};
use vxlan::checksum::{fold, sum, sum_wide};
use vxlan::wire::outer;

/// TCP flags kept on the last segment only, and on the first only.
const LAST_ONLY: u8 = 0x01 | 0x08; // FIN, PSH
const FIRST_ONLY: u8 = 0x80; // CWR

/// How a super-frame is cut (from [`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The inner frame's headers (offsets from the super-frame's start).
    pub h: Headers,
    /// The outer VXLAN headers come first.
    pub outer: bool,
    pub mss: usize,
    pub segs: usize,
}

impl Plan {
    /// The length of segment `i`.
    pub fn len(&self, i: usize) -> usize {
        let payload = self.h.end - self.h.hdr_len;
        let from = i * self.mss;
        self.h.hdr_len + (payload - from.min(payload)).min(self.mss)
    }
}

/// How the GSO frame `frame` (metadata `off`, validated by
/// `offload::check`) is cut; `None` if its headers no longer say what the
/// metadata does (a drop).
pub fn plan(frame: &[u8], off: &Offload) -> Result<Plan, DropReason> {
    let outer = off.encapsulated();
    let at = if outer { vxlan::OUTER_LEN } else { 0 };
    let h = headers(frame, at).ok_or(DropReason::OffloadBadHeaders)?;
    let mss = usize::from(off.gso_size);
    if mss == 0 {
        return Err(DropReason::OffloadBadGsoSize);
    }
    let segs = (h.end - h.hdr_len).div_ceil(mss).max(1);
    if segs > MAX_SEGS {
        return Err(DropReason::OffloadTooManySegments);
    }
    Ok(Plan {
        h,
        outer,
        mss,
        segs,
    })
}

/// Write segment `i` of `plan` of the super-frame `src` into `dst`;
/// its length, or `None` if `dst` is too short for it.
pub fn write_segment(src: &[u8], plan: &Plan, i: usize, dst: &mut [u8]) -> Option<usize> {
    let h = &plan.h;
    let len = plan.len(i);
    let from = h.hdr_len + i * plan.mss;
    let payload = src.get(from..from + (len - h.hdr_len))?;
    let d = dst.get_mut(..len)?;
    d[..h.hdr_len].copy_from_slice(src.get(..h.hdr_len)?);
    d[h.hdr_len..].copy_from_slice(payload);
    if plan.outer {
        let ip_len = u16::try_from(len - outer::IP_HDR.start).ok()?;
        put_be16(d, outer::IP_TOT_LEN.start, ip_len)?;
        put_be16(d, outer::IP_CSUM.start, 0)?;
        let c = !fold(sum(d.get(outer::IP_HDR)?));
        put_be16(d, outer::IP_CSUM.start, c)?;
        put_be16(d, outer::UDP_LEN.start, ip_len - 20)?;
    }
    // The inner IPv4 header: length, ID, checksum.
    let ip_len = u16::try_from(len - h.ip).ok()?;
    put_be16(d, h.ip + ipv4::TOT_LEN, ip_len)?;
    // Segment numbers are below MAX_SEGS.
    #[allow(clippy::cast_possible_truncation)]
    let id = be16(d, h.ip + 4)?.wrapping_add(i as u16);
    put_be16(d, h.ip + 4, id)?;
    put_be16(d, h.ip + ipv4::CSUM, 0)?;
    let c = !fold(sum(d.get(h.ip..h.l4)?));
    put_be16(d, h.ip + ipv4::CSUM, c)?;
    let l4_len = u16::try_from(len - h.l4).ok()?;
    let csum_at = if h.proto == IPPROTO_TCP {
        // Sequence number and the flags that belong to one end.
        // The payload offset of a 64 KiB frame fits 32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let seq = be32(d, h.l4 + 4)?.wrapping_add((i * plan.mss) as u32);
        d.get_mut(h.l4 + 4..h.l4 + 8)?
            .copy_from_slice(&seq.to_be_bytes());
        let flags = d.get_mut(h.l4 + 13)?;
        if i + 1 != plan.segs {
            *flags &= !LAST_ONLY;
        }
        if i != 0 {
            *flags &= !FIRST_ONLY;
        }
        h.l4 + 16
    } else {
        put_be16(d, h.l4 + 4, l4_len)?;
        h.l4 + 6
    };
    put_be16(d, csum_at, 0)?;
    let src_ip = be32(d, h.ip + ipv4::SRC)?;
    let dst_ip = be32(d, h.ip + ipv4::DST)?;
    let s = pseudo_sum(src_ip, dst_ip, h.proto, l4_len) + sum_wide(d.get(h.l4..)?);
    let c = !fold(s);
    put_be16(d, csum_at, if c == 0 { 0xffff } else { c })?;
    Some(len)
}

#[cfg(test)]
mod tests;
