//! Spare pools (issue 13): the managing node keeps every node supplied with a few VIPs
//! assigned to it in advance, so that a node can answer an application's request from its
//! own spares at once, also while no manager is elected. Pure: the manager reads the
//! ledger from etcd, calls [`top_up`], and writes what it returns in one transaction
//! guarded by its leadership (see `manager`).
//!
//! The ledger: one record per handed-out address, `<key_prefix>-manager/alloc/<network>/
//! <address>` (a sibling of the VIP records' prefix, so the nodes' frequent confirmation
//! reads of VIP records never carry it). A spare names the node it is assigned to; a node
//! that grants one marks it granted (its own write, compared on the record's revision).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::vipgen::{self, AddrKey, Allocation, Ledger};
use crate::config::{cluster::Spares, networks::Network, Protocol};

/// The state of a handed-out address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Assigned to a node, not yet granted to an application.
    Spare,
    /// Granted to an application.
    Granted,
    /// Its node found someone else answering for it on the link: never handed out (the
    /// record stays, so the generator skips the address).
    Conflict,
    /// Released under do-not-reassign: never handed out again (the record stays).
    Retired,
}

/// One ledger record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRecord {
    /// The node it is assigned to: a spare's holder, a granted VIP's preferred owner.
    pub node: String,
    pub state: State,
    /// The applications using it once granted: one for an exclusive VIP, one or more with
    /// distinct (protocol, service port) for a shared one.
    #[serde(default)]
    pub uses: Vec<Use>,
    #[serde(default)]
    pub do_not_reassign: bool,
    /// Its node probed the link (ARP probe / DAD) and nobody answered for it.
    #[serde(default)]
    pub checked: bool,
    /// Do not move: rebalancing leaves it on its node.
    #[serde(default)]
    pub pinned: bool,
    /// When the managing node last moved it (ms since the epoch; 0: never), for the
    /// rebalancing hold-down.
    #[serde(default)]
    pub moved_at_unix_ms: u64,
    /// A granted VIP's successors, best first, as placement ranked them (nodes not listed
    /// follow in name order).
    #[serde(default)]
    pub successors: Vec<String>,
}

impl AllocRecord {
    pub fn spare(node: &str) -> Self {
        Self {
            node: node.to_string(),
            state: State::Spare,
            uses: Vec::new(),
            do_not_reassign: false,
            checked: false,
            pinned: false,
            moved_at_unix_ms: 0,
            successors: Vec::new(),
        }
    }

    /// Its candidate nodes, owner first: its node, its ranked successors, then the rest
    /// of `all` in name order. Every node computes the same list from the ledger.
    pub fn candidates(&self, all: &[String]) -> Vec<String> {
        let mut out = vec![self.node.clone()];
        for n in self.successors.iter().chain(all) {
            if all.contains(n) && !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }

    /// The record moved to `to`: its order keeps the others' ranks, the old node first
    /// among them.
    pub fn moved_to(&self, to: &str) -> Self {
        let successors = std::iter::once(&self.node).chain(&self.successors).filter(|n| *n != to).cloned().collect();
        Self { node: to.to_string(), successors, ..self.clone() }
    }

    /// Granted to applications that share it.
    pub fn shared(&self) -> bool {
        self.state == State::Granted && !self.uses.is_empty() && self.uses.iter().all(|u| !u.exclusive)
    }

    /// `u` can join this shared VIP: no use holds its (protocol, service port).
    pub fn room_for(&self, u: &Use) -> bool {
        self.shared() && !u.exclusive && !self.uses.iter().any(|x| x.protocol == u.protocol && x.service_port == u.service_port)
    }
}

/// An application's use of a granted VIP: clients reach `VIP:service_port`, delivered to
/// the application's `instance_port` on whichever node serves the VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Use {
    pub app: String,
    pub protocol: Protocol,
    pub service_port: u16,
    pub instance_port: u16,
    pub exclusive: bool,
    /// Peers the application talks to: the VIP is placed (and its NIC ranked) by them.
    #[serde(default)]
    pub targets: Vec<IpAddr>,
    /// Its application class (a configured `[class.NAME]`).
    #[serde(default)]
    pub class: Option<String>,
}

