//! Rebalancing (issue 13): which granted VIPs the managing node moves in one round, and
//! why. Pure: the ledger, the nodes' reports and the VIPs' current owners in, the moves out.
//! The manager writes them (each compared on its record's revision, in one transaction
//! guarded by its leadership); every node then sees the new preferred node in the ledger
//! and the VIP's owner hands it over (`decide`'s giveback, to the ledger's node).
//!
//! Three reasons, in this order:
//! - `node-gone`: the ledger's node is not alive (its report's lease ran out). Its VIPs
//!   were already taken over by their successors (issue 9); the ledger follows the owner
//!   that serves each one now, so nothing moves back on its own when the node returns. No
//!   traffic moves, so these are outside the budget.
//! - `quality`: a VIP with targets whose node is no longer within the margin of the best
//!   path cost (or reaches fewer targets than another node) moves to the best node.
//! - `load`: while the most and least loaded alive nodes differ by more than the slack, a
//!   VIP moves from the most loaded to the least loaded: one move narrows the gap by two, so
//!   no round moves more than it must. A VIP with targets moves only to a node within the
//!   margin of its path cost; of the rest, one of an application with most VIPs on the
//!   source goes first (it spreads the application too).
//!
//! Pinned VIPs never move, a VIP moved within the hold-down stays, and `quality` and `load`
//! moves together stay within the round's budget.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::Serialize;

use super::{
    placement::{self, Ask, NodeReport},
    pools::{AllocRecord, State},
    vipgen::AddrKey,
};
use crate::config::{cluster::Placement, ranking::Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    NodeGone,
    Quality,
    Load,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::NodeGone, Reason::Quality, Reason::Load];

    pub fn name(self) -> &'static str {
        match self {
            Reason::NodeGone => "node-gone",
            Reason::Quality => "quality",
            Reason::Load => "load",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    pub key: AddrKey,
    pub from: String,
    pub to: String,
    pub reason: Reason,
    /// The inputs of the decision, for its log line.
    pub why: String,
}

/// What one round knows.
pub struct Inputs<'a> {
    pub nodes: &'a [String],
    pub alive: &'a BTreeSet<String>,
    pub reports: &'a BTreeMap<String, NodeReport>,
    pub records: &'a BTreeMap<AddrKey, AllocRecord>,
    /// Each VIP's owner now, from its ownership record.
    pub owners: &'a BTreeMap<IpAddr, String>,
    pub now_unix_ms: u64,
}

fn targets(r: &AllocRecord) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = r.uses.iter().flat_map(|u| u.targets.iter().copied()).collect();
    set.into_iter().collect()
}

fn app(r: &AllocRecord) -> &str {
    r.uses.first().map_or("", |u| u.app.as_str())
}

