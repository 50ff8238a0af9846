//! Receive coalescing (GRO) toward ports that take super-frames: the
//! in-order TCP segments of one flow among the frames a batch sends to
//! such a port (decapsulated from the uplink, or from an af-xdp VM port)
//! become one super-frame, so the guest's stack — and the tap's syscall —
//! handle one frame where the wire carried up to 44.
//!
//! The rules are the kernel's (`tcp_gro_receive`, `inet_gro_receive`):
//! IPv4 without options and with DF, the same addresses, ports, TOS and
//! TTL; TCP with only ACK (and PSH, which ends a super-frame) set, the
//! same ACK number, window and options; each segment starting where the
//! last ended; every segment but the last exactly the first one's size.
//! Each segment's IPv4 and TCP checksums are verified before it is
//! merged (a bad one goes on alone, for the guest to count); the
//! super-frame then carries a partial checksum ("needs checksum", which
//! a receiving stack takes as verified) and `gso_size`, so a guest that
//! forwards it can cut it again into the very segments it came from.
//! Frames of other flows keep their order among themselves; nothing is
//! held past the batch.

use arrayvec::ArrayVec;

use crate::frame::{Desc, FrameMem, BATCH};
use crate::offload::{pseudo_sum, Offload};
use crate::packet::{be16, be32, put_be16, IPPROTO_TCP};
use crate::umem::FramePool;
use vxlan::checksum::{fold, ipv4_header_ok, sum_wide};

/// Where the TCP header starts (Ethernet + an option-less IPv4 header).
const L4: usize = 14 + 20;
const L4_U16: u16 = 34;
const _: () = assert!(L4_U16 as usize == L4);
/// TCP flags a mergeable segment may have: ACK, and PSH (ends a run).
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// Flows coalesced at once in one batch (the kernel keeps 8 per NAPI).
const OPEN: usize = 8;
/// The most a super-frame's IPv4 packet may hold.
const MAX_IP: usize = 65_535;

/// What GRO needs of one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Addresses and ports.
    flow: (u32, u32, u32),
    /// TOS and TTL (as one word each way: version/IHL/TOS, TTL/protocol).
    ip_words: (u16, u16),
    seq: u32,
    ack: u32,
    /// Data offset, flags and window, PSH cleared.
    word12: u32,
    psh: bool,
    hdr_len: usize,
    payload: usize,
}

/// `frame` as a mergeable segment: `None` if it is not one (other
/// protocols, flags, options in IPv4, a fragment, no payload, a bad
/// checksum).
pub fn segment(frame: &[u8]) -> Option<Seg> {
    if be16(frame, 12)? != 0x0800 || *frame.get(14)? != 0x45 || *frame.get(23)? != IPPROTO_TCP {
        return None;
    }
    // DF and no fragment offset or MF.
    if be16(frame, 20)? & 0xbfff != 0 || be16(frame, 20)? & 0x4000 == 0 {
        return None;
    }
    let ip: &[u8; 20] = frame.get(14..34)?.try_into().ok()?;
    if !ipv4_header_ok(ip) {
        return None;
    }
    let end = 14 + usize::from(be16(frame, 16)?);
    let doff = usize::from(*frame.get(L4 + 12)? >> 4) * 4;
    let flags = *frame.get(L4 + 13)?;
    let hdr_len = L4 + doff;
    if doff < 20
        || flags & !(ACK | PSH) != 0
        || flags & ACK == 0
        || end > frame.len()
        || end <= hdr_len
    {
        return None;
    }
    let tcp_len = u16::try_from(end - L4).ok()?;
    let s = pseudo_sum(be32(frame, 26)?, be32(frame, 30)?, IPPROTO_TCP, tcp_len)
        + sum_wide(frame.get(L4..end)?);
    if fold(s) != 0xffff {
        return None;
    }
    Some(Seg {
        flow: (be32(frame, 26)?, be32(frame, 30)?, be32(frame, L4)?),
        ip_words: (be16(frame, 14)?, be16(frame, 22)?),
        seq: be32(frame, L4 + 4)?,
        ack: be32(frame, L4 + 8)?,
        word12: be32(frame, L4 + 12)? & !(u32::from(PSH) << 16),
        psh: flags & PSH != 0,
        hdr_len,
        payload: end - hdr_len,
    })
}

/// A super-frame being built: the first segment's frame, the segments'
/// chunks, and what the next one must be.
#[derive(Debug)]
struct Run {
    first: Seg,
    /// The TCP options of the first segment (all must match).
    options: ArrayVec<u8, 40>,
    frames: ArrayVec<Desc, BATCH>,
    next_seq: u32,
    /// Bytes of IPv4 packet so far.
    ip_len: usize,
    /// No more may join (a short segment, or PSH, came last).
    closed: bool,
    psh: bool,
}

impl Run {
    fn takes(&self, s: &Seg, options: &[u8]) -> bool {
        !self.closed
            && s.flow == self.first.flow
            && s.ip_words == self.first.ip_words
            && s.ack == self.first.ack
            && s.word12 == self.first.word12
            && s.seq == self.next_seq
            && s.payload <= self.first.payload
            && self.ip_len + s.payload <= MAX_IP
            && options == self.options.as_slice()
    }
}

