//! Keys, values and counters of the maps in [`crate::maps`].

use core::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A VIP address. IPv4 is stored as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) so one
/// key type serves both families. 8-aligned so the programs handle it as two words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
}

/// The high word of an IPv4-mapped address in memory order, IPv4 part zero:
/// bytes `00 00 ff ff` then the four address bytes.
pub const V4_MAPPED_HIGH: u64 = 0xffff_0000;

impl VipKey {
    /// The address as two little-endian words, as the programs load it from packets.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        let a = &self.addr;
        let w = |i: usize| u64::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]]);
        [w(0), w(8)]
    }

    #[inline(always)]
    pub fn from_words(w: [u64; 2]) -> Self {
        let (a, b) = (w[0].to_le_bytes(), w[1].to_le_bytes());
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&a);
        addr[8..].copy_from_slice(&b);
        Self { addr }
    }

    /// An IPv4 address given as the little-endian load of its four bytes off the wire.
    #[inline(always)]
    pub fn v4_words(v4_le: u32) -> [u64; 2] {
        [0, V4_MAPPED_HIGH | (v4_le as u64) << 32]
    }

    #[inline(always)]
    pub const fn from_v4_octets(o: [u8; 4]) -> Self {
        Self { addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3]] }
    }

    pub fn to_ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for VipKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::from_v4_octets(v4.octets()),
            IpAddr::V6(v6) => Self { addr: v6.octets() },
        }
    }
}

impl From<Ipv4Addr> for VipKey {
    fn from(ip: Ipv4Addr) -> Self {
        Self::from_v4_octets(ip.octets())
    }
}

/// What the dataplane knows about a VIP. Which NIC owns it is in `BINDINGS`, not here:
/// one place holds ownership.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index into `VIP_STATS` and `BINDINGS`; stable for the VIP's lifetime, also across
    /// controller restarts.
    pub id: u32,
    /// `VIP_PORT_CLASSES`.
    pub flags: u32,
    /// The VIP's default application class (`CLASSES` index, 0: none).
    pub class: u32,
    /// `CLASS_STATS` index of (this VIP, `class`); unused without a class.
    pub class_stats: u32,
}

/// Which NIC owns a VIP on the wire: answers ARP/NDP for it and carries its traffic.
/// Written by havipd (binding, failover, failback, operator), read by both programs.
/// Kept in `BINDINGS` as a [`crate::Versioned`] value, so a packet racing a move sees the
/// old binding or the new one whole, never the ifindex of one with the MAC of the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Binding {
    /// The owning NIC; 0 when no candidate NIC is usable.
    pub ifindex: u32,
    /// The NIC's index into `NIC_STATS`.
    pub nic_index: u32,
    /// The NIC's MAC: the source of ARP/NDP answers.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) time of the bind, for the binding's age.
    pub bound_at_ns: u64,
    /// How often the VIP moved between NICs.
    pub moves: u64,
}

/// Per-NIC counters of VIP traffic, one slot per CPU, indexed by `NicInfo::index`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct NicCounters {
    /// VIP packets received while this NIC owned the VIP.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// VIP packets that left through this NIC (steered ones included).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// ARP replies and neighbour advertisements this NIC sent for VIPs.
    pub arp_replies: u64,
    pub nd_replies: u64,
}

/// The slot of `VIP_SLOTS` a VIP lives in: Fibonacci hashing of the address words. The
/// same function runs in the kernel and in havipd, so both agree on where to look.
#[inline(always)]
pub fn vip_slot(key: &VipKey) -> u32 {
    vip_slot_words(key.words())
}

/// [`vip_slot`] of an address given as words (see [`VipKey::words`]).
#[inline(always)]
pub fn vip_slot_words(w: [u64; 2]) -> u32 {
    let x = (w[0] ^ w[1]) as u32 ^ ((w[0] ^ w[1]) >> 32) as u32;
    x.wrapping_mul(0x9e37_79b1) >> (32 - crate::maps::VIP_SLOTS_BITS)
}

