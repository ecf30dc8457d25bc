//! Placement of granted VIPs across nodes (issue 13). Pure: the nodes' published reports
//! and the ledger in, the nodes ranked for a request (and why) out. The request path, the
//! managing node and `havip explain` all call [`rank_nodes`], so they agree.
//!
//! A node's standing for a request, best first:
//! 1. alive: its report is in etcd (kept there by a lease) and it says healthy;
//! 2. how many of the request's targets it reaches;
//! 3. its path cost to them, by the in-node cost model (`ranking::Settings::path_cost` on
//!    the measured RTT and loss; a path with probes sent and no reply is unreachable, one
//!    without probes unknown; combined by the ranking's mean or sum). Costs within the ranking margin of
//!    the best (relative, and at least `min_gain`) count as equal: noise does not decide;
//! 4. fewest of the application's VIPs already on it (an application's VIPs spread);
//! 5. load: granted VIPs on it, where counts within `load_slack` of the least loaded node
//!    count as equal;
//! 6. the node asked (its spares answer at once), then the name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::pools::{AllocRecord, State};
use crate::config::{
    cluster::Placement,
    ranking::{Combine, Settings},
};

/// What a node publishes for placement, `<key_prefix>-manager/nodes/<node>` under a lease:
/// gone with the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// At least one NIC up with the dataplane attached.
    pub healthy: bool,
    /// VIPs it serves now.
    pub serving: usize,
    /// Bytes per second through its VIPs over the last interval.
    pub traffic_bps: u64,
    /// Its best measured path (over its NICs) to each target it probes.
    pub paths: BTreeMap<IpAddr, PathReport>,
    pub at_unix_ms: u64,
}

/// One measured path, as the kernel's probes saw it over the ranking window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    pub rtt_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    pub sent: u64,
    pub replies: u64,
}

impl PathReport {
    /// Its cost, if it reaches the target and was measured.
    fn cost(&self, w: &Settings) -> Option<f64> {
        (self.sent > 0 && self.replies > 0).then(|| w.path_cost(self.rtt_ms.unwrap_or(0.0), self.loss_pct.unwrap_or(0.0), 0.0))
    }
}

/// What placement weighs of a request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub app: &'a str,
    pub targets: &'a [IpAddr],
    /// The node asked (its spares answer at once: it wins ties).
    pub asked: &'a str,
}

/// One node's standing for a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRank {
    pub node: String,
    pub alive: bool,
    /// Of the request's targets, those it reaches.
    pub reachable: usize,
    /// Combined path cost to them (`None`: no targets, or none measured).
    pub cost: Option<f64>,
    /// Within the margin of the best cost (always, without costs).
    pub near_best: bool,
    /// The application's VIPs on it.
    pub app_vips: usize,
    /// Granted VIPs on it.
    pub vips: usize,
    /// VIPs beyond the least loaded node's count plus the slack (0: as good as the least).
    pub load_excess: usize,
}

/// Granted VIPs per node, and the application's.
pub fn counts<'r>(records: impl IntoIterator<Item = &'r AllocRecord>, app: &str) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let (mut all, mut mine) = (BTreeMap::new(), BTreeMap::new());
    for r in records.into_iter().filter(|r| r.state == State::Granted) {
        *all.entry(r.node.clone()).or_insert(0) += 1;
        if r.uses.iter().any(|u| u.app == app) {
            *mine.entry(r.node.clone()).or_insert(0) += 1;
        }
    }
    (all, mine)
}

/// A node's combined cost to `targets` from its report: (targets reached, cost).
pub fn path_cost(report: Option<&NodeReport>, targets: &[IpAddr], w: &Settings) -> (usize, Option<f64>) {
    let costs: Vec<f64> = targets.iter().filter_map(|t| report.and_then(|r| r.paths.get(t)).and_then(|p| p.cost(w))).collect();
    if costs.is_empty() {
        return (0, None);
    }
    let sum: f64 = costs.iter().sum();
    let cost = match w.combine {
        Combine::Sum => sum,
        Combine::Mean => sum / costs.len() as f64,
    };
    (costs.len(), Some(cost))
}

/// Whether `cost` is within the margin of `best` (relative, and at least `min_gain`).
pub fn within_margin(cost: f64, best: f64, w: &Settings) -> bool {
    cost <= best + (best.abs() * w.margin).max(w.min_gain)
}

