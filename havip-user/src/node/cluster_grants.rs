//! Cluster mode's VIP requests (issue 13): an application asks any node with spare pools
//! (`[cluster.spares]`) for a VIP and gets one of that node's checked spares at once (the
//! ledger record becomes granted; no manager needed). Every node serves the granted VIPs
//! of the ledger as cluster VIPs: owned by the node it was granted on, the other nodes its
//! successors in name order, with the application's port mapping, so the VIP moves like
//! any configured one when its node fails.

use tracing::{error, info};

use crate::{
    api::{Answer, ApiError, Reply, VipRequest},
    cluster::{
        manager,
        pools::{Grant, GrantedVip},
    },
    config::{Config, Remap, Vip},
    node::{
        event_loop::cluster_vips,
        reconciler::{resolve, Scope},
        Node,
    },
};

/// `cfg` plus the granted VIPs (a configured VIP of the same address wins).
pub(super) fn overlay(cfg: &Config, grants: &[GrantedVip]) -> Config {
    let mut out = cfg.clone();
    let Some(c) = &cfg.cluster else { return out };
    let all = c.all_nodes();
    for g in grants {
        if cfg.vips.iter().any(|v| v.address == g.addr) {
            continue;
        }
        let nodes = std::iter::once(g.node.clone()).chain(all.iter().filter(|n| **n != g.node).cloned()).collect();
        out.vips.push(Vip { address: g.addr, nics: cfg.nics.clone(), targets: Vec::new(), class: None, port_classes: Default::default(), isolated_from: Vec::new(), nodes });
        out.remaps.push(Remap {
            vip: g.addr,
            protocol: g.grant.protocol,
            designated_port: g.grant.service_port,
            instance_port: g.grant.instance_port,
            service: format!("app:{}", g.app),
        });
    }
    out.remaps.sort();
    out
}

impl Node {
    /// The connection to the ledger: the kept one, or a new one.
    async fn ledger(&mut self, c: &crate::config::cluster::Cluster) -> Result<manager::LedgerClient, ApiError> {
        match self.ledger.take() {
            Some(l) => Ok(l),
            None => manager::LedgerClient::connect(c).await.map_err(|e| ApiError::Failed(format!("cannot reach etcd for the ledger: {e:#}"))),
        }
    }

    /// Keeps `ledger` for the next call when `r` succeeded (a failed call may have left the
    /// connection broken: the next call makes a new one).
    fn keep_ledger<T>(&mut self, ledger: manager::LedgerClient, r: anyhow::Result<T>) -> Result<T, ApiError> {
        match r {
            Ok(v) => {
                self.ledger = Some(ledger);
                Ok(v)
            }
            Err(e) => Err(ApiError::Failed(format!("the ledger in etcd: {e:#}"))),
        }
    }

    /// Applies the file's configuration plus `grants` (VIP stages only) and hands the
    /// cluster service the VIPs it now owns or stands by for.
    pub(super) async fn apply_grants(&mut self, grants: &[GrantedVip]) -> anyhow::Result<String> {
        let cfg = overlay(&self.file_cfg, grants);
        let res = resolve(&cfg, &self.nl, Scope::Vips).await?;
        let summary = self.apply(&cfg, &res, Scope::Vips).await?;
        if let Some(c) = &self.cluster {
            c.set_vips(cluster_vips(&cfg));
        }
        Ok(summary)
    }

    /// The ledger's granted VIPs changed (a grant on any node): serve them.
    pub(super) async fn on_grants(&mut self, grants: Vec<GrantedVip>) {
        match self.apply_grants(&grants).await {
            Ok(summary) => info!(granted = grants.len(), %summary, "cluster grants applied"),
            Err(e) => error!(error = %format!("{e:#}"), granted = grants.len(), "applying the cluster's granted VIPs failed; retried on the next change or reload"),
        }
    }

