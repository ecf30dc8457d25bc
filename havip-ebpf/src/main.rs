//! havip's kernel programs. Entry points only: each runs its `try_*`, then records the
//! action's outcome in one place. The work lives in one module per concern.
#![no_std]
#![no_main]

mod classes;
mod csum;
mod egress;
mod fence;
mod hook;
mod ingress;
mod maps;
mod neigh;
mod parse;
mod passive;
mod probe;
mod remap;
mod stats;
mod steer;
mod versioned;
mod vips;

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, TC_ACT_OK},
    macros::{classifier, raw_tracepoint, xdp},
    programs::{RawTracePointContext, TcContext, XdpContext},
};
use havip_common::Direction;
use hook::{SkbPacket, Verdict, XdpPacket};

#[inline(always)]
fn ingress<const PASSIVE: bool>(ctx: XdpContext) -> u32 {
    let pkt = XdpPacket(&ctx);
    let (verdict, outcome) = ingress::try_ingress::<_, PASSIVE>(&pkt).unwrap_or_else(|o| (Verdict::Pass, o));
    stats::count_outcome(Direction::Ingress, outcome);
    XdpPacket::action(verdict)
}

/// Ingress on TC instead of XDP (virtual NICs, see `hook`): the same logic.
#[inline(always)]
fn ingress_tc<const PASSIVE: bool>(ctx: TcContext) -> i32 {
    let pkt = SkbPacket(&ctx);
    let (verdict, outcome) = ingress::try_ingress::<_, PASSIVE>(&pkt).unwrap_or_else(|o| (Verdict::Pass, o));
    stats::count_outcome(Direction::Ingress, outcome);
    pkt.action(verdict)
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

#[classifier]
pub fn havip_ingress_tc(ctx: TcContext) -> i32 {
    ingress_tc::<false>(ctx)
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

#[classifier]
pub fn havip_ingress_tc_p(ctx: TcContext) -> i32 {
    ingress_tc::<true>(ctx)
}

/// Runs on a class's CPU for each frame taken off its queue (attached through the cpumap).
#[xdp(map = "cpumap")]
pub fn havip_cpu_queue(ctx: XdpContext) -> u32 {
    classes::on_cpu_queue(&ctx);
    XDP_PASS
}

/// The kernel's report of each bulk enqueue into a CPU queue: counts queue-full drops.
#[raw_tracepoint(tracepoint = "xdp_cpumap_enqueue")]
pub fn havip_queue_drops(ctx: RawTracePointContext) -> i32 {
    classes::on_enqueue(&ctx);
    0
}

/// Parse-and-pass: the baseline for the per-packet cost benchmark. Never attached.
#[xdp]
pub fn havip_baseline(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = ingress::try_baseline(&XdpPacket(&ctx)).unwrap_or_else(|o| (Verdict::Pass, o));
    stats::count_outcome(Direction::Ingress, outcome);
    XdpPacket::action(verdict)
}

/// The remapped path's floor (see `ingress::try_remap_floor`) for the per-packet
/// benchmark. Never attached.
#[xdp]
pub fn havip_remap_floor(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = ingress::try_remap_floor(&XdpPacket(&ctx)).unwrap_or_else(|o| (Verdict::Pass, o));
    stats::count_outcome(Direction::Ingress, outcome);
    XdpPacket::action(verdict)
}

/// The classed path's floor (see `ingress::try_queue_floor`) for the per-packet
/// benchmark. Never attached.
#[xdp]
pub fn havip_queue_floor(ctx: XdpContext) -> u32 {
    let (verdict, outcome) = ingress::try_queue_floor(&XdpPacket(&ctx)).unwrap_or_else(|o| (Verdict::Pass, o));
    stats::count_outcome(Direction::Ingress, outcome);
    XdpPacket::action(verdict)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
