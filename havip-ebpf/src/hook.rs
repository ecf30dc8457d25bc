//! The two hooks havip's ingress runs on, behind one trait: XDP (native or generic) and a
//! TC ingress program. The per-packet logic (`ingress`, `neigh`, `remap`, `probe`) is
//! written once against [`Hook`]; only how a packet is read, written, resized and sent on
//! differs, and lives here. Why two hooks: on veth and other virtual NICs native XDP costs
//! about half the throughput and generic XDP copies every large packet to linearize it,
//! while a TC program sees the skb as it is (see the README, "Which hook").
//!
//! The TC side never writes packet memory directly. A program that does gets a prologue
//! from the verifier that un-clones every cloned skb before the program runs, and TCP's
//! packets over veth are clones (the sender keeps the original for retransmission): every
//! packet would pay for a copy of its header. Writes go through `bpf_skb_store_bytes`,
//! which copies only where it writes.

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::{TcContext, XdpContext},
};
use havip_common::{ClassInfo, Outcome};

use crate::{
    classes,
    parse::{self, Packet, PacketMeta, Parsed},
    remap,
};

/// What to do with a packet, whichever hook it arrived on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// On to the kernel's stack.
    Pass,
    Drop,
    /// A reply was built in its place: send it back out of the NIC it came in on.
    Bounce,
    /// Redirected into a class's CPU queue (XDP only). No payload on purpose: a variant
    /// with one leaves its bits undefined in the others, and the compiler may then fill
    /// them from any register, a pointer included, which the verifier refuses to shift.
    Queued,
}

/// One ingress packet on its hook: read through [`Packet`] (the one bounds check), written
/// and resized through these methods.
pub trait Hook: Packet {
    /// Parses the packet (TC first pulls headers into the linear part if they are not).
    fn parse(&self) -> Result<Parsed, Outcome>;
    /// The NIC the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Packets and wire bytes this one stands for (a GSO skb is many segments on the wire).
    fn wire_count(&self, meta: &PacketMeta) -> (u64, u64);
    /// Writes `v` at `off`. False if it could not (nothing written).
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool;
    /// Cuts the packet to `len` bytes (read pointers are invalid afterwards).
    fn truncate(&self, len: usize) -> bool;
    /// Rewrites the destination port to `new_be`, the L4 checksum with it, or nothing.
    fn rewrite_dport(&self, meta: &PacketMeta, new_be: u16) -> bool;
    /// Hands the packet to one of the class's CPU queues, if the hook can and the class has
    /// any (only XDP can: the cpumap takes XDP frames): `Queued`, else `Pass` (process it
    /// here).
    fn to_cpu_queue(&self, meta: &PacketMeta, class: u32, info: *const ClassInfo) -> Verdict;
}

/// An XDP frame.
///
/// Frames of any size up to 64 KiB are handled alike: generic XDP sees skbs that large
/// (GSO packets and packets merged by GRO on an earlier device, which arrive whole, for
/// example over veth; GRO on the device itself is skipped while generic XDP is attached),
/// linear (the programs are not loaded with `xdp.frags`, so the kernel linearizes the skb
/// first; native drivers refuse to attach them where an MTU needs multi-buffer frames). A
/// multi-buffer frame (only BPF_PROG_RUN makes one for a program like this, for input over
/// a page) is handled too: lengths are checked against the whole frame, headers are read
/// from its linear part, and headers that are not all in the linear part make the frame
/// `Malformed`, passed untouched.
pub struct XdpPacket<'a>(pub &'a XdpContext);

