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
/// key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
}

impl VipKey {
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

/// What the dataplane knows about a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index into `VIP_STATS`; stable for the VIP's lifetime, also across controller restarts.
    pub id: u32,
    /// The NIC that serves this VIP (0: not bound to one NIC).
    pub nic_ifindex: u32,
    /// `VIP_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
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
    pub _pad: [u8; 2],
    /// Interface name, NUL-padded (IFNAMSIZ).
    pub name: [u8; 16],
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

/// Per-VIP counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipCounters {
    /// Ingress (XDP).
    pub rx: DirCounters,
    /// Egress (TC).
    pub tx: DirCounters,
}

/// Direction a program sees packets in; indexes the outcome counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// What a program did with a packet and why. Counted per direction in `OUTCOMES`.
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
    /// A VIP packet dropped.
    VipDropped = 8,
}

impl Outcome {
    pub const COUNT: u32 = 9;
    pub const ALL: [Outcome; Self::COUNT as usize] = [
        Outcome::NotIp,
        Outcome::NotVip,
        Outcome::Fragment,
        Outcome::Ipv6ExtHeader,
        Outcome::Malformed,
        Outcome::UnsupportedL2,
        Outcome::VipPassed,
        Outcome::VipRemapped,
        Outcome::VipDropped,
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
            Outcome::VipDropped => "vip_dropped",
        }
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
const _: () = assert!(size_of::<NicInfo>() == 24);
const _: () = assert!(size_of::<DirCounters>() == 9 * 8);
const _: () = assert!(size_of::<VipCounters>() == 18 * 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays, with
    // explicit padding fields (the size assertions above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::RemapKey {}
    unsafe impl aya::Pod for super::PortValue {}
    unsafe impl aya::Pod for super::NicInfo {}
    unsafe impl aya::Pod for super::VipCounters {}
}
