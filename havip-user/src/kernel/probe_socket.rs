//! Probe packets and the raw sockets that send them. A probe leaves from a NIC's own
//! address, out of that NIC, carrying its slot in the ICMP id, TCP source port or UDP
//! source port; the kernel programs timestamp it and consume the answer
//! (havip-ebpf/src/probe.rs). What to probe, and what the answers mean, is `node::prober`.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context};
use havip_common::{csum, PROBE_ID_BASE, PROBE_MARK, PROBE_PORT_BASE};

use crate::config::ProbeKind;

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> anyhow::Result<()> {
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), std::mem::size_of::<T>() as u32) };
    if rc != 0 {
        bail!("setsockopt({level}, {name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A raw ICMP (or, with `tcp`, TCP) socket sending from `source` out of `nic`, marked as
/// havip's probes, and receiving nothing (the replies are consumed in XDP).
pub fn probe_socket(nic: &str, source: IpAddr, kind: ProbeKind) -> anyhow::Result<OwnedFd> {
    let proto = match (source, kind) {
        (IpAddr::V4(_), ProbeKind::Icmp) => libc::IPPROTO_ICMP,
        (IpAddr::V6(_), ProbeKind::Icmp) => libc::IPPROTO_ICMPV6,
        (_, ProbeKind::Tcp(_)) => libc::IPPROTO_TCP,
        (_, ProbeKind::Udp(_)) => libc::IPPROTO_UDP,
    };
    let domain = if source.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, proto) };
    if fd < 0 {
        bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(nic)?;
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, name.as_ptr().cast(), name.as_bytes().len() as u32) };
    if rc != 0 {
        bail!("binding a probe socket to {nic}: {}", std::io::Error::last_os_error());
    }
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_MARK, &PROBE_MARK)?;
    // Receive nothing: a classic BPF filter that drops every copy the socket would get.
    let drop_all = [libc::sock_filter { code: 0x06 /* BPF_RET|BPF_K */, jt: 0, jf: 0, k: 0 }];
    let prog = libc::sock_fprog { len: 1, filter: drop_all.as_ptr().cast_mut() };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;
    // The kernel fills the checksum of IPv6 raw sockets when told where it is.
    match (source, kind) {
        (IpAddr::V6(_), ProbeKind::Tcp(_)) => setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, &16i32)?,
        (IpAddr::V6(_), ProbeKind::Udp(_)) => setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, &6i32)?,
        _ => {}
    }
    let addr = socket2_addr(SocketAddr::new(source, 0));
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr.0).cast(), addr.1) } != 0 {
        bail!("binding a probe socket to {source}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn socket2_addr(a: SocketAddr) -> (libc::sockaddr_storage, u32) {
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&raw mut st).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&raw mut st).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as u32)
}

/// An ICMP / ICMPv6 echo request of probe `slot` with sequence `seq` (the kernel fills
/// the ICMPv6 checksum; ICMPv4's is computed here).
pub fn echo_request(v6: bool, slot: u32, seq: u16) -> Vec<u8> {
    let id = PROBE_ID_BASE | slot as u16;
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(b"havip-probe!");
    if !v6 {
        let c = !csum::fold(csum::sum_be(0, &m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// A TCP SYN probe of `slot` with sequence `seq` from `src` to `dst:port` (IPv4: the
/// checksum is computed here; IPv6: by the kernel, see `probe_socket`).
pub fn tcp_syn(src: IpAddr, dst: IpAddr, port: u16, slot: u32, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&(PROBE_PORT_BASE + slot as u16).to_be_bytes());
    m.extend_from_slice(&port.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02, 0x04, 0x00, 0, 0, 0, 0]);
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&s.octets());
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        let c = !csum::fold(csum::sum_be(csum::sum_be(0, &pseudo), &m));
        m[16..18].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// A UDP probe of `slot` with sequence `seq` (the first 4 payload bytes) from `src` to
/// `dst:port` (IPv4: checksum computed here; IPv6: by the kernel).
pub fn udp_probe(src: IpAddr, dst: IpAddr, port: u16, slot: u32, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&(PROBE_PORT_BASE + slot as u16).to_be_bytes());
    m.extend_from_slice(&port.to_be_bytes());
    m.extend_from_slice(&20u16.to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(b"havip-pr");
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&s.octets());
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&[0, 17, 0, 20]);
        let c = match !csum::fold(csum::sum_be(csum::sum_be(0, &pseudo), &m)) {
            0 => 0xffff,
            c => c,
        };
        m[6..8].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// Sends one probe; a full socket buffer or an unreachable target is a lost probe, not
/// an error worth more than a debug line.
pub fn send(sock: &OwnedFd, target: IpAddr, msg: &[u8]) -> anyhow::Result<()> {
    let addr = socket2_addr(SocketAddr::new(target, 0));
    let n = unsafe { libc::sendto(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0, (&raw const addr.0).cast(), addr.1) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("sending a probe");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_syn_probe_is_a_valid_syn() {
        let m = tcp_syn("198.18.40.1".parse().unwrap(), "198.18.50.1".parse().unwrap(), 443, 3, 77);
        assert_eq!(u16::from_be_bytes([m[0], m[1]]), PROBE_PORT_BASE + 3);
        assert_eq!(u16::from_be_bytes([m[2], m[3]]), 443);
        assert_eq!((m[12], m[13]), (0x50, 0x02), "20-byte header, SYN");
        let mut pseudo = vec![198, 18, 40, 1, 198, 18, 50, 1, 0, 6, 0, 20];
        pseudo.extend_from_slice(&m);
        assert_eq!(csum::fold(csum::sum_be(0, &pseudo)), 0xffff);
    }

    #[test]
    fn icmpv4_echo_checksum_verifies() {
        let m = echo_request(false, 5, 7);
        assert_eq!(csum::fold(csum::sum_be(0, &m)), 0xffff);
        assert_eq!(u16::from_be_bytes([m[4], m[5]]), PROBE_ID_BASE | 5);
    }
}
