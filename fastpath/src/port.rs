//! The port drivers of a fast-path thread: receiving a batch from a tap,
//! an AF_XDP socket, a vhost-user guest (or memory, for tests) into the
//! frame pool, and transmitting frames out; each port's counters.

use arrayvec::ArrayVec;
use flowtable::PortId;

use crate::frame::{Desc, FrameMem, BATCH};
use crate::offload::{Offload, VNET_HDR_LEN};
use crate::tap::Tap;
use crate::umem::FramePool;
use crate::xsk::XskSocket;

/// The I/O behind a port.
pub enum PortIo {
    Tap(Tap),
    /// An AF_XDP socket (the uplink); its UMEM is the thread's frame pool.
    Xsk(Box<XskSocket>),
    /// A vhost-user virtio-net port: the guest's virtqueues in its memory.
    VhostUser(Box<crate::vhost::port::VhostPort>),
    /// Frames in memory (tests and benchmarks: no kernel, no root).
    Memory(Box<MemPort>),
    /// Removed at run time; its id is not reused.
    Closed,
}

impl PortIo {
    /// The descriptor poll(2) waits on (negative: none).
    pub fn fd(&self) -> i32 {
        match self {
            PortIo::Tap(t) => t.fd(),
            PortIo::Xsk(x) => x.fd(),
            // Kicks wake the loop through the wakeup fd; poll(2) skips
            // negative descriptors.
            PortIo::VhostUser(_) => -1,
            PortIo::Memory(_) | PortIo::Closed => -1,
        }
    }
}

impl PortIo {
    /// The frames the port receives have offload metadata.
    pub fn gives_offloads(&self) -> bool {
        match self {
            PortIo::Tap(t) => t.vnet(),
            PortIo::VhostUser(v) => v.gives_offloads(),
            PortIo::Memory(m) => m.offloads,
            _ => false,
        }
    }

    /// The port takes partial checksums and super-frames, with their
    /// metadata. (Every port takes frames in big chunks: an AF_XDP socket
    /// copies them into its UMEM's, see [`send_xsk_chains`].)
    pub fn takes_offloads(&self) -> bool {
        match self {
            PortIo::Tap(t) => t.vnet(),
            PortIo::Xsk(_) => false,
            PortIo::VhostUser(v) => v.takes_offloads(),
            PortIo::Memory(m) => m.offloads,
            PortIo::Closed => true,
        }
    }
}

impl std::fmt::Debug for PortIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortIo::Tap(t) => write!(f, "tap {}", t.name()),
            PortIo::Xsk(x) => write!(f, "af_xdp fd {}", x.fd()),
            PortIo::VhostUser(_) => write!(f, "vhost-user"),
            PortIo::Memory(_) => write!(f, "memory"),
            PortIo::Closed => write!(f, "closed"),
        }
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Frames the port could not take (queue full, guest side down).
    pub tx_dropped: u64,
    /// Receives skipped because the frame pool had no free chunk.
    pub rx_no_buffer: u64,
    /// vhost-user: frames dropped because the guest had no receive buffer
    /// posted (its queue is full, or it stopped draining it).
    #[serde(default)]
    pub guest_queue_full: u64,
    /// vhost-user: frames dropped because no guest is connected (or its
    /// queues are not enabled yet).
    #[serde(default)]
    pub guest_not_ready: u64,
    /// vhost-user: guest descriptors refused (outside guest memory, too
    /// short, oversize frames).
    #[serde(default)]
    pub guest_bad_descriptor: u64,
    /// AF_XDP: refills where the frame pool could not keep the fill ring
    /// at half its share (receives may be dropped by the kernel then).
    #[serde(default)]
    pub fill_short: u64,
    /// Flows refused because the port held its share of the flow table.
    #[serde(default)]
    pub flow_share_full: u64,
    /// Segments cut in software from super-frames sent on this port
    /// (it takes no segmentation offload).
    #[serde(default)]
    pub tx_segments: u64,
    /// Frames whose partial checksum was completed in software for this
    /// port.
    #[serde(default)]
    pub tx_csum_completed: u64,
    /// Segments merged into super-frames (GRO) on their way to this port
    /// (each super-frame counts its segments but one).
    #[serde(default)]
    pub tx_coalesced: u64,
    /// Frames or segments dropped on the way out for want of a free chunk
    /// or because their offload metadata did not hold.
    #[serde(default)]
    pub tx_offload_dropped: u64,
}

