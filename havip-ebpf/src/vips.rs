//! Is this address a VIP? The fast path is one inlined array access into `VIP_SLOTS`;
//! the `VIPS` hash map is consulted only when another VIP shares the slot.

use havip_common::{vip_slot_words, VipKey, VipSlot, SLOT_OWNED, SLOT_SHARED};

use crate::maps::{VIPS, VIP_SLOTS};

/// A VIP found for a packet.
pub struct VipHit {
    pub id: u32,
    /// `VipInfo::flags` and default class.
    pub flags: u32,
    pub class: u32,
    /// The VIP's own slot, whose inline mappings apply; `None` when found through `VIPS`.
    pub slot: Option<*const VipSlot>,
}

/// Looks up an address given as [`VipKey`] words.
#[inline(always)]
pub fn lookup(addr: [u64; 2]) -> Option<VipHit> {
    let slot = VIP_SLOTS.get_ptr(vip_slot_words(addr))?;
    // The key is 8-aligned in the map value: two word compares.
    let key = unsafe { &*((&raw const (*slot).key) as *const [u64; 2]) };
    let flags = unsafe { (*slot).flags };
    if flags & SLOT_OWNED != 0 && key[0] == addr[0] && key[1] == addr[1] {
        let info = unsafe { &(*slot).info };
        return Some(VipHit { id: info.id, flags: info.flags, class: info.class, slot: Some(slot) });
    }
    if flags & SLOT_SHARED != 0 {
        let info = unsafe { VIPS.get(VipKey::from_words(addr)) }?;
        return Some(VipHit { id: info.id, flags: info.flags, class: info.class, slot: None });
    }
    None
}
