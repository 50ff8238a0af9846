//! The device side of a virtio-net port's split virtqueues: TX (guest →
//! switch) and RX (switch → guest), on `virtio-queue` over `vm-memory`.
//!
//! Guest memory is hostile: a descriptor outside it, a chain that loops or
//! never ends, a frame larger than a switch frame, a header cut short —
//! each ends as a counted drop with the chain handed back to the guest;
//! nothing here panics or reads outside the guest's regions (`vm-memory`
//! checks every access; `virtio-queue` bounds a chain by the queue size).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// `struct virtio_net_hdr_v1` (VIRTIO_F_VERSION_1; also the header with
/// `VIRTIO_NET_F_MRG_RXBUF`): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: u64 = 10;

/// Largest frame a port takes or gives: a 64 KiB super-frame (TSO) with
/// its Ethernet header.
pub const MAX_FRAME: usize = 14 + 65_535;

/// A frame for a guest and the virtio-net header to go before it (its
/// `num_buffers` is set here).
pub type ToRx<'a> = (&'a [u8], [u8; HDR_LEN]);

/// `frames` with headers that ask nothing of the guest.
pub fn plain<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> impl Iterator<Item = ToRx<'a>> {
    frames.into_iter().map(|f| (f, [0; HDR_LEN]))
}

/// Where frames the guest sends go: straight into the switch's frame
/// buffers, one copy out of guest memory per descriptor.
pub trait FrameSink {
    /// Room for the next frame *with* its virtio-net header in front (the
    /// header lands in room the sink does not need, e.g. headroom): `len`
    /// bytes of both, as the guest's descriptors say (the room may be
    /// shorter: the frame is then refused as oversize). `None` takes no
    /// more frames from the guest now (they stay queued).
    fn room(&mut self, len: usize) -> Option<&mut [u8]>;
    /// The room now holds a header and a frame of `len` bytes after it. A
    /// frame not committed (refused) leaves the room for the next one.
    fn commit(&mut self, len: usize);
}

/// Collects frames into vectors (tests and tools).
#[derive(Debug, Default)]
pub struct Collect {
    buf: Vec<u8>,
    pub frames: Vec<Vec<u8>>,
}

impl FrameSink for Collect {
    fn room(&mut self, _len: usize) -> Option<&mut [u8]> {
        self.buf.resize(HDR_LEN + MAX_FRAME, 0);
        Some(&mut self.buf)
    }

    fn commit(&mut self, len: usize) {
        self.frames.push(self.buf[HDR_LEN..HDR_LEN + len].to_vec());
    }
}

/// What happened on a port's queues, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VqStats {
    /// Frames taken from the guest.
    pub tx_frames: u64,
    /// Guest chains refused: a descriptor outside guest memory, or a chain
    /// shorter than the virtio-net header.
    pub tx_bad_chain: u64,
    /// Guest frames larger than the room the switch has for one (at most
    /// [`MAX_FRAME`]; a looping chain ends here).
    pub tx_oversize: u64,
    /// Frames written into the guest's buffers.
    pub rx_frames: u64,
    /// Frames dropped because the guest had no (or too few) buffers
    /// posted: its RX queue is full or it stopped draining it.
    pub rx_no_buffer: u64,
    /// Frames dropped because a guest buffer was unusable (outside guest
    /// memory, too small without mergeable buffers).
    pub rx_bad_chain: u64,
    /// Frames larger than [`MAX_FRAME`] not offered to the guest.
    pub rx_oversize: u64,
}

/// The used ring of a batch: each chain's element is written as it is
/// done; the ring's index goes to the guest once, at the end (so the
/// guest sees the whole batch at once, and the index store and its
/// barrier are paid once per batch, not per chain).
struct Used {
    ring: u64,
    size: u16,
    start: u16,
    n: u16,
}

impl Used {
    fn new(q: &Queue) -> Used {
        Used {
            ring: q.used_ring(),
            size: q.size().max(1),
            start: q.next_used(),
            n: 0,
        }
    }

