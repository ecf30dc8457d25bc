//! The managing node (issue 13, first pieces): one node of the cluster, elected through
//! etcd's election API, with every write it makes guarded by its leadership in the same
//! transaction. Its duty so far: keeping every node's spare pool between its water marks
//! (`pools`, addresses by the rules of `vipgen`). Placement of granted VIPs, requests
//! forwarded to it and rebalancing build on this.
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
//! - Every [`STATE_EVERY`] the manager reads the ledger, and writes the spares it adds
//!   together with `<key_prefix>/manager-state` (its name and term) in one transaction:
//!   guarded by its leadership, and by each new spare's key being absent, so an address
//!   is never handed out twice, whichever manager writes.
//! - Every node reads the election's leader every [`OBSERVE_EVERY`], and the pools every
//!   [`POOLS_EVERY`], for `havip cluster status` and `havip cluster pools`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    pools::{self, AllocRecord, PoolLevel},
    vipgen::AddrKey,
};
use crate::{config::cluster::Cluster, kernel::addr_probe};

/// Time to live of the campaign's lease, s (etcd raises it to its minimum).
pub const ELECTION_TTL_S: i64 = 1;
/// How often the manager rewrites its state record (a guarded write).
pub const STATE_EVERY: Duration = Duration::from_millis(250);
/// How many of its new spares a node checks on the link at once.
pub const CONCURRENT_CHECKS: usize = 16;
/// How long a guarded write may take before the manager stands down.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often every node reads who the manager is.
pub const OBSERVE_EVERY: Duration = Duration::from_millis(100);
/// How often every node reads the spare pools (a read of the whole ledger).
pub const POOLS_EVERY: Duration = Duration::from_millis(500);

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
    /// Every node's spare pool as the ledger shows it (with `[cluster.spares]`).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolLevel>,
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

/// Starts the managing-node tasks (election and duties, the spare checks, the leader
/// observer) on a thread and runtime of their own: their etcd calls, reconnections and
/// link probes must never delay the cluster service's heartbeats and confirmations,
/// which keep the VIPs' fences open.
pub fn start_thread(
    c: Cluster,
    status: Arc<Mutex<ManagerStatus>>,
    nics: Vec<String>,
    grants: tokio::sync::watch::Sender<Vec<pools::GrantedVip>>,
    spares: tokio::sync::watch::Sender<Vec<CachedSpare>>,
) {
    let spawned = std::thread::Builder::new().name("havip-manager".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start the managing-node runtime; this node takes no part in it");
                return;
            }
        };
        rt.block_on(async move {
            tokio::join!(run(c.clone(), status), check_spares(c, nics, grants, spares));
        });
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the managing-node thread; this node takes no part in it");
    }
}

