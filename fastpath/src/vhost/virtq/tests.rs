//! The queues against a fake guest: `virtio-queue`'s driver-side mock
//! writes descriptor tables and rings into a `GuestMemoryMmap`, as a
//! guest's virtio-net driver would.

// Lengths and flags here are small constants.
#![allow(clippy::cast_possible_truncation)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

/// [`rx_burst`] of one frame; true if it reached the guest.
fn rx_frame<M>(q: &mut Queue, mem: &M, frame: &[u8], mergeable: bool, stats: &mut VqStats) -> bool
where
    M: GuestMemory,
{
    rx_burst(q, mem, plain([frame]), mergeable, stats).0 == 1
}

const MEM: u64 = 0x10_0000;
/// Guest buffers live from here (the mock's rings sit below).
const BUF: u64 = 0x8000;

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// The used ring's element `i`: (head, length).
fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

fn used_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    vq.used().idx().load()
}

/// A frame as a guest sends it: header, then payload, split over two
/// descriptors at `at`.
fn post_tx(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    at: u64,
    payload: &[u8],
    first: u16,
) {
    mem.write_slice(&[0u8; HDR_LEN], GuestAddress(at)).unwrap();
    mem.write_slice(payload, GuestAddress(at + 0x100)).unwrap();
    vq.add_desc_chains(
        &[
            desc(at, HDR_LEN as u32, VRING_DESC_F_NEXT, first + 1),
            desc(at + 0x100, payload.len() as u32, 0, 0),
        ],
        first,
    )
    .unwrap();
}

#[test]
fn tx_frames_come_out_without_their_header_and_chains_go_back() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    post_tx(&mem, &vq, BUF, b"first frame", 0);
    post_tx(&mem, &vq, BUF + 0x1000, b"second", 2);
    let mut got = Collect::default();
    let mut st = VqStats::default();
    assert_eq!(tx_burst(&mut q, &mem, 32, &mut st, &mut got), 2);
    assert_eq!(
        got.frames,
        vec![b"first frame".to_vec(), b"second".to_vec()]
    );
    assert_eq!(st.tx_frames, 2);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (2, 0));
    // Nothing more queued: nothing taken.
    let mut none = Collect::default();
    assert_eq!(tx_burst(&mut q, &mem, 32, &mut st, &mut none), 0);
    assert!(none.frames.is_empty());
}

#[test]
fn hostile_tx_chains_are_counted_drops_and_still_given_back() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            // 0: a descriptor far outside guest memory.
            desc(MEM * 4, 64, 0, 0),
            // 1: shorter than the virtio-net header.
            desc(BUF, 5, 0, 0),
            // 2 → 3 → 2 …: a loop, bounded by the queue size (16 × 8 KiB
            // descriptors would pass MAX_FRAME first).
            desc(BUF, 8192, VRING_DESC_F_NEXT, 3),
            desc(BUF, 8192, VRING_DESC_F_NEXT, 2),
        ],
        0,
    )
    .unwrap();
    // 4: larger than a super-frame in one descriptor.
    vq.add_desc_chains(&[desc(BUF, (HDR_LEN + MAX_FRAME + 1) as u32, 0, 0)], 4)
        .unwrap();
    // 5: a descriptor that starts inside memory and runs past its end.
    vq.add_desc_chains(&[desc(MEM - 8, 64, 0, 0)], 5).unwrap();
    let mut st = VqStats::default();
    let mut got = Collect::default();
    let n = tx_burst(&mut q, &mem, 32, &mut st, &mut got);
    assert!(
        got.frames.is_empty(),
        "delivered frames of {:?} bytes",
        got.frames.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(n, 5);
    assert_eq!(
        (st.tx_frames, st.tx_bad_chain, st.tx_oversize),
        (0, 3, 2),
        "{st:?}"
    );
    // Every chain went back, so the guest can reuse its buffers.
    assert_eq!(used_idx(&vq), 5);
}

/// `n` receive buffers of `size` bytes each, one descriptor per chain.
fn post_rx(vq: &MockSplitQueue<'_, GuestMemoryMmap>, n: u16, size: u32) {
    let descs: Vec<RawDescriptor> = (0..n)
        .map(|i| desc(BUF + u64::from(i) * 0x1000, size, VRING_DESC_F_WRITE, 0))
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
}

fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
fn rx_writes_header_and_frame_into_one_buffer() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    post_rx(&vq, 2, 2048);
    let mut st = VqStats::default();
    let frame: Vec<u8> = (0..100u8).collect();
    assert!(rx_frame(&mut q, &mem, &frame, true, &mut st));
    assert_eq!(used_idx(&vq), 1);
    assert_eq!(used(&vq, 0), (0, (HDR_LEN + 100) as u32));
    let hdr = read(&mem, BUF, HDR_LEN);
    assert_eq!(&hdr[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(read(&mem, BUF + HDR_LEN as u64, 100), frame);
    assert_eq!(st.rx_frames, 1);
}

#[test]
fn rx_merges_a_large_frame_over_several_buffers() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    post_rx(&vq, 4, 512);
    let frame: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    let mut st = VqStats::default();
    assert!(rx_frame(&mut q, &mem, &frame, true, &mut st));
    // 12 + 1200 bytes over 512-byte buffers: three of them.
    assert_eq!(used_idx(&vq), 3);
    assert_eq!(used(&vq, 0), (0, 512));
    assert_eq!(used(&vq, 1), (1, 512));
    assert_eq!(used(&vq, 2), (2, (HDR_LEN + 1200 - 1024) as u32));
    assert_eq!(
        &read(&mem, BUF, HDR_LEN)[10..12],
        &[3, 0],
        "num_buffers = 3"
    );
    let mut back = read(&mem, BUF + HDR_LEN as u64, 512 - HDR_LEN);
    back.extend(read(&mem, BUF + 0x1000, 512));
    back.extend(read(&mem, BUF + 0x2000, HDR_LEN + 1200 - 1024));
    assert_eq!(back, frame);
}

#[test]
fn a_guest_without_enough_buffers_loses_the_frame_but_keeps_its_buffers() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut st = VqStats::default();
    // None posted (a guest that stopped draining).
    assert!(!rx_frame(&mut q, &mem, &[1; 60], true, &mut st));
    // Two 512-byte buffers for a 1200-byte frame: not enough, nothing used.
    post_rx(&vq, 2, 512);
    assert!(!rx_frame(&mut q, &mem, &[1; 1200], true, &mut st));
    assert_eq!(st.rx_no_buffer, 2);
    assert_eq!(used_idx(&vq), 0);
    // The buffers are still there for a frame that fits.
    assert!(rx_frame(&mut q, &mem, &[2; 300], true, &mut st));
    assert_eq!(used_idx(&vq), 1);
}

#[test]
fn unusable_rx_buffers_are_given_back_empty() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(
        &[
            // Outside guest memory.
            desc(MEM * 2, 2048, VRING_DESC_F_WRITE, 0),
            // Too small for the frame, and buffers are not mergeable.
            desc(BUF, 64, VRING_DESC_F_WRITE, 0),
            // Read-only: nothing to write into.
            desc(BUF, 2048, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut st = VqStats::default();
    for _ in 0..3 {
        assert!(!rx_frame(&mut q, &mem, &[3; 200], false, &mut st));
    }
    assert_eq!(st.rx_bad_chain, 3, "{st:?}");
    assert_eq!(used_idx(&vq), 3);
    for i in 0..3 {
        assert_eq!(used(&vq, i).1, 0);
    }
    assert!(!rx_frame(&mut q, &mem, &[0; MAX_FRAME + 1], true, &mut st));
    assert_eq!(st.rx_oversize, 1);
}

#[test]
fn the_guest_is_notified_once_per_batch_and_only_when_it_asks() {
    let mem = guest();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    // The mock packs its used ring right after the avail ring's entries,
    // where `used_event` belongs: give the device a used ring of its own.
    q.set_used_ring_address(Some(0x4000), Some(0));
    q.set_event_idx(true);
    post_rx(&vq, 8, 2048);
    // used_event (after the avail ring) = 3: interrupt once the used
    // index passes 3.
    let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
    mem.write_obj(3u16.to_le(), used_event).unwrap();
    let mut st = VqStats::default();
    let mut last = Some(q.next_used());
    for _ in 0..2 {
        assert!(rx_frame(&mut q, &mem, &[1; 60], true, &mut st));
    }
    assert!(
        !needs_notify(&q, &mem, &mut last),
        "used 2, the guest asked at 4"
    );
    for _ in 0..3 {
        assert!(rx_frame(&mut q, &mem, &[1; 60], true, &mut st));
    }
    assert!(
        needs_notify(&q, &mem, &mut last),
        "used 5 passed 4: one interrupt for the batch"
    );
    assert!(
        !needs_notify(&q, &mem, &mut last),
        "and not again for the same work"
    );
    // Without the event index the guest's flag decides.
    q.set_event_idx(false);
    assert!(rx_frame(&mut q, &mem, &[1; 60], true, &mut st));
    assert!(needs_notify(&q, &mem, &mut last), "no flag: notify");
    mem.write_obj(1u16.to_le(), vq.avail_addr()).unwrap();
    assert!(rx_frame(&mut q, &mem, &[1; 60], true, &mut st));
    assert!(
        !needs_notify(&q, &mem, &mut last),
        "VRING_AVAIL_F_NO_INTERRUPT"
    );
}
