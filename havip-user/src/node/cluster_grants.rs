//! Cluster mode's VIP requests (issue 13): an application asks any node for a VIP; the
//! node placement ranks first gets it (`cluster::requests`: packed into a shared VIP, one of
//! that node's spares, or one the managing node generates). Every node serves the granted
//! VIPs of the ledger as cluster VIPs: owned by the ledger's node, the other nodes its
//! successors in name order, with each application's port mapping, targets and class, so
//! the VIP moves like any configured one when its node fails, and follows the ledger when
//! the managing node moves it.

use std::{collections::BTreeSet, net::IpAddr};

use tracing::{error, info};

use crate::{
    api::{Answer, ApiError, Reply, VipRequest},
    cluster::{
        placement::{self, NodeReport, PathReport},
        pools::{AllocRecord, GrantedVip, Use},
        requests::{self, LedgerClient, Refused},
    },
    config::{Config, Remap, Vip},
    node::{
        event_loop::cluster_vips,
        pool,
        reconciler::{resolve, Scope},
        Node,
    },
};

/// `cfg` plus the granted VIPs (a configured VIP of the same address wins), and the
/// granted ones it added.
pub(super) fn overlay(cfg: &Config, grants: &[GrantedVip]) -> (Config, BTreeSet<IpAddr>) {
    let mut out = cfg.clone();
    let mut placed = BTreeSet::new();
    let Some(c) = &cfg.cluster else { return (out, placed) };
    let all = c.all_nodes();
    for g in grants {
        if cfg.vips.iter().any(|v| v.address == g.addr) {
            continue;
        }
        let rec = AllocRecord { node: g.node.clone(), successors: g.successors.clone(), ..AllocRecord::spare(&g.node) };
        let nodes = rec.candidates(&all);
        // Each use's class on its port (a class this node does not define is left out:
        // the VIP is still served, unclassed).
        let port_classes =
            g.uses.iter().filter_map(|u| u.class.clone().filter(|k| cfg.classes.classes.contains_key(k)).map(|k| ((u.protocol, u.service_port), k))).collect();
        out.vips.push(Vip { address: g.addr, nics: cfg.nics.clone(), targets: g.targets(), class: None, port_classes, isolated_from: Vec::new(), nodes });
        for u in &g.uses {
            out.remaps.push(Remap::for_app(g.addr, u.protocol, u.service_port, u.instance_port, &u.app));
        }
        placed.insert(g.addr);
    }
    out.remaps.sort();
    (out, placed)
}

impl Node {
    /// The connection to the ledger: the kept one, or a new one.
    async fn ledger(&mut self, c: &crate::config::cluster::Cluster) -> Result<LedgerClient, ApiError> {
        match self.ledger.take() {
            Some(l) => Ok(l),
            None => {
                LedgerClient::connect(c).await.map_err(|e| ApiError::Unavailable(format!("cannot reach etcd for the ledger: {e:#}; check etcd and ask again")))
            }
        }
    }

    /// Applies the file's configuration plus `grants` (VIP stages only) and hands the
    /// cluster service the VIPs it now owns or stands by for.
    pub(super) async fn apply_grants(&mut self, grants: &[GrantedVip]) -> anyhow::Result<String> {
        let (cfg, placed) = overlay(&self.file_cfg, grants);
        let res = resolve(&cfg, &self.nl, Scope::Vips).await?;
        let summary = self.apply(&cfg, &res, Scope::Vips).await?;
        if let Some(c) = &self.cluster {
            c.set_vips(cluster_vips(&cfg, &placed));
        }
        self.applied_grants = Some(grants.to_vec());
        Ok(summary)
    }

    /// The granted VIPs this node should serve or stand by for: the ledger as last read,
    /// with this node's own writes the read is older than (so a grant made here is served
    /// at once, and a release made here is not undone by a read that predates it).
    pub(super) fn desired_grants(&mut self) -> Vec<GrantedVip> {
        let Some(h) = &self.cluster else { return Vec::new() };
        let view = h.view();
        self.written.retain(|_, (_, rev)| *rev > view.revision);
        view.with(&self.written).granted()
    }