/// Mappings kept inline in a slot, per direction.
pub const INLINE_REMAPS: usize = 4;

/// One inline mapping: (proto, from port) -> to port, ports in network byte order.
/// Exactly one aligned 8-byte word, read by the programs with a single load: a packet that
/// races a reload sees each mapping either old or new, never half of each.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InlineRemap {
    pub from_be: u16,
    pub to_be: u16,
    /// 0: empty (entries are packed: the first empty one ends the list).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `VipSlot::flags`
pub const SLOT_OWNED: u32 = 1;
/// Another VIP hashes to this slot too: on an address mismatch, consult `VIPS`.
pub const SLOT_SHARED: u32 = 2;
/// The owner has more ingress mappings than fit inline: consult `REMAP_IN` after them.
pub const SLOT_IN_OVERFLOW: u32 = 4;
/// The same for egress and `REMAP_OUT`.
pub const SLOT_OUT_OVERFLOW: u32 = 8;

/// A slot of the fast-path array, kept in `VIP_SLOTS` as a [`crate::Versioned`] value: a
/// packet racing a rewrite sees the old slot or the new one whole (key, info, flags and
/// mappings of one version).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    /// The VIP owning the slot (valid if `SLOT_OWNED`).
    pub key: VipKey,
    pub info: VipInfo,
    pub flags: u32,
    pub _pad: u32,
    pub remap_in: [InlineRemap; INLINE_REMAPS],
    pub remap_out: [InlineRemap; INLINE_REMAPS],
}

/// skb mark of havipd's probe sockets (SO_MARK): tells the TC program a packet is a probe.
pub const PROBE_MARK: u32 = 0x4856_5052;
/// ICMP echo identifiers of probes: `PROBE_ID_BASE | slot`, slot < `PROBE_SLOTS_MAX`.
pub const PROBE_ID_BASE: u16 = 0xa000;
pub const PROBE_ID_MASK: u16 = 0xf000;
/// TCP SYN and UDP probes leave from `PROBE_PORT_BASE + slot` (61440-65535: outside
/// Linux's default ephemeral range, 32768-60999). A TCP probe's reply is the SYN-ACK or
/// RST; a UDP probe's is a UDP reply from the probed port or the target's ICMP port
/// unreachable quoting the probe. UDP probes carry their sequence in the first 4 bytes.
pub const PROBE_PORT_BASE: u16 = 0xf000;
/// `ProbeSlot::kind`
pub const PROBE_KIND_ICMP: u8 = 0;
pub const PROBE_KIND_TCP: u8 = 1;
pub const PROBE_KIND_UDP: u8 = 2;
/// Log2 RTT histogram buckets: bucket i counts RTTs in [2^i, 2^(i+1)) µs (bucket 0: < 2 µs).
pub const RTT_BUCKETS: usize = 24;

/// One measured path: probes from `ifindex`'s own address to `target`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbeSlot {
    pub target: VipKey,
    pub ifindex: u32,
    /// 1 when the slot is in use.
    pub active: u32,
    /// TCP SYN / UDP probes: the target's port (network order); 0 for ICMP echo probes.
    pub port_be: u16,
    /// `PROBE_KIND_*`
    pub kind: u8,
    pub _pad: [u8; 5],
}

/// What the kernel measured on a path. Probes and replies are rare (one each per probe
/// interval), so plain updates are exact in practice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ProbeStats {
    pub sent: u64,
    pub received: u64,
    /// Exponentially weighted moving average of the RTT (weight 1/8), ns.
    pub rtt_ewma_ns: u64,
    pub last_rtt_ns: u64,
    /// TTL / hop limit of the last reply (hops = initial TTL - this).
    pub last_ttl: u64,
    pub rtt_hist: [u64; RTT_BUCKETS],
}

/// A peer of a VIP as seen through one NIC (passive TCP measurement).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PeerKey {
    pub peer: VipKey,
    pub vip_id: u32,
    pub nic_index: u32,
}

