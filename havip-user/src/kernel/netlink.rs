//! Links and addresses through rtnetlink: finding NICs (index, MAC, state) and installing
//! VIPs as local addresses.

use std::net::IpAddr;

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlag},
};
use rtnetlink::Handle;

/// What havip needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Administratively up and with carrier (IFF_UP and IFF_LOWER_UP).
    pub up: bool,
    /// The rtnetlink kind of a virtual device (`veth`, `vlan`, `bridge`, ...); `None` for
    /// a NIC with a driver of its own.
    pub kind: Option<String>,
}

impl LinkInfo {
    pub fn from_message(msg: &netlink_packet_route::link::LinkMessage) -> Option<Self> {
        let mut mac = [0u8; 6];
        let mut name = None;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(a) if a.len() == 6 => mac.copy_from_slice(a),
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let netlink_packet_route::link::LinkInfo::Kind(k) = i {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        let flags = &msg.header.flags;
        Some(Self { name: name?, index: msg.header.index, mac, up: flags.contains(&LinkFlag::Up) && flags.contains(&LinkFlag::LowerUp), kind })
    }
}

/// Streams link changes (RTMGRP_LINK): `(link, deleted)`. The channel closes when the
/// netlink stream ends or fails: the caller must then subscribe again and read every link
/// state afresh (changes in between were missed). Fault point `link_watch:end` ends it.
pub fn watch_links() -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<(LinkInfo, bool)>> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::AsyncSocket;
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    let addr = netlink_sys::SocketAddr::new(0, libc::RTMGRP_LINK as u32);
    conn.socket_mut().socket_mut().bind(&addr).context("subscribing to link events")?;
    let conn = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if crate::faults::take("link_watch:end") {
                break;
            }
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => LinkInfo::from_message(&l).map(|i| (i, false)),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => LinkInfo::from_message(&l).map(|i| (i, true)),
                _ => None,
            };
            if let Some(e) = event {
                if tx.send(e).is_err() {
                    break;
                }
            }
        }
        // The socket goes with the stream; `tx` drops here and closes the channel.
        conn.abort();
    });
    Ok(rx)
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route socket in the calling thread's network namespace.
    pub fn new() -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The interface called `name`, or `None` if there is none.
    pub async fn link(&self, name: &str) -> anyhow::Result<Option<LinkInfo>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(LinkInfo::from_message(&msg)),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
        }
    }

    /// Sets interface `index` up.
    pub async fn set_up(&self, index: u32) -> anyhow::Result<()> {
        self.handle.link().set(index).up().execute().await.context("setting the interface up")
    }

    /// Addresses on interface `index`.
    pub async fn addresses(&self, index: u32) -> anyhow::Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        let mut msgs = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = msgs.try_next().await? {
            // Filtering is done by rtnetlink in userspace on some kernels: check again.
            if msg.header.index != index {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    out.push(*ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Adds `ip` as a host address (/32 or /128) on interface `index`.
    pub async fn add_host_address(&self, index: u32, ip: IpAddr) -> anyhow::Result<()> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        self.handle.address().add(index, ip, prefix).execute().await.with_context(|| format!("adding address {ip}/{prefix}"))
    }

    /// Removes `ip` from interface `index`; absent is fine.
    pub async fn del_address(&self, index: u32, ip: IpAddr) -> anyhow::Result<()> {
        let mut msgs = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = msgs.try_next().await? {
            let matches = msg.header.index == index && msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip));
            if matches {
                self.handle.address().del(msg).execute().await.with_context(|| format!("removing address {ip}"))?;
            }
        }
        Ok(())
    }
}