impl PortCounters {
    /// Add `o`'s counts (another thread's queue of the same port).
    pub fn add(&mut self, o: &PortCounters) {
        // Destructured: a counter added later must be summed here too.
        let PortCounters {
            rx_packets,
            rx_bytes,
            tx_packets,
            tx_bytes,
            rx_errors,
            tx_errors,
            tx_dropped,
            rx_no_buffer,
            guest_queue_full,
            guest_not_ready,
            guest_bad_descriptor,
            fill_short,
            flow_share_full,
            tx_segments,
            tx_csum_completed,
            tx_coalesced,
            tx_offload_dropped,
        } = o;
        self.rx_packets += rx_packets;
        self.rx_bytes += rx_bytes;
        self.tx_packets += tx_packets;
        self.tx_bytes += tx_bytes;
        self.rx_errors += rx_errors;
        self.tx_errors += tx_errors;
        self.tx_dropped += tx_dropped;
        self.rx_no_buffer += rx_no_buffer;
        self.guest_queue_full += guest_queue_full;
        self.guest_not_ready += guest_not_ready;
        self.guest_bad_descriptor += guest_bad_descriptor;
        self.fill_short += fill_short;
        self.flow_share_full += flow_share_full;
        self.tx_segments += tx_segments;
        self.tx_csum_completed += tx_csum_completed;
        self.tx_coalesced += tx_coalesced;
        self.tx_offload_dropped += tx_offload_dropped;
    }
}

/// A port of this thread.
#[derive(Debug)]
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub io: PortIo,
    pub counters: PortCounters,
}

/// Free big chunks below which queued jumbo segments are sent before
/// more are cut (a batch of super-frames holds up to a batch of them).
const BIG_LOW: usize = 8;

/// Room before each frame read from a tap: VXLAN's outer headers fit with
/// margin. (AF_XDP leaves XDP_PACKET_HEADROOM, also 256, before its frames.)
pub const HEADROOM: usize = 256;
/// Frames an af-xdp VM port keeps on its fill ring at most: enough for a
/// veth's bursts, and four idle ports hold 2 048 frames, not the pool.
pub const VM_FILL_SHARE: usize = 512;
/// Chunks kept on the free list for VM ports when refilling the uplink.
pub const VM_RESERVE: usize = 4 * BATCH;

/// Receive up to a batch from `port` into `descs` (frames in `pool`,
/// after the usual headroom). The uplink may fill its whole AF_XDP ring,
/// a VM port its share.
pub fn receive(
    port: &mut Port,
    pool: &mut FramePool,
    descs: &mut ArrayVec<Desc, BATCH>,
    is_uplink: bool,
) {
    match &mut port.io {
        PortIo::Tap(t) if t.vnet() => receive_vnet(t, pool, descs, &mut port.counters),
        PortIo::Tap(t) => {
            for _ in 0..BATCH {
                let Some(chunk) = pool.alloc() else {
                    port.counters.rx_no_buffer += 1;
                    break;
                };
                let at = chunk + HEADROOM as u64;
                let r = match pool.chunk_mut(at) {
                    Some((c, off)) => t.recv(&mut c[off..]),
                    None => Ok(None),
                };
                match r {
                    Ok(Some(n)) => match u32::try_from(n) {
                        Ok(len) => {
                            port.counters.rx_packets += 1;
                            port.counters.rx_bytes += u64::from(len);
                            descs.push(Desc::new(at, len));
                        }
                        Err(_) => {
                            pool.release(chunk);
                            port.counters.rx_errors += 1;
                        }
                    },
                    Ok(None) => {
                        pool.release(chunk);
                        break;
                    }
                    Err(_) => {
                        pool.release(chunk);
                        port.counters.rx_errors += 1;
                        break;
                    }
                }
            }
        }
        PortIo::Xsk(x) => {
            x.complete(pool);
            let cap = if is_uplink { usize::MAX } else { VM_FILL_SHARE };
            if x.refill(pool, VM_RESERVE, cap).1 {
                port.counters.fill_short += 1;
            }
            x.wake_rx_if_needed();
            let c = &mut port.counters;
            let overlong = x.overlong();
            x.recv(BATCH, |pieces, keep| {
                let d = match pieces {
                    [d] if keep => *d,
                    _ if keep => match gather(pool, pieces) {
                        Some(d) => d,
                        None => {
                            c.rx_no_buffer += 1;
                            return;
                        }
                    },
                    _ => {
                        pieces.iter().for_each(|p| pool.release(p.addr));
                        return;
                    }
                };
                c.rx_packets += 1;
                c.rx_bytes += u64::from(d.len);
                descs.push(d);
            });
            c.rx_errors += x.overlong() - overlong;
        }
        PortIo::VhostUser(v) => {
            let bad = v.stats.tx_bad_chain + v.stats.tx_oversize;
            // (Picks up what the guest negotiated, before the sink asks.)
            v.connected();
            let mut sink = PoolSink {
                pool,
                descs,
                counters: &mut port.counters,
                chunk: None,
                big: v.gives_offloads(),
            };
            v.recv(BATCH, &mut sink);
            drop(sink);
            port.counters.guest_bad_descriptor += v.stats.tx_bad_chain + v.stats.tx_oversize - bad;
        }
        PortIo::Memory(m) => {
            while !descs.is_full() {
                let (frame, off) = match m.offloaded.pop_front() {
                    Some(f) => f,
                    None => match m.queued.pop_front() {
                        Some(f) => (f, Offload::PLAIN),
                        None => break,
                    },
                };
                match copy_in(pool, &frame) {
                    Some(d) => {
                        if m.offloads {
                            // After the usual headroom: room for it.
                            crate::offload::attach(pool, &d, off);
                        }
                        port.counters.rx_packets += 1;
                        port.counters.rx_bytes += u64::from(d.len);
                        descs.push(d);
                    }
                    None => port.counters.rx_no_buffer += 1,
                }
            }
        }
        PortIo::Closed => {}
    }
}

