//! AF_XDP sockets, written against the kernel ABI (<linux/if_xdp.h>).
//!
//! Why not xsk-rs: its frame descriptors can only be made by the crate
//! and always transmit from the start of a frame's data segment, so a
//! frame cannot grow into its headroom — in-place VXLAN encapsulation, the
//! point of the design, would need a copy per packet. The ABI is small:
//! register the frame pool's region as the UMEM, size and mmap four rings,
//! bind to a queue. Rings are single-producer/single-consumer with the
//! kernel: we read the other side's index with Acquire and publish ours
//! with Release.
//!
//! Multi-buffer (`XDP_USE_SG`, kernel 6.6+): a packet longer than a chunk
//! holds — a jumbo frame on the underlay — comes as several descriptors,
//! all but the last marked `XDP_PKT_CONTD`, and goes out the same way.
//! [`XskSocket::recv`] hands such a packet over whole, as its pieces, and
//! [`XskSocket::queue_chain`] queues one; a packet of one chunk, every
//! packet at MTU 1500, takes the same path as without multi-buffer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::frame::Desc;
use crate::umem::FramePool;

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;
const XDP_COPY: u16 = 1 << 1;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_USE_SG: u16 = 1 << 4;
/// `xdp_desc.options`: more of this packet follows in the next descriptor.
const XDP_PKT_CONTD: u32 = 1;
/// Most pieces of one packet kept: 9 216 bytes are 6 pieces of the 1 792 a
/// 2 KiB chunk receives, and the kernel's copy mode sends at most 18. A
/// longer packet is dropped whole (counted in [`XskSocket::overlong`]).
pub const MAX_PIECES: usize = 18;
const XDP_RING_NEED_WAKEUP: u32 = 1;

#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

/// `struct xdp_desc`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct XdpDesc {
    addr: u64,
    len: u32,
    options: u32,
}

/// Kernel drop counters of the socket (`struct xdp_statistics`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

/// One mmap'd ring of `T` entries.
struct Ring<T> {
    map: NonNull<u8>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
}

