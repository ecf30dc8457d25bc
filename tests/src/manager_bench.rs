//! The managing node's failover for `cargo xtask bench` (section `manager`): three havipd
//! nodes and one etcd member (the lab's: 500 ms election timeout, so a 1 s minimum lease)
//! in namespaces.
//!
//! - **Measured:** the manager's havipd is SIGKILLed at a random moment of its lease; the
//!   time until a surviving node reports another manager. Path check per trial: exactly
//!   one survivor won exactly one election, with a newer term.
//! - **Baseline:** the same lease mechanics without havip: an `etcdctl lease keep-alive`
//!   renewing a 1 s lease that holds a key, SIGKILLed at a random moment; the time until
//!   the key is gone. The ratio shows what the election adds on top of etcd's lease.

use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{cluster::ClusterLab, cluster_bench::GapStats};

#[derive(Debug, Serialize)]
pub struct ManagerFailover {
    pub failover: GapStats,
    /// From the SIGKILL until a request sent then through the managing node (a network
    /// without spares) is granted: requests served again.
    pub requests_served_again: GapStats,
    pub lease_expiry_baseline: GapStats,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub requests_p50_ratio: f64,
    pub requests_p99_ratio: f64,
}

/// A network without spare pools: requests for it go through the managing node.
const FORWARDED: &str = "\n[[cluster.network]]\nname = \"lab\"\nprefix = \"198.18.204.0/22\"\n\
                         [[cluster.network.range]]\nfirst = \"198.18.204.10\"\nlast = \"198.18.207.250\"\n";

fn start(lab: &mut ClusterLab, k: usize) {
    let cfg = lab.node_config(k, &[crate::cluster::CLUSTER_VIP], FORWARDED);
    lab.start_node_with(k, &cfg);
}

