//! The traffic source of benches/vhost-user, for both port types, so the
//! two are offered the same load by the same program:
//!
//! - `vhost_driver SOCK_A SOCK_B SECONDS FLOWS [PPS]` plays the VMM and
//!   both guests of two vhost-user ports, without an emulated CPU in the
//!   way: it connects to both ports as a VMM would (vhost's frontend,
//!   memfd guest memory), offers 64-byte UDP frames from guest A to guest
//!   B (over FLOWS source ports) on A's transmit queue, keeps B's receive
//!   queue stocked, and after SECONDS (and 100 ms to drain) prints
//!   `sent=<n> received=<n> lag=<n>`. Paced at PPS, a frame that is due
//!   while A's ring is full (the switch has not taken the earlier ones)
//!   counts as sent and, never arriving, as lost: the same as a frame a
//!   full tap queue drops. Unpaced, it keeps A's ring full.
//! - `vhost_driver --tap IFACE SECONDS FLOWS PPS` sends the same frames,
//!   paced, into a tap port's VM side (the kernel device in the VM's
//!   namespace) through an AF_PACKET socket that bypasses the qdisc,
//!   FLOWS frames built once and sent 64 per sendmmsg; prints
//!   `sent=<n> lag=<n>`. What arrives is counted by the benchmark on the
//!   receiving device.
//!
//! - `vhost_driver --tso SOCK_A SOCK_B SECONDS` plays two guests that
//!   negotiated checksum and TCP segmentation offloads (CSUM, HOST_TSO4,
//!   GUEST_CSUM, GUEST_TSO4, mergeable receive buffers): A keeps its
//!   transmit ring full of 64 KiB TCP super-frames (virtio-net header
//!   "needs checksum", GSO TCPv4, MSS 1448) of one flow to B, B's receive
//!   ring is kept stocked with 4 KiB buffers; SECONDS from 200 ms after
//!   the first frame arrived, prints
//!   `frames=<n> bytes=<n> gbps=<x>`: the frames and bytes (Ethernet
//!   frames, without their virtio-net headers) B received.
//!
//! - `vhost_driver --mq CORES SOCK_A SOCK_B SECONDS FLOWS` plays two
//!   multiqueue guests (VIRTIO_NET_F_MQ, one queue pair per entry of
//!   CORES, e.g. `0,1`), unpaced: one driver thread per pair, pinned to
//!   its core, keeps A's transmit ring of that pair full of 64-byte UDP
//!   frames (FLOWS source ports of its own) and B's receive ring of that
//!   pair stocked. After 0.5 s of warm-up it counts for SECONDS what B's
//!   rings received; prints `received=<n> pps=<x> per_pair=<n>,<n>…`.
//!   Descriptors are used in order, so a ring is topped up by moving its
//!   avail index: the driver does no work per frame.
//!   Each driver thread shares its core with a switch thread, so it runs
//!   as a real-time (SCHED_FIFO) thread that tops its rings up and sleeps
//!   for [`MQ_PERIOD`]: it takes the core for a few microseconds per
//!   period, the switch has the rest, and no time slice of the
//!   scheduler's leaves the switch waiting on a descheduled guest with
//!   its rings empty (a 1 024-entry ring lasts the switch well under a
//!   time slice).
//!
//! The rings are written by hand (descriptor table, avail and used rings
//! of the split layout): descriptors are built once and reused, so the
//! driver's cost per frame is an avail entry and an index update.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

#[path = "pace.rs"]
mod pace;
#[path = "pin.rs"]
mod pin;
#[path = "rawsend.rs"]
mod rawsend;

use fastpath::vhost::vmm;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Ring size: QEMU's largest for vhost-user (`tx_queue_size=1024`), and as
/// deep as the tap peer's queue (the benchmark sets its txqueuelen to
/// match), so both absorb the same stall of the switch.
const Q: u16 = 1024;
const MEM: usize = 16 << 20;
const HDR: usize = 12;
/// A frame as the driver queues it: header and 64 bytes.
const FRAME_LEN: u32 = 12 + 64;

