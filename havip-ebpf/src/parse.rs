//! Packet parsing: Ethernet with at most one VLAN tag, IPv4 (with options), IPv6 without
//! extension headers, and the TCP/UDP ports. Parsing happens once per packet and fills a
//! [`PacketMeta`]; later stages read offsets from it and never walk headers again.
//!
//! Every header access goes through [`Packet::header`], the one bounds check. Fields are
//! read with single (possibly misaligned) loads: the crate is built with
//! `allows-misaligned-mem-access` (see .cargo/config.toml), which packets permit.

use core::mem::size_of;

use havip_common::{Outcome, VipKey, IPPROTO_TCP, IPPROTO_UDP};

// EtherTypes as they read off the wire with a little-endian load.
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_ARP: u16 = 0x0806u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

/// The furthest from the start of a packet any header havip reads may begin. The deepest
/// read is a UDP probe's sequence quoted in an ICMP error: after Ethernet, VLAN, IPv4 with
/// options, ICMP, the quoted IPv4 with options and UDP, it starts at byte 154 at most.
pub const MAX_HEADER_OFF: usize = 256;

/// A packet buffer: XDP frame or skb linear data.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// True if the whole packet (not only the directly readable part) holds at least
    /// `off + len` bytes. Used to check length fields against reality.
    fn covers(&self, off: usize, len: usize) -> bool;

    /// The one bounds check: a pointer to a `T` at `off`, or `None` if it would run past
    /// the end of the readable data or start beyond [`MAX_HEADER_OFF`].
    ///
    /// The offset bound is what the verifier needs: a packet pointer plus an offset it
    /// knows to be small. It bounds where a header may start, never how long the frame
    /// is, so a 64 KiB frame (generic XDP after GRO, a GSO skb) is read like any other.
    #[inline(always)]
    fn header<T>(&self, off: usize) -> Option<*mut T> {
        if off > MAX_HEADER_OFF {
            return None;
        }
        let start = self.start();
        if start + off + size_of::<T>() > self.end() {
            return None;
        }
        Some((start + off) as *mut T)
    }
}

/// Reads a field of a bounds-checked header (which may sit at any alignment).
#[inline(always)]
pub fn rd<T: Copy>(p: *const T) -> T {
    unsafe { p.read_unaligned() }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub ethertype: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u64; 2],
    pub dst: [u64; 2],
}

/// The part of TCP and UDP headers that holds the ports.
#[repr(C)]
pub struct PortsHdr {
    pub src: u16,
    pub dst: u16,
}

#[repr(C)]
pub struct TcpHdr {
    pub ports: PortsHdr,
    pub seq: u32,
    pub ack: u32,
    /// Data offset (high nibble of the first byte) and flags (second byte), as on the wire.
    pub doff_flags: u16,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub ports: PortsHdr,
    pub len: u16,
    pub check: u16,
}

// Wire layouts: no padding may sneak in.
const _: () = assert!(size_of::<EthHdr>() == 14);
const _: () = assert!(size_of::<VlanHdr>() == 4);
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(size_of::<Ipv6Hdr>() == 40);
const _: () = assert!(size_of::<TcpHdr>() == 20);
const _: () = assert!(size_of::<UdpHdr>() == 8);

/// Offset of the checksum within the TCP and UDP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// What parsing found.
pub enum Parsed {
    Ip(PacketMeta),
    /// An ARP packet whose header starts at `l3_off`.
    Arp { l3_off: usize },
}

/// What later stages need to know about a packet.
pub struct PacketMeta {
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Addresses as [`VipKey`] words (IPv4 mapped).
    pub src: [u64; 2],
    pub dst: [u64; 2],
    pub is_v6: bool,
    pub proto: u8,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// Ports in network byte order (zero unless TCP/UDP).
    pub sport_be: u16,
    pub dport_be: u16,
    /// Bytes of headers up to the end of the L4 header (for GSO byte accounting).
    pub hdr_len: usize,
    /// TCP/UDP payload bytes the headers claim (all segments' for a GSO packet).
    pub payload_len: usize,
}

