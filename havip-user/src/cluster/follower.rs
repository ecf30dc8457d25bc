//! Every node's part in the managed cluster, on the managing-node thread (see `manager`):
//!
//! - [`follow_ledger`]: one read of the ledger and of the nodes' reports, then a watch of
//!   each from the revision read, every change applied to the view as it comes (no
//!   re-reads: a burst of grants costs each node the changed records, not the whole ledger
//!   each time; a node's report, or its lease running out, shows at once). The view is
//!   published at most every [`PUBLISH_EVERY`] while it changes; the granted VIPs wake
//!   the node when they change.
//! - Each new spare of this node is checked on the wire once (an ARP probe or duplicate
//!   address detection on each NIC, `kernel::addr_probe`) before it can be used, on tasks
//!   of their own, and the result written compared on the record's revision: checked, or a
//!   conflict when someone answered (the manager then replaces it and never hands it out).
//! - [`publish_report`]: this node's placement report, kept in etcd under a lease.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tracing::warn;

use super::{
    ledger_io::{connect, read_records_at, read_reports_at, reports_prefix, timed},
    placement::NodeReport,
    pools::{self, AllocRecord},
    requests::LedgerView,
    vipgen::AddrKey,
};
use crate::{config::cluster::Cluster, kernel::addr_probe};

/// While the ledger changes, the view is published at most this often.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(10);
/// The pause before following the ledger again after etcd failed.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How many of its new spares a node checks on the link at once.
pub const CONCURRENT_CHECKS: usize = 16;
/// Time to live of a report's lease, s (etcd raises it to its minimum).
pub const REPORT_TTL_S: i64 = 1;
/// How often a node's report may be rewritten.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Follows the ledger for as long as havipd runs (see the module's text); on any etcd
/// error it reconnects and reads the ledger afresh.
pub async fn follow_ledger(c: Cluster, nics: Vec<String>, grants: watch::Sender<Vec<pools::GrantedVip>>, view: watch::Sender<Arc<LedgerView>>) {
    let checking: Arc<Mutex<BTreeSet<AddrKey>>> = Arc::default();
    let mut failures = 0u32;
    loop {
        let r = follow_once(&c, &nics, &grants, &view, &checking).await;
        if let Err(e) = r {
            if failures == 0 {
                warn!(error = %format!("{e:#}"), "following the ledger: etcd failed; reconnecting and reading it again");
            }
            failures += 1;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

async fn follow_once(
    c: &Cluster,
    nics: &[String],
    grants: &watch::Sender<Vec<pools::GrantedVip>>,
    view: &watch::Sender<Arc<LedgerView>>,
    checking: &Arc<Mutex<BTreeSet<AddrKey>>>,
) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    let (mut records, mut revision) = timed(read_records_at(&mut client, &c.key_prefix)).await?;
    let (mut reports, reports_rev) = timed(read_reports_at(&mut client, &c.key_prefix)).await?;
    let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let (_watcher, mut stream) = timed(async { Ok(client.watch(pools::ledger_prefix(&c.key_prefix), Some(opts)).await?) }).await?;
    let opts = WatchOptions::new().with_prefix().with_start_revision(reports_rev + 1);
    let (_reports_watcher, mut report_changes) = timed(async { Ok(client.watch(reports_prefix(&c.key_prefix), Some(opts)).await?) }).await?;
    let mut dirty = true;
    let mut publish_at = tokio::time::Instant::now();
    loop {
        if dirty && tokio::time::Instant::now() >= publish_at {
            publish(c, nics, grants, view, checking, &client, &records, &reports, revision);
            dirty = false;
            publish_at = tokio::time::Instant::now() + PUBLISH_EVERY;
        }
        tokio::select! {
            msg = stream.message() => {
                let Some(resp) = msg? else { anyhow::bail!("etcd ended the watch on the ledger") };
                if resp.canceled() {
                    anyhow::bail!("etcd canceled the watch on the ledger (compacted to revision {})", resp.compact_revision());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(k) = kv.key_str().ok().and_then(|key| pools::parse_alloc_key(&c.key_prefix, key)) else { continue };
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<AllocRecord>(kv.value()) {
                            Ok(rec) => {
                                records.insert(k, (rec, kv.mod_revision()));
                            }
                            Err(_) => {
                                records.remove(&k);
                            }
                        },
                        EventType::Delete => {
                            records.remove(&k);
                        }
                    }
                    revision = revision.max(kv.mod_revision());
                }
                // Only the events' own revisions advance the view's: a node keeps its own
                // writes over the view until the view holds the event of each.
                dirty = true;
            }
            msg = report_changes.message() => {
                let Some(resp) = msg? else { anyhow::bail!("etcd ended the watch on the nodes' reports") };
                if resp.canceled() {
                    anyhow::bail!("etcd canceled the watch on the nodes' reports (compacted to revision {})", resp.compact_revision());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(node) = kv.key_str().ok().and_then(|k| k.strip_prefix(&reports_prefix(&c.key_prefix))).map(str::to_string) else { continue };
                    match (ev.event_type(), serde_json::from_slice::<NodeReport>(kv.value())) {
                        (EventType::Put, Ok(r)) => {
                            reports.insert(node, r);
                        }
                        _ => {
                            reports.remove(&node);
                        }
                    }
                }
                dirty = true;
            }
            _ = tokio::time::sleep_until(publish_at), if dirty => {}
        }
    }
}

/// Publishes the view (first: a change of the granted VIPs wakes the node, which then
/// serves what the view says), the granted VIPs, and starts the checks of new spares.
#[allow(clippy::too_many_arguments)]
fn publish(
    c: &Cluster,
    nics: &[String],
    grants: &watch::Sender<Vec<pools::GrantedVip>>,
    view: &watch::Sender<Arc<LedgerView>>,
    checking: &Arc<Mutex<BTreeSet<AddrKey>>>,
    client: &Client,
    records: &BTreeMap<AddrKey, (AllocRecord, i64)>,
    reports: &BTreeMap<String, NodeReport>,
    revision: i64,
) {
    let fresh = LedgerView { records: records.clone(), reports: reports.clone(), revision };
    let now = fresh.granted();
    view.send_replace(Arc::new(fresh));
    grants.send_if_modified(|g| {
        let changed = *g != now;
        *g = now;
        changed
    });
    // Up to CONCURRENT_CHECKS at once (each takes about half a second), on tasks of their
    // own: a burst of new spares costs a few seconds of checks, not hundreds of sockets.
    let Ok(mut set) = checking.lock() else { return };
    let room = CONCURRENT_CHECKS.saturating_sub(set.len());
    let new: Vec<(AddrKey, AllocRecord, i64)> = records
        .iter()
        .filter(|(k, (r, _))| r.node == c.node && r.state == pools::State::Spare && !r.checked && !set.contains(*k))
        .take(room)
        .map(|(k, (r, rev))| (k.clone(), r.clone(), *rev))
        .collect();
    for ((net, addr), rec, rev) in new {
        set.insert((net.clone(), addr));
        let (nics, checking, mut client, prefix) = (nics.to_vec(), checking.clone(), client.clone(), c.key_prefix.clone());
        tokio::spawn(async move {
            let held_on = tokio::task::spawn_blocking(move || {
                nics.iter().find(|n| matches!(addr_probe::nic_link(n).and_then(|(ix, mac)| addr_probe::someone_holds(ix, mac, addr)), Ok(true))).cloned()
            })
            .await;
            if let Ok(held_on) = held_on {
                let mut new = rec;
                match &held_on {
                    Some(nic) => {
                        new.state = pools::State::Conflict;
                        warn!(network = %net, %addr, %nic, "spare VIP in use on the link (someone answered the probe): marked conflict, the manager replaces it");
                    }
                    None => new.checked = true,
                }
                let key = pools::alloc_key(&prefix, &net, addr);
                if let Ok(value) = serde_json::to_vec(&new) {
                    let txn = Txn::new().when(vec![Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev)]).and_then(vec![TxnOp::put(
                        key.as_bytes(),
                        value,
                        None,
                    )]);
                    let _ = timed(async { Ok(client.txn(txn).await?) }).await;
                }
            }
            if let Ok(mut set) = checking.lock() {
                set.remove(&(net, addr));
            }
        });
    }
}