/// One split ring at `base` in guest memory.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn at(base: u64) -> Ring {
        Ring {
            desc: base,
            avail: base + 16 * u64::from(Q),
            // After the avail ring (4 + 2·Q bytes), 4 KiB aligned.
            used: (base + 16 * u64::from(Q) + 4 + 2 * u64::from(Q)).next_multiple_of(0x1000),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16) {
        let d = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr.to_le(), d).unwrap();
        mem.write_obj(len.to_le(), d.unchecked_add(8)).unwrap();
        mem.write_obj(flags.to_le(), d.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, d.unchecked_add(14)).unwrap();
    }

    /// Offer descriptor `id`.
    fn push(&mut self, mem: &GuestMemoryMmap, id: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % Q));
        mem.write_obj(id.to_le(), slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish(&self, mem: &GuestMemoryMmap) {
        fence(Ordering::Release);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Used entries the device added since the last call: their ids and
    /// lengths.
    fn take_used_lens(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<u16>, lens: &mut Vec<u32>) {
        let idx: u16 = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        fence(Ordering::Acquire);
        while self.used_seen != idx {
            let e = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % Q));
            let id: u32 = u32::from_le(mem.read_obj(e).unwrap());
            let len: u32 = u32::from_le(mem.read_obj(e.unchecked_add(4)).unwrap());
            out.push(u16::try_from(id).unwrap_or(u16::MAX));
            lens.push(len);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }

    /// Offer again, in order, every descriptor the device used since the
    /// last call; how many. Valid while every avail slot `i` holds
    /// descriptor `i` and the device uses descriptors in the order offered
    /// (one consumer, one descriptor per frame): then the avail entries
    /// never change and only the two indices move — no work per frame.
    fn recycle_in_order(&mut self, mem: &GuestMemoryMmap) -> u16 {
        let idx: u16 = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        fence(Ordering::Acquire);
        let n = idx.wrapping_sub(self.used_seen);
        if n > 0 {
            self.used_seen = idx;
            self.avail_idx = self.avail_idx.wrapping_add(n);
            self.publish(mem);
        }
        n
    }

    /// Used entries the device added since the last call: their ids.
    fn take_used(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<u16>) {
        let idx: u16 = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        fence(Ordering::Acquire);
        while self.used_seen != idx {
            let e = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % Q));
            let id: u32 = u32::from_le(mem.read_obj(e).unwrap());
            out.push(u16::try_from(id).unwrap_or(u16::MAX));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }
}

struct Device {
    _fe: vmm::Frontend,
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    _fds: Vec<EventFd>,
}

/// The checksum and segmentation offloads a guest may negotiate.
const OFFLOADS: [u32; 6] = {
    use virtio_bindings::virtio_net as v;
    [
        v::VIRTIO_NET_F_CSUM,
        v::VIRTIO_NET_F_GUEST_CSUM,
        v::VIRTIO_NET_F_HOST_TSO4,
        v::VIRTIO_NET_F_HOST_TSO6,
        v::VIRTIO_NET_F_GUEST_TSO4,
        v::VIRTIO_NET_F_GUEST_TSO6,
    ]
};

/// A guest's queue pairs by pair (receive ring, transmit ring), the VMM's
/// end of the connection and the rings' eventfds (kept open).
type Guest = (
    vmm::Frontend,
    GuestMemoryMmap,
    Vec<(Ring, Ring)>,
    Vec<EventFd>,
);

