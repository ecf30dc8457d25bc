//! Path probes: havipd's ICMP echo requests are timestamped in TC as they leave and their
//! replies in XDP as they arrive, so the RTT is the network's, free of the controller's
//! scheduling. Replies are measured and consumed: no application sees them.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use havip_common::{
    maps::{PROBE_SEQ_WINDOW, PROBE_SLOTS_MAX},
    rtt_bucket, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PROBE_ID_BASE, PROBE_ID_MASK,
    PROBE_KIND_ICMP, PROBE_KIND_TCP, PROBE_KIND_UDP, PROBE_MARK, PROBE_PORT_BASE, RTT_BUCKETS,
};

use crate::{
    maps::{PROBE_SENT, PROBE_SLOTS, PROBE_STATS},
    parse::{rd, Ipv4Hdr, Ipv6Hdr, Packet, PacketMeta, TcpHdr, UdpHdr},
};

/// What a packet is, if it is a probe or a probe's answer.
struct ProbeMatch {
    slot: u32,
    /// Slot in PROBE_SENT of the probe's sequence number.
    index: u32,
    kind: u8,
    /// The port the probe went to (network order; 0 for ICMP echoes).
    port_be: u16,
    /// The probed target (for an answer: who answered; for an ICMP error quoting a probe:
    /// the quoted destination).
    target: [u64; 2],
}

impl ProbeMatch {
    #[inline(always)]
    fn new(slot: u32, seq: u32, kind: u8, port_be: u16, target: [u64; 2]) -> Self {
        Self { slot, index: slot * PROBE_SEQ_WINDOW + seq % PROBE_SEQ_WINDOW, kind, port_be, target }
    }
}

/// A TCP or UDP probe's slot, from its local port (source going out, destination coming
/// back).
#[inline(always)]
fn port_slot(port_be: u16) -> Option<u32> {
    let port = u16::from_be(port_be);
    let slot = port.wrapping_sub(PROBE_PORT_BASE) as u32;
    (port >= PROBE_PORT_BASE && slot < PROBE_SLOTS_MAX).then_some(slot)
}

#[repr(C)]
struct IcmpEcho {
    icmp_type: u8,
    code: u8,
    check: u16,
    id: u16,
    seq: u16,
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// An ICMP echo probe leaving (`outgoing`) or its reply, by its identifier.
#[inline(always)]
fn echo_match<P: Packet>(pkt: &P, meta: &PacketMeta, outgoing: bool) -> Option<ProbeMatch> {
    let echo: *const IcmpEcho = pkt.header(meta.l4_off)?;
    let want = match (meta.proto == IPPROTO_ICMP, outgoing) {
        (true, true) => ICMP_ECHO_REQUEST,
        (true, false) => ICMP_ECHO_REPLY,
        (false, true) => ICMPV6_ECHO_REQUEST,
        (false, false) => ICMPV6_ECHO_REPLY,
    };
    if rd(unsafe { &raw const (*echo).icmp_type }) != want {
        return None;
    }
    let id = u16::from_be(rd(unsafe { &raw const (*echo).id }));
    if id & PROBE_ID_MASK != PROBE_ID_BASE {
        return None;
    }
    let seq = u16::from_be(rd(unsafe { &raw const (*echo).seq })) as u32;
    let target = if outgoing { meta.dst } else { meta.src };
    Some(ProbeMatch::new((id & !PROBE_ID_MASK) as u32, seq, PROBE_KIND_ICMP, 0, target))
}

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A TCP SYN probe leaving, or the SYN-ACK / RST answering it (whose acknowledgement is
/// the probe's sequence + 1).
#[inline(always)]
fn tcp_match<P: Packet>(pkt: &P, meta: &PacketMeta, outgoing: bool) -> Option<ProbeMatch> {
    let (local, remote, target) =
        if outgoing { (meta.sport_be, meta.dport_be, meta.dst) } else { (meta.dport_be, meta.sport_be, meta.src) };
    let slot = port_slot(local)?;
    let tcp: *const TcpHdr = pkt.header(meta.l4_off)?;
    let flags = (rd(unsafe { &raw const (*tcp).doff_flags }) >> 8) as u8;
    let seq = if outgoing {
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return None;
        }
        u32::from_be(rd(unsafe { &raw const (*tcp).seq }))
    } else {
        if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST) == 0 {
            return None;
        }
        u32::from_be(rd(unsafe { &raw const (*tcp).ack })).wrapping_sub(1)
    };
    Some(ProbeMatch::new(slot, seq, PROBE_KIND_TCP, remote, target))
}

/// A UDP probe's sequence: the first 4 bytes of its payload.
#[inline(always)]
fn udp_seq<P: Packet>(pkt: &P, payload_off: usize) -> Option<u32> {
    Some(u32::from_be(rd(pkt.header::<u32>(payload_off)?)))
}

/// A UDP probe leaving, or a UDP reply from the probed port coming back.
#[inline(always)]
fn udp_match<P: Packet>(pkt: &P, meta: &PacketMeta, outgoing: bool) -> Option<ProbeMatch> {
    let (local, remote, target) =
        if outgoing { (meta.sport_be, meta.dport_be, meta.dst) } else { (meta.dport_be, meta.sport_be, meta.src) };
    let slot = port_slot(local)?;
    let seq = udp_seq(pkt, meta.l4_off + core::mem::size_of::<UdpHdr>())?;
    Some(ProbeMatch::new(slot, seq, PROBE_KIND_UDP, remote, target))
}

