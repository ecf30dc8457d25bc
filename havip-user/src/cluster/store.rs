//! etcd, the source of truth for who owns each VIP. Three operations, each one round trip:
//! a linearizable read of everything under the prefix (every VIP record, the owner's
//! confirmation and everyone's view, and every node's sign of life), a write of one record
//! guarded by its mod revision (or its absence), and the rewrite of this node's sign of life.
//!
//! The read runs every few milliseconds on every node, so after the first it fetches only
//! what changed ([`ReadCache`]): with hundreds of VIPs, decoding every record each time
//! kept the cluster thread busy enough to send its heartbeats late.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::Context;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::record::{self, NodeMark, VipRecord};
use crate::config::cluster::Cluster;

/// Every record under the prefix, with its epoch (mod revision).
pub type Records = BTreeMap<IpAddr, (VipRecord, u64)>;

/// Every node's sign of life: name -> (mod revision, announced rewrite interval).
pub type Marks = BTreeMap<String, (u64, Duration)>;

/// A read: the store's revision it saw, the records and the signs of life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub records: Records,
    pub marks: Marks,
}

/// The last complete view one reader built, so its next read fetches only keys modified
/// since. A deletion does not show among modified keys; the key count (read in the same
/// transaction) reveals it, and then the read starts over in full.
#[derive(Default)]
pub struct ReadCache {
    view: Option<Snapshot>,
    /// Every key under the prefix at `view.revision` (records, marks and any other).
    keys: BTreeSet<Vec<u8>>,
}

/// How a read was answered, for tests of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    Full,
    Changes,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
}