/// The moves of one round.
pub fn plan(i: &Inputs<'_>, w: &Settings, p: &Placement) -> Vec<Move> {
    let mut moves = Vec::new();
    // Where each granted VIP is after the moves so far.
    let mut at: BTreeMap<&AddrKey, String> =
        i.records.iter().filter(|(_, r)| r.state == State::Granted && !r.uses.is_empty()).map(|(k, r)| (k, r.node.clone())).collect();
    let held = |r: &AllocRecord| r.pinned || (r.moved_at_unix_ms > 0 && i.now_unix_ms < r.moved_at_unix_ms + p.move_hold_down.as_millis() as u64);
    let alive_list: Vec<String> = i.nodes.iter().filter(|n| i.alive.contains(*n)).cloned().collect();
    if alive_list.is_empty() {
        return moves;
    }

    // node-gone: the ledger follows the VIP's owner now (outside the budget).
    for (k, node) in at.iter_mut() {
        let r = &i.records[*k];
        if i.alive.contains(node.as_str()) || r.pinned {
            continue;
        }
        let to = match i.owners.get(&k.1).filter(|o| i.alive.contains(*o) && *o != node) {
            Some(o) => o.clone(),
            None => {
                let t = targets(r);
                placement::rank_nodes(Ask { app: app(r), targets: &t, asked: "" }, &alive_list, i.alive, i.reports, i.records.values(), w, p)[0].node.clone()
            }
        };
        let why = format!("{node} has no report in etcd (gone); {to} serves it now");
        moves.push(Move { key: (*k).clone(), from: node.clone(), to: to.clone(), reason: Reason::NodeGone, why });
        *node = to;
    }

    let budget = p.move_budget as usize;
    let mut budgeted = 0;
    // A VIP moves at most once a round.
    let mut moved: BTreeSet<AddrKey> = moves.iter().map(|m| m.key.clone()).collect();

    // quality: a VIP whose node fell out of the margin of the best path. Path costs only
    // (no load, no spread): a few per VIP and node, so 10,000 VIPs over 32 nodes plan in
    // milliseconds. Among the best, the first in name order.
    for (k, node) in at.iter_mut() {
        if budgeted >= budget {
            break;
        }
        let r = &i.records[*k];
        let t = targets(r);
        if t.is_empty() || held(r) || moved.contains(*k) {
            continue;
        }
        let (reach_here, here) = placement::path_cost(i.reports.get(node.as_str()), &t, w);
        let Some((best, (reach, cost))) = alive_list
            .iter()
            .map(|n| (n, placement::path_cost(i.reports.get(n), &t, w)))
            .filter(|(_, (_, c))| c.is_some())
            .min_by(|(_, (ra, ca)), (_, (rb, cb))| rb.cmp(ra).then(ca.unwrap_or(f64::INFINITY).total_cmp(&cb.unwrap_or(f64::INFINITY))))
        else {
            continue;
        };
        let cost = cost.unwrap_or(0.0);
        let worse = reach > reach_here || here.is_none_or(|h| !placement::within_margin(h, cost, w));
        if best == node || !worse {
            continue;
        }
        let why = format!(
            "reaches {reach_here} target(s) at cost {}; {best} reaches {reach} at {cost:.2} (margin {:.0}%, at least {})",
            here.map_or("-".into(), |c| format!("{c:.2}")),
            w.margin * 100.0,
            w.min_gain
        );
        moves.push(Move { key: (*k).clone(), from: node.clone(), to: best.clone(), reason: Reason::Quality, why });
        moved.insert((*k).clone());
        *node = best.clone();
        budgeted += 1;
    }

    // load: from the most to the least loaded alive node while the gap exceeds the slack.
    let mut count: BTreeMap<String, usize> = alive_list.iter().map(|n| (n.clone(), 0)).collect();
    for node in at.values() {
        if let Some(c) = count.get_mut(node) {
            *c += 1;
        }
    }
    let mut exhausted: BTreeSet<String> = BTreeSet::new();
    while budgeted < budget {
        let Some((least, lo)) = count.iter().min_by_key(|(n, c)| (**c, (*n).clone())).map(|(n, c)| (n.clone(), *c)) else { break };
        let Some((most, hi)) =
            count.iter().filter(|(n, _)| !exhausted.contains(*n)).max_by_key(|(n, c)| (**c, std::cmp::Reverse((*n).clone()))).map(|(n, c)| (n.clone(), *c))
        else {
            break;
        };
        if hi <= lo + p.load_slack.max(1) {
            break;
        }
        // Of the movable VIPs on `most`: those whose application has most VIPs there first.
        let per_app: BTreeMap<&str, usize> = at.iter().filter(|(_, n)| **n == most).fold(BTreeMap::new(), |mut m, (k, _)| {
            *m.entry(app(&i.records[*k])).or_insert(0) += 1;
            m
        });
        let dest_report = i.reports.get(&least);
        let pick = at
            .iter()
            .filter(|(k, n)| **n == most && !held(&i.records[**k]) && !moved.contains(**k))
            .filter(|(k, _)| {
                // A VIP with targets goes only where its path cost stays within the margin.
                let r = &i.records[**k];
                let t = targets(r);
                if t.is_empty() {
                    return true;
                }
                let (reach_here, here) = placement::path_cost(i.reports.get(&most), &t, w);
                let (reach_there, there) = placement::path_cost(dest_report, &t, w);
                reach_there >= reach_here
                    && match (there, here) {
                        (Some(a), Some(b)) => placement::within_margin(a, b, w),
                        (_, None) => true,
                        (None, Some(_)) => false,
                    }
            })
            .max_by_key(|(k, _)| (per_app.get(app(&i.records[**k])).copied().unwrap_or(0), std::cmp::Reverse(**k)))
            .map(|(k, _)| (*k).clone());
        let Some(k) = pick else {
            exhausted.insert(most);
            continue;
        };
        let why = format!("{most} holds {hi} granted VIPs, {least} {lo} (slack {})", p.load_slack);
        moves.push(Move { key: k.clone(), from: most.clone(), to: least.clone(), reason: Reason::Load, why });
        moved.insert(k.clone());
        *at.get_mut(&k).expect("picked from the map") = least.clone();
        *count.get_mut(&most).expect("counted") -= 1;
        *count.get_mut(&least).expect("counted") += 1;
        budgeted += 1;
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::{
            placement::PathReport,
            pools::{AllocRecord, Use},
        },
        config::Protocol,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    fn rec(node: &str, app: &str, targets: &[IpAddr]) -> AllocRecord {
        let u =
            Use { app: app.into(), protocol: Protocol::Tcp, service_port: 80, instance_port: 8080, exclusive: true, targets: targets.to_vec(), class: None };
        AllocRecord { state: State::Granted, checked: true, uses: vec![u], ..AllocRecord::spare(node) }
    }

    /// `per_node[i]` VIPs on node i+1, app names `a0..`.
    fn ledger(per_node: &[usize]) -> BTreeMap<AddrKey, AllocRecord> {
        let mut out = BTreeMap::new();
        let mut k = 0u32;
        for (i, c) in per_node.iter().enumerate() {
            for _ in 0..*c {
                let addr = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + k));
                out.insert(("prod".to_string(), addr), rec(&format!("n{}", i + 1), &format!("a{k}"), &[]));
                k += 1;
            }
        }
        out
    }

    fn apply(records: &mut BTreeMap<AddrKey, AllocRecord>, moves: &[Move], now: u64) {
        for m in moves {
            let r = records.get_mut(&m.key).unwrap();
            assert_eq!(r.node, m.from);
            r.node = m.to.clone();
            r.moved_at_unix_ms = now;
        }
    }

    fn load(records: &BTreeMap<AddrKey, AllocRecord>, nodes: &[String]) -> Vec<usize> {
        nodes.iter().map(|n| records.values().filter(|r| &r.node == n).count()).collect()
    }

    fn run(
        records: &BTreeMap<AddrKey, AllocRecord>,
        nodes: &[String],
        alive: &BTreeSet<String>,
        owners: &BTreeMap<IpAddr, String>,
        p: &Placement,
    ) -> Vec<Move> {
        let reports = BTreeMap::new();
        plan(&Inputs { nodes, alive, reports: &reports, records, owners, now_unix_ms: 1_000_000 }, &Settings::default(), p)
    }

    #[test]
    fn a_joining_node_gets_vips_within_the_budget_each_round_and_no_more_than_needed() {
        let nodes = names(3);
        let alive: BTreeSet<String> = nodes.iter().cloned().collect();
        let mut records = ledger(&[6, 6, 0]);
        let p = Placement { move_budget: 2, move_hold_down: std::time::Duration::ZERO, ..Placement::default() };
        let mut rounds = 0;
        let mut total = 0;
        loop {
            let m = run(&records, &nodes, &alive, &BTreeMap::new(), &p);
            if m.is_empty() {
                break;
            }
            assert!(m.len() <= 2, "{} moves in one round", m.len());
            assert!(m.iter().all(|m| m.to == "n3" && m.reason == Reason::Load), "{m:?}");
            apply(&mut records, &m, 1);
            total += m.len();
            rounds += 1;
        }
        // 6,6,0 -> 5,5,2 -> 4,4,4 would be 4; the slack (2) stops at 5,5,2... one more:
        // gaps within 2 are left alone.
        let l = load(&records, &nodes);
        assert!(l.iter().max().unwrap() - l.iter().min().unwrap() <= 2, "{l:?}");
        assert_eq!(total, 3, "{l:?} after {rounds} rounds");
    }

    /// A gone node's VIPs are also the load's: each moves once in a round, never twice
    /// (two writes of one key in one transaction are refused by etcd).
    #[test]
    fn a_vip_moves_at_most_once_a_round() {
        let nodes = names(3);
        let records = ledger(&[0, 6, 0]);
        let alive = BTreeSet::from(["n1".to_string(), "n3".to_string()]);
        let owners: BTreeMap<IpAddr, String> = records.keys().map(|k| (k.1, "n1".to_string())).collect();
        let p = Placement { move_budget: 10, load_slack: 0, move_hold_down: std::time::Duration::ZERO, ..Placement::default() };
        let m = run(&records, &nodes, &alive, &owners, &p);
        let keys: BTreeSet<&AddrKey> = m.iter().map(|m| &m.key).collect();
        assert_eq!(keys.len(), m.len(), "a VIP moved twice in one round: {m:?}");
        assert_eq!(m.iter().filter(|m| m.reason == Reason::NodeGone).count(), 6);
    }

    #[test]
    fn pinned_and_recently_moved_vips_stay() {
        let nodes = names(2);
        let alive: BTreeSet<String> = nodes.iter().cloned().collect();
        let mut records = ledger(&[6, 0]);
        for (i, r) in records.values_mut().enumerate() {
            r.pinned = i % 2 == 0;
        }
        // Three unpinned; one of them moved a moment ago.
        let recent = records.iter().find(|(_, r)| !r.pinned).map(|(k, _)| k.clone()).unwrap();
        records.get_mut(&recent).unwrap().moved_at_unix_ms = 1_000_000 - 10;
        let p = Placement { move_budget: 10, load_slack: 0, ..Placement::default() };
        let m = run(&records, &nodes, &alive, &BTreeMap::new(), &p);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.iter().all(|m| !records[&m.key].pinned && m.key != recent));
    }

    #[test]
    fn a_gone_nodes_vips_follow_their_owner_outside_the_budget() {
        let nodes = names(3);
        let records = ledger(&[3, 1, 1]);
        let alive = BTreeSet::from(["n2".to_string(), "n3".to_string()]);
        // Issue 9 moved n1's VIPs to n2 and n3.
        let owners: BTreeMap<IpAddr, String> =
            records.iter().filter(|(_, r)| r.node == "n1").enumerate().map(|(i, (k, _))| (k.1, if i == 0 { "n3" } else { "n2" }.to_string())).collect();
        let p = Placement { move_budget: 0, ..Placement::default() };
        let m = run(&records, &nodes, &alive, &owners, &p);
        assert_eq!(m.len(), 3);
        for mv in &m {
            assert_eq!((mv.reason, mv.from.as_str(), &mv.to), (Reason::NodeGone, "n1", &owners[&mv.key.1]));
        }
    }

    #[test]
    fn a_vip_moves_for_quality_only_beyond_the_margin_and_load_never_moves_it_to_a_worse_path() {
        let nodes = names(2);
        let alive: BTreeSet<String> = nodes.iter().cloned().collect();
        let t = ip("198.18.9.1");
        let path = |rtt: f64| PathReport { rtt_ms: Some(rtt), loss_pct: Some(0.0), sent: 50, replies: 50 };
        let report =
            |n: &str, rtt: f64| (n.to_string(), NodeReport { node: n.into(), healthy: true, paths: BTreeMap::from([(t, path(rtt))]), ..Default::default() });
        let records = BTreeMap::from([(("prod".to_string(), ip("198.18.200.10")), rec("n1", "a", &[t]))]);
        let p = Placement::default();
        let go = |reports: &BTreeMap<String, NodeReport>, records: &BTreeMap<AddrKey, AllocRecord>| {
            plan(&Inputs { nodes: &nodes, alive: &alive, reports, records, owners: &BTreeMap::new(), now_unix_ms: 1_000_000 }, &Settings::default(), &p)
        };
        // 10 vs 9 ms: within the margin, stays.
        assert!(go(&BTreeMap::from([report("n1", 10.0), report("n2", 9.0)]), &records).is_empty());
        // 30 vs 9 ms: moves, and says why.
        let m = go(&BTreeMap::from([report("n1", 30.0), report("n2", 9.0)]), &records);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].reason, m[0].to.as_str()), (Reason::Quality, "n2"));
        assert!(m[0].why.contains("30.00"), "{}", m[0].why);
        // Load would move VIPs from n1 to n2, but n2's path to this one's target is worse.
        let mut busy = ledger(&[6, 0]);
        for r in busy.values_mut() {
            r.uses[0].targets = vec![t];
        }
        assert!(go(&BTreeMap::from([report("n1", 5.0), report("n2", 40.0)]), &busy).is_empty());
    }

    #[test]
    fn a_planning_round_for_ten_thousand_vips_over_thirty_two_nodes_is_bounded_by_the_budget() {
        let nodes = names(32);
        let alive: BTreeSet<String> = nodes.iter().cloned().collect();
        let mut per = vec![10_000 / 31; 31];
        per.push(0);
        let records = ledger(&per);
        let p = Placement { move_budget: 50, ..Placement::default() };
        let m = run(&records, &nodes, &alive, &BTreeMap::new(), &p);
        assert_eq!(m.len(), 50);
        assert!(m.iter().all(|m| m.to == "n32"));
    }
}
