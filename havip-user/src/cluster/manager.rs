//! The managing node (issue 13, first piece): one node of the cluster, elected through
//! etcd's election API, with every write it makes guarded by its leadership in the same
//! transaction. What it manages (VIP generation by `vipgen`, placement, spare pools)
//! builds on this; today it proves and publishes its leadership.
//!
//! - Every node campaigns on `<key_prefix>/manager` with a lease of [`ELECTION_TTL_S`]
//!   (etcd rounds it up to its minimum: 3/2 of its election timeout, whole seconds) kept
//!   alive every third of it. etcd makes the holder of the oldest key the leader; the
//!   leader key's create revision is the manager's *term*.
//! - A dead, paused or cut-off manager stops renewing its lease; etcd deletes its key when
//!   the lease expires, and the next campaigner is elected: the takeover takes the lease's
//!   time to live plus one round trip.
//! - Every write of the manager is a transaction that first compares the create revision
//!   of its leader key with its term. Once the key is gone (or is someone else's), the
//!   write fails, so a deposed manager that wakes up cannot change anything: it sees the
//!   refusal, counts it, logs it and campaigns again.
//! - The manager rewrites `<key_prefix>/manager-state` (its name and term) every
//!   [`STATE_EVERY`] that way: the record the cluster can read the manager from, and the
//!   proof that guarded writes keep a deposed one out.
//! - Every node reads the election's leader every [`OBSERVE_EVERY`] for
//!   `havip cluster status`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::cluster::Cluster;

/// Time to live of the campaign's lease, s (etcd raises it to its minimum).
pub const ELECTION_TTL_S: i64 = 1;
/// How often the manager rewrites its state record (a guarded write).
pub const STATE_EVERY: Duration = Duration::from_millis(250);
/// How long a guarded write may take before the manager stands down.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often every node reads who the manager is.
pub const OBSERVE_EVERY: Duration = Duration::from_millis(100);

/// The manager as `havip cluster status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerStatus {
    /// The elected managing node (`None`: none elected, or etcd unreachable).
    pub manager: Option<String>,
    /// Its term: the create revision of its leader key.
    pub term: Option<u64>,
    /// This node is the manager and its last guarded write succeeded.
    pub this_node: bool,
    /// Elections this node won.
    pub elections_won: u64,
    /// Guarded writes refused because this node was no longer the manager.
    pub deposed_writes: u64,
}

/// The record the manager keeps current (`<key_prefix>/manager-state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerState {
    pub node: String,
    pub term: u64,
    /// Guarded writes this term, the one carrying it included.
    pub writes: u64,
}

pub fn election_name(prefix: &str) -> String {
    format!("{prefix}/manager")
}

pub fn state_key(prefix: &str) -> String {
    format!("{prefix}/manager-state")
}

/// A client without the per-request timeout of the VIP store: a campaign waits as long as
/// another node is the manager.
async fn connect(c: &Cluster) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    Ok(Client::connect(&c.etcd_endpoints, Some(opts)).await?)
}

fn update(status: &Arc<Mutex<ManagerStatus>>, f: impl FnOnce(&mut ManagerStatus)) {
    if let Ok(mut st) = status.lock() {
        f(&mut st);
    }
}

/// Runs the election and, while elected, the manager's duties; never returns.
pub async fn run(c: Cluster, status: Arc<Mutex<ManagerStatus>>) {
    tokio::spawn(observe(c.clone(), status.clone()));
    loop {
        if let Err(e) = term(&c, &status).await {
            warn!(error = %format!("{e:#}"), "managing node: election round ended; campaigning again in 200 ms");
        }
        update(&status, |m| m.this_node = false);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One campaign and, if won, one term: until a guarded write is refused or the lease is
/// lost.
async fn term(c: &Cluster, status: &Arc<Mutex<ManagerStatus>>) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    let lease = client.lease_grant(ELECTION_TTL_S, None).await?;
    let (lease_id, ttl) = (lease.id(), lease.ttl().max(1));
    let (mut keeper, mut acks) = client.lease_keep_alive(lease_id).await?;
    // Keep the lease alive from the start: a campaign may wait long.
    let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
    let keepalive = tokio::spawn(async move {
        let every = Duration::from_millis((ttl as u64 * 1000) / 3);
        loop {
            let alive = keeper.keep_alive().await.is_ok() && matches!(acks.message().await, Ok(Some(r)) if r.ttl() > 0);
            if !alive {
                let _ = lost_tx.send(true);
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let result = async {
        let won = tokio::select! {
            r = client.campaign(election_name(&c.key_prefix), c.node.as_bytes(), lease_id) => r?,
            _ = lost_rx.changed() => anyhow::bail!("the campaign's lease expired before the election was won"),
        };
        let leader = won.leader().cloned().ok_or_else(|| anyhow::anyhow!("etcd answered a campaign without a leader key"))?;
        let term = leader.rev() as u64;
        update(status, |m| {
            m.this_node = true;
            m.elections_won += 1;
        });
        info!(node = %c.node, term, lease_ttl_s = ttl, "managing node: elected");
        // Whether this node is still the manager is etcd's to say, not the lease keeper's:
        // each write carries the guard, and a refused one ends the term. (A lost lease
        // shows up here too: its key is gone, so the next write is refused.)
        let mut tick = tokio::time::interval(STATE_EVERY);
        let mut writes = 0u64;
        loop {
            tick.tick().await;
            writes += 1;
            let state = ManagerState { node: c.node.clone(), term, writes };
            let guard = Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev());
            let put = TxnOp::put(state_key(&c.key_prefix), serde_json::to_vec(&state)?, None);
            let resp = match tokio::time::timeout(WRITE_TIMEOUT, client.txn(Txn::new().when(vec![guard]).and_then(vec![put]))).await {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("a guarded write took over {} ms (etcd unreachable?): standing down (term {term})", WRITE_TIMEOUT.as_millis()),
            };
            if !resp.succeeded() {
                update(status, |m| m.deposed_writes += 1);
                warn!(node = %c.node, term, "managing node: write refused, this node is no longer the manager (its leader key is gone); standing down");
                return Ok(());
            }
        }
    }
    .await;
    keepalive.abort();
    // Best effort: hand the election on at once instead of after the lease's time.
    let _ = tokio::time::timeout(Duration::from_millis(500), client.lease_revoke(lease_id)).await;
    result
}

/// Who the manager is, for every node's status.
async fn observe(c: Cluster, status: Arc<Mutex<ManagerStatus>>) {
    let mut client = None;
    loop {
        tokio::time::sleep(OBSERVE_EVERY).await;
        if client.is_none() {
            client = connect(&c).await.ok();
        }
        let Some(cl) = client.as_mut() else { continue };
        let seen = match tokio::time::timeout(Duration::from_millis(500), cl.leader(election_name(&c.key_prefix))).await {
            Ok(Ok(r)) => r.kv().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision() as u64)),
            // No leader ("election: no leader") or etcd unreachable: none known.
            _ => None,
        };
        update(&status, |m| {
            m.manager = seen.as_ref().map(|s| s.0.clone());
            m.term = seen.as_ref().map(|s| s.1);
        });
    }
}
