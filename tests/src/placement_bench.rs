//! The managing node's planning round for `cargo xtask bench` (section `planning`): 10,000
//! granted VIPs over 32 nodes in a real etcd (the lab's one member), the nodes simulated by
//! their published placement reports (as the issue allows), one node just joined with no
//! VIPs.
//!
//! - **Measured:** one `manager::planning_round` as the managing node runs it: read the
//!   ledger, the reports and the owners from etcd, plan, write the moves in one guarded
//!   transaction. Path check per trial: exactly the move budget planned, all for load, to
//!   the new node, in one write, and the ledger shows exactly those moves afterwards (then
//!   they are undone, untimed, so every trial starts from the same ledger).
//! - **Baseline:** one etcd round trip (a linearizable read of one key) over the same
//!   connection, in the same run.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use havip_user::{
    cluster::{
        ledger_io, manager,
        placement::{NodeReport, PathReport},
        pools::{self, AllocRecord, State, Use},
    },
    config::{
        cluster::{Cluster, Peer, Placement},
        ranking::Settings,
        Protocol,
    },
};
use serde::Serialize;

use crate::{cluster::ClusterLab, cluster_bench::GapStats};

pub const VIPS: usize = 10_000;
pub const NODES: usize = 32;
const BUDGET: u32 = 50;

#[derive(Debug, Serialize)]
pub struct Planning {
    pub vips: usize,
    pub nodes: usize,
    pub move_budget: u32,
    pub round: GapStats,
    pub read: GapStats,
    pub plan: GapStats,
    pub write: GapStats,
    /// Moves and etcd write transactions of each round (every round the same).
    pub moves_per_round: usize,
    pub writes_per_round: usize,
    pub etcd_round_trip_baseline: GapStats,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

fn node(i: usize) -> String {
    format!("n{}", i + 1)
}

/// The cluster as the managing node (n1) sees it: 32 nodes, the move budget.
fn cluster(lab: &ClusterLab) -> Cluster {
    Cluster {
        node: node(0),
        etcd_endpoints: lab.etcd_endpoints(),
        key_prefix: lab.key_prefix(),
        heartbeat_port: 7947,
        heartbeat_interval: Duration::from_millis(5),
        heartbeat_misses: 8,
        lease: Duration::from_millis(40),
        clock_error: 0.01,
        giveback_hold_down: Duration::from_secs(30),
        restart_grace: Duration::from_secs(5),
        thread_nice: 0,
        compact_history: None,
        peers: (1..NODES).map(|i| Peer { name: node(i), addresses: vec![IpAddr::V4(Ipv4Addr::new(198, 18, 31, i as u8))] }).collect(),
        networks: Vec::new(),
        spares: None,
        placement: Placement { move_budget: BUDGET, move_hold_down: Duration::ZERO, ..Placement::default() },
    }
}

/// 10,000 granted VIPs on the first 31 nodes (a quarter with four targets), none on the
/// 32nd; every node reports the same paths (so no quality moves: the round plans load).
async fn populate(client: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let targets: Vec<IpAddr> = (1..=4).map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 9, i))).collect();
    let mut records = BTreeMap::new();
    for i in 0..VIPS {
        let addr = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i as u32));
        let u = Use {
            app: format!("app{}", i % 2000),
            protocol: Protocol::Tcp,
            service_port: 80,
            instance_port: 8080,
            exclusive: true,
            targets: if i % 4 == 0 { targets.clone() } else { Vec::new() },
            class: None,
        };
        let rec = AllocRecord { state: State::Granted, checked: true, uses: vec![u], ..AllocRecord::spare(&node(i % (NODES - 1))) };
        records.insert(pools::alloc_key(prefix, "prod", addr), serde_json::to_vec(&rec).unwrap());
    }
    let keys: Vec<(&String, &Vec<u8>)> = records.iter().collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<TxnOp> = chunk.iter().map(|(k, v)| TxnOp::put(k.as_bytes(), v.to_vec(), None)).collect();
        client.txn(Txn::new().and_then(ops)).await.expect("writing the ledger");
    }
    for i in 0..NODES {
        let paths = targets.iter().map(|t| (*t, PathReport { rtt_ms: Some(1.0 + (i % 3) as f64 * 0.1), loss_pct: Some(0.0), sent: 50, replies: 50 })).collect();
        let r = NodeReport { node: node(i), healthy: true, serving: 0, traffic_bps: 0, paths, at_unix_ms: 0 };
        client.put(format!("{}{}", ledger_io::reports_prefix(prefix), node(i)), serde_json::to_vec(&r).unwrap(), None).await.expect("writing a report");
    }
    records
}

