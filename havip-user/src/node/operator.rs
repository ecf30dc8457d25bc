//! The operator's calls: pin a VIP to a NIC (`havip bind`), drop the pin (`havip
//! unbind`), explain a VIP, rank now.

use std::net::IpAddr;

use crate::{
    api::{Answer, ApiError, Reply},
    node::{binder::Reason, explain, placer::Move, Node},
};

impl Node {
    pub(super) fn operator_bind(&mut self, vip: IpAddr, nic: String) -> Reply {
        let Some(v) = self.cfg.vips.iter().find(|v| v.address == vip) else {
            return Err(ApiError::NotFound(format!("{vip} is not a VIP of this node")));
        };
        if !self.nics.contains(&nic) {
            return Err(ApiError::Conflict(format!("unknown NIC `{nic}`; this node's NICs: {}", self.cfg.nics.join(", "))));
        }
        if !v.nics.contains(&nic) {
            return Err(ApiError::Conflict(format!("NIC `{nic}` is not a candidate for {vip} (candidates: {})", v.nics.join(", "))));
        }
        if !self.links.get(&nic).is_some_and(|l| l.up) {
            return Err(ApiError::Conflict(format!("NIC `{nic}` is down; refusing to bind {vip} to it")));
        }
        let Some(id) = self.dp.vip_id(vip) else {
            return Err(ApiError::Conflict(format!("{vip} is not in the dataplane yet")));
        };
        self.state.pins.insert(vip, nic.clone());
        let current = self.nic_of(vip);
        let msg = if current.as_deref() == Some(nic.as_str()) {
            format!("{vip} is on {nic}; pinned there")
        } else {
            let m = Move { vip, id, from: current.clone(), to: nic.clone(), reason: Reason::Operator, why: None };
            if let Err(e) = self.execute(&m) {
                self.state.pins.remove(&vip);
                return Err(ApiError::Failed(format!("binding failed: {e:#}; the VIP and its pin are unchanged")));
            }
            format!("{vip} moved from {} to {nic}; pinned there", current.as_deref().unwrap_or("-"))
        };
        match self.save() {
            Ok(()) => Ok(Answer::message(msg)),
            Err(e) => Err(ApiError::Failed(format!("{msg}, but saving the pin failed: {e:#}"))),
        }
    }

    pub(super) fn operator_unbind(&mut self, vip: IpAddr) -> Reply {
        if self.state.pins.remove(&vip).is_none() {
            return Err(ApiError::Conflict(format!("{vip} is not pinned (nothing to unbind)")));
        }
        self.place_all(Some(vip));
        let now = self.nic_of(vip).unwrap_or_else(|| "-".into());
        if let Err(e) = self.save() {
            return Err(ApiError::Failed(format!("{vip} unpinned, but saving the state failed: {e:#}")));
        }
        Ok(Answer::message(format!("{vip} unpinned; automatic placement keeps it on {now}")))
    }

    pub(super) fn explain(&self, vip: IpAddr) -> Reply {
        let Some(v) = self.cfg.vips.iter().find(|v| v.address == vip) else {
            return Err(ApiError::NotFound(format!("{vip} is not a VIP of this node")));
        };
        let Some(id) = self.dp.vip_id(vip) else {
            return Err(ApiError::Conflict(format!("{vip} is not in the dataplane yet")));
        };
        let b = self.dp.binding_of(id).unwrap_or_default();
        let text = explain::render(&explain::Inputs {
            vip: v,
            current: self.nics.name_of(b.ifindex),
            moves: b.moves,
            pinned: self.state.pins.get(&vip).map(String::as_str),
            links: &self.links,
            weights: &self.cfg.ranking,
            quality: self.quality.get(&vip),
        });
        Ok(Answer::message(text + &self.explain_placement(vip).unwrap_or_default()))
    }

    pub(super) fn rerank(&mut self) -> Reply {
        self.rank_round();
        Ok(Answer::message(format!("ranked {} VIP(s) with targets", self.quality.len())))
    }
}