/// Passive TCP quality of a (peer, VIP, NIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct PassiveStats {
    /// RTT samples (handshakes and data/ACK pairs).
    pub samples: u64,
    pub rtt_ewma_ns: u64,
    pub last_rtt_ns: u64,
    /// Segments resent while sampled (Karn: their sample is dropped): a loss signal.
    pub retransmits: u64,
    pub rtt_hist: [u64; RTT_BUCKETS],
}

/// The flow hash (slot in the TCP sample arrays) and a 32-bit check of a TCP flow of a
/// VIP, from either direction: the peer's address words, the VIP id, the VIP's designated
/// port and the peer's port (network order, as in the packet).
#[inline(always)]
pub fn tcp_flow_hash(peer: [u64; 2], vip_id: u32, vip_port_be: u16, peer_port_be: u16) -> (u32, u32) {
    // A 32-bit fold of the flow is its check; one multiply spreads it into a 16-bit slot.
    let p = peer[0] ^ peer[1];
    let x = (p ^ (p >> 32)) as u32 ^ (vip_id << 24) ^ ((vip_port_be as u32) << 16 | peer_port_be as u32);
    (x.wrapping_mul(0x9e37_79b1) >> 16, x | 1) // a check is never 0: 0 marks a free slot
}

/// Key of both remap tables: on ingress `port` is the designated port, on egress the
/// instance port. Ports are in network byte order, as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemapKey {
    pub vip_id: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl RemapKey {
    #[inline(always)]
    pub const fn new(vip_id: u32, proto: u8, port_be: u16) -> Self {
        Self { vip_id, port_be, proto, _pad: 0 }
    }
}

/// The port a remap table rewrites to, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortValue {
    pub port_be: u16,
    pub _pad: u16,
}

/// A NIC havip runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NicInfo {
    pub mac: [u8; 6],
    /// The [`IngressHook`] its ingress program runs on (0: not recorded).
    pub hook: u8,
    /// Why that hook ([`HookReason`]).
    pub hook_reason: u8,
    /// Interface name, NUL-padded (IFNAMSIZ).
    pub name: [u8; 16],
    /// Index into `NIC_STATS`.
    pub index: u32,
    pub _pad2: u32,
}

/// Counters of one direction of one VIP. Bytes are L2 frame bytes as seen by the program
/// (for a GSO packet at egress: what the segments will put on the wire).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct DirCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Port rewritten (designated -> instance on ingress, instance -> designated on egress).
    pub remapped: u64,
    /// Left untouched (no mapping, ICMP, ...).
    pub passed: u64,
    /// Dropped by havip, not counted in `packets`. Ingress: neighbour solicitations for the
    /// VIP discarded as invalid (outcomes `nd_hop_limit`, `nd_bad_checksum`). Egress:
    /// packets from the VIP that may not or cannot leave (`fenced`, `steer_failed`). ARP
    /// and ND requests not answered because another NIC or node serves the VIP are
    /// `WireCounters::neigh_dropped` instead, the normal lot of a non-owner.
    pub dropped: u64,
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    pub other: u64,
}

impl DirCounters {
    pub fn add(&mut self, o: &DirCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.remapped += o.remapped;
        self.passed += o.passed;
        self.dropped += o.dropped;
        self.tcp += o.tcp;
        self.udp += o.udp;
        self.icmp += o.icmp;
        self.other += o.other;
    }
}

impl NicCounters {
    pub fn add(&mut self, o: &NicCounters) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.arp_replies += o.arp_replies;
        self.nd_replies += o.nd_replies;
    }
}

/// How a VIP's ownership played out on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct WireCounters {
    /// Packets for the VIP that arrived on a NIC that does not own it (stale caches during
    /// a move): accepted, not dropped.
    pub misdirected: u64,
    /// Packets from the VIP that routing sent out of another NIC, redirected to the owner.
    pub steered: u64,
    /// ARP requests / neighbour solicitations answered by the owning NIC.
    pub arp_replies: u64,
    pub nd_replies: u64,
    /// ARP requests / neighbour solicitations for the VIP dropped on non-owning NICs, and
    /// on a node that does not serve the (cluster) VIP now.
    pub neigh_dropped: u64,
}

