//! Passive TCP RTT of live traffic, per (peer, VIP, NIC): from the handshake (SYN-ACK out,
//! its ACK in) and from sampled data/ACK pairs, one sample in flight per flow, like the
//! kernel's own RTT sampling. Retransmissions of sampled bytes are counted as a loss signal
//! and void their sample (Karn's rule).
//!
//! The per-packet check is two inlined array accesses keyed by a 16-bit flow hash; the
//! LRU map of results is touched once per sample, not per packet. A hash collision costs
//! a sample, never a wrong one: slots carry a 32-bit flow check.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use havip_common::{rtt_bucket, tcp_flow_hash, PassiveStats, PeerKey, VipKey, RTT_BUCKETS};

use crate::{
    maps::{PEER_QUALITY, TCP_SAMPLE_SEQ, TCP_SAMPLE_TIME},
    parse::{rd, Packet, PacketMeta, TcpHdr},
};

/// Sequence, acknowledgement (host order) and flags of a TCP packet, read only when the
/// passive path runs.
#[inline(always)]
fn tcp_fields<P: Packet>(pkt: &P, meta: &PacketMeta) -> Option<(u32, u32, u8)> {
    let tcp: *const TcpHdr = pkt.header(meta.l4_off)?;
    Some((
        u32::from_be(rd(unsafe { &raw const (*tcp).seq })),
        u32::from_be(rd(unsafe { &raw const (*tcp).ack })),
        (rd(unsafe { &raw const (*tcp).doff_flags }) >> 8) as u8,
    ))
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Records one RTT sample or one retransmission for a peer.
#[inline(always)]
fn record(peer: [u64; 2], vip_id: u32, nic_index: u32, rtt_ns: Option<u64>) {
    let key = PeerKey { peer: VipKey::from_words(peer), vip_id, nic_index };
    let apply = |s: &mut PassiveStats| {
        match rtt_ns {
            Some(rtt) => {
                s.samples += 1;
                s.rtt_ewma_ns = if s.rtt_ewma_ns == 0 { rtt } else { s.rtt_ewma_ns - s.rtt_ewma_ns / 8 + rtt / 8 };
                s.last_rtt_ns = rtt;
                let b = rtt_bucket(rtt);
                if b < RTT_BUCKETS {
                    s.rtt_hist[b] += 1;
                }
            }
            None => s.retransmits += 1,
        }
    };
    match PEER_QUALITY.get_ptr_mut(key) {
        Some(p) => apply(unsafe { &mut *p }),
        None => {
            let mut s = PassiveStats::default();
            apply(&mut s);
            // By reference: a by-value copy of the 224-byte value overflows the 512-byte
            // BPF stack in the passive program variant.
            #[allow(clippy::needless_borrows_for_generic_args, reason = "see above")]
            let _ = PEER_QUALITY.insert(key, &s, 0);
        }
    }
}

/// TC egress on the owning NIC, after the remap (`vip_port_be`: the designated port).
/// Compiled only into the `*_passive` program variants, which havipd loads when
/// `[passive] tcp` is on: the plain variants carry none of this cost.
#[inline(always)]
pub fn on_egress<P: Packet>(pkt: &P, meta: &PacketMeta, vip_id: u32, nic_index: u32, vip_port_be: u16) {
    let Some((seq, _, flags)) = tcp_fields(pkt, meta) else { return };
    let synack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let len = meta.payload_len as u32;
    if !synack && len == 0 {
        return;
    }
    let (slot, check) = tcp_flow_hash(meta.dst, vip_id, vip_port_be, meta.dport_be);
    let Some(e) = TCP_SAMPLE_SEQ.get_ptr_mut(slot) else { return };
    let pending = unsafe { *e };
    if pending != 0 && (pending >> 32) as u32 == check {
        // This flow has a sample in flight. A segment starting before its end resends
        // bytes: a retransmission, and the sample can no longer be trusted.
        if !synack && (seq.wrapping_sub(pending as u32) as i32) < 0 {
            unsafe { *e = 0 };
            record(meta.dst, vip_id, nic_index, None);
        }
        return;
    }
    let end = seq.wrapping_add(if synack { 1 } else { len });
    if let Some(t) = TCP_SAMPLE_TIME.get_ptr_mut(slot) {
        unsafe {
            *t = bpf_ktime_get_ns();
            *e = (check as u64) << 32 | end as u64;
        }
    }
}

/// XDP ingress of a VIP's TCP packet (`vip_port_be`: the designated port, before remap).
#[inline(always)]
pub fn on_ingress<P: Packet>(pkt: &P, meta: &PacketMeta, vip_id: u32, nic_index: u32, vip_port_be: u16) {
    let Some((_, ack, flags)) = tcp_fields(pkt, meta) else { return };
    if flags & TCP_ACK == 0 {
        return;
    }
    let (slot, check) = tcp_flow_hash(meta.src, vip_id, vip_port_be, meta.sport_be);
    let Some(e) = TCP_SAMPLE_SEQ.get_ptr_mut(slot) else { return };
    let pending = unsafe { *e };
    if pending == 0 || (pending >> 32) as u32 != check || (ack.wrapping_sub(pending as u32) as i32) < 0 {
        return;
    }
    unsafe { *e = 0 };
    let Some(sent) = TCP_SAMPLE_TIME.get(slot).copied() else { return };
    let now = unsafe { bpf_ktime_get_ns() };
    if sent != 0 && sent < now {
        record(meta.src, vip_id, nic_index, Some(now - sent));
    }
}
