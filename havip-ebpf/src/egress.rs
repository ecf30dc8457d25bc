//! TC egress: count VIP-sourced packets and remap instance ports back to designated ports.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use havip_common::{Direction, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    hook::{Hook, SkbPacket},
    parse::Parsed,
    classes, fence, passive, probe,
    remap::{self, Side},
    stats, steer, vips,
};

#[inline(always)]
pub fn try_egress<const PASSIVE: bool>(ctx: &TcContext) -> Result<(i32, Outcome), Outcome> {
    let pkt = SkbPacket(ctx);
    let Parsed::Ip(meta) = pkt.parse()? else { return Err(Outcome::NotIp) };
    if meta.proto == IPPROTO_ICMP || meta.proto == IPPROTO_ICMPV6 || meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP {
        let mark = unsafe { (*ctx.skb.skb).mark };
        if let Some(o) = probe::on_egress(&pkt, &meta, mark) {
            return Ok((TC_ACT_OK, o));
        }
    }
    let vip = vips::lookup(meta.src, Direction::Egress).ok_or(Outcome::NotVip)?;
    // A cluster VIP this node does not serve now: nothing leaves from it, so a node that
    // lost ownership (or never confirmed it) cannot talk as the VIP.
    if !fence::serving(&vip) {
        if let Some(c) = stats::vip_dir(vip.id, Direction::Egress) {
            c.dropped += 1;
        }
        return Ok((TC_ACT_SHOT, Outcome::Fenced));
    }

    // Leaving by a NIC that does not own the VIP: hand it to the owner, whose own egress
    // pass remaps and counts it (or drop it, counted, if the owner's NIC is gone).
    let binding = steer::owner(vip.id);
    if let Some(b) = binding {
        if b.ifindex != steer::egress_ifindex(ctx) {
            let (action, outcome) = steer::redirect_to(ctx, b.ifindex);
            if let Some(c) = stats::vip(vip.id) {
                match outcome {
                    Outcome::Steered => c.wire.steered += 1,
                    _ => c.tx.dropped += 1,
                }
            }
            return Ok((action, outcome));
        }
    }

    // A GSO packet leaves as several segments, each with its own headers.
    let (segs, bytes) = pkt.wire_count(&meta);

    let (outcome, vip_port_be) = match remap::lookup_egress(&meta, &vip) {
        Some(designated_be) if remap::rewrite_port_tc(ctx, &meta, Side::Source, designated_be) => (Outcome::VipRemapped, designated_be),
        _ => (Outcome::VipPassed, meta.sport_be),
    };
    if let Some(b) = binding {
        if PASSIVE && meta.proto == IPPROTO_TCP {
            passive::on_egress(&pkt, &meta, vip.id, b.nic_index, vip_port_be);
        }
    }
    if let Some(class) = classes::of(&vip, meta.proto, vip_port_be) {
        classes::set_priority(ctx, class.info);
        if let Some(c) = classes::counters(class.stats) {
            c.tx_packets += segs;
            c.tx_bytes += bytes;
        }
    }
    if let Some(n) = binding.and_then(|b| stats::nic(b.nic_index)) {
        n.tx_packets += segs;
        n.tx_bytes += bytes;
    }
    if let Some(c) = stats::vip_dir(vip.id, Direction::Egress) {
        stats::count_traffic(c, meta.proto, segs, bytes);
        match outcome {
            Outcome::VipRemapped => c.remapped += segs,
            _ => c.passed += segs,
        }
    }
    Ok((TC_ACT_OK, outcome))
}
