//! Cluster-wide VIP requests (issue 13): an application asks any node; the VIP goes to the
//! node placement ranks first (`placement`), from the ledger in etcd:
//!
//! 1. a shared request joins a shared VIP of that node whose ports allow it;
//! 2. else one of that node's checked spares is granted (any node may write the grant:
//!    one compare-and-put on the record's revision, no manager needed);
//! 3. else (that node has no spare left, or the request names a network without spares)
//!    the request is forwarded to the managing node, which generates an address by the
//!    network's rules and grants it in one transaction guarded by its leadership.
//!
//! Forwarding goes through etcd: the node writes `<p>-manager/requests/<node>/<id>` and
//! watches `<p>-manager/answers/<node>/<id>`. The manager's transaction writes the grant
//! and the answer and deletes the request, and only while the request still exists; a
//! node that gives up deletes its request first, so a late manager can no longer grant it:
//! every request ends granted once or refused, never granted behind the caller's back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{
    ledger_io,
    placement::{self, Ask, NodeRank, NodeReport},
    pools::{self, AllocRecord, State, Use},
    vipgen::{self, AddrKey, Allocation, Ledger},
};
use crate::config::{cluster::Cluster, ranking::Settings};

/// How long a node waits for the managing node to answer a forwarded request.
pub const FORWARD_WAIT: Duration = Duration::from_secs(3);
/// A forwarded request older than this is left to its node's timeout (the manager skips it).
const FORWARD_MAX_AGE_MS: u64 = 2_500;

/// The ledger and the nodes' reports as a node last read them (every half second, and at
/// once on a change).
#[derive(Debug, Clone, Default)]
pub struct LedgerView {
    pub records: BTreeMap<AddrKey, (AllocRecord, i64)>,
    pub reports: BTreeMap<String, NodeReport>,
    /// The etcd revision the read saw.
    pub revision: i64,
}

/// Ledger records a node wrote (`None`: deleted) with the revision of each write, kept
/// until its view of the ledger is at least that recent: what it serves and how it places
/// requests count its own writes at once, not after its next read.
pub type Written = BTreeMap<AddrKey, (Option<AllocRecord>, i64)>;

impl LedgerView {
    /// Lays the writes the view is older than over it (a copy only when there are some).
    pub fn with(self: Arc<Self>, written: &Written) -> Arc<Self> {
        let newer: Vec<_> = written.iter().filter(|(_, (_, rev))| *rev > self.revision).collect();
        if newer.is_empty() {
            return self;
        }
        let mut view = (*self).clone();
        for (k, (r, rev)) in newer {
            match r {
                Some(r) => view.records.insert(k.clone(), (r.clone(), *rev)),
                None => view.records.remove(k),
            };
        }
        Arc::new(view)
    }

    /// The granted VIPs it shows.
    pub fn granted(&self) -> Vec<pools::GrantedVip> {
        pools::granted(self.records.iter().map(|(k, (r, _))| (k, r)))
    }

    /// The nodes placement may use: alive (a report in etcd) and healthy.
    pub fn alive(&self) -> BTreeSet<String> {
        self.reports.values().filter(|r| r.healthy).map(|r| r.node.clone()).collect()
    }
}

/// A node's connection to the ledger for its API calls, kept across calls (a connection
/// costs round trips a request should not pay).
#[derive(Clone)]
pub struct LedgerClient(pub(crate) Client);

impl LedgerClient {
    pub async fn connect(c: &Cluster) -> anyhow::Result<Self> {
        Ok(Self(ledger_io::timed(ledger_io::connect(c)).await?))
    }
}

pub fn requests_prefix(key_prefix: &str) -> String {
    format!("{key_prefix}-manager/requests/")
}

fn answers_prefix(key_prefix: &str) -> String {
    format!("{key_prefix}-manager/answers/")
}

fn answer_key(key_prefix: &str, node: &str, id: &str) -> String {
    format!("{}{node}/{id}", answers_prefix(key_prefix))
}

/// An answer still there this long after its request was made was never collected: its
/// requester deletes it once read, at most [`FORWARD_WAIT`] and a withdrawal after asking,
/// unless it died waiting. The managing node sweeps those ([`sweep_answers`]).
pub const ANSWER_KEEP: Duration = Duration::from_secs(60);

