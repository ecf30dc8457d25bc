//! Per-CPU counters: per-VIP traffic and the (direction, outcome) of every packet.

use havip_common::{
    DirCounters, Direction, NicCounters, Outcome, WireCounters, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::maps::{NIC_STATS, OUTCOMES, VIP_STATS};

#[inline(always)]
pub fn count_outcome(dir: Direction, outcome: Outcome) {
    if let Some(c) = OUTCOMES.get_ptr_mut(outcome.index(dir)) {
        // Per-CPU slot: no other CPU writes it, a plain add is exact.
        unsafe { *c += 1 };
    }
}

/// The direction's counters of a VIP, for the caller to update.
#[inline(always)]
pub fn vip_dir(vip_id: u32, dir: Direction) -> Option<&'static mut DirCounters> {
    let c = VIP_STATS.get_ptr_mut(vip_id)?;
    Some(unsafe {
        match dir {
            Direction::Ingress => &mut (*c).rx,
            Direction::Egress => &mut (*c).tx,
        }
    })
}

/// All of a VIP's counters (this CPU's slot): fetch once per packet.
#[inline(always)]
pub fn vip(vip_id: u32) -> Option<&'static mut havip_common::VipCounters> {
    VIP_STATS.get_ptr_mut(vip_id).map(|p| unsafe { &mut *p })
}

/// A VIP's on-the-wire ownership counters.
#[inline(always)]
pub fn vip_wire(vip_id: u32) -> Option<&'static mut WireCounters> {
    let c = VIP_STATS.get_ptr_mut(vip_id)?;
    Some(unsafe { &mut (*c).wire })
}

/// A NIC's counters.
#[inline(always)]
pub fn nic(index: u32) -> Option<&'static mut NicCounters> {
    NIC_STATS.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

/// Counts `packets` packets of `bytes` bytes in total, by protocol.
#[inline(always)]
pub fn count_traffic(c: &mut DirCounters, proto: u8, packets: u64, bytes: u64) {
    c.packets += packets;
    c.bytes += bytes;
    match proto {
        IPPROTO_TCP => c.tcp += packets,
        IPPROTO_UDP => c.udp += packets,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => c.icmp += packets,
        _ => c.other += packets,
    }
}
