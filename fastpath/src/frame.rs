//! Frame descriptors and the memory they point into.
//!
//! A frame lives in a fixed-size chunk of a larger region (an AF_XDP UMEM,
//! or the buffers of a tap port), described by a [`Desc`]: the offset of
//! its first byte in the region and its length. Chunks are aligned to
//! their size, so the bytes between the chunk start and `addr` are the
//! frame's headroom, where encapsulation writes the outer headers. This
//! is AF_XDP's aligned-chunk mode, so RX descriptors are used unchanged.

/// A frame: offset of its first byte in the region, and its length.
/// Offload metadata, where a batch has it, is kept right before each
/// frame, as its virtio-net header ([`crate::offload`]), not here: a
/// third field, even in what is padding now, costs 30 instructions per
/// 64-byte packet (measured with benches/instructions-per-packet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
}

impl Desc {
    #[inline(always)]
    pub const fn new(addr: u64, len: u32) -> Desc {
        Desc { addr, len }
    }
}

/// Frames per batch (one poll of one port).
pub const BATCH: usize = 32;

/// Headroom a receive path must leave before each frame: room for the
/// VXLAN outer headers (50 bytes) rounded up to a cache line.
pub const MIN_HEADROOM: usize = 64;

/// Access to the chunks frames live in.
pub trait FrameMem {
    /// The whole chunk holding `addr`, and `addr`'s offset inside it; `None`
    /// if `addr` is outside the region.
    fn chunk_mut(&mut self, addr: u64) -> Option<(&mut [u8], usize)>;
}

/// A region in ordinary memory split into `chunk_size` chunks
/// (`chunk_size` a power of two).
#[derive(Debug)]
pub struct SliceMem<'a> {
    mem: &'a mut [u8],
    shift: u32,
}

impl<'a> SliceMem<'a> {
    /// `None` unless `chunk_size` is a power of two of at least 128 bytes.
    pub fn new(mem: &'a mut [u8], chunk_size: usize) -> Option<SliceMem<'a>> {
        if !chunk_size.is_power_of_two() || chunk_size < 128 {
            return None;
        }
        Some(SliceMem {
            mem,
            shift: chunk_size.trailing_zeros(),
        })
    }
}

impl FrameMem for SliceMem<'_> {
    #[inline(always)]
    fn chunk_mut(&mut self, addr: u64) -> Option<(&mut [u8], usize)> {
        let addr = usize::try_from(addr).ok()?;
        let start = (addr >> self.shift) << self.shift;
        let end = start.checked_add(1 << self.shift)?;
        let chunk = self.mem.get_mut(start..end)?;
        Some((chunk, addr - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_aligned_and_bounded() {
        let mut buf = vec![0u8; 4096];
        let mut m = SliceMem::new(&mut buf, 2048).unwrap();
        let (c, off) = m.chunk_mut(2048 + 300).unwrap();
        assert_eq!((c.len(), off), (2048, 300));
        assert!(m.chunk_mut(4096).is_none());
        assert!(m.chunk_mut(u64::MAX).is_none());
        assert!(SliceMem::new(&mut buf, 1000).is_none());
    }
}
