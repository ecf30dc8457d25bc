//! Is an address already in use on a link? Before a generated VIP is first used, the node
//! it is assigned to asks the link: an ARP probe for IPv4 (RFC 5227: a request from
//! 0.0.0.0, so nobody's cache learns anything) and duplicate address detection for IPv6
//! (RFC 4862: a neighbour solicitation from ::). Any ARP packet whose sender is the
//! address, or any neighbour advertisement for it, means someone else holds it.
//!
//! The timing is shorter than the RFCs' (3 probes 100 ms apart, then 200 ms of listening,
//! instead of 1-2 s between probes): the address is not in use by this node yet, so a
//! slow answer only costs the address a later check, never a conflict on the wire.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::bail;
use havip_common::csum;

pub const PROBES: u32 = 3;
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
pub const LISTEN_AFTER: Duration = Duration::from_millis(200);

/// An ARP probe for `addr` from `mac` (sender address 0.0.0.0), broadcast.
pub fn arp_probe(mac: [u8; 6], addr: Ipv4Addr) -> Vec<u8> {
    super::announce::arp_request(mac, Ipv4Addr::UNSPECIFIED, addr)
}

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | o[13] as u16, (o[14] as u16) << 8 | o[15] as u16)
}

/// A duplicate address detection solicitation for `addr` from `mac`: from ::, to the
/// solicited-node group, no source link-layer option (RFC 4862 5.4.2).
pub fn dad_solicitation(mac: [u8; 6], addr: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(addr);
    let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&addr.octets());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = csum::sum_be(csum::sum_be(0, &pseudo), &icmp);
    icmp[2..4].copy_from_slice(&(!csum::fold(sum)).to_be_bytes());
    let d = dst.octets();
    let mut f = Vec::with_capacity(78);
    f.extend_from_slice(&[0x33, 0x33, d[12], d[13], d[14], d[15]]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    f.extend_from_slice(&d);
    f.extend_from_slice(&icmp);
    f
}

/// Whether frame `f` (as received, from another MAC than `own`) says someone holds `addr`.
pub fn claims(f: &[u8], own: [u8; 6], addr: IpAddr) -> bool {
    if f.len() < 14 || f[6..12] == own {
        return false;
    }
    match addr {
        // ARP, Ethernet/IPv4, sender protocol address = addr (a reply, or a request or
        // announcement of its holder).
        IpAddr::V4(a) => f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[14..20] == [0, 1, 0x08, 0x00, 6, 4] && f[28..32] == a.octets(),
        // IPv6, ICMPv6 neighbour advertisement whose target is addr.
        IpAddr::V6(a) => f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 136 && f[62..78] == a.octets(),
    }
}

/// Probes `addr` on interface `ifindex` from `mac` and listens for an answer: true if
/// someone on the link holds it. Blocks for about half a second.
pub fn someone_holds(ifindex: u32, mac: [u8; 6], addr: IpAddr) -> anyhow::Result<bool> {
    // Only the frames that can answer: ARP, or IPv6 (a socket of all protocols would get a
    // copy of every frame on the link while it listens).
    let proto: u16 = if addr.is_ipv4() { 0x0806 } else { 0x86dd };
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, (proto.to_be()) as i32) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex as i32;
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const sll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) } < 0 {
        bail!("binding to ifindex {ifindex}: {}", std::io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), std::mem::size_of::<libc::timeval>() as u32) };
    let frame = match addr {
        IpAddr::V4(a) => arp_probe(mac, a),
        IpAddr::V6(a) => dad_solicitation(mac, a),
    };
    let send = || -> anyhow::Result<()> {
        let mut to = sll;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = unsafe { libc::sendto(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&raw const to).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        if n < 0 {
            bail!("sending a probe on ifindex {ifindex}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    let start = Instant::now();
    let end = PROBE_INTERVAL * (PROBES - 1) + LISTEN_AFTER;
    let mut sent = 0;
    let mut buf = [0u8; 2048];
    while start.elapsed() < end {
        if sent < PROBES && start.elapsed() >= PROBE_INTERVAL * sent {
            send()?;
            sent += 1;
        }
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && claims(&buf[..n as usize], mac, addr) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The index and MAC of interface `name` in this thread's network namespace.
pub fn nic_link(name: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let cname = std::ffi::CString::new(name)?;
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {name}: {}", std::io::Error::last_os_error());
    }
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        bail!("reading the MAC of {name}: {}", std::io::Error::last_os_error());
    }
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok((ifindex, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_from_the_holder_claims_and_our_own_probe_does_not() {
        let (ours, theirs) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let a: Ipv4Addr = "198.18.200.10".parse().unwrap();
        let probe = arp_probe(ours, a);
        assert_eq!(&probe[28..32], &[0, 0, 0, 0], "sender address 0.0.0.0");
        assert!(!claims(&probe, ours, IpAddr::V4(a)), "our own probe");
        // Their reply: sender = the address.
        let mut reply = probe.clone();
        reply[6..12].copy_from_slice(&theirs);
        reply[21] = 2;
        reply[22..28].copy_from_slice(&theirs);
        reply[28..32].copy_from_slice(&a.octets());
        assert!(claims(&reply, ours, IpAddr::V4(a)));
        assert!(!claims(&reply, ours, IpAddr::V4("198.18.200.11".parse().unwrap())), "another address");
    }

    #[test]
    fn the_dad_solicitation_checksum_verifies_and_goes_to_the_solicited_node_group() {
        let a: Ipv6Addr = "2001:db8:200::1234:5678".parse().unwrap();
        let f = dad_solicitation([2, 0, 0, 0, 0, 1], a);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0xff, 0x34, 0x56, 0x78]);
        assert_eq!(&f[22..38], &[0; 16], "from ::");
        let mut pseudo = f[22..54].to_vec();
        pseudo.extend_from_slice(&24u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        assert_eq!(csum::fold(csum::sum_be(csum::sum_be(0, &pseudo), &f[54..])), 0xffff);
        // An advertisement for it from another MAC claims it.
        let mut na = f.clone();
        na[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        na[54] = 136;
        assert!(claims(&na, [2, 0, 0, 0, 0, 1], IpAddr::V6(a)));
    }
}