/// A granted VIP as every node serves it: owned by the node the ledger names, the others
/// its successors in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedVip {
    pub network: String,
    pub addr: IpAddr,
    pub node: String,
    /// Its ranked successors (see [`AllocRecord::successors`]).
    pub successors: Vec<String>,
    pub uses: Vec<Use>,
    pub pinned: bool,
}

impl GrantedVip {
    /// Every use's targets, once each.
    pub fn targets(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self.uses.iter().flat_map(|u| u.targets.iter().copied()).collect();
        set.into_iter().collect()
    }
}

/// The granted VIPs of the ledger.
pub fn granted<'r>(records: impl IntoIterator<Item = (&'r AddrKey, &'r AllocRecord)>) -> Vec<GrantedVip> {
    records
        .into_iter()
        .filter(|(_, r)| r.state == State::Granted && !r.uses.is_empty())
        .map(|((net, addr), r)| GrantedVip {
            network: net.clone(),
            addr: *addr,
            node: r.node.clone(),
            successors: r.successors.clone(),
            uses: r.uses.clone(),
            pinned: r.pinned,
        })
        .collect()
}

/// What releasing `app`'s VIPs does to the ledger: the app's uses leave each granted record
/// of the app (or only the one at `vip`). A record left without uses is deleted (its
/// address free again) or, under do-not-reassign (the allocation's or its range's), kept
/// as retired; a shared one with other uses keeps them.
pub fn release(app: &str, vip: Option<IpAddr>, net: &Network, records: &BTreeMap<AddrKey, AllocRecord>) -> Vec<(AddrKey, Option<AllocRecord>)> {
    records
        .iter()
        .filter(|((n, addr), r)| *n == net.name && r.state == State::Granted && r.uses.iter().any(|u| u.app == app) && vip.is_none_or(|v| v == *addr))
        .map(|((n, addr), r)| {
            let rest: Vec<Use> = r.uses.iter().filter(|u| u.app != app).cloned().collect();
            if !rest.is_empty() {
                return ((n.clone(), *addr), Some(AllocRecord { uses: rest, ..r.clone() }));
            }
            let keep = r.do_not_reassign || net.ranges.iter().find(|x| x.contains(*addr)).is_some_and(|x| !x.reassign);
            ((n.clone(), *addr), keep.then(|| AllocRecord { state: State::Retired, uses: Vec::new(), ..r.clone() }))
        })
        .collect()
}

/// A shared VIP on `node` that `u` can join (ports allow), lowest address first.
pub fn packable(node: &str, u: &Use, records: &BTreeMap<AddrKey, AllocRecord>) -> Option<AddrKey> {
    records.iter().find(|(_, r)| r.node == node && r.room_for(u)).map(|(k, _)| k.clone())
}

/// The spare `node` hands out next: its lowest checked one.
pub fn next_spare(node: &str, records: &BTreeMap<AddrKey, AllocRecord>) -> Option<AddrKey> {
    records.iter().find(|(_, r)| r.node == node && r.state == State::Spare && r.checked).map(|(k, _)| k.clone())
}

pub fn ledger_prefix(key_prefix: &str) -> String {
    format!("{key_prefix}-manager/alloc/")
}

pub fn alloc_key(key_prefix: &str, network: &str, addr: IpAddr) -> String {
    format!("{}{network}/{addr}", ledger_prefix(key_prefix))
}

/// (network, address) of a ledger key.
pub fn parse_alloc_key(key_prefix: &str, key: &str) -> Option<AddrKey> {
    let rest = key.strip_prefix(&ledger_prefix(key_prefix))?;
    let (net, addr) = rest.split_once('/')?;
    Some((net.to_string(), addr.parse().ok()?))
}

/// A node's pool as the ledger shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLevel {
    /// Spares, checked on the wire or not yet.
    pub spares: Vec<IpAddr>,
    /// Of those, not yet checked on the wire.
    #[serde(default)]
    pub unchecked: usize,
    pub granted: usize,
    /// Addresses its checks found in use by someone else.
    #[serde(default)]
    pub conflicts: usize,
}

