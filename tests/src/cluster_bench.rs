//! Cluster mode for `cargo xtask bench`: three havipd nodes and a three-member etcd in
//! namespaces ([`ClusterLab`]), one VIP preferring n1, the client streaming a probe every
//! 2 ms and capturing every ARP/ND claim while it asks for the VIP every 20 ms.
//!
//! - **Node failover** (crash: SIGKILL + cables out; link cut: cables out, havipd running):
//!   the gap is the time between the last answer from n1 and the first from n2. The
//!   baseline is the longest time between two answers in a window of the same length
//!   without a fault: the stream's own jitter. Each trial checks its path: n2's
//!   `ownership_changes{owner-silent}` grew by exactly one.
//! - **Giveback**: n1 comes back, and after the (bench: 1 s) hold-down n2 hands the VIP
//!   over; the gap is from n2's last answer to n1's first. Path: n2's
//!   `ownership_changes{giveback}` grew by exactly one.
//! - **Partitions**: randomized heartbeat cuts, one-way losses, etcd cuts and cable pulls
//!   of 20-400 ms against the owner or another node; every moment two nodes claim the VIP
//!   is counted (target 0).
//! - **etcd**: the raft leader killed (then restarted), and the whole etcd stopped for a
//!   minute: probes lost and moves, against the same window without the fault.

use std::{
    collections::HashMap,
    thread::sleep,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    cluster::{
        handoff_separations, log_secs, two_owner_moments, ArpAsker, ClusterLab, EchoResponder, NeighCapture, NeighEvent, ProbeReport, ProbeStream, CLUSTER_VIP,
    },
    percentile,
};