impl<T: Copy> Ring<T> {
    /// Map a ring of `size` entries at page offset `pgoff` of `fd`.
    fn map(fd: RawFd, off: &RingOffset, size: u32, pgoff: libc::off_t) -> io::Result<Ring<T>> {
        let map_len = usize::try_from(off.desc).map_err(io::Error::other)?
            + size as usize * std::mem::size_of::<T>();
        // SAFETY: maps the ring the kernel created for this socket; the
        // length covers its descriptors as the kernel reported them.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("ring mmap returned null"))?;
        let at = |o: u64| -> io::Result<NonNull<u8>> {
            let o = usize::try_from(o).map_err(io::Error::other)?;
            if o >= map_len {
                return Err(io::Error::other("ring offset outside its mapping"));
            }
            // SAFETY: `o < map_len`, inside the mapping just made.
            Ok(unsafe { map.add(o) })
        };
        Ok(Ring {
            map,
            map_len,
            producer: at(off.producer)?.cast(),
            consumer: at(off.consumer)?.cast(),
            flags: at(off.flags)?.cast(),
            descs: at(off.desc)?.cast(),
            mask: size - 1,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping at the kernel's producer
        // index, a naturally aligned u32 shared with the kernel.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as `producer`, for the consumer index.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as `producer`, for the flags word.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }

    /// Pointer to entry `i` (taken modulo the ring size).
    fn slot(&self, i: u32) -> *mut T {
        // SAFETY: `i & mask` < size, and the mapping holds `size` entries.
        unsafe { self.descs.as_ptr().add((i & self.mask) as usize) }
    }

    /// Entries the ring holds.
    fn size(&self) -> usize {
        (self.mask + 1) as usize
    }

    /// As producer: entries free for us to fill.
    fn room(&self) -> usize {
        let prod = self.producer().load(Ordering::Relaxed);
        let cons = self.consumer().load(Ordering::Acquire);
        ((self.mask + 1) - prod.wrapping_sub(cons)) as usize
    }

    /// As producer: push up to all of `items`; returns how many.
    fn produce(&mut self, items: impl ExactSizeIterator<Item = T>) -> usize {
        let prod = self.producer().load(Ordering::Relaxed);
        let cons = self.consumer().load(Ordering::Acquire);
        let room = (self.mask + 1) - prod.wrapping_sub(cons);
        let n = room.min(u32::try_from(items.len()).unwrap_or(u32::MAX));
        for (k, item) in (0..n).zip(items) {
            // SAFETY: entries between prod and cons + size belong to the
            // producer (us) until published below.
            unsafe { self.slot(prod.wrapping_add(k)).write(item) };
        }
        self.producer()
            .store(prod.wrapping_add(n), Ordering::Release);
        n as usize
    }

    /// As consumer: pop up to `max` entries into `f`; returns how many.
    fn consume(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let cons = self.consumer().load(Ordering::Relaxed);
        let prod = self.producer().load(Ordering::Acquire);
        let n = prod
            .wrapping_sub(cons)
            .min(u32::try_from(max).unwrap_or(u32::MAX));
        for k in 0..n {
            // SAFETY: entries between cons and prod were published by the
            // kernel (Acquire above) and are ours to read until released.
            f(unsafe { self.slot(cons.wrapping_add(k)).read() });
        }
        self.consumer()
            .store(cons.wrapping_add(n), Ordering::Release);
        n as usize
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the ring mapping made in `map`.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the rings are owned by one socket, which is used by one thread
// at a time; moving it to another thread moves that exclusive use.
unsafe impl<T> Send for Ring<T> {}

/// Sizes of an AF_XDP socket.
#[derive(Debug, Clone, Copy)]
pub struct XskConfig {
    /// Entries per ring (power of two).
    pub ring_size: u32,
}

impl Default for XskConfig {
    fn default() -> Self {
        XskConfig { ring_size: 2048 }
    }
}

/// An AF_XDP socket bound to one queue of an interface, with its UMEM
/// registered from a [`FramePool`].
pub struct XskSocket {
    // Rings before the fd: unmapped before the socket closes.
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<XdpDesc>,
    tx: Ring<XdpDesc>,
    fd: OwnedFd,
    size: u32,
    /// Bound with `XDP_USE_SG`: packets may span several chunks.
    sg: bool,
    /// Packets received in more than [`MAX_PIECES`] pieces, dropped.
    overlong: u64,
}

/// The four rings of socket `fd`, each of `size` entries.
#[allow(clippy::type_complexity)]
fn map_rings(
    fd: RawFd,
    size: u32,
) -> io::Result<(Ring<u64>, Ring<u64>, Ring<XdpDesc>, Ring<XdpDesc>)> {
    let mut off = MmapOffsets::default();
    let mut optlen = socklen::<MmapOffsets>();
    // SAFETY: the kernel writes at most `optlen` bytes into `off`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_MMAP_OFFSETS,
            (&mut off as *mut MmapOffsets).cast(),
            &mut optlen,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        Ring::map(fd, &off.fr, size, XDP_UMEM_PGOFF_FILL_RING)?,
        Ring::map(fd, &off.cr, size, XDP_UMEM_PGOFF_COMPLETION_RING)?,
        Ring::map(fd, &off.rx, size, XDP_PGOFF_RX_RING)?,
        Ring::map(fd, &off.tx, size, XDP_PGOFF_TX_RING)?,
    ))
}

/// `size_of::<T>()` as a socklen_t (our structs are a few dozen bytes).
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a live `T` and its exact size.
    let r = unsafe { libc::setsockopt(fd, SOL_XDP, opt, (v as *const T).cast(), socklen::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl XskSocket {
    /// Create a socket on `ifindex`/`queue`, register `pool`'s region as
    /// its UMEM, and bind (copy mode, which every driver supports; with
    /// need-wakeup, so an idle socket costs no syscalls).
    pub fn open(
        ifindex: u32,
        queue: u32,
        pool: &FramePool,
        cfg: XskConfig,
    ) -> io::Result<XskSocket> {
        if !cfg.ring_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring size must be a power of two",
            ));
        }
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let reg = UmemReg {
            addr: pool.region().as_ptr() as u64,
            len: pool.region().len() as u64,
            chunk_size: pool.chunk_size(),
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, XDP_UMEM_REG, &reg)?;
        let size = cfg.ring_size;
        setsockopt(raw, XDP_UMEM_FILL_RING, &size)?;
        setsockopt(raw, XDP_UMEM_COMPLETION_RING, &size)?;
        setsockopt(raw, XDP_RX_RING, &size)?;
        setsockopt(raw, XDP_TX_RING, &size)?;
        let (fill, comp, rx, tx) = map_rings(raw, size)?;
        // Multi-buffer where the kernel has it (6.6+); without, packets
        // longer than a chunk are dropped by the kernel, as before.
        let sg = match bind(raw, ifindex, queue, XDP_USE_SG) {
            Ok(()) => true,
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                bind(raw, ifindex, queue, 0)?;
                false
            }
            Err(e) => return Err(e),
        };
        Ok(XskSocket {
            fill,
            comp,
            rx,
            tx,
            fd,
            size,
            sg,
            overlong: 0,
        })
    }

    /// Take over a bound socket another process made (a live handover):
    /// map its rings, whose producer and consumer indices are in the
    /// mapping itself, so this side continues exactly where that one
    /// stopped. `ring_size` and `sg` (bound with multi-buffer) must be
    /// what it was created with.
    pub fn from_fd(fd: OwnedFd, ring_size: u32, sg: bool) -> io::Result<XskSocket> {
        if !ring_size.is_power_of_two() {
            return Err(io::Error::other(format!(
                "AF_XDP ring size {ring_size} is not a power of two"
            )));
        }
        let mut domain: libc::c_int = 0;
        let mut len = socklen::<libc::c_int>();
        // SAFETY: the kernel writes at most `len` bytes into `domain`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 || domain != AF_XDP {
            return Err(io::Error::other("the descriptor is not an AF_XDP socket"));
        }
        let (fill, comp, rx, tx) = map_rings(fd.as_raw_fd(), ring_size)?;
        Ok(XskSocket {
            fill,
            comp,
            rx,
            tx,
            fd,
            size: ring_size,
            sg,
            overlong: 0,
        })
    }

