//! Ownership on the wire: ARP requests and IPv6 neighbour solicitations for a VIP are
//! answered in XDP by the NIC that owns the VIP (the reply is built in place and sent back
//! with XDP_TX, from that NIC's MAC) and dropped on every other NIC, so exactly one NIC
//! ever answers for a VIP. Requests for other addresses go to the kernel untouched.
//!
//! A solicitation for a VIP is checked as RFC 4861 7.1.1 asks before anything else: one
//! with a hop limit other than 255, or whose ICMPv6 checksum does not verify, is discarded
//! silently (dropped and counted, on every NIC), never answered. havip answers for the VIP
//! on the link, so the discarding is its to do; the kernel would discard it too.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::bpf_xdp_adjust_tail,
    programs::XdpContext,
};
use havip_common::{Binding, Direction, Outcome, VipKey};

use crate::{
    csum::{icmpv6_sum, ICMPV6_MAX_LEN},
    ingress::XdpPacket,
    parse::{rd, EthHdr, Ipv6Hdr, Packet, PacketMeta},
    fence, stats, steer,
    vips::{self, VipHit},
};

/// Packed: the sender protocol address sits at offset 14, which `repr(C)` would pad.
#[repr(C, packed)]
struct ArpHdr {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    op: u16,
    sha: [u8; 6],
    spa: u32,
    tha: [u8; 6],
    tpa: u32,
}

const _: () = assert!(size_of::<ArpHdr>() == 28);
const _: () = assert!(size_of::<NdMsg>() == 32);

const ARPOP_REQUEST: u16 = 1u16.to_be();
const ARPOP_REPLY: u16 = 2u16.to_be();

/// The VIP's binding, or why not to answer here: a cluster VIP this node does not serve
/// now (fenced), or a VIP owned by another NIC (or by none), is dropped, so only the owner
/// answers.
#[inline(always)]
fn owner_here(ctx: &XdpContext, vip: &VipHit) -> Result<Binding, Outcome> {
    let outcome = if !fence::serving(vip) {
        Outcome::Fenced
    } else {
        match steer::binding(vip.id) {
            Some(b) if b.ifindex == ctx.ingress_ifindex() as u32 => return Ok(b),
            _ => Outcome::NeighDropped,
        }
    };
    if let Some(c) = stats::vip_wire(vip.id) {
        c.neigh_dropped += 1;
    }
    Err(outcome)
}

/// Handles an ARP packet. `Err(NotIp)` passes it to the kernel.
#[inline(always)]
pub fn arp(ctx: &XdpContext, l3_off: usize) -> Result<(u32, Outcome), Outcome> {
    let pkt = XdpPacket(ctx);
    let arp: *mut ArpHdr = pkt.header(l3_off).ok_or(Outcome::Malformed)?;
    let a = unsafe { &mut *arp };
    // Ethernet/IPv4 requests only; replies and other hardware pass.
    let (htype, ptype, op) = (a.htype, a.ptype, a.op);
    if htype != 1u16.to_be() || ptype != 0x0800u16.to_be() || a.hlen != 6 || a.plen != 4 || op != ARPOP_REQUEST {
        return Err(Outcome::NotIp);
    }
    let target = a.tpa;
    let vip = vips::lookup(VipKey::v4_words(target), Direction::Ingress).ok_or(Outcome::NotIp)?;
    let b = match owner_here(ctx, &vip) {
        Ok(b) => b,
        Err(o) => return Ok((XDP_DROP, o)),
    };
    let eth: *mut EthHdr = pkt.header(0).ok_or(Outcome::Malformed)?;
    unsafe {
        // Reply to the asker, from the owner's MAC: "VIP is at b.mac".
        (*eth).dst = a.sha;
        (*eth).src = b.mac;
        a.op = ARPOP_REPLY;
        a.tha = a.sha;
        a.tpa = a.spa;
        a.sha = b.mac;
        a.spa = target;
    }
    count_reply(vip.id, &b, Outcome::ArpReplied);
    Ok((XDP_TX, Outcome::ArpReplied))
}

#[inline(always)]
fn count_reply(vip_id: u32, b: &Binding, o: Outcome) {
    let arp = o == Outcome::ArpReplied;
    if let Some(c) = stats::vip_wire(vip_id) {
        if arp { c.arp_replies += 1 } else { c.nd_replies += 1 }
    }
    if let Some(n) = stats::nic(b.nic_index) {
        if arp { n.arp_replies += 1 } else { n.nd_replies += 1 }
    }
}

/// ICMPv6 neighbour solicitation / advertisement body with one link-layer address option:
/// exactly what havip sends (RFC 4861 4.3, 4.4).
#[repr(C)]
struct NdMsg {
    icmp_type: u8,
    code: u8,
    check: u16,
    flags: u32,
    target: [u64; 2],
    opt_type: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}

