//! Raw Ethernet on a namespace's link, for what sockets cannot show: how many ARP/NDP
//! answers a request gets and from which MAC, and which link VIP frames use.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

pub struct RawLink {
    fd: OwnedFd,
    ifindex: u32,
}

impl RawLink {
    /// Opens `dev` of the calling thread's namespace, receiving every frame.
    pub fn open(dev: &str) -> Self {
        let name = CString::new(dev).unwrap();
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex != 0, "no interface {dev}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        Self { fd, ifindex }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The next frame on the link before `deadline`, with its packet type (PACKET_*).
    fn recv_one(&self, deadline: Instant) -> Option<(Vec<u8>, u8)> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 65536];
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe { libc::recvfrom(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut from).cast(), &mut len) };
            if n > 0 {
                buf.truncate(n as usize);
                return Some((buf, from.sll_pkttype));
            }
        }
    }

    /// The next frame that arrived on the link (not one sent on it), waiting up to `wait`.
    pub fn recv_incoming(&self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        loop {
            let (frame, kind) = self.recv_one(deadline)?;
            if kind != libc::PACKET_OUTGOING {
                return Some(frame);
            }
        }
    }

    pub fn send(&self, frame: &[u8]) {
        self.try_send(frame).unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// Sends a frame; an error (e.g. a frame beyond the MTU) is returned, not fatal.
    pub fn try_send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = unsafe {
            libc::sendto(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Frames received until `deadline` (outgoing ones included, as on any tap).
    pub fn recv_until(&self, deadline: Instant) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv_one(deadline).map(|(f, _)| f)).collect()
    }

    pub fn recv_for(&self, d: Duration) -> Vec<Vec<u8>> {
        self.recv_until(Instant::now() + d)
    }
}

pub fn mac_str(m: &[u8]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    v.try_into().unwrap()
}

/// Is this frame an IPv4/IPv6 packet whose source is `vip`?
pub fn from_ip(frame: &[u8], vip: std::net::IpAddr) -> bool {
    match vip {
        std::net::IpAddr::V4(v4) => frame.len() >= 34 && frame[12..14] == [8, 0] && frame[26..30] == v4.octets(),
        std::net::IpAddr::V6(v6) => frame.len() >= 54 && frame[12..14] == [0x86, 0xdd] && frame[22..38] == v6.octets(),
    }
}

/// The sender MAC of an ARP reply for `ip`, if this frame is one.
pub fn arp_reply_for(frame: &[u8], ip: std::net::Ipv4Addr) -> Option<String> {
    (frame.len() >= 42 && frame[12..14] == [8, 6] && frame[20..22] == [0, 2] && frame[28..32] == ip.octets()).then(|| mac_str(&frame[22..28]))
}

/// The target link-layer address of a solicited neighbour advertisement for `ip` (an
/// answer, not an announcement), if this frame is one.
pub fn na_for(frame: &[u8], ip: std::net::Ipv6Addr) -> Option<String> {
    (frame.len() >= 86
        && frame[12..14] == [0x86, 0xdd]
        && frame[20] == 58
        && frame[54] == 136
        && frame[58] & 0x40 != 0
        && frame[62..78] == ip.octets()
        && frame[78] == 2)
        .then(|| mac_str(&frame[80..86]))
}