/// Connect to `sock` as a VMM whose guest has `pairs` queue pairs
/// (`features` and `protocol` the most it acks) and start every ring: pair
/// p's receive ring at p·64 KiB, its transmit ring 32 KiB after (each:
/// descriptors, avail, used).
fn guest(sock: &str, pairs: usize, features: u64, protocol: VhostUserProtocolFeatures) -> Guest {
    let fe = vmm::Frontend::connect(sock, 2 * pairs as u64).expect("connecting to the port");
    let vmm::Attached { mut fe, mem, .. } = vmm::attach(fe, c"guest", MEM, features, protocol);
    let mut rings = Vec::new();
    let mut fds = Vec::new();
    for p in 0..pairs {
        let base = 0x1_0000 * p as u64;
        let (rx, tx) = (Ring::at(base), Ring::at(base + 0x8000));
        for (i, r) in [&rx, &tx].into_iter().enumerate() {
            let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
            let at = vmm::RingAt {
                size: Q,
                desc: r.desc,
                avail: r.avail,
                used: r.used,
            };
            vmm::start_ring(&mut fe, &mem, 2 * p + i, at, &call, &kick);
            // One kick publishes the queues to the switch; after that it
            // polls.
            kick.write(1).unwrap();
            fds.push(call);
            fds.push(kick);
        }
        rings.push((rx, tx));
    }
    (fe, mem, rings, fds)
}

/// A guest on `sock` with one queue pair (no VIRTIO_NET_F_MQ), as most
/// are; with `offloads`, checksum and TSO offloads negotiated, else none
/// (the 64-byte figures compare with the tap's plain frames).
fn device(sock: &str, offloads: bool) -> Device {
    let mut features = !(1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ);
    if !offloads {
        OFFLOADS.iter().for_each(|f| features &= !(1u64 << f));
    }
    let (fe, mem, mut rings, fds) = guest(sock, 1, features, VhostUserProtocolFeatures::REPLY_ACK);
    let (rx, tx) = rings.pop().expect("one pair");
    Device {
        _fe: fe,
        mem,
        rx,
        tx,
        _fds: fds,
    }
}

/// A multiqueue guest on `sock` with `pairs` queue pairs, no offloads.
fn device_mq(sock: &str, pairs: usize) -> Guest {
    let mut features = !0u64;
    OFFLOADS.iter().for_each(|f| features &= !(1u64 << f));
    let protocol = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ;
    guest(sock, pairs, features, protocol)
}

/// How often a `--mq` driver thread tops its rings up: 1 024 frames per
/// 100 µs is 10 Mpps per pair, beyond what one switch thread takes here.
const MQ_PERIOD: Duration = Duration::from_micros(100);

/// Make the calling thread real-time (SCHED_FIFO, the lowest priority):
/// it preempts the switch's threads when it wakes.
fn real_time() {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: `p` is a valid sched_param; 0 is the calling thread.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
    assert_eq!(r, 0, "SCHED_FIFO: {}", std::io::Error::last_os_error());
}