const ICMPV6_NS: u8 = 135;
/// An NS without options: type, code, checksum, reserved, target.
const NS_LEN: usize = 24;
const ICMPV6_NA: u8 = 136;
/// NA flags as they sit in the first byte: Solicited and Override.
const NA_SOLICITED: u32 = 0x40;
const NA_OVERRIDE: u32 = 0x20;
const ALL_NODES: [u64; 2] = [0x02ff, 0x0100_0000_0000_0000];

/// Handles an ICMPv6 packet if it is a neighbour solicitation for a VIP; `None` lets
/// normal processing continue.
#[inline(always)]
pub fn neighbor_solicitation(ctx: &XdpContext, meta: &PacketMeta) -> Option<Result<(u32, Outcome), Outcome>> {
    let pkt = XdpPacket(ctx);
    // The fixed part of an NS: type, code, checksum, reserved, target (24 bytes).
    let ns: *const [u8; NS_LEN] = pkt.header(meta.l4_off)?;
    if unsafe { (*ns)[0] } != ICMPV6_NS || unsafe { (*ns)[1] } != 0 {
        return None;
    }
    let target: [u64; 2] = rd(unsafe { (ns as *const u8).add(8) } as *const [u64; 2]);
    let vip = vips::lookup(target, Direction::Ingress)?;
    let ip: *const Ipv6Hdr = pkt.header(meta.l3_off)?;
    // RFC 4861 7.1.1: a solicitation not sent with hop limit 255 came through a router.
    if rd(unsafe { &raw const (*ip).hop_limit }) != 255 {
        return Some(Ok((XDP_DROP, discard(vip.id, Outcome::NdHopLimit))));
    }
    // The ICMPv6 length (parsing checked the frame holds it). Shorter than an NS is not one;
    // longer than the checksum walk goes is not verified, so not answered: both pass on.
    let len = u16::from_be(rd(unsafe { &raw const (*ip).payload_len })) as usize;
    if len < NS_LEN || len > ICMPV6_MAX_LEN {
        return Some(Err(Outcome::Malformed));
    }
    match icmpv6_sum(&pkt, meta.l3_off, meta.l4_off, len) {
        Some(0xffff) => {}
        Some(_) => return Some(Ok((XDP_DROP, discard(vip.id, Outcome::NdBadChecksum)))),
        // Not all in the readable part of the frame: not verified, not answered.
        None => return Some(Err(Outcome::Malformed)),
    }
    let b = match owner_here(ctx, &vip) {
        Ok(b) => b,
        Err(o) => return Some(Ok((XDP_DROP, o))),
    };
    let asker_ip: [u64; 2] = meta.src;
    let asker_mac: [u8; 6] = unsafe { (*pkt.header::<EthHdr>(0)?).src };

    // Make the frame exactly headers + NA + one option.
    let want = meta.l4_off + size_of::<NdMsg>();
    let have = pkt.end() - pkt.start();
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - have as i32) } != 0 {
        return Some(Err(Outcome::Malformed));
    }
    let pkt = XdpPacket(ctx);
    let eth: *mut EthHdr = pkt.header(0)?;
    let ip: *mut Ipv6Hdr = pkt.header(meta.l3_off)?;
    let na: *mut NdMsg = pkt.header(meta.l4_off)?;
    // DAD probes come from :: and get their answer on all-nodes, unsolicited.
    let dad = asker_ip[0] == 0 && asker_ip[1] == 0;
    unsafe {
        (*eth).src = b.mac;
        (*eth).dst = if dad { [0x33, 0x33, 0, 0, 0, 1] } else { asker_mac };
        (*ip).payload_len = (size_of::<NdMsg>() as u16).to_be();
        (*ip).hop_limit = 255;
        (*ip).src = target;
        (*ip).dst = if dad { ALL_NODES } else { asker_ip };
        (*na).icmp_type = ICMPV6_NA;
        (*na).code = 0;
        (*na).check = 0;
        (*na).flags = if dad { NA_OVERRIDE } else { NA_SOLICITED | NA_OVERRIDE };
        (*na).target = target;
        (*na).opt_type = 2; // target link-layer address
        (*na).opt_len = 1;
        (*na).opt_mac = b.mac;
    }
    // The sum is in memory order, so its complement is stored as is.
    let sum = icmpv6_sum(&pkt, meta.l3_off, meta.l4_off, size_of::<NdMsg>())?;
    unsafe { (*na).check = !sum };
    count_reply(vip.id, &b, Outcome::NdReplied);
    Some(Ok((XDP_TX, Outcome::NdReplied)))
}

/// Counts a solicitation for VIP `vip_id` discarded as invalid (`outcome`), returning it.
#[inline(always)]
fn discard(vip_id: u32, outcome: Outcome) -> Outcome {
    if let Some(c) = stats::vip_dir(vip_id, Direction::Ingress) {
        c.dropped += 1;
    }
    outcome
}