/// `nodes` ranked for `ask`, best first. `alive` holds the nodes placement may use;
/// `records` are the ledger's.
pub fn rank_nodes<'r>(
    ask: Ask<'_>,
    nodes: &[String],
    alive: &BTreeSet<String>,
    reports: &BTreeMap<String, NodeReport>,
    records: impl IntoIterator<Item = &'r AllocRecord>,
    w: &Settings,
    p: &Placement,
) -> Vec<NodeRank> {
    let local = ask.asked;
    let (all, mine) = counts(records, ask.app);
    let least = nodes.iter().filter(|n| alive.contains(*n)).map(|n| all.get(n).copied().unwrap_or(0)).min().unwrap_or(0);
    let mut out: Vec<NodeRank> = nodes
        .iter()
        .map(|n| {
            let (reachable, cost) = path_cost(reports.get(n), ask.targets, w);
            let vips = all.get(n).copied().unwrap_or(0);
            NodeRank {
                node: n.clone(),
                alive: alive.contains(n),
                reachable,
                cost,
                near_best: true,
                app_vips: mine.get(n).copied().unwrap_or(0),
                vips,
                load_excess: vips.saturating_sub(least + p.load_slack),
            }
        })
        .collect();
    let most_reached = out.iter().filter(|r| r.alive).map(|r| r.reachable).max().unwrap_or(0);
    let best = out.iter().filter(|r| r.alive && r.reachable == most_reached).filter_map(|r| r.cost).min_by(f64::total_cmp);
    for r in &mut out {
        r.near_best = r.alive
            && r.reachable == most_reached
            && match (r.cost, best) {
                (Some(c), Some(b)) => within_margin(c, b, w),
                (None, None) => true,
                _ => false,
            };
    }
    out.sort_by(|a, b| {
        b.alive
            .cmp(&a.alive)
            .then(b.reachable.cmp(&a.reachable))
            .then(b.near_best.cmp(&a.near_best))
            .then_with(|| if a.near_best { std::cmp::Ordering::Equal } else { a.cost.unwrap_or(f64::INFINITY).total_cmp(&b.cost.unwrap_or(f64::INFINITY)) })
            .then(a.app_vips.cmp(&b.app_vips))
            .then(a.load_excess.cmp(&b.load_excess))
            .then((b.node == local).cmp(&(a.node == local)))
            .then(a.node.cmp(&b.node))
    });
    out
}

/// Why the first of `ranked` leads, in words (for the grant's log line and `explain`):
/// against the node asked when another node won, else against the runner-up.
pub fn why(ranked: &[NodeRank], asked: &str) -> String {
    let Some(first) = ranked.first() else { return "no node".into() };
    if !first.alive {
        return "no node is alive in etcd".into();
    }
    let other = match ranked.iter().find(|r| r.node == asked && r.node != first.node) {
        Some(a) => a,
        None => match ranked.get(1).filter(|r| r.alive) {
            Some(r) => r,
            None => return "the only node alive".into(),
        },
    };
    if !other.alive {
        format!("{} is not alive in etcd", other.node)
    } else if first.reachable != other.reachable {
        format!("reaches {} target(s), {} reaches {}", first.reachable, other.node, other.reachable)
    } else if first.near_best != other.near_best {
        format!("lowest path cost ({:.2}; {} {:.2}, beyond the margin)", first.cost.unwrap_or(0.0), other.node, other.cost.unwrap_or(0.0))
    } else if first.app_vips != other.app_vips {
        format!("holds {} of the application's VIPs, {} holds {}: spread", first.app_vips, other.node, other.app_vips)
    } else if first.load_excess != other.load_excess {
        format!("least loaded ({} VIPs; {} has {}, beyond the slack)", first.vips, other.node, other.vips)
    } else if first.node == asked {
        "equal standing: the node asked".into()
    } else {
        "equal standing: the first by name".into()
    }
}

