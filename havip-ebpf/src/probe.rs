//! Path probes: havipd's ICMP echo requests are timestamped in TC as they leave and their
//! replies in XDP as they arrive, so the RTT is the network's, free of the controller's
//! scheduling. Replies are measured and consumed: no application sees them.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use havip_common::{
    maps::PROBE_SEQ_WINDOW, rtt_bucket, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, PROBE_ID_BASE, PROBE_ID_MASK,
    PROBE_MARK, RTT_BUCKETS,
};

use crate::{
    maps::{PROBE_SENT, PROBE_SLOTS, PROBE_STATS},
    parse::{rd, Packet, PacketMeta},
};

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

/// The probe slot and in-flight index of an echo, if its identifier is a probe's.
#[inline(always)]
fn slot_and_index<P: Packet>(pkt: &P, meta: &PacketMeta, want_v4: u8, want_v6: u8) -> Option<(u32, u32)> {
    if meta.proto != IPPROTO_ICMP && meta.proto != IPPROTO_ICMPV6 {
        return None;
    }
    let echo: *const IcmpEcho = pkt.header(meta.l4_off)?;
    let t = rd(unsafe { &raw const (*echo).icmp_type });
    let want = if meta.proto == IPPROTO_ICMP { want_v4 } else { want_v6 };
    if t != want {
        return None;
    }
    let id = u16::from_be(rd(unsafe { &raw const (*echo).id }));
    if id & PROBE_ID_MASK != PROBE_ID_BASE {
        return None;
    }
    let slot = (id & !PROBE_ID_MASK) as u32;
    let seq = u16::from_be(rd(unsafe { &raw const (*echo).seq })) as u32;
    Some((slot, slot * PROBE_SEQ_WINDOW + seq % PROBE_SEQ_WINDOW))
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
    let (slot, index) = slot_and_index(pkt, meta, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST)?;
    let sent = PROBE_SENT.get_ptr_mut(index)?;
    unsafe { *sent = bpf_ktime_get_ns() };
    if let Some(st) = PROBE_STATS.get_ptr_mut(slot) {
        add(unsafe { &raw mut (*st).sent }, 1);
    }
    Some(Outcome::ProbeSent)
}

/// XDP ingress: the reply to a probe, from the probed target; measures it. `Some` means
/// consume it.
#[inline(always)]
pub fn on_ingress<P: Packet>(pkt: &P, meta: &PacketMeta) -> Option<Outcome> {
    let (slot, index) = slot_and_index(pkt, meta, ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY)?;
    let s = PROBE_SLOTS.get(slot)?;
    let target: [u64; 2] = unsafe { core::mem::transmute(s.target) };
    if s.active == 0 || target != meta.src {
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