/// Keeps this node's report in etcd under a lease (gone with the node), rewritten when it
/// changes, at most every [`REPORT_EVERY`].
pub async fn publish_report(c: Cluster, mut report: watch::Receiver<NodeReport>) {
    let key = format!("{}{}", reports_prefix(&c.key_prefix), c.node);
    loop {
        let r: anyhow::Result<()> = async {
            let mut client = connect(&c).await?;
            let lease = timed(async { Ok(client.lease_grant(REPORT_TTL_S, None).await?) }).await?;
            let (id, ttl) = (lease.id(), lease.ttl().max(1));
            let (mut keeper, mut acks) = client.lease_keep_alive(id).await?;
            let mut keep = tokio::time::interval(Duration::from_millis(ttl as u64 * 1000 / 3));
            let mut last_put = None;
            loop {
                let due =
                    last_put.is_none_or(|t: std::time::Instant| t.elapsed() >= REPORT_EVERY) && report.has_changed().unwrap_or(false) || last_put.is_none();
                if due {
                    let mut r = report.borrow_and_update().clone();
                    r.node = c.node.clone();
                    r.at_unix_ms = super::record::now_unix_ms();
                    timed(async { Ok(client.put(key.as_bytes(), serde_json::to_vec(&r)?, Some(PutOptions::new().with_lease(id))).await?) }).await?;
                    last_put = Some(std::time::Instant::now());
                }
                tokio::select! {
                    _ = keep.tick() => {
                        keeper.keep_alive().await?;
                        match acks.message().await? {
                            Some(a) if a.ttl() > 0 => {}
                            _ => anyhow::bail!("the report's lease expired"),
                        }
                    }
                    _ = tokio::time::sleep(REPORT_EVERY) => {}
                }
            }
        }
        .await;
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), "placement report: cannot keep it in etcd; retrying in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