/// An ICMP / ICMPv6 "port unreachable" quoting a UDP probe: the target's answer to a probe
/// of a closed port.
#[inline(always)]
fn unreachable_match<P: Packet>(pkt: &P, meta: &PacketMeta) -> Option<ProbeMatch> {
    let hdr: *const [u8; 2] = pkt.header(meta.l4_off)?;
    let (t, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    let inner = meta.l4_off + 8;
    let (udp_off, dst) = if meta.proto == IPPROTO_ICMP {
        if (t, code) != (3, 3) {
            return None;
        }
        let ip: *const Ipv4Hdr = pkt.header(inner)?;
        let ihl = (rd(unsafe { &raw const (*ip).ver_ihl }) & 0x0f) as usize * 4;
        if rd(unsafe { &raw const (*ip).proto }) != IPPROTO_UDP || !(20..=60).contains(&ihl) {
            return None;
        }
        (inner + ihl, havip_common::VipKey::v4_words(rd(unsafe { &raw const (*ip).dst })))
    } else {
        if (t, code) != (1, 4) {
            return None;
        }
        let ip: *const Ipv6Hdr = pkt.header(inner)?;
        if rd(unsafe { &raw const (*ip).next_hdr }) != IPPROTO_UDP {
            return None;
        }
        (inner + 40, rd(unsafe { &raw const (*ip).dst }))
    };
    let udp: *const UdpHdr = pkt.header(udp_off)?;
    let slot = port_slot(rd(unsafe { &raw const (*udp).ports.src }))?;
    let seq = udp_seq(pkt, udp_off + core::mem::size_of::<UdpHdr>())?;
    Some(ProbeMatch::new(slot, seq, PROBE_KIND_UDP, rd(unsafe { &raw const (*udp).ports.dst }), dst))
}

/// The probe this packet is (`outgoing`) or answers, by protocol.
#[inline(always)]
fn probe_match<P: Packet>(pkt: &P, meta: &PacketMeta, outgoing: bool) -> Option<ProbeMatch> {
    match meta.proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            echo_match(pkt, meta, outgoing).or_else(|| if outgoing { None } else { unreachable_match(pkt, meta) })
        }
        IPPROTO_TCP => tcp_match(pkt, meta, outgoing),
        IPPROTO_UDP => udp_match(pkt, meta, outgoing),
        _ => None,
    }
}

/// Plain add. core has no atomic read-modify-write for BPF; a slot sees one probe and one
/// reply per interval, so two CPUs updating the same field at once is not expected (and
/// would cost one count, not corrupt anything).
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    unsafe { *p += n };
}

/// TC egress: a probe of havipd (marked by its socket) leaving; records when.
#[inline(always)]
pub fn on_egress<P: Packet>(pkt: &P, meta: &PacketMeta, skb_mark: u32) -> Option<Outcome> {
    if skb_mark != PROBE_MARK {
        return None;
    }
    let ProbeMatch { slot, index, .. } = probe_match(pkt, meta, true)?;
    let sent = PROBE_SENT.get_ptr_mut(index)?;
    unsafe { *sent = bpf_ktime_get_ns() };
    if let Some(st) = PROBE_STATS.get_ptr_mut(slot) {
        add(unsafe { &raw mut (*st).sent }, 1);
    }
    Some(Outcome::ProbeSent)
}

/// Cheap pre-check for the XDP path: could this TCP or UDP packet answer a probe?
#[inline(always)]
pub fn maybe_port_reply(meta: &PacketMeta) -> bool {
    u16::from_be(meta.dport_be) >= PROBE_PORT_BASE
}

/// XDP ingress: the reply to a probe, from the probed target; measures it. `Some` means
/// consume it.
#[inline(always)]
pub fn on_ingress<P: Packet>(pkt: &P, meta: &PacketMeta) -> Option<Outcome> {
    let m = probe_match(pkt, meta, false)?;
    let (slot, index) = (m.slot, m.index);
    let s = PROBE_SLOTS.get(slot)?;
    let target: [u64; 2] = unsafe { core::mem::transmute(s.target) };
    // Only the probed target, for the probe's kind and port, answers a probe.
    if s.active == 0 || target != m.target || s.kind != m.kind || s.port_be != m.port_be {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let sent = PROBE_SENT.get_ptr_mut(index)?;
    let sent_at = unsafe { *sent };
    // A duplicate or a reply beyond the window: consumed, not measured.
    if sent_at == 0 || sent_at > now {
        return Some(Outcome::ProbeReply);
    }
    unsafe { *sent = 0 };
    let rtt = now - sent_at;
    // TTL (IPv4, byte 8) or hop limit (IPv6, byte 7) of the reply.
    let ttl_off = meta.l3_off + if meta.is_v6 { 7 } else { 8 };
    let ttl = pkt.header::<u8>(ttl_off).map(|p| unsafe { *p }).unwrap_or(0) as u64;
    if let Some(st) = PROBE_STATS.get_ptr_mut(slot) {
        unsafe {
            add(&raw mut (*st).received, 1);
            let ewma = (*st).rtt_ewma_ns;
            (*st).rtt_ewma_ns = if ewma == 0 { rtt } else { ewma - ewma / 8 + rtt / 8 };
            (*st).last_rtt_ns = rtt;
            (*st).last_ttl = ttl;
            let b = rtt_bucket(rtt);
            if b < RTT_BUCKETS {
                add((&raw mut (*st).rtt_hist).cast::<u64>().add(b), 1);
            }
        }
    }
    Some(Outcome::ProbeReply)
}