/// Receive up to a batch from a tap with offloads: each frame is read
/// (one `readv`) into a pool chunk and, past its end, a spare big chunk;
/// a super-frame that ran on into the big chunk gets its head copied
/// before the rest there (at most a small chunk's worth), a frame that
/// fit leaves the spare for the next read.
fn receive_vnet(
    t: &mut Tap,
    pool: &mut FramePool,
    descs: &mut ArrayVec<Desc, BATCH>,
    c: &mut PortCounters,
) {
    let room = pool.chunk_size() as usize - HEADROOM;
    let mut spare: Option<u64> = None;
    while !descs.is_full() {
        let Some(chunk) = pool.alloc() else {
            c.rx_no_buffer += 1;
            break;
        };
        let Some(big) = spare.or_else(|| pool.alloc_big()) else {
            // Without room for a super-frame the read would cut one short.
            pool.release(chunk);
            c.rx_no_buffer += 1;
            break;
        };
        spare = Some(big);
        let at = chunk + HEADROOM as u64;
        // The header lands right before the frame, where the pipeline
        // reads it (see `offload`).
        let hdr_at = chunk + (HEADROOM - VNET_HDR_LEN) as u64;
        let r = match pool.two_mut(hdr_at, big + (HEADROOM + room) as u64) {
            Some(((head, ho), (tail, to))) => {
                match head[ho..].split_first_chunk_mut::<VNET_HDR_LEN>() {
                    Some((hdr, head)) => t.recv_vnet(hdr, head, &mut tail[to..]),
                    None => Ok(None),
                }
            }
            None => Ok(None),
        };
        let n = match r {
            Ok(Some(n)) => n,
            Ok(None) => {
                pool.release(chunk);
                break;
            }
            Err(_) => {
                pool.release(chunk);
                c.rx_errors += 1;
                break;
            }
        };
        // A read is at most a big chunk.
        #[allow(clippy::cast_possible_truncation)]
        let len = n as u32;
        let d = if n <= room {
            Desc::new(at, len)
        } else {
            // The header and the head go before the rest.
            let from = big + (HEADROOM - VNET_HDR_LEN) as u64;
            if let Some(((head, ho), (whole, wo))) = pool.two_mut(hdr_at, from) {
                let n = VNET_HDR_LEN + room;
                whole[wo..wo + n].copy_from_slice(&head[ho..ho + n]);
            }
            pool.release(chunk);
            spare = None;
            Desc::new(big + HEADROOM as u64, len)
        };
        c.rx_packets += 1;
        c.rx_bytes += u64::from(len);
        descs.push(d);
    }
    if let Some(b) = spare {
        pool.release(b);
    }
}