impl XdpPacket<'_> {
    /// Bytes of the whole frame, fragments included (a helper call: only for frames whose
    /// linear part does not hold what the headers claim).
    #[inline(always)]
    fn whole_len(&self) -> usize {
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as usize }
    }

    pub fn action(v: Verdict) -> u32 {
        match v {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            Verdict::Bounce => xdp_action::XDP_TX,
            Verdict::Queued => xdp_action::XDP_REDIRECT,
        }
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

impl Hook for XdpPacket<'_> {
    #[inline(always)]
    fn parse(&self) -> Result<Parsed, Outcome> {
        parse::parse(self)
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    /// The linear part, or the whole frame when the IP packet runs on into fragments.
    #[inline(always)]
    fn wire_count(&self, meta: &PacketMeta) -> (u64, u64) {
        let linear = self.end() - self.start();
        let bytes = if meta.hdr_len + meta.payload_len <= linear { linear } else { self.whole_len() };
        (1, bytes as u64)
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool {
        match self.header::<T>(off) {
            Some(p) => {
                unsafe { p.write_unaligned(*v) };
                true
            }
            None => false,
        }
    }
    /// The length comes from a helper, not from `end - start`: the compiler reassociates
    /// `len - (end - start)` into arithmetic on the end pointer, which the verifier refuses.
    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        let have = self.whole_len();
        unsafe { bpf_xdp_adjust_tail(self.0.ctx, len as i32 - have as i32) == 0 }
    }
    #[inline(always)]
    fn rewrite_dport(&self, meta: &PacketMeta, new_be: u16) -> bool {
        remap::rewrite_dport_xdp(self, meta, new_be)
    }
    #[inline(always)]
    fn to_cpu_queue(&self, meta: &PacketMeta, class: u32, info: *const ClassInfo) -> Verdict {
        if classes::to_cpu_queue(self.0, meta, class, info) {
            Verdict::Queued
        } else {
            Verdict::Pass
        }
    }
}

/// An skb (TC ingress or egress); direct access covers only its linear part, lengths are
/// checked against skb->len.
pub struct SkbPacket<'a>(pub &'a TcContext);

/// Headers we may need in the linear area: Ethernet + VLAN + IPv4 with options + TCP.
const MAX_HEADERS: u32 = 14 + 4 + 60 + 60;

impl SkbPacket<'_> {
    pub fn action(&self, v: Verdict) -> i32 {
        match v {
            Verdict::Pass | Verdict::Queued => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
            // Out of the egress of the NIC it came in on (TC_ACT_REDIRECT).
            Verdict::Bounce => unsafe { bpf_redirect(self.ingress_ifindex(), 0) as i32 },
        }
    }
}

impl Packet for SkbPacket<'_> {
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
        off + len <= self.0.len() as usize
    }
}

impl Hook for SkbPacket<'_> {
    #[inline(always)]
    fn parse(&self) -> Result<Parsed, Outcome> {
        match parse::parse(self) {
            // Headers may sit partly outside the linear area: pull them in and try once
            // more. (Only then: pulling un-clones a cloned skb.)
            Err(Outcome::Malformed) => {
                let want = core::cmp::min(self.0.len(), MAX_HEADERS);
                self.0.pull_data(want).map_err(|_| Outcome::Malformed)?;
                parse::parse(self)
            }
            other => other,
        }
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.0.skb.skb).ingress_ifindex }
    }
    /// A GSO packet is several segments on the wire, each with its own headers.
    #[inline(always)]
    fn wire_count(&self, meta: &PacketMeta) -> (u64, u64) {
        let segs = unsafe { (*self.0.skb.skb).gso_segs } as u64;
        let segs = if segs == 0 { 1 } else { segs };
        (segs, self.0.len() as u64 + (segs - 1) * meta.hdr_len as u64)
    }
    /// Keeps a complete receive checksum (`skb->csum`) in step with the bytes written.
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool {
        self.0.store(off, v, BPF_F_RECOMPUTE_CSUM as u64).is_ok()
    }
    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        unsafe { bpf_skb_change_tail(self.0.skb.skb as *mut _, len as u32, 0) == 0 }
    }
    #[inline(always)]
    fn rewrite_dport(&self, meta: &PacketMeta, new_be: u16) -> bool {
        remap::rewrite_port_tc(self.0, meta, remap::Side::Destination, new_be)
    }
    #[inline(always)]
    fn to_cpu_queue(&self, _meta: &PacketMeta, _class: u32, _info: *const ClassInfo) -> Verdict {
        Verdict::Pass
    }
}
