//! The device side of a virtio-net port's split virtqueues: TX (guest →
//! switch) and RX (switch → guest), on `virtio-queue` over `vm-memory`.
//!
//! Guest memory is hostile: a descriptor outside it, a chain that loops or
//! never ends, a frame larger than a switch frame, a header cut short —
//! each ends as a counted drop with the chain handed back to the guest;
//! nothing here panics or reads outside the guest's regions (`vm-memory`
//! checks every access; `virtio-queue` bounds a chain by the queue size).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// `struct virtio_net_hdr_v1` (VIRTIO_F_VERSION_1; also the header with
/// `VIRTIO_NET_F_MRG_RXBUF`): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: u64 = 10;

/// Largest frame a port takes or gives (a jumbo Ethernet frame).
pub const MAX_FRAME: usize = 9216;

/// Where frames the guest sends go: straight into the switch's frame
/// buffers, one copy out of guest memory per descriptor.
pub trait FrameSink {
    /// Room for the next frame *with* its virtio-net header in front (the
    /// header lands in room the sink does not need, e.g. headroom); `None`
    /// takes no more frames from the guest now (they stay queued).
    fn room(&mut self) -> Option<&mut [u8]>;
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
    fn room(&mut self) -> Option<&mut [u8]> {
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
    let mut done = 0;
    while done < max {
        let Some(room) = sink.room() else {
            break;
        };
        let Some(chain) = q.pop_descriptor_chain(mem) else {
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
        // A used element for a ring we just took it from: it cannot fail
        // unless the used ring itself is outside guest memory, and then
        // there is no one to tell.
        let _ = q.add_used(mem, head, 0);
        done += 1;
    }
    done
}

/// Write `frame` (with a virtio-net header) into the buffers the guest
/// posted on its RX queue `q`: one chain, or with `mergeable` as many as it
/// takes (their count goes into the header's `num_buffers`). If the guest
/// has too few buffers, nothing is consumed and the frame is dropped
/// (counted); a buffer outside guest memory, or a single buffer too small
/// without `mergeable`, is given back empty and the frame dropped. Returns
/// true if the frame reached the guest.
pub fn rx_frame<M>(
    q: &mut Queue,
    mem: &M,
    frame: &[u8],
    mergeable: bool,
    stats: &mut VqStats,
) -> bool
where
    M: GuestMemory,
{
    if frame.len() > MAX_FRAME {
        stats.rx_oversize += 1;
        return false;
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[10] = 1; // num_buffers (little-endian), patched below when merged
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
    let start = q.next_avail();
    // (head, bytes written) per chain. Guests post buffers of at least a
    // few hundred bytes, so 64 covers every sane case; a frame that would
    // need more is refused as a bad chain.
    let mut used: [(u16, u32); 64] = [(0, 0); 64];
    let mut chains = 0usize;
    let mut written = 0usize;
    let mut first_addr: Option<GuestAddress> = None;
    while written < total {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            // Too few buffers: give back what was taken for this frame.
            q.set_next_avail(start);
            stats.rx_no_buffer += 1;
            return false;
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
            let n = (d.len() as usize).min(total - written);
            if !put(written, n, d.addr()) {
                bad = true;
                break;
            }
            written += n;
            in_chain += n;
        }
        if bad || chains == used.len() || (!mergeable && written < total) {
            // Unusable: every chain taken for this frame goes back empty
            // (the guest counts a too-short frame).
            for &(h, _) in &used[..chains] {
                let _ = q.add_used(mem, h, 0);
            }
            let _ = q.add_used(mem, head, 0);
            stats.rx_bad_chain += 1;
            return false;
        }
        used[chains] = (head, u32::try_from(in_chain).unwrap_or(u32::MAX));
        chains += 1;
    }
    if chains > 1 {
        if let Some(a) = first_addr.and_then(|a| a.checked_add(NUM_BUFFERS_AT)) {
            let _ = mem.write_obj(u16::try_from(chains).unwrap_or(u16::MAX).to_le(), a);
        }
    }
    for &(h, n) in &used[..chains] {
        let _ = q.add_used(mem, h, n);
    }
    stats.rx_frames += 1;
    true
}

/// Whether the guest wants an interrupt for what was used since the last
/// one (with `VIRTIO_RING_F_EVENT_IDX`, only once its own mark is passed;
/// otherwise unless it suppressed them). Errors (rings outside memory)
/// count as "no".
pub fn needs_notify<M: GuestMemory>(q: &mut Queue, mem: &M) -> bool {
    q.needs_notification(mem).unwrap_or(false)
}

#[cfg(test)]
mod tests;