    /// `DELETE /v1/vips/{app}` in cluster mode: the app's granted VIPs (or the one at
    /// `vip`) leave the ledger (or stay retired under do-not-reassign) and stop being
    /// served here at once, on the other nodes at their next read of the ledger.
    pub(super) async fn cluster_release(&mut self, app: &str, vip: Option<std::net::IpAddr>) -> Reply {
        let c = self.file_cfg.cluster.clone().ok_or_else(|| ApiError::NotFound("this node runs standalone".into()))?;
        let mut ledger = self.ledger(&c).await?;
        let released = manager::release_grants(&c, &mut ledger, app, vip).await;
        let released = self.keep_ledger(ledger, released)?;
        if released.is_empty() {
            return Err(ApiError::NotFound(format!("`{app}` holds no cluster VIP{}", vip.map(|v| format!(" {v}")).unwrap_or_default())));
        }
        let grants: Vec<GrantedVip> =
            self.cluster.as_ref().map(|h| h.grants().borrow().clone()).unwrap_or_default().into_iter().filter(|g| !released.contains(&g.addr)).collect();
        if let Err(e) = self.apply_grants(&grants).await {
            error!(%app, error = %format!("{e:#}"), "released VIPs could not be removed here yet");
        }
        Ok(Answer::json(serde_json::json!({ "released": released })))
    }

    /// `POST /v1/vips` in cluster mode: one of this node's checked spares, granted and
    /// served before the reply.
    pub(super) async fn cluster_request(&mut self, r: VipRequest) -> Reply {
        let c = self.file_cfg.cluster.clone().ok_or_else(|| ApiError::NotFound("this node runs standalone".into()))?;
        if c.spares.is_none() {
            return Err(ApiError::NotFound("no spare pools here: configure [cluster.spares] (network, low, high)".into()));
        }
        if !r.targets.is_empty() || r.class.is_some() {
            return Err(ApiError::Failed("cluster grants take no targets or class yet; ask without them".into()));
        }
        let grant = Grant { protocol: r.protocol, service_port: r.service_port, instance_port: r.instance_port, exclusive: r.exclusive };
        let started = std::time::Instant::now();
        let mut ledger = self.ledger(&c).await?;
        // The last read's spares, less those this node granted since (the read lags).
        let mut cached = self.cluster.as_ref().map(|h| h.cached_spares()).unwrap_or_default();
        self.granted_since_read.retain(|k| cached.iter().any(|s| &s.key == k));
        cached.retain(|s| !self.granted_since_read.contains(&s.key));
        let granted = manager::grant_spare(&c, &mut ledger, &cached, &r.app, grant.clone()).await;
        let granted = self.keep_ledger(ledger, granted)?;
        let ledger_ms = started.elapsed().as_secs_f64() * 1e3;
        if let Some(k) = &granted {
            self.granted_since_read.insert(k.clone());
        }
        let Some((network, vip)) = granted else {
            return Err(ApiError::Failed(format!("node {} has no checked spare VIP left; the managing node tops pools up within a second, ask again", c.node)));
        };
        // Serve it now rather than at the next read of the ledger.
        let mut grants: Vec<GrantedVip> = self.cluster.as_ref().map(|h| h.grants().borrow().clone()).unwrap_or_default();
        if !grants.iter().any(|g| g.addr == vip) {
            grants.push(GrantedVip { addr: vip, node: c.node.clone(), app: r.app.clone(), grant: grant.clone() });
        }
        if let Err(e) = self.apply_grants(&grants).await {
            error!(app = %r.app, %vip, error = %format!("{e:#}"), "granted VIP could not be applied here yet");
        }
        let apply_ms = started.elapsed().as_secs_f64() * 1e3 - ledger_ms;
        info!(
            app = %r.app, %vip, %network, node = %c.node, service_port = grant.service_port, instance_port = grant.instance_port,
            ledger_ms = format!("{ledger_ms:.2}"), apply_ms = format!("{apply_ms:.2}"), "cluster VIP granted from this node's spares"
        );
        Ok(Answer::created(serde_json::json!({
            "vip": vip, "network": network, "node": c.node, "service_port": grant.service_port, "instance_port": grant.instance_port,
            "took_ms": { "ledger": ledger_ms, "apply": apply_ms },
        })))
    }
}
