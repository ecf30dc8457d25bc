//! Steering: which NIC owns a VIP (`BINDINGS`), and moving egress packets of a VIP onto it
//! when routing picked another NIC.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect_neigh, programs::TcContext};
use havip_common::Binding;

use crate::maps::BINDINGS;

/// The VIP's binding, if it is bound to a NIC.
#[inline(always)]
pub fn binding(vip_id: u32) -> Option<&'static Binding> {
    let b = BINDINGS.get(vip_id)?;
    (b.ifindex != 0).then_some(b)
}

/// The NIC this skb is leaving through.
#[inline(always)]
pub fn egress_ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Redirects the packet to `ifindex`, letting the kernel's FIB and neighbour tables fill
/// in the L2 header for that NIC. The packet then passes the owning NIC's own egress
/// program, which remaps and counts it there (so nothing is done or counted twice).
#[inline(always)]
pub fn redirect_to(ifindex: u32) -> i32 {
    let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if r < 0 { TC_ACT_SHOT } else { r as i32 }
}
