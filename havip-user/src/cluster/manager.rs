//! The managing node (issue 13): one node of the cluster, elected through etcd's election
//! API, with every write it makes guarded by its leadership in the same transaction. Its
//! duties: keeping every node's spare pool between its water marks (`pools`, addresses by
//! the rules of `vipgen`), answering requests forwarded to it (`requests`), and
//! rebalancing granted VIPs across nodes (`rebalance`, every `rebalance_every`).
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
//! - Forwarded requests are watched and answered as they come (`requests::serve_forwarded`);
//!   a new manager first answers those its predecessor left pending.
//! - Every node, manager or not, runs three tasks on this module's thread: it follows the
//!   ledger ([`follow_ledger`]: the granted VIPs it serves, the view its requests use, the
//!   wire checks of its new spares), keeps its placement report in etcd under a lease
//!   ([`publish_report`]), and reads the election's leader every [`OBSERVE_EVERY`] and
//!   the pools every [`POOLS_EVERY`] for `havip cluster status` and `havip cluster pools`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    follower, ledger_io,
    placement::NodeReport,
    pools::{self, AllocRecord, PoolLevel},
    rebalance,
    requests::{self, LedgerView},
    vipgen::AddrKey,
};
use crate::config::{cluster::Cluster, ranking::Settings};

/// Time to live of the campaign's lease, s (etcd raises it to its minimum).
pub const ELECTION_TTL_S: i64 = 1;
/// How often the manager rewrites its state record (a guarded write).
pub const STATE_EVERY: Duration = Duration::from_millis(250);
/// How often every node reads who the manager is.
pub const OBSERVE_EVERY: Duration = Duration::from_millis(100);
/// How often every node reads the spare pools for its status.
pub const POOLS_EVERY: Duration = Duration::from_millis(500);

/// The manager as `havip cluster status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Forwarded requests this node answered as the manager.
    #[serde(default)]
    pub forwarded_answered: u64,
    /// Planning rounds this node ran as the manager, and the last one's planning time.
    #[serde(default)]
    pub plans: u64,
    #[serde(default)]
    pub last_plan_ms: f64,
    /// VIPs this node moved as the manager, by reason (`rebalance::Reason`).
    #[serde(default)]
    pub moves: BTreeMap<String, u64>,
    /// VIP requests this node granted, by how (`requests::How`).
    #[serde(default)]
    pub grants: BTreeMap<String, u64>,
    /// Answers to forwarded requests this node deleted as the manager because their
    /// requesters never collected them (`requests::sweep_answers`).
    #[serde(default)]
    pub answers_swept: u64,
    /// Compactions of etcd's history this node made as the manager, and the last one's
    /// revision (`cluster.compact_history_ms`).
    #[serde(default)]
    pub compactions: u64,
    #[serde(default)]
    pub compacted_revision: i64,
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

fn update(status: &Arc<Mutex<ManagerStatus>>, f: impl FnOnce(&mut ManagerStatus)) {
    if let Ok(mut st) = status.lock() {
        f(&mut st);
    }
}

/// What the managing-node thread shares with the rest of havipd.
pub struct Links {
    /// The ledger's granted VIPs (every node serves or stands by for each).
    pub grants: watch::Sender<Vec<pools::GrantedVip>>,
    /// The ledger and the nodes' reports as last read, for requests.
    pub view: watch::Sender<Arc<LedgerView>>,
    /// This node's report for placement, from the event loop.
    pub report: watch::Receiver<NodeReport>,
    /// The ranking's cost model and margins (placement uses the same).
    pub ranking: Settings,
}

/// Starts the managing-node tasks (election and duties, following the ledger and checking
/// this node's spares, publishing this node's report, the leader observer) on a thread and
/// runtime of their own: their etcd calls, reconnections and link probes must never delay
/// the cluster service's heartbeats and confirmations, which keep the VIPs' fences open.
pub fn start_thread(c: Cluster, status: Arc<Mutex<ManagerStatus>>, nics: Vec<String>, links: Links) {
    let spawned = std::thread::Builder::new().name("havip-manager".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start the managing-node runtime; this node takes no part in it");
                return;
            }
        };
        let Links { grants, view, report, ranking } = links;
        rt.block_on(async move {
            tokio::join!(run(c.clone(), status, ranking), follower::follow_ledger(c.clone(), nics, grants, view), follower::publish_report(c, report));
        });
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the managing-node thread; this node takes no part in it");
    }
}

