//! `[cluster]`: the node's place in a havip cluster (see the cluster module). Absent: the
//! node runs standalone, exactly as without cluster support.
//!
//! ```toml
//! [cluster]
//! node = "n1"
//! etcd_endpoints = ["http://198.18.30.200:2379"]
//! [[cluster.peer]]
//! name = "n2"
//! addresses = ["198.18.30.21", "198.18.30.22"]   # one per NIC path of the peer
//! [[vip]]
//! address = "198.18.130.1"
//! nodes = ["n1", "n2"]                             # candidate nodes, most preferred first
//! ```

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::FieldError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's name, as its peers list it and VIPs name it in `nodes`.
    pub node: String,
    /// etcd client URLs (`http://host:port`), all members of one etcd cluster.
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this havip cluster's records in etcd: several clusters may share one etcd.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// UDP port of the heartbeats, the same on every node.
    #[serde(default = "default_heartbeat_port")]
    pub heartbeat_port: u16,
    /// Time between two heartbeats to each peer address, ms.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A peer silent for this many intervals (on every path) is suspected.
    #[serde(default = "default_heartbeat_misses")]
    pub heartbeat_misses: u32,
    /// How long one confirmation of ownership lets this node serve a VIP, ms: the fence's
    /// lease. A successor waits about this long after winning before it answers.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Bound on how far any node's clock rate may be off, parts per million (default 1%).
    #[serde(default = "default_clock_error_ppm")]
    pub clock_error_ppm: u32,
    /// A recovered more preferred node takes its VIPs back after being healthy this long, ms.
    #[serde(default = "default_giveback_hold_down_ms")]
    pub giveback_hold_down_ms: u64,
    /// How long peers hold off a node that announced a planned restart (SIGTERM), ms.
    #[serde(default = "default_restart_grace_ms")]
    pub restart_grace_ms: u64,
    /// Nice value of havipd's cluster thread (heartbeats, fences, etcd confirmations), -20
    /// to 19. Below 0 it gets a core promptly under CPU contention, so a busy node's
    /// heartbeats do not stall into a takeover; 0 to leave it ordinary (for instance when
    /// etcd shares a small machine with it and must not wait behind it).
    #[serde(default = "default_thread_nice")]
    pub thread_nice: i32,
    /// How much of etcd's revision history the managing node keeps, ms: every this long it
    /// compacts etcd to the revision it saw this long before (so history is kept for
    /// between one and two times this). 0: never compact (for an etcd shared with a system
    /// that compacts it, such as Kubernetes' API server).
    #[serde(default = "default_compact_history_ms")]
    pub compact_history_ms: u64,
    /// The other nodes.
    #[serde(default)]
    pub peer: Vec<PeerSection>,
    /// Address spaces the managing node generates VIPs from (see `config::networks`).
    #[serde(default)]
    pub network: Vec<super::networks::NetworkSection>,
    /// Spare VIPs the managing node keeps assigned to every node (see `cluster::pools`).
    #[serde(default)]
    pub spares: Option<SparesSection>,
    /// How the managing node places and rebalances granted VIPs (see `cluster::placement`).
    #[serde(default)]
    pub placement: PlacementSection,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    /// Most VIPs one rebalancing round moves.
    pub move_budget: u32,
    /// Granted-VIP counts within this many of the least loaded node's count as equal.
    pub load_slack: u32,
    /// Time between two rebalancing rounds, ms.
    pub rebalance_every_ms: u64,
    /// A moved VIP stays where it went at least this long, ms.
    pub move_hold_down_ms: u64,
}

impl Default for PlacementSection {
    fn default() -> Self {
        let p = Placement::default();
        Self {
            move_budget: p.move_budget,
            load_slack: p.load_slack as u32,
            rebalance_every_ms: p.rebalance_every.as_millis() as u64,
            move_hold_down_ms: p.move_hold_down.as_millis() as u64,
        }
    }
}

/// Validated `[cluster.placement]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub move_budget: u32,
    pub load_slack: usize,
    pub rebalance_every: Duration,
    pub move_hold_down: Duration,
}

