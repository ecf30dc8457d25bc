//! Ownership on the wire: ARP requests and IPv6 neighbour solicitations for a VIP are
//! answered on the ingress hook by the NIC that owns the VIP (the reply is built in place
//! and bounced back out of that NIC: XDP_TX, or a TC redirect to its egress, from that
//! NIC's MAC) and dropped on every other NIC, so exactly one NIC ever answers for a VIP.
//! Requests for other addresses go to the kernel untouched. Replies are written through
//! [`Hook::store`], whole headers at a time.
//!
//! A solicitation for a VIP is checked as RFC 4861 7.1.1 asks before anything else: one
//! with a hop limit other than 255, or whose ICMPv6 checksum does not verify, is discarded
//! silently (dropped and counted, on every NIC), never answered. havip answers for the VIP
//! on the link, so the discarding is its to do; the kernel would discard it too.

use core::mem::size_of;

use havip_common::{Binding, Direction, Outcome, VipKey, IPPROTO_ICMPV6};

use crate::{
    csum::{icmpv6_sum, icmpv6_sum_of, ICMPV6_MAX_LEN},
    hook::{Hook, Verdict},
    maps::SCRATCH,
    parse::{rd, EthHdr, Ipv6Hdr, PacketMeta},
    fence, stats, steer,
    vips::{self, VipHit},
};

