//! Frame memory of one fast-path thread: a region split into aligned
//! chunks, and the list of chunks user space currently owns.
//!
//! The region is what an AF_XDP socket registers as its UMEM, so frames
//! move between the uplink and VM ports without copies: a tap port reads
//! into a free chunk, the pipeline encapsulates in the chunk's headroom,
//! and the uplink transmits that very chunk. 2 MiB huge pages are used
//! where the system has them reserved; otherwise normal pages (and the
//! daemon logs which).
//!
//! # Ownership
//! Every chunk is owned by exactly one side at a time: user space (on the
//! free list, or a frame being processed) or the kernel (on the fill or TX
//! ring of a socket). Slices are only ever made for a chunk user space
//! owns, and only for that chunk — never for the whole region — so the
//! kernel writing into its own chunks never aliases a Rust reference.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use crate::frame::FrameMem;

/// A shared mapping of a memfd: the memory survives this process as long
/// as another holds the descriptor (the next binary after a handover maps
/// the very same frames, which the AF_XDP sockets it inherits point into).
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Region {}

impl Region {
    /// Map `len` bytes, on 2 MiB huge pages if `try_huge` and the system
    /// has them, else on normal pages.
    pub fn new(len: usize, try_huge: bool) -> io::Result<Region> {
        if try_huge {
            let huge_len = len.div_ceil(2 << 20) * (2 << 20);
            if let Ok(fd) = memfd(libc::MFD_HUGETLB) {
                if let Ok(r) = Region::map(fd, huge_len, true, true) {
                    return Ok(r);
                }
            }
        }
        Region::map(memfd(0)?, len, false, true)
    }