/// Whether the answer at `key` is older than [`ANSWER_KEEP`] at `now_unix_ms`: a request's
/// id starts with its unix time in ms. A key that does not parse is not havip's: kept.
fn uncollected(key: &str, now_unix_ms: u64) -> bool {
    let asked_ms = key.rsplit('/').next().and_then(|id| id.split('-').next()).and_then(|ms| ms.parse::<u64>().ok());
    asked_ms.is_some_and(|at| now_unix_ms.saturating_sub(at) > ANSWER_KEEP.as_millis() as u64)
}

/// The managing node's side: deletes the answers their requesters never collected (see
/// [`ANSWER_KEEP`]), guarded by `guard` (its leadership). Returns how many it deleted.
pub async fn sweep_answers(client: &mut Client, key_prefix: &str, guard: &Compare) -> anyhow::Result<usize> {
    let resp = client.get(answers_prefix(key_prefix), Some(GetOptions::new().with_prefix().with_keys_only())).await?;
    let now = super::record::now_unix_ms();
    let stale: Vec<&str> = resp.kvs().iter().filter_map(|kv| kv.key_str().ok()).filter(|k| uncollected(k, now)).collect();
    let mut deleted = 0;
    // etcd caps a transaction's operations (128 by default).
    for chunk in stale.chunks(100) {
        let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::delete(k.as_bytes(), None)).collect();
        if client.txn(Txn::new().when(vec![guard.clone()]).and_then(ops)).await?.succeeded() {
            deleted += chunk.len();
        }
    }
    Ok(deleted)
}

/// How a request was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// Joined a shared VIP whose ports allowed it.
    Packed,
    /// One of the chosen node's spares.
    Spare,
    /// Generated by the managing node.
    Manager,
}

impl How {
    pub const ALL: [How; 3] = [How::Packed, How::Spare, How::Manager];

    pub fn name(&self) -> &'static str {
        match self {
            How::Packed => "packed",
            How::Spare => "spare",
            How::Manager => "manager",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub network: String,
    pub vip: IpAddr,
    pub node: String,
    pub how: How,
    /// Why that node (placement's words).
    pub why: String,
    /// The record as written and the write's revision.
    #[serde(skip)]
    pub written: (AllocRecord, i64),
}

/// What a refused request says.
#[derive(Debug)]
pub enum Refused {
    /// The request cannot be met as asked (a conflict of the caller's making).
    Conflict(String),
    /// etcd or the managing node did not answer: the caller may ask again.
    Unavailable(String),
}

/// Ranks the nodes for `u` on `view`'s reports and `records`.
pub fn rank(c: &Cluster, w: &Settings, view: &LedgerView, records: &BTreeMap<AddrKey, (AllocRecord, i64)>, u: &Use) -> Vec<NodeRank> {
    let mut alive = view.alive();
    // This node is alive: it is answering the request (its own report may be in flight).
    alive.insert(c.node.clone());
    let ask = Ask { app: &u.app, targets: &u.targets, asked: &c.node };
    placement::rank_nodes(ask, &c.all_nodes(), &alive, &view.reports, records.values().map(|(r, _)| r), w, &c.placement)
}

/// How the allocation is to be kept: never moved by rebalancing; never handed out again
/// once released.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Keep {
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub do_not_reassign: bool,
}

impl Keep {
    fn onto(self, r: &mut AllocRecord) {
        r.pinned |= self.pinned;
        r.do_not_reassign |= self.do_not_reassign;
    }
}

