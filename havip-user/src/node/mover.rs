//! Carrying out moves: one binding write (the move itself, atomic for the programs), one
//! log line with its inputs, an event for `havip top`, and announcements from the new NIC.
//! A newer move of the same VIP cancels the announcements of the one it supersedes, so the
//! link never hears the old owner's MAC after the new one.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use anyhow::Context;
use havip_common::Binding;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::{
    kernel::{
        announce,
        dataplane::{monotonic_ns, FenceView},
        pins::PinLayout,
    },
    node::{
        events,
        placer::{self, Move, VipView},
        Node,
    },
};

/// The announcements still running, by VIP, and the event log moves go to.
pub struct Mover {
    announcing: BTreeMap<IpAddr, JoinHandle<()>>,
    /// Opened at the first move, kept (see `Announcer`).
    announcer: Option<std::sync::Arc<announce::Announcer>>,
    /// Whether a VIP is still served, asked before every announcement; opened at the first move.
    fences: Option<std::sync::Arc<FenceView>>,
    log: events::EventLog,
}

impl Mover {
    pub fn new(run_dir: &std::path::Path) -> Self {
        Self { announcing: BTreeMap::new(), announcer: None, fences: None, log: events::EventLog::open(run_dir) }
    }

    /// Starts announcing `vip` at `mac` on `ifindex`, cancelling announcements of an
    /// earlier move of the same VIP that are still running.
    fn announce(&mut self, pins: &PinLayout, vip: IpAddr, ifindex: u32, mac: [u8; 6], count: u32, interval: std::time::Duration) {
        if let Some(old) = self.announcing.remove(&vip) {
            if !old.is_finished() {
                old.abort();
                info!(%vip, "earlier announcements cancelled: superseded by a newer move");
            }
        }
        self.announcing.retain(|_, h| !h.is_finished());
        let announcer = match &self.announcer {
            Some(a) => a.clone(),
            None => match announce::Announcer::new() {
                Ok(a) => self.announcer.insert(std::sync::Arc::new(a)).clone(),
                Err(e) => {
                    warn!(%vip, error = %format!("{e:#}"), "cannot announce the move");
                    return;
                }
            },
        };
        let fences = match &self.fences {
            Some(f) => f.clone(),
            None => match FenceView::open(pins) {
                Ok(f) => self.fences.insert(std::sync::Arc::new(f)).clone(),
                Err(e) => {
                    warn!(%vip, error = %format!("{e:#}"), "cannot announce the move");
                    return;
                }
            },
        };
        let task = tokio::spawn(async move {
            match announcer.announce(ifindex, mac, vip, count, interval, || fences.serving(vip)).await {
                Ok(sent) if sent < count => info!(%vip, sent, count, "announcements stopped: the VIP is no longer served here"),
                Ok(_) => {}
                Err(e) => warn!(%vip, error = %format!("{e:#}"), "announcement failed"),
            }
        });
        self.announcing.insert(vip, task);
    }
}

impl Node {
    /// Runs the placer for every VIP (or one) and carries out its moves. Returns the
    /// number of moves made.
    pub(super) fn place_all(&mut self, only: Option<IpAddr>) -> usize {
        let moves = self.planned_moves(only);
        let n = moves.len();
        for m in moves {
            if let Err(e) = self.execute(&m) {
                error!(vip = %m.vip, nic = %m.to, error = %format!("{e:#}"), "binding failed");
            }
        }
        n
    }

    /// The moves the placer asks for now.
    fn planned_moves(&self, only: Option<IpAddr>) -> Vec<Move> {
        let mut views = Vec::new();
        for vip in self.cfg.vips.iter().filter(|v| only.is_none_or(|o| o == v.address)) {
            let Some(id) = self.dp.vip_id(vip.address) else {
                continue;
            };
            let Ok(b) = self.dp.binding_of(id) else {
                continue;
            };
            views.push(VipView {
                vip: vip.address,
                id,
                candidates: &vip.nics,
                quality: self.quality.get(&vip.address).and_then(|q| q.decision.as_ref()),
                pinned: self.state.pins.get(&vip.address).map(String::as_str),
                current: self.nics.name_of(b.ifindex),
            });
        }
        placer::moves(&views, &self.links, Instant::now(), self.cfg.failover.failback_hold_down)
    }

    /// Moves a VIP: one map write, then announcements from the new NIC.
    pub(super) fn execute(&mut self, m: &Move) -> anyhow::Result<()> {
        let n = self.nics.get(&m.to).context("unknown NIC")?.clone();
        if let Some(why) = &m.why {
            info!(vip = %m.vip, decision = %why, "quality decision");
        }
        let old = self.dp.binding_of(m.id)?;
        let b = Binding {
            ifindex: n.ifindex,
            nic_index: n.index,
            mac: n.mac,
            _pad: [0; 2],
            bound_at_ns: monotonic_ns(),
            moves: old.moves + u64::from(old.ifindex != 0),
        };
        self.dp.set_binding(m.id, b)?;
        let links: Vec<String> = self.links.iter().map(|(k, l)| format!("{k}={}", if l.up { "up" } else { "down" })).collect();
        info!(
            vip = %m.vip, from = m.from.as_deref().unwrap_or("-"), to = %m.to, reason = %m.reason,
            links = %links.join(","), pinned = self.state.pins.get(&m.vip).map(String::as_str).unwrap_or("-"),
            moves = b.moves, "VIP bound"
        );
        self.metrics.rebound(m.reason);
        let event = events::Move { at_ms: events::now_ms(), vip: m.vip, from: m.from.clone(), to: m.to.clone(), reason: m.reason.to_string(), moves: b.moves };
        if let Err(e) = self.mover.log.append(&event) {
            warn!(error = %e, "cannot record the move in the event log");
        }
        // A cluster VIP another node serves is not announced: the kernel would not answer
        // for it here either (its fence), and the link must not learn this node's MAC.
        if !self.dp.serving(m.vip) {
            info!(vip = %m.vip, "not announced: another node serves this cluster VIP");
            return Ok(());
        }
        let (count, interval) = (self.cfg.failover.announce_count, self.cfg.failover.announce_interval);
        self.mover.announce(&PinLayout::new(&self.opts.pin_root), m.vip, n.ifindex, n.mac, count, interval);
        Ok(())
    }
}
