//! Ranking rounds: the prober's samples through `rank` for every VIP with targets, then
//! the placer acts on the new preference orders. The watch round runs one at once when a
//! path's verdict changes.

use std::time::Instant;

use crate::node::{
    rank::{self, Decision, NicScore, VipMemory},
    Node,
};

/// What the ranking knows about one VIP.
#[derive(Default)]
pub struct Quality {
    pub memory: VipMemory,
    pub ranked: Vec<NicScore>,
    pub decision: Option<Decision>,
}

impl Node {
    /// The probe-by-probe watch (every few ms). A path that goes dark or lossy, or comes
    /// back, is logged with what was measured and ranked at once: a dark path moves its
    /// VIPs now, not at the next ranking round.
    pub(super) fn watch_round(&mut self) {
        let changes = self.prober.watch_round(&self.dp, Instant::now());
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            let (rtt, sd) = c.rtt_ms.unwrap_or((f64::NAN, f64::NAN));
            tracing::info!(
                nic = %c.path.nic,
                target = %c.path.target,
                verdict = ?c.verdict,
                lost_in_row = c.lost_in_row,
                rtt_ms = format!("{rtt:.2}"),
                rtt_sd_ms = format!("{sd:.2}"),
                replies = c.replies,
                lost = c.lost,
                "path verdict"
            );
        }
        self.rank_round();
    }

    /// A ranking round: rank every VIP with targets, then place.
    pub(super) fn rank_round(&mut self) {
        let now = Instant::now();
        let samples = self.prober.samples(&self.dp, now, self.cfg.ranking.window);
        let w = self.cfg.ranking;
        let links = &self.links;
        let up = |n: &str| links.get(n).is_some_and(|l| l.up);
        let mut cache = rank::RoundCache::default();
        for vip in self.cfg.vips.iter().filter(|v| !v.targets.is_empty()) {
            let Some(id) = self.dp.vip_id(vip.address) else {
                continue;
            };
            let current = self.dp.binding_of(id).ok().and_then(|b| self.nics.name_of(b.ifindex));
            let (ranked, complete) = cache.rank(&vip.nics, &vip.targets, &samples, &w).clone();
            let q = self.quality.entry(vip.address).or_default();
            let d = rank::decide(&ranked, complete, current, &up, &mut q.memory, now, &w);
            if q.decision.as_ref().map(|o| &o.why) != Some(&d.why) {
                tracing::debug!(vip = %vip.address, why = %d.why, "ranking");
            }
            q.ranked = ranked;
            q.decision = Some(d);
        }
        let cfg = &self.cfg;
        self.quality.retain(|ip, _| cfg.vips.iter().any(|v| v.address == *ip && !v.targets.is_empty()));
        self.place_all(None);
        if self.cluster.is_some() {
            self.report_for_placement(&samples, now);
        }
    }
}