    /// Serves what the ledger (and this node's own writes) say, if that differs from what
    /// is applied: on every change of the ledger, and while own writes are pending.
    pub(super) async fn reconcile_grants(&mut self) {
        let desired = self.desired_grants();
        if self.applied_grants.as_ref() == Some(&desired) {
            return;
        }
        match self.apply_grants(&desired).await {
            Ok(summary) => info!(granted = desired.len(), %summary, "cluster grants applied"),
            Err(e) => {
                // Retried on the next change, tick (while own writes are pending) or reload.
                self.applied_grants = None;
                error!(error = %format!("{e:#}"), granted = desired.len(), "applying the cluster's granted VIPs failed; retried on the next change or reload")
            }
        }
    }

    /// `DELETE /v1/vips/{app}` in cluster mode: the app's uses leave its granted VIPs (or
    /// the one at `vip`); a VIP left unused leaves the ledger (or stays retired under
    /// do-not-reassign) and stops being served here at once, on the other nodes at their
    /// next read of the ledger (they watch it).
    pub(super) async fn cluster_release(&mut self, app: &str, vip: Option<IpAddr>) -> Reply {
        let c = self.file_cfg.cluster.clone().ok_or_else(|| ApiError::NotFound("this node runs standalone".into()))?;
        let mut ledger = self.ledger(&c).await?;
        let released = requests::release(&c, &mut ledger, app, vip).await;
        let released = match released {
            Ok(r) => {
                self.ledger = Some(ledger);
                r
            }
            Err(e) => return Err(ApiError::Unavailable(format!("the ledger in etcd: {e:#}; nothing was released, ask again"))),
        };
        if released.is_empty() {
            return Err(ApiError::NotFound(format!("`{app}` holds no cluster VIP{}", vip.map(|v| format!(" {v}")).unwrap_or_default())));
        }
        let addrs: Vec<IpAddr> = released.keys().map(|(_, a)| *a).collect();
        // Serve at once what the ledger now says of the released VIPs.
        self.written.extend(released);
        self.reconcile_grants().await;
        Ok(Answer::json(serde_json::json!({ "released": addrs })))
    }

    /// `POST /v1/vips` in cluster mode: placed on the node ranked first, granted in the
    /// ledger, and (when that node is this one) served before the reply; another node
    /// serves it within a moment (it watches the ledger).
    pub(super) async fn cluster_request(&mut self, r: VipRequest) -> Reply {
        let c = self.file_cfg.cluster.clone().ok_or_else(|| ApiError::NotFound("this node runs standalone".into()))?;
        pool::check(&self.file_cfg, &r, &[])?;
        let network = match (&r.network, &c.spares) {
            (Some(n), _) => n.clone(),
            (None, Some(sp)) => sp.network.clone(),
            (None, None) => match c.networks.as_slice() {
                [only] => only.name.clone(),
                [] => return Err(ApiError::NotFound("no [[cluster.network]] is configured: the cluster has no addresses to grant".into())),
                _ => return Err(ApiError::bad("network", "several [[cluster.network]] are configured and no [cluster.spares]: name the network")),
            },
        };
        if !c.networks.iter().any(|n| n.name == network) {
            let known: Vec<&str> = c.networks.iter().map(|n| n.name.as_str()).collect();
            return Err(ApiError::bad("network", format!("`{network}` is not a [[cluster.network]] (known: {})", known.join(", "))));
        }
        let u = Use {
            app: r.app.clone(),
            protocol: r.protocol,
            service_port: r.service_port,
            instance_port: r.instance_port,
            exclusive: r.exclusive,
            targets: r.targets.clone(),
            class: r.class.clone(),
        };
        let started = std::time::Instant::now();
        let mut ledger = self.ledger(&c).await?;
        // What this node wrote since its last read counts (placement sees its own grants).
        let view = self.cluster.as_ref().map(|h| h.view()).unwrap_or_default();
        self.written.retain(|_, (_, rev)| *rev > view.revision);
        let view = view.with(&self.written);
        let keep = requests::Keep { pinned: r.pinned, do_not_reassign: r.do_not_reassign };
        let granted = requests::grant(&c, &self.file_cfg.ranking, &mut ledger, &view, &network, u.clone(), keep).await;
        let ledger_ms = started.elapsed().as_secs_f64() * 1e3;
        let g = match granted {
            Ok(g) => {
                self.ledger = Some(ledger);
                g
            }
            Err(Refused::Conflict(m)) => {
                self.ledger = Some(ledger);
                return Err(ApiError::Conflict(m));
            }
            // The connection may be broken: the next call makes a new one.
            Err(Refused::Unavailable(m)) => return Err(ApiError::Unavailable(m)),
        };
        if let Some(h) = &self.cluster {
            h.count_grant(g.how.name());
        }
        // Serve it now rather than at the next read of the ledger.
        self.written.insert((g.network.clone(), g.vip), (Some(g.written.0.clone()), g.written.1));
        self.reconcile_grants().await;
        let apply_ms = started.elapsed().as_secs_f64() * 1e3 - ledger_ms;
        info!(
            app = %r.app, vip = %g.vip, network = %g.network, node = %g.node, how = g.how.name(), why = %g.why, asked = %c.node,
            exclusive = r.exclusive, service_port = r.service_port, instance_port = r.instance_port, targets = r.targets.len(),
            ledger_ms = format!("{ledger_ms:.2}"), apply_ms = format!("{apply_ms:.2}"), "cluster VIP granted"
        );
        Ok(Answer::created(serde_json::json!({
            "vip": g.vip, "network": g.network, "node": g.node, "how": g.how, "why": g.why,
            "service_port": r.service_port, "instance_port": r.instance_port,
            "took_ms": { "ledger": ledger_ms, "apply": apply_ms },
        })))
    }

