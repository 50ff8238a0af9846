//! Cache-line-aligned, lazily zeroed storage for the table's slots.
//!
//! Rust's zeroed allocation of a 64-byte-aligned type is an aligned malloc
//! plus a memset, which touches every page at construction, so huge-page
//! advice given afterwards is too late. A byte buffer with alignment 1 is
//! zeroed by `calloc`, which for large blocks maps fresh zero pages without
//! touching them; the slots start at the first 64-byte boundary inside it.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// Marker for types whose all-zero bit pattern is a valid value and which
/// may be viewed in place inside a byte buffer.
///
/// # Safety
/// Implementors must be plain old data: every field an integer or an array
/// of integers (no references, pointers, enums, `bool`s or niches), so that
/// zero bytes form a valid value and any bytes written through a `&mut T`
/// stay valid.
pub unsafe trait Zeroable: Copy {}

/// `n` values of `T`, zero-initialised, aligned to `align_of::<T>()`.
pub struct SlotArray<T: Zeroable> {
    buf: Box<[u8]>,
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Zeroable> SlotArray<T> {
    /// `n` zeroed values.
    pub fn zeroed(n: usize) -> SlotArray<T> {
        let align = std::mem::align_of::<T>();
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(align))
            // Invariant: callers cap n (FlowTable at MAX_CAPACITY), far from overflow.
            .expect("slot array size overflows usize");
        let buf = vec![0u8; bytes].into_boxed_slice();
        let offset = buf.as_ptr().align_offset(align);
        assert!(offset < align, "no aligned start inside the buffer");
        SlotArray {
            buf,
            offset,
            len: n,
            _t: PhantomData,
        }
    }
}

impl<T: Zeroable> Deref for SlotArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // The buffer holds `offset + len * size_of::<T>()` bytes (checked
        // at construction); its bytes start as zeros and are only written
        // through `&mut [T]`.
        // SAFETY: `offset` aligns the start for T, the range is in bounds, the
        // bytes are valid Ts (`Zeroable`), and the slice borrows `self`.
        unsafe {
            std::slice::from_raw_parts(self.buf.as_ptr().add(self.offset).cast::<T>(), self.len)
        }
    }
}

impl<T: Zeroable> DerefMut for SlotArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes this the only live view.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buf.as_mut_ptr().add(self.offset).cast::<T>(),
                self.len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C, align(64))]
    struct Line {
        a: u64,
        b: [u32; 14],
    }
    // SAFETY: integers and an array of integers only.
    unsafe impl Zeroable for Line {}

    #[test]
    fn aligned_zeroed_and_writable() {
        for n in [0, 1, 7, 1000] {
            let mut s = SlotArray::<Line>::zeroed(n);
            assert_eq!(s.len(), n);
            assert_eq!(s.as_ptr() as usize % 64, 0);
            assert!(s.iter().all(|l| l.a == 0 && l.b == [0; 14]));
            for (i, l) in s.iter_mut().enumerate() {
                l.a = i as u64;
            }
            assert!(s.iter().enumerate().all(|(i, l)| l.a == i as u64));
        }
    }
}