/// Grants `u` in `network`: packed, from the chosen node's spares, or through the
/// managing node (see the module's text).
pub async fn grant(c: &Cluster, w: &Settings, ledger: &mut LedgerClient, view: &LedgerView, network: &str, u: Use, keep: Keep) -> Result<Granted, Refused> {
    let unavailable = |e: anyhow::Error| Refused::Unavailable(format!("the ledger in etcd: {e:#}"));
    if let Some(held) = view.records.iter().find(|((n, _), (r, _))| {
        n == network && r.state == State::Granted && r.uses.iter().any(|x| x.app == u.app && x.protocol == u.protocol && x.service_port == u.service_port)
    }) {
        return Err(Refused::Conflict(format!("`{}` already holds {}:{} ({:?}); release it first", u.app, held.0 .1, u.service_port, u.protocol)));
    }
    let spares_here = c.spares.as_ref().is_some_and(|s| s.network == network);
    // Twice: on the view, then on a fresh read if the view was stale.
    let mut fresh = None;
    for attempt in 0..2 {
        if attempt == 1 {
            fresh = Some(ledger_io::timed(ledger_io::read_records(&mut ledger.0, &c.key_prefix)).await.map_err(unavailable)?);
        }
        let records = fresh.as_ref().unwrap_or(&view.records);
        let ranked = rank(c, w, view, records, &u);
        let Some(best) = ranked.first().filter(|r| r.alive) else { return Err(Refused::Unavailable("no node is alive in etcd".into())) };
        let why = placement::why(&ranked, &c.node);
        let on_node = |r: &AllocRecord| r.node == best.node;
        let mut tries: Vec<(AddrKey, How)> = Vec::new();
        if !u.exclusive {
            tries.extend(records.iter().filter(|((n, _), (r, _))| n == network && on_node(r) && r.room_for(&u)).take(2).map(|(k, _)| (k.clone(), How::Packed)));
        }
        if spares_here {
            tries.extend(
                records
                    .iter()
                    .filter(|((n, _), (r, _))| n == network && on_node(r) && r.state == State::Spare && r.checked)
                    .take(2)
                    .map(|(k, _)| (k.clone(), How::Spare)),
            );
        }
        for (k, how) in tries {
            let (rec, rev) = records[&k].clone();
            let mut new = rec;
            if new.state == State::Spare {
                // A new grant: its successors are placement's runners-up.
                new.successors = ranked.iter().skip(1).filter(|r| r.alive).map(|r| r.node.clone()).collect();
            }
            new.state = State::Granted;
            new.uses.push(u.clone());
            keep.onto(&mut new);
            let key = pools::alloc_key(&c.key_prefix, &k.0, k.1);
            let value = serde_json::to_vec(&new).map_err(|e| unavailable(e.into()))?;
            let txn =
                Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![TxnOp::put(key.as_bytes(), value, None)]);
            let resp = ledger_io::timed(async { Ok(ledger.0.txn(txn).await?) }).await.map_err(unavailable)?;
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                return Ok(Granted { network: k.0, vip: k.1, node: best.node.clone(), how, why, written: (new, rev) });
            }
        }
    }
    forward(c, ledger, network, u, keep).await
}

/// A request forwarded to the managing node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    pub network: String,
    #[serde(rename = "use")]
    pub use_: Use,
    pub asked: String,
    pub at_unix_ms: u64,
    #[serde(default)]
    pub keep: Keep,
}

/// The managing node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub vip: Option<IpAddr>,
    pub node: Option<String>,
    pub why: String,
    /// Refused: the reason.
    pub error: Option<String>,
    /// The grant as written, and the revision of the write.
    #[serde(default)]
    pub record: Option<AllocRecord>,
    #[serde(default)]
    pub revision: i64,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

async fn forward(c: &Cluster, ledger: &mut LedgerClient, network: &str, u: Use, keep: Keep) -> Result<Granted, Refused> {
    let unavailable = |e: anyhow::Error| Refused::Unavailable(format!("forwarding to the managing node: {e:#}"));
    let id = format!("{}-{}", super::record::now_unix_ms(), NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let req_key = format!("{}{}/{id}", requests_prefix(&c.key_prefix), c.node);
    let ans_key = answer_key(&c.key_prefix, &c.node, &id);
    let client = &mut ledger.0;
    let (mut watcher, mut stream) = ledger_io::timed(async { Ok(client.watch(ans_key.as_bytes(), None).await?) }).await.map_err(unavailable)?;
    let f = Forwarded { network: network.to_string(), use_: u, asked: c.node.clone(), at_unix_ms: super::record::now_unix_ms(), keep };
    let value = serde_json::to_vec(&f).map_err(|e| unavailable(e.into()))?;
    ledger_io::timed(async { Ok(client.put(req_key.as_bytes(), value, None).await?) }).await.map_err(unavailable)?;
    let waited = tokio::time::timeout(FORWARD_WAIT, async {
        while let Ok(Some(resp)) = stream.message().await {
            if let Some(kv) = resp.events().iter().filter(|e| e.event_type() == EventType::Put).find_map(|e| e.kv()) {
                // Written in the grant's transaction: its revision is the grant's.
                return serde_json::from_slice::<Answer>(kv.value()).ok().map(|a| Answer { revision: kv.mod_revision(), ..a });
            }
        }
        None
    })
    .await;
    let _ = watcher.cancel().await;
    let answer = match waited {
        Ok(Some(a)) => a,
        _ => {
            // Withdraw the request; if it is gone already, the manager took it: read its answer.
            let withdraw =
                Txn::new().when(vec![Compare::version(req_key.as_bytes(), CompareOp::Greater, 0)]).and_then(vec![TxnOp::delete(req_key.as_bytes(), None)]);
            let withdrawn = ledger_io::timed(async { Ok(client.txn(withdraw).await?) }).await.map_err(unavailable)?.succeeded();
            let late = if withdrawn {
                None
            } else {
                ledger_io::timed(async { Ok(client.get(ans_key.as_bytes(), None).await?) })
                    .await
                    .map_err(unavailable)?
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<Answer>(kv.value()).ok().map(|a| Answer { revision: kv.mod_revision(), ..a }))
            };
            match late {
                Some(a) => a,
                None => {
                    return Err(Refused::Unavailable(format!(
                        "no managing node answered within {} s (none elected, or etcd slow); the request was withdrawn, ask again",
                        FORWARD_WAIT.as_secs()
                    )))
                }
            }
        }
    };
    let _ = client.delete(ans_key.as_bytes(), None).await;
    match (answer.vip, answer.node, answer.error, answer.record) {
        (Some(vip), Some(node), None, Some(rec)) => {
            Ok(Granted { network: network.to_string(), vip, node, how: How::Manager, why: answer.why, written: (rec, answer.revision) })
        }
        (_, _, Some(e), _) => Err(Refused::Conflict(e)),
        _ => Err(Refused::Unavailable("the managing node's answer was incomplete; ask again".into())),
    }
}

