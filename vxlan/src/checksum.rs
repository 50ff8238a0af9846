//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

/// Ones'-complement sum of `data` as big-endian 16-bit words (an odd last
/// byte is padded with zero), not yet folded.
#[inline]
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// [`sum`] for long data (segment payloads), about three instructions per
/// eight bytes: native-endian 64-bit words with end-around carry, folded,
/// then byte-swapped on a little-endian machine — the ones'-complement sum
/// is the same in any word size and, swapped, in either byte order
/// (RFC 1071 §2 (B), (C)). Returned as a 16-bit value in a `u32`, so it
/// adds to [`sum`]'s results and folds to the same 16-bit sum.
#[inline]
pub fn sum_wide(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        let (s, carry) = acc.overflowing_add(v);
        acc = s + u64::from(carry);
    }
    // The last bytes, padded with zeros after them.
    let mut last = [0u8; 8];
    let rest = words.remainder();
    last[..rest.len()].copy_from_slice(rest);
    let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(last));
    acc = s + u64::from(carry);
    // Fold 64 → 16 bits with end-around carry.
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    // Two folds leave at most 32 significant bits.
    #[allow(clippy::cast_possible_truncation)]
    let folded = fold(acc as u32);
    u32::from(if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    })
}

/// Fold a 32-bit ones'-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    // Two folds of a 32-bit value leave at most 16 significant bits.
    #[allow(clippy::cast_possible_truncation)]
    let r = acc as u16;
    r
}

/// True if a 20-byte IPv4 header (checksum field included) sums to
/// 0xffff. Sums 32-bit words with end-around carry, which RFC 1071 §2
/// allows: a few instructions instead of ten 16-bit additions.
#[inline(always)]
pub fn ipv4_header_ok(h: &[u8; 20]) -> bool {
    let w = |i: usize| u64::from(u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
    let s = w(0) + w(4) + w(8) + w(12) + w(16);
    // Fold 64 → 32 bits (two steps absorb the carry), then 32 → 16.
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    // At most 32 significant bits remain.
    #[allow(clippy::cast_possible_truncation)]
    let folded = fold(s as u32);
    folded == 0xffff
}

/// The checksum field value for `data` (whose checksum field is zero).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered
/// data changed from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub fn update(hc: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!hc) + u32::from(!old) + u32::from(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 §3: sum ddf2, checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn word_sum_agrees_with_the_reference() {
        let mut h = [
            0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0, 0, 10, 0, 0, 1, 10, 0,
            1, 2,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(ipv4_header_ok(&h));
        // Any single-bit error is caught, as by the 16-bit sum.
        for i in 0..160 {
            let mut bad = h;
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(ipv4_header_ok(&bad), fold(sum(&bad)) == 0xffff, "bit {i}");
            assert!(!ipv4_header_ok(&bad), "bit {i}");
        }
        // Large words that carry out of 32 bits.
        let ff = [0xffu8; 20];
        assert_eq!(ipv4_header_ok(&ff), fold(sum(&ff)) == 0xffff);
    }

    #[test]
    fn the_wide_sum_folds_to_the_word_sum() {
        let mut x: u32 = 12345;
        for len in 0..300 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    x.to_be_bytes()[1]
                })
                .collect();
            assert_eq!(fold(sum_wide(&data)), fold(sum(&data)), "len {len}");
        }
        let ff = vec![0xffu8; 70_000];
        assert_eq!(fold(sum_wide(&ff)), fold(sum(&ff)));
        assert_eq!(fold(sum_wide(&ff) + 0xffff), fold(sum(&ff) + 0xffff));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0, 0, 10, 0, 0, 1, 10, 0,
            1, 2,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        for ttl in (1..=0x40u8).rev() {
            let old = u16::from_be_bytes([hdr[8], hdr[9]]);
            hdr[8] = ttl - 1;
            let new = u16::from_be_bytes([hdr[8], hdr[9]]);
            let hc = u16::from_be_bytes([hdr[10], hdr[11]]);
            hdr[10..12].copy_from_slice(&update(hc, old, new).to_be_bytes());
            assert_eq!(fold(sum(&hdr)), 0xffff, "ttl {}", hdr[8]);
        }
    }
}