/// Coalesce `frames` (plain, all bound for one port that takes
/// super-frames): each result goes to `emit`, with offload metadata — a
/// frame as it was, or a super-frame in a big chunk (whose segments'
/// chunks are released). Returns how many frames were merged away.
pub fn coalesce(
    pool: &mut FramePool,
    frames: &[Desc],
    mut emit: impl FnMut(&mut FramePool, Desc),
) -> usize {
    let mut open: ArrayVec<Run, OPEN> = ArrayVec::new();
    let mut merged = 0;
    for &d in frames {
        let parsed = pool
            .chunk_ro(d.addr)
            .and_then(|(c, o)| c.get(o..o + d.len as usize))
            .and_then(|f| {
                let s = segment(f)?;
                let options = ArrayVec::try_from(f.get(L4 + 20..s.hdr_len)?).ok()?;
                Some((s, options))
            });
        let Some((s, options)) = parsed else {
            // Not mergeable: a run of its flow (if TCP) ends first, so the
            // guest sees its segments in order.
            let flow = pool
                .chunk_ro(d.addr)
                .and_then(|(c, o)| Some((be32(c, o + 26)?, be32(c, o + 30)?, be32(c, o + L4)?)));
            if let Some(i) = open.iter().position(|r| Some(r.first.flow) == flow) {
                merged += finish(pool, open.remove(i), &mut emit);
            }
            as_is(pool, d, &mut emit);
            continue;
        };
        if let Some(r) = open.iter_mut().find(|r| r.takes(&s, &options)) {
            r.frames.push(d);
            r.next_seq = s.seq.wrapping_add(len32(s.payload));
            r.ip_len += s.payload;
            r.closed = s.payload < r.first.payload || s.psh || r.frames.is_full();
            r.psh |= s.psh;
            continue;
        }
        // A new run: one of the same flow that could not take it ends, and
        // so does the oldest if all are open.
        if let Some(i) = open.iter().position(|r| r.first.flow == s.flow) {
            merged += finish(pool, open.remove(i), &mut emit);
        }
        if open.is_full() {
            merged += finish(pool, open.remove(0), &mut emit);
        }
        let mut frames = ArrayVec::new();
        frames.push(d);
        open.push(Run {
            first: s,
            options,
            frames,
            next_seq: s.seq.wrapping_add(len32(s.payload)),
            ip_len: s.hdr_len - 14 + s.payload,
            closed: s.psh,
            psh: s.psh,
        });
    }
    for r in open {
        merged += finish(pool, r, &mut emit);
    }
    merged
}

/// Emit `d` unchanged, with metadata that says so (what `coalesce`
/// emits has metadata: the super-frames' say what they are).
fn as_is(pool: &mut FramePool, d: Desc, emit: &mut impl FnMut(&mut FramePool, Desc)) {
    crate::offload::attach(pool, &d, Offload::PLAIN);
    emit(pool, d);
}

/// A payload length (≤ 64 KiB) as a sequence-number step.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Emit `r`: its one frame as it was, or its segments merged into a big
/// chunk. How many frames were merged away (0 if it could not be built:
/// then the segments go on as they were).
fn finish(pool: &mut FramePool, r: Run, emit: &mut impl FnMut(&mut FramePool, Desc)) -> usize {
    if r.frames.len() == 1 {
        as_is(pool, r.frames[0], emit);
        return 0;
    }
    let Some(big) = pool.alloc_big() else {
        r.frames.iter().for_each(|d| as_is(pool, *d, emit));
        return 0;
    };
    let at = big + crate::port::HEADROOM as u64;
    let mut len = 0usize;
    for (i, d) in r.frames.iter().enumerate() {
        let skip = if i == 0 { 0 } else { r.first.hdr_len };
        let ok = pool.two_mut(d.addr, at).and_then(|((s, so), (dst, o))| {
            let frame_end = so + 14 + usize::from(be16(s, so + 16)?);
            let part = s.get(so + skip..frame_end)?;
            dst.get_mut(o + len..o + len + part.len())?
                .copy_from_slice(part);
            Some(part.len())
        });
        match ok {
            Some(n) => len += n,
            None => {
                pool.release(big);
                r.frames.iter().for_each(|d| as_is(pool, *d, emit));
                return 0;
            }
        }
    }
    let Some((c, o)) = pool.chunk_mut(at) else {
        pool.release(big);
        return 0;
    };
    let f = &mut c[o..o + len];
    let ip_len = u16::try_from(len - 14).unwrap_or(u16::MAX);
    let _ = put_be16(f, 16, ip_len);
    let _ = put_be16(f, 24, 0);
    let c16 = !fold(vxlan::checksum::sum(&f[14..34]));
    let _ = put_be16(f, 24, c16);
    if r.psh {
        f[L4 + 13] |= PSH;
    }
    // The partial checksum a sender with offloads would leave.
    let tcp_len = ip_len - 20;
    let p = fold(pseudo_sum(
        be32(f, 26).unwrap_or(0),
        be32(f, 30).unwrap_or(0),
        IPPROTO_TCP,
        tcp_len,
    ));
    let _ = put_be16(f, L4 + 16, p);
    let n = r.frames.len();
    for d in &r.frames {
        pool.release(d.addr);
    }
    let d = Desc::new(at, u32::try_from(len).unwrap_or(0));
    let off = Offload {
        flags: Offload::NEEDS_CSUM,
        gso_type: Offload::GSO_TCPV4,
        gso_size: u16::try_from(r.first.payload).unwrap_or(0),
        csum_start: L4_U16,
        csum_offset: 16,
    };
    // A big chunk has room before the frame.
    crate::offload::attach(pool, &d, off);
    emit(pool, d);
    n - 1
}

#[cfg(test)]
mod tests;
