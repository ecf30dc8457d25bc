//! Is this address a VIP? The fast path is one inlined array access into `VIP_SLOTS`;
//! the `VIPS` hash map is consulted only when another VIP shares the slot, or when havipd
//! rewrote the slot during every attempt to read it (see `versioned`).

use core::{mem::offset_of, ptr::read_volatile};

use havip_common::{vip_slot_words, Direction, VipInfo, VipKey, VipSlot, INLINE_REMAPS, SLOT_IN_OVERFLOW, SLOT_OUT_OVERFLOW, SLOT_OWNED, SLOT_SHARED};

use crate::{
    maps::{VIPS, VIP_SLOTS},
    versioned,
};

/// A VIP found for a packet.
pub struct VipHit {
    pub id: u32,
    /// `VipInfo::flags` and default class.
    pub flags: u32,
    pub class: u32,
    /// `CLASS_STATS` index of (this VIP, `class`).
    pub class_stats: u32,
    /// The inline mappings of the direction the VIP was looked up for, copied out of the
    /// slot's version that matched (`None` when found through `VIPS`: ask the tables).
    pub inline: Option<InlineRemaps>,
}

/// A slot's inline mappings of one direction: raw `InlineRemap` words.
pub struct InlineRemaps {
    pub entries: [u64; INLINE_REMAPS],
    /// The VIP has more mappings in this direction than fit: the table holds the rest.
    pub overflow: bool,
}

/// Everything a lookup takes from one version of a slot, as 8-byte words: the key, the
/// info, the flags and one direction's mappings.
struct SlotCopy {
    key: [u64; 2],
    /// `VipInfo` (id, flags, class, class_stats) as two words.
    info: [u64; 2],
    /// `VipSlot::flags` in the low half.
    flags: u64,
    remaps: [u64; INLINE_REMAPS],
}

// The word offsets `copy_slot` reads at.
const _: () = assert!(offset_of!(VipSlot, key) == 0 && offset_of!(VipSlot, info) == 16 && offset_of!(VipSlot, flags) == 32);
const _: () = assert!(
    offset_of!(VipInfo, id) == 0 && offset_of!(VipInfo, flags) == 4 && offset_of!(VipInfo, class) == 8 && offset_of!(VipInfo, class_stats) == 12
);
const _: () = assert!(offset_of!(VipSlot, remap_in) == 40 && offset_of!(VipSlot, remap_out) == 40 + 8 * INLINE_REMAPS);

/// Volatile word loads of one slot version (see `versioned::read`).
#[inline(always)]
fn copy_slot(slot: *const VipSlot, dir: Direction) -> SlotCopy {
    let w = slot as *const u64;
    let first_remap = match dir {
        Direction::Ingress => 5,
        Direction::Egress => 5 + INLINE_REMAPS,
    };
    let rd = |i: usize| unsafe { read_volatile(w.add(i)) };
    SlotCopy {
        key: [rd(0), rd(1)],
        info: [rd(2), rd(3)],
        flags: rd(4),
        remaps: [rd(first_remap), rd(first_remap + 1), rd(first_remap + 2), rd(first_remap + 3)],
    }
}

/// Looks up an address given as [`VipKey`] words, for a packet going in direction `dir`
/// (whose inline mappings the hit carries).
#[inline(always)]
pub fn lookup(addr: [u64; 2], dir: Direction) -> Option<VipHit> {
    let cell = VIP_SLOTS.get_ptr(vip_slot_words(addr))?;
    // No consistent version (havipd published during every attempt): the tables, which
    // hold every VIP and mapping before a slot names them, answer instead.
    let Some(s) = versioned::read(cell, |slot| copy_slot(slot, dir)) else { return from_table(addr) };
    let flags = s.flags as u32;
    if flags & SLOT_OWNED != 0 && s.key[0] == addr[0] && s.key[1] == addr[1] {
        let overflow = flags & if dir == Direction::Ingress { SLOT_IN_OVERFLOW } else { SLOT_OUT_OVERFLOW } != 0;
        return Some(VipHit {
            id: s.info[0] as u32,
            flags: (s.info[0] >> 32) as u32,
            class: s.info[1] as u32,
            class_stats: (s.info[1] >> 32) as u32,
            inline: Some(InlineRemaps { entries: s.remaps, overflow }),
        });
    }
    if flags & SLOT_SHARED != 0 {
        return from_table(addr);
    }
    None
}

#[inline(always)]
fn from_table(addr: [u64; 2]) -> Option<VipHit> {
    let info = unsafe { VIPS.get(VipKey::from_words(addr)) }?;
    Some(VipHit { id: info.id, flags: info.flags, class: info.class, class_stats: info.class_stats, inline: None })
}
