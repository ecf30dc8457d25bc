//! XDP ingress: recognise VIP packets, count them, remap designated ports to instance ports.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_get_buff_len, programs::XdpContext};
use havip_common::{Direction, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    neigh,
    parse::{self, Packet, PacketMeta, Parsed},
    classes, passive, probe, remap, stats, steer, vips,
};

/// An XDP frame seen through the one bounds check.
///
/// Frames of any size up to 64 KiB are handled alike: generic XDP sees skbs that large
/// (GSO packets and packets merged by GRO on an earlier device, which arrive whole, for
/// example over veth; GRO on the device itself is skipped while generic XDP is attached),
/// linear (the programs are not loaded with `xdp.frags`, so the kernel linearizes the skb
/// first; native drivers refuse to attach them where an MTU needs multi-buffer frames). A multi-buffer frame (only BPF_PROG_RUN makes one for a
/// program like this, for input over a page) is handled too: lengths are checked against
/// the whole frame, headers are read from its linear part, and headers that are not all in
/// the linear part make the frame `Malformed`, passed untouched.
pub struct XdpPacket<'a>(pub &'a XdpContext);

impl XdpPacket<'_> {
    /// Bytes of the whole frame, fragments included (a helper call: only for frames whose
    /// linear part does not hold what the headers claim).
    #[inline(always)]
    fn whole_len(&self) -> usize {
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as usize }
    }

    /// The frame's length for the byte counters: its linear part, or the whole frame when
    /// the IP packet runs on into fragments.
    #[inline(always)]
    fn frame_len(&self, meta: &PacketMeta) -> usize {
        let linear = self.end() - self.start();
        if meta.hdr_len + meta.payload_len <= linear { linear } else { self.whole_len() }
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn covers(&self, off: usize, len: usize) -> bool {
        // No pointer is formed from this sum (header reads go through `header`, whose
        // offsets are bounded), so it may be as large as the frame.
        let need = off + len;
        self.start() + need <= self.end() || need <= self.whole_len()
    }
}

/// Returns the XDP action and the outcome to count. `PASSIVE` compiles in passive TCP
/// measurement (a separate program variant, see `passive`).
#[inline(always)]
pub fn try_ingress<const PASSIVE: bool>(ctx: &XdpContext) -> Result<(u32, Outcome), Outcome> {
    let pkt = XdpPacket(ctx);
    let meta = match parse::parse(&pkt)? {
        Parsed::Ip(meta) => meta,
        Parsed::Arp { l3_off } => return neigh::arp(ctx, l3_off),
    };
    if meta.proto == IPPROTO_ICMP || meta.proto == IPPROTO_ICMPV6 || ((meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP) && probe::maybe_port_reply(&meta)) {
        if let Some(o) = probe::on_ingress(&pkt, &meta) {
            return Ok((xdp_action::XDP_DROP, o));
        }
    }
    if meta.is_v6 && meta.proto == IPPROTO_ICMPV6 {
        if let Some(r) = neigh::neighbor_solicitation(ctx, &meta) {
            return r;
        }
    }
    let vip = vips::lookup(meta.dst, Direction::Ingress).ok_or(Outcome::NotVip)?;
    let counters = stats::vip(vip.id);
    let bytes = pkt.frame_len(&meta) as u64;

    // Arriving on the owning NIC counts for that NIC; anywhere else it is misdirected
    // (a stale neighbour cache during a move) and still accepted.
    let binding = steer::binding(vip.id);
    let on_owner = match binding {
        Some(b) if b.ifindex == ctx.ingress_ifindex() as u32 => {
            if let Some(n) = stats::nic(b.nic_index) {
                n.rx_packets += 1;
                n.rx_bytes += bytes;
            }
            true
        }
        _ => false,
    };
    if let Some(b) = binding {
        if PASSIVE && meta.proto == IPPROTO_TCP {
            // Before the remap: the designated port, as the peer addresses it.
            passive::on_ingress(&pkt, &meta, vip.id, b.nic_index, meta.dport_be);
        }
    }

    // Before the remap: a class is chosen by the designated port.
    let class = classes::of(&vip, meta.proto, meta.dport_be);
    let outcome = match remap::lookup_ingress(&meta, &vip) {
        Some(instance_be) if remap::rewrite_dport_xdp(&pkt, &meta, instance_be) => Outcome::VipRemapped,
        _ => Outcome::VipPassed,
    };
    if let Some(c) = counters {
        if !on_owner {
            c.wire.misdirected += 1;
        }
        let rx = &mut c.rx;
        stats::count_traffic(rx, meta.proto, 1, bytes);
        match outcome {
            Outcome::VipRemapped => rx.remapped += 1,
            _ => rx.passed += 1,
        }
    }
    let Some((class_id, info)) = class else { return Ok((xdp_action::XDP_PASS, outcome)) };
    let queued = classes::to_cpu_queue(ctx, &meta, class_id, info);
    if let Some(c) = classes::counters(vip.id, class_id) {
        c.rx_packets += 1;
        c.rx_bytes += bytes;
        if queued == Some(xdp_action::XDP_REDIRECT) {
            c.rx_queued += 1;
        }
    }
    Ok((queued.unwrap_or(xdp_action::XDP_PASS), outcome))
}

/// The bench baseline: the same parse, then pass. What havip adds is measured against it.
#[inline(always)]
pub fn try_baseline(ctx: &XdpContext) -> Result<(u32, Outcome), Outcome> {
    let pkt = XdpPacket(ctx);
    let Parsed::Ip(meta) = parse::parse(&pkt)? else { return Err(Outcome::NotIp) };
    // Keep the parse from being optimised away.
    let outcome = if meta.dport_be == 0 { Outcome::NotVip } else { Outcome::VipPassed };
    Ok((xdp_action::XDP_PASS, outcome))
}