impl Default for Placement {
    fn default() -> Self {
        Self { move_budget: 4, load_slack: 2, rebalance_every: Duration::from_secs(2), move_hold_down: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SparesSection {
    /// The `[[cluster.network]]` spares are generated from.
    pub network: String,
    /// A node with fewer spares than this is topped up...
    pub low: u32,
    /// ...to this many.
    pub high: u32,
}

/// Validated `[cluster.spares]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spares {
    pub network: String,
    pub low: u32,
    pub high: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: String,
    /// The peer's addresses, one per NIC path: heartbeats go to each from each local NIC.
    pub addresses: Vec<IpAddr>,
}

fn default_key_prefix() -> String {
    "/havip".into()
}
fn default_heartbeat_port() -> u16 {
    7947
}
fn default_heartbeat_interval_ms() -> u64 {
    5
}
fn default_heartbeat_misses() -> u32 {
    8
}
fn default_lease_ms() -> u64 {
    40
}
fn default_clock_error_ppm() -> u32 {
    10_000
}
fn default_giveback_hold_down_ms() -> u64 {
    30_000
}
fn default_thread_nice() -> i32 {
    -10
}
fn default_compact_history_ms() -> u64 {
    300_000
}
fn default_restart_grace_ms() -> u64 {
    10_000
}

/// Validated `[cluster]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub node: String,
    pub etcd_endpoints: Vec<String>,
    pub key_prefix: String,
    pub heartbeat_port: u16,
    pub heartbeat_interval: Duration,
    pub heartbeat_misses: u32,
    pub lease: Duration,
    /// `clock_error_ppm` as a fraction.
    pub clock_error: f64,
    pub giveback_hold_down: Duration,
    pub restart_grace: Duration,
    pub thread_nice: i32,
    /// `None`: never compact etcd's history.
    pub compact_history: Option<Duration>,
    pub peers: Vec<Peer>,
    pub networks: Vec<super::networks::Network>,
    pub spares: Option<Spares>,
    pub placement: Placement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

impl Cluster {
    /// Every node's name, this one included, sorted: the default candidates of a VIP, the
    /// same list on every node.
    pub fn all_nodes(&self) -> Vec<String> {
        let mut all: Vec<String> = self.peers.iter().map(|p| p.name.clone()).chain([self.node.clone()]).collect();
        all.sort();
        all
    }
}

/// Node names: 1 to 63 of `[A-Za-z0-9._-]` (they are etcd key parts and log words).
fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("`{name}` may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

fn check_endpoint(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("`{url}` is not an http:// URL (TLS to etcd is not supported yet); write it as http://HOST:PORT"));
    };
    let hostport = rest.trim_end_matches('/');
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Err(format!("`{url}` has no port; etcd clients usually use http://HOST:2379"));
    };
    if host.is_empty() || hostport.contains('/') {
        return Err(format!("`{url}` must be http://HOST:PORT with nothing after the port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("`{url}` has no valid port (1-65535)")),
    }
}

fn range(errs: &mut Vec<FieldError>, field: &str, v: u64, lo: u64, hi: u64, unit: &str) {
    if !(lo..=hi).contains(&v) {
        errs.push(FieldError { field: format!("cluster.{field}"), reason: format!("{v} is out of range; use {lo} to {hi} {unit}") });
    }
}

/// Validates the section; `None` in, `None` out.
pub fn validate(section: Option<&ClusterSection>, errs: &mut Vec<FieldError>) -> Option<Cluster> {
    let s = section?;
    let before = errs.len();
    let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });
    if let Err(r) = check_node_name(&s.node) {
        err("cluster.node".into(), r);
    }
    if s.etcd_endpoints.is_empty() {
        err("cluster.etcd_endpoints".into(), "is empty; list the etcd members' client URLs, e.g. [\"http://10.0.0.5:2379\"]".into());
    }
    for (i, e) in s.etcd_endpoints.iter().enumerate() {
        if let Err(r) = check_endpoint(e) {
            err(format!("cluster.etcd_endpoints[{i}]"), r);
        }
    }
    let p = &s.key_prefix;
    if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.chars().any(|c| c.is_whitespace()) {
        err("cluster.key_prefix".into(), format!("`{p}` must start with '/', not end with '/', and hold no spaces (e.g. \"/havip\")"));
    }
    if s.heartbeat_port == 0 {
        err("cluster.heartbeat_port".into(), "0 is not a port; use the same UDP port on every node (default 7947)".into());
    }
    let mut names = BTreeSet::from([s.node.as_str()]);
    for (i, peer) in s.peer.iter().enumerate() {
        if let Err(r) = check_node_name(&peer.name) {
            err(format!("cluster.peer[{i}].name"), r);
        } else if peer.name == s.node {
            err(format!("cluster.peer[{i}].name"), format!("`{}` is this node (cluster.node); list only the other nodes", peer.name));
        } else if !names.insert(peer.name.as_str()) {
            err(format!("cluster.peer[{i}].name"), format!("peer `{}` is listed twice", peer.name));
        }
        if peer.addresses.is_empty() {
            err(format!("cluster.peer[{i}].addresses"), "is empty; give the peer's address on each NIC path".into());
        }
        let mut seen = BTreeSet::new();
        for (j, a) in peer.addresses.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                err(format!("cluster.peer[{i}].addresses[{j}]"), format!("{a} is not a unicast address of the peer"));
            } else if !seen.insert(a) {
                err(format!("cluster.peer[{i}].addresses[{j}]"), format!("{a} is listed twice"));
            }
        }
    }
    range(errs, "heartbeat_interval_ms", s.heartbeat_interval_ms, 1, 1000, "ms");
    range(errs, "heartbeat_misses", s.heartbeat_misses as u64, 2, 100, "intervals");
    range(errs, "lease_ms", s.lease_ms, 10, 60_000, "ms");
    range(errs, "clock_error_ppm", s.clock_error_ppm as u64, 0, 100_000, "ppm (10% at most)");
    range(errs, "giveback_hold_down_ms", s.giveback_hold_down_ms, 0, 86_400_000, "ms");
    range(errs, "restart_grace_ms", s.restart_grace_ms, 100, 600_000, "ms");
    if !(-20..=19).contains(&s.thread_nice) {
        errs.push(FieldError { field: "cluster.thread_nice".into(), reason: format!("{} is out of range; use -20 to 19 (a nice value)", s.thread_nice) });
    }
    // Watches restart from a read a few ms old: a second of history is plenty for them.
    if s.compact_history_ms != 0 && !(1000..=86_400_000).contains(&s.compact_history_ms) {
        errs.push(FieldError {
            field: "cluster.compact_history_ms".into(),
            reason: format!("{} is out of range; use 1000 to 86400000 ms, or 0 to never compact etcd's history", s.compact_history_ms),
        });
    }
    // The owner's serve-until time is extended by each acknowledged heartbeat: a lease
    // shorter than a few heartbeats would lapse between two of them.
    if (1..=1000).contains(&s.heartbeat_interval_ms) && (10..=60_000).contains(&s.lease_ms) && s.lease_ms < 4 * s.heartbeat_interval_ms {
        errs.push(FieldError {
            field: "cluster.lease_ms".into(),
            reason: format!(
                "{} ms is shorter than 4 heartbeat intervals ({} ms); raise it or send heartbeats more often",
                s.lease_ms,
                4 * s.heartbeat_interval_ms
            ),
        });
    }
    let networks = super::networks::validate(&s.network, errs);
    let spares = s.spares.as_ref().map(|sp| Spares { network: sp.network.clone(), low: sp.low, high: sp.high });
    if let Some(sp) = &s.spares {
        if !s.network.iter().any(|n| n.name == sp.network) {
            let known: Vec<&str> = s.network.iter().map(|n| n.name.as_str()).collect();
            errs.push(FieldError {
                field: "cluster.spares.network".into(),
                reason: format!("`{}` is not a [[cluster.network]] (known: {})", sp.network, known.join(", ")),
            });
        }
        if sp.high == 0 || sp.low > sp.high || sp.high > 1024 {
            errs.push(FieldError {
                field: "cluster.spares".into(),
                reason: format!("low {} and high {} must satisfy 0 <= low <= high, 1 <= high <= 1024", sp.low, sp.high),
            });
        }
    }
    let pl = &s.placement;
    // Each move is a compare and a put in one guarded transaction: etcd takes at most 128
    // operations in one.
    range(errs, "placement.move_budget", pl.move_budget as u64, 0, 60, "VIPs per round (0: never rebalance)");
    range(errs, "placement.load_slack", pl.load_slack as u64, 0, 10_000, "VIPs");
    range(errs, "placement.rebalance_every_ms", pl.rebalance_every_ms, 100, 3_600_000, "ms");
    range(errs, "placement.move_hold_down_ms", pl.move_hold_down_ms, 0, 86_400_000, "ms");
    if errs.len() > before {
        return None;
    }
    Some(Cluster {
        node: s.node.clone(),
        etcd_endpoints: s.etcd_endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect(),
        key_prefix: s.key_prefix.clone(),
        heartbeat_port: s.heartbeat_port,
        heartbeat_interval: Duration::from_millis(s.heartbeat_interval_ms),
        heartbeat_misses: s.heartbeat_misses,
        lease: Duration::from_millis(s.lease_ms),
        clock_error: s.clock_error_ppm as f64 / 1e6,
        giveback_hold_down: Duration::from_millis(s.giveback_hold_down_ms),
        restart_grace: Duration::from_millis(s.restart_grace_ms),
        thread_nice: s.thread_nice,
        compact_history: (s.compact_history_ms > 0).then(|| Duration::from_millis(s.compact_history_ms)),
        peers: s.peer.iter().map(|p| Peer { name: p.name.clone(), addresses: p.addresses.clone() }).collect(),
        networks,
        spares,
        placement: Placement {
            move_budget: pl.move_budget,
            load_slack: pl.load_slack as usize,
            rebalance_every: Duration::from_millis(pl.rebalance_every_ms),
            move_hold_down: Duration::from_millis(pl.move_hold_down_ms),
        },
    })
}

