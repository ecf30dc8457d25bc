//! Endpoint remapping (the virtual endpoint IDs of the seed design): on ingress
//! (VIP, proto, designated port) -> instance port, on egress (VIP, proto, instance port) ->
//! designated port. IP addresses are never changed, so only the L4 checksum moves.

use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, maps::HashMap, programs::TcContext};
use havip_common::{csum, maps::PORT_WORDS, InlineRemap, PortValue, RemapKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::{PORT_BITMAP, REMAP_IN, REMAP_OUT},
    parse::{Packet, PacketMeta, PortsHdr, TCP_CSUM_OFF, UDP_CSUM_OFF},
    vips::{InlineRemaps, VipHit},
};

/// Where a lookup ends after the inline mappings.
enum Inline {
    Found(u16),
    /// Not inline and the slot says there are no others.
    Absent,
    /// Not inline; the remap table may still hold it.
    AskTable,
}

/// Scans a slot's inline mappings (words copied out of one version of the slot, see
/// `vips`). Each entry is compared as one word: `from_be` in bits 0-15, `to_be` in 16-31,
/// `proto` in 32-39 (an empty entry's proto is 0, which no TCP/UDP packet has, so the
/// four compares need no early exit). Unrolled.
#[inline(always)]
fn scan(inline: &InlineRemaps, proto: u8, port_be: u16) -> Inline {
    const MATCH_BITS: u64 = 0xff_0000_ffff;
    let want = (proto as u64) << 32 | port_be as u64;
    for raw in inline.entries {
        if raw & MATCH_BITS == want {
            return Inline::Found((raw >> 16) as u16);
        }
    }
    if inline.overflow {
        Inline::AskTable
    } else {
        Inline::Absent
    }
}

// The word layout `scan` relies on.
const _: () = assert!(
    core::mem::offset_of!(InlineRemap, from_be) == 0
        && core::mem::offset_of!(InlineRemap, to_be) == 2
        && core::mem::offset_of!(InlineRemap, proto) == 4
        && core::mem::size_of::<InlineRemap>() == 8
);

/// Cheap pre-check: is `port_be` mapped for any VIP in this direction?
#[inline(always)]
fn port_maybe_mapped(word_base: u32, port_be: u16) -> bool {
    let port = u16::from_be(port_be) as u32;
    match PORT_BITMAP.get(word_base + (port >> 6)) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// The port to rewrite `port_be` to, if (VIP, proto, port) is mapped in this direction:
/// the slot's inline entries first (`vip` was looked up for this direction), then (if they
/// overflow, or the VIP was found through the table) the bitmap and the table.
#[inline(always)]
fn lookup(meta: &PacketMeta, vip: &VipHit, port_be: u16, bitmap_base: u32, table: &HashMap<RemapKey, PortValue>) -> Option<u16> {
    if !(meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP) {
        return None;
    }
    if let Some(inline) = &vip.inline {
        match scan(inline, meta.proto, port_be) {
            Inline::Found(port) => return Some(port),
            Inline::Absent => return None,
            Inline::AskTable => {}
        }
    }
    if !port_maybe_mapped(bitmap_base, port_be) {
        return None;
    }
    unsafe { table.get(RemapKey::new(vip.id, meta.proto, port_be)) }.map(|v| v.port_be)
}

/// The instance port for a packet arriving at a VIP (looked up for `Direction::Ingress`),
/// if its destination port is mapped.
#[inline(always)]
pub fn lookup_ingress(meta: &PacketMeta, vip: &VipHit) -> Option<u16> {
    lookup(meta, vip, meta.dport_be, 0, &REMAP_IN)
}

/// The designated port for a reply leaving a VIP (looked up for `Direction::Egress`) from
/// an instance port, if mapped.
#[inline(always)]
pub fn lookup_egress(meta: &PacketMeta, vip: &VipHit) -> Option<u16> {
    lookup(meta, vip, meta.sport_be, PORT_WORDS, &REMAP_OUT)
}

/// XDP: rewrites the destination port in place and updates the checksum incrementally
/// (RFC 1624). The frame carries a complete checksum here; an IPv4 UDP zero stays zero.
/// Returns false (nothing written) if the headers are not readable or an IPv6 UDP packet
/// carries the invalid zero checksum, which the stack will drop anyway.
#[inline(always)]
pub fn rewrite_dport_xdp<P: Packet>(pkt: &P, meta: &PacketMeta, new_be: u16) -> bool {
    let ports: *mut PortsHdr = match pkt.header(meta.l4_off) {
        Some(p) => p,
        None => return false,
    };
    let old_be = meta.dport_be;
    if meta.proto == IPPROTO_TCP {
        let check: *mut u16 = match pkt.header(meta.l4_off + TCP_CSUM_OFF) {
            Some(p) => p,
            None => return false,
        };
        unsafe {
            *check = csum::replace16(*check, old_be, new_be);
            (*ports).dst = new_be;
        }
    } else {
        let check: *mut u16 = match pkt.header(meta.l4_off + UDP_CSUM_OFF) {
            Some(p) => p,
            None => return false,
        };
        unsafe {
            if meta.is_v6 && *check == 0 {
                return false;
            }
            *check = csum::replace16_udp(*check, old_be, new_be);
            (*ports).dst = new_be;
        }
    }
    true
}

/// Which port of a TCP/UDP header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// TC: rewrites a port through the skb helpers, which handle every checksum state the
/// stack can hand us: complete checksums are updated, partial ones (left to offload, which
/// also covers the port) are left alone, and a UDP zero stays zero. A complete receive
/// checksum (`skb->csum`) stays right too: the port and the checksum field change by
/// amounts that cancel in the sum.
///
/// The port and its checksum change together or not at all. The port is stored first: if
/// that fails, nothing was written. The checksum update comes second and is given the old
/// and new port explicitly, so it does not depend on the packet's bytes. If it fails, the
/// old port is stored back and the packet leaves exactly as it came. That store cannot
/// fail: the helpers fail only on bad flags or offsets (constant and even here) or when
/// they cannot make the bytes writable, and the first store just made these very bytes
/// writable. (The other order would leave a changed checksum over the old port if the
/// store failed.) Returns whether the packet was rewritten.
#[inline(always)]
pub fn rewrite_port_tc(ctx: &TcContext, meta: &PacketMeta, side: Side, new_be: u16) -> bool {
    let (csum_off, flags) = if meta.proto == IPPROTO_TCP {
        (meta.l4_off + TCP_CSUM_OFF, 0)
    } else {
        (meta.l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let (port_off, old_be) = match side {
        Side::Source => (meta.l4_off, meta.sport_be),
        Side::Destination => (meta.l4_off + 2, meta.dport_be),
    };
    if ctx.store(port_off, &new_be, 0).is_err() {
        return false;
    }
    let size = core::mem::size_of::<u16>() as u64;
    if ctx.l4_csum_replace(csum_off, old_be as u64, new_be as u64, flags | size).is_err() {
        let _ = ctx.store(port_off, &old_be, 0);
        return false;
    }
    true
}