const PORT: u16 = 7000;
/// The bench's giveback hold-down: short, so every failover trial ends with a giveback.
const HOLD_DOWN_MS: u64 = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct GapStats {
    pub trials: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl GapStats {
    pub fn of(samples_ms: Vec<f64>) -> Self {
        assert!(!samples_ms.is_empty(), "no samples");
        GapStats {
            trials: samples_ms.len(),
            p50_ms: percentile(&samples_ms, 0.5),
            p99_ms: percentile(&samples_ms, 0.99),
            max_ms: samples_ms.iter().cloned().fold(0.0, f64::max),
            samples_ms,
        }
    }

    /// (p50, p99) of these as ratios to `baseline`'s.
    pub fn ratios_to(&self, baseline: &GapStats) -> (f64, f64) {
        (self.p50_ms / baseline.p50_ms, self.p99_ms / baseline.p99_ms)
    }
}

#[derive(Debug, Serialize)]
pub struct FailoverKind {
    pub failover: GapStats,
    pub giveback: GapStats,
    /// The stream's longest time between answers in fault-free windows of the same length.
    pub baseline: GapStats,
    pub failover_p50_ratio_to_baseline: f64,
    pub failover_p99_ratio_to_baseline: f64,
    /// Two-owner moments during these trials.
    pub two_owner_moments: usize,
}

/// A two-owner moment, with what was going on: the partition trial whose window holds
/// it, and every node's ownership log lines from 300 ms before to 100 ms after.
#[derive(Debug, Serialize)]
pub struct TwoOwnerMoment {
    pub what: String,
    pub trial: Option<String>,
    pub logs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Partitions {
    pub trials: usize,
    /// Trials by kind of fault.
    pub kinds: std::collections::BTreeMap<String, usize>,
    pub claims_captured: usize,
    pub two_owner_moments: usize,
    /// Changes of owner the client saw in its ARP/ND claims.
    pub handoffs: usize,
    /// The five closest: how long before the new owner's first claim the old owner
    /// claimed last (ms). How near the trials came to a two-owner moment.
    pub closest_handoffs_ms: Vec<f64>,
    /// Times the answering node changed.
    pub moves: usize,
    pub probes_sent: u64,
    pub probes_lost: u64,
    pub moments: Vec<TwoOwnerMoment>,
}

impl Partitions {
    fn note_handoffs(&mut self, claims: &[NeighEvent], macs: &HashMap<String, String>, from: Instant, to: Instant) {
        let within: Vec<NeighEvent> = claims.iter().filter(|e| e.at >= from && e.at < to).cloned().collect();
        let mut seps: Vec<f64> = handoff_separations(&within, macs).iter().map(|d| d.as_secs_f64() * 1e3).collect();
        seps.sort_by(f64::total_cmp);
        self.handoffs = seps.len();
        self.closest_handoffs_ms = seps.into_iter().take(5).collect();
    }
}

#[derive(Debug, Serialize)]
pub struct EtcdFault {
    pub what: String,
    pub trials: usize,
    pub window_s: f64,
    pub probes_sent: u64,
    pub probes_lost: u64,
    pub moves: usize,
    /// The same length of stream right before, without the fault.
    pub baseline_probes_lost: u64,
    pub baseline_moves: usize,
}

#[derive(Debug, Serialize)]
pub struct ClusterBench {
    pub method: String,
    pub crash: FailoverKind,
    pub link_cut: FailoverKind,
    pub partitions: Partitions,
    pub etcd_leader_kill: EtcdFault,
    pub etcd_outage: EtcdFault,
    pub target_failover_p50_ms: f64,
    pub target_failover_p99_ms: f64,
    pub target_giveback_p99_ms: f64,
    pub targets_met: bool,
}

/// The lab of the bench: nodes started with the bench hold-down, echo responders, the
/// client's capture and ARP asker for the whole run.
struct Bench {
    lab: ClusterLab,
    _echo: Vec<EchoResponder>,
    capture: Option<NeighCapture>,
    asker: Option<ArpAsker>,
    /// One instant and the wall clock then: node logs are stamped in UTC.
    epoch: (Instant, std::time::SystemTime),
    /// Partition trials: start, end, what.
    trials: Vec<(Instant, Instant, String)>,
}

fn node_config(lab: &ClusterLab, k: usize) -> String {
    let c = lab.node_config(k, &[CLUSTER_VIP], "");
    let out = c.replace("giveback_hold_down_ms = 30000", &format!("giveback_hold_down_ms = {HOLD_DOWN_MS}"));
    assert_ne!(out, c, "the harness's config no longer sets the hold-down");
    out
}

/// `reason`'s ownership-change counter on node `k`.
fn changes(lab: &ClusterLab, k: usize, reason: &str) -> f64 {
    lab.metric(k, &format!("havip_cluster_ownership_changes_total{{reason=\"{reason}\"}}")).unwrap_or_else(|| panic!("n{k} exports no {reason} counter"))
}

/// Waits (up to a second: the status behind the metrics is republished every 100 ms) for
/// `reason`'s counter on node `k` to reach `want`, then checks it is exactly that.
fn expect_changes(lab: &ClusterLab, k: usize, reason: &str, want: f64, what: &str) {
    let t = Instant::now();
    while changes(lab, k, reason) < want && t.elapsed() < Duration::from_secs(1) {
        sleep(Duration::from_millis(20));
    }
    assert_eq!(changes(lab, k, reason), want, "{what}");
}

/// Who serves the VIP as node `k` reports it: (owner, this node's part).
fn owner(lab: &ClusterLab, k: usize) -> Option<(String, String)> {
    let out = lab.havip(k, &["cluster", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["vips"][0]["owner"].as_str()?.to_string(), v["vips"][0]["here"].as_str()?.to_string()))
}

fn wait_serving(lab: &ClusterLab, k: usize, within: Duration) {
    let t = Instant::now();
    let me = lab.node_name(k).to_string();
    while owner(lab, k) != Some((me.clone(), "serving".into())) {
        assert!(t.elapsed() < within, "n{k} did not serve the VIP within {within:?} (it says {:?})", owner(lab, k));
        sleep(Duration::from_millis(10));
    }
}

/// The time from the last answer of `from` to the first of `to` after `after`.
fn transition_gap(r: &ProbeReport, after: Instant, from: &str, to: &str) -> Option<Duration> {
    let i = r.answers.iter().position(|a| a.at >= after && a.node == to)?;
    let prev = r.answers[..i].iter().rev().find(|a| a.node == from)?;
    Some(r.answers[i].at.saturating_duration_since(prev.at))
}

/// The longest time between two answers in `[from, from + len)`.
fn longest_gap_in(r: &ProbeReport, from: Instant, len: Duration) -> Duration {
    let w: Vec<Instant> = r.answers.iter().map(|a| a.at).filter(|t| *t >= from && *t < from + len).collect();
    w.windows(2).map(|p| p[1].saturating_duration_since(p[0])).max().unwrap_or(len)
}

fn moves_in(r: &ProbeReport, from: Instant, to: Instant) -> usize {
    let nodes: Vec<&str> = r.answers.iter().filter(|a| a.at >= from && a.at < to).map(|a| a.node.as_str()).collect();
    nodes.windows(2).filter(|w| w[0] != w[1]).count()
}

/// Probes sent in `[from, to)` without an answer, by sequence number.
fn lost_in(r: &ProbeReport, from_seq: u64, to_seq: u64) -> u64 {
    let answered = r.answers.iter().filter(|a| a.seq >= from_seq && a.seq < to_seq).count() as u64;
    (to_seq - from_seq).saturating_sub(answered)
}

impl Bench {
    fn new() -> Self {
        let mut lab = ClusterLab::new(3, 3);
        for k in 1..=3 {
            let c = node_config(&lab, k);
            lab.start_node_with(k, &c);
        }
        wait_serving(&lab, 1, Duration::from_secs(15));
        let echo = lab.echo_on_all_nodes(PORT);
        let capture = NeighCapture::start(lab.client_ns(), "eth0");
        // Every 2 ms: an old owner answering even 2 ms into its successor's time is caught,
        // and the closest handoffs are measured to that resolution.
        let asker = ArpAsker::start(lab.client_ns(), &[CLUSTER_VIP], Duration::from_millis(2));
        Bench { lab, _echo: echo, capture: Some(capture), asker: Some(asker), epoch: (Instant::now(), std::time::SystemTime::now()), trials: Vec::new() }
    }

    /// Seconds since midnight UTC at `at`.
    fn day_secs(&self, at: Instant) -> f64 {
        let wall = if at >= self.epoch.0 { self.epoch.1 + (at - self.epoch.0) } else { self.epoch.1 - (self.epoch.0 - at) };
        wall.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64() % 86_400.0
    }

    fn explain(&self, v: &crate::cluster::Violation) -> TwoOwnerMoment {
        let trial = self
            .trials
            .iter()
            .find(|(a, z, _)| v.at >= *a && v.at < *z + Duration::from_millis(500))
            .map(|(a, _, w)| format!("{w} (began {:.1} ms before)", v.at.saturating_duration_since(*a).as_secs_f64() * 1e3));
        let t = self.day_secs(v.at);
        let mut logs = Vec::new();
        for k in 1..=self.lab.node_count() {
            for l in self.lab.node_log(k).lines().filter(|l| l.contains("ownership") || l.contains("announce")) {
                if log_secs(l).is_some_and(|s| s > t - 0.3 && s < t + 0.1) {
                    logs.push(format!("n{k}: {l}"));
                }
            }
        }
        logs.sort_by(|a, b| a[4..].cmp(&b[4..]));
        TwoOwnerMoment {
            what: format!(
                "{:?} {} claimed by {} while {} owned it (since {:.1} ms before)",
                v.kind,
                v.ip,
                v.node,
                v.other,
                v.at.saturating_duration_since(v.other_since).as_secs_f64() * 1e3
            ),
            trial,
            logs,
        }
    }

    fn stream(&self) -> ProbeStream {
        let s = ProbeStream::start(self.lab.client_ns(), CLUSTER_VIP, PORT, Duration::from_millis(2));
        sleep(Duration::from_millis(300));
        s
    }

    /// `trials` failovers of n1 (crash or cable cut) and the giveback that follows each.
    fn failovers(&mut self, trials: usize, crash: bool, label: &str) -> (FailoverKind, Instant, Instant) {
        let started = Instant::now();
        let stream = self.stream();
        let (mut faults, mut baselines, mut givebacks_at) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..trials {
            eprint!("\r  {label}: trial {}/{trials}   ", t + 1);
            wait_serving(&self.lab, 1, Duration::from_secs(10));
            // A fault-free window of the same length first: the baseline.
            let quiet = Instant::now();
            sleep(Duration::from_millis(400));
            baselines.push(quiet);
            let (silent_before, giveback_before) = (changes(&self.lab, 2, "owner-silent"), changes(&self.lab, 2, "giveback"));
            let at = Instant::now();
            if crash {
                self.lab.kill_node(1);
            }
            self.lab.node_links(1, false);
            wait_serving(&self.lab, 2, Duration::from_secs(5));
            expect_changes(
                &self.lab,
                2,
                "owner-silent",
                silent_before + 1.0,
                &format!("{label} trial {t}: n2 did not take over by exactly one owner-silent claim"),
            );
            faults.push(at);
            self.lab.node_links(1, true);
            let back = Instant::now();
            if crash {
                let c = node_config(&self.lab, 1);
                self.lab.start_node_with(1, &c);
            }
            wait_serving(&self.lab, 1, Duration::from_secs(10) + Duration::from_millis(HOLD_DOWN_MS));
            expect_changes(&self.lab, 2, "giveback", giveback_before + 1.0, &format!("{label} trial {t}: the VIP came back other than by one giveback"));
            givebacks_at.push(back);
            sleep(Duration::from_millis(100));
        }
        eprintln!();
        let r = stream.stop();
        let window = Duration::from_millis(400);
        let failover: Vec<f64> = faults
            .iter()
            .enumerate()
            .map(|(t, at)| {
                transition_gap(&r, *at, "n1", "n2").unwrap_or_else(|| panic!("{label} trial {t}: no n1 -> n2 transition in the stream")).as_secs_f64() * 1e3
            })
            .collect();
        let giveback: Vec<f64> = givebacks_at
            .iter()
            .enumerate()
            .map(|(t, at)| {
                transition_gap(&r, *at, "n2", "n1").unwrap_or_else(|| panic!("{label} trial {t}: no n2 -> n1 transition in the stream")).as_secs_f64() * 1e3
            })
            .collect();
        let baseline: Vec<f64> = baselines.iter().map(|q| longest_gap_in(&r, *q, window).as_secs_f64() * 1e3).collect();
        let (failover, giveback, baseline) = (GapStats::of(failover), GapStats::of(giveback), GapStats::of(baseline));
        let kind = FailoverKind {
            failover_p50_ratio_to_baseline: failover.p50_ms / baseline.p50_ms.max(0.001),
            failover_p99_ratio_to_baseline: failover.p99_ms / baseline.p99_ms.max(0.001),
            failover,
            giveback,
            baseline,
            two_owner_moments: 0,
        };
        (kind, started, Instant::now())
    }

    fn partitions(&mut self, trials: usize) -> (Partitions, Instant, Instant) {
        let started = Instant::now();
        let stream = self.stream();
        let first_seq = stream.sent();
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        // A fixed seed: the same series on every run.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for t in 0..trials {
            if t % 10 == 0 {
                eprint!("\r  partitions: trial {}/{trials}   ", t + 1);
            }
            let owner: usize = stream.live().last_node.strip_prefix('n').and_then(|n| n.parse().ok()).unwrap_or(1);
            let other = (owner + next(2) as usize) % 3 + 1;
            let target = if next(3) == 0 { other } else { owner };
            let hold = Duration::from_millis(20 + next(380));
            let kind = next(6);
            let name = ["heartbeats cut", "outgoing heartbeats lost", "incoming heartbeats lost", "etcd cut", "cables out", "one peer's heartbeats lost"]
                [kind as usize];
            let label = match (kind, target == owner) {
                (5, _) => name.to_string(),
                (_, true) => format!("{name} (owner)"),
                (_, false) => format!("{name} (other node)"),
            };
            *kinds.entry(label).or_default() += 1;
            let lab = &self.lab;
            let apply = |on: bool| match kind {
                0 => lab.cut_peers(target, on),
                1 => lab.one_way_loss(target, true, on),
                2 => lab.one_way_loss(target, false, on),
                3 => lab.cut_etcd(target, on),
                4 => lab.node_links(target, !on),
                _ => lab.drop_heartbeats_from(other, owner, on),
            };
            let began = Instant::now();
            apply(true);
            sleep(hold);
            apply(false);
            self.trials.push((began, Instant::now(), format!("trial {t}: {name} on n{target} (owner n{owner}, other n{other}) for {} ms", hold.as_millis())));
            sleep(Duration::from_millis(150));
        }
        eprintln!();
        // Let a pending giveback finish inside the window.
        sleep(Duration::from_millis(HOLD_DOWN_MS + 500));
        let last_seq = stream.sent();
        let r = stream.stop();
        let p = Partitions {
            trials,
            kinds,
            claims_captured: 0,
            two_owner_moments: 0,
            handoffs: 0,
            closest_handoffs_ms: Vec::new(),
            moves: moves_in(&r, r.started, r.stopped),
            probes_sent: last_seq - first_seq,
            probes_lost: lost_in(&r, first_seq, last_seq),
            moments: Vec::new(),
        };
        (p, started, Instant::now())
    }

    /// `trials` times: the etcd leader killed for `down`, restarted, waited for; the same
    /// length of stream without the fault right before each is the baseline.
    fn etcd_leader_kills(&mut self, trials: usize, down: Duration) -> EtcdFault {
        let stream = self.stream();
        let window = down + Duration::from_secs(2);
        let mut spans = Vec::new();
        for t in 0..trials {
            eprint!("\r  etcd leader kill: trial {}/{trials}   ", t + 1);
            let (q0, qs0) = (Instant::now(), stream.sent());
            sleep(window);
            let (q1, qs1) = (Instant::now(), stream.sent());
            let leader = self.lab.etcd_leader();
            let (f0, fs0) = (Instant::now(), stream.sent());
            self.lab.kill_etcd_member(leader);
            sleep(down);
            let new_leader = self.lab.try_etcd_leader();
            assert!(new_leader.as_ref().is_ok_and(|l| *l != leader), "trial {t}: no new etcd leader after killing e{leader}: {new_leader:?}");
            self.lab.restart_etcd_member(leader);
            self.lab.wait_etcd_healthy(Duration::from_secs(10));
            sleep(window.saturating_sub(f0.elapsed()));
            spans.push(((q0, qs0, q1, qs1), (f0, fs0, Instant::now(), stream.sent())));
        }
        eprintln!();
        let r = stream.stop();
        let mut out = EtcdFault {
            what: format!("etcd raft leader SIGKILLed for {} s, then restarted", down.as_secs()),
            trials,
            window_s: window.as_secs_f64(),
            probes_sent: 0,
            probes_lost: 0,
            moves: 0,
            baseline_probes_lost: 0,
            baseline_moves: 0,
        };
        for ((q0, qs0, q1, qs1), (f0, fs0, f1, fs1)) in spans {
            out.baseline_probes_lost += lost_in(&r, qs0, qs1);
            out.baseline_moves += moves_in(&r, q0, q1);
            out.probes_sent += fs1 - fs0;
            out.probes_lost += lost_in(&r, fs0, fs1);
            out.moves += moves_in(&r, f0, f1);
        }
        out
    }

    /// Every etcd member stopped for `down`; the same length without the fault before it.
    fn etcd_outage(&mut self, down: Duration) -> EtcdFault {
        let stream = self.stream();
        eprintln!("  etcd outage: {} s without a fault, then {} s with every member stopped", down.as_secs(), down.as_secs());
        let (q0, qs0) = (Instant::now(), stream.sent());
        sleep(down);
        let (q1, qs1) = (Instant::now(), stream.sent());
        let failures_before = self.lab.metric(1, "havip_cluster_etcd_read_failures_total").unwrap_or(0.0);
        let acked_before = self.lab.metric(1, "havip_cluster_lease_renewals_total{by=\"acknowledged\"}").unwrap_or(0.0);
        self.lab.stop_etcd(true);
        sleep(down);
        // The path: n1 kept its fence on acknowledgements, not on etcd.
        let failures = self.lab.metric(1, "havip_cluster_etcd_read_failures_total").unwrap_or(0.0) - failures_before;
        let acked = self.lab.metric(1, "havip_cluster_lease_renewals_total{by=\"acknowledged\"}").unwrap_or(0.0) - acked_before;
        let (f1, fs1) = (Instant::now(), stream.sent());
        self.lab.stop_etcd(false);
        sleep(Duration::from_secs(1));
        let r = stream.stop();
        assert!(failures > 0.0 && acked > 0.0, "during the outage n1 saw {failures} failed reads and made {acked} acknowledged renewals");
        EtcdFault {
            what: format!("every etcd member SIGKILLed for {} s, then restarted", down.as_secs()),
            trials: 1,
            window_s: down.as_secs_f64(),
            probes_sent: fs1 - qs1,
            probes_lost: lost_in(&r, qs1, fs1),
            moves: moves_in(&r, q1, f1),
            baseline_probes_lost: lost_in(&r, qs0, qs1),
            baseline_moves: moves_in(&r, q0, q1),
        }
    }
}

/// The partition trials alone (`cargo xtask bench -- --only cluster-partitions`).
pub fn run_partitions(trials: usize) -> Partitions {
    let mut b = Bench::new();
    let (mut partitions, p0, p1) = b.partitions(trials);
    b.asker.take().unwrap().stop();
    let claims = b.capture.take().unwrap().stop();
    let violations = two_owner_moments(&claims, &b.lab.mac_to_node());
    partitions.two_owner_moments = violations.len();
    partitions.claims_captured = claims.iter().filter(|e| e.at >= p0 && e.at < p1).count();
    partitions.moments = violations.iter().map(|v| b.explain(v)).collect();
    partitions.note_handoffs(&claims, &b.lab.mac_to_node(), p0, p1);
    partitions
}

pub fn run(failover_trials: usize, partition_trials: usize, leader_kills: usize, outage: Duration) -> ClusterBench {
    let mut b = Bench::new();
    let (mut crash, c0, c1) = b.failovers(failover_trials, true, "crash");
    let (mut link_cut, l0, l1) = b.failovers(failover_trials, false, "link cut");
    let (mut partitions, p0, p1) = b.partitions(partition_trials);
    let etcd_leader_kill = b.etcd_leader_kills(leader_kills, Duration::from_secs(3));
    let etcd_outage = b.etcd_outage(outage);
    b.asker.take().unwrap().stop();
    let claims = b.capture.take().unwrap().stop();
    let violations = two_owner_moments(&claims, &b.lab.mac_to_node());
    let within = |a: Instant, z: Instant| violations.iter().filter(|v| v.at >= a && v.at < z).count();
    crash.two_owner_moments = within(c0, c1);
    link_cut.two_owner_moments = within(l0, l1);
    partitions.two_owner_moments = within(p0, p1);
    partitions.moments = violations.iter().map(|v| b.explain(v)).collect();
    partitions.claims_captured = claims.iter().filter(|e| e.at >= p0 && e.at < p1).count();
    partitions.note_handoffs(&claims, &b.lab.mac_to_node(), p0, p1);
    let (t50, t99, tg) = (100.0, 150.0, 50.0);
    let targets_met =
        [&crash, &link_cut].iter().all(|k| k.failover.p50_ms <= t50 && k.failover.p99_ms <= t99 && k.giveback.p99_ms <= tg && k.two_owner_moments == 0)
            && violations.is_empty()
            && partitions.trials >= 1000
            && etcd_leader_kill.probes_lost == 0
            && etcd_leader_kill.moves == 0
            && etcd_outage.probes_lost == 0
            && etcd_outage.moves == 0;
    ClusterBench {
        method: "3 havipd nodes + 3 etcd members in namespaces; client probe every 2 ms, kernel receive timestamps; gaps between answers".into(),
        crash,
        link_cut,
        partitions,
        etcd_leader_kill,
        etcd_outage,
        target_failover_p50_ms: t50,
        target_failover_p99_ms: t99,
        target_giveback_p99_ms: tg,
        targets_met,
    }
}