/// Packed: the sender protocol address sits at offset 14, which `repr(C)` would pad.
#[repr(C, packed)]
#[derive(Clone, Copy)]
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
fn owner_here<H: Hook>(pkt: &H, vip: &VipHit) -> Result<Binding, Outcome> {
    let outcome = if !fence::serving(vip) {
        Outcome::Fenced
    } else {
        match steer::binding(vip.id) {
            Some(b) if b.ifindex == pkt.ingress_ifindex() => return Ok(b),
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
pub fn arp<H: Hook>(pkt: &H, l3_off: usize) -> Result<(Verdict, Outcome), Outcome> {
    // Fields are read one by one from the packet: a copy of the packed header on the stack
    // would put its addresses at misaligned stack offsets, which the verifier refuses.
    let a: *const ArpHdr = pkt.header(l3_off).ok_or(Outcome::Malformed)?;
    let (htype, ptype, hlen, plen, op) = unsafe {
        (rd(&raw const (*a).htype), rd(&raw const (*a).ptype), rd(&raw const (*a).hlen), rd(&raw const (*a).plen), rd(&raw const (*a).op))
    };
    // Ethernet/IPv4 requests only; replies and other hardware pass.
    if htype != 1u16.to_be() || ptype != 0x0800u16.to_be() || hlen != 6 || plen != 4 || op != ARPOP_REQUEST {
        return Err(Outcome::NotIp);
    }
    let (sha, spa, target) = unsafe { (rd(&raw const (*a).sha), rd(&raw const (*a).spa), rd(&raw const (*a).tpa)) };
    let vip = vips::lookup(VipKey::v4_words(target), Direction::Ingress).ok_or(Outcome::NotIp)?;
    let b = match owner_here(pkt, &vip) {
        Ok(b) => b,
        Err(o) => return Ok((Verdict::Drop, o)),
    };
    // Reply to the asker, from the owner's MAC: "VIP is at b.mac".
    let (eth, reply, _) = scratch::<MacPair, ArpHdr, ()>().ok_or(Outcome::Malformed)?;
    unsafe {
        *eth = MacPair { dst: sha, src: b.mac };
        *reply = ArpHdr { htype, ptype, hlen, plen, op: ARPOP_REPLY, sha: b.mac, spa: target, tha: sha, tpa: spa };
    }
    // The furthest bytes first: once they are written, every byte before them is writable
    // (on TC the first store un-clones the header), so the second store cannot fail and a
    // failure leaves the request untouched for the kernel.
    if !pkt.store(l3_off, unsafe { &*reply }) {
        return Err(Outcome::Malformed);
    }
    pkt.store(0, unsafe { &*eth });
    count_reply(vip.id, &b, Outcome::ArpReplied);
    Ok((Verdict::Bounce, Outcome::ArpReplied))
}

/// Where replies are built (see `maps::SCRATCH`): the Ethernet addresses at 0, the IP
/// or ARP header at 16, the ICMPv6 message at 56.
#[inline(always)]
fn scratch<A, B, C>() -> Option<(*mut A, *mut B, *mut C)> {
    let s = SCRATCH.get_ptr_mut(0)?;
    let base = unsafe { (*s).bytes.as_mut_ptr() };
    Some((base as *mut A, unsafe { base.add(16) } as *mut B, unsafe { base.add(56) } as *mut C))
}

/// The addresses of an Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
struct MacPair {
    dst: [u8; 6],
    src: [u8; 6],
}

const _: () = assert!(16 + size_of::<Ipv6Hdr>() <= 56 && 56 + size_of::<NdMsg>() <= 96 && 16 + size_of::<ArpHdr>() <= 56);

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
#[derive(Clone, Copy)]
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
pub fn neighbor_solicitation<H: Hook>(pkt: &H, meta: &PacketMeta) -> Option<Result<(Verdict, Outcome), Outcome>> {
    // The fixed part of an NS: type, code, checksum, reserved, target (24 bytes).
    let ns: *const [u8; NS_LEN] = pkt.header(meta.l4_off)?;
    if unsafe { (*ns)[0] } != ICMPV6_NS || unsafe { (*ns)[1] } != 0 {
        return None;
    }
    let target: [u64; 2] = rd(unsafe { (ns as *const u8).add(8) } as *const [u64; 2]);
    let vip = vips::lookup(target, Direction::Ingress)?;
    let ip: *const Ipv6Hdr = pkt.header(meta.l3_off)?;
    let ver_tc_flow = rd(unsafe { &raw const (*ip).ver_tc_flow });
    // RFC 4861 7.1.1: a solicitation not sent with hop limit 255 came through a router.
    if rd(unsafe { &raw const (*ip).hop_limit }) != 255 {
        return Some(Ok((Verdict::Drop, discard(vip.id, Outcome::NdHopLimit))));
    }
    // The ICMPv6 length (parsing checked the frame holds it). Shorter than an NS is not one;
    // longer than the checksum walk goes is not verified, so not answered: both pass on.
    let len = u16::from_be(rd(unsafe { &raw const (*ip).payload_len })) as usize;
    if len < NS_LEN || len > ICMPV6_MAX_LEN {
        return Some(Err(Outcome::Malformed));
    }
    match icmpv6_sum(pkt, meta.l3_off, meta.l4_off, len) {
        Some(0xffff) => {}
        Some(_) => return Some(Ok((Verdict::Drop, discard(vip.id, Outcome::NdBadChecksum)))),
        // Not all in the readable part of the frame: not verified, not answered.
        None => return Some(Err(Outcome::Malformed)),
    }
    let b = match owner_here(pkt, &vip) {
        Ok(b) => b,
        Err(o) => return Some(Ok((Verdict::Drop, o))),
    };
    let eth_in: *const EthHdr = pkt.header(0)?;
    let asker_mac: [u8; 6] = rd(unsafe { &raw const (*eth_in).src });

    // The advertisement, built whole before anything is written. DAD probes come from ::
    // and get their answer on all-nodes, unsolicited.
    let dad = meta.src[0] == 0 && meta.src[1] == 0;
    let dst = if dad { ALL_NODES } else { meta.src };
    let (eth, ip, na) = scratch::<MacPair, Ipv6Hdr, NdMsg>()?;
    unsafe {
        *na = NdMsg {
            icmp_type: ICMPV6_NA,
            code: 0,
            check: 0,
            flags: if dad { NA_OVERRIDE } else { NA_SOLICITED | NA_OVERRIDE },
            target,
            opt_type: 2, // target link-layer address
            opt_len: 1,
            opt_mac: b.mac,
        };
        // The sum is in memory order, so its complement is stored as is.
        (*na).check = !icmpv6_sum_of(target, dst, &*(na as *const [u64; 4]));
        *ip = Ipv6Hdr { ver_tc_flow, payload_len: (size_of::<NdMsg>() as u16).to_be(), next_hdr: IPPROTO_ICMPV6, hop_limit: 255, src: target, dst };
        *eth = MacPair { dst: if dad { [0x33, 0x33, 0, 0, 0, 1] } else { asker_mac }, src: b.mac };
    }

    // Make the frame exactly headers + NA + one option, then write it, the furthest bytes
    // first (see `arp`). Cut but not written, the frame is no solicitation any more: it is
    // dropped, never passed on half-made.
    if !pkt.truncate(meta.l4_off + size_of::<NdMsg>()) {
        return Some(Err(Outcome::Malformed));
    }
    if !pkt.store(meta.l4_off, unsafe { &*na }) {
        return Some(Ok((Verdict::Drop, Outcome::Malformed)));
    }
    pkt.store(meta.l3_off, unsafe { &*ip });
    pkt.store(0, unsafe { &*eth });
    count_reply(vip.id, &b, Outcome::NdReplied);
    Some(Ok((Verdict::Bounce, Outcome::NdReplied)))
}

/// Counts a solicitation for VIP `vip_id` discarded as invalid (`outcome`), returning it.
#[inline(always)]
fn discard(vip_id: u32, outcome: Outcome) -> Outcome {
    if let Some(c) = stats::vip_dir(vip_id, Direction::Ingress) {
        c.dropped += 1;
    }
    outcome
}