/// Parses a packet; `Err` carries the outcome for packets havip does not touch.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Result<Parsed, Outcome> {
    let eth: *const EthHdr = pkt.header(0).ok_or(Outcome::NotIp)?;
    let mut ethertype = rd(unsafe { &raw const (*eth).ethertype });
    let mut l3_off = size_of::<EthHdr>();
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let vlan: *const VlanHdr = pkt.header(l3_off).ok_or(Outcome::Malformed)?;
        ethertype = rd(unsafe { &raw const (*vlan).ethertype });
        l3_off += size_of::<VlanHdr>();
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(Outcome::UnsupportedL2);
        }
    }
    if ethertype == ETH_P_IP {
        parse_ipv4(pkt, l3_off).map(Parsed::Ip)
    } else if ethertype == ETH_P_IPV6 {
        parse_ipv6(pkt, l3_off).map(Parsed::Ip)
    } else if ethertype == ETH_P_ARP {
        Ok(Parsed::Arp { l3_off })
    } else {
        Err(Outcome::NotIp)
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P, l3_off: usize) -> Result<PacketMeta, Outcome> {
    let ip: *const Ipv4Hdr = pkt.header(l3_off).ok_or(Outcome::Malformed)?;
    let ver_ihl = rd(unsafe { &raw const (*ip).ver_ihl });
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Err(Outcome::Malformed);
    }
    let tot_len = u16::from_be(rd(unsafe { &raw const (*ip).tot_len })) as usize;
    if tot_len < ihl || !pkt.covers(l3_off, tot_len) {
        return Err(Outcome::Malformed);
    }
    // MF set or a non-zero offset: a fragment. Only the first has ports, and rewriting it
    // alone is not worth the risk: fragments pass untouched.
    if u16::from_be(rd(unsafe { &raw const (*ip).frag_off })) & 0x3fff != 0 {
        return Err(Outcome::Fragment);
    }
    let meta = PacketMeta {
        l3_off,
        src: VipKey::v4_words(rd(unsafe { &raw const (*ip).src })),
        dst: VipKey::v4_words(rd(unsafe { &raw const (*ip).dst })),
        is_v6: false,
        proto: rd(unsafe { &raw const (*ip).proto }),
        l4_off: l3_off + ihl,
        sport_be: 0,
        dport_be: 0,
        hdr_len: l3_off + ihl,
        payload_len: 0,
    };
    parse_l4(pkt, meta, tot_len - ihl)
}

#[inline(always)]
fn is_ipv6_ext_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P, l3_off: usize) -> Result<PacketMeta, Outcome> {
    let ip: *const Ipv6Hdr = pkt.header(l3_off).ok_or(Outcome::Malformed)?;
    if rd(unsafe { &raw const (*ip).ver_tc_flow }) & 0xf0 != 0x60 {
        return Err(Outcome::Malformed);
    }
    let payload_len = u16::from_be(rd(unsafe { &raw const (*ip).payload_len })) as usize;
    if !pkt.covers(l3_off + size_of::<Ipv6Hdr>(), payload_len) {
        return Err(Outcome::Malformed);
    }
    let next = rd(unsafe { &raw const (*ip).next_hdr });
    if is_ipv6_ext_header(next) {
        return Err(Outcome::Ipv6ExtHeader);
    }
    let l4_off = l3_off + size_of::<Ipv6Hdr>();
    let meta = PacketMeta {
        l3_off,
        src: rd(unsafe { &raw const (*ip).src }),
        dst: rd(unsafe { &raw const (*ip).dst }),
        is_v6: true,
        proto: next,
        l4_off,
        sport_be: 0,
        dport_be: 0,
        hdr_len: l4_off,
        payload_len: 0,
    };
    parse_l4(pkt, meta, payload_len)
}

/// Reads the ports of TCP and UDP; `l4_len` is the L4 length the IP header claims.
#[inline(always)]
fn parse_l4<P: Packet>(pkt: &P, mut meta: PacketMeta, l4_len: usize) -> Result<PacketMeta, Outcome> {
    if meta.proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = pkt.header(meta.l4_off).ok_or(Outcome::Malformed)?;
        // Data offset: the top 4 bits of the byte after the acknowledgement number.
        let doff = ((rd(unsafe { &raw const (*tcp).doff_flags }) & 0xf0) >> 2) as usize;
        if doff < size_of::<TcpHdr>() || doff > l4_len {
            return Err(Outcome::Malformed);
        }
        let ports = rd(unsafe { &raw const (*tcp).ports } as *const u32);
        meta.sport_be = ports as u16;
        meta.dport_be = (ports >> 16) as u16;
        meta.hdr_len = meta.l4_off + doff;
        meta.payload_len = l4_len - doff;
    } else if meta.proto == IPPROTO_UDP {
        let udp: *const UdpHdr = pkt.header(meta.l4_off).ok_or(Outcome::Malformed)?;
        let len = u16::from_be(rd(unsafe { &raw const (*udp).len })) as usize;
        if len < size_of::<UdpHdr>() || len > l4_len {
            return Err(Outcome::Malformed);
        }
        let ports = rd(unsafe { &raw const (*udp).ports } as *const u32);
        meta.sport_be = ports as u16;
        meta.dport_be = (ports >> 16) as u16;
        meta.hdr_len = meta.l4_off + size_of::<UdpHdr>();
        meta.payload_len = len - size_of::<UdpHdr>();
    }
    Ok(meta)
}