/// Every node's pool in `network` (nodes with none included as empty).
pub fn levels(nodes: &[String], network: &str, records: &BTreeMap<AddrKey, AllocRecord>) -> BTreeMap<String, PoolLevel> {
    let mut out: BTreeMap<String, PoolLevel> = nodes.iter().map(|n| (n.clone(), PoolLevel::default())).collect();
    for ((net, addr), r) in records {
        if net != network {
            continue;
        }
        let level = out.entry(r.node.clone()).or_default();
        match r.state {
            State::Spare => {
                level.spares.push(*addr);
                level.unchecked += usize::from(!r.checked);
            }
            State::Granted => level.granted += 1,
            State::Conflict => level.conflicts += 1,
            State::Retired => {}
        }
    }
    out
}

/// What one top-up adds: (address, node), the nodes it could not fill (the network ran
/// out), and the nodes still short of `high` because the round's limit was reached (the
/// next round goes on with them even though they are no longer below `low`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopUp {
    pub add: Vec<(IpAddr, String)>,
    pub short: Vec<String>,
    pub filling: BTreeSet<String>,
}

/// The most spares one top-up adds: they go into one etcd transaction with a compare and a
/// put each, and etcd refuses transactions of more than 128 operations (its default
/// `--max-txn-ops`). The rest follow in the next round.
pub const MAX_ADDS: usize = 100;