/// Copy `frame` into a free chunk of `pool`, after the usual headroom — a
/// big chunk if it is longer than a small one holds (`None`: no free
/// chunk, or the frame does not fit one).
pub fn copy_in(pool: &mut FramePool, frame: &[u8]) -> Option<Desc> {
    let len = u32::try_from(frame.len()).ok()?;
    let chunk = if frame.len() + HEADROOM > pool.chunk_size() as usize {
        pool.alloc_big()?
    } else {
        pool.alloc()?
    };
    let at = chunk + HEADROOM as u64;
    let Some(dst) = pool
        .chunk_mut(at)
        .and_then(|(c, off)| c.get_mut(off..off + frame.len()))
    else {
        pool.release(chunk);
        return None;
    };
    dst.copy_from_slice(frame);
    Some(Desc::new(at, len))
}

/// A port whose frames are in memory: what is queued is received, what
/// is sent is kept (tests and benchmarks of the loop, without a kernel).
#[derive(Debug, Default)]
pub struct MemPort {
    pub queued: std::collections::VecDeque<Vec<u8>>,
    /// Frames with offload metadata, received before `queued`.
    pub offloaded: std::collections::VecDeque<(Vec<u8>, Offload)>,
    pub sent: Vec<Vec<u8>>,
    /// The metadata of each frame in `sent`.
    pub sent_off: Vec<Offload>,
    /// The port takes offloads (as a tap with the header does).
    pub offloads: bool,
}

/// Guest frames of a vhost-user port, written straight into pool chunks:
/// the frame after the usual headroom, its virtio-net header at the end of
/// the headroom (where the pipeline reads it as the frame's offload
/// metadata, if the guest negotiated offloads). A super-frame (the guest
/// negotiated TSO: `big`) goes into a big chunk. Takes no more than the
/// pool can spare: what the guest hands over is gone from its queue.
struct PoolSink<'a> {
    pool: &'a mut FramePool,
    descs: &'a mut ArrayVec<Desc, BATCH>,
    counters: &'a mut PortCounters,
    /// The chunk handed out by `room`, not yet committed.
    chunk: Option<u64>,
    /// Frames longer than a small chunk holds may come (TSO).
    big: bool,
}

impl crate::vhost::virtq::FrameSink for PoolSink<'_> {
    fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.descs.is_full() {
            return None;
        }
        let hdr = crate::vhost::virtq::HDR_LEN;
        let want_big = self.big && len + HEADROOM - hdr > self.pool.chunk_size() as usize;
        if let Some(c) = self.chunk {
            if FramePool::is_big(c) != want_big {
                self.pool.release(c);
                self.chunk = None;
            }
        }
        let chunk = match self.chunk {
            Some(c) => c,
            None => {
                if self.pool.free_count() <= VM_RESERVE / 2 {
                    self.counters.rx_no_buffer += 1;
                    return None;
                }
                let c = if want_big {
                    self.pool.alloc_big()
                } else {
                    self.pool.alloc()
                };
                let Some(c) = c else {
                    self.counters.rx_no_buffer += 1;
                    return None;
                };
                self.chunk = Some(c);
                c
            }
        };
        let (b, off) = self.pool.chunk_mut(chunk + (HEADROOM - hdr) as u64)?;
        b.get_mut(off..)
    }

    fn commit(&mut self, len: usize) {
        if let Some(chunk) = self.chunk.take() {
            let Ok(len) = u32::try_from(len) else {
                // No chunk holds such a frame: a lying guest.
                self.counters.guest_bad_descriptor += 1;
                self.pool.release(chunk);
                return;
            };
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += u64::from(len);
            // Capacity checked in `room`.
            let _ = self.descs.try_push(Desc::new(chunk + HEADROOM as u64, len));
        }
    }
}

impl Drop for PoolSink<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.chunk.take() {
            self.pool.release(c);
        }
    }
}