/// Releases `app`'s granted VIPs (or only `vip`) in every network of the cluster (see
/// `pools::release`), each compared on its record's revision. Needs no manager. Returns the
/// writes made.
pub async fn release(c: &Cluster, ledger: &mut LedgerClient, app: &str, vip: Option<IpAddr>) -> anyhow::Result<Written> {
    let client = &mut ledger.0;
    let records = ledger_io::timed(ledger_io::read_records(client, &c.key_prefix)).await?;
    let plain: BTreeMap<AddrKey, AllocRecord> = records.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
    let mut done = Written::new();
    for net in &c.networks {
        for ((n, addr), after) in pools::release(app, vip, net, &plain) {
            let key = pools::alloc_key(&c.key_prefix, &n, addr);
            let rev = records[&(n.clone(), addr)].1;
            let op = match &after {
                Some(rec) => TxnOp::put(key.as_bytes(), serde_json::to_vec(rec)?, None),
                None => TxnOp::delete(key.as_bytes(), None),
            };
            let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![op]);
            let resp = ledger_io::timed(async { Ok(client.txn(txn).await?) }).await?;
            if resp.succeeded() {
                let how = match &after {
                    None => "freed",
                    Some(r) if r.state == State::Retired => "retired",
                    Some(_) => "left to its other users",
                };
                info!(%app, %addr, network = %n, how, "cluster VIP released");
                done.insert((n.clone(), addr), (after, resp.header().map_or(0, |h| h.revision())));
            }
        }
    }
    Ok(done)
}

