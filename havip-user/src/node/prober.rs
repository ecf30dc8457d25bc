//! Active path probes. For every (candidate NIC, target) of the configured VIPs, havipd
//! sends an ICMP echo request every probe interval from the NIC's own address, out of that
//! NIC. The kernel programs timestamp the request as it leaves and the reply as it
//! arrives, and consume the reply (see havip-ebpf/src/probe.rs).
//!
//! Why the NIC's address and not the VIP's: a reply to a VIP comes back through whichever
//! NIC owns the VIP (the peer resolves the VIP to the owner's MAC), so probes from the VIP
//! could not measure the round trip of the other candidates. A NIC's own address always
//! returns through that NIC; one path measurement serves every VIP that NIC could carry.
//!
//! The prober owns the probe slots (one per measured path, stable across reloads), the raw
//! sockets (one per NIC and address family), each path's counter history and its
//! probe-by-probe watch (`path_watch`: one probe in flight, faster while in doubt), and
//! turns the kernel's counters into windowed samples for the ranking.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::Context;
use havip_common::{maps::PROBE_SLOTS_MAX, ProbeStats};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, ProbeKind},
    kernel::{dataplane::Dataplane, netlink::Netlink, probe_socket},
    node::{
        nics::NicTable,
        path_watch::{self, PathWatch, Verdict},
        rank::Sample,
    },
};

/// One measured path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Path {
    pub nic: String,
    pub target: IpAddr,
}

/// The paths a configuration asks for: every candidate NIC of a VIP to each of its targets.
pub fn wanted_paths(cfg: &Config) -> BTreeSet<Path> {
    // Free pool VIPs' paths too: the API ranks them for a request before one is held.
    cfg.vips.iter().chain(&cfg.pool).flat_map(|v| v.nics.iter().flat_map(|n| v.targets.iter().map(|t| Path { nic: n.clone(), target: *t }))).collect()
}

/// Keeps slots stable: paths that stay keep theirs, new ones take the lowest free slots.
/// Returns the new assignment and the slots freed.
pub fn assign_slots(old: &BTreeMap<Path, u32>, wanted: &BTreeSet<Path>) -> (BTreeMap<Path, u32>, Vec<u32>) {
    let mut out: BTreeMap<Path, u32> = old.iter().filter(|(p, _)| wanted.contains(p)).map(|(p, s)| (p.clone(), *s)).collect();
    let freed = old.iter().filter(|(p, _)| !wanted.contains(p)).map(|(_, s)| *s).collect();
    // Slots freed now stay unused this round: a late reply must not count for a new path.
    let mut used: BTreeSet<u32> = old.values().copied().collect();
    for p in wanted {
        if out.contains_key(p) {
            continue;
        }
        let Some(slot) = (0..PROBE_SLOTS_MAX).find(|s| !used.contains(s)) else {
            break;
        };
        used.insert(slot);
        out.insert(p.clone(), slot);
    }
    (out, freed)
}

/// Windowed samples by (NIC, target).
pub type Samples = BTreeMap<(String, IpAddr), Sample>;

#[derive(Default)]
pub struct Prober {
    /// Probe slot of each measured path.
    slots: BTreeMap<Path, u32>,
    /// One raw probe socket per (NIC, IPv6?), with the NIC address it sends from.
    sockets: BTreeMap<(String, bool), (OwnedFd, IpAddr)>,
    /// Probe counters per path over the ranking window: (when, sent, received).
    history: BTreeMap<Path, VecDeque<(Instant, u64, u64)>>,
    /// The probe kind the sockets were opened for.
    kind: Option<ProbeKind>,
    seq: u16,
    /// Probe-by-probe state of each path: when it is probed next, and its verdict.
    watch: BTreeMap<Path, PathWatch>,
    /// Paths of bound VIPs' candidate NICs: probed at the active interval.
    active: BTreeSet<Path>,
    settings: path_watch::Settings,
}

/// A path whose verdict changed, with what the watch knew then (for the decision's log line).
#[derive(Debug, Clone)]
pub struct VerdictChange {
    pub path: Path,
    pub verdict: Verdict,
    pub lost_in_row: u32,
    pub rtt_ms: Option<(f64, f64)>,
    pub replies: u64,
    pub lost: u64,
}

