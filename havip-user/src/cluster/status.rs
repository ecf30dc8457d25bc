//! What `havip cluster status` shows, and what the metrics and the node's health read:
//! the cluster service's state as it publishes it (`service::Service::publish`), with the
//! managing node's part (`manager::ManagerStatus`).

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::manager::ManagerStatus;

/// What `havip cluster status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub etcd_endpoints: Vec<String>,
    /// Since the last successful read, ms (`None`: never).
    pub etcd_last_ok_ms: Option<u64>,
    pub etcd_read_latency_us: Option<u64>,
    pub takeover_wait_ms: f64,
    pub lease_ms: u64,
    pub peers: Vec<PeerStatus>,
    pub vips: Vec<VipStatus>,
    pub counters: Counters,
    /// The managing node (see `manager`).
    #[serde(default)]
    pub manager: ManagerStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub alive: bool,
    pub suspected: bool,
    /// Its sign of life in etcd changed recently: alive even when its heartbeats are lost.
    pub alive_in_etcd: bool,
    pub alive_for_ms: u64,
    pub rtt_us: Option<u64>,
    /// How this node encodes heartbeats for it: `binary` once it said it reads that, else `json`.
    #[serde(default)]
    pub heartbeat_format: String,
    pub paths: Vec<PathStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathStatus {
    pub path: String,
    pub received: u64,
    pub lost: u64,
    pub last_heard_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: IpAddr,
    /// The record's owner (`None`: no record yet).
    pub owner: Option<String>,
    pub epoch: u64,
    /// This node's part: serving; lapsed (it holds the VIP as far as it knows, but its
    /// fence ran out without a confirmation or acknowledgements: it answers nothing);
    /// starting (won, waiting out the old owner's lease); idle.
    pub here: String,
    /// Time left on this node's fence, ms (0: not serving).
    pub lease_left_ms: u64,
    pub candidates: Vec<String>,
}

/// Counters for metrics and status; ownership changes by reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub heartbeats_sent: u64,
    pub heartbeats_received: u64,
    pub confirmations: u64,
    pub confirmation_failures: u64,
    /// Fence extensions that only acknowledgements allowed (etcd unconfirmed).
    pub acked_extensions: u64,
    pub fence_writes: u64,
    /// Ownership changes this node made, by reason (`initial`, `owner-silent`, `giveback`).
    pub claims: BTreeMap<String, u64>,
    /// Claims that lost to another writer.
    pub claims_lost: u64,
    pub starts: u64,
    pub stops: u64,
    /// etcd round trips: reads (each a confirmation attempt) and writes, with their summed
    /// latency, so a rate of one over the other gives the mean.
    pub etcd_reads: u64,
    pub etcd_read_us_total: u64,
    pub etcd_writes: u64,
    pub etcd_write_us_total: u64,
    pub etcd_write_failures: u64,
    /// Rewrites of this node's sign of life (while it misses some peer's heartbeats).
    pub marks_written: u64,
    /// Takeovers not made: the silent owner was alive in etcd (a split, not a death).
    pub takeovers_held: u64,
    /// Heartbeat rounds sent a quarter of the suspicion time or more after they were due:
    /// this node's cluster thread did not run (CPU starvation, a stall). Peers begin to
    /// doubt a node at that silence and take its VIPs over at the whole suspicion time.
    pub heartbeats_late: u64,
    /// The latest any heartbeat round went out, in microseconds past its due time.
    pub heartbeat_late_max_us: u64,
    /// Confirmation reads etcd answered after their period (`lease / 4`) had passed: the
    /// owner's fences then outrun etcd and hold by the peers' acknowledgements alone.
    #[serde(default)]
    pub etcd_reads_slow: u64,
}