/// The spares to add so that every node below `low` spares (or still `filling` from the
/// previous round) has `high` again, at most [`MAX_ADDS`] of them (nodes in name order). Addresses
/// come from `net` by its rules, never one the ledger holds or has retired; a spare's
/// "application" for the `hash` method is its node, so a node's spares cluster together.
/// `random` seeds the `random` method.
pub fn top_up(
    nodes: &[String],
    spares: &Spares,
    net: &Network,
    records: &BTreeMap<AddrKey, AllocRecord>,
    retired: &BTreeSet<AddrKey>,
    filling: &BTreeSet<String>,
    random: u64,
) -> TopUp {
    let mut ledger = Ledger {
        allocated: records
            .iter()
            .map(|(k, r)| (k.clone(), Allocation { app: r.uses.first().map(|u| u.app.clone()).unwrap_or_default(), do_not_reassign: r.do_not_reassign }))
            .collect(),
        retired: retired.clone(),
    };
    let mut out = TopUp::default();
    let none = BTreeSet::new();
    for (i, (node, level)) in levels(nodes, &net.name, records).into_iter().enumerate() {
        let have = level.spares.len() as u32;
        if !nodes.contains(&node) || have >= spares.high || (have >= spares.low && !filling.contains(&node)) {
            continue;
        }
        for j in have..spares.high {
            if out.add.len() >= MAX_ADDS {
                out.filling.insert(node.clone());
                break;
            }
            match vipgen::choose(net, &ledger, &node, &none, random.wrapping_add((i as u64) << 32 | j as u64)) {
                Ok(addr) => {
                    vipgen::allocate(&mut ledger, net, addr, &node, false);
                    out.add.push((addr, node.clone()));
                }
                Err(_) => {
                    out.short.push(node.clone());
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::networks::{Method, Prefix, Range};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn prod(last: &str) -> Network {
        Network {
            name: "prod".into(),
            prefix: Prefix { addr: ip("198.18.200.0"), len: 24 },
            ranges: vec![Range { first: ip("198.18.200.10"), last: ip(last), method: Method::Sequential, exclude: BTreeSet::new(), reassign: true }],
        }
    }

    fn nodes() -> Vec<String> {
        ["n1", "n2", "n3"].map(String::from).to_vec()
    }

    fn apply(records: &mut BTreeMap<AddrKey, AllocRecord>, t: &TopUp) {
        for (a, n) in &t.add {
            assert!(records.insert(("prod".into(), *a), AllocRecord::spare(n)).is_none(), "{a} handed out twice");
        }
    }

    #[test]
    fn every_node_below_low_is_topped_up_to_high_without_repeating_an_address() {
        let sp = Spares { network: "prod".into(), low: 2, high: 4 };
        let net = prod("198.18.200.99");
        let mut records = BTreeMap::new();
        let t = top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &BTreeSet::new(), 7);
        assert_eq!(t.add.len(), 12);
        apply(&mut records, &t);
        assert!(levels(&nodes(), "prod", &records).values().all(|l| l.spares.len() == 4));
        // Nothing to do at high water, nor at low water.
        assert!(top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &BTreeSet::new(), 7).add.is_empty());
        // n2 grants three: 1 spare < low 2, so it gets three new ones; the others nothing.
        for a in levels(&nodes(), "prod", &records)["n2"].spares[..3].to_vec() {
            records.get_mut(&("prod".to_string(), a)).unwrap().state = State::Granted;
        }
        let t = top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &BTreeSet::new(), 7);
        assert_eq!(t.add.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), ["n2", "n2", "n2"]);
        apply(&mut records, &t);
        let l = levels(&nodes(), "prod", &records);
        assert_eq!((l["n2"].spares.len(), l["n2"].granted), (4, 3));
    }

    #[test]
    fn a_conflicting_address_is_no_spare_and_is_never_handed_out_again() {
        let sp = Spares { network: "prod".into(), low: 2, high: 4 };
        let net = prod("198.18.200.99");
        let mut records = BTreeMap::new();
        let t = top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &BTreeSet::new(), 0);
        apply(&mut records, &t);
        let first = levels(&nodes(), "prod", &records)["n1"].spares[0];
        records.get_mut(&("prod".to_string(), first)).unwrap().state = State::Conflict;
        let l = levels(&nodes(), "prod", &records);
        assert_eq!((l["n1"].spares.len(), l["n1"].conflicts), (3, 1));
        // 3 is not below low 2: nothing yet. Two grants later it is, and the conflicting
        // address stays out.
        for a in l["n1"].spares[..2].to_vec() {
            records.get_mut(&("prod".to_string(), a)).unwrap().state = State::Granted;
        }
        let t = top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &BTreeSet::new(), 0);
        assert_eq!(t.add.len(), 3);
        assert!(t.add.iter().all(|(a, _)| *a != first), "the conflicting address came back");
    }

    /// More than one transaction's worth: filled over several rounds, each within etcd's
    /// limit on operations per transaction.
    #[test]
    fn a_large_top_up_is_spread_over_rounds_within_the_transaction_limit() {
        let sp = Spares { network: "prod".into(), low: 100, high: 130 };
        let net = Network { prefix: Prefix { addr: ip("198.18.200.0"), len: 22 }, ..prod("198.18.200.10") };
        let net = Network { ranges: vec![Range { last: ip("198.18.203.250"), ..net.ranges[0].clone() }], ..net };
        let mut records = BTreeMap::new();
        let mut rounds = 0;
        let mut filling = BTreeSet::new();
        loop {
            let t = top_up(&nodes(), &sp, &net, &records, &BTreeSet::new(), &filling, 1);
            if t.add.is_empty() {
                break;
            }
            assert!(t.add.len() <= MAX_ADDS, "{} additions in one round", t.add.len());
            apply(&mut records, &t);
            filling = t.filling;
            rounds += 1;
        }
        assert_eq!(records.len(), 390);
        assert_eq!(rounds, 4);
    }

    #[test]
    fn a_full_network_fills_what_it_can_and_says_who_is_short() {
        let sp = Spares { network: "prod".into(), low: 2, high: 4 };
        // 10 addresses for 3 nodes x 4.
        let t = top_up(&nodes(), &sp, &prod("198.18.200.19"), &BTreeMap::new(), &BTreeSet::new(), &BTreeSet::new(), 0);
        assert_eq!(t.add.len(), 10);
        assert_eq!(t.short, ["n3"]);
        // A retired address is never used.
        let retired = BTreeSet::from([("prod".to_string(), ip("198.18.200.10"))]);
        let t = top_up(&nodes(), &sp, &prod("198.18.200.19"), &BTreeMap::new(), &retired, &BTreeSet::new(), 0);
        assert!(t.add.iter().all(|(a, _)| *a != ip("198.18.200.10")));
    }

    #[test]
    fn a_release_frees_the_address_or_retires_it_under_do_not_reassign() {
        let mut net = prod("198.18.200.99");
        let rec = |app: &str| AllocRecord { state: State::Granted, checked: true, uses: vec![use_of(app, 7100, true)], ..AllocRecord::spare("n1") };
        let records = BTreeMap::from([
            (("prod".to_string(), ip("198.18.200.10")), rec("a")),
            (("prod".to_string(), ip("198.18.200.11")), rec("a")),
            (("prod".to_string(), ip("198.18.200.12")), rec("b")),
        ]);
        // Both of a's, freed; b's untouched.
        let r = release("a", None, &net, &records);
        assert_eq!(r.iter().map(|(k, v)| (k.1, v.is_none())).collect::<Vec<_>>(), [(ip("198.18.200.10"), true), (ip("198.18.200.11"), true)]);
        // Only one of them.
        assert_eq!(release("a", Some(ip("198.18.200.11")), &net, &records).len(), 1);
        // A do-not-reassign range retires them instead.
        net.ranges[0].reassign = false;
        let r = release("a", None, &net, &records);
        assert!(r.iter().all(|(_, v)| v.as_ref().is_some_and(|v| v.state == State::Retired)));
        assert!(release("nobody", None, &net, &records).is_empty());
    }

    fn use_of(app: &str, port: u16, exclusive: bool) -> Use {
        Use { app: app.into(), protocol: Protocol::Udp, service_port: port, instance_port: 7000, exclusive, targets: Vec::new(), class: None }
    }

    #[test]
    fn shared_vips_are_packed_only_where_ports_allow() {
        let shared = |uses: Vec<Use>| AllocRecord { state: State::Granted, checked: true, uses, ..AllocRecord::spare("n1") };
        let records = BTreeMap::from([
            (("prod".to_string(), ip("198.18.200.10")), shared(vec![use_of("a", 80, true)])),
            (("prod".to_string(), ip("198.18.200.11")), shared(vec![use_of("b", 80, false), use_of("c", 443, false)])),
            (("prod".to_string(), ip("198.18.200.12")), shared(vec![use_of("d", 53, false)])),
        ]);
        // Port 80 is taken on .11: .12 it is. An exclusive VIP never takes a second use.
        assert_eq!(packable("n1", &use_of("e", 80, false), &records), Some(("prod".to_string(), ip("198.18.200.12"))));
        assert_eq!(packable("n1", &use_of("e", 22, false), &records), Some(("prod".to_string(), ip("198.18.200.11"))));
        // Same port over another protocol is a different service.
        assert_eq!(packable("n1", &Use { protocol: Protocol::Tcp, ..use_of("e", 53, false) }, &records), Some(("prod".to_string(), ip("198.18.200.11"))));
        assert_eq!(packable("n1", &use_of("e", 22, true), &records), None);
        assert_eq!(packable("n2", &use_of("e", 22, false), &records), None);
        // Releasing one use of a shared VIP keeps the others on it.
        let net = prod("198.18.200.99");
        let r = release("b", None, &net, &records);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1.as_ref().map(|x| x.uses.iter().map(|u| u.app.as_str()).collect::<Vec<_>>()), Some(vec!["c"]));
    }

    #[test]
    fn candidates_are_the_owner_its_ranked_successors_then_the_rest_and_a_move_keeps_the_ranks() {
        let all: Vec<String> = ["n1", "n2", "n3", "n4"].map(String::from).to_vec();
        let r = AllocRecord { successors: vec!["n4".into(), "gone".into(), "n2".into()], ..AllocRecord::spare("n3") };
        // A successor no longer in the cluster is skipped.
        assert_eq!(r.candidates(&all), ["n3", "n4", "n2", "n1"]);
        let m = r.moved_to("n2");
        assert_eq!((m.node.as_str(), m.candidates(&all)), ("n2", vec!["n2".to_string(), "n3".into(), "n4".into(), "n1".into()]));
    }

    #[test]
    fn ledger_keys_round_trip() {
        let k = alloc_key("/havip", "prod", ip("2001:db8::5"));
        assert_eq!(k, "/havip-manager/alloc/prod/2001:db8::5");
        assert_eq!(parse_alloc_key("/havip", &k), Some(("prod".to_string(), ip("2001:db8::5"))));
        assert_eq!(parse_alloc_key("/havip", "/havip/vips/198.18.0.1"), None);
    }
}
