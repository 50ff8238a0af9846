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
use std::ptr::NonNull;

use crate::frame::FrameMem;

/// A private anonymous mapping.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Region {}

impl Region {
    /// Map `len` bytes, on 2 MiB huge pages if `try_huge` and the system
    /// has them, else on normal pages.
    pub fn new(len: usize, try_huge: bool) -> io::Result<Region> {
        let base = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if try_huge {
            let huge_len = len.div_ceil(2 << 20) * (2 << 20);
            // SAFETY: an anonymous mapping at a kernel-chosen address; no
            // existing memory is affected. The result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    huge_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    base | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if let Some(ptr) = NonNull::new(p.cast::<u8>()) {
                    return Ok(Region {
                        ptr,
                        len: huge_len,
                        huge: true,
                    });
                }
            }
        }
        // SAFETY: as above, without huge pages.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                base,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region {
            ptr,
            len,
            huge: false,
        })
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

/// Chunks of a [`Region`] and the free list of those user space owns.
#[derive(Debug)]
pub struct FramePool {
    region: Region,
    shift: u32,
    chunks: u64,
    free: Vec<u64>,
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
        Ok(FramePool {
            region,
            shift: chunk_size.trailing_zeros(),
            chunks: u64::from(chunks),
            free,
        })
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

    /// Give back the chunk holding `addr`. Addresses outside the region
    /// are ignored (they cannot come from this pool).
    pub fn release(&mut self, addr: u64) {
        let c = self.chunk_of(addr);
        if c < self.chunks << self.shift {
            self.free.push(c);
        }
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
        let start = self.chunk_of(addr);
        if start >= self.chunks << self.shift {
            return None;
        }
        let size = 1usize << self.shift;
        let start_us = usize::try_from(start).ok()?;
        let off = usize::try_from(addr - start).ok()?;
        // The chunk lies inside the region: start < chunks × size, both
        // chunk-aligned. The caller owns it (the module's ownership rule).
        let p = self.region.as_ptr().wrapping_add(start_us);
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
        assert_eq!(p.free_count(), 1);
        assert_eq!(p.alloc(), Some(2048));
        let (c, off) = p.chunk_mut(4096 + 256).unwrap();
        assert_eq!((c.len(), off), (2048, 256));
        c[off] = 7;
        assert_eq!(p.chunk_mut(4096).unwrap().0[256], 7);
        assert!(p.chunk_mut(8192).is_none());
        assert!(FramePool::new(4, 1000, false).is_err());
    }
}