impl Prober {
    /// Assigns probe slots to the paths `cfg` asks for and opens their sockets.
    pub async fn setup(&mut self, cfg: &Config, nics: &NicTable, dp: &mut Dataplane, nl: &Netlink) -> anyhow::Result<()> {
        let wanted = wanted_paths(cfg);
        let (slots, freed) = assign_slots(&self.slots, &wanted);
        // A change of probe kind restarts every path's measurement.
        let kind_changed = self.kind != Some(cfg.probe_kind);
        if kind_changed {
            self.sockets.clear();
        }
        for s in freed {
            dp.set_probe_slot(s, None, (0, None))?;
        }
        for (path, &slot) in &slots {
            let ifindex = nics.get(&path.nic).map(|n| n.ifindex).context("probe NIC not attached")?;
            if kind_changed || self.slots.get(path) != Some(&slot) {
                dp.set_probe_slot(slot, Some((ifindex, path.target)), cfg.probe_kind.wire())?;
            }
            let key = (path.nic.clone(), path.target.is_ipv6());
            if self.sockets.contains_key(&key) {
                continue;
            }
            // Send from the NIC's own address of the target's family.
            let source = nl
                .addresses(ifindex)
                .await?
                .into_iter()
                .find(|a| a.is_ipv6() == path.target.is_ipv6() && !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()));
            match source {
                Some(src) => {
                    self.sockets.insert(key, (probe_socket::probe_socket(&path.nic, src, cfg.probe_kind)?, src));
                    info!(nic = %path.nic, source = %src, kind = ?cfg.probe_kind, "probing from");
                }
                None => {
                    warn!(nic = %path.nic, target = %path.target, "no address of the target's family on this NIC: the path is not probed")
                }
            }
        }
        self.history.retain(|p, _| slots.contains_key(p));
        self.watch.retain(|p, _| slots.contains_key(p));
        self.active = cfg.vips.iter().flat_map(|v| v.nics.iter().flat_map(|n| v.targets.iter().map(|t| Path { nic: n.clone(), target: *t }))).collect();
        self.settings = cfg.watch;
        self.slots = slots;
        self.kind = Some(cfg.probe_kind);
        Ok(())
    }

    /// Forgets the sockets of `nic` (its ifindex changed, or it left): the next setup
    /// opens them again, bound to the NIC as it is now.
    pub fn forget_nic(&mut self, nic: &str) {
        self.sockets.retain(|(n, _), _| n != nic);
    }

    /// One round of the probe-by-probe watch (every few ms): takes the outcome of each
    /// probe whose reply the kernel counted or whose deadline passed, and sends each probe
    /// that is due. Reads the kernel only for paths with a probe in flight or due. Returns
    /// the paths whose verdict changed.
    pub fn watch_round(&mut self, dp: &Dataplane, now: Instant) -> Vec<VerdictChange> {
        let s = self.settings;
        let mut changes = Vec::new();
        let mut due = Vec::new();
        for (path, &slot) in &self.slots {
            let w = self.watch.entry(path.clone()).or_default();
            let active = self.active.contains(path);
            if !w.waiting() && !w.due(now, active, &s) {
                continue;
            }
            let Ok(st) = dp.probe_stats(slot) else { continue };
            if let Some(o) = w.check(now, st.received, Duration::from_nanos(st.last_rtt_ns), &s) {
                if let Some(verdict) = w.record(o, &s) {
                    changes.push(VerdictChange {
                        path: path.clone(),
                        verdict,
                        lost_in_row: w.lost_in_row,
                        rtt_ms: w.rtt_ms(),
                        replies: w.replies,
                        lost: w.lost,
                    });
                }
            }
            if w.due(now, active, &s) {
                due.push((path.clone(), slot, st.received));
            }
        }
        for (path, slot, received) in due {
            let sent = self.send_one(&path, slot);
            let w = self.watch.get_mut(&path).expect("watched above");
            if sent {
                w.sent(now, received);
            } else {
                w.skipped(now);
            }
        }
        changes
    }

    /// Sends one probe on `path`; false if it could not be sent.
    fn send_one(&mut self, path: &Path, slot: u32) -> bool {
        let Some(kind) = self.kind else { return false };
        let Some((sock, src)) = self.sockets.get(&(path.nic.clone(), path.target.is_ipv6())) else {
            return false;
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = match kind {
            ProbeKind::Tcp(port) => probe_socket::tcp_syn(*src, path.target, port, slot, seq as u32),
            ProbeKind::Udp(port) => probe_socket::udp_probe(*src, path.target, port, slot, seq as u32),
            ProbeKind::Icmp => probe_socket::echo_request(path.target.is_ipv6(), slot, seq),
        };
        match probe_socket::send(sock, path.target, &msg) {
            Ok(_) => true,
            Err(e) => {
                debug!(nic = %path.nic, target = %path.target, error = %e, "probe not sent");
                false
            }
        }
    }

    /// Each watched path's verdict, for `havip stats` and the API.
    pub fn verdicts(&self) -> BTreeMap<(String, IpAddr), Verdict> {
        self.watch.iter().map(|(p, w)| ((p.nic.clone(), p.target), w.verdict)).collect()
    }

    /// Windowed samples of every probed path, from the kernel's counters, with each
    /// path's RTT spread and verdict from the watch.
    pub fn samples(&mut self, dp: &Dataplane, now: Instant, window: Duration) -> Samples {
        let mut out = BTreeMap::new();
        // Only the slots this prober assigned: one lookup each, not a scan of all slots.
        for (path, &slot) in &self.slots {
            let Ok(st) = dp.probe_stats(slot) else { continue };
            let h = self.history.entry(path.clone()).or_default();
            h.push_back((now, st.sent, st.received));
            // Keep one entry older than the window as its base.
            while h.len() > 2 && now.duration_since(h[1].0) > window {
                h.pop_front();
            }
            let (base, last) = (h[0], h[h.len() - 1]);
            let w = self.watch.get(path);
            let mut sample = sample(base, last, &st, w.map_or(0, |w| u64::from(w.waiting())));
            sample.rtt_sd_ms = w.and_then(|w| w.rtt_ms()).map(|(_, sd)| sd);
            sample.verdict = w.map(|w| w.verdict);
            out.insert((path.nic.clone(), path.target), sample);
        }
        out
    }
}