    /// Bound with multi-buffer: packets longer than a chunk are carried.
    pub fn sg(&self) -> bool {
        self.sg
    }

    /// Packets received in more than [`MAX_PIECES`] pieces, and dropped.
    pub fn overlong(&self) -> u64 {
        self.overlong
    }

    /// Entries per ring.
    pub fn ring_size(&self) -> u32 {
        self.size
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Give free chunks to the kernel for receiving — at most `cap` on the
    /// fill ring at once (this socket's share of the pool: an idle VM port
    /// must not pin what the uplink needs) — keeping `reserve` on the free
    /// list. Returns how many were given, and whether the pool fell short:
    /// the ring is below half its share and the pool could not fill it.
    pub fn refill(&mut self, pool: &mut FramePool, reserve: usize, cap: usize) -> (usize, bool) {
        let share = cap.min(self.fill.size());
        let held = self.fill.size() - self.fill.room();
        // Only take what the ring may hold: at its share (the idle steady
        // state) this takes nothing from the pool.
        let want = share.saturating_sub(held).min(64);
        let n = pool.free_count().saturating_sub(reserve).min(want);
        let mut addrs = [0u64; 64];
        let mut k = 0;
        while k < n {
            match pool.alloc() {
                Some(a) => {
                    addrs[k] = a;
                    k += 1;
                }
                None => break,
            }
        }
        let done = self.fill.produce(addrs[..k].iter().copied());
        for a in &addrs[done..k] {
            pool.release(*a);
        }
        (done, done < want && held + done < share / 2)
    }

    /// Take up to `max` received packets, each handed to `f` as its
    /// chunks in order — one, or several for a multi-buffer packet — with
    /// `true`. A packet in more than [`MAX_PIECES`] goes to `f` a chunk at
    /// a time with `false`: release them, it is dropped (and counted in
    /// [`XskSocket::overlong`]). A packet whose last piece is not on the
    /// ring yet stays there for the next call.
    pub fn recv(&mut self, max: usize, mut f: impl FnMut(&[Desc], bool)) -> usize {
        let ring = &mut self.rx;
        let cons = ring.consumer().load(Ordering::Relaxed);
        let prod = ring.producer().load(Ordering::Acquire);
        let avail = prod.wrapping_sub(cons);
        let mut chain = arrayvec::ArrayVec::<Desc, MAX_PIECES>::new();
        let (mut k, mut done, mut packets, mut long) = (0u32, 0u32, 0, false);
        while k < avail && packets < max {
            // SAFETY: entries between cons and prod were published by the
            // kernel (Acquire above) and are ours to read until released.
            let d = unsafe { ring.slot(cons.wrapping_add(k)).read() };
            k += 1;
            if d.options & XDP_PKT_CONTD == 0 && chain.is_empty() {
                f(&[Desc::new(d.addr, d.len)], true);
            } else {
                long |= chain.try_push(Desc::new(d.addr, d.len)).is_err();
                if d.options & XDP_PKT_CONTD != 0 {
                    continue;
                }
                if long {
                    for i in done..k {
                        // SAFETY: as above; these entries are not
                        // released yet (the consumer index is at `done`).
                        let p = unsafe { ring.slot(cons.wrapping_add(i)).read() };
                        f(&[Desc::new(p.addr, p.len)], false);
                    }
                    self.overlong += 1;
                    long = false;
                } else {
                    f(&chain, true);
                }
                chain.clear();
            }
            packets += 1;
            done = k;
        }
        ring.consumer()
            .store(cons.wrapping_add(done), Ordering::Release);
        packets
    }

    /// Queue frames for transmission; returns how many the ring took (the
    /// caller releases the rest). One wakeup syscall per call, if the
    /// kernel asks for it.
    pub fn send(&mut self, frames: &[Desc]) -> usize {
        let n = self.tx.produce(frames.iter().map(|d| XdpDesc {
            addr: d.addr,
            len: d.len,
            options: 0,
        }));
        if n > 0 {
            self.kick();
        }
        n
    }

    /// Queue one packet in `pieces` (chunks of the UMEM, in order), all of
    /// it or nothing: false if the ring lacks room, or the socket has no
    /// multi-buffer and the packet more than one piece. Sent at the next
    /// [`XskSocket::kick`].
    pub fn queue_chain(&mut self, pieces: &[Desc]) -> bool {
        if pieces.is_empty() || (pieces.len() > 1 && !self.sg) || self.tx.room() < pieces.len() {
            return false;
        }
        let last = pieces.len() - 1;
        self.tx
            .produce(pieces.iter().enumerate().map(|(i, d)| XdpDesc {
                addr: d.addr,
                len: d.len,
                options: if i < last { XDP_PKT_CONTD } else { 0 },
            }))
            == pieces.len()
    }

    /// Have the kernel send what is queued, if it asked to be woken: one
    /// syscall per batch, never per packet.
    pub fn kick(&self) {
        if self.tx.needs_wakeup() {
            // SAFETY: a zero-length sendto on our socket is the AF_XDP TX
            // kick; no buffer is read.
            unsafe {
                libc::sendto(
                    self.fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
        }
    }

    /// Return completed transmissions to the pool.
    pub fn complete(&mut self, pool: &mut FramePool) -> usize {
        self.comp.consume(256, |a| pool.release(a))
    }

    /// If the kernel asked for it (need-wakeup on the fill ring: the driver
    /// ran out of buffers and stopped), wake it to take the refilled ones.
    /// A syscall only when asked, never per packet.
    pub fn wake_rx_if_needed(&self) {
        if self.fill.needs_wakeup() {
            // SAFETY: a zero-length non-blocking recvfrom on our socket only
            // kicks the driver; no buffer is written.
            unsafe {
                libc::recvfrom(
                    self.fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    /// The kernel's drop counters for this socket.
    pub fn stats(&self) -> io::Result<XskStats> {
        let mut s = XskStats::default();
        let mut len = socklen::<XskStats>();
        // SAFETY: the kernel writes at most `len` bytes into `s`.
        let r = unsafe {
            libc::getsockopt(
                self.fd(),
                SOL_XDP,
                XDP_STATISTICS,
                (&mut s as *mut XskStats).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(s)
        }
    }
}

impl AsRawFd for XskSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

/// bind(2) `fd` to queue `queue` of `ifindex` in copy mode, with
/// need-wakeup and `extra` flags.
fn bind(fd: RawFd, ifindex: u32, queue: u32, extra: u16) -> io::Result<()> {
    let sa = SockaddrXdp {
        family: 44, // AF_XDP
        flags: XDP_COPY | XDP_USE_NEED_WAKEUP | extra,
        ifindex,
        queue_id: queue,
        shared_umem_fd: 0,
    };
    // SAFETY: bind(2) with a live sockaddr_xdp of its exact size.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const SockaddrXdp).cast(),
            socklen::<SockaddrXdp>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The index of interface `name`.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a test ring keeps its indices and entries (the kernel's
    /// layout differs; only `RingOffset` says where each is).
    const TEST_OFFSETS: RingOffset = RingOffset {
        producer: 0,
        consumer: 64,
        flags: 128,
        desc: 192,
    };

    /// A ring of `size` entries in anonymous memory, as the kernel's side
    /// would see it.
    fn ring<T: Copy>(size: u32) -> Ring<T> {
        let map_len = 192 + size as usize * std::mem::size_of::<T>();
        // SAFETY: a fresh private anonymous mapping, unmapped by Ring's drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let map = NonNull::new(p.cast::<u8>()).unwrap();
        // SAFETY: every offset is inside the mapping just made.
        let at = |o: u64| unsafe { map.add(usize::try_from(o).unwrap()) };
        Ring {
            map,
            map_len,
            producer: at(TEST_OFFSETS.producer).cast(),
            consumer: at(TEST_OFFSETS.consumer).cast(),
            flags: at(TEST_OFFSETS.flags).cast(),
            descs: at(TEST_OFFSETS.desc).cast(),
            mask: size - 1,
        }
    }

    fn socket(sg: bool) -> XskSocket {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        XskSocket {
            fill: ring(16),
            comp: ring(16),
            rx: ring(16),
            tx: ring(16),
            fd,
            size: 16,
            sg,
            overlong: 0,
        }
    }

    /// The kernel's side: publish receive descriptors (addr, len, more).
    fn deliver(x: &mut XskSocket, descs: &[(u64, u32, bool)]) {
        let n = x.rx.produce(descs.iter().map(|&(addr, len, more)| XdpDesc {
            addr,
            len,
            options: if more { XDP_PKT_CONTD } else { 0 },
        }));
        assert_eq!(n, descs.len());
    }

    fn received(x: &mut XskSocket, max: usize) -> Vec<(Vec<(u64, u32)>, bool)> {
        let mut got = Vec::new();
        x.recv(max, |p, keep| {
            got.push((p.iter().map(|d| (d.addr, d.len)).collect(), keep))
        });
        got
    }

    #[test]
    fn a_multi_buffer_packet_is_handed_over_whole_and_in_order() {
        let mut x = socket(true);
        deliver(
            &mut x,
            &[
                (0x100, 60, false),
                (0x900, 1792, true),
                (0x1100, 1792, true),
                (0x1900, 500, false),
                (0x2100, 64, false),
            ],
        );
        assert_eq!(
            received(&mut x, 32),
            vec![
                (vec![(0x100, 60)], true),
                (vec![(0x900, 1792), (0x1100, 1792), (0x1900, 500)], true),
                (vec![(0x2100, 64)], true),
            ]
        );
        assert!(received(&mut x, 32).is_empty(), "all consumed");
    }

    #[test]
    fn a_packet_not_yet_ended_stays_on_the_ring_and_max_counts_packets() {
        let mut x = socket(true);
        deliver(&mut x, &[(0x100, 60, false), (0x900, 1792, true)]);
        assert_eq!(received(&mut x, 32), vec![(vec![(0x100, 60)], true)]);
        // Its last piece arrives: the packet comes whole, its first piece
        // read again from the ring, not twice.
        deliver(&mut x, &[(0x1100, 10, false), (0x1900, 64, false)]);
        assert_eq!(
            received(&mut x, 1),
            vec![(vec![(0x900, 1792), (0x1100, 10)], true)]
        );
        assert_eq!(received(&mut x, 1), vec![(vec![(0x1900, 64)], true)]);
    }

    #[test]
    fn a_packet_in_too_many_pieces_is_given_back_a_piece_at_a_time_and_counted() {
        let mut x = socket(true);
        // 16 entries per ring: grow the receive ring for 20 pieces.
        x.rx = ring(32);
        let mut descs: Vec<(u64, u32, bool)> = (0..MAX_PIECES as u64 + 2)
            .map(|i| (0x800 * (i + 1), 1792, true))
            .collect();
        descs.last_mut().unwrap().2 = false;
        descs.push((0x100, 60, false));
        deliver(&mut x, &descs);
        let got = received(&mut x, 32);
        assert_eq!(got.len(), MAX_PIECES + 2 + 1);
        for (i, (p, keep)) in got[..MAX_PIECES + 2].iter().enumerate() {
            assert_eq!((p.as_slice(), *keep), (&[(descs[i].0, 1792)][..], false));
        }
        assert_eq!(got[MAX_PIECES + 2], (vec![(0x100, 60)], true));
        assert_eq!(x.overlong(), 1);
    }

    #[test]
    fn a_chain_is_queued_whole_with_all_but_its_last_piece_marked() {
        let mut x = socket(true);
        let chain = [
            Desc::new(0, 2048),
            Desc::new(0x800, 2048),
            Desc::new(0x1000, 100),
        ];
        assert!(x.queue_chain(&chain));
        let mut sent = Vec::new();
        x.tx.consume(16, |d| sent.push((d.addr, d.len, d.options)));
        assert_eq!(
            sent,
            vec![
                (0, 2048, XDP_PKT_CONTD),
                (0x800, 2048, XDP_PKT_CONTD),
                (0x1000, 100, 0)
            ]
        );
        // All or nothing: 14 free entries do not take 15 pieces.
        assert!(x.queue_chain(&[Desc::new(0, 64); 2]));
        assert!(!x.queue_chain(&[Desc::new(0, 64); 15]));
        assert_eq!(x.tx.room(), 14);
        // Without multi-buffer only single pieces go.
        let mut plain = socket(false);
        assert!(!plain.queue_chain(&chain));
        assert!(plain.queue_chain(&chain[..1]));
        assert!(!plain.queue_chain(&[]));
    }
}
