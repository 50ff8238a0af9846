//! A port against an in-process VMM: `vhost`'s frontend speaks the
//! vhost-user protocol to the port's socket as QEMU would (features, a
//! memfd memory table, vring addresses, kick and call eventfds), and
//! `virtio-queue`'s mock plays the guest driver in that shared memory.

// Lengths and flags here are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::vhost::endpoint::Endpoint;
use crate::vhost::virtq::HDR_LEN;
use crate::vhost::vmm;

pub(crate) const MEM: usize = 1 << 20;
pub(crate) const RXQ: u64 = 0x0;
pub(crate) const TXQ: u64 = 0x4000;
pub(crate) const BUF: u64 = 0x1_0000;

pub(crate) struct Vmm {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap,
    pub kicks: [EventFd; 2],
    pub calls: [EventFd; 2],
}

/// The MAC in the device's config space, as the guest reads it.
pub(crate) fn mac(fe: &mut Frontend) -> Vec<u8> {
    let flags = vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE;
    fe.get_config(0, 6, flags, &[0; 6]).unwrap().1
}

/// Connect to the port's socket and set the device up as QEMU does.
pub(crate) fn connect(sock: &std::path::Path) -> Vmm {
    setup(Frontend::connect(sock, 2).unwrap())
}

/// Set the device up as QEMU does.
pub(crate) fn setup(fe: Frontend) -> Vmm {
    setup_named(fe, c"guest")
}

/// [`setup`] with the guest memory's memfd named `name`.
fn setup_named(fe: Frontend, name: &std::ffi::CStr) -> Vmm {
    // No event index here: the mock's rings leave no room for used_event.
    let no_event_idx = !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    let vmm::Attached {
        mut fe,
        mem,
        offered,
    } = vmm::attach(
        fe,
        name,
        MEM,
        no_event_idx,
        VhostUserProtocolFeatures::CONFIG,
    );
    assert_eq!(offered & FEATURES, FEATURES, "offered {offered:#x}");
    let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let calls = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    start_rings(&mut fe, &mem, &kicks, &calls);
    Vmm {
        fe,
        mem,
        kicks,
        calls,
    }
}

/// Set both rings up (fresh, at index 0) and start them, as QEMU does
/// when the guest's driver starts the device.
fn start_rings(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    kicks: &[EventFd; 2],
    calls: &[EventFd; 2],
) {
    start_rings_at(fe, mem, kicks, calls, &[RXQ, TXQ], 0);
}

/// Set rings `first`, `first + 1`, … up at `bases` (the mock's layout)
/// and start them.
fn start_rings_at(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    kicks: &[EventFd],
    calls: &[EventFd],
    bases: &[u64],
    first: usize,
) {
    for (j, &base) in bases.iter().enumerate() {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), 16);
        let at = vmm::RingAt {
            size: 16,
            desc: vq.desc_table_addr().0,
            avail: vq.avail_addr().0,
            used: vq.used_addr().0,
        };
        vmm::start_ring(fe, mem, first + j, at, &calls[j], &kicks[j]);
    }
}

pub(crate) fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

pub(crate) fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn sock_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vswitch-vu-{}-{tag}.sock", std::process::id()))
}

