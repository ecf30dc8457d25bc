//! Consistent reads of the values havipd rewrites while packets read them (`BINDINGS`,
//! `VIP_SLOTS`). The protocol, and why a read that sees the same generation before and
//! after its copy got one whole version, is in `havip_common::versioned`.

use core::ptr::read_volatile;

use havip_common::{Versioned, READ_ATTEMPTS};

/// Copies what `copy` reads out of the current version of `cell`, or `None` if havipd
/// published a new version during each of [`READ_ATTEMPTS`] attempts. `copy` must read
/// with volatile loads, so that the compiler neither moves them past the second load of
/// the generation nor repeats them later from the map.
#[inline(always)]
pub fn read<T, R>(cell: *const Versioned<T>, copy: impl Fn(*const T) -> R) -> Option<R> {
    let copies = unsafe { &raw const (*cell).copies } as *const T;
    for _ in 0..READ_ATTEMPTS {
        let g1 = unsafe { read_volatile(&raw const (*cell).gen) };
        let out = copy(unsafe { copies.add((g1 & 1) as usize) });
        let g2 = unsafe { read_volatile(&raw const (*cell).gen) };
        if g1 == g2 {
            return Some(out);
        }
    }
    None
}