/// Runs the election and, while elected, the manager's duties; never returns. While etcd
/// is unreachable it retries with a growing pause (200 ms to 2 s) and logs the first
/// failure of a run of them, not each one.
pub async fn run(c: Cluster, status: Arc<Mutex<ManagerStatus>>, w: Settings) {
    tokio::spawn(observe(c.clone(), status.clone()));
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        match term(&c, &status, &w).await {
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
async fn term(c: &Cluster, status: &Arc<Mutex<ManagerStatus>>, w: &Settings) -> anyhow::Result<()> {
    let mut client = ledger_io::connect(c).await?;
    let lease = client.lease_grant(ELECTION_TTL_S, None).await?;
    let (lease_id, ttl) = (lease.id(), lease.ttl().max(1));
    let (mut keeper, mut acks) = client.lease_keep_alive(lease_id).await?;
    // Keep the lease alive from the start: a campaign may wait long.
    let (lost_tx, mut lost_rx) = watch::channel(false);
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
        let guard = Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev());
        let mut duty = Duty { c, w, status, term, guard, writes: 0, random: seed(), filling: BTreeSet::new(), last_plan: None, history_mark: None };
        let (_watcher, mut requests) = requests::watch_requests(&mut client, &c.key_prefix).await?;
        // Requests forwarded before this term (the old manager died with them pending).
        duty.forwarded(&mut client).await?;
        let mut tick = tokio::time::interval(STATE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !duty.round(&mut client, &leader).await? {
                        return Ok(());
                    }
                }
                msg = requests.message() => {
                    match msg? {
                        Some(resp) if resp.events().iter().any(|e| e.event_type() == EventType::Put) => duty.forwarded(&mut client).await?,
                        Some(_) => {}
                        None => anyhow::bail!("etcd closed the watch on forwarded requests"),
                    }
                }
            }
        }
    }
    .await;
    keepalive.abort();
    // Best effort: hand the election on at once instead of after the lease's time.
    let _ = tokio::time::timeout(Duration::from_millis(500), client.lease_revoke(lease_id)).await;
    result
}

/// The managing node's duties within one term.
struct Duty<'a> {
    c: &'a Cluster,
    w: &'a Settings,
    status: &'a Arc<Mutex<ManagerStatus>>,
    term: u64,
    /// Compares the create revision of this term's leader key: in every write.
    guard: Compare,
    writes: u64,
    random: u64,
    /// Nodes a capped round left short of high: the next round goes on with them.
    filling: BTreeSet<String>,
    last_plan: Option<std::time::Instant>,
    /// When this term last marked etcd's revision, and that revision: the next compaction
    /// (`compact_history` later) compacts to it.
    history_mark: Option<(std::time::Instant, i64)>,
}

