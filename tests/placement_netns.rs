//! Cluster mode's managing node at work, against real etcd and real havipd processes in
//! namespaces: requests placed by kernel-measured path quality (delay injected with netem),
//! requests forwarded to the managing node (killed in the middle of a burst), rebalancing
//! when a node joins (within the move budget, pinned VIPs staying), and the ledger
//! following a node that leaves.

use std::{
    collections::{BTreeMap, BTreeSet},
    thread::sleep,
    time::{Duration, Instant},
};

use havip_tests::cluster::{ClusterLab, ProbeStream, CLIENT_V4, CLUSTER_VIP};
use serde_json::{json, Value};

const PORT: u16 = 7000;

/// A network with spare pools on every node (`prod`) and one without (`lab`): a request
/// for `lab` always goes through the managing node.
const NETWORKS: &str = "\n[[cluster.network]]\nname = \"prod\"\nprefix = \"198.18.200.0/24\"\n\
                        [[cluster.network.range]]\nfirst = \"198.18.200.10\"\nlast = \"198.18.200.99\"\n\
                        [[cluster.network]]\nname = \"lab\"\nprefix = \"198.18.201.0/24\"\n\
                        [[cluster.network.range]]\nfirst = \"198.18.201.10\"\nlast = \"198.18.201.250\"\n\
                        [cluster.spares]\nnetwork = \"prod\"\nlow = 4\nhigh = 6\n";

fn request(app: &str, port: u16, network: Option<&str>) -> Value {
    json!({ "app": app, "protocol": "udp", "service_port": port, "instance_port": PORT, "network": network })
}

/// Waits until every node has `n` checked spares in `prod`.
fn wait_checked_spares(lab: &ClusterLab, nodes: &[&str], n: usize, within: Duration) {
    let t = Instant::now();
    loop {
        let l = lab.ledger("prod");
        if nodes.iter().all(|node| l.values().filter(|r| r["node"] == *node && r["state"] == "spare" && r["checked"] == true).count() >= n) {
            return;
        }
        assert!(t.elapsed() < within, "spares not checked within {within:?}: {l:#?}");
        sleep(Duration::from_millis(100));
    }
}

/// Granted records of `network`: address -> (node, apps).
fn granted(lab: &ClusterLab, network: &str) -> BTreeMap<String, (String, Vec<String>)> {
    lab.ledger(network)
        .into_iter()
        .filter(|(_, r)| r["state"] == "granted")
        .map(|(a, r)| {
            let apps = r["uses"].as_array().into_iter().flatten().filter_map(|u| u["app"].as_str().map(String::from)).collect();
            (a, (r["node"].as_str().unwrap_or("?").to_string(), apps))
        })
        .collect()
}

/// The client reaches `vip:port`: some probes over `for_` are answered; by whom.
fn answered_by(lab: &ClusterLab, vip: &str, port: u16, for_: Duration) -> BTreeMap<String, u64> {
    let probes = ProbeStream::start(lab.client_ns(), vip, port, Duration::from_millis(5));
    sleep(for_);
    probes.stop().answered_by
}

fn k_of(lab: &ClusterLab, name: &str) -> usize {
    (1..=lab.node_count()).find(|&k| lab.node_name(k) == name).expect("a node of the lab")
}

/// Every node's placement report in etcd: node -> report.
fn reports(lab: &ClusterLab) -> BTreeMap<String, Value> {
    let prefix = format!("{}-manager/nodes/", lab.key_prefix());
    let text = String::from_utf8_lossy(&lab.etcdctl(&["get", "--prefix", "--print-value-only", &prefix]).stdout).to_string();
    text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| Some((v["node"].as_str()?.to_string(), v))).collect()
}

/// The client drops 30% of its ICMP echo replies to nodes `ks` (both NICs), and none to
/// the others: their measured paths to it are lossy. Replaces an earlier choice.
fn lossy_to(lab: &ClusterLab, ks: &[usize]) {
    let c = lab.client_ns();
    let _ = c.exec(&["nft", "delete", "table", "ip", "havip_lossy"]);
    c.exec(&["nft", "add", "table", "ip", "havip_lossy"]).unwrap();
    c.exec(&["nft", "add", "chain", "ip", "havip_lossy", "out", "{ type filter hook output priority 0; }"]).unwrap();
    let addrs: Vec<String> = ks.iter().flat_map(|k| [format!("198.18.30.{}", 10 * k + 1), format!("198.18.30.{}", 10 * k + 2)]).collect();
    let set = format!("{{ {} }}", addrs.join(", "));
    c.exec(&[
        "nft",
        "add",
        "rule",
        "ip",
        "havip_lossy",
        "out",
        "ip",
        "daddr",
        &set,
        "icmp",
        "type",
        "echo-reply",
        "numgen",
        "random",
        "mod",
        "100",
        "<",
        "30",
        "drop",
    ])
    .unwrap();
}