/// Runs the election and, while elected, the manager's duties; never returns. While etcd
/// is unreachable it retries with a growing pause (200 ms to 2 s) and logs the first
/// failure of a run of them, not each one.
pub async fn run(c: Cluster, status: Arc<Mutex<ManagerStatus>>) {
    tokio::spawn(observe(c.clone(), status.clone()));
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        match term(&c, &status).await {
            Ok(()) => failures = 0,
            Err(e) => {
                // A round that lasted (a term, a long wait in the campaign) ended: a new
                // run of failures, if any, starts here.
                let lasted = started.elapsed() > Duration::from_secs(5);
                if failures == 0 || lasted {
                    warn!(error = %format!("{e:#}"), "managing node: election round ended; retrying with a growing pause while etcd does not answer");
                }
                failures = if lasted { 0 } else { failures + 1 };
            }
        }
        update(&status, |m| m.this_node = false);
        let pause = Duration::from_millis(200u64.saturating_mul(1 << failures.min(4))).min(Duration::from_secs(2));
        tokio::time::sleep(pause).await;
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
        let mut random = seed();
        // Nodes a capped round left short of high: the next round goes on with them.
        let mut filling = BTreeSet::new();
        loop {
            tick.tick().await;
            writes += 1;
            random = xorshift(random);
            // The duty: spares for every node below its low water mark.
            let (ops, guards, added) = match (&c.spares, c.spares.as_ref().and_then(|sp| c.networks.iter().find(|n| n.name == sp.network))) {
                (Some(sp), Some(net)) => {
                    let (records, retired) = with_timeout(read_ledger(&mut client, &c.key_prefix)).await?;
                    let t = pools::top_up(&c.all_nodes(), sp, net, &records, &retired, &filling, random);
                    filling = t.filling.clone();
                    if !t.short.is_empty() {
                        warn!(network = %net.name, nodes = ?t.short, "managing node: network has no free address left for these nodes' spares; add a range or release VIPs");
                    }
                    let mut ops = Vec::new();
                    let mut guards = Vec::new();
                    for (addr, node) in &t.add {
                        let key = pools::alloc_key(&c.key_prefix, &net.name, *addr);
                        guards.push(Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0));
                        let rec = AllocRecord { node: node.clone(), state: pools::State::Spare, app: None, do_not_reassign: false, checked: false, grant: None };
                        ops.push(TxnOp::put(key, serde_json::to_vec(&rec)?, None));
                    }
                    let levels = pools::levels(&c.all_nodes(), &net.name, &records);
                    (ops, guards, Some((t.add, levels)))
                }
                _ => (Vec::new(), Vec::new(), None),
            };
            let state = ManagerState { node: c.node.clone(), term, writes };
            let mut when = vec![Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev())];
            when.extend(guards);
            let mut then = ops;
            then.push(TxnOp::put(state_key(&c.key_prefix), serde_json::to_vec(&state)?, None));
            let resp = with_timeout(async { Ok(client.txn(Txn::new().when(when).and_then(then)).await?) }).await?;
            if resp.succeeded() {
                if let Some((added, levels)) = added.filter(|(a, _)| !a.is_empty()) {
                    let mut per_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                    for (a, n) in &added {
                        per_node.entry(n.as_str()).or_default().push(a.to_string());
                    }
                    for (node, addrs) in per_node {
                        let had = levels.get(node).map_or(0, |l| l.spares.len());
                        let sp = c.spares.as_ref().expect("spares configured");
                        info!(term, node, had, low = sp.low, high = sp.high, added = ?addrs, "managing node: spares topped up");
                    }
                }
                continue;
            }
            // Refused: either this node is no longer the manager, or a ledger key it meant
            // to create exists after all (then the next round reads it and picks again).
            let still_leader = with_timeout(async { Ok(client.get(leader.key(), None).await?) })
                .await?
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == leader.rev());
            if still_leader {
                warn!(node = %c.node, term, "managing node: a spare it meant to add exists already; reading the ledger again");
                continue;
            }
            update(status, |m| m.deposed_writes += 1);
            warn!(node = %c.node, term, "managing node: write refused, this node is no longer the manager (its leader key is gone); standing down");
            return Ok(());
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
    let mut round = 0u64;
    let pools_every = (POOLS_EVERY.as_millis() / OBSERVE_EVERY.as_millis()).max(1) as u64;
    loop {
        tokio::time::sleep(OBSERVE_EVERY).await;
        round += 1;
        if client.is_none() {
            client = connect(&c).await.ok();
        }
        let Some(cl) = client.as_mut() else { continue };
        let seen = match tokio::time::timeout(Duration::from_millis(500), cl.leader(election_name(&c.key_prefix))).await {
            Ok(Ok(r)) => r.kv().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision() as u64)),
            // No leader ("election: no leader") or etcd unreachable: none known.
            _ => None,
        };
        let pools = match &c.spares {
            _ if round % pools_every != 0 => None,
            Some(sp) => match tokio::time::timeout(Duration::from_millis(500), read_ledger(cl, &c.key_prefix)).await {
                Ok(Ok((records, _))) => Some(pools::levels(&c.all_nodes(), &sp.network, &records)),
                _ => None,
            },
            None => Some(BTreeMap::new()),
        };
        update(&status, |m| {
            m.manager = seen.as_ref().map(|s| s.0.clone());
            m.term = seen.as_ref().map(|s| s.1);
            if let Some(p) = pools {
                m.pools = p;
            }
        });
    }
}

/// Runs an etcd request with [`WRITE_TIMEOUT`]: an unreachable etcd ends the term.
async fn with_timeout<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("an etcd request took over {} ms (etcd unreachable?): standing down", WRITE_TIMEOUT.as_millis()),
    }
}