    /// `GET /v1/vips` in cluster mode: every granted VIP of the ledger (with this node's
    /// own writes), its node and successors, its uses, and whether this node serves it.
    pub(super) fn cluster_list(&mut self) -> Reply {
        let grants = self.desired_grants();
        let serving: BTreeSet<IpAddr> =
            self.cluster.as_ref().map(|h| h.status().vips.iter().filter(|v| v.here == "serving").map(|v| v.vip).collect()).unwrap_or_default();
        let granted: Vec<serde_json::Value> = grants
            .iter()
            .map(|g| {
                serde_json::json!({
                    "vip": g.addr, "network": g.network, "node": g.node, "successors": g.successors, "pinned": g.pinned,
                    "uses": g.uses, "served_here": serving.contains(&g.addr), "nic": self.nic_of(g.addr),
                })
            })
            .collect();
        Ok(Answer::json(serde_json::json!({ "cluster": true, "granted": granted })))
    }

    /// `explain`'s placement part for a granted VIP: the ledger's node and every node's
    /// standing for it now.
    pub(super) fn explain_placement(&self, vip: IpAddr) -> Option<String> {
        let c = self.file_cfg.cluster.as_ref()?;
        let h = self.cluster.as_ref()?;
        let view = h.view();
        let g = h.grants().borrow().iter().find(|g| g.addr == vip).cloned()?;
        let targets = g.targets();
        let app = g.uses.first().map_or("", |u| u.app.as_str());
        let ranked = placement::rank_nodes(
            placement::Ask { app, targets: &targets, asked: &g.node },
            &c.all_nodes(),
            &view.alive(),
            &view.reports,
            view.records.values().map(|(r, _)| r),
            &self.file_cfg.ranking,
            &c.placement,
        );
        let uses: Vec<String> = g.uses.iter().map(|u| format!("{} {}:{}->{}", u.app, u.protocol, u.service_port, u.instance_port)).collect();
        Some(format!(
            "\ncluster placement: granted in network {} on node {}{} for {}\n{}",
            g.network,
            g.node,
            if g.pinned { " (pinned)" } else { "" },
            uses.join(", "),
            placement::render(&ranked, &g.node)
        ))
    }

