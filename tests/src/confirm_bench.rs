//! What the confirmation read costs etcd, by the number of VIP records: every node runs it
//! every `L / 4` (10 ms), so etcd serves 100 of them a second per node. After the first,
//! each is one transaction (the key count, and the keys modified since the last read:
//! `store::ReadCache`), which decodes only what changed but still walks the whole prefix
//! in etcd's index. The baseline is a bare linearizable read of one key, measured in the
//! same run against the same etcd: the part of the cost that no design of the read avoids.

use std::{net::IpAddr, time::Instant};

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use havip_user::{
    cluster::{
        record::{self, VipRecord},
        store::{ReadCache, ReadKind, Store},
    },
    kernel::netns::in_netns,
};
use serde::Serialize;

use crate::{cluster::ClusterLab, cluster_bench::GapStats};

/// Confirmation reads per second one node makes (`L / 4` with the default lease of 40 ms).
const READS_PER_NODE_PER_S: f64 = 100.0;

#[derive(Debug, Serialize)]
pub struct Case {
    pub records: usize,
    /// Latency of one read, ms.
    pub baseline_ms: GapStats,
    pub cached_ms: GapStats,
    pub full_ms: GapStats,
    /// The key count alone (etcd walks only its in-memory index, reads no record): what a
    /// read that took its changes from a watch instead would still cost.
    pub count_only_ms: GapStats,
    pub count_only_etcd_cpu_us: f64,
    /// cached / baseline, p50 and p99.
    pub cached_ratio: (f64, f64),
    /// etcd's CPU time per read (user + system over all the trials), µs.
    pub baseline_etcd_cpu_us: f64,
    pub cached_etcd_cpu_us: f64,
    /// Nodes whose confirmation reads one etcd core serves, from `cached_etcd_cpu_us`.
    pub nodes_per_etcd_core: f64,
}

#[derive(Debug, Serialize)]
pub struct Confirm {
    pub trials: usize,
    pub cases: Vec<Case>,
}

/// etcd's CPU time so far, µs (from /proc: clock ticks of 10 ms, so a figure per read is
/// good to one tick over all the trials: about ±10% at 100 records and 300 trials).
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("etcd's /proc stat");
    // Fields after the command (which may hold spaces): state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks * 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn vip(i: usize) -> IpAddr {
    IpAddr::from((0xc612_0000u32 + i as u32).to_be_bytes())
}

/// Runs `trials` reads of each kind at each record count; every cached read must be
/// answered from the changes (`ReadKind::Changes`) and every read must hold all records.
pub fn run(trials: usize, counts: &[usize]) -> Confirm {
    let lab = ClusterLab::new(1, 1);
    let (endpoints, prefix) = (lab.etcd_endpoints(), lab.key_prefix());
    let etcd = lab.etcd_pid(0).expect("etcd runs");
    let counts = counts.to_vec();
    let cases = in_netns(&lab.node_ns(1).name.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut kv = Client::connect(&endpoints, None).await.expect("etcd answers");
            let mut store = Store::with_client(kv.clone(), &prefix, endpoints.clone());
            let one_key = format!("{prefix}-bench/one");
            kv.put(one_key.as_bytes(), "x", None).await.unwrap();
            let mut cases = Vec::new();
            let mut written = 0;
            for n in counts {
                // Records up to n, 100 per transaction.
                let rec = VipRecord {
                    owner: "n1".into(),
                    candidates: vec!["n1".into(), "n2".into()],
                    handover: false,
                    from: None,
                    reason: "initial".into(),
                    at_unix_ms: 1,
                };
                let value = serde_json::to_vec(&rec).unwrap();
                while written < n {
                    let ops: Vec<TxnOp> = (written..n.min(written + 100)).map(|i| TxnOp::put(record::key(&prefix, vip(i)), value.clone(), None)).collect();
                    written += ops.len();
                    kv.txn(Txn::new().and_then(ops)).await.unwrap();
                }
                eprintln!("[bench] confirmation reads: {n} records, {trials} trials of each kind");
                let (mut base, mut cached, mut full) = (Vec::new(), Vec::new(), Vec::new());
                let cpu0 = cpu_us(etcd);
                for _ in 0..trials {
                    let t = Instant::now();
                    let resp = kv.get(one_key.as_bytes(), None).await.unwrap();
                    base.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(resp.kvs().len(), 1, "the baseline read found its key");
                }
                let base_cpu = (cpu_us(etcd) - cpu0) / trials as f64;
                let mut cache = ReadCache::default();
                let (first, kind) = store.read_counted(&mut cache).await.unwrap();
                assert_eq!((first.records.len(), kind), (n, ReadKind::Full), "the first read is a full one");
                let cpu0 = cpu_us(etcd);
                for _ in 0..trials {
                    let t = Instant::now();
                    let (snap, kind) = store.read_counted(&mut cache).await.unwrap();
                    cached.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!((snap.records.len(), kind), (n, ReadKind::Changes), "a cached read took another path");
                }
                let cached_cpu = (cpu_us(etcd) - cpu0) / trials as f64;
                let mut count_only = Vec::new();
                let records_prefix = format!("{prefix}/");
                let cpu0 = cpu_us(etcd);
                for _ in 0..trials {
                    let t = Instant::now();
                    let resp = kv.get(records_prefix.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
                    count_only.push(t.elapsed().as_secs_f64() * 1e3);
                    assert!(resp.count() as usize >= n, "the count covers the records");
                }
                let count_cpu = (cpu_us(etcd) - cpu0) / trials as f64;
                for _ in 0..trials {
                    let t = Instant::now();
                    let (snap, kind) = store.read_counted(&mut ReadCache::default()).await.unwrap();
                    full.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!((snap.records.len(), kind), (n, ReadKind::Full), "a full read took another path");
                }
                let (b, c) = (GapStats::of(base), GapStats::of(cached));
                cases.push(Case {
                    records: n,
                    cached_ratio: (c.p50_ms / b.p50_ms, c.p99_ms / b.p99_ms),
                    baseline_ms: b,
                    cached_ms: c,
                    full_ms: GapStats::of(full),
                    count_only_ms: GapStats::of(count_only),
                    count_only_etcd_cpu_us: count_cpu,
                    baseline_etcd_cpu_us: base_cpu,
                    cached_etcd_cpu_us: cached_cpu,
                    nodes_per_etcd_core: 1e6 / (cached_cpu.max(1.0) * READS_PER_NODE_PER_S),
                });
            }
            cases
        })
    })
    .expect("entering the node's namespace");
    Confirm { trials, cases }
}