/// The ledger: every handed-out address and every retired one.
pub async fn read_ledger(client: &mut Client, key_prefix: &str) -> anyhow::Result<(BTreeMap<AddrKey, AllocRecord>, BTreeSet<AddrKey>)> {
    let records = read_ledger_revisions(client, key_prefix).await?.into_iter().map(|(k, (r, _))| (k, r)).collect();
    // Retired addresses come with releases, which are not built yet: none so far.
    Ok((records, BTreeSet::new()))
}

/// The ledger's records with their mod revisions (for writes compared on them).
async fn read_ledger_revisions(client: &mut Client, key_prefix: &str) -> anyhow::Result<BTreeMap<AddrKey, (AllocRecord, i64)>> {
    let resp = client.get(pools::ledger_prefix(key_prefix), Some(GetOptions::new().with_prefix())).await?;
    let mut records = BTreeMap::new();
    for kv in resp.kvs() {
        let (Ok(key), Ok(rec)) = (kv.key_str(), serde_json::from_slice::<AllocRecord>(kv.value())) else { continue };
        if let Some(k) = pools::parse_alloc_key(key_prefix, key) {
            records.insert(k, (rec, kv.mod_revision()));
        }
    }
    Ok(records)
}

/// Every node's duty for its own spares (and the granted VIPs it publishes to the node):
/// check each new one on the wire once (an ARP
/// probe or duplicate address detection on each of its NICs, see `kernel::addr_probe`)
/// before it can be used, and record the result in the ledger, compared on the record's
/// revision: checked, or a conflict when someone answered (the manager then replaces it
/// and never hands the address out). Each conflict is logged on one line.
pub async fn check_spares(
    c: Cluster,
    nics: Vec<String>,
    grants: tokio::sync::watch::Sender<Vec<pools::GrantedVip>>,
    spares: tokio::sync::watch::Sender<Vec<CachedSpare>>,
) {
    if c.spares.is_none() {
        return;
    }
    let mut client = None;
    loop {
        tokio::time::sleep(POOLS_EVERY).await;
        if client.is_none() {
            client = connect(&c).await.ok();
        }
        let Some(cl) = client.as_mut() else { continue };
        let records = match with_timeout(read_ledger_revisions(cl, &c.key_prefix)).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        // Every node serves (or stands by for) every granted VIP: publish them.
        let plain: BTreeMap<AddrKey, AllocRecord> = records.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
        let now = pools::granted(&plain);
        grants.send_if_modified(|g| {
            let changed = *g != now;
            *g = now;
            changed
        });
        // This node's checked spares with their revisions: a request tries these first.
        let own: Vec<CachedSpare> = records
            .iter()
            .filter(|(_, (r, _))| r.node == c.node && r.state == pools::State::Spare && r.checked)
            .map(|(k, (r, rev))| CachedSpare { key: k.clone(), record: r.clone(), revision: *rev })
            .collect();
        spares.send_replace(own);
        let mine: Vec<(AddrKey, AllocRecord, i64)> =
            records.into_iter().filter(|(_, (r, _))| r.node == c.node && r.state == pools::State::Spare && !r.checked).map(|(k, (r, rev))| (k, r, rev)).collect();
        // Up to CONCURRENT_CHECKS at once (each takes about half a second): a burst of new
        // spares costs a few seconds of checks, not hundreds of sockets at once.
        let mine: Vec<_> = mine.into_iter().take(CONCURRENT_CHECKS).collect();
        let checks: Vec<_> = mine
            .iter()
            .map(|((_, addr), _, _)| {
                let (addr, nics) = (*addr, nics.clone());
                tokio::task::spawn_blocking(move || {
                    nics.iter().find(|n| matches!(addr_probe::nic_link(n).and_then(|(ix, mac)| addr_probe::someone_holds(ix, mac, addr)), Ok(true))).cloned()
                })
            })
            .collect();
        for (((net, addr), rec, rev), check) in mine.into_iter().zip(checks) {
            let Ok(held_on) = check.await else { continue };
            let mut new = rec.clone();
            match &held_on {
                Some(nic) => {
                    new.state = pools::State::Conflict;
                    warn!(network = %net, %addr, %nic, "spare VIP in use on the link (someone answered the probe): marked conflict, the manager replaces it");
                }
                None => new.checked = true,
            }
            let key = pools::alloc_key(&c.key_prefix, &net, addr);
            let Ok(value) = serde_json::to_vec(&new) else { continue };
            let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![TxnOp::put(key.as_bytes(), value, None)]);
            let _ = with_timeout(async { Ok(cl.txn(txn).await?) }).await;
        }
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    t | 1
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^ (x << 17)
}