/// `explain` text: every node's standing for the request.
pub fn render(ranked: &[NodeRank], asked: &str) -> String {
    let mut out = format!("{:<12} {:<6} {:>9} {:>9} {:>5} {:>8} {:>5} {:>7}\n", "NODE", "ALIVE", "REACHED", "COST", "NEAR", "APP_VIPS", "VIPS", "EXCESS");
    for r in ranked {
        out += &format!(
            "{:<12} {:<6} {:>9} {:>9} {:>5} {:>8} {:>5} {:>7}\n",
            r.node,
            if r.alive { "yes" } else { "no" },
            r.reachable,
            r.cost.map_or("-".into(), |c| format!("{c:.2}")),
            if r.near_best { "yes" } else { "no" },
            r.app_vips,
            r.vips,
            r.load_excess
        );
    }
    out + &format!("chosen: {} ({})", ranked.first().map_or("-", |r| r.node.as_str()), why(ranked, asked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{pools::Use, vipgen::AddrKey};
    use crate::config::Protocol;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nodes() -> Vec<String> {
        ["n1", "n2", "n3"].map(String::from).to_vec()
    }

    fn report(node: &str, paths: &[(&str, f64, f64)]) -> NodeReport {
        NodeReport {
            node: node.into(),
            healthy: true,
            paths: paths.iter().map(|(t, rtt, loss)| (ip(t), PathReport { rtt_ms: Some(*rtt), loss_pct: Some(*loss), sent: 50, replies: 50 })).collect(),
            ..Default::default()
        }
    }

    fn granted(node: &str, app: &str) -> AllocRecord {
        let u = Use { app: app.into(), protocol: Protocol::Tcp, service_port: 80, instance_port: 8080, exclusive: true, targets: Vec::new(), class: None };
        AllocRecord { state: State::Granted, checked: true, uses: vec![u], ..AllocRecord::spare(node) }
    }

    fn ledger(owners: &[(&str, &str)]) -> BTreeMap<AddrKey, AllocRecord> {
        owners.iter().enumerate().map(|(i, (n, app))| (("prod".to_string(), ip(&format!("198.18.200.{}", 10 + i))), granted(n, app))).collect()
    }

    fn order(r: &[NodeRank]) -> Vec<&str> {
        r.iter().map(|r| r.node.as_str()).collect()
    }

    fn all_alive() -> BTreeSet<String> {
        nodes().into_iter().collect()
    }

    #[test]
    fn the_best_path_wins_and_noise_within_the_margin_does_not() {
        let (w, p) = (Settings::default(), Placement::default());
        let t = [ip("198.18.9.1")];
        let reports = BTreeMap::from([
            ("n1".to_string(), report("n1", &[("198.18.9.1", 30.0, 0.0)])),
            ("n2".to_string(), report("n2", &[("198.18.9.1", 2.0, 0.0)])),
            ("n3".to_string(), report("n3", &[("198.18.9.1", 2.5, 0.0)])),
        ]);
        let r = rank_nodes(Ask { app: "a", targets: &t, asked: "n1" }, &nodes(), &all_alive(), &reports, [], &w, &p);
        // n2 and n3 are within the margin of each other: the tie goes by load, then name;
        // n1 (the node asked) is far worse and comes last.
        assert_eq!(order(&r), ["n2", "n3", "n1"]);
        assert!(!r[2].near_best);
        // n2 already has much more load: n3, equal within the margin, is chosen.
        let busy = ledger(&[("n2", "x"), ("n2", "y"), ("n2", "z")]);
        let r = rank_nodes(Ask { app: "a", targets: &t, asked: "n1" }, &nodes(), &all_alive(), &reports, busy.values(), &w, &p);
        assert_eq!(r[0].node, "n3");
        assert!(why(&r, "n2").contains("least loaded"), "{}", why(&r, "n2"));
        assert!(why(&r, "n1").contains("lowest path cost"), "{}", why(&r, "n1"));
    }

    #[test]
    fn a_node_reaching_more_targets_wins_over_a_cheaper_one() {
        let (w, p) = (Settings::default(), Placement::default());
        let t = [ip("198.18.9.1"), ip("198.18.9.2")];
        let reports = BTreeMap::from([
            ("n1".to_string(), report("n1", &[("198.18.9.1", 1.0, 0.0)])),
            ("n2".to_string(), report("n2", &[("198.18.9.1", 9.0, 0.0), ("198.18.9.2", 9.0, 0.0)])),
        ]);
        let r = rank_nodes(Ask { app: "a", targets: &t, asked: "n1" }, &nodes(), &all_alive(), &reports, [], &w, &p);
        assert_eq!(r[0].node, "n2");
        assert!(why(&r, "n1").contains("reaches 2"), "{}", why(&r, "n1"));
    }

    #[test]
    fn an_applications_vips_spread_and_the_node_asked_breaks_ties() {
        let (w, p) = (Settings::default(), Placement::default());
        let none = BTreeMap::new();
        // Nothing to tell them apart: the node asked.
        let r = rank_nodes(Ask { app: "a", targets: &[], asked: "n2" }, &nodes(), &all_alive(), &none, [], &w, &p);
        assert_eq!(order(&r), ["n2", "n1", "n3"]);
        // a holds one on n2: the next goes elsewhere, even though n2 was asked.
        let l = ledger(&[("n2", "a")]);
        let r = rank_nodes(Ask { app: "a", targets: &[], asked: "n2" }, &nodes(), &all_alive(), &none, l.values(), &w, &p);
        assert_eq!(order(&r), ["n1", "n3", "n2"]);
        // Load within the slack does not count; beyond it, it does.
        let l = ledger(&[("n2", "x"), ("n2", "y")]);
        assert_eq!(rank_nodes(Ask { app: "a", targets: &[], asked: "n2" }, &nodes(), &all_alive(), &none, l.values(), &w, &p)[0].node, "n2");
        let l = ledger(&[("n2", "x"), ("n2", "y"), ("n2", "z")]);
        assert_eq!(rank_nodes(Ask { app: "a", targets: &[], asked: "n2" }, &nodes(), &all_alive(), &none, l.values(), &w, &p)[0].node, "n1");
    }

    #[test]
    fn a_node_not_alive_comes_last_whatever_it_measures() {
        let (w, p) = (Settings::default(), Placement::default());
        let t = [ip("198.18.9.1")];
        let reports =
            BTreeMap::from([("n1".to_string(), report("n1", &[("198.18.9.1", 0.1, 0.0)])), ("n2".to_string(), report("n2", &[("198.18.9.1", 50.0, 0.0)]))]);
        let alive = BTreeSet::from(["n2".to_string(), "n3".to_string()]);
        let r = rank_nodes(Ask { app: "a", targets: &t, asked: "n1" }, &nodes(), &alive, &reports, [], &w, &p);
        assert_eq!(r.last().unwrap().node, "n1");
        assert_eq!(r[0].node, "n2");
        assert!(render(&r, "n1").contains("chosen: n2 (n1 is not alive in etcd)"), "{}", render(&r, "n1"));
    }
}
