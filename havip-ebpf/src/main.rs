//! havip's kernel programs. Entry points only: each runs its `try_*`, then records the
//! action's outcome in one place. The work lives in one module per concern.
#![no_std]
#![no_main]

mod egress;
mod ingress;
mod maps;
mod neigh;
mod parse;
mod passive;
mod probe;
mod remap;
mod stats;
mod steer;
mod vips;

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use havip_common::Direction;

#[inline(always)]
fn ingress<const PASSIVE: bool>(ctx: XdpContext) -> u32 {
    let (action, outcome) = ingress::try_ingress::<PASSIVE>(&ctx).unwrap_or_else(|o| (XDP_PASS, o));
    stats::count_outcome(Direction::Ingress, outcome);
    action
}

#[inline(always)]
fn egress<const PASSIVE: bool>(ctx: TcContext) -> i32 {
    let (action, outcome) = egress::try_egress::<PASSIVE>(&ctx).unwrap_or_else(|o| (TC_ACT_OK, o));
    stats::count_outcome(Direction::Egress, outcome);
    action
}

#[xdp]
pub fn havip_ingress(ctx: XdpContext) -> u32 {
    ingress::<false>(ctx)
}

#[classifier]
pub fn havip_egress(ctx: TcContext) -> i32 {
    egress::<false>(ctx)
}

/// The same with passive TCP measurement (`[passive] tcp`).
#[xdp]
pub fn havip_ingress_p(ctx: XdpContext) -> u32 {
    ingress::<true>(ctx)
}

#[classifier]
pub fn havip_egress_p(ctx: TcContext) -> i32 {
    egress::<true>(ctx)
}

/// Parse-and-pass: the baseline for the per-packet cost benchmark. Never attached.
#[xdp]
pub fn havip_baseline(ctx: XdpContext) -> u32 {
    let (action, outcome) = ingress::try_baseline(&ctx).unwrap_or_else(|o| (XDP_PASS, o));
    stats::count_outcome(Direction::Ingress, outcome);
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
