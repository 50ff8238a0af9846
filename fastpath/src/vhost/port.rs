//! A vhost-user virtio-net port: the device `vhost-user-backend` serves
//! (features, config space, kicks; its protocol thread is
//! [`super::endpoint`]) and the fast-path side that serves the vrings in
//! batches ([`super::virtq`]).
//!
//! The two meet in [`Shared`]: the protocol thread publishes the port's
//! vrings and guest memory and bumps a generation; the fast path picks
//! them up when the generation moves (a lock taken on a change, not per
//! packet) and then takes each vring's own lock once per batch — as DPDK's
//! vhost library takes a virtqueue's access lock per burst — so a
//! reconfiguration from the VMM never races a batch.
//!
//! With several fast-path threads, each has a [`VhostPort`] of its own on
//! the same [`Shared`]: thread `t` of `n` serves the queue pairs `p` with
//! `p mod n = t` — it takes what the guest sends on their transmit queues
//! and writes to their receive queues, so no two threads touch one queue.
//! A guest with fewer pairs than threads has its receive queues written
//! by every thread, each batch under the queue's lock (as OVS shares a
//! transmit queue between PMD threads when there are too few).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::virtq::{self, VqStats};

/// Queue 2p is pair p's receive queue (we write), 2p + 1 its transmit
/// queue; a guest without multiqueue uses pair 0.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// Queue pairs a guest may use (`-netdev vhost-user,queues=N`, N up to
/// this; the guest enables as many as it wants through its control
/// queue, which QEMU serves).
pub const MAX_PAIRS: usize = 4;