impl WireCounters {
    pub fn add(&mut self, o: &WireCounters) {
        self.misdirected += o.misdirected;
        self.steered += o.steered;
        self.arp_replies += o.arp_replies;
        self.nd_replies += o.nd_replies;
        self.neigh_dropped += o.neigh_dropped;
    }
}

/// Per-VIP counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipCounters {
    /// Ingress (XDP).
    pub rx: DirCounters,
    /// Egress (TC).
    pub tx: DirCounters,
    pub wire: WireCounters,
}

/// Direction a program sees packets in; indexes the outcome counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// What a program did with a packet and why. Counted per direction in `OUTCOMES`, once per
/// packet. Every packet a program drops (`XDP_DROP`, `TC_ACT_SHOT`; none returns
/// `XDP_ABORTED`) is counted under one of the outcomes for which [`Outcome::is_drop`] is
/// true, which name the reason; no other outcome drops.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    NotIp = 0,
    /// IP, but neither address of interest is a VIP: passed.
    NotVip = 1,
    /// An IPv4 fragment: passed untouched.
    Fragment = 2,
    /// IPv6 with an extension header: passed untouched.
    Ipv6ExtHeader = 3,
    /// Truncated or inconsistent headers (bad IHL, lengths beyond the packet): passed untouched.
    Malformed = 4,
    /// More than one VLAN tag: passed untouched.
    UnsupportedL2 = 5,
    /// A VIP packet left as it was (no mapping for its port, or not TCP/UDP).
    VipPassed = 6,
    /// A VIP packet whose port was rewritten.
    VipRemapped = 7,
    /// Dropped (egress): a VIP packet leaving by a NIC that does not own the VIP, whose
    /// owning NIC no longer exists (deleted while the binding still names it), so it
    /// cannot be redirected there. The kernel would drop the redirect anyway, uncounted.
    SteerFailed = 8,
    /// An ARP request for a VIP, answered by its owning NIC (XDP_TX).
    ArpReplied = 9,
    /// A neighbour solicitation for a VIP, answered by its owning NIC (XDP_TX).
    NdReplied = 10,
    /// Dropped: an ARP request / neighbour solicitation for a VIP on a NIC that does not
    /// own it.
    NeighDropped = 11,
    /// A VIP packet redirected to the NIC that owns the VIP.
    Steered = 12,
    /// A probe of havipd leaving (timestamped).
    ProbeSent = 13,
    /// Dropped: a reply to a probe (timestamped, measured and consumed).
    ProbeReply = 14,
    /// Dropped: a cluster VIP this node does not serve now (its fence's serve-until time
    /// passed): ARP/ND requests for it are dropped, packets sourced from it are dropped on
    /// egress.
    Fenced = 15,
    /// Dropped: a neighbour solicitation for a VIP whose IPv6 hop limit is not 255. It was
    /// forwarded by a router, so it did not come from the link; RFC 4861 7.1.1 says to
    /// discard it silently, and havip, answering for the VIP, does.
    NdHopLimit = 16,
    /// Dropped: a neighbour solicitation for a VIP whose ICMPv6 checksum does not verify
    /// (RFC 4861 7.1.1: discarded, not answered).
    NdBadChecksum = 17,
}

