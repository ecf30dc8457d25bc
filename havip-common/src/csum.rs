//! Internet checksum arithmetic (RFC 1071 / RFC 1624), pure functions shared by the XDP
//! program and the tests that check its output independently.
//!
//! Ones'-complement sums do not depend on byte order as long as every 16-bit word is taken
//! in the same order, so callers may pass fields exactly as they sit in the packet.

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Incremental update of checksum `check` when one 16-bit word changes from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Same as [`replace16`] for UDP, where a transmitted zero means "no checksum": a computed
/// zero is sent as 0xffff (RFC 768), and a zero checksum (IPv4 only) stays zero.
#[inline(always)]
pub const fn replace16_udp(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Adds a 64-bit word, as loaded from memory, to a ones'-complement accumulator (as two
/// 32-bit halves, so that about 2^31 words fit before [`fold64`]). Words may be loaded in
/// either byte order, as long as every word of a sum is: the folded result is then the
/// big-endian sum in that same byte order (RFC 1071, 2(B)).
#[inline(always)]
pub const fn add64(acc: u64, word: u64) -> u64 {
    acc + (word & 0xffff_ffff) + (word >> 32)
}

/// Folds an accumulator of [`add64`] into 16 bits with end-around carry.
#[inline(always)]
pub const fn fold64(acc: u64) -> u16 {
    let s = (acc & 0xffff_ffff) + (acc >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
}

/// Ones'-complement sum of `data` as big-endian 16-bit words (odd length padded with zero),
/// added to `initial`. Not for the kernel side: it loops over the buffer.
pub fn sum_be(initial: u32, data: &[u8]) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(data: &[u8]) -> u16 {
        !fold(sum_be(0, data))
    }

    #[test]
    fn incremental_matches_full_recompute() {
        // A pseudo-random walk over many buffers and replacements.
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..10_000 {
            let mut buf = [0u8; 32];
            for b in buf.iter_mut() {
                *b = next() as u8;
            }
            // Checksum field at bytes 6..8.
            buf[6] = 0;
            buf[7] = 0;
            let c = full(&buf);
            buf[6..8].copy_from_slice(&c.to_be_bytes());
            let old = u16::from_be_bytes([buf[2], buf[3]]);
            let new = next() as u16;
            buf[2..4].copy_from_slice(&new.to_be_bytes());
            let updated = replace16(c, old, new);
            buf[6..8].copy_from_slice(&updated.to_be_bytes());
            // A correct checksum makes the whole buffer sum to 0xffff.
            assert_eq!(fold(sum_be(0, &buf)), 0xffff, "buf {buf:?}");
        }
    }

    #[test]
    fn little_endian_words_fold_to_the_swapped_big_endian_sum() {
        let mut seed = 0x9e37_79b9u32;
        let mut buf = [0u8; 200];
        for len in (0..200).step_by(8) {
            for b in buf.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            let data = &buf[..len];
            let acc = data.chunks_exact(8).fold(0, |acc, w| add64(acc, u64::from_le_bytes(w.try_into().unwrap())));
            assert_eq!(fold64(acc), fold(sum_be(0, data)).swap_bytes(), "{len} bytes");
        }
        // Carries out of both halves end around: 0xffff + 1 is 1 in ones' complement.
        assert_eq!(fold64(add64(add64(0, u64::MAX), 1)), 1);
    }

    #[test]
    fn byte_order_does_not_matter() {
        let c = 0x1c46u16;
        let (old, new) = (0x0050u16, 0x1f91u16);
        let be = replace16(c, old, new);
        let le = replace16(c.swap_bytes(), old.swap_bytes(), new.swap_bytes());
        assert_eq!(be, le.swap_bytes());
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(replace16_udp(0, 80, 8081), 0);
        // Find an update whose result is zero and check it is sent as 0xffff.
        let (old, new) = (0x0050u16, 0x1f91u16);
        let check = (0..=0xffffu16).find(|&c| c != 0 && replace16(c, old, new) == 0).unwrap();
        assert_eq!(replace16_udp(check, old, new), 0xffff);
    }
}