/// One path's sample from the counters at the window's start (`base`) and now (`last`),
/// (when, sent, received) each, and the kernel's latest RTT and TTL in `st`; `in_flight`
/// probes were sent but not yet answered or given up on.
fn sample(base: (Instant, u64, u64), last: (Instant, u64, u64), st: &ProbeStats, in_flight: u64) -> Sample {
    let sent = last.1.saturating_sub(base.1);
    let replies = last.2.saturating_sub(base.2).min(sent);
    let rtt_ms = (st.received > 0).then(|| st.rtt_ewma_ns as f64 / 1e6);
    let lost = (sent - replies).saturating_sub(in_flight);
    let loss_pct = (sent > 0).then(|| 100.0 * lost as f64 / sent as f64);
    let hops = (st.received > 0).then(|| havip_common::hops_from_ttl(st.last_ttl));
    Sample { rtt_ms, loss_pct, hops, sent, replies, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(nic: &str, t: &str) -> Path {
        Path { nic: nic.into(), target: t.parse().unwrap() }
    }

    #[test]
    fn slots_stay_with_their_paths() {
        let wanted: BTreeSet<Path> = [p("a0", "198.18.50.1"), p("b0", "198.18.50.1")].into();
        let (first, freed) = assign_slots(&BTreeMap::new(), &wanted);
        assert!(freed.is_empty());
        assert_eq!(first[&p("a0", "198.18.50.1")], 0);
        let wanted: BTreeSet<Path> = [p("b0", "198.18.50.1"), p("c0", "198.18.50.1")].into();
        let (second, freed) = assign_slots(&first, &wanted);
        assert_eq!(second[&p("b0", "198.18.50.1")], first[&p("b0", "198.18.50.1")], "kept");
        assert_eq!(freed, vec![0]);
        assert_eq!(second[&p("c0", "198.18.50.1")], 2, "the freed slot is not reused in the same round");
    }
}