    /// Map the region another process made (`fd`, of `len` bytes), as it
    /// is: nothing is written.
    pub fn from_fd(fd: OwnedFd, len: usize, huge: bool) -> io::Result<Region> {
        // SAFETY: fstat on a descriptor we own, into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the result is checked.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if usize::try_from(st.st_size).ok() != Some(len) {
            return Err(io::Error::other(format!(
                "frame region: the descriptor holds {} bytes, not {len}",
                st.st_size
            )));
        }
        Region::map(fd, len, huge, false)
    }

    fn map(fd: OwnedFd, len: usize, huge: bool, size_it: bool) -> io::Result<Region> {
        let off = libc::off_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: ftruncate on a memfd we own; the result is checked.
        if size_it && unsafe { libc::ftruncate(fd.as_raw_fd(), off) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a shared mapping of the whole memfd at a kernel-chosen
        // address; no existing memory is affected. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region { ptr, len, huge, fd })
    }

    /// The memfd behind the region (to hand it to the next binary).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if the region is on huge pages.
    pub fn huge(&self) -> bool {
        self.huge
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created; no
        // slice into it outlives `self` (they borrow the pool).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A fresh memfd for frames (`flags` adds to close-on-exec).
fn memfd(flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a static NUL-terminated name; the result is
    // checked and owned below.
    let fd = unsafe { libc::memfd_create(c"vswitch-frames".as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where the big chunks' addresses start: far above any small region, so
/// an address says which region it is in.
pub const BIG_BASE: u64 = 1 << 44;
/// A big chunk holds a 64 KiB super-frame with its headroom.
pub const BIG_CHUNK: usize = 128 << 10;
/// Big chunks per pool: a batch of super-frames in flight, and as many
/// again for the spare each tap read keeps.
pub const BIG_CHUNKS: usize = 64;

/// Two chunks of a pool, each with an address's offset in it.
pub type TwoChunks<'a> = ((&'a mut [u8], usize), (&'a mut [u8], usize));

/// Chunks of a [`Region`] and the free list of those user space owns;
/// beside them, a second region of big chunks for frames longer than a
/// chunk — a tap's or guest's 64 KiB super-frames, a jumbo frame an AF_XDP
/// socket received in pieces (put together here), a jumbo segment — which
/// never reach a kernel ring: AF_XDP gets them copied into a chain of
/// small chunks.
/// They are a separate region, not chains of small chunks, so that every
/// frame is contiguous for the parsers; their memory is a few MiB, and no
/// big chunk is in use between batches, so a handover does not carry them.
#[derive(Debug)]
pub struct FramePool {
    region: Region,
    shift: u32,
    chunks: u64,
    free: Vec<u64>,
    big: Region,
    big_free: Vec<u64>,
}

/// The big chunks of a pool (see [`FramePool`]), all free: made apart so
/// that a binary taking over maps and touches them before the pause, not
/// in the blackout (8 MiB populated cost 6.8 ms there).
#[derive(Debug)]
pub struct BigChunks {
    region: Region,
    free: Vec<u64>,
}

impl BigChunks {
    pub fn new(try_huge: bool) -> io::Result<BigChunks> {
        let region = Region::new(BIG_CHUNKS * BIG_CHUNK, try_huge)?;
        let free = (0..BIG_CHUNKS as u64)
            .rev()
            .map(|i| BIG_BASE + i * BIG_CHUNK as u64)
            .collect();
        Ok(BigChunks { region, free })
    }
}

impl FramePool {
    /// `chunks` chunks of `chunk_size` bytes (a power of two ≥ 2048), all
    /// free.
    pub fn new(chunks: u32, chunk_size: u32, try_huge: bool) -> io::Result<FramePool> {
        if !chunk_size.is_power_of_two() || chunk_size < 2048 || chunks == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame pool: {chunks} chunks of {chunk_size} bytes (need a power of two ≥ 2048)"),
            ));
        }
        let len = chunks as usize * chunk_size as usize;
        let region = Region::new(len, try_huge)?;
        let free = (0..u64::from(chunks))
            .rev()
            .map(|i| i * u64::from(chunk_size))
            .collect();
        let BigChunks {
            region: big,
            free: big_free,
        } = BigChunks::new(try_huge)?;
        Ok(FramePool {
            region,
            shift: chunk_size.trailing_zeros(),
            chunks: u64::from(chunks),
            free,
            big,
            big_free,
        })
    }

    /// Take over `region`, cut into `chunk_size` chunks, of which user
    /// space owns exactly those in `free` (the rest are on rings of the
    /// sockets that come with it), with `big` as its big chunks. Refused
    /// unless every free address is a distinct chunk of the region.
    pub fn adopt(
        region: Region,
        chunk_size: u32,
        free: Vec<u64>,
        big: BigChunks,
    ) -> io::Result<FramePool> {
        if !chunk_size.is_power_of_two() || chunk_size < 2048 {
            return Err(io::Error::other(format!(
                "frame pool: chunk size {chunk_size} is not a power of two ≥ 2048"
            )));
        }
        let chunks = (region.len() / chunk_size as usize) as u64;
        let shift = chunk_size.trailing_zeros();
        let mut seen = vec![false; usize::try_from(chunks).map_err(io::Error::other)?];
        for &a in &free {
            let i = usize::try_from(a >> shift).unwrap_or(usize::MAX);
            let fresh = a & (u64::from(chunk_size) - 1) == 0 && seen.get(i).is_some_and(|s| !*s);
            if !fresh {
                return Err(io::Error::other(format!(
                    "frame pool: free chunk {a:#x} is not a distinct chunk of the {chunks}-chunk region"
                )));
            }
            seen[i] = true;
        }
        Ok(FramePool {
            region,
            shift,
            chunks,
            free,
            big: big.region,
            big_free: big.free,
        })
    }

    /// The chunks user space owns now (for the next binary).
    pub fn free_list(&self) -> &[u64] {
        &self.free
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn chunk_size(&self) -> u32 {
        1 << self.shift
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The chunk holding `addr`, as an address.
    pub fn chunk_of(&self, addr: u64) -> u64 {
        (addr >> self.shift) << self.shift
    }

    /// Take a free chunk (its start address).
    pub fn alloc(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// Take a free big chunk (its start address).
    pub fn alloc_big(&mut self) -> Option<u64> {
        self.big_free.pop()
    }

    /// True if `addr` is in a big chunk (never for an AF_XDP ring).
    #[inline(always)]
    pub fn is_big(addr: u64) -> bool {
        addr >= BIG_BASE
    }

    /// Big chunks on the free list.
    pub fn big_free_count(&self) -> usize {
        self.big_free.len()
    }

    /// Give back the chunk holding `addr`. Addresses outside the regions
    /// are ignored (they cannot come from this pool).
    pub fn release(&mut self, addr: u64) {
        if Self::is_big(addr) {
            let c = addr - (addr - BIG_BASE) % BIG_CHUNK as u64;
            if c < BIG_BASE + (BIG_CHUNKS * BIG_CHUNK) as u64 {
                self.big_free.push(c);
            }
            return;
        }
        let c = self.chunk_of(addr);
        if c < self.chunks << self.shift {
            self.free.push(c);
        }
    }

    /// The chunks holding `a` and `b` at once (segmenting from one into
    /// the other, a read spanning both), each with its address's offset;
    /// `None` if either is outside the pool or both are the same chunk.
    pub fn two_mut(&mut self, a: u64, b: u64) -> Option<TwoChunks<'_>> {
        let (a_ptr, a_off, a_size) = self.locate_ptr(a)?;
        let (b_ptr, b_off, b_size) = self.locate_ptr(b)?;
        if a_ptr == b_ptr {
            return None;
        }
        // Both are in-bounds chunks user space owns (the module's ownership
        // rule), distinct and aligned to their region's chunk size.
        // SAFETY: so they are disjoint, and the slices borrow the pool
        // mutably, so no other slice of either exists.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts_mut(a_ptr, a_size),
                std::slice::from_raw_parts_mut(b_ptr, b_size),
            )
        };
        Some(((x, a_off), (y, b_off)))
    }

    /// The start of the chunk holding `addr` in memory, `addr`'s offset
    /// in it and the chunk's size (in bounds of its region).
    #[inline(always)]
    fn locate_ptr(&self, addr: u64) -> Option<(*mut u8, usize, usize)> {
        if Self::is_big(addr) {
            let rel = usize::try_from(addr - BIG_BASE).ok()?;
            let start = rel - rel % BIG_CHUNK;
            if start >= self.big.len() {
                return None;
            }
            return Some((
                self.big.as_ptr().wrapping_add(start),
                rel - start,
                BIG_CHUNK,
            ));
        }
        let (start, off, size) = self.locate(addr)?;
        Some((self.region.as_ptr().wrapping_add(start), off, size))
    }

    /// Where the chunk holding `addr` starts in the region, `addr`'s
    /// offset in it, and the chunk size; `None` outside the region (then
    /// `start < chunks × size`, both chunk-aligned: the chunk is in bounds).
    #[inline(always)]
    fn locate(&self, addr: u64) -> Option<(usize, usize, usize)> {
        let start = self.chunk_of(addr);
        if start >= self.chunks << self.shift {
            return None;
        }
        let start_us = usize::try_from(start).ok()?;
        let off = usize::try_from(addr - start).ok()?;
        Some((start_us, off, 1usize << self.shift))
    }

    /// The chunk holding `addr` (user-owned, as for `chunk_mut`), read-only.
    pub fn chunk_ro(&self, addr: u64) -> Option<(&[u8], usize)> {
        let (p, off, size) = self.locate_ptr(addr)?;
        // SAFETY: `p..p + size` is an in-bounds chunk user space owns (the
        // module's ownership rule); the slice borrows the pool, so no
        // mutable slice of it exists meanwhile.
        let chunk = unsafe { std::slice::from_raw_parts(p.cast_const(), size) };
        Some((chunk, off))
    }

    /// Chunks on the free list.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }
}

impl FrameMem for FramePool {
    /// The chunk holding `addr`. Callers pass only addresses of frames user
    /// space owns (received, allocated, not yet handed to the kernel).
    #[inline(always)]
    fn chunk_mut(&mut self, addr: u64) -> Option<(&mut [u8], usize)> {
        // The chunk lies inside its region (`locate_ptr`). The caller owns
        // it (the module's ownership rule).
        let (p, off, size) = self.locate_ptr(addr)?;
        // SAFETY: `p..p + size` is that in-bounds, user-owned chunk, and the
        // slice borrows the pool mutably, so no other slice of it exists.
        let chunk = unsafe { std::slice::from_raw_parts_mut(p, size) };
        Some((chunk, off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_allocated_once_and_come_back() {
        let mut p = FramePool::new(4, 2048, false).unwrap();
        let a: Vec<u64> = (0..4).map(|_| p.alloc().unwrap()).collect();
        assert_eq!(a, vec![0, 2048, 4096, 6144]);
        assert!(p.alloc().is_none());
        p.release(2048 + 300);
        p.release(1 << 40); // not ours: ignored
        p.release(BIG_BASE << 2); // nor this
        assert_eq!(p.big_free_count(), BIG_CHUNKS);
        assert_eq!(p.free_count(), 1);
        assert_eq!(p.alloc(), Some(2048));
        let (c, off) = p.chunk_mut(4096 + 256).unwrap();
        assert_eq!((c.len(), off), (2048, 256));
        c[off] = 7;
        assert_eq!(p.chunk_mut(4096).unwrap().0[256], 7);
        assert!(p.chunk_mut(8192).is_none());
        assert!(FramePool::new(4, 1000, false).is_err());
    }

    #[test]
    fn big_chunks_hold_a_super_frame_and_come_back() {
        let mut p = FramePool::new(4, 2048, false).unwrap();
        let b = p.alloc_big().unwrap();
        assert!(FramePool::is_big(b));
        let (c, off) = p.chunk_mut(b + 256).unwrap();
        assert_eq!((c.len(), off), (BIG_CHUNK, 256));
        c[off + 65_535] = 9;
        let s = p.alloc().unwrap();
        let ((src, so), (dst, d_off)) = p.two_mut(b + 256, s + 10).unwrap();
        assert_eq!(
            (src[so + 65_535], src.len(), dst.len(), d_off),
            (9, BIG_CHUNK, 2048, 10)
        );
        assert!(p.two_mut(s, s + 5).is_none(), "the same chunk twice");
        p.release(b + 70_000);
        assert_eq!(p.big_free_count(), BIG_CHUNKS);
        assert!(p
            .chunk_mut(BIG_BASE + (BIG_CHUNKS * BIG_CHUNK) as u64)
            .is_none());
    }

    #[test]
    fn a_pool_is_adopted_through_its_memfd_with_the_same_frames() {
        let mut p = FramePool::new(4, 2048, false).unwrap();
        let a = p.alloc().unwrap();
        p.chunk_mut(a).unwrap().0[5] = 42;
        let len = p.region().len();
        let raw = p.region().fd();
        let dup = || {
            // SAFETY: the region's descriptor stays open for the whole test.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
            fd.try_clone_to_owned().unwrap()
        };
        let region = Region::from_fd(dup(), len, false).unwrap();
        let big = || BigChunks::new(false).unwrap();
        let mut q = FramePool::adopt(region, 2048, p.free_list().to_vec(), big()).unwrap();
        // The chunk in use is not on the adopted free list, and the memory
        // is the same.
        assert_eq!(q.free_count(), 3);
        assert!(!q.free_list().contains(&a));
        assert_eq!(q.chunk_mut(a).unwrap().0[5], 42);
        q.chunk_mut(a).unwrap().0[6] = 7;
        assert_eq!(p.chunk_mut(a).unwrap().0[6], 7);
        // Bad free lists and lengths are refused.
        let adopt =
            |f| FramePool::adopt(Region::from_fd(dup(), len, false).unwrap(), 2048, f, big());
        assert!(adopt(vec![2048, 2048]).is_err(), "duplicate");
        assert!(adopt(vec![100]).is_err(), "not a chunk start");
        assert!(adopt(vec![8192]).is_err(), "outside");
        assert!(adopt(vec![0, 6144]).is_ok());
        assert!(
            Region::from_fd(dup(), len * 2, false).is_err(),
            "wrong length"
        );
    }
}