impl Duty<'_> {
    /// Forwarded requests, as they come.
    async fn forwarded(&mut self, client: &mut Client) -> anyhow::Result<()> {
        self.random = xorshift(self.random);
        let reports = ledger_io::timed(ledger_io::read_reports(client, &self.c.key_prefix)).await?;
        let n = ledger_io::timed(requests::serve_forwarded(client, self.c, self.w, &self.guard, &reports, self.random)).await?;
        if n > 0 {
            update(self.status, |m| m.forwarded_answered += n as u64);
        }
        Ok(())
    }

    /// One tick: spares topped up with the state record, a planning round when due.
    /// `Ok(false)`: this node is no longer the manager.
    async fn round(&mut self, client: &mut Client, leader: &etcd_client::LeaderKey) -> anyhow::Result<bool> {
        let c = self.c;
        self.writes += 1;
        self.random = xorshift(self.random);
        let (ops, guards, added) = match (&c.spares, c.spares.as_ref().and_then(|sp| c.networks.iter().find(|n| n.name == sp.network))) {
            (Some(sp), Some(net)) => {
                let (records, retired) = ledger_io::timed(read_ledger(client, &c.key_prefix)).await?;
                let t = pools::top_up(&c.all_nodes(), sp, net, &records, &retired, &self.filling, self.random);
                self.filling = t.filling.clone();
                if !t.short.is_empty() {
                    warn!(network = %net.name, nodes = ?t.short, "managing node: network has no free address left for these nodes' spares; add a range or release VIPs");
                }
                let mut ops = Vec::new();
                let mut guards = Vec::new();
                for (addr, node) in &t.add {
                    let key = pools::alloc_key(&c.key_prefix, &net.name, *addr);
                    guards.push(Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(key, serde_json::to_vec(&AllocRecord::spare(node))?, None));
                }
                let levels = pools::levels(&c.all_nodes(), &net.name, &records);
                (ops, guards, Some((t.add, levels)))
            }
            _ => (Vec::new(), Vec::new(), None),
        };
        let state = ManagerState { node: c.node.clone(), term: self.term, writes: self.writes };
        let mut when = vec![self.guard.clone()];
        when.extend(guards);
        let mut then = ops;
        then.push(TxnOp::put(state_key(&c.key_prefix), serde_json::to_vec(&state)?, None));
        let resp = ledger_io::timed(async { Ok(client.txn(Txn::new().when(when).and_then(then)).await?) }).await?;
        if !resp.succeeded() {
            // Refused: either this node is no longer the manager, or a ledger key it meant
            // to create exists after all (then the next round reads it and picks again).
            let still_leader = ledger_io::timed(async { Ok(client.get(leader.key(), None).await?) })
                .await?
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == leader.rev());
            if still_leader {
                warn!(node = %c.node, term = self.term, "managing node: a spare it meant to add exists already; reading the ledger again");
                return Ok(true);
            }
            update(self.status, |m| m.deposed_writes += 1);
            warn!(node = %c.node, term = self.term, "managing node: write refused, this node is no longer the manager (its leader key is gone); standing down");
            return Ok(false);
        }
        if let Some(keep) = c.compact_history {
            self.compact_history(client, keep, resp.header().map_or(0, |h| h.revision())).await;
        }
        if let Some((added, levels)) = added.filter(|(a, _)| !a.is_empty()) {
            let mut per_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (a, n) in &added {
                per_node.entry(n.as_str()).or_default().push(a.to_string());
            }
            for (node, addrs) in per_node {
                let had = levels.get(node).map_or(0, |l| l.spares.len());
                let sp = c.spares.as_ref().expect("spares configured");
                info!(term = self.term, node, had, low = sp.low, high = sp.high, added = ?addrs, "managing node: spares topped up");
            }
        }
        if self.last_plan.is_none_or(|t| t.elapsed() >= c.placement.rebalance_every) {
            self.last_plan = Some(std::time::Instant::now());
            // A failed round changes nothing (its write is one guarded transaction): the
            // next one reads again. It does not end the term.
            let r = match ledger_io::timed(planning_round(client, c, self.w, &self.guard)).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(term = self.term, error = %format!("{e:#}"), "managing node: planning round failed; the next one reads the ledger again");
                    return Ok(true);
                }
            };
            update(self.status, |m| {
                m.plans += 1;
                m.last_plan_ms = r.plan_ms;
                for mv in &r.moves {
                    *m.moves.entry(mv.reason.name().to_string()).or_insert(0) += 1;
                }
            });
            for mv in &r.moves {
                info!(term = self.term, vip = %mv.key.1, network = %mv.key.0, from = %mv.from, to = %mv.to, reason = mv.reason.name(), why = %mv.why, "managing node: VIP moved");
            }
            // With the same cadence: answers left behind by requesters that died waiting.
            match ledger_io::timed(requests::sweep_answers(client, &c.key_prefix, &self.guard)).await {
                Ok(0) => {}
                Ok(n) => {
                    update(self.status, |m| m.answers_swept += n as u64);
                    info!(
                        term = self.term,
                        deleted = n,
                        older_than_s = requests::ANSWER_KEEP.as_secs(),
                        "managing node: deleted answers their requesters never collected"
                    );
                }
                Err(e) => warn!(term = self.term, error = %format!("{e:#}"), "managing node: sweeping uncollected answers failed; the next round tries again"),
            }
        }
        Ok(true)
    }

    /// Keeps etcd's history from growing without end (every ownership change, report and
    /// state record adds a revision; etcd refuses all writes once its database reaches its
    /// quota): every `keep`, compacts to the revision marked `keep` before, so between one
    /// and two times `keep` of history stays. `now_rev`: the revision of this round's write.
    /// Watches restart from reads a few ms old, far newer than anything compacted.
    async fn compact_history(&mut self, client: &mut Client, keep: Duration, now_rev: i64) {
        let Some((marked_at, mark)) = self.history_mark else {
            self.history_mark = Some((std::time::Instant::now(), now_rev));
            return;
        };
        if marked_at.elapsed() < keep {
            return;
        }
        self.history_mark = Some((std::time::Instant::now(), now_rev));
        match ledger_io::timed(async { Ok(client.compact(mark, None).await?) }).await {
            Ok(_) => {
                update(self.status, |m| {
                    m.compactions += 1;
                    m.compacted_revision = mark;
                });
                info!(term = self.term, revision = mark, now_revision = now_rev, kept_s = keep.as_secs_f64(), "managing node: compacted etcd's history");
            }
            // Compacted further already (by a previous manager, or by etcd's own setting).
            Err(e) if format!("{e:#}").contains("compacted") => {}
            Err(e) => {
                warn!(term = self.term, revision = mark, error = %format!("{e:#}"), "managing node: compacting etcd's history failed; trying again next time")
            }
        }
    }
}

