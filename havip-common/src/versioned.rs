//! Values havipd rewrites while the programs read them: `BINDINGS` (which NIC owns a VIP)
//! and `VIP_SLOTS` (the fast path). Each is larger than one load, so a packet reading a
//! plain value while havipd writes it could see parts of two versions: the ifindex of one
//! binding with the MAC of the next, or one VIP's key with another's mappings. Instead each
//! element is a [`Versioned`]: two copies and a generation word.
//!
//! **Writer** (havipd, the only one; through the array mapped into its memory, see
//! `havip_user::kernel::versioned`): to publish a version after generation `g`, it
//! 1. writes the version into the copy no reader of `g` uses, `copies[(g + 1) & 1]`;
//! 2. stores `g + 1` into `gen` with one aligned 8-byte store, ordered after step 1
//!    (release), which makes that copy the current one;
//! 3. orders the next publication's step 1 after this store (a release fence first).
//!
//! So between two stores to `gen`, only the copy *not* named by it is written, and the copy
//! it names stays whole until `gen` has moved on.
//!
//! **Reader** (the programs, `havip-ebpf/src/versioned.rs`): it loads `gen` (`g1`), copies
//! what it needs out of `copies[g1 & 1]`, and loads `gen` again (`g2`). If `g2 == g1`, no
//! store to `gen` came between its loads, so the copy it read was not being written: the
//! writer only writes that copy after moving `gen` past `g1`. Otherwise it tries again, at
//! most [`READ_ATTEMPTS`] times (programs may not loop without a bound): the copy the new
//! generation names is complete, so a retry fails only if havipd published again within
//! the few nanoseconds of the read. After that many failures the program acts without the
//! value (see each reader).
//!
//! The reader's loads are ordered as written on x86_64 (TSO, and the programs load with
//! volatile reads, which the compiler keeps in order); see the README's limits for arm64.

use core::mem::size_of;

use crate::{Binding, VipSlot};

/// Attempts of the programs' reader before it gives up. An attempt fails only if havipd
/// publishes within it (a few nanoseconds, more while the writer keeps taking the cache
/// line away). Against a writer publishing one slot every 40 ns or so, the fixtures' racing
/// test saw 3 attempts give up on about 3% of packets, and 8 on usually fewer than 5 in
/// 400,000 (0.8% once, on a busy machine). havipd publishes a given element rarely: on a
/// move, a reload, a pool grant.
pub const READ_ATTEMPTS: usize = 8;

/// A map value published by generation: see the module docs. An all-zero element (as an
/// array starts) holds the zero version in `copies[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Versioned<T> {
    /// Publications so far; `copies[gen & 1]` is the current version. Only ever grows.
    pub gen: u64,
    pub copies: [T; 2],
}

impl<T: Copy> Versioned<T> {
    /// The version readers take now.
    #[inline(always)]
    pub fn current(&self) -> T {
        self.copies[(self.gen & 1) as usize]
    }

    /// The copy the next publication writes (never the current one).
    #[inline(always)]
    pub fn next_index(&self) -> usize {
        (self.gen.wrapping_add(1) & 1) as usize
    }
}

/// `BINDINGS[vip_id]`.
pub type BindingCell = Versioned<Binding>;
/// `VIP_SLOTS[slot]`.
pub type SlotCell = Versioned<VipSlot>;

const _: () = assert!(size_of::<BindingCell>() == 8 + 2 * size_of::<Binding>());
const _: () = assert!(size_of::<SlotCell>() == 8 + 2 * size_of::<VipSlot>());
// 8-byte multiples: in the array every element's `gen` is 8-aligned, one load and one store.
const _: () = assert!(size_of::<BindingCell>() % 8 == 0 && size_of::<SlotCell>() % 8 == 0);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], a u64 then two `T`s, each `T` Pod with an 8-byte multiple size here
// (asserted above for the two instances used), so no implicit padding: any bits are valid.
unsafe impl<T: aya::Pod> aya::Pod for Versioned<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_copy_is_never_the_current_one() {
        let mut v = Versioned { gen: 0, copies: [1u64, 2] };
        for g in 0..5u64 {
            v.gen = g;
            assert_ne!(v.next_index(), (g & 1) as usize);
            assert_eq!(v.current(), v.copies[(g & 1) as usize]);
        }
        assert_eq!(Versioned::<u64>::default().current(), 0, "an all-zero element holds the zero version");
    }
}