/// `--mq CORES SOCK_A SOCK_B SECONDS FLOWS` (see the module documentation).
fn mq_mode(a: &[String]) {
    let usage = "usage: vhost_driver --mq CORES SOCK_A SOCK_B SECONDS FLOWS";
    let cores: Vec<usize> = a
        .get(2)
        .expect(usage)
        .split(',')
        .map(|c| c.parse().expect(usage))
        .collect();
    let (sa, sb) = (a.get(3).expect(usage), a.get(4).expect(usage));
    let secs: f64 = a.get(5).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = a.get(6).and_then(|s| s.parse().ok()).expect(usage);
    let pairs = cores.len();
    let (_fa, ma, ra, _xa) = device_mq(sa, pairs);
    let (_fb, mb, rb, _xb) = device_mq(sb, pairs);
    const TX_BUF: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x20_0000;
    const RX_LEN: u32 = 2048;
    let start = Instant::now();
    let warm = Duration::from_millis(500);
    let end = warm + Duration::from_secs_f64(secs);
    let per_pair: Vec<u64> = std::thread::scope(|s| {
        let threads: Vec<_> = ra
            .into_iter()
            .zip(rb)
            .enumerate()
            .map(|(p, ((_, mut tx), (mut rx, _)))| {
                let (ma, mb, core) = (&ma, &mb, cores[p]);
                s.spawn(move || {
                    pin::pin_to(core);
                    real_time();
                    // This pair's frames, flows of its own, all offered.
                    let first = 1000 + flows.max(1) * u16::try_from(p).unwrap_or(0);
                    for i in 0..Q {
                        let at = TX_BUF + 0x2_0000 * p as u64 + u64::from(i) * 128;
                        let mut b = [0u8; HDR + 64];
                        b[HDR..].copy_from_slice(&frame(first + i % flows.max(1)));
                        ma.write_slice(&b, GuestAddress(at)).unwrap();
                        tx.set_desc(ma, i, at, FRAME_LEN, 0);
                        tx.push(ma, i);
                    }
                    tx.publish(ma);
                    for i in 0..Q {
                        let at =
                            RX_BUF + (p as u64 * u64::from(Q) + u64::from(i)) * u64::from(RX_LEN);
                        rx.set_desc(mb, i, at, RX_LEN, 2 /* WRITE */);
                        rx.push(mb, i);
                    }
                    rx.publish(mb);
                    let (mut received, mut at_warm) = (0u64, None);
                    loop {
                        let t = start.elapsed();
                        if t >= end {
                            break;
                        }
                        if t >= warm && at_warm.is_none() {
                            at_warm = Some(received);
                        }
                        // (Slot i holds descriptor i on both rings.)
                        tx.recycle_in_order(ma);
                        received += u64::from(rx.recycle_in_order(mb));
                        std::thread::sleep(MQ_PERIOD);
                    }
                    received - at_warm.unwrap_or(0)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let received: u64 = per_pair.iter().sum();
    let list: Vec<String> = per_pair.iter().map(u64::to_string).collect();
    println!(
        "received={received} pps={:.0} per_pair={}",
        received as f64 / secs,
        list.join(",")
    );
}

/// A 64-byte Ethernet/IPv4/UDP frame from A to B.
fn frame(sport: u16) -> Vec<u8> {
    let flow = fastpath::synth::UdpFlow {
        src_mac: [2, 0, 0, 0, 0, 0x0a],
        dst_mac: [2, 0, 0, 0, 0, 0x0b],
        src_ip: std::net::Ipv4Addr::new(10, 0, 0, 10),
        dst_ip: std::net::Ipv4Addr::new(10, 0, 0, 11),
        src_port: sport,
        dst_port: 9,
    };
    fastpath::synth::udp_frame(&flow, 64)
}

/// `--tap IFACE SECONDS FLOWS PPS`: paced frames into a tap's VM side.
fn tap_mode(a: &[String]) {
    let usage = "usage: vhost_driver --tap IFACE SECONDS FLOWS PPS";
    let iface = a.get(2).expect(usage);
    let secs: f64 = a.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = a.get(4).and_then(|s| s.parse().ok()).expect(usage);
    let pps: f64 = a.get(5).and_then(|s| s.parse().ok()).expect(usage);
    let sock = rawsend::RawSocket::open(iface);
    let frames: Vec<Vec<u8>> = (0..flows.max(1)).map(|i| frame(1000 + i)).collect();
    let mut pacer = pace::Pacer::new(secs, Some(pps));
    let sent = sock.send_paced(&frames, &mut pacer);
    println!("sent={sent} lag={}", pacer.lag(sent));
}

/// `--tso SOCK_A SOCK_B SECONDS`: super-frames from A to B (see the
/// module documentation).
fn tso_mode(a: &[String]) {
    let usage = "usage: vhost_driver --tso SOCK_A SOCK_B SECONDS";
    let (sa, sb) = (a.get(2).expect(usage), a.get(3).expect(usage));
    let secs: f64 = a.get(4).and_then(|s| s.parse().ok()).expect(usage);
    let mut da = device(sa, true);
    let mut db = device(sb, true);
    // A's super-frames: NBUF distinct buffers, every descriptor points at
    // one of them (the switch only reads them).
    const NBUF: u64 = 16;
    const TX_BUF: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x40_0000;
    const RX_LEN: u32 = 4096;
    const PAYLOAD: usize = 64_000;
    let frame = fastpath::synth::tso_frame(&fastpath::synth::BULK_A_TO_B, PAYLOAD);
    let mut hdr = [0u8; HDR];
    hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    let len = u32::try_from(HDR + frame.len()).unwrap();
    for b in 0..NBUF {
        let at = TX_BUF + b * 0x1_0000 + b * 0x100;
        da.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        da.mem
            .write_slice(&frame, GuestAddress(at + HDR as u64))
            .unwrap();
    }
    for i in 0..Q {
        let b = u64::from(i) % NBUF;
        da.tx
            .set_desc(&da.mem, i, TX_BUF + b * 0x1_0000 + b * 0x100, len, 0);
        da.tx.push(&da.mem, i);
    }
    da.tx.publish(&da.mem);
    for i in 0..Q {
        let at = RX_BUF + u64::from(i) * u64::from(RX_LEN);
        db.rx.set_desc(&db.mem, i, at, RX_LEN, 2 /* WRITE */);
        db.rx.push(&db.mem, i);
    }
    db.rx.publish(&db.mem);
    let (mut frames, mut bytes) = (0u64, 0u64);
    // Buffers still to come of the frame being received.
    let mut rest = 0u16;
    let mut ids = Vec::with_capacity(usize::from(Q));
    let mut lens = Vec::with_capacity(usize::from(Q));
    // The clock starts 200 ms after the first frame reached B (the
    // switch picks a new VMM's rings up on its own time, and the flow's
    // first frames go through the coprocessor as segments).
    let connected = Instant::now();
    let mut first: Option<Instant> = None;
    let mut measured_from: Option<(Instant, u64, u64)> = None;
    loop {
        match (first, measured_from) {
            (None, _) if frames > 0 => first = Some(Instant::now()),
            (None, _) => assert!(
                connected.elapsed() < Duration::from_secs(5),
                "no frame came through the switch within 5 s"
            ),
            (Some(f), None) if f.elapsed() >= Duration::from_millis(200) => {
                measured_from = Some((Instant::now(), frames, bytes));
            }
            (_, Some((t, _, _))) if t.elapsed().as_secs_f64() >= secs => break,
            _ => {}
        }
        ids.clear();
        da.tx.take_used(&da.mem, &mut ids);
        for &id in &ids {
            da.tx.push(&da.mem, id);
        }
        if !ids.is_empty() {
            da.tx.publish(&da.mem);
        }
        ids.clear();
        lens.clear();
        db.rx.take_used_lens(&db.mem, &mut ids, &mut lens);
        for (&id, &l) in ids.iter().zip(&lens) {
            let mut l = u64::from(l);
            if rest == 0 {
                let at = RX_BUF + u64::from(id) * u64::from(RX_LEN) + 10;
                let n: u16 = u16::from_le(db.mem.read_obj(GuestAddress(at)).unwrap());
                rest = n.max(1);
                frames += 1;
                l = l.saturating_sub(HDR as u64);
            }
            rest -= 1;
            bytes += l;
            db.rx.push(&db.mem, id);
        }
        if !ids.is_empty() {
            db.rx.publish(&db.mem);
        }
    }
    let (t0, f0, b0) = measured_from.unwrap_or((connected, 0, 0));
    let secs = t0.elapsed().as_secs_f64();
    let (f, b) = (frames - f0, bytes - b0);
    println!(
        "frames={f} bytes={b} gbps={:.2}",
        b as f64 * 8.0 / secs / 1e9
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("--tap") {
        return tap_mode(&a);
    }
    if a.get(1).map(String::as_str) == Some("--tso") {
        return tso_mode(&a);
    }
    if a.get(1).map(String::as_str) == Some("--mq") {
        return mq_mode(&a);
    }
    let usage = "usage: vhost_driver SOCK_A SOCK_B SECONDS FLOWS [PPS]";
    let (sa, sb) = (a.get(1).expect(usage), a.get(2).expect(usage));
    let secs: f64 = a.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = a.get(4).and_then(|s| s.parse().ok()).expect(usage);
    let pps: Option<f64> = a.get(5).map(|s| s.parse().expect(usage));
    let mut da = device(sa, false);
    let mut db = device(sb, false);
    const BUF: u64 = 0x10_0000;
    // A's transmit descriptors, one frame each, built once; all free.
    // First in, first out: every descriptor (hence every flow) in turn.
    let mut free: std::collections::VecDeque<u16> =
        std::collections::VecDeque::with_capacity(usize::from(Q));
    for i in 0..Q {
        let at = BUF + u64::from(i) * 128;
        let mut b = [0u8; HDR + 64];
        b[HDR..].copy_from_slice(&frame(1000 + i % flows.max(1)));
        da.mem.write_slice(&b, GuestAddress(at)).unwrap();
        da.tx.set_desc(&da.mem, i, at, FRAME_LEN, 0);
        free.push_back(i);
    }
    // B's receive buffers.
    for i in 0..Q {
        db.rx.set_desc(
            &db.mem,
            i,
            BUF + u64::from(i) * 2048,
            2048,
            2, /* WRITE */
        );
        db.rx.push(&db.mem, i);
    }
    db.rx.publish(&db.mem);
    // `sent` counts frames offered: queued on A's ring, or due while the
    // ring was full (refused).
    let (mut sent, mut received, mut refused) = (0u64, 0u64, 0u64);
    let mut ids = Vec::with_capacity(usize::from(Q));
    let recycle_rx = |db: &mut Device, ids: &mut Vec<u16>, received: &mut u64| {
        ids.clear();
        db.rx.take_used(&db.mem, ids);
        *received += ids.len() as u64;
        for &id in ids.iter() {
            db.rx.push(&db.mem, id);
        }
        if !ids.is_empty() {
            db.rx.publish(&db.mem);
        }
    };
    // Before the clock starts, one frame through end to end: the switch
    // serves both guests' rings (it picks a new VMM's rings up on its own
    // time; frames due meanwhile would overflow A's ring and be counted
    // lost at every rate).
    let primed = Instant::now();
    let id = free.pop_front().expect("a free descriptor");
    da.tx.push(&da.mem, id);
    da.tx.publish(&da.mem);
    let mut primed_rx = 0u64;
    while primed_rx == 0 {
        assert!(
            primed.elapsed() < Duration::from_secs(5),
            "no frame came through the switch within 5 s"
        );
        recycle_rx(&mut db, &mut ids, &mut primed_rx);
        ids.clear();
        da.tx.take_used(&da.mem, &mut ids);
        free.extend(ids.iter().copied());
    }
    let mut pacer = pace::Pacer::new(secs, pps);
    while !pacer.done() {
        for _ in 0..64 {
            ids.clear();
            da.tx.take_used(&da.mem, &mut ids);
            free.extend(ids.iter().copied());
            let due = pacer.due(sent, usize::from(Q));
            let n = due.min(free.len());
            for id in free.drain(..n) {
                da.tx.push(&da.mem, id);
            }
            if n > 0 {
                da.tx.publish(&da.mem);
            }
            pacer.sent();
            if pps.is_some() {
                // Due but no room: the switch is behind; these are lost.
                refused += (due - n) as u64;
                sent += due as u64;
            } else {
                sent += ids.len() as u64;
            }
            recycle_rx(&mut db, &mut ids, &mut received);
        }
    }
    // What is on its way still arrives.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_millis(100) {
        recycle_rx(&mut db, &mut ids, &mut received);
    }
    println!(
        "sent={sent} received={received} lag={} refused={refused}",
        pacer.lag(sent)
    );
}