/// One of this node's checked spares as the last read of the ledger showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSpare {
    pub key: AddrKey,
    pub record: AllocRecord,
    pub revision: i64,
}

/// A node's connection to the ledger for its API calls, kept across calls (a connection
/// costs round trips a request should not pay).
#[derive(Clone)]
pub struct LedgerClient(Client);

impl LedgerClient {
    pub async fn connect(c: &Cluster) -> anyhow::Result<Self> {
        Ok(Self(with_timeout(async { connect(c).await }).await?))
    }
}

/// Grants one of this node's checked spares to `app`: the ledger record goes from spare to
/// granted, compared on its revision (a record changed meanwhile is tried no further: the
/// next spare is). `cached` (from the last periodic read) is tried first; then the ledger
/// is read. Needs no manager. `Ok(None)`: no checked spare left here.
pub async fn grant_spare(c: &Cluster, ledger: &mut LedgerClient, cached: &[CachedSpare], app: &str, grant: pools::Grant) -> anyhow::Result<Option<(String, std::net::IpAddr)>> {
    let client = &mut ledger.0;
    // First the spares the last read showed: one round trip when the cache is current.
    for s in cached.iter().take(2) {
        let (net, addr) = s.key.clone();
        let new = AllocRecord { state: pools::State::Granted, app: Some(app.to_string()), grant: Some(grant.clone()), ..s.record.clone() };
        let key = pools::alloc_key(&c.key_prefix, &net, addr);
        let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, s.revision)]).and_then(vec![TxnOp::put(key.as_bytes(), serde_json::to_vec(&new)?, None)]);
        if with_timeout(async { Ok(client.txn(txn).await?) }).await?.succeeded() {
            return Ok(Some((net, addr)));
        }
    }
    for _ in 0..4 {
        let records = with_timeout(read_ledger_revisions(client, &c.key_prefix)).await?;
        let plain: BTreeMap<AddrKey, AllocRecord> = records.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
        let Some((net, addr)) = pools::next_spare(&c.node, &plain) else { return Ok(None) };
        let (rec, rev) = records[&(net.clone(), addr)].clone();
        let new = AllocRecord { state: pools::State::Granted, app: Some(app.to_string()), grant: Some(grant.clone()), ..rec };
        let key = pools::alloc_key(&c.key_prefix, &net, addr);
        let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![TxnOp::put(key.as_bytes(), serde_json::to_vec(&new)?, None)]);
        if with_timeout(async { Ok(client.txn(txn).await?) }).await?.succeeded() {
            return Ok(Some((net, addr)));
        }
    }
    anyhow::bail!("this node's spares kept changing under the grant; try again")
}

/// Releases `app`'s granted VIPs (or only `vip`) in every network of the cluster: each
/// record deleted, or kept as retired under do-not-reassign, compared on its revision.
/// Needs no manager. Returns the addresses released.
pub async fn release_grants(c: &Cluster, ledger: &mut LedgerClient, app: &str, vip: Option<std::net::IpAddr>) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let client = &mut ledger.0;
    let records = with_timeout(read_ledger_revisions(client, &c.key_prefix)).await?;
    let plain: BTreeMap<AddrKey, AllocRecord> = records.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
    let mut done = Vec::new();
    for net in &c.networks {
        for ((n, addr), after) in pools::release(app, vip, net, &plain) {
            let key = pools::alloc_key(&c.key_prefix, &n, addr);
            let rev = records[&(n.clone(), addr)].1;
            let op = match &after {
                Some(rec) => TxnOp::put(key.as_bytes(), serde_json::to_vec(rec)?, None),
                None => TxnOp::delete(key.as_bytes(), None),
            };
            let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![op]);
            if with_timeout(async { Ok(client.txn(txn).await?) }).await?.succeeded() {
                info!(%app, %addr, network = %n, retired = after.is_some(), "cluster VIP released");
                done.push(addr);
            }
        }
    }
    Ok(done)
}
