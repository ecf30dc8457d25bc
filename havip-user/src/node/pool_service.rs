//! The pool's API calls on the node: request, release, list. The choice is `pool`'s (pure);
//! this applies it as one reconcile of the VIPs (no NIC, host or class stage: a pool grant
//! changes none of those) and undoes the allocation if that fails.

use std::{net::IpAddr, time::Instant};

use tracing::{error, info};

use crate::{
    api::{Answer, ApiError, Reply, VipRequest},
    config::{Config, Vip},
    node::{
        events,
        pool::{self, Allocation},
        rank,
        reconciler::{resolve, Scope},
        Node,
    },
};

impl Node {
    /// `POST /v1/vips`: the best-ranked usable pool VIP, bound and remapped in one apply;
    /// on any failure the allocation is undone and the reply says why.
    pub(super) async fn pool_request(&mut self, r: VipRequest) -> Reply {
        pool::check(&self.file_cfg, &r, &self.state.allocations)?;
        // Measured paths matter only for a request that names its targets.
        let samples = if r.targets.is_empty() { Default::default() } else { self.prober.samples(&self.dp, Instant::now(), self.cfg.ranking.window) };
        let weights = self.cfg.ranking;
        let cost = |v: &Vip| {
            if r.targets.is_empty() {
                return None;
            }
            let (ranked, _) = rank::rank(&v.nics, &r.targets, &samples, &weights);
            let best = ranked.first()?;
            Some((best.cost?, best.nic.clone()))
        };
        let (vip, why) = pool::choose(&self.file_cfg, &self.state.allocations, &r, cost)?;
        let a = pool::allocation(&r, vip, events::now_ms());
        self.state.allocations.push(a.clone());
        if let Err(e) = self.apply_allocations().await {
            self.state.allocations.pop();
            let undo = self.apply_allocations().await;
            error!(app = %r.app, %vip, error = %e, undone = undo.is_ok(), "VIP request failed; undone");
            return Err(ApiError::Failed(match undo {
                Ok(_) => format!("applying {vip} failed: {e}; undone, nothing is held"),
                Err(u) => format!("applying {vip} failed: {e}; undoing failed too: {u}; nothing is held, reload to reconcile"),
            }));
        }
        let nic = self.nic_of(vip);
        info!(app = %a.app, %vip, nic = nic.as_deref().unwrap_or("-"), exclusive = a.exclusive, service_port = a.service_port, instance_port = a.instance_port, %why, "VIP granted");
        Ok(Answer::created(serde_json::json!({ "vip": vip, "nic": nic, "why": why, "allocation": a })))
    }

    /// `DELETE /v1/vips/{app}`: drops the app's allocations (or the one on `vip`); a pool
    /// VIP nobody holds leaves the dataplane with its address and mappings.
    pub(super) async fn pool_release(&mut self, app: &str, vip: Option<IpAddr>) -> Reply {
        let before = self.state.allocations.clone();
        self.state.allocations.retain(|a| !(a.app == app && vip.is_none_or(|v| v == a.vip)));
        let released: Vec<_> = before.iter().filter(|a| !self.state.allocations.contains(a)).cloned().collect();
        if released.is_empty() {
            return Err(ApiError::NotFound(format!("`{app}` holds no VIP{}", vip.map(|v| format!(" {v}")).unwrap_or_default())));
        }
        if let Err(e) = self.apply_allocations().await {
            self.state.allocations = before;
            let undo = self.apply_allocations().await;
            return Err(ApiError::Failed(match undo {
                Ok(_) => format!("releasing failed: {e}; undone, `{app}` still holds its VIPs"),
                Err(u) => {
                    format!("releasing failed: {e}; undoing failed too: {u}; reload to reconcile")
                }
            }));
        }
        info!(%app, released = released.len(), "VIP(s) released");
        Ok(Answer::json(serde_json::json!({ "released": released })))
    }

    /// `GET /v1/vips`: the pool, what is held, by whom, and where each VIP is.
    pub(super) fn pool_list(&self) -> Reply {
        let held: Vec<serde_json::Value> = self.state.allocations.iter().map(|a| serde_json::json!({ "allocation": a, "nic": self.nic_of(a.vip) })).collect();
        let free: Vec<IpAddr> = self.file_cfg.pool.iter().map(|v| v.address).filter(|v| !self.state.allocations.iter().any(|a| a.vip == *v)).collect();
        Ok(Answer::json(serde_json::json!({
            "pool": self.file_cfg.pool.iter().map(|v| v.address).collect::<Vec<_>>(),
            "free": free,
            "reserve": self.file_cfg.pool_reserve,
            "held": held,
        })))
    }

    /// Applies the file's configuration plus the held pool VIPs (VIP stages only).
    async fn apply_allocations(&mut self) -> anyhow::Result<String> {
        let cfg = pool::overlay(&self.file_cfg, &self.state.allocations);
        let res = resolve(&cfg, &self.nl, Scope::Vips).await?;
        Ok(self.apply(&cfg, &res, Scope::Vips).await?)
    }
}

/// Allocations whose pool VIP (and class) `cfg` still has, and those it does not.
pub(super) fn held_that_fit(cfg: &Config, held: &[Allocation]) -> (Vec<Allocation>, Vec<Allocation>) {
    held.iter().cloned().partition(|a| pool::still_valid(cfg, a))
}
