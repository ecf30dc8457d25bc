//! Cluster ownership fence: whether this node may answer for (and source traffic from) a
//! VIP right now. Standalone VIPs always may; a cluster VIP (`VIP_FENCED`) only before the
//! serve-until time havipd last confirmed, so a dead or paused controller's node falls
//! silent on its own (see `havip_common::fence`).

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use havip_common::VIP_FENCED;

use crate::{maps::FENCES, vips::VipHit};

/// True when this node serves `vip` now.
#[inline(always)]
pub fn serving(vip: &VipHit) -> bool {
    if vip.flags & VIP_FENCED == 0 {
        return true;
    }
    match FENCES.get(vip.id) {
        // The boot clock, as havipd's CLOCK_BOOTTIME: both sides read one clock.
        Some(f) => (unsafe { bpf_ktime_get_boot_ns() }) < f.serve_until_ns,
        None => false,
    }
}