impl Outcome {
    pub const COUNT: u32 = 18;
    pub const ALL: [Outcome; Self::COUNT as usize] = [
        Outcome::NotIp,
        Outcome::NotVip,
        Outcome::Fragment,
        Outcome::Ipv6ExtHeader,
        Outcome::Malformed,
        Outcome::UnsupportedL2,
        Outcome::VipPassed,
        Outcome::VipRemapped,
        Outcome::SteerFailed,
        Outcome::ArpReplied,
        Outcome::NdReplied,
        Outcome::NeighDropped,
        Outcome::Steered,
        Outcome::ProbeSent,
        Outcome::ProbeReply,
        Outcome::Fenced,
        Outcome::NdHopLimit,
        Outcome::NdBadChecksum,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Outcome::NotIp => "not_ip",
            Outcome::NotVip => "not_vip",
            Outcome::Fragment => "fragment",
            Outcome::Ipv6ExtHeader => "ipv6_ext_header",
            Outcome::Malformed => "malformed",
            Outcome::UnsupportedL2 => "unsupported_l2",
            Outcome::VipPassed => "vip_passed",
            Outcome::VipRemapped => "vip_remapped",
            Outcome::SteerFailed => "steer_failed",
            Outcome::ArpReplied => "arp_replied",
            Outcome::NdReplied => "nd_replied",
            Outcome::NeighDropped => "neigh_dropped",
            Outcome::Steered => "steered",
            Outcome::ProbeSent => "probe_sent",
            Outcome::ProbeReply => "probe_reply",
            Outcome::Fenced => "fenced",
            Outcome::NdHopLimit => "nd_hop_limit",
            Outcome::NdBadChecksum => "nd_bad_checksum",
        }
    }

    /// True for the outcomes of packets havip dropped (the outcome is the reason).
    pub const fn is_drop(self) -> bool {
        matches!(self, Outcome::SteerFailed | Outcome::NeighDropped | Outcome::ProbeReply | Outcome::Fenced | Outcome::NdHopLimit | Outcome::NdBadChecksum)
    }

    #[inline(always)]
    pub const fn index(self, dir: Direction) -> u32 {
        dir as u32 * Self::COUNT + self as u32
    }
}

// The layouts are the contract with the kernel side: no implicit padding, fixed sizes.
const _: () = assert!(size_of::<VipKey>() == 16);
const _: () = assert!(size_of::<VipInfo>() == 16);
const _: () = assert!(size_of::<RemapKey>() == 8);
const _: () = assert!(size_of::<PortValue>() == 4);
const _: () = assert!(size_of::<NicInfo>() == 32);
const _: () = assert!(size_of::<Binding>() == 32);
const _: () = assert!(size_of::<NicCounters>() == 6 * 8);
const _: () = assert!(size_of::<WireCounters>() == 5 * 8);
const _: () = assert!(size_of::<InlineRemap>() == 8);
const _: () = assert!(size_of::<ProbeSlot>() == 32);
const _: () = assert!(size_of::<PeerKey>() == 24);
const _: () = assert!(size_of::<PassiveStats>() == (4 + RTT_BUCKETS) * 8);
const _: () = assert!(size_of::<ProbeStats>() == (5 + RTT_BUCKETS) * 8);
const _: () = assert!(size_of::<VipSlot>() == 16 + 16 + 8 + 2 * 8 * INLINE_REMAPS);
const _: () = assert!(size_of::<DirCounters>() == 9 * 8);
const _: () = assert!(size_of::<VipCounters>() == 23 * 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays, with
    // explicit padding fields (the size assertions above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::VipSlot {}
    unsafe impl aya::Pod for super::RemapKey {}
    unsafe impl aya::Pod for super::PortValue {}
    unsafe impl aya::Pod for super::NicInfo {}
    unsafe impl aya::Pod for super::VipCounters {}
    unsafe impl aya::Pod for super::Binding {}
    unsafe impl aya::Pod for super::NicCounters {}
    unsafe impl aya::Pod for super::ProbeSlot {}
    unsafe impl aya::Pod for super::ProbeStats {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PassiveStats {}
}

/// The RTT below which a fraction `q` of the samples fell, from a log2 histogram (upper
/// edge of the bucket, µs); `None` without samples.
pub fn hist_quantile_us(hist: &[u64; RTT_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    // ceil(q * total), at least 1 (no f64::ceil in core).
    let x = q * total as f64;
    let want = ((x as u64) + u64::from((x as u64 as f64) < x)).max(1);
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some((1u64 << (i + 1)) as f64);
        }
    }
    None
}

/// Routers on the way back, from a reply's TTL / hop limit: the distance to the nearest
/// common initial value (64, 128, 255) at or above it.
pub fn hops_from_ttl(ttl: u64) -> u64 {
    [64u64, 128, 255].into_iter().find(|i| *i >= ttl).unwrap_or(255) - ttl.min(255)
}