/// Send `frames` (chunks of `pool`) on `p`, releasing every chunk that
/// is not handed to the kernel. Frames the port cannot take as they are
/// are made so first: super-frames cut into segments, partial checksums
/// completed, frames in big chunks copied into small ones for AF_XDP.
///
/// `meta`: the frames have offload metadata (a batch from a port with
/// offloads).
pub fn transmit(p: &mut Port, pool: &mut FramePool, frames: &[Desc], meta: bool) {
    let offloads = p.io.takes_offloads();
    if offloads && !meta && frames.len() > 1 && tcp_frames(pool, frames) > 1 {
        // Consecutive TCP segments of a flow become one super-frame.
        let mut out = ArrayVec::<Desc, BATCH>::new();
        let merged = crate::gro::coalesce(pool, frames, |_, d| {
            // At most one result per frame.
            let _ = out.try_push(d);
        });
        if merged > 0 {
            p.counters.tx_coalesced += merged as u64;
            return send(p, pool, &out, true);
        }
    }
    if offloads || !meta {
        return send(p, pool, frames, meta);
    }
    // What is made to fit is plain.
    let mut ready = ArrayVec::<Desc, BATCH>::new();
    for &d in frames {
        let off = crate::offload::of(pool, &d);
        prepare(p, pool, d, off, &mut ready);
    }
    send(p, pool, &ready, false);
}

/// How many of `frames` may be TCP segments over IPv4 (one byte looked at
/// each, in headers the pipeline just read): a batch with fewer than two
/// has nothing to merge, and small-packet traffic skips GRO for this.
#[inline]
fn tcp_frames(pool: &FramePool, frames: &[Desc]) -> usize {
    frames
        .iter()
        .filter(|d| {
            pool.chunk_ro(d.addr)
                .and_then(|(c, o)| c.get(o + crate::packet::plain::IP_PROTO))
                == Some(&crate::packet::IPPROTO_TCP)
        })
        .count()
}

/// Queue `d` (plain) to be sent, sending what is queued first if that
/// is a batch — or if big chunks run short (jumbo segments each take one
/// until sent).
fn push_ready(p: &mut Port, pool: &mut FramePool, ready: &mut ArrayVec<Desc, BATCH>, d: Desc) {
    if ready.is_full() || (FramePool::is_big(d.addr) && pool.big_free_count() < BIG_LOW) {
        send(p, pool, ready, false);
        ready.clear();
    }
    ready.push(d);
}

/// Make `d` (metadata `off`) a plain frame the port takes (see
/// [`transmit`]) and queue it; a frame that cannot be made so is counted
/// and its chunk released.
fn prepare(
    p: &mut Port,
    pool: &mut FramePool,
    d: Desc,
    off: Offload,
    ready: &mut ArrayVec<Desc, BATCH>,
) {
    if off.is_gso() {
        segment(p, pool, d, off, ready);
        pool.release(d.addr);
        return;
    }
    if off.needs_csum() {
        let done = pool
            .chunk_mut(d.addr)
            .and_then(|(c, o)| c.get_mut(o..o + d.len as usize))
            .map(|f| crate::offload::complete_checksum(f, &off));
        if !matches!(done, Some(Ok(()))) {
            p.counters.tx_offload_dropped += 1;
            pool.release(d.addr);
            return;
        }
        p.counters.tx_csum_completed += 1;
    }
    push_ready(p, pool, ready, d);
}

/// Write the frame `c[off..off + len]` to a tap with its virtio-net
/// header: the header put in the 12 bytes before the frame (its metadata
/// there, if `meta`, or none), then one plain `write` of both — cheaper
/// per frame than a `writev` of two pieces. (Whatever was before the
/// frame — the headroom, a decapsulated frame's VXLAN header — is not
/// needed once the frame leaves.)
fn send_with_header(
    t: &mut Tap,
    c: &mut [u8],
    off: usize,
    len: usize,
    meta: bool,
) -> std::io::Result<bool> {
    let Some(f) = c.get(off..off + len) else {
        return Ok(false);
    };
    let o = if meta {
        Offload::before(c, off)
    } else {
        Offload::PLAIN
    };
    let hdr = o.to_vnet(f);
    match off.checked_sub(VNET_HDR_LEN) {
        Some(at) => {
            c[at..off].copy_from_slice(&hdr);
            t.send(&c[at..off + len])
        }
        None => t.send_vnet(&hdr, f),
    }
}

/// The packet in `pieces` (chunks of an AF_XDP ring, in order) copied
/// into a fresh big chunk after the usual headroom; the pieces are
/// released either way. `None` if no big chunk is free.
fn gather(pool: &mut FramePool, pieces: &[Desc]) -> Option<Desc> {
    let big = pool.alloc_big();
    let mut at = big.map(|b| b + HEADROOM as u64);
    for p in pieces {
        let len = p.len as usize;
        at = at.and_then(|a| {
            let ((s, so), (dst, o)) = pool.two_mut(p.addr, a)?;
            dst.get_mut(o..o + len)?
                .copy_from_slice(s.get(so..so + len)?);
            Some(a + len as u64)
        });
        pool.release(p.addr);
    }
    let b = big?;
    let start = b + HEADROOM as u64;
    match at.map(|end| u32::try_from(end - start)) {
        Some(Ok(len)) => Some(Desc::new(start, len)),
        _ => {
            pool.release(b);
            None
        }
    }
}