#[test]
fn a_vmm_connects_frames_flow_both_ways_and_a_restarted_vmm_gets_them_back() {
    let sock = sock_path("flow");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x42]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    until("the socket", || sock.exists());
    let mut port = VhostPort::new(shared.clone());
    assert_eq!(port.send(virtq::plain([&b"too early"[..]])).0, 0);
    assert_eq!(port.not_ready, 1);

    for round in 0..2 {
        let vmm = connect(&sock);
        // The guest sends a frame: header + payload over two descriptors.
        let txq = MockSplitQueue::create(&vmm.mem, GuestAddress(TXQ), 16);
        let payload = format!("hello from the guest, round {round}");
        vmm.mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(BUF))
            .unwrap();
        vmm.mem
            .write_slice(payload.as_bytes(), GuestAddress(BUF + 0x100))
            .unwrap();
        txq.add_desc_chains(
            &[
                desc(BUF, HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
                desc(BUF + 0x100, payload.len() as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        vmm.kicks[TX_QUEUE].write(1).unwrap();
        let mut got = crate::vhost::virtq::Collect::default();
        until("the guest's frame", || {
            port.recv(32, &mut got);
            !got.frames.is_empty()
        });
        assert_eq!(got.frames, vec![payload.into_bytes()]);
        assert_eq!(txq.used().idx().load(), 1);
        assert_eq!(vmm.calls[TX_QUEUE].read().unwrap(), 1, "the guest was told");

        // The guest posts receive buffers; a frame goes in.
        let rxq = MockSplitQueue::create(&vmm.mem, GuestAddress(RXQ), 16);
        rxq.add_desc_chains(
            &[
                desc(BUF + 0x1000, 2048, VRING_DESC_F_WRITE, 0),
                desc(BUF + 0x2000, 2048, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        vmm.kicks[RX_QUEUE].write(1).unwrap();
        let frame = [0xabu8; 60];
        assert_eq!(port.send(virtq::plain([&frame[..], &frame[..]])), (2, 120));
        assert_eq!(rxq.used().idx().load(), 2);
        let mut back = [0u8; 60];
        vmm.mem
            .read_slice(&mut back, GuestAddress(BUF + 0x1000 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(back, frame);
        assert_eq!(
            vmm.calls[RX_QUEUE].read().unwrap(),
            1,
            "one interrupt for the batch"
        );
        // No buffer left: counted, not blocking.
        let no_buffer = port.stats.rx_no_buffer;
        assert_eq!(port.send(virtq::plain([&frame[..]])).0, 0);
        assert_eq!(port.stats.rx_no_buffer, no_buffer + 1);

        // The VMM goes away (killed): the port forgets the guest.
        drop(vmm);
        until("the port to notice", || !port.connected());
        let before = port.not_ready;
        assert_eq!(port.send(virtq::plain([&frame[..]])).0, 0);
        assert_eq!(port.not_ready, before + 1);
        let mut none = crate::vhost::virtq::Collect::default();
        assert!(port.recv(32, &mut none) == 0);
        assert!(none.frames.is_empty(), "no guest");
    }
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn the_guest_reads_the_mac_from_the_device_config() {
    let sock = sock_path("config");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x43]);
    let _endpoint = Endpoint::listen(&sock, shared).unwrap();
    until("the socket", || sock.exists());
    let mut vmm = connect(&sock);
    assert_eq!(mac(&mut vmm.fe), vec![2, 0, 0, 0, 0, 0x43]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_guest_reset_stops_the_rings_and_the_restarted_driver_gets_frames_again() {
    let sock = sock_path("reset");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x45]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    let mut port = VhostPort::new(shared.clone());
    let mut vmm = connect(&sock);
    let frame = [0x5au8; 60];
    for round in 0..2 {
        let rxq = MockSplitQueue::create(&vmm.mem, GuestAddress(RXQ), 16);
        rxq.add_desc_chains(&[desc(BUF + 0x1000, 2048, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        vmm.kicks[RX_QUEUE].write(1).unwrap();
        // (Without REPLY_ACK the set-up is not waited for: until the
        // handler has it, frames are counted as not ready.)
        until("the rings to take a frame", || {
            port.send(virtq::plain([&frame[..]])).0 == 1
        });
        assert_eq!(rxq.used().idx().load(), 1, "round {round}");
        // The guest reboots: QEMU stops both rings (GET_VRING_BASE) and
        // says where they stood.
        assert_eq!(vmm.fe.get_vring_base(RX_QUEUE).unwrap(), 1);
        assert_eq!(vmm.fe.get_vring_base(TX_QUEUE).unwrap(), 0);
        let not_ready = port.not_ready;
        assert_eq!(
            port.send(virtq::plain([&frame[..]])).0,
            0,
            "a stopped ring takes nothing"
        );
        assert_eq!(port.not_ready, not_ready + 1);
        // The new driver sets the rings up again from scratch.
        let Vmm {
            fe,
            mem,
            kicks,
            calls,
            ..
        } = &mut vmm;
        start_rings(fe, mem, kicks, calls);
    }
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_guest_that_stops_draining_costs_counted_drops_not_a_stall() {
    let sock = sock_path("stuck");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x46]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    let mut port = VhostPort::new(shared);
    let vmm = connect(&sock);
    let rxq = MockSplitQueue::create(&vmm.mem, GuestAddress(RXQ), 16);
    let bufs: Vec<_> = (0..4)
        .map(|i| desc(BUF + 0x1000 * (i + 1), 2048, VRING_DESC_F_WRITE, 0))
        .collect();
    rxq.add_desc_chains(&bufs, 0).unwrap();
    vmm.kicks[RX_QUEUE].write(1).unwrap();
    until("the rings", || port.connected());
    // The guest never takes another buffer back: the four fill, every
    // later frame is a counted drop, and each batch returns at once.
    let frame = [0x11u8; 60];
    let mut taken = 0;
    for _ in 0..1000 {
        taken += port
            .send(virtq::plain(std::iter::repeat_n(&frame[..], 32)))
            .0;
    }
    assert_eq!(taken, 4);
    assert_eq!(port.stats.rx_no_buffer, 32_000 - 4);
    assert_eq!(rxq.used().idx().load(), 4);
    let _ = std::fs::remove_file(&sock);
}

/// A UDP frame from 10.0.0.1:`sport` to 10.0.0.2:80.
fn udp(sport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f
}

/// Pair 1's rings, at their own addresses.
const RXQ1: u64 = 0x8000;
const TXQ1: u64 = 0xc000;

/// Start pair 1's rings (the guest enabled multiqueue); their kick and
/// call eventfds.
fn start_pair_1(vmm: &mut Vmm) -> [[EventFd; 2]; 2] {
    let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let calls = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    let Vmm { fe, mem, .. } = vmm;
    start_rings_at(fe, mem, &kicks, &calls, &[RXQ1, TXQ1], 2);
    [kicks, calls]
}

/// Give each receive queue in `rx` 8 buffers of 1 KiB.
fn stock(rx: &[MockSplitQueue<'_, GuestMemoryMmap>]) {
    for (i, q) in rx.iter().enumerate() {
        let at = BUF + 0x4000 * i as u64;
        // (At most 8: the mock lays its used ring over avail entries 8+.)
        let bufs: Vec<_> = (0..8)
            .map(|j| desc(at + 0x400 * j, 0x400, VRING_DESC_F_WRITE, 0))
            .collect();
        q.add_desc_chains(&bufs, 0).unwrap();
    }
}

#[test]
fn two_fast_path_threads_each_serve_their_own_queue_pair() {
    let sock = sock_path("mq-threads");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x48]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    let mut ports = [0, 1].map(|t| VhostPort::for_thread(shared.clone(), t, 2));
    let mut vmm = setup(Frontend::connect(&sock, 4).unwrap());
    let _pair1 = start_pair_1(&mut vmm);
    let rx = [RXQ, RXQ1].map(|a| MockSplitQueue::create(&vmm.mem, GuestAddress(a), 16));
    stock(&rx);
    vmm.kicks[RX_QUEUE].write(1).unwrap();
    until("both pairs", || {
        ports[1].connected() && {
            let g = ports[1].guest.as_ref().unwrap();
            g.vrings
                .iter()
                .take(4)
                .all(|v| v.get_ref().get_queue().ready())
        }
    });
    // Each thread writes to its own pair's receive queue only, whatever
    // the flows.
    let frames: Vec<Vec<u8>> = (0..4).map(|s| udp(2000 + s)).collect();
    let (sent, _) = ports[1].send(virtq::plain(frames.iter().map(Vec::as_slice)));
    assert_eq!(sent, 4);
    assert_eq!(rx.each_ref().map(|q| q.used().idx().load()), [0, 4]);
    let (sent, _) = ports[0].send(virtq::plain(frames[..1].iter().map(Vec::as_slice)));
    assert_eq!(sent, 1);
    assert_eq!(rx.each_ref().map(|q| q.used().idx().load()), [1, 4]);
    // What the guest sends on pair p's transmit queue, thread p takes.
    let tx = [TXQ, TXQ1].map(|a| MockSplitQueue::create(&vmm.mem, GuestAddress(a), 16));
    for (p, q) in tx.iter().enumerate() {
        let at = BUF + 0x9000 + 0x100 * p as u64;
        let payload = [0x70 + p as u8; 40];
        let frame = [[0u8; HDR_LEN].as_slice(), &payload].concat();
        vmm.mem.write_slice(&frame, GuestAddress(at)).unwrap();
        q.add_desc_chains(&[desc(at, (HDR_LEN + 40) as u32, 0, 0)], 0)
            .unwrap();
    }
    for (p, port) in ports.iter_mut().enumerate() {
        let mut got = crate::vhost::virtq::Collect::default();
        until("the pair's frame", || {
            port.recv(32, &mut got);
            !got.frames.is_empty()
        });
        assert_eq!(got.frames, vec![vec![0x70 + p as u8; 40]], "thread {p}");
    }
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn with_two_queue_pairs_flows_spread_over_both_receive_queues_and_both_transmit_queues_are_served()
{
    let sock = sock_path("mq");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x47]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    let mut port = VhostPort::new(shared);
    let mut vmm = setup(Frontend::connect(&sock, 4).unwrap());
    let _pair1 = start_pair_1(&mut vmm);
    let rx = [RXQ, RXQ1].map(|a| MockSplitQueue::create(&vmm.mem, GuestAddress(a), 16));
    stock(&rx);
    vmm.kicks[RX_QUEUE].write(1).unwrap();
    // (Without REPLY_ACK the set-up is not waited for.)
    until("both receive queues", || {
        port.connected() && {
            let g = port.guest.as_ref().unwrap();
            g.vrings
                .iter()
                .take(4)
                .all(|v| v.get_ref().get_queue().ready())
        }
    });
    // 4 flows: each stays on one queue, and both queues get some.
    let frames: Vec<Vec<u8>> = (0..4).map(|s| udp(1000 + s)).collect();
    let (sent, _) = port.send(virtq::plain(frames.iter().map(Vec::as_slice)));
    assert_eq!(sent, 4);
    let got = rx.each_ref().map(|q| q.used().idx().load());
    assert_eq!(got[0] + got[1], 4, "{got:?}");
    assert!(got[0] > 0 && got[1] > 0, "both queues used: {got:?}");
    // The same flows again land where they did.
    let (sent, _) = port.send(virtq::plain(frames.iter().map(Vec::as_slice)));
    assert_eq!(sent, 4);
    assert_eq!(
        rx.each_ref().map(|q| q.used().idx().load()),
        got.map(|n| 2 * n)
    );
    // Frames the guest sends on pair 1's transmit queue are taken too.
    let tx1 = MockSplitQueue::create(&vmm.mem, GuestAddress(TXQ1), 16);
    let payload = [0x77u8; 40];
    vmm.mem
        .write_slice(
            &[[0u8; HDR_LEN].as_slice(), &payload].concat(),
            GuestAddress(BUF + 0x9000),
        )
        .unwrap();
    tx1.add_desc_chains(&[desc(BUF + 0x9000, (HDR_LEN + 40) as u32, 0, 0)], 0)
        .unwrap();
    let mut got = crate::vhost::virtq::Collect::default();
    until("pair 1's frame", || {
        port.recv(32, &mut got);
        !got.frames.is_empty()
    });
    assert_eq!(got.frames, vec![payload.to_vec()]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn the_flow_hash_keeps_a_flow_together_and_spreads_flows() {
    assert_eq!(flow_hash(&udp(1)), flow_hash(&udp(1)));
    let queues: std::collections::BTreeSet<u32> = (0..64).map(|s| flow_hash(&udp(s)) % 4).collect();
    assert_eq!(queues.len(), 4, "64 flows reach all 4 queues");
    // Not IPv4, or cut short: the first queue, no panic.
    assert_eq!(flow_hash(&[0u8; 10]), 0);
    let mut arp = udp(1);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(flow_hash(&arp), 0);
    assert_eq!(flow_hash(&udp(1)[..24]), flow_hash(&udp(1)[..24]));
}

#[test]
fn guests_that_come_and_go_leave_no_memory_mapped_or_open() {
    let sock = sock_path("leak");
    let shared = Shared::new([2, 0, 0, 0, 0, 0x48]);
    let _endpoint = Endpoint::listen(&sock, shared.clone()).unwrap();
    let mut port = VhostPort::new(shared);
    // What of the guests' memory this process still holds: descriptors
    // and mappings of the test's uniquely named memfd.
    let held = || {
        let fds = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains("memfd:leakcheck"))
            .count();
        let maps = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains("memfd:leakcheck"))
            .count();
        (fds, maps)
    };
    for _ in 0..10 {
        let vmm = setup_named(Frontend::connect(&sock, 2).unwrap(), c"leakcheck");
        let rxq = MockSplitQueue::create(&vmm.mem, GuestAddress(RXQ), 16);
        rxq.add_desc_chains(&[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        vmm.kicks[RX_QUEUE].write(1).unwrap();
        until("the guest takes a frame", || {
            port.send(virtq::plain([&[7u8; 60][..]])).0 == 1
        });
        assert!(held().0 > 0, "the guest's memory is open while it runs");
        drop(rxq);
        drop(vmm);
        until("the guest gone", || !port.connected());
    }
    // The fast path lets go of the last guest's rings at its next look.
    until("every guest's memory released", || {
        port.connected();
        held() == (0, 0)
    });
    let _ = std::fs::remove_file(&sock);
}