/// Largest queue a guest may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// What the protocol thread and the fast path share for one port.
pub struct Shared {
    mac: [u8; 6],
    generation: AtomicU64,
    /// The connected guest's vrings and memory; `None` while no guest is
    /// connected (or after a reset).
    state: Mutex<Option<Guest>>,
    acked_features: AtomicU64,
    /// The fast path's wakeup, poked on a kick (adaptive polling sleeps).
    wake: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Guest connections that ended.
    pub connections: AtomicU64,
    /// Why the last connection failed, if it did.
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
struct Guest {
    vrings: Vec<VringRwLock>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl Shared {
    pub fn new(mac: [u8; 6]) -> Arc<Shared> {
        Arc::new(Shared {
            mac,
            generation: AtomicU64::new(0),
            state: Mutex::new(None),
            acked_features: AtomicU64::new(0),
            wake: Mutex::new(None),
            connections: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Call `f` when the guest kicks (so a sleeping fast path wakes; every
    /// fast-path thread, with several).
    pub fn on_kick(&self, f: Arc<dyn Fn() + Send + Sync>) {
        *lock(&self.wake) = Some(f);
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Why the last connection failed (or the last connect attempt, in
    /// client mode), if one did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// True once the connected guest's rings are published.
    pub fn published(&self) -> bool {
        lock(&self.state).is_some()
    }

    /// The published rings.
    pub(super) fn vrings(&self) -> Option<Vec<VringRwLock>> {
        lock(&self.state).as_ref().map(|g| g.vrings.clone())
    }

    /// The guest is gone (its connection ended or was handed over).
    pub(super) fn forget_guest(&self) {
        *lock(&self.state) = None;
        self.changed();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The virtio-net device `vhost-user-backend` serves on the socket.
pub struct NetBackend {
    shared: Arc<Shared>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

impl NetBackend {
    pub fn new(shared: Arc<Shared>) -> NetBackend {
        NetBackend {
            shared,
            mem: Mutex::new(None),
        }
    }
}

/// Features offered to the guest. Offloads: the guest may hand over
/// partial checksums (`CSUM`) and TCP super-frames (`HOST_TSO4/6`, with
/// ECN), and take them (`GUEST_CSUM`, `GUEST_TSO4/6`), each as it acks.
/// (IPv6 frames are not carried, so TSO6 only spares the guest's stack.)
pub const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_MQ
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_F_NOTIFY_ON_EMPTY;

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * MAX_PAIRS
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // QEMU needs VHOST_USER_F_PROTOCOL_FEATURES (it will not start a
        // vhost-user net device without it); see `shim` for what that
        // takes.
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.shared
            .acked_features
            .store(features, Ordering::Release);
        self.shared.changed();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.shared.forget_guest();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues carry it (the handler sets it on each vring).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs,
        // mtu (no VIRTIO_NET_F_MTU).
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.shared.mac);
        let pairs = u16::try_from(MAX_PAIRS).unwrap_or(u16::MAX);
        cfg[8..10].copy_from_slice(&pairs.to_le_bytes());
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *lock(&self.mem) = Some(mem);
        self.shared.changed();
        Ok(())
    }

    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        // Without one the library's vring worker never ends, and the end of
        // a connection would wait for it for ever.
        vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK | vmm_sys_util::event::EventFlag::CLOEXEC,
        )
        .ok()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // The fast path serves the queues; a kick only publishes them (once
        // per connection) and wakes it.
        let mut st = lock(&self.shared.state);
        if st.is_none() {
            if let Some(mem) = lock(&self.mem).clone() {
                *st = Some(Guest {
                    vrings: vrings.to_vec(),
                    mem,
                });
                self.shared.changed();
            }
        }
        drop(st);
        if let Some(w) = lock(&self.shared.wake).as_ref() {
            w();
        }
        Ok(())
    }
}

/// A vring locked for a batch.
type VringStateMut<'a> = std::sync::RwLockWriteGuard<'a, vhost_user_backend::VringState>;

/// What a batch of frames for the guest writes through.
struct ToGuest<'g> {
    mem: &'g GuestMemoryMmap,
    mergeable: bool,
    stats: &'g mut VqStats,
    signalled: &'g mut [Option<u16>; 2 * MAX_PAIRS],
}

impl ToGuest<'_> {
    /// [`virtq::rx_burst`] on receive queue `ring` (index, locked), and
    /// the guest's interrupt if it wants one.
    fn rx<'a>(
        &mut self,
        (q, v): &mut (usize, VringStateMut<'_>),
        frames: impl IntoIterator<Item = virtq::ToRx<'a>>,
    ) -> (usize, u64) {
        let (sent, bytes) = virtq::rx_burst(
            v.get_queue_mut(),
            self.mem,
            frames,
            self.mergeable,
            self.stats,
        );
        if sent > 0 && virtq::needs_notify(v.get_queue(), self.mem, &mut self.signalled[*q]) {
            let _ = v.signal_used_queue();
        }
        (sent, bytes)
    }
}

/// The fast path's side of a port.
pub struct VhostPort {
    shared: Arc<Shared>,
    seen: u64,
    guest: Option<Guest>,
    mergeable: bool,
    /// The guest acked `CSUM`: its frames' headers may ask for a checksum
    /// and (with `HOST_TSO4`) segmentation.
    gives_offloads: bool,
    /// The guest acked `GUEST_CSUM` and `GUEST_TSO4`: it takes partial
    /// checksums and super-frames.
    takes_offloads: bool,
    /// Queue pairs the guest can have: all with `VIRTIO_NET_F_MQ`
    /// negotiated, else pair 0 only (no lock taken for the others).
    pairs: usize,
    /// Each queue's used index when the guest was last considered for an
    /// interrupt (`None`: not yet, for this guest).
    signalled: [Option<u16>; 2 * MAX_PAIRS],
    pub stats: VqStats,
    /// Frames offered while no guest was ready.
    pub not_ready: u64,
    /// This fast-path thread's index, and how many there are: it serves
    /// pairs `p` with `p % threads == thread`.
    thread: usize,
    threads: usize,
}

impl VhostPort {
    pub fn new(shared: Arc<Shared>) -> VhostPort {
        VhostPort::for_thread(shared, 0, 1)
    }

    /// Fast-path thread `thread`'s side of the port (of `threads`).
    pub fn for_thread(shared: Arc<Shared>, thread: usize, threads: usize) -> VhostPort {
        let threads = threads.max(1);
        VhostPort {
            thread: thread % threads,
            threads,
            shared,
            seen: u64::MAX,
            guest: None,
            mergeable: false,
            gives_offloads: false,
            takes_offloads: false,
            pairs: 1,
            signalled: [None; 2 * MAX_PAIRS],
            stats: VqStats::default(),
            not_ready: 0,
        }
    }

    /// Pick up what the protocol thread changed (a cheap load when nothing
    /// did).
    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            self.guest = lock(&self.shared.state).clone();
            // Interrupts are owed for what is used from here on.
            self.signalled = std::array::from_fn(|i| {
                let v = self.guest.as_ref()?.vrings.get(i)?;
                let next = v.get_ref().get_queue().next_used();
                Some(next)
            });
            let acked = self.shared.acked_features.load(Ordering::Acquire);
            self.mergeable = acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
            self.gives_offloads = acked & (1 << VIRTIO_NET_F_CSUM) != 0;
            let takes = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;
            self.takes_offloads = acked & takes == takes;
            self.pairs = if acked & (1 << VIRTIO_NET_F_MQ) != 0 {
                MAX_PAIRS
            } else {
                1
            };
        }
    }

    /// Take up to `max` frames the guest sent, on any of its transmit
    /// queues, into `sink`; returns how many chains were consumed.
    pub fn recv(&mut self, max: usize, sink: &mut impl virtq::FrameSink) -> usize {
        self.refresh();
        let Some(g) = &self.guest else {
            return 0;
        };
        let mem = g.mem.memory();
        let mut done = 0;
        let queues = g.vrings.iter().take(2 * self.pairs);
        let (thread, threads) = (self.thread, self.threads);
        let mine = queues.skip(TX_QUEUE).step_by(2).enumerate();
        for (pair, vring) in mine.filter(|(p, _)| p % threads == thread) {
            if done == max {
                break;
            }
            let mut v = vring.get_mut();
            if !v.is_enabled() || !v.get_queue().ready() {
                continue;
            }
            let n = virtq::tx_burst(v.get_queue_mut(), &*mem, max - done, &mut self.stats, sink);
            let signalled = &mut self.signalled[2 * pair + TX_QUEUE];
            if n > 0 && virtq::needs_notify(v.get_queue(), &*mem, signalled) {
                let _ = v.signal_used_queue();
            }
            done += n;
        }
        done
    }

    /// Give `frames` (each with its virtio-net header) to the guest;
    /// returns how many it took and their bytes (the rest are counted: no
    /// buffer, not ready, bad buffer).
    /// With several receive queues enabled, a flow's frames go to one of
    /// them by a hash of its addresses and ports (as a NIC's RSS would),
    /// so the guest spreads them over its CPUs and keeps each flow in
    /// order.
    pub fn send<'a>(&mut self, frames: impl IntoIterator<Item = virtq::ToRx<'a>>) -> (usize, u64) {
        self.refresh();
        let Some(g) = &self.guest else {
            self.not_ready += frames.into_iter().count() as u64;
            return (0, 0);
        };
        // The receive queues the guest has running now of this thread's
        // pairs — of every pair if it has none running — each locked for
        // the batch.
        let running = |v: &VringRwLock| {
            let v = v.get_ref();
            v.is_enabled() && v.get_queue().ready()
        };
        let rx = g.vrings.iter().take(2 * self.pairs).step_by(2).enumerate();
        let (thread, threads) = (self.thread, self.threads);
        // (One thread: every pair is its own.)
        let own = threads > 1 && rx.clone().any(|(p, v)| p % threads == thread && running(v));
        let mut rings = arrayvec::ArrayVec::<_, MAX_PAIRS>::new();
        for (pair, vring) in rx.filter(|(p, _)| !own || p % threads == thread) {
            let v = vring.get_mut();
            if v.is_enabled() && v.get_queue().ready() {
                rings.push((2 * pair + RX_QUEUE, v));
            }
        }
        let mem = g.mem.memory();
        let mut guest = ToGuest {
            mem: &mem,
            mergeable: self.mergeable,
            stats: &mut self.stats,
            signalled: &mut self.signalled,
        };
        let (mut sent, mut bytes) = (0, 0);
        match rings.as_mut_slice() {
            [] => self.not_ready += frames.into_iter().count() as u64,
            [ring] => (sent, bytes) = guest.rx(ring, frames),
            rings => {
                let n = rings.len();
                let mut frames = frames.into_iter().peekable();
                while frames.peek().is_some() {
                    let chunk: arrayvec::ArrayVec<(virtq::ToRx<'a>, usize), 64> = frames
                        .by_ref()
                        .take(64)
                        .map(|f| (f, flow_hash(f.0) as usize % n))
                        .collect();
                    for (i, ring) in rings.iter_mut().enumerate() {
                        let mine = chunk.iter().filter(|(_, q)| *q == i).map(|(f, _)| *f);
                        let (s, b) = guest.rx(ring, mine);
                        sent += s;
                        bytes += b;
                    }
                }
            }
        }
        (sent, bytes)
    }

    /// The guest's frames have offload metadata (as of the last batch).
    pub fn gives_offloads(&self) -> bool {
        self.gives_offloads
    }

    /// The guest takes partial checksums and super-frames (as of the last
    /// batch).
    pub fn takes_offloads(&self) -> bool {
        self.takes_offloads
    }

    /// True once a guest's queues are published.
    pub fn connected(&mut self) -> bool {
        self.refresh();
        self.guest.is_some()
    }
}

/// A frame's flow hash for picking a receive queue: IPv4 addresses, and
/// TCP/UDP ports of unfragmented packets (0 for anything else, so other
/// traffic stays on the first queue).
fn flow_hash(frame: &[u8]) -> u32 {
    let word = |at: usize| -> u32 {
        frame
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if frame.get(12..14) != Some(&[0x08, 0x00]) {
        return 0;
    }
    let ihl = usize::from(frame.get(14).map_or(5, |b| b & 0x0f)) * 4;
    let proto = frame.get(23).copied().unwrap_or(0);
    let unfragmented = frame
        .get(20..22)
        .is_some_and(|f| f[0] & 0x3f == 0 && f[1] == 0);
    let ports = if (proto == 6 || proto == 17) && unfragmented {
        word(14 + ihl)
    } else {
        0
    };
    // murmur3's finaliser: every input bit reaches the low bits.
    let mut h = word(26) ^ word(30).rotate_left(11) ^ ports.rotate_left(23);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
pub(crate) mod tests;