/// Queue `frames` on an AF_XDP socket, some in big chunks: those are
/// copied into as many of the UMEM's chunks as they need (a jumbo frame,
/// multi-buffer) and released; then one kick. Counts into `c`.
fn send_xsk_chains(x: &mut XskSocket, pool: &mut FramePool, frames: &[Desc], c: &mut PortCounters) {
    let room = pool.chunk_size() as usize;
    for &d in frames {
        let mut pieces = ArrayVec::<Desc, { crate::xsk::MAX_PIECES }>::new();
        let whole = if FramePool::is_big(d.addr) {
            let len = d.len as usize;
            let mut done = 0;
            while done < len {
                let n = room.min(len - done);
                let Some(chunk) = pool.alloc() else { break };
                let copied =
                    pool.two_mut(d.addr + done as u64, chunk)
                        .and_then(|((s, so), (dst, o))| {
                            dst.get_mut(o..o + n)?.copy_from_slice(s.get(so..so + n)?);
                            Some(())
                        });
                if copied.is_none()
                    || pieces
                        .try_push(Desc::new(chunk, u32::try_from(n).unwrap_or(0)))
                        .is_err()
                {
                    pool.release(chunk);
                    break;
                }
                done += n;
            }
            pool.release(d.addr);
            done == len
        } else {
            pieces.push(d);
            true
        };
        if whole && x.queue_chain(&pieces) {
            c.tx_packets += 1;
            c.tx_bytes += u64::from(d.len);
        } else {
            c.tx_dropped += 1;
            pieces.iter().for_each(|p| pool.release(p.addr));
        }
    }
    x.kick();
}

/// Cut the super-frame `d` into segments in fresh small chunks, queued
/// to be sent (the caller releases `d`).
fn segment(
    p: &mut Port,
    pool: &mut FramePool,
    d: Desc,
    off: Offload,
    ready: &mut ArrayVec<Desc, BATCH>,
) {
    let mut made = 0;
    let lost = cut(pool, d, &off, |pool, seg| {
        made += 1;
        push_ready(p, pool, ready, seg);
    });
    p.counters.tx_segments += made;
    p.counters.tx_offload_dropped += lost;
}

/// Cut the super-frame `d` (metadata `off`) into segments, each in a
/// fresh chunk (a big one if a segment is longer than a small one holds)
/// handed to `emit`; how many segments were lost (no free chunk, or the
/// frame's headers no longer what its metadata says: then all of it, as
/// one). `d`'s chunk stays the caller's.
pub fn cut(
    pool: &mut FramePool,
    d: Desc,
    off: &Offload,
    mut emit: impl FnMut(&mut FramePool, Desc),
) -> u64 {
    let len = d.len as usize;
    let plan = pool
        .chunk_ro(d.addr)
        .and_then(|(c, o)| c.get(o..o + len))
        .map(|f| crate::gso::plan(f, off));
    let Some(Ok(plan)) = plan else {
        return 1;
    };
    let mut lost = 0;
    // A segment longer than a small chunk holds (a jumbo MSS) goes in a
    // big one; an AF_XDP port sends it as a chain.
    let big = plan.len(0) + HEADROOM > pool.chunk_size() as usize;
    for i in 0..plan.segs {
        let chunk = if big { pool.alloc_big() } else { pool.alloc() };
        let Some(chunk) = chunk else {
            return lost + (plan.segs - i) as u64;
        };
        let at = chunk + HEADROOM as u64;
        let n = pool.two_mut(d.addr, at).and_then(|((s, so), (dst, o))| {
            crate::gso::write_segment(s.get(so..so + len)?, &plan, i, &mut dst[o..])
        });
        match n.and_then(|n| u32::try_from(n).ok()) {
            Some(n) => emit(pool, Desc::new(at, n)),
            None => {
                pool.release(chunk);
                lost += 1;
            }
        }
    }
    lost
}

