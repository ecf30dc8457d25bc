//! Ingress, on either hook (see `hook`): recognise VIP packets, count them, remap
//! designated ports to instance ports, answer ARP/ND for owned VIPs, consume probe replies.

use havip_common::{Direction, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    hook::{Hook, Verdict},
    neigh,
    parse::Parsed,
    classes, passive, probe, remap, stats, steer, vips,
};

/// Returns what to do with the packet and the outcome to count. `PASSIVE` compiles in
/// passive TCP measurement (a separate program variant, see `passive`).
#[inline(always)]
pub fn try_ingress<H: Hook, const PASSIVE: bool>(pkt: &H) -> Result<(Verdict, Outcome), Outcome> {
    let meta = match pkt.parse()? {
        Parsed::Ip(meta) => meta,
        Parsed::Arp { l3_off } => return neigh::arp(pkt, l3_off),
    };
    if meta.proto == IPPROTO_ICMP || meta.proto == IPPROTO_ICMPV6 || ((meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP) && probe::maybe_port_reply(&meta)) {
        if let Some(o) = probe::on_ingress(pkt, &meta) {
            return Ok((Verdict::Drop, o));
        }
    }
    if meta.is_v6 && meta.proto == IPPROTO_ICMPV6 {
        if let Some(r) = neigh::neighbor_solicitation(pkt, &meta) {
            return r;
        }
    }
    let vip = vips::lookup(meta.dst, Direction::Ingress).ok_or(Outcome::NotVip)?;
    let counters = stats::vip(vip.id);
    let (packets, bytes) = pkt.wire_count(&meta);

    // Arriving on the owning NIC counts for that NIC; anywhere else it is misdirected
    // (a stale neighbour cache during a move) and still accepted.
    let binding = steer::owner(vip.id);
    let on_owner = match binding {
        Some(b) if b.ifindex == pkt.ingress_ifindex() => {
            if let Some(n) = stats::nic(b.nic_index) {
                n.rx_packets += packets;
                n.rx_bytes += bytes;
            }
            true
        }
        _ => false,
    };
    if let Some(b) = binding {
        if PASSIVE && meta.proto == IPPROTO_TCP {
            // Before the remap: the designated port, as the peer addresses it.
            passive::on_ingress(pkt, &meta, vip.id, b.nic_index, meta.dport_be);
        }
    }

    // Before the remap: a class is chosen by the designated port.
    let class = classes::of(&vip, meta.proto, meta.dport_be);
    let outcome = match remap::lookup_ingress(&meta, &vip) {
        Some(instance_be) if pkt.rewrite_dport(&meta, instance_be) => Outcome::VipRemapped,
        _ => Outcome::VipPassed,
    };
    if let Some(c) = counters {
        if !on_owner {
            c.wire.misdirected += 1;
        }
        let rx = &mut c.rx;
        stats::count_traffic(rx, meta.proto, packets, bytes);
        match outcome {
            Outcome::VipRemapped => rx.remapped += packets,
            _ => rx.passed += packets,
        }
    }
    let Some(class) = class else { return Ok((Verdict::Pass, outcome)) };
    let queued = pkt.to_cpu_queue(&meta, class.id, class.info);
    if let Some(c) = classes::counters(class.stats) {
        c.rx_packets += packets;
        c.rx_bytes += bytes;
        if queued == Verdict::Queued {
            c.rx_queued += packets;
        }
    }
    Ok((queued, outcome))
}

/// The classed path's floor for the bench: the same parse, the VIP and its class looked
/// up, then the CPU queue (its metadata and redirect helpers); no remap, no counters. What
/// the classed path costs beyond this is havip's own work; this itself is the price of a
/// CPU queue.
#[inline(always)]
pub fn try_queue_floor<H: Hook>(pkt: &H) -> Result<(Verdict, Outcome), Outcome> {
    let Parsed::Ip(meta) = pkt.parse()? else { return Err(Outcome::NotIp) };
    let vip = vips::lookup(meta.dst, Direction::Ingress).ok_or(Outcome::NotVip)?;
    let Some(class) = classes::of(&vip, meta.proto, meta.dport_be) else { return Ok((Verdict::Pass, Outcome::NotVip)) };
    Ok((pkt.to_cpu_queue(&meta, class.id, class.info), Outcome::VipPassed))
}

/// The remapped path's floor for the bench: the same parse, the VIP looked up, its port
/// remapped; no binding read, no counters. What the remapped path costs beyond this is
/// the counting and the owner's consistent read.
#[inline(always)]
pub fn try_remap_floor<H: Hook>(pkt: &H) -> Result<(Verdict, Outcome), Outcome> {
    let Parsed::Ip(meta) = pkt.parse()? else { return Err(Outcome::NotIp) };
    let vip = vips::lookup(meta.dst, Direction::Ingress).ok_or(Outcome::NotVip)?;
    let outcome = match remap::lookup_ingress(&meta, &vip) {
        Some(instance_be) if pkt.rewrite_dport(&meta, instance_be) => Outcome::VipRemapped,
        _ => Outcome::VipPassed,
    };
    Ok((Verdict::Pass, outcome))
}

/// The bench baseline: the same parse, then pass. What havip adds is measured against it.
#[inline(always)]
pub fn try_baseline<H: Hook>(pkt: &H) -> Result<(Verdict, Outcome), Outcome> {
    let Parsed::Ip(meta) = pkt.parse()? else { return Err(Outcome::NotIp) };
    // Keep the parse from being optimised away.
    let outcome = if meta.dport_be == 0 { Outcome::NotVip } else { Outcome::VipPassed };
    Ok((Verdict::Pass, outcome))
}