/// The managing node's side: grants every pending forwarded request, in one transaction
/// per request guarded by `guard` (its leadership), the new address's absence and the
/// request's existence. Returns how many it answered.
pub async fn serve_forwarded(
    client: &mut Client,
    c: &Cluster,
    w: &Settings,
    guard: &Compare,
    reports: &BTreeMap<String, NodeReport>,
    random: u64,
) -> anyhow::Result<usize> {
    let resp = client.get(requests_prefix(&c.key_prefix), Some(GetOptions::new().with_prefix())).await?;
    if resp.kvs().is_empty() {
        return Ok(0);
    }
    let pending: Vec<(String, Option<Forwarded>)> =
        resp.kvs().iter().filter_map(|kv| Some((kv.key_str().ok()?.to_string(), serde_json::from_slice::<Forwarded>(kv.value()).ok()))).collect();
    let mut records: BTreeMap<AddrKey, AllocRecord> = ledger_io::read_records(client, &c.key_prefix).await?.into_iter().map(|(k, (r, _))| (k, r)).collect();
    let alive: BTreeSet<String> = reports.values().filter(|r| r.healthy).map(|r| r.node.clone()).collect();
    let now = super::record::now_unix_ms();
    let mut answered = 0;
    for (i, (key, f)) in pending.into_iter().enumerate() {
        let Some(f) = f.filter(|f| now.saturating_sub(f.at_unix_ms) <= FORWARD_MAX_AGE_MS) else {
            // Unreadable, or its node gave up already: drop it (if still there).
            let _ = client.txn(Txn::new().when(vec![guard.clone()]).and_then(vec![TxnOp::delete(key.as_bytes(), None)])).await;
            continue;
        };
        let Some(id) = key.rsplit('/').next().map(str::to_string) else { continue };
        let ranked = placement::rank_nodes(
            Ask { app: &f.use_.app, targets: &f.use_.targets, asked: &f.asked },
            &c.all_nodes(),
            &alive,
            reports,
            records.values(),
            w,
            &c.placement,
        );
        let why = placement::why(&ranked, &f.asked);
        let node = ranked.first().map(|r| r.node.clone()).unwrap_or_else(|| f.asked.clone());
        let chosen = c.networks.iter().find(|n| n.name == f.network).ok_or_else(|| format!("`{}` is not a [[cluster.network]]", f.network)).and_then(|net| {
            let ledger = Ledger {
                allocated: records
                    .iter()
                    .map(|(k, r)| {
                        (k.clone(), Allocation { app: r.uses.first().map(|u| u.app.clone()).unwrap_or_default(), do_not_reassign: r.do_not_reassign })
                    })
                    .collect(),
                retired: BTreeSet::new(),
            };
            vipgen::choose(net, &ledger, &f.use_.app, &BTreeSet::new(), random.wrapping_add(i as u64)).map_err(|e| format!("network `{}`: {e}", f.network))
        });
        let ans_key = answer_key(&c.key_prefix, &f.asked, &id);
        let mut when = vec![guard.clone(), Compare::version(key.as_bytes(), CompareOp::Greater, 0)];
        let (answer, mut then) = match &chosen {
            Ok(addr) => {
                let successors = ranked.iter().skip(1).filter(|r| r.alive).map(|r| r.node.clone()).collect();
                let mut rec = AllocRecord { state: State::Granted, checked: true, uses: vec![f.use_.clone()], successors, ..AllocRecord::spare(&node) };
                f.keep.onto(&mut rec);
                let alloc = pools::alloc_key(&c.key_prefix, &f.network, *addr);
                when.push(Compare::create_revision(alloc.as_bytes(), CompareOp::Equal, 0));
                records.insert((f.network.clone(), *addr), rec.clone());
                (
                    Answer { vip: Some(*addr), node: Some(node.clone()), why: why.clone(), error: None, record: Some(rec.clone()), revision: 0 },
                    vec![TxnOp::put(alloc, serde_json::to_vec(&rec)?, None)],
                )
            }
            Err(e) => (Answer { vip: None, node: None, why: why.clone(), error: Some(e.clone()), record: None, revision: 0 }, Vec::new()),
        };
        then.push(TxnOp::put(ans_key, serde_json::to_vec(&answer)?, None));
        then.push(TxnOp::delete(key.as_bytes(), None));
        if client.txn(Txn::new().when(when).and_then(then)).await?.succeeded() {
            answered += 1;
            match &chosen {
                Ok(addr) => {
                    info!(app = %f.use_.app, vip = %addr, network = %f.network, %node, asked = %f.asked, %why, "managing node: forwarded request granted")
                }
                Err(e) => info!(app = %f.use_.app, network = %f.network, asked = %f.asked, error = %e, "managing node: forwarded request refused"),
            }
        }
    }
    Ok(answered)
}

/// A watch on the forwarded requests: the managing node serves them as they come.
pub async fn watch_requests(client: &mut Client, key_prefix: &str) -> anyhow::Result<(etcd_client::Watcher, etcd_client::WatchStream)> {
    Ok(client.watch(requests_prefix(key_prefix), Some(WatchOptions::new().with_prefix())).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_uncollected_only_past_its_keep_time_and_only_if_its_id_is_havips() {
        let keep = ANSWER_KEEP.as_millis() as u64;
        let now = 1_800_000_000_000u64;
        let key = |id: &str| answer_key("/havip/c1", "n2", id);
        let cases = [
            (format!("{}-7", now - keep - 1), true),
            (format!("{}-7", now - keep), false),
            (format!("{}-7", now - 5), false),
            // Asked "later" than now (clocks differ): not stale.
            (format!("{}-7", now + 1000), false),
            ("not-an-id".to_string(), false),
            (String::new(), false),
        ];
        for (id, stale) in cases {
            assert_eq!(uncollected(&key(&id), now), stale, "id {id:?}");
        }
    }
}