/// Send `frames`, which the port takes as they are (see [`transmit`]).
fn send(p: &mut Port, pool: &mut FramePool, frames: &[Desc], meta: bool) {
    match &mut p.io {
        PortIo::Closed => {
            p.counters.tx_dropped += frames.len() as u64;
            frames.iter().for_each(|d| pool.release(d.addr));
        }
        PortIo::Memory(m) => {
            for d in frames {
                if let Some((c, off, f)) = pool
                    .chunk_ro(d.addr)
                    .and_then(|(c, off)| Some((c, off, c.get(off..off + d.len as usize)?)))
                {
                    m.sent.push(f.to_vec());
                    m.sent_off.push(if meta {
                        Offload::before(c, off)
                    } else {
                        Offload::PLAIN
                    });
                    p.counters.tx_packets += 1;
                    p.counters.tx_bytes += u64::from(d.len);
                }
                pool.release(d.addr);
            }
        }
        PortIo::Tap(t) => {
            for d in frames {
                let r = match pool.chunk_mut(d.addr) {
                    Some((c, off)) if t.vnet() => send_with_header(t, c, off, d.len as usize, meta),
                    Some((c, off)) => match c.get(off..off + d.len as usize) {
                        Some(f) => t.send(f),
                        None => Ok(false),
                    },
                    None => Ok(false),
                };
                match r {
                    Ok(true) => {
                        p.counters.tx_packets += 1;
                        p.counters.tx_bytes += u64::from(d.len);
                    }
                    Ok(false) => p.counters.tx_dropped += 1,
                    Err(_) => p.counters.tx_errors += 1,
                }
                pool.release(d.addr);
            }
        }
        PortIo::Xsk(x) if frames.iter().any(|d| FramePool::is_big(d.addr)) => {
            send_xsk_chains(x, pool, frames, &mut p.counters)
        }
        PortIo::Xsk(x) => {
            let n = x.send(frames);
            for d in &frames[..n] {
                p.counters.tx_packets += 1;
                p.counters.tx_bytes += u64::from(d.len);
            }
            for d in &frames[n..] {
                p.counters.tx_dropped += 1;
                pool.release(d.addr);
            }
        }
        PortIo::VhostUser(v) => {
            let before = (v.stats, v.not_ready);
            let (sent, bytes) = v.send(frames.iter().filter_map(|d| {
                let (c, off) = pool.chunk_ro(d.addr)?;
                let f = c.get(off..off + d.len as usize)?;
                let hdr = if meta {
                    Offload::before(c, off).to_vnet(f)
                } else {
                    [0; VNET_HDR_LEN]
                };
                Some((f, hdr))
            }));
            let c = &mut p.counters;
            c.tx_packets += sent as u64;
            c.tx_bytes += bytes;
            c.guest_queue_full += v.stats.rx_no_buffer - before.0.rx_no_buffer;
            c.guest_not_ready += v.not_ready - before.1;
            c.guest_bad_descriptor += (v.stats.rx_bad_chain + v.stats.rx_oversize)
                - (before.0.rx_bad_chain + before.0.rx_oversize);
            c.tx_dropped += (frames.len() - sent) as u64;
            frames.iter().for_each(|d| pool.release(d.addr));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_pieces_are_one_frame_in_a_big_chunk_and_given_back() {
        let mut pool = FramePool::new(16, 2048, false).unwrap();
        let free = pool.free_count();
        let mut pieces = Vec::new();
        let mut want = Vec::new();
        for (fill, len) in [(1u8, 1792u32), (2, 1792), (3, 300)] {
            let c = pool.alloc().unwrap();
            let (m, o) = pool.chunk_mut(c + 256).unwrap();
            m[o..o + len as usize].fill(fill);
            want.extend(std::iter::repeat_n(fill, len as usize));
            pieces.push(Desc::new(c + 256, len));
        }
        let d = gather(&mut pool, &pieces).expect("a big chunk is free");
        assert!(FramePool::is_big(d.addr));
        let (m, o) = pool.chunk_ro(d.addr).unwrap();
        assert_eq!(&m[o..o + d.len as usize], &want[..]);
        assert_eq!(pool.free_count(), free, "the pieces are back");
        // No big chunk free: dropped, the pieces still given back.
        while pool.alloc_big().is_some() {}
        let c = pool.alloc().unwrap();
        assert_eq!(gather(&mut pool, &[Desc::new(c + 256, 100)]), None);
        assert_eq!(pool.free_count(), free);
    }
}
