//! Link events: the failover path. A link going down moves its VIPs at once; a NIC that
//! comes back under the same name but as a new device (deleted and created again) gets
//! its new ifindex and MAC recorded before anything can be bound to it, and is re-attached
//! by a reconcile.

use std::{net::IpAddr, time::Instant};

use havip_common::{HookReason, IngressHook};
use tracing::{info, warn};

use crate::{
    kernel::netlink::LinkInfo,
    node::{binder::LinkState, Node},
};

/// What a link event asks of the event loop beyond the moves already made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFollowUp {
    None,
    /// A NIC is a new device under a known name: reconcile the running configuration to
    /// attach the programs, sysctls, qdisc and probes to it.
    Reattach,
}

impl Node {
    pub(super) fn on_link(&mut self, link: LinkInfo, deleted: bool) -> LinkFollowUp {
        let Some(state) = self.links.get(&link.name).copied() else {
            return LinkFollowUp::None;
        };
        let mut follow_up = LinkFollowUp::None;
        let mut up = link.up && !deleted;
        if !deleted {
            if let Some(known) = self.nics.get(&link.name).cloned() {
                if known.ifindex != link.index || known.mac != link.mac {
                    warn!(nic = %link.name, old_ifindex = known.ifindex, new_ifindex = link.index, "NIC is a new device under a known name; re-attaching");
                    self.refresh_nic(&link.name, link.index, link.mac, known);
                    // Nothing may be bound to it before its programs are attached: it counts
                    // as down until the reconcile is done.
                    up = false;
                    follow_up = LinkFollowUp::Reattach;
                }
            }
        }
        if state.up == up {
            return follow_up;
        }
        self.links.insert(link.name.clone(), LinkState { up, since: Instant::now() });
        info!(nic = %link.name, up, deleted, "link changed");
        if !up && !deleted {
            self.invalidate_ipv6_route_caches(link.index);
        }
        if deleted {
            warn!(nic = %link.name, "NIC removed; its VIPs move (it is re-attached if it comes back)");
        }
        self.place_all(None);
        follow_up
    }

    /// Records `name`'s new ifindex and MAC in the NIC table and the NICS map; the old
    /// ifindex entry goes, so the programs and the CLI never see a dead device.
    fn refresh_nic(&mut self, name: &str, ifindex: u32, mac: [u8; 6], old: crate::node::nics::Nic) {
        // The hook stays recorded as it was until the re-attach records the new one.
        let hook = self.dp.nic_infos().get(&old.ifindex).and_then(|i| Some((IngressHook::from_u8(i.hook)?, HookReason::from_u8(i.hook_reason)?)));
        if let Err(e) = self.dp.remove_nic(old.ifindex) {
            warn!(nic = name, error = %format!("{e:#}"), "cannot remove the old NIC entry");
        }
        if let Err(e) = self.dp.set_nic(ifindex, name, mac, old.index, hook) {
            warn!(nic = name, error = %format!("{e:#}"), "cannot record the new NIC entry");
        }
        self.nics.insert(name, crate::node::nics::Nic { ifindex, mac, index: old.index });
        self.prober.forget_nic(name);
    }

    /// After the link watcher was resubscribed: every NIC's state as the kernel has it now,
    /// as if each had sent an event (changes it missed are acted on here).
    pub(super) async fn resync_links(&mut self) -> LinkFollowUp {
        let mut follow_up = LinkFollowUp::None;
        let names: Vec<String> = self.links.keys().cloned().collect();
        for name in names {
            let event = match self.nl.link(&name).await {
                Ok(Some(l)) => (l, false),
                Ok(None) => (LinkInfo { name: name.clone(), index: 0, mac: [0; 6], up: false, kind: None }, true),
                Err(e) => {
                    warn!(nic = %name, error = %format!("{e:#}"), "cannot read the link state");
                    continue;
                }
            };
            if self.on_link(event.0, event.1) == LinkFollowUp::Reattach {
                follow_up = LinkFollowUp::Reattach;
            }
        }
        follow_up
    }

    /// Connected sockets cache their route. When a NIC loses carrier, IPv4 drops those
    /// caches but IPv6 does not (its routes only get `linkdown`), so IPv6 connections keep
    /// queueing on the dead NIC behind a neighbour entry that never resolves. Removing an
    /// IPv6 address bumps the kernel's IPv6 route generation, which makes every socket
    /// route again: havipd adds and removes a throwaway link-local /128 on the dead NIC.
    fn invalidate_ipv6_route_caches(&self, ifindex: u32) {
        let nl = self.nl.clone();
        tokio::spawn(async move {
            let probe: IpAddr = "fe80::ffff:ffff:ffff:fffe".parse().unwrap();
            let r = async {
                nl.add_host_address(ifindex, probe).await?;
                nl.del_address(ifindex, probe).await
            }
            .await;
            if let Err(e) = r {
                warn!(ifindex, error = %format!("{e:#}"), "cannot invalidate IPv6 route caches");
            }
        });
    }
}