    /// Chain `head` is done with `len` bytes written into it. (It cannot
    /// fail unless the used ring itself is outside guest memory, and then
    /// there is no one to tell.)
    fn push<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) {
        let slot = u64::from(self.start.wrapping_add(self.n) % self.size);
        let at = self.ring + 4 + 8 * slot;
        // struct virtq_used_elem { le32 id; le32 len; }
        let elem = u64::from(head) | u64::from(len) << 32;
        let _ = mem.write_obj(elem.to_le(), GuestAddress(at));
        self.n = self.n.wrapping_add(1);
    }

    /// Tell the guest (the index, after the elements).
    fn publish<M: GuestMemory>(self, q: &mut Queue, mem: &M) {
        if self.n == 0 {
            return;
        }
        let next = self.start.wrapping_add(self.n);
        let _ = mem.store(
            next.to_le(),
            GuestAddress(self.ring + 2),
            std::sync::atomic::Ordering::Release,
        );
        q.set_next_used(next);
    }
}

/// Take up to `max` frames the guest queued on its TX queue `q` into
/// `sink` (without their virtio-net header); every chain goes back to the
/// guest (used, length 0). Stops early when the sink has no room. Returns
/// how many chains were consumed. The caller notifies the guest once per
/// batch if [`needs_notify`] says so.
pub fn tx_burst<M>(
    q: &mut Queue,
    mem: &M,
    max: usize,
    stats: &mut VqStats,
    sink: &mut impl FrameSink,
) -> usize
where
    M: GuestMemory,
{
    let mut used = Used::new(q);
    let mut done = 0;
    // The guest's available index, read once for the batch. An index
    // more than a ring ahead is a broken guest: nothing is taken.
    if let Ok(mut avail) = q.iter(mem) {
        while done < max {
            let Some(chain) = avail.next() else {
                break;
            };
            // The chain's bytes (a chain is bounded by the queue size).
            let want = chain
                .clone()
                .readable()
                .fold(0usize, |n, d| n.saturating_add(d.len() as usize));
            let Some(room) = sink.room(want) else {
                avail.go_to_previous_position();
                break;
            };
            let head = chain.head_index();
            // Bytes of the chain read so far (header first, then the frame).
            let mut len = 0usize;
            let mut bad = false;
            let mut oversize = false;
            for d in chain.readable() {
                let n = d.len() as usize;
                let Some(dst) = room.get_mut(len..len + n) else {
                    oversize = true;
                    break;
                };
                if mem.read_slice(dst, d.addr()).is_err() {
                    bad = true;
                    break;
                }
                len += n;
            }
            if bad || (len < HDR_LEN && !oversize) {
                stats.tx_bad_chain += 1;
            } else if oversize {
                stats.tx_oversize += 1;
            } else {
                stats.tx_frames += 1;
                sink.commit(len - HDR_LEN);
            }
            used.push(mem, head, 0);
            done += 1;
        }
    }
    used.publish(q, mem);
    done
}

/// Write `frames` (each with a virtio-net header) into the buffers the
/// guest posted on its RX queue `q`: a frame takes one chain, or with
/// `mergeable` as many as it needs (their count goes into the header's
/// `num_buffers`). When the guest has too few buffers for a frame, nothing
/// is consumed for it and it and the rest of the batch are dropped
/// (counted); a buffer outside guest memory, or a single buffer too small
/// without `mergeable`, is given back empty and its frame dropped.
/// Returns the frames and bytes that reached the guest; the guest sees
/// them at once, at the end.
pub fn rx_burst<'a, M>(
    q: &mut Queue,
    mem: &M,
    frames: impl IntoIterator<Item = ToRx<'a>>,
    mergeable: bool,
    stats: &mut VqStats,
) -> (usize, u64)
where
    M: GuestMemory,
{
    let mut used = Used::new(q);
    let (mut sent, mut bytes) = (0, 0);
    let mut frames = frames.into_iter();
    if let Ok(mut avail) = q.iter(mem) {
        for (frame, hdr) in frames.by_ref() {
            match rx_one(&mut avail, mem, frame, hdr, mergeable, &mut used) {
                Rx::Sent => {
                    stats.rx_frames += 1;
                    sent += 1;
                    bytes += frame.len() as u64;
                }
                Rx::Oversize => stats.rx_oversize += 1,
                Rx::Bad => stats.rx_bad_chain += 1,
                Rx::NoBuffer => {
                    stats.rx_no_buffer += 1;
                    break;
                }
            }
        }
    }
    // No buffers (or a broken ring): the rest cannot go either.
    stats.rx_no_buffer += frames.count() as u64;
    used.publish(q, mem);
    (sent, bytes)
}

enum Rx {
    Sent,
    Oversize,
    Bad,
    NoBuffer,
}