/// Waits until the nodes' reports show the `lossy` nodes' paths to the client lossy and
/// `clean`'s clean.
fn wait_measured(lab: &ClusterLab, lossy: &[&str], clean: &str) {
    let t = Instant::now();
    let loss = |r: &BTreeMap<String, Value>, n: &str| r.get(n).and_then(|v| v["paths"][CLIENT_V4]["loss_pct"].as_f64());
    loop {
        let r = reports(lab);
        if lossy.iter().all(|n| loss(&r, n).is_some_and(|l| l > 10.0)) && loss(&r, clean).is_some_and(|l| l < 5.0) {
            eprintln!("measured loss to the client: {:?}", ["n1", "n2", "n3"].map(|n| (n, loss(&r, n))));
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "reports never showed {lossy:?} lossy and {clean} clean: {r:#?}");
        sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_request_is_placed_on_the_node_with_the_best_measured_path_and_explain_says_why() {
    let mut lab = ClusterLab::new(3, 1);
    lab.client_ns().ip(&["route", "add", "198.18.200.0/24", "dev", "eth0"]).unwrap();
    // The client drops 30% of its echo replies to n1 and n3 (there is no netem here):
    // their paths to it are lossy, n2's is clean. Heartbeats between nodes never pass it.
    lossy_to(&lab, &[1, 3]);
    // A configured VIP with the client as target: every node probes it (and publishes
    // what it measures for placement).
    let probed = format!("[[vip]]\naddress = \"198.18.130.2\"\ntargets = [\"{CLIENT_V4}\"]\n");
    for k in 1..=3 {
        let cfg = lab.node_config(k, &[CLUSTER_VIP], &probed) + NETWORKS;
        lab.start_node_with(k, &cfg);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    wait_checked_spares(&lab, &["n1", "n2", "n3"], 4, Duration::from_secs(15));
    // Each node's report carries its measured path to the client.
    wait_measured(&lab, &["n1", "n3"], "n2");
    // Asked on n1 (which would win a tie): placed on n2, from n2's spares.
    let (status, v) =
        lab.api(1, "POST", "/v1/vips", Some(json!({ "app": "near", "protocol": "udp", "service_port": 7100, "instance_port": PORT, "targets": [CLIENT_V4] })));
    assert_eq!(status, 201, "{v}");
    assert_eq!((v["node"].as_str(), v["how"].as_str()), (Some("n2"), Some("spare")), "{v}\nreports: {:#?}", reports(&lab));
    assert!(v["why"].as_str().unwrap_or("").contains("lowest path cost"), "{v}");
    let vip = v["vip"].as_str().unwrap().to_string();
    assert_eq!(granted(&lab, "prod")[&vip].0, "n2");
    // n2 serves it.
    let t = Instant::now();
    loop {
        let by = answered_by(&lab, &vip, 7100, Duration::from_millis(300));
        if by.get("n2").copied().unwrap_or(0) > 10 {
            assert_eq!(by.len(), 1, "answered by more than n2: {by:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "n2 does not serve {vip}: {by:?}");
    }
    // `havip vip list` on any node lists it, with where it is served.
    for (k, here) in [(1, false), (2, true)] {
        let (status, list) = lab.api(k, "GET", "/v1/vips", None);
        let g = list["granted"].as_array().and_then(|a| a.iter().find(|g| g["vip"] == vip.as_str()).cloned()).unwrap_or_default();
        assert_eq!((status, g["node"].as_str(), g["served_here"].as_bool()), (200, Some("n2"), Some(here)), "n{k}: {list}");
        assert_eq!(g["uses"][0]["app"], "near");
    }
    let out = lab.havip(1, &["vip", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&vip), "{}", String::from_utf8_lossy(&out.stdout));
    // `havip explain` on any node shows the placement and why.
    let out = lab.havip(3, &["explain", &vip]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("cluster placement: granted in network prod on node n2"), "{text}");
    assert!(text.contains("chosen: n2 (lowest path cost"), "{text}");
    // The grant is counted by how on the node asked.
    assert_eq!(lab.metric(1, "havip_cluster_grants_total{how=\"spare\"}"), Some(1.0), "{}", lab.metrics(1));
}

#[test]
fn requests_through_the_managing_node_each_succeed_once_or_fail_clearly_when_it_is_killed_mid_burst() {
    let mut lab = ClusterLab::new(3, 1);
    lab.client_ns().ip(&["route", "add", "198.18.201.0/24", "dev", "eth0"]).unwrap();
    for k in 1..=3 {
        let cfg = lab.node_config(k, &[CLUSTER_VIP], "") + NETWORKS;
        lab.start_node_with(k, &cfg);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    let (manager, _) = lab.wait_manager(&[1, 2, 3], None, Duration::from_secs(10));
    let km = k_of(&lab, &manager);
    let askers: Vec<usize> = (1..=3).filter(|&k| k != km).collect();
    // A forwarded request alone: the manager answers at once.
    let (status, v) = lab.api(askers[0], "POST", "/v1/vips", Some(request("solo", 7100, Some("lab"))));
    assert_eq!((status, v["how"].as_str()), (201, Some("manager")), "{v}");
    // 40 requests from the two other nodes' APIs; the manager is SIGKILLed after the first 20.
    let dirs: Vec<std::path::PathBuf> = askers.iter().map(|&k| lab.node_run_dir(k).to_path_buf()).collect();
    let spawn = |i: usize| {
        let dir = dirs[i % 2].clone();
        std::thread::spawn(move || {
            let body = request(&format!("burst{i}"), 7100, Some("lab"));
            let started = Instant::now();
            let r = havip_user::api::client::call(&dir, "POST", "/v1/vips", Some(body)).expect("calling the API");
            (i, r.0, r.1, started.elapsed())
        })
    };
    let mut threads: Vec<_> = (0..20).map(spawn).collect();
    sleep(Duration::from_millis(30));
    lab.kill_node(km);
    threads.extend((20..40).map(spawn));
    let mut ok = BTreeMap::new();
    let mut refused = Vec::new();
    let mut slow = Vec::new();
    for t in threads {
        let (i, status, v, took) = t.join().expect("request thread");
        if took > Duration::from_millis(300) {
            slow.push((i, took));
        }
        match status {
            201 => {
                assert!(ok.insert(v["vip"].as_str().unwrap().to_string(), format!("burst{i}")).is_none(), "{} granted twice", v["vip"]);
            }
            503 => {
                let e = v["error"].as_str().unwrap_or("");
                assert!(e.contains("ask again"), "a refusal that does not say what to do: {v}");
                refused.push((i, took));
            }
            _ => panic!("request {i}: unexpected answer {status} {v}"),
        }
    }
    let waited = slow.len();
    eprintln!("{} granted, {} refused ({refused:?}); {waited} waited over 300 ms for a manager", ok.len(), refused.len());
    assert!(waited >= 20, "the requests sent after the kill did not wait for a new manager: {slow:?}");
    assert!(ok.len() >= 20, "most requests should be answered by the new manager: {} of 40", ok.len());
    // A new manager was elected and the ledger holds exactly the answered grants: nothing
    // twice, nothing granted to a request that was refused.
    let (second, _) = lab.wait_manager(&askers, Some(&manager), Duration::from_secs(10));
    let l = granted(&lab, "lab");
    let in_ledger: BTreeMap<String, String> =
        l.iter().filter(|(_, (_, apps))| apps.iter().any(|a| a.starts_with("burst"))).map(|(a, (_, apps))| (a.clone(), apps[0].clone())).collect();
    assert_eq!(in_ledger, ok, "the ledger and the answers differ");
    // Requests keep being answered through the new manager.
    let (status, v) = lab.api(askers[1], "POST", "/v1/vips", Some(request("after", 7100, Some("lab"))));
    assert_eq!((status, v["how"].as_str()), (201, Some("manager")), "{v}");
    // Granted VIPs serve traffic (a sample: the first three).
    for vip in ok.keys().take(3) {
        let t = Instant::now();
        loop {
            let by = answered_by(&lab, vip, 7100, Duration::from_millis(300));
            if by.values().sum::<u64>() > 10 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{vip} is not served: {by:?}");
        }
    }
    let k2 = k_of(&lab, &second);
    assert!(lab.node_log(k2).contains("managing node: forwarded request granted"), "the new manager {second} answered nothing");
}

fn rebalancing(cfg: String) -> String {
    let out = cfg.replace("giveback_hold_down_ms = 30000", "giveback_hold_down_ms = 500");
    assert_ne!(out, cfg, "the harness's config no longer sets the hold-down");
    out + NETWORKS + "[cluster.placement]\nmove_budget = 1\nload_slack = 1\nrebalance_every_ms = 1000\nmove_hold_down_ms = 0\n"
}

#[test]
fn a_joining_node_gets_vips_within_the_move_budget_and_pinned_ones_stay() {
    let mut lab = ClusterLab::new(3, 1);
    lab.client_ns().ip(&["route", "add", "198.18.200.0/24", "dev", "eth0"]).unwrap();
    for k in 1..=2 {
        let cfg = rebalancing(lab.node_config(k, &[CLUSTER_VIP], ""));
        lab.start_node_with(k, &cfg);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    wait_checked_spares(&lab, &["n1", "n2"], 4, Duration::from_secs(15));
    // Eight VIPs over n1 and n2; the first two of each node pinned.
    let mut pinned = BTreeSet::new();
    for i in 0..8 {
        let k = 1 + i % 2;
        let mut body = request(&format!("app{i}"), 7100, None);
        body["pinned"] = json!(i < 4);
        let (status, v) = lab.api(k, "POST", "/v1/vips", Some(body));
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["node"], format!("n{k}"), "{v}");
        if i < 4 {
            pinned.insert(v["vip"].as_str().unwrap().to_string());
        }
    }
    let before = granted(&lab, "prod");
    assert_eq!(before.len(), 8);
    // n3 joins. 4, 4, 0 with slack 1: two moves (to 3, 3, 2), one per round at most.
    let cfg = rebalancing(lab.node_config(3, &[CLUSTER_VIP], ""));
    lab.start_node_with(3, &cfg);
    let t = Instant::now();
    let mut last = before.clone();
    let mut moved = BTreeSet::new();
    loop {
        sleep(Duration::from_millis(100));
        let now = granted(&lab, "prod");
        // Between two reads 100 ms apart (rounds are 1 s apart): at most the budget.
        let changed: Vec<&String> = now.keys().filter(|a| last.get(*a).map(|x| &x.0) != Some(&now[*a].0)).collect();
        assert!(changed.len() <= 1, "{} VIPs moved at once (budget 1): {changed:?}", changed.len());
        for a in changed {
            assert!(!pinned.contains(a), "pinned {a} moved");
            assert_eq!(now[a].0, "n3", "{a} moved elsewhere than to the new node");
            moved.insert(a.clone());
        }
        last = now;
        if moved.len() >= 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "only {moved:?} moved to n3 within 15 s: {last:?}");
    }
    // No further moves: the gap is within the slack.
    sleep(Duration::from_millis(2500));
    let after = granted(&lab, "prod");
    let per_node = |n: &str| after.values().filter(|x| x.0 == n).count();
    assert_eq!((per_node("n1"), per_node("n2"), per_node("n3")), (3, 3, 2), "{after:?}");
    // The moved VIPs are handed over to n3 and served there.
    for vip in &moved {
        let t = Instant::now();
        loop {
            let by = answered_by(&lab, vip, 7100, Duration::from_millis(300));
            if by.get("n3").copied().unwrap_or(0) > 10 && by.len() == 1 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{vip} is not served by n3: {by:?}");
        }
    }
    let manager = lab.wait_manager(&[1, 2, 3], None, Duration::from_secs(5)).0;
    let k = k_of(&lab, &manager);
    assert_eq!(lab.metric(k, "havip_cluster_moves_total{reason=\"load\"}"), Some(2.0), "{}", lab.metrics(k));
    assert!(lab.node_log(k).contains("managing node: VIP moved"));
}

#[test]
fn a_leaving_nodes_vips_move_to_their_successors_and_the_ledger_follows() {
    let mut lab = ClusterLab::new(3, 1);
    lab.client_ns().ip(&["route", "add", "198.18.200.0/24", "dev", "eth0"]).unwrap();
    for k in 1..=3 {
        let cfg = lab.node_config(k, &[CLUSTER_VIP], "") + NETWORKS + "[cluster.placement]\nrebalance_every_ms = 500\nload_slack = 10\n";
        lab.start_node_with(k, &cfg);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    wait_checked_spares(&lab, &["n1", "n2", "n3"], 4, Duration::from_secs(15));
    let mut vips = Vec::new();
    for i in 0..3 {
        let (status, v) = lab.api(2, "POST", "/v1/vips", Some(request(&format!("app{i}"), 7100, None)));
        assert_eq!((status, v["node"].as_str()), (201, Some("n2")), "{v}");
        vips.push(v["vip"].as_str().unwrap().to_string());
    }
    let probes = ProbeStream::start(lab.client_ns(), &vips[0], 7100, Duration::from_millis(2));
    sleep(Duration::from_millis(800));
    // n2 leaves: killed, its links down.
    lab.kill_node(2);
    lab.node_links(2, false);
    // Within a few seconds (its report's lease, then a planning round), the ledger names
    // the node that serves each VIP now.
    let t = Instant::now();
    loop {
        let l = granted(&lab, "prod");
        if vips.iter().all(|v| l[v].0 != "n2") {
            eprintln!("ledger after n2 left: {:?}", vips.iter().map(|v| (v, &l[v].0)).collect::<Vec<_>>());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the ledger still names n2: {l:?}");
        sleep(Duration::from_millis(100));
    }
    let report = probes.stop();
    eprintln!("{}: answered by {:?}, longest gap {:?}", vips[0], report.answered_by, report.longest_gap);
    assert!(report.answered_by.get("n2").copied().unwrap_or(0) > 50, "n2 never served {}: {:?}", vips[0], report.answered_by);
    assert!(report.tail_gap() < Duration::from_millis(100), "{} not served after n2 left", vips[0]);
    // Each VIP's ledger node is its owner now (no move back when n2 returns).
    let l = granted(&lab, "prod");
    let status: Value = serde_json::from_slice(&lab.havip(1, &["cluster", "vips", "--json"]).stdout).unwrap_or_default();
    for v in &vips {
        let owner = status.as_array().and_then(|a| a.iter().find(|x| x["vip"] == v.as_str())).and_then(|x| x["owner"].as_str()).unwrap_or("?").to_string();
        assert_eq!(l[v].0, owner, "{v}: ledger {} but owner {owner}", l[v].0);
    }
    let (manager, _) = lab.wait_manager(&[1, 3], None, Duration::from_secs(5));
    let k = k_of(&lab, &manager);
    assert_eq!(lab.metric(k, "havip_cluster_moves_total{reason=\"node-gone\"}"), Some(3.0), "{}", lab.metrics(k));
    // The pools of the nodes left stay topped up.
    let spares = |n: &str| lab.ledger("prod").values().filter(|r| r["node"] == n && r["state"] == "spare").count();
    assert!(spares("n1") >= 4 && spares("n3") >= 4, "pools: n1 {} n3 {}", spares("n1"), spares("n3"));
}

#[test]
fn a_vip_whose_path_turns_lossy_moves_to_the_node_with_the_better_path() {
    let mut lab = ClusterLab::new(3, 1);
    lab.client_ns().ip(&["route", "add", "198.18.200.0/24", "dev", "eth0"]).unwrap();
    lossy_to(&lab, &[1, 3]);
    let probed = format!("[[vip]]\naddress = \"198.18.130.2\"\ntargets = [\"{CLIENT_V4}\"]\n");
    for k in 1..=3 {
        let cfg = lab.node_config(k, &[CLUSTER_VIP], &probed).replace("giveback_hold_down_ms = 30000", "giveback_hold_down_ms = 500")
            + NETWORKS
            + "[cluster.placement]\nrebalance_every_ms = 500\nmove_hold_down_ms = 0\n";
        lab.start_node_with(k, &cfg);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    wait_checked_spares(&lab, &["n1", "n2", "n3"], 4, Duration::from_secs(15));
    wait_measured(&lab, &["n1", "n3"], "n2");
    let (status, v) =
        lab.api(3, "POST", "/v1/vips", Some(json!({ "app": "far", "protocol": "udp", "service_port": 7100, "instance_port": PORT, "targets": [CLIENT_V4] })));
    assert_eq!((status, v["node"].as_str()), (201, Some("n2")), "{v}");
    let vip = v["vip"].as_str().unwrap().to_string();
    // Now n2's path turns lossy and n1's clean: the managing node moves the VIP to n1 (the
    // better path beyond the margin), and n1 serves it.
    lossy_to(&lab, &[2, 3]);
    let t = Instant::now();
    loop {
        if granted(&lab, "prod")[&vip].0 == "n1" {
            eprintln!("moved to n1 {:?} after n2's path turned lossy", t.elapsed());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{vip} still on {} 20 s after its path turned lossy: {:#?}",
            granted(&lab, "prod")[&vip].0,
            reports(&lab)
        );
        sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    loop {
        let by = answered_by(&lab, &vip, 7100, Duration::from_millis(300));
        if by.get("n1").copied().unwrap_or(0) > 10 && by.len() == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{vip} is not served by n1: {by:?}");
    }
    let manager = lab.wait_manager(&[1, 2, 3], None, Duration::from_secs(5)).0;
    let k = k_of(&lab, &manager);
    assert_eq!(lab.metric(k, "havip_cluster_moves_total{reason=\"quality\"}"), Some(1.0), "{}", lab.metrics(k));
    assert!(lab.node_log(k).contains("reason=\"quality\""), "the move's log line");
}