impl ProbeStats {
    /// See [`hist_quantile_us`].
    pub fn rtt_quantile_us(&self, q: f64) -> Option<f64> {
        hist_quantile_us(&self.rtt_hist, q)
    }

    /// Probes without a reply, as a fraction of those sent (in-flight ones excluded by
    /// the caller's choice of snapshot).
    pub fn loss(&self) -> Option<f64> {
        (self.sent > 0).then(|| 1.0 - (self.received.min(self.sent) as f64 / self.sent as f64))
    }
}

/// The log2 bucket of an RTT in ns.
#[inline(always)]
pub fn rtt_bucket(rtt_ns: u64) -> usize {
    let us = rtt_ns / 1000;
    if us < 2 {
        return 0;
    }
    let b = (63 - us.leading_zeros()) as usize;
    if b >= RTT_BUCKETS { RTT_BUCKETS - 1 } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_buckets_and_quantiles() {
        assert_eq!(rtt_bucket(500), 0);
        assert_eq!(rtt_bucket(3_000), 1);
        assert_eq!(rtt_bucket(20_000_000), 14); // 20 ms: [16384, 32768) µs
        let mut s = ProbeStats::default();
        s.rtt_hist[rtt_bucket(300_000)] = 90; // 0.3 ms
        s.rtt_hist[rtt_bucket(20_000_000)] = 10;
        assert_eq!(s.rtt_quantile_us(0.5), Some(512.0));
        assert_eq!(s.rtt_quantile_us(0.99), Some(32768.0));
        s.sent = 10;
        s.received = 7;
        assert!((s.loss().unwrap() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn words_roundtrip_and_v4_layout() {
        let k = VipKey::from(Ipv4Addr::new(198, 18, 100, 1));
        assert_eq!(VipKey::from_words(k.words()), k);
        assert_eq!(k.words(), VipKey::v4_words(u32::from_le_bytes([198, 18, 100, 1])));
        let k6 = VipKey::from("2001:db8::1".parse::<Ipv6Addr>().unwrap().to_canonical());
        assert_eq!(VipKey::from_words(k6.words()), k6);
        assert_eq!(vip_slot(&k6), vip_slot_words(k6.words()));
    }
}

/// Where a NIC's ingress program runs (see `kernel::ingress_hook` in havip-user).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressHook {
    XdpNative = 1,
    XdpGeneric = 2,
    Tc = 3,
}

impl IngressHook {
    pub fn from_u8(v: u8) -> Option<Self> {
        [Self::XdpNative, Self::XdpGeneric, Self::Tc].into_iter().find(|h| *h as u8 == v)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

/// Why a NIC's ingress runs where it does.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookReason {
    /// `[node] xdp_mode` names the hook.
    Configured = 1,
    /// A NIC with its own driver: native XDP runs before any skb is built.
    DriverNic = 2,
    /// A virtual NIC (veth, ...): TC keeps its full speed, XDP does not.
    VirtualNic = 3,
    /// A virtual NIC where classes have CPU queues, which only XDP can feed (native: a
    /// generic redirect loses the frame's class on the way).
    VirtualNicCpuQueues = 4,
    /// The driver refused native XDP.
    NativeRefused = 5,
}

impl HookReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        [Self::Configured, Self::DriverNic, Self::VirtualNic, Self::VirtualNicCpuQueues, Self::NativeRefused].into_iter().find(|r| *r as u8 == v)
    }
    /// One line for logs and `havip stats`.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Configured => "set by node.xdp_mode",
            Self::DriverNic => "NIC with a driver: native XDP runs before any skb is built",
            Self::VirtualNic => "virtual NIC: XDP halves veth throughput (native) or copies large packets (generic); TC does neither",
            Self::VirtualNicCpuQueues => "virtual NIC whose classes have CPU queues, which only native XDP feeds with the class intact",
            Self::NativeRefused => "the driver refused native XDP",
        }
    }
}