pub fn run(trials: usize) -> Planning {
    let lab = ClusterLab::new(1, 1);
    let c = cluster(&lab);
    let prefix = lab.key_prefix();
    let endpoints = lab.etcd_endpoints();
    let result = havip_user::kernel::netns::in_netns(&lab.switch_ns().name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut client = Client::connect(&endpoints, None).await.expect("etcd");
            eprintln!("  writing {VIPS} ledger records and {NODES} node reports");
            let original = populate(&mut client, &prefix).await;
            // The managing node's guard: a key standing for its leader key.
            let guard_key = format!("{prefix}/bench-leader");
            client.put(guard_key.as_bytes(), "n1", None).await.unwrap();
            let guard = Compare::version(guard_key.as_bytes(), CompareOp::Greater, 0);
            let w = Settings::default();
            let (mut rounds, mut reads, mut plans, mut writes, mut rtts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut shape = (0, 0);
            for i in 0..trials {
                eprint!("\r  planning rounds: {}/{trials}   ", i + 1);
                let t = Instant::now();
                let r = manager::planning_round(&mut client, &c, &w, &guard).await.expect("planning round");
                rounds.push(t.elapsed().as_secs_f64() * 1e3);
                reads.push(r.read_ms);
                plans.push(r.plan_ms);
                writes.push(r.write_ms);
                // Path: the budget, all for load, to the new node, in one write...
                assert_eq!((r.moves.len(), r.writes), (BUDGET as usize, 1), "round {i}: {} moves in {} writes", r.moves.len(), r.writes);
                assert!(r.moves.iter().all(|m| m.to == node(NODES - 1) && m.reason.name() == "load"), "round {i}: {:?}", r.moves.first());
                shape = (r.moves.len(), r.writes);
                // ...and the ledger shows exactly those.
                let now = ledger_io::read_records(&mut client, &prefix).await.unwrap();
                let on_new = now.values().filter(|(rec, _)| rec.node == node(NODES - 1)).count();
                assert_eq!(on_new, BUDGET as usize, "round {i}: {on_new} VIPs on the new node");
                // Undo (untimed): every trial starts from the same ledger.
                let undo: Vec<TxnOp> = r
                    .moves
                    .iter()
                    .map(|m| {
                        let k = pools::alloc_key(&prefix, &m.key.0, m.key.1);
                        let v = original[&k].clone();
                        TxnOp::put(k, v, None)
                    })
                    .collect();
                client.txn(Txn::new().and_then(undo)).await.unwrap();
                // Baseline, interleaved: one etcd round trip.
                let t = Instant::now();
                let g = client.get(guard_key.as_bytes(), None).await.unwrap();
                assert_eq!(g.kvs().len(), 1);
                rtts.push(t.elapsed().as_secs_f64() * 1e3);
            }
            eprintln!();
            (rounds, reads, plans, writes, rtts, shape)
        })
    })
    .unwrap();
    let (rounds, reads, plans, writes, rtts, (moves_per_round, writes_per_round)) = result;
    let (round, baseline) = (GapStats::of(rounds), GapStats::of(rtts));
    let (p50_ratio, p99_ratio) = round.ratios_to(&baseline);
    Planning {
        vips: VIPS,
        nodes: NODES,
        move_budget: BUDGET,
        p50_ratio,
        p99_ratio,
        round,
        read: GapStats::of(reads),
        plan: GapStats::of(plans),
        write: GapStats::of(writes),
        moves_per_round,
        writes_per_round,
        etcd_round_trip_baseline: baseline,
    }
}