/// A VIP's candidate nodes: checked against the cluster's nodes; all of them (sorted) when
/// absent. Outside cluster mode `nodes` must be absent. `cluster_given`: a `[cluster]`
/// section was written (even an invalid one, whose errors are reported at its fields).
pub fn vip_nodes(cluster: Option<&Cluster>, cluster_given: bool, i: usize, nodes: Option<&Vec<String>>, err: &mut impl FnMut(String, String)) -> Vec<String> {
    let Some(c) = cluster else {
        if nodes.is_some() && !cluster_given {
            err(format!("vip[{i}].nodes"), "is for cluster mode; add a [cluster] section or remove it".into());
        }
        return Vec::new();
    };
    let Some(list) = nodes else { return c.all_nodes() };
    if list.is_empty() {
        err(format!("vip[{i}].nodes"), "is empty; list at least one node, or leave it out for all nodes".into());
    }
    let all = c.all_nodes();
    let mut seen = BTreeSet::new();
    for (j, n) in list.iter().enumerate() {
        if !all.contains(n) {
            err(format!("vip[{i}].nodes[{j}]"), format!("node `{n}` is neither cluster.node nor a [[cluster.peer]] (known: {})", all.join(", ")));
        } else if !seen.insert(n) {
            err(format!("vip[{i}].nodes[{j}]"), format!("node `{n}` is listed twice"));
        }
    }
    list.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(extra: &str) -> ClusterSection {
        toml::from_str(&format!("node = \"n1\"\netcd_endpoints = [\"http://10.0.0.5:2379\"]\n{extra}")).unwrap()
    }

    #[test]
    fn compact_history_is_five_minutes_by_default_off_at_zero_and_refused_below_a_second() {
        let cases: [(&str, Result<Option<Duration>, ()>); 5] = [
            ("", Ok(Some(Duration::from_secs(300)))),
            ("compact_history_ms = 0", Ok(None)),
            ("compact_history_ms = 1000", Ok(Some(Duration::from_secs(1)))),
            ("compact_history_ms = 999", Err(())),
            ("compact_history_ms = 86400001", Err(())),
        ];
        for (extra, want) in cases {
            let mut errs = Vec::new();
            let got = validate(Some(&section(extra)), &mut errs);
            match want {
                Ok(keep) => assert_eq!(got.map(|c| c.compact_history), Some(keep), "{extra}: {errs:?}"),
                Err(()) => {
                    assert!(got.is_none(), "{extra} accepted");
                    assert_eq!(errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["cluster.compact_history_ms"], "{extra}");
                }
            }
        }
    }
}