/// (manager, term, elections won here) as node `k` reports it.
fn seen(lab: &ClusterLab, k: usize) -> Option<(String, u64, u64)> {
    let out = lab.havip(k, &["cluster", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let m = &v["manager"];
    Some((m["manager"].as_str()?.to_string(), m["term"].as_u64()?, m["elections_won"].as_u64()?))
}

/// A pseudo-random delay of 300-700 ms (a random point of a 1 s lease's renewal cycle).
fn random_delay(i: usize) -> Duration {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    Duration::from_millis(300 + x % 400)
}

/// Waits until nodes `ks` agree on a manager other than `not`.
fn wait_agreed(lab: &ClusterLab, ks: &[usize], not: Option<&str>, within: Duration) -> (String, u64) {
    let t = Instant::now();
    loop {
        let s: Vec<_> = ks.iter().map(|&k| seen(lab, k)).collect();
        if let Some(Some((m, term, _))) = s.first() {
            if s.iter().all(|x| x.as_ref().is_some_and(|x| &x.0 == m && x.1 == *term)) && Some(m.as_str()) != not {
                return (m.clone(), *term);
            }
        }
        assert!(t.elapsed() < within, "no agreed manager within {within:?}: {s:?}");
        sleep(Duration::from_millis(10));
    }
}

/// (time until a survivor reports a new manager, time until a request through the
/// manager sent at the kill is granted), ms.
fn havip_trial(lab: &mut ClusterLab, i: usize) -> (f64, f64) {
    let all = [1usize, 2, 3];
    let (m, term) = wait_agreed(lab, &all, None, Duration::from_secs(10));
    let k = all.into_iter().find(|&k| lab.node_name(k) == m).unwrap();
    let survivors: Vec<usize> = all.into_iter().filter(|&x| x != k).collect();
    let won_before: Vec<u64> = survivors.iter().map(|&s| seen(lab, s).map_or(0, |x| x.2)).collect();
    sleep(random_delay(i));
    lab.kill_node(k);
    let t0 = Instant::now();
    // A request through the manager, sent now from the other survivor (asked again if
    // refused): when it is granted, requests are served again.
    let dir = lab.node_run_dir(survivors[1]).to_path_buf();
    let request = std::thread::spawn(move || {
        for n in 0.. {
            let body = serde_json::json!({ "app": format!("mf{i}-{n}"), "protocol": "udp", "service_port": 7100, "instance_port": 7000, "network": "lab" });
            let (status, v) = havip_user::api::client::call(&dir, "POST", "/v1/vips", Some(body)).expect("calling a survivor's API");
            if status == 201 {
                // Path: granted by the (new) managing node.
                assert_eq!(v["how"], "manager", "trial {i}: {v}");
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "trial {i}: no request granted 10 s after the kill: {v}");
        }
        unreachable!()
    });
    let dt = loop {
        if let Some((now, t, _)) = seen(lab, survivors[0]) {
            if now != m {
                assert!(t > term, "trial {i}: the new manager {now} has term {t}, not newer than {term}");
                break t0.elapsed();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "trial {i}: no new manager 10 s after {m} was killed");
        sleep(Duration::from_millis(5));
    };
    // Path: exactly one survivor won exactly one election.
    let (new, _) = wait_agreed(lab, &survivors, Some(&m), Duration::from_secs(5));
    let won_after: Vec<u64> = survivors.iter().map(|&s| seen(lab, s).map_or(0, |x| x.2)).collect();
    let grew: u64 = won_after.iter().zip(&won_before).map(|(a, b)| a - b).sum();
    assert_eq!(grew, 1, "trial {i}: elections won by the survivors grew by {grew} (new manager {new})");
    let served = request.join().expect("request thread");
    start(lab, k);
    (dt.as_secs_f64() * 1e3, served.as_secs_f64() * 1e3)
}

fn etcdctl_ok(lab: &ClusterLab, args: &[&str]) -> String {
    let out = lab.etcdctl(args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn baseline_trial(lab: &ClusterLab, i: usize) -> f64 {
    // "lease 694d9b8b1f4b2a0c granted with TTL(1s)"
    let granted = etcdctl_ok(lab, &["lease", "grant", "1"]);
    let id = granted.split_whitespace().nth(1).expect("lease id").to_string();
    let key = format!("{}-bench/lease-{i}", lab.key_prefix());
    etcdctl_ok(lab, &["put", "--lease", &id, &key, "x"]);
    let mut keeper = Command::new("ip")
        .args(["netns", "exec", &lab.switch_ns().name, "etcdctl", "--endpoints", &lab.etcd_endpoints().join(","), "lease", "keep-alive", &id])
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl lease keep-alive");
    sleep(random_delay(i));
    assert!(!etcdctl_ok(lab, &["get", &key]).trim().is_empty(), "trial {i}: the key expired while kept alive");
    let _ = keeper.kill();
    let _ = keeper.wait();
    let t0 = Instant::now();
    loop {
        if etcdctl_ok(lab, &["get", &key]).trim().is_empty() {
            return t0.elapsed().as_secs_f64() * 1e3;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "trial {i}: the lease never expired");
        sleep(Duration::from_millis(5));
    }
}

/// `trials` of each, interleaved.
pub fn run(trials: usize) -> ManagerFailover {
    let mut lab = ClusterLab::new(3, 1);
    for k in 1..=3 {
        start(&mut lab, k);
    }
    let (mut fail, mut served, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..trials {
        eprint!("\r  manager failover: trial {}/{trials}   ", i + 1);
        let (f, s) = havip_trial(&mut lab, i);
        fail.push(f);
        served.push(s);
        base.push(baseline_trial(&lab, i));
    }
    eprintln!();
    let (failover, requests_served_again, lease_expiry_baseline) = (GapStats::of(fail), GapStats::of(served), GapStats::of(base));
    let (p50_ratio, p99_ratio) = failover.ratios_to(&lease_expiry_baseline);
    let (requests_p50_ratio, requests_p99_ratio) = requests_served_again.ratios_to(&lease_expiry_baseline);
    ManagerFailover { p50_ratio, p99_ratio, requests_p50_ratio, requests_p99_ratio, failover, requests_served_again, lease_expiry_baseline }
}

/// VIP requests answered from the asked node's spares, and through the managing node
/// (a network without spares), against a bare etcd round trip.
#[derive(Debug, Serialize)]
pub struct SpareRequests {
    pub request: GapStats,
    /// Of each request, havipd's own split: the ledger (etcd) and the local apply.
    pub ledger_part: GapStats,
    pub apply_part: GapStats,
    /// Requests for the network without spares: forwarded to the managing node.
    pub through_manager: GapStats,
    pub etcd_round_trip_baseline: GapStats,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub manager_p50_ratio: f64,
    pub manager_p99_ratio: f64,
}

const BENCH_SPARES: &str = "\n[[cluster.network]]\nname = \"prod\"\nprefix = \"198.18.200.0/22\"\n\
                            [[cluster.network.range]]\nfirst = \"198.18.200.10\"\nlast = \"198.18.203.250\"\n\
                            [[cluster.network]]\nname = \"lab\"\nprefix = \"198.18.204.0/22\"\n\
                            [[cluster.network.range]]\nfirst = \"198.18.204.10\"\nlast = \"198.18.207.250\"\n\
                            [cluster.spares]\nnetwork = \"prod\"\nlow = 100\nhigh = 130\n\
                            [cluster.placement]\nload_slack = 10000\n";

/// Checked spares of `node` and its granted count, from the ledger.
fn pool_of(lab: &ClusterLab, node: &str) -> (usize, usize) {
    let prefix = format!("{}-manager/alloc/prod/", lab.key_prefix());
    let text = String::from_utf8_lossy(&lab.etcdctl(&["get", "--prefix", "--print-value-only", &prefix]).stdout).to_string();
    let recs: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mine = recs.iter().filter(|r| r["node"] == node);
    let checked = mine.clone().filter(|r| r["state"] == "spare" && r["checked"] == true).count();
    (checked, mine.filter(|r| r["state"] == "granted").count())
}

/// `n` requests on n1's API (10 ms apart), each timed from the call to havipd's reply
/// (granted and served: the reply comes after the local apply); `n` more for the network
/// without spares on a node that is not the manager (forwarded through etcd to the
/// managing node and back); and `n` linearizable reads of one key from etcd, from the
/// switch, with a kept connection.
pub fn run_requests(n: usize) -> SpareRequests {
    let mut lab = ClusterLab::new(3, 1);
    for k in 1..=3 {
        let cfg = lab.node_config(k, &[crate::cluster::CLUSTER_VIP], "") + BENCH_SPARES;
        lab.start_node_with(k, &cfg);
    }
    let t = Instant::now();
    while pool_of(&lab, "n1").0 < 110 {
        assert!(t.elapsed() < Duration::from_secs(30), "n1's pool never filled: {:?}", pool_of(&lab, "n1"));
        sleep(Duration::from_millis(200));
    }
    // Baseline: the etcd round trip any ledger operation pays at least once.
    let endpoints = lab.etcd_endpoints();
    let key = format!("{}-bench/rtt", lab.key_prefix());
    let rtts: Vec<f64> = havip_user::kernel::netns::in_netns(&lab.switch_ns().name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(&endpoints, None).await.expect("etcd");
            c.put(key.as_bytes(), "x", None).await.expect("put");
            let mut out = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let r = c.get(key.as_bytes(), None).await.expect("get");
                assert_eq!(r.kvs().len(), 1);
                out.push(t.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        })
    })
    .unwrap();
    let (_, granted_before) = pool_of(&lab, "n1");
    let run_dir = lab.node_run_dir(1).to_path_buf();
    let mut times = Vec::new();
    let (mut ledger_ms, mut apply_ms) = (Vec::new(), Vec::new());
    for i in 0..n {
        eprint!("\r  requests from spares: {}/{n}   ", i + 1);
        let body = serde_json::json!({ "app": format!("bench{i}"), "protocol": "udp", "service_port": 7100, "instance_port": 7000 });
        let t = Instant::now();
        let (status, v) = havip_user::api::client::call(&run_dir, "POST", "/v1/vips", Some(body)).expect("calling n1's API");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 201, "request {i}: {v}");
        // Path: granted from the asked node's own spares (the load slack keeps placement there).
        assert!(v["vip"].is_string() && v["node"] == "n1" && v["how"] == "spare", "request {i}: {v}");
        ledger_ms.push(v["took_ms"]["ledger"].as_f64().unwrap_or(f64::NAN));
        apply_ms.push(v["took_ms"]["apply"].as_f64().unwrap_or(f64::NAN));
        sleep(Duration::from_millis(10));
    }
    eprintln!();
    // Path: each request took one of n1's spares.
    let (_, granted_after) = pool_of(&lab, "n1");
    assert_eq!(granted_after - granted_before, n, "{n} requests, but n1's granted VIPs grew by {}", granted_after - granted_before);

    // Through the managing node: asked on a node that is not it.
    let (manager, _) = lab.wait_manager(&[1, 2, 3], None, Duration::from_secs(10));
    let km = (1..=3).find(|&k| lab.node_name(k) == manager).unwrap();
    let asked = if km == 1 { 2 } else { 1 };
    let answered = |lab: &ClusterLab| lab.metric(km, "havip_cluster_forwarded_answered_total").unwrap_or(0.0) as usize;
    let answered_before = answered(&lab);
    let mut forwarded = Vec::new();
    for i in 0..n {
        eprint!("\r  requests through the manager: {}/{n}   ", i + 1);
        let body = serde_json::json!({ "app": format!("fwd{i}"), "protocol": "udp", "service_port": 7100, "instance_port": 7000, "network": "lab" });
        let t = Instant::now();
        let (status, v) = lab.api(asked, "POST", "/v1/vips", Some(body));
        forwarded.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((status, v["how"].as_str()), (201, Some("manager")), "request {i}: {v}");
        sleep(Duration::from_millis(10));
    }
    eprintln!();
    // Path: the manager answered exactly these (its count is published every 100 ms).
    let t = Instant::now();
    while answered(&lab) - answered_before < n && t.elapsed() < Duration::from_secs(2) {
        sleep(Duration::from_millis(50));
    }
    assert_eq!(answered(&lab) - answered_before, n, "the manager's count of answered requests");
    let (request, etcd_round_trip_baseline, through_manager) = (GapStats::of(times), GapStats::of(rtts), GapStats::of(forwarded));
    let (p50_ratio, p99_ratio) = request.ratios_to(&etcd_round_trip_baseline);
    let (manager_p50_ratio, manager_p99_ratio) = through_manager.ratios_to(&etcd_round_trip_baseline);
    SpareRequests {
        ledger_part: GapStats::of(ledger_ms),
        apply_part: GapStats::of(apply_ms),
        p50_ratio,
        p99_ratio,
        manager_p50_ratio,
        manager_p99_ratio,
        request,
        through_manager,
        etcd_round_trip_baseline,
    }
}