    /// Publishes this node's report for placement (cluster mode, every ranking round):
    /// health, VIPs served, bytes per second through them, and its best path (over its
    /// NICs, by the ranking's cost model) to each target it probes.
    pub(super) fn report_for_placement(&mut self, samples: &crate::node::prober::Samples, now: std::time::Instant) {
        let Some(h) = &self.cluster else { return };
        let mut paths: std::collections::BTreeMap<IpAddr, PathReport> = Default::default();
        let w = &self.file_cfg.ranking;
        let standing = |p: &PathReport, t: IpAddr| placement::path_cost(Some(&NodeReport { paths: [(t, *p)].into(), ..Default::default() }), &[t], w);
        for ((_, target), s) in samples {
            let candidate = PathReport { rtt_ms: s.rtt_ms, loss_pct: s.loss_pct, sent: s.sent, replies: s.replies };
            let better = paths.get(target).is_none_or(|old| {
                let ((ra, ca), (rb, cb)) = (standing(&candidate, *target), standing(old, *target));
                ra > rb || (ra == rb && ca.unwrap_or(f64::INFINITY) < cb.unwrap_or(f64::INFINITY))
            });
            if better {
                paths.insert(*target, candidate);
            }
        }
        let status = h.status();
        let served: Vec<IpAddr> = status.vips.iter().filter(|v| v.here == "serving").map(|v| v.vip).collect();
        let bytes: u64 = served.iter().filter_map(|v| self.dp.vip_id(*v)).filter_map(|id| self.dp.vip_counters(id).ok()).map(|c| c.rx.bytes + c.tx.bytes).sum();
        let traffic_bps = match self.traffic_prev.replace((now, bytes)) {
            Some((t, b)) if now > t => (bytes.saturating_sub(b) as f64 / now.duration_since(t).as_secs_f64()) as u64,
            _ => 0,
        };
        let report = NodeReport { node: String::new(), healthy: self.links.values().any(|l| l.up), serving: served.len(), traffic_bps, paths, at_unix_ms: 0 };
        if let Some(h) = &self.cluster {
            h.set_report(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    const CFG: &str = r#"
[node]
vip_interface = "lo"
[[nic]]
name = "eth0"
[[nic]]
name = "eth1"
[cluster]
node = "n2"
etcd_endpoints = ["http://198.18.30.200:2379"]
[[cluster.peer]]
name = "n1"
addresses = ["198.18.30.11"]
[[cluster.peer]]
name = "n3"
addresses = ["198.18.30.31"]
[[vip]]
address = "198.18.130.1"
[class.gold]
"#;

    fn use_of(app: &str, port: u16, targets: &[&str], class: Option<&str>) -> Use {
        Use {
            app: app.into(),
            protocol: Protocol::Tcp,
            service_port: port,
            instance_port: 7000 + port,
            exclusive: false,
            targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
            class: class.map(String::from),
        }
    }

    /// A shared granted VIP: owned by the ledger's node first, every use's mapping, the
    /// union of the targets, each use's class on its port (an unknown class left out); a
    /// configured VIP of the same address wins over a grant.
    #[test]
    fn granted_vips_are_served_with_their_owner_first_and_every_uses_ports_targets_and_class() {
        let cfg = Config::parse(CFG, "test").unwrap();
        let g = GrantedVip {
            network: "prod".into(),
            addr: "198.18.200.10".parse().unwrap(),
            node: "n3".into(),
            successors: vec!["n2".into()],
            uses: vec![use_of("a", 80, &["198.18.9.1"], Some("gold")), use_of("b", 443, &["198.18.9.2", "198.18.9.1"], Some("silver"))],
            pinned: false,
        };
        let shadowed = GrantedVip { addr: "198.18.130.1".parse().unwrap(), ..g.clone() };
        let (out, placed) = overlay(&cfg, &[g.clone(), shadowed]);
        assert_eq!(placed, BTreeSet::from([g.addr]));
        let v = out.vips.iter().find(|v| v.address == g.addr).expect("the granted VIP");
        // The owner, its ranked successor, then the rest by name.
        assert_eq!(v.nodes, ["n3", "n2", "n1"]);
        assert_eq!(v.nics, ["eth0", "eth1"]);
        assert_eq!(v.targets, ["198.18.9.1".parse::<IpAddr>().unwrap(), "198.18.9.2".parse().unwrap()]);
        assert_eq!(v.port_classes.iter().map(|((_, p), c)| (*p, c.as_str())).collect::<Vec<_>>(), [(80, "gold")]);
        let maps: Vec<(u16, u16, &str)> =
            out.remaps.iter().filter(|r| r.vip == g.addr).map(|r| (r.designated_port, r.instance_port, r.service.as_str())).collect();
        assert_eq!(maps, [(80, 7080, "app:a"), (443, 7443, "app:b")]);
        // The configured VIP is not replaced by the grant of its address.
        assert_eq!(out.vips.iter().filter(|v| v.address == "198.18.130.1".parse::<IpAddr>().unwrap()).count(), 1);
        assert!(out.remaps.iter().all(|r| r.vip != "198.18.130.1".parse::<IpAddr>().unwrap()));
    }
}