/// How long one request may take before it counts as failed: short, so a node notices an
/// unreachable etcd within a few confirmation rounds and keeps serving on acknowledgements.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(250);
/// How long havipd waits for etcd at start before it gives up with an error.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// Connects and reads once, so an unreachable or unusable etcd is a clear error at
    /// start, not a hang.
    pub async fn connect(c: &Cluster) -> anyhow::Result<Store> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let what = format!("etcd at {}", c.etcd_endpoints.join(", "));
        let connect = async {
            let client = Client::connect(&c.etcd_endpoints, Some(opts)).await.with_context(|| format!("cannot connect to {what}"))?;
            let mut store = Store { client, prefix: c.key_prefix.clone(), endpoints: c.etcd_endpoints.clone() };
            // A lazy channel connects on first use: read once to know etcd answers.
            let mut last = None;
            for _ in 0..20 {
                match store.read_all(&mut ReadCache::default()).await {
                    Ok(_) => return Ok(store),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last.expect("tried at least once"))
        };
        match tokio::time::timeout(START_TIMEOUT, connect).await {
            Ok(r) => {
                r.with_context(|| format!("{what} does not answer; check cluster.etcd_endpoints and that etcd runs (havipd serves no cluster VIP without it)"))
            }
            Err(_) => anyhow::bail!(
                "{what} did not answer within {} s; check cluster.etcd_endpoints and that etcd runs (havipd serves no cluster VIP without it)",
                START_TIMEOUT.as_secs()
            ),
        }
    }

    /// A store on a client connected elsewhere (tests of the reads against a real etcd).
    pub fn with_client(client: Client, prefix: &str, endpoints: Vec<String>) -> Store {
        Store { client, prefix: prefix.to_string(), endpoints }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Every VIP record and sign of life, linearizably (etcd's default read): it reflects
    /// every write committed before the read was sent. With a filled `cache`, one
    /// transaction reads the key count and the keys modified since the cached view.
    pub async fn read_all(&mut self, cache: &mut ReadCache) -> anyhow::Result<Snapshot> {
        Ok(self.read_counted(cache).await?.0)
    }

    /// [`Store::read_all`], also saying whether it read everything or only changes.
    pub async fn read_counted(&mut self, cache: &mut ReadCache) -> anyhow::Result<(Snapshot, ReadKind)> {
        let prefix = format!("{}/", self.prefix);
        if let Some(view) = cache.view.as_mut() {
            let txn = Txn::new().and_then([
                TxnOp::get(prefix.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only())),
                TxnOp::get(prefix.as_bytes(), Some(GetOptions::new().with_prefix().with_min_mod_revision(view.revision as i64 + 1))),
            ]);
            let resp = self.client.txn(txn).await.context("reading the VIP records")?;
            let revision = resp.header().map_or(0, |h| h.revision() as u64);
            let ops = resp.op_responses();
            let (Some(TxnOpResponse::Get(count)), Some(TxnOpResponse::Get(changed))) = (ops.first(), ops.get(1)) else {
                anyhow::bail!("reading the VIP records: etcd answered the read transaction without its two reads");
            };
            let mut keys = std::mem::take(&mut cache.keys);
            keys.extend(changed.kvs().iter().map(|kv| kv.key().to_vec()));
            // A revision going back is a different etcd (restored or recreated): start over.
            if keys.len() as i64 == count.count() && revision >= view.revision {
                for kv in changed.kvs() {
                    self.take(kv, &mut view.records, &mut view.marks);
                }
                view.revision = revision;
                cache.keys = keys;
                return Ok((view.clone(), ReadKind::Changes));
            }
            // Some key was deleted since (a released VIP), or etcd went back: read in full.
            cache.view = None;
        }
        let resp = self.client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())).await.context("reading the VIP records")?;
        let mut view = Snapshot { revision: resp.header().map_or(0, |h| h.revision() as u64), ..Default::default() };
        for kv in resp.kvs() {
            self.take(kv, &mut view.records, &mut view.marks);
        }
        cache.keys = resp.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        cache.view = Some(view.clone());
        Ok((view, ReadKind::Full))
    }

    /// Decodes one key into the records or the marks (other keys under the prefix, such
    /// as the managing node's, are neither).
    fn take(&self, kv: &KeyValue, records: &mut Records, marks: &mut Marks) {
        if let Some(node) = record::node_of(&self.prefix, kv.key()) {
            if let Ok(m) = serde_json::from_slice::<NodeMark>(kv.value()) {
                marks.insert(node.to_string(), (kv.mod_revision() as u64, Duration::from_millis(m.every_ms)));
            }
            return;
        }
        let Some(vip) = record::vip_of(&self.prefix, kv.key()) else { return };
        match serde_json::from_slice::<VipRecord>(kv.value()) {
            Ok(r) => {
                records.insert(vip, (r, kv.mod_revision() as u64));
            }
            Err(e) => {
                // Unreadable: as if absent (a later valid write replaces it).
                records.remove(&vip);
                tracing::warn!(%vip, error = %e, "unreadable VIP record in etcd; ignored");
            }
        }
    }

    /// Rewrites this node's sign of life (unconditionally: only this node writes it).
    pub async fn touch(&mut self, mark: &NodeMark) -> anyhow::Result<()> {
        let key = record::node_key(&self.prefix, &mark.node);
        self.client.put(key.as_bytes(), serde_json::to_vec(mark)?, None).await.context("writing this node's sign of life")?;
        Ok(())
    }

    /// Writes `rec` if the record's mod revision is still `expected` (`None`: if it does
    /// not exist). `Ok(Some(epoch))`: written, at that revision; `Ok(None)`: another write
    /// came first.
    pub async fn write(&mut self, vip: IpAddr, expected: Option<u64>, rec: &VipRecord) -> anyhow::Result<Option<u64>> {
        let key = record::key(&self.prefix, vip);
        let guard = match expected {
            Some(rev) => Compare::mod_revision(key.as_bytes(), CompareOp::Equal, rev as i64),
            None => Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0),
        };
        let value = serde_json::to_vec(rec)?;
        let txn = Txn::new().when(vec![guard]).and_then(vec![TxnOp::put(key.as_bytes(), value, None)]);
        let resp = self.client.txn(txn).await.with_context(|| format!("writing the record of {vip}"))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let rev = resp.header().map(|h| h.revision()).context("etcd answered a write without a revision")?;
        Ok(Some(rev as u64))
    }
}