/// What one planning round did.
#[derive(Debug, Clone, Default)]
pub struct PlanReport {
    pub moves: Vec<rebalance::Move>,
    /// Transactions written (0 or 1).
    pub writes: usize,
    /// Reading the ledger, the reports and the owners, ms.
    pub read_ms: f64,
    /// Deciding, ms.
    pub plan_ms: f64,
    /// Writing the moves, ms.
    pub write_ms: f64,
}

/// One planning round: reads the ledger, the nodes' reports and the VIPs' owners, plans
/// (`rebalance::plan`) and writes the moves in one transaction guarded by `guard` and by
/// each moved record's revision (a record changed meanwhile fails the round: the next one
/// reads again).
pub async fn planning_round(client: &mut Client, c: &Cluster, w: &Settings, guard: &Compare) -> anyhow::Result<PlanReport> {
    let started = std::time::Instant::now();
    let records = ledger_io::read_records(client, &c.key_prefix).await?;
    let reports = ledger_io::read_reports(client, &c.key_prefix).await?;
    let owners = read_owners(client, &c.key_prefix).await?;
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = std::time::Instant::now();
    let plain: BTreeMap<AddrKey, AllocRecord> = records.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
    let alive: BTreeSet<String> = reports.values().filter(|r| r.healthy).map(|r| r.node.clone()).collect();
    let now = super::record::now_unix_ms();
    let moves = rebalance::plan(
        &rebalance::Inputs { nodes: &c.all_nodes(), alive: &alive, reports: &reports, records: &plain, owners: &owners, now_unix_ms: now },
        w,
        &c.placement,
    );
    let plan_ms = started.elapsed().as_secs_f64() * 1e3;
    if moves.is_empty() {
        return Ok(PlanReport { moves, writes: 0, read_ms, plan_ms, write_ms: 0.0 });
    }
    let started = std::time::Instant::now();
    let mut when = vec![guard.clone()];
    let mut then = Vec::new();
    for m in &moves {
        let (rec, rev) = &records[&m.key];
        let key = pools::alloc_key(&c.key_prefix, &m.key.0, m.key.1);
        when.push(Compare::mod_revision(key.as_bytes(), CompareOp::Equal, *rev));
        let moved = AllocRecord { moved_at_unix_ms: if m.reason == rebalance::Reason::NodeGone { rec.moved_at_unix_ms } else { now }, ..rec.moved_to(&m.to) };
        then.push(TxnOp::put(key, serde_json::to_vec(&moved)?, None));
    }
    let ok = client.txn(Txn::new().when(when).and_then(then)).await?.succeeded();
    let write_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(PlanReport { moves: if ok { moves } else { Vec::new() }, writes: 1, read_ms, plan_ms, write_ms })
}

/// Each VIP's owner now, from the ownership records.
async fn read_owners(client: &mut Client, key_prefix: &str) -> anyhow::Result<BTreeMap<std::net::IpAddr, String>> {
    let resp = client.get(super::record::vips_prefix(key_prefix), Some(GetOptions::new().with_prefix())).await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| Some((super::record::vip_of(key_prefix, kv.key())?, serde_json::from_slice::<super::record::VipRecord>(kv.value()).ok()?.owner)))
        .collect())
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
            client = ledger_io::connect(&c).await.ok();
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

/// The ledger: every handed-out address and every retired one.
pub async fn read_ledger(client: &mut Client, key_prefix: &str) -> anyhow::Result<(BTreeMap<AddrKey, AllocRecord>, BTreeSet<AddrKey>)> {
    let records = ledger_io::read_records(client, key_prefix).await?.into_iter().map(|(k, (r, _))| (k, r)).collect();
    // Retired addresses stay in the ledger as retired records (the generator skips them).
    Ok((records, BTreeSet::new()))
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
