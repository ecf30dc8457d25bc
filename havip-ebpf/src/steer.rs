//! Steering: which NIC owns a VIP (`BINDINGS`), and moving egress packets of a VIP onto it
//! when routing picked another NIC.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_check_mtu, bpf_redirect_neigh},
    programs::TcContext,
};
use havip_common::{Binding, Outcome};

use crate::{maps::BINDINGS, versioned};

/// The VIP's binding (one whole version, see `versioned`), if it is bound to a NIC. A
/// packet that finds havipd publishing a new binding during every attempt to read it is
/// handled as if the VIP were unbound at that moment: accepted on ingress (counted
/// misdirected), not answered by ARP/ND, not steered on egress.
#[inline(always)]
pub fn binding(vip_id: u32) -> Option<Binding> {
    let cell = BINDINGS.get_ptr(vip_id)?;
    let b = versioned::read(cell, |b| unsafe { read_volatile(b) })?;
    (b.ifindex != 0).then_some(b)
}

/// The owning NIC of a bound VIP, as the packet paths need it.
#[derive(Clone, Copy)]
pub struct Owner {
    pub ifindex: u32,
    /// Index into `NIC_STATS`.
    pub nic_index: u32,
}

const _: () = assert!(core::mem::offset_of!(Binding, ifindex) == 0 && core::mem::offset_of!(Binding, nic_index) == 4);

/// Like [`binding`], reading only the one word the per-packet paths use (ifindex and NIC
/// index): one load per attempt instead of the whole binding.
#[inline(always)]
pub fn owner(vip_id: u32) -> Option<Owner> {
    let cell = BINDINGS.get_ptr(vip_id)?;
    let w = versioned::read(cell, |b| unsafe { read_volatile(b as *const u64) })?;
    let o = Owner { ifindex: w as u32, nic_index: (w >> 32) as u32 };
    (o.ifindex != 0).then_some(o)
}

/// The NIC this skb is leaving through.
#[inline(always)]
pub fn egress_ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Redirects the packet to `ifindex`, letting the kernel's FIB and neighbour tables fill
/// in the L2 header for that NIC. The packet then passes the owning NIC's own egress
/// program, which remaps and counts it there (so nothing is done or counted twice).
///
/// `bpf_redirect_neigh` only records the target; the kernel carries the redirect out after
/// the program returns and silently drops the packet if no device has that index (a NIC
/// deleted while its binding still names it, until havipd moves the VIP). So the device is
/// looked up first, and a packet that cannot be redirected is dropped here, counted
/// `SteerFailed`. A device that exists but is down is not caught: the kernel's redirect
/// fails its route lookup and counts it in that device's `tx_errors` (havipd moves VIPs off
/// a NIC that goes down within milliseconds).
#[inline(always)]
pub fn redirect_to(ctx: &TcContext, ifindex: u32) -> (i32, Outcome) {
    if !device_exists(ctx, ifindex) {
        return (TC_ACT_SHOT, Outcome::SteerFailed);
    }
    let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    // TC_ACT_REDIRECT, or TC_ACT_SHOT for arguments it refuses (none here).
    if r == TC_ACT_REDIRECT as i64 {
        (TC_ACT_REDIRECT, Outcome::Steered)
    } else {
        (TC_ACT_SHOT, Outcome::SteerFailed)
    }
}

/// Whether a device with index `ifindex` exists in the skb's network namespace.
/// `bpf_check_mtu` looks the device up before anything else and fails with `-ENODEV`
/// without one; its MTU verdict (0 or positive) is not used.
#[inline(always)]
fn device_exists(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    let r = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, ifindex, &mut mtu_len, 0, 0) };
    r >= 0
}
