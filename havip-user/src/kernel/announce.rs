//! Telling the link a VIP moved: gratuitous ARP (IPv4) and unsolicited neighbour
//! advertisements (IPv6) sent from the new NIC through an AF_PACKET socket, so switches
//! learn the port and neighbours the MAC.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::bail;
use havip_common::csum;

/// A broadcast ARP request from `mac`: "who has `target`? tell `sender`", padded to the
/// Ethernet minimum.
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// A gratuitous ARP request: "who has VIP? tell VIP at `mac`", broadcast.
pub fn gratuitous_arp(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    arp_request(mac, vip, vip)
}

/// An unsolicited neighbour advertisement for `vip` at `mac` to all nodes, with the
/// Override flag so neighbours replace the old MAC.
pub fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&vip.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = csum::sum_be(csum::sum_be(0, &pseudo), &icmp);
    icmp[2..4].copy_from_slice(&(!csum::fold(sum)).to_be_bytes());

    let mut f = Vec::with_capacity(86);
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

pub fn frame_for(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(v4) => gratuitous_arp(mac, v4),
        IpAddr::V6(v6) => unsolicited_na(mac, v6),
    }
}

/// One AF_PACKET socket that sends raw frames out of any interface of its namespace. It is
/// kept for the process's life: closing an AF_PACKET socket waits for an RCU grace period
/// (milliseconds), which a socket per frame paid on every announcement, on a tokio worker
/// the event loop shares.
#[derive(Debug)]
pub struct Announcer {
    sock: OwnedFd,
}

impl Announcer {
    pub fn new() -> anyhow::Result<Self> {
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        Ok(Self { sock: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends a raw Ethernet frame out of interface `ifindex`.
    pub fn send_frame(&self, ifindex: u32, frame: &[u8]) -> anyhow::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            bail!("sending on ifindex {ifindex}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `count` announcements for `vip` from `mac` on `ifindex`, `interval` apart,
    /// the first at once, each only while `still_serving()` says so; returns how many went
    /// out. Dropping (aborting) the future stops the rest: a superseded move's
    /// announcements must not keep telling the link the old owner's MAC, nor may a node
    /// that stopped serving the VIP (another node serves it now).
    pub async fn announce(&self, ifindex: u32, mac: [u8; 6], vip: IpAddr, count: u32, interval: Duration, still_serving: impl Fn() -> bool) -> anyhow::Result<u32> {
        let frame = frame_for(mac, vip);
        for i in 0..count {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            if !still_serving() {
                return Ok(i);
            }
            self.send_frame(ifindex, &frame)?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsolicited_na_checksum_verifies() {
        let f = unsolicited_na([2, 0, 0, 0, 0, 9], "2001:db8::10".parse().unwrap());
        assert_eq!(f.len(), 86);
        // Sum of pseudo-header and message including the checksum folds to 0xffff.
        let mut pseudo = f[22..54].to_vec();
        pseudo.extend_from_slice(&32u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        assert_eq!(csum::fold(csum::sum_be(csum::sum_be(0, &pseudo), &f[54..])), 0xffff);
    }

    #[test]
    fn gratuitous_arp_names_the_vip_twice() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 9], Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(&f[28..32], &[198, 18, 0, 1]);
        assert_eq!(&f[38..42], &[198, 18, 0, 1]);
        assert_eq!(f.len(), 60);
    }
}
