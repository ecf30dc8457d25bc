//! The managing-node side's etcd calls, shared by the manager, every node's follower and
//! the request path: connecting, bounding a call's time, reading the ledger and the nodes'
//! placement reports.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{Client, ConnectOptions, GetOptions};

use super::{
    placement::NodeReport,
    pools::{self, AllocRecord},
    vipgen::AddrKey,
};
use crate::config::cluster::Cluster;

/// How long one etcd call may take before it counts as failed (a manager then stands down;
/// a request is refused with "ask again").
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A client without the per-request timeout of the VIP store: a campaign waits as long as
/// another node is the manager.
pub async fn connect(c: &Cluster) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    Ok(Client::connect(&c.etcd_endpoints, Some(opts)).await?)
}

/// Runs an etcd call with [`CALL_TIMEOUT`]: an unreachable etcd fails it.
pub async fn timed<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("an etcd request took over {} ms (etcd unreachable?)", CALL_TIMEOUT.as_millis()),
    }
}

pub fn reports_prefix(key_prefix: &str) -> String {
    format!("{key_prefix}-manager/nodes/")
}

/// Every node's published report (only live nodes have one: each is held by its lease).
pub async fn read_reports(client: &mut Client, key_prefix: &str) -> anyhow::Result<BTreeMap<String, NodeReport>> {
    Ok(read_reports_at(client, key_prefix).await?.0)
}

/// [`read_reports`] and the revision the read saw, keyed by the node its key names.
pub async fn read_reports_at(client: &mut Client, key_prefix: &str) -> anyhow::Result<(BTreeMap<String, NodeReport>, i64)> {
    let prefix = reports_prefix(key_prefix);
    let resp = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let reports = resp
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.strip_prefix(prefix.as_str())?.to_string(), serde_json::from_slice::<NodeReport>(kv.value()).ok()?)))
        .collect();
    Ok((reports, revision))
}

/// The ledger's records with their mod revisions (for writes compared on them).
pub async fn read_records(client: &mut Client, key_prefix: &str) -> anyhow::Result<BTreeMap<AddrKey, (AllocRecord, i64)>> {
    Ok(read_records_at(client, key_prefix).await?.0)
}

/// [`read_records`] and the revision the read saw.
pub async fn read_records_at(client: &mut Client, key_prefix: &str) -> anyhow::Result<(BTreeMap<AddrKey, (AllocRecord, i64)>, i64)> {
    let resp = client.get(pools::ledger_prefix(key_prefix), Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut records = BTreeMap::new();
    for kv in resp.kvs() {
        let (Ok(key), Ok(rec)) = (kv.key_str(), serde_json::from_slice::<AllocRecord>(kv.value())) else { continue };
        if let Some(k) = pools::parse_alloc_key(key_prefix, key) {
            records.insert(k, (rec, kv.mod_revision()));
        }
    }
    Ok((records, revision))
}