fn rx_one<M>(
    avail: &mut virtio_queue::AvailIter<'_, &M>,
    mem: &M,
    frame: &[u8],
    mut hdr: [u8; HDR_LEN],
    mergeable: bool,
    used: &mut Used,
) -> Rx
where
    M: GuestMemory,
{
    if frame.len() > MAX_FRAME {
        return Rx::Oversize;
    }
    // num_buffers (little-endian), patched below when merged.
    hdr[10] = 1;
    hdr[11] = 0;
    let total = HDR_LEN + frame.len();
    // Write bytes `at..at + n` of header-then-frame to guest `addr`: at
    // most one copy from each.
    let put = |at: usize, n: usize, addr: GuestAddress| -> bool {
        let h = hdr
            .get(at.min(HDR_LEN)..(at + n).min(HDR_LEN))
            .unwrap_or(&[]);
        let f_from = at.max(HDR_LEN) - HDR_LEN;
        let f_to = (at + n).max(HDR_LEN) - HDR_LEN;
        let f = frame.get(f_from..f_to).unwrap_or(&[]);
        (h.is_empty() || mem.write_slice(h, addr).is_ok())
            && (f.is_empty()
                || addr
                    .checked_add(h.len() as u64)
                    .is_some_and(|a| mem.write_slice(f, a).is_ok()))
    };
    // (head, bytes written) per chain. Guests post buffers of at least a
    // few hundred bytes, so 128 covers every sane case (a 64 KiB frame in
    // 1,500-byte buffers takes 44); a frame that would
    // need more is refused as a bad chain.
    let mut chains: [(u16, u32); 128] = [(0, 0); 128];
    let mut n = 0usize;
    let mut written = 0usize;
    let mut first_addr: Option<GuestAddress> = None;
    while written < total {
        let Some(chain) = avail.next() else {
            // Too few buffers: give back what was taken for this frame.
            for _ in 0..n {
                avail.go_to_previous_position();
            }
            return Rx::NoBuffer;
        };
        let head = chain.head_index();
        let mut in_chain = 0usize;
        let mut bad = false;
        for d in chain.writable() {
            if written >= total {
                break;
            }
            if first_addr.is_none() {
                first_addr = Some(d.addr());
            }
            let len = (d.len() as usize).min(total - written);
            if !put(written, len, d.addr()) {
                bad = true;
                break;
            }
            written += len;
            in_chain += len;
        }
        // A chain's share of one frame: far below u32::MAX.
        let usable = match u32::try_from(in_chain) {
            Ok(l) if !bad && n < chains.len() && (mergeable || written >= total) => Some(l),
            _ => None,
        };
        let Some(in_chain) = usable else {
            // Unusable: every chain taken for this frame goes back empty
            // (the guest counts a too-short frame).
            for &(h, _) in &chains[..n] {
                used.push(mem, h, 0);
            }
            used.push(mem, head, 0);
            return Rx::Bad;
        };
        chains[n] = (head, in_chain);
        n += 1;
    }
    if n > 1 {
        if let Some(a) = first_addr.and_then(|a| a.checked_add(NUM_BUFFERS_AT)) {
            // At most `chains.len()` buffers.
            if let Ok(n) = u16::try_from(n) {
                let _ = mem.write_obj(n.to_le(), a);
            }
        }
    }
    for &(h, len) in &chains[..n] {
        used.push(mem, h, len);
    }
    Rx::Sent
}

/// Whether the guest wants an interrupt for what was used since the last
/// time this was asked (`last`: the used index then, `None` at first):
/// with `VIRTIO_RING_F_EVENT_IDX`, only if its `used_event` mark was
/// passed (the kernel's `vring_need_event`); otherwise unless it set
/// `VRING_AVAIL_F_NO_INTERRUPT`. Errors (rings outside memory) count as
/// "no".
pub fn needs_notify<M: GuestMemory>(q: &Queue, mem: &M, last: &mut Option<u16>) -> bool {
    let new = q.next_used();
    let Some(old) = last.replace(new) else {
        return true;
    };
    if new == old {
        return false;
    }
    // The used elements and index are written before the guest's mark is
    // read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let avail = GuestAddress(q.avail_ring());
    if !q.event_idx_enabled() {
        let flags: u16 = mem.read_obj(avail).map(u16::from_le).unwrap_or(1);
        return flags & 1 == 0;
    }
    let at = avail.checked_add(4 + 2 * u64::from(q.size()));
    let Some(Ok(event)) = at.map(|a| mem.read_obj::<u16>(a).map(u16::from_le)) else {
        return false;
    };
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests;
