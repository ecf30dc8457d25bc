//! ICMPv6 checksums over packet bytes (RFC 4443 2.3): the pseudo-header (addresses, length,
//! next header) and the message, read through the one bounds check and summed in memory
//! order with the arithmetic of `havip_common::csum`. The same sum verifies a received
//! neighbour solicitation and fills in the advertisement built in its place.

use core::mem::size_of;

use havip_common::{
    csum::{add64, fold64},
    IPPROTO_ICMPV6,
};

use crate::parse::{rd, Ipv6Hdr, Packet};

/// The longest ICMPv6 message summed: a neighbour solicitation's 24 bytes and 21 options
/// of 8 (RFC 4861 options come in 8-byte units; one or two is usual). The walk is bounded
/// so the verifier accepts it, and every byte it reads starts within `MAX_HEADER_OFF`.
pub const ICMPV6_MAX_LEN: usize = 192;

/// The ones'-complement sum (folded, not complemented, in memory order) of the ICMPv6
/// pseudo-header of the IPv6 header at `l3_off` and the `len` message bytes at `l4_off`,
/// checksum field included as it is. A message whose checksum verifies sums to `0xffff`;
/// one being built, with a zero checksum field, takes the complement as its checksum.
/// `None` if `len` exceeds [`ICMPV6_MAX_LEN`] or a byte is not readable.
#[inline(always)]
pub fn icmpv6_sum<P: Packet>(pkt: &P, l3_off: usize, l4_off: usize, len: usize) -> Option<u16> {
    if len > ICMPV6_MAX_LEN {
        return None;
    }
    let ip: *const Ipv6Hdr = pkt.header(l3_off)?;
    let (src, dst) = (rd(unsafe { &raw const (*ip).src }), rd(unsafe { &raw const (*ip).dst }));
    let mut acc = pseudo_header(src, dst, len);
    // Whole 8-byte words, then the tail of up to 7 bytes: 4, 2 and 1 at offsets that keep
    // every piece on the 16-bit word boundaries of the message (a lone last byte is the
    // high-order byte of a word padded with zero: in memory order, its own value).
    let words = len / size_of::<u64>();
    for i in 0..ICMPV6_MAX_LEN / size_of::<u64>() {
        if i >= words {
            break;
        }
        acc = add64(acc, rd(pkt.header::<u64>(l4_off + i * 8)?));
    }
    let mut off = words * 8;
    if len - off >= 4 {
        acc = add64(acc, rd(pkt.header::<u32>(l4_off + off)?) as u64);
        off += 4;
    }
    if len - off >= 2 {
        acc = add64(acc, rd(pkt.header::<u16>(l4_off + off)?) as u64);
        off += 2;
    }
    if len - off == 1 {
        // Loaded with the byte before it (a one-byte bounds check compiles to a comparison
        // the verifier cannot use) and shifted out.
        acc = add64(acc, (rd(pkt.header::<u16>(l4_off + off - 1)?) >> 8) as u64);
    }
    Some(fold64(acc))
}

/// The unfolded sum of the ICMPv6 pseudo-header.
#[inline(always)]
fn pseudo_header(src: [u64; 2], dst: [u64; 2], len: usize) -> u64 {
    let mut acc = 0u64;
    for w in [src[0], src[1], dst[0], dst[1]] {
        acc = add64(acc, w);
    }
    // Upper-layer length and next header, as 32-bit big-endian words.
    acc = add64(acc, (len as u32).to_be() as u64);
    add64(acc, (IPPROTO_ICMPV6 as u32).to_be() as u64)
}

/// The same sum for a message not yet in the packet: `body`, in memory order, from `src`
/// to `dst` (so a reply is written whole, its checksum included, in one store).
#[inline(always)]
pub fn icmpv6_sum_of<const N: usize>(src: [u64; 2], dst: [u64; 2], body: &[u64; N]) -> u16 {
    let mut acc = pseudo_header(src, dst, N * size_of::<u64>());
    for w in body {
        acc = add64(acc, *w);
    }
    fold64(acc)
}
