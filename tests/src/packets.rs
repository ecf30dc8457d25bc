//! Test packets built with etherparse (an independent implementation: its checksums are
//! the reference the programs' output is checked against).

use std::net::IpAddr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

/// An Ethernet frame carrying TCP or UDP from `src:sport` to `dst:dport`, optionally with
/// one 802.1Q tag, with correct checksums.
pub fn build(l4: L4, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
    let mut out = Vec::new();
    macro_rules! finish {
        ($ip:expr) => {
            match l4 {
                L4::Tcp => {
                    let b = $ip.tcp(sport, dport, 0x0102_0304, 64240).ack(7).psh();
                    b.write(&mut out, payload).unwrap()
                }
                L4::Udp => $ip.udp(sport, dport).write(&mut out, payload).unwrap(),
            }
        };
    }
    macro_rules! ip {
        ($b:expr) => {
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => finish!($b.ipv4(s.octets(), d.octets(), 64)),
                (IpAddr::V6(s), IpAddr::V6(d)) => finish!($b.ipv6(s.octets(), d.octets(), 64)),
                _ => panic!("mixed address families"),
            }
        };
    }
    match vlan {
        Some(id) => ip!(eth.single_vlan(id.try_into().unwrap())),
        None => ip!(eth),
    }
    out
}

/// Ports and whether the L4 checksum verifies, recomputed by etherparse from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct L4View {
    pub sport: u16,
    pub dport: u16,
    pub checksum: u16,
    pub checksum_ok: bool,
}

pub fn inspect(frame: &[u8]) -> L4View {
    let p = SlicedPacket::from_ethernet(frame).expect("output is not a parseable frame");
    let payload_of = |t: &TransportSlice| -> Vec<u8> {
        match t {
            TransportSlice::Tcp(t) => t.payload().to_vec(),
            TransportSlice::Udp(u) => u.payload().to_vec(),
            _ => panic!("not TCP/UDP"),
        }
    };
    let t = p.transport.as_ref().expect("no transport header");
    let payload = payload_of(t);
    match (p.net.as_ref().unwrap(), t) {
        (NetSlice::Ipv4(ip), TransportSlice::Tcp(tcp)) => {
            let h = tcp.to_header();
            let want = h.calc_checksum_ipv4(&ip.header().to_header(), &payload).unwrap();
            L4View { sport: h.source_port, dport: h.destination_port, checksum: h.checksum, checksum_ok: want == h.checksum }
        }
        (NetSlice::Ipv6(ip), TransportSlice::Tcp(tcp)) => {
            let h = tcp.to_header();
            let want = h.calc_checksum_ipv6(&ip.header().to_header(), &payload).unwrap();
            L4View { sport: h.source_port, dport: h.destination_port, checksum: h.checksum, checksum_ok: want == h.checksum }
        }
        (NetSlice::Ipv4(ip), TransportSlice::Udp(udp)) => {
            let h = udp.to_header();
            // Zero means "no checksum" for UDP over IPv4.
            let ok = h.checksum == 0 || h.calc_checksum_ipv4(&ip.header().to_header(), &payload).unwrap() == h.checksum;
            L4View { sport: h.source_port, dport: h.destination_port, checksum: h.checksum, checksum_ok: ok }
        }
        (NetSlice::Ipv6(ip), TransportSlice::Udp(udp)) => {
            let h = udp.to_header();
            let ok = h.calc_checksum_ipv6(&ip.header().to_header(), &payload).unwrap() == h.checksum;
            L4View { sport: h.source_port, dport: h.destination_port, checksum: h.checksum, checksum_ok: ok }
        }
        _ => panic!("unexpected packet"),
    }
}

/// Offset of the IP header in an Ethernet frame built by [`build`].
pub fn l3_offset(vlan: bool) -> usize {
    if vlan {
        18
    } else {
        14
    }
}

/// An ARP request (who has `target`?) as broadcast on the wire.
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    arp_request_from(CLIENT_MAC, sender, target)
}

pub fn arp_request_from(mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// An ICMP echo request to `dst`.
pub fn icmp_echo(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let mut out = Vec::new();
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64).icmpv4_echo_request(1, 1).write(&mut out, b"ping").unwrap(),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64).icmpv6_echo_request(1, 1).write(&mut out, b"ping").unwrap(),
        _ => panic!("mixed families"),
    }
    out
}

/// Recomputes the IPv4 header checksum of a frame after a test edits the header.
pub fn fix_ipv4_header_checksum(frame: &mut [u8], l3: usize) {
    let ihl = ((frame[l3] & 0x0f) as usize * 4).max(20).min(frame.len() - l3);
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let mut sum = 0u32;
    for c in frame[l3..l3 + ihl].chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// A neighbour solicitation for `target` from `src` (`::` for DAD), to its solicited-node
/// group, with a source link-layer address option unless `with_slla` is false or DAD.
pub fn neighbor_solicitation(src: std::net::Ipv6Addr, target: std::net::Ipv6Addr, with_slla: bool) -> Vec<u8> {
    neighbor_solicitation_from(CLIENT_MAC, src, target, with_slla)
}

pub fn neighbor_solicitation_from(mac: [u8; 6], src: std::net::Ipv6Addr, target: std::net::Ipv6Addr, with_slla: bool) -> Vec<u8> {
    let t = target.octets();
    let dst: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15]];
    let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    if with_slla && !src.is_unspecified() {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&mac);
    }
    let c = icmpv6_checksum(&src.octets(), &dst, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum over pseudo-header and message (checksum field as given).
pub fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(src);
    bytes.extend_from_slice(dst);
    bytes.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 58]);
    bytes.extend_from_slice(msg);
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u64 = bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u64).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP(v6) echo request (`reply` false) or reply from `src` to `dst` with `id`/`seq`,
/// with a correct checksum.
pub fn icmp_echo_with(src: IpAddr, dst: IpAddr, reply: bool, id: u16, seq: u16, ttl: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let b = eth.ipv4(s.octets(), d.octets(), ttl);
            if reply {
                b.icmpv4_echo_reply(id, seq).write(&mut out, b"probe").unwrap()
            } else {
                b.icmpv4_echo_request(id, seq).write(&mut out, b"probe").unwrap()
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let b = eth.ipv6(s.octets(), d.octets(), ttl);
            if reply {
                b.icmpv6_echo_reply(id, seq).write(&mut out, b"probe").unwrap()
            } else {
                b.icmpv6_echo_request(id, seq).write(&mut out, b"probe").unwrap()
            }
        }
        _ => panic!("mixed families"),
    }
    out
}
