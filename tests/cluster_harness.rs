//! The cluster test harness itself (`tests/src/cluster.rs`), without havipd's cluster
//! mode: real etcd in namespaces and the faults on it, heartbeat-port faults, the probe
//! stream and the two-owner checker against addresses moved by hand, and that a lab
//! leaves nothing behind, also when a test panics.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use havip_tests::cluster::{announce, two_owner_moments, ArpAsker, ClusterLab, NeighCapture, NeighKind, ProbeStream, ViolationKind, CLUSTER_VIP};
use havip_user::kernel::netns::{in_netns, Netns};

/// Asserts that nothing of lab `id` is left: namespaces, etcd processes, pins, run dirs.
fn assert_gone(id: &str) {
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(id), "namespaces of lab {id} left:\n{netns}");
    let token = format!("havip-test-{id}");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&token), "process of lab {id} left: {} {cmdline}", p.file_name().to_string_lossy());
    }
    for d in std::fs::read_dir("/sys/fs/bpf").unwrap().flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(&format!("havip-test{id}-")), "pins of lab {id} left: {name}");
    }
    assert!(!std::path::Path::new(&format!("/run/havip-test/{id}")).exists(), "run dir of lab {id} left");
    assert!(!std::path::Path::new(&format!("/dev/shm/havip-test-{id}")).exists(), "etcd data of lab {id} left");
}

fn ok(out: &std::process::Output) -> bool {
    out.status.success()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn etcd_answers_nodes_and_cut_etcd_isolates_one() {
    let lab = ClusterLab::new(3, 1);
    let id = lab.id.clone();
    assert_eq!(lab.etcd_endpoints(), vec!["http://198.18.30.200:2379".to_string()]);
    assert_eq!(lab.etcd_leader(), 0);
    let key = format!("{}/probe", lab.key_prefix());
    let put = lab.etcdctl_in(lab.node_ns(1), &["put", &key, "from-n1"]);
    assert!(ok(&put), "put from n1: {}", text(&put));
    let get = lab.etcdctl_in(lab.node_ns(2), &["get", &key, "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "from-n1", "get from n2: {}", text(&get));

    lab.cut_etcd(1, true);
    let t = Instant::now();
    let put = lab.etcdctl_in(lab.node_ns(1), &["put", &key, "cut"]);
    assert!(!ok(&put), "n1 still reaches etcd with etcd cut: {}", text(&put));
    eprintln!("n1's put failed after {:?}: {}", t.elapsed(), text(&put).trim());
    let put = lab.etcdctl_in(lab.node_ns(2), &["put", &key, "from-n2"]);
    assert!(ok(&put), "n2 lost etcd when only n1 was cut: {}", text(&put));
    // Cutting twice, or lifting what is not there, is harmless.
    lab.cut_etcd(1, true);
    lab.cut_etcd(2, false);

    lab.cut_etcd(1, false);
    let get = lab.etcdctl_in(lab.node_ns(1), &["get", &key, "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "from-n2", "n1 after the cut is lifted: {}", text(&get));
    drop(lab);
    assert_gone(&id);
}

#[test]
fn etcd_cluster_faults() {
    let mut lab = ClusterLab::new(2, 3);
    let id = lab.id.clone();
    let put = |lab: &ClusterLab, v: &str| lab.etcdctl(&["put", "/havip-harness/k", v]);
    assert!(ok(&put(&lab, "1")));

    // The leader dies: the other two elect a new one and keep serving.
    let old = lab.etcd_leader();
    lab.kill_etcd_member(old);
    let t = Instant::now();
    let new = loop {
        if let Ok(l) = lab.try_etcd_leader() {
            if l != old {
                break l;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no new etcd leader 5s after killing member {old}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("leader e{old} killed; e{new} leads after {:?}", t.elapsed());
    let live: Vec<String> = lab.etcd_endpoints().into_iter().enumerate().filter(|(i, _)| *i != old).map(|(_, e)| e).collect();
    let out = lab.etcdctl(&["--endpoints", &live.join(","), "put", "/havip-harness/k", "2"]);
    assert!(ok(&out), "put with two of three members: {}", text(&out));
    lab.restart_etcd_member(old);
    lab.wait_etcd_healthy(Duration::from_secs(10));

    // All of etcd down, then back with its data.
    lab.stop_etcd(true);
    let out = put(&lab, "3");
    assert!(!ok(&out), "put with etcd stopped: {}", text(&out));
    let t = Instant::now();
    lab.stop_etcd(false);
    eprintln!("etcd back and healthy {:?} after restart", t.elapsed());
    let get = lab.etcdctl(&["get", "/havip-harness/k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "2", "data kept over the restart: {}", text(&get));

    // Frozen: connections stay, nothing answers.
    lab.freeze_etcd(true);
    let out = put(&lab, "4");
    assert!(!ok(&out), "put with etcd frozen: {}", text(&out));
    lab.freeze_etcd(false);
    lab.wait_etcd_healthy(Duration::from_secs(10));
    assert!(ok(&put(&lab, "5")));
    drop(lab);
    assert_gone(&id);
}

/// Whether a datagram sent from `from` to `to_addr`:7947 arrives at a socket bound in `to`.
fn heartbeat_arrives(from: &Netns, to: &Netns, to_addr: &str) -> bool {
    let addr = format!("{to_addr}:7947");
    let rx = in_netns(&to.name, move || UdpSocket::bind(addr).unwrap()).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let dst = format!("{to_addr}:7947");
    let tx = in_netns(&from.name, || UdpSocket::bind("0.0.0.0:7947").unwrap()).unwrap();
    // An output drop makes the send itself fail (EPERM): that is the fault, not an error.
    let _ = tx.send_to(b"hb", &dst);
    let mut buf = [0u8; 8];
    rx.recv(&mut buf).is_ok()
}

#[test]
fn heartbeat_faults_and_cables() {
    let lab = ClusterLab::new(2, 1);
    let id = lab.id.clone();
    let (n1, n2) = (lab.node_ns(1), lab.node_ns(2));
    let both = |want: (bool, bool)| {
        let got = (heartbeat_arrives(n1, n2, "198.18.30.21"), heartbeat_arrives(n2, n1, "198.18.30.11"));
        assert_eq!(got, want, "(n1 -> n2, n2 -> n1) heartbeats");
    };
    both((true, true));
    lab.cut_peers(1, true);
    both((false, false));
    lab.cut_peers(1, false);
    both((true, true));
    lab.one_way_loss(1, true, true);
    both((false, true));
    lab.one_way_loss(1, true, false);
    lab.one_way_loss(1, false, true);
    both((true, false));
    lab.one_way_loss(1, false, false);
    both((true, true));
    // etcd cut does not touch heartbeats.
    lab.cut_etcd(1, true);
    both((true, true));
    lab.cut_etcd(1, false);

    // Cables: both NICs of n1 lose carrier, and get it back.
    lab.node_links(1, false);
    let links = n1.ip(&["-br", "link", "show"]).unwrap();
    assert_eq!(links.lines().filter(|l| l.starts_with("eth") && l.contains("NO-CARRIER")).count(), 2, "{links}");
    lab.node_links(1, true);
    std::thread::sleep(Duration::from_millis(100));
    let links = n1.ip(&["-br", "link", "show"]).unwrap();
    assert_eq!(links.lines().filter(|l| l.starts_with("eth") && l.contains(" UP ")).count(), 2, "{links}");
    drop(lab);
    assert_gone(&id);
}

#[test]
fn probes_and_neighbour_capture_follow_an_address_moved_by_hand() {
    let lab = ClusterLab::new(3, 1);
    let id = lab.id.clone();
    let vip: Ipv4Addr = CLUSTER_VIP.parse().unwrap();
    let _echo = lab.echo_on_all_nodes(7000);
    lab.node_ns(1).ip(&["addr", "add", &format!("{vip}/32"), "dev", "eth0"]).unwrap();
    let cli = lab.client_ns();

    // n1 holds the address: it answers every probe and its ARP replies are seen.
    let capture = NeighCapture::start(cli, "eth0");
    let _ = cli.ip(&["neigh", "flush", "dev", "eth0"]);
    let asker = ArpAsker::start(cli, &[CLUSTER_VIP], Duration::from_millis(20));
    let probes = ProbeStream::start(cli, CLUSTER_VIP, 7000, Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(1));

    // Moved to n2 by hand: off n1, on n2, announced from n2, the client's entry flushed.
    let moved = Instant::now();
    lab.node_ns(1).ip(&["addr", "del", &format!("{vip}/32"), "dev", "eth0"]).unwrap();
    lab.node_ns(2).ip(&["addr", "add", &format!("{vip}/32"), "dev", "eth0"]).unwrap();
    announce(lab.node_ns(2), "eth0", vip);
    let _ = cli.ip(&["neigh", "flush", "dev", "eth0"]);
    std::thread::sleep(Duration::from_secs(1));
    let report = probes.stop();
    let rounds = asker.stop();
    let events = capture.stop();

    eprintln!(
        "probes: sent {} answered {} by {:?}, longest gap {:?} (send gap {:?}), gaps {:?}",
        report.sent,
        report.answered,
        report.answered_by,
        report.longest_gap,
        report.longest_send_gap,
        report.gaps.iter().map(|g| (g.len, &g.before, &g.after)).collect::<Vec<_>>()
    );
    assert!(report.sent > 500, "only {} probes sent in 2 s", report.sent);
    assert!(report.answered as f64 > report.sent as f64 * 0.9, "{} of {} probes answered", report.answered, report.sent);
    assert_eq!(report.answered_by.keys().collect::<Vec<_>>(), ["n1", "n2"], "{:?}", report.answered_by);
    assert_eq!(report.duplicates, 0);
    let before = report.answered_between(report.started, moved);
    let after = report.answered_between(moved + Duration::from_millis(200), report.stopped + Duration::from_secs(1));
    assert_eq!(before.keys().collect::<Vec<_>>(), ["n1"], "before the move: {before:?}");
    assert_eq!(after.keys().collect::<Vec<_>>(), ["n2"], "after the move: {after:?}");

    let macs = lab.mac_to_node();
    let claims: Vec<_> = events.iter().filter(|e| e.ip == vip).collect();
    let by = |node: &str, kind: NeighKind| claims.iter().filter(|e| macs.get(&e.mac).map(String::as_str) == Some(node) && e.kind == kind).count();
    eprintln!(
        "{rounds} ARP rounds; claims for {vip}: n1 replies {}, n2 announcements {}, n2 replies {}",
        by("n1", NeighKind::ArpReply),
        by("n2", NeighKind::GratuitousArp),
        by("n2", NeighKind::ArpReply)
    );
    assert!(by("n1", NeighKind::ArpReply) >= 20, "n1's ARP replies: {claims:?}");
    assert_eq!(by("n2", NeighKind::GratuitousArp), 1, "n2's announcement: {claims:?}");
    assert!(by("n2", NeighKind::ArpReply) >= 20, "n2's ARP replies: {claims:?}");
    // Both NICs of a node answer ARP for any of its addresses (arp_ignore=0): one owner.
    assert!(claims.iter().any(|e| e.mac == lab.node_macs(1)[1]), "n1's eth1 never answered: {claims:?}");
    let v = two_owner_moments(&events, &macs);
    assert!(v.is_empty(), "violations on a clean move: {v:?}");

    // Now both hold it: the checker must see two owners on the wire.
    let capture = NeighCapture::start(cli, "eth0");
    let asker = ArpAsker::start(cli, &[CLUSTER_VIP], Duration::from_millis(20));
    lab.node_ns(1).ip(&["addr", "add", &format!("{vip}/32"), "dev", "eth0"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    asker.stop();
    let v = two_owner_moments(&capture.stop(), &macs);
    eprintln!("two owners: {} violations, first {:?}", v.len(), v.first());
    assert!(v.iter().any(|v| v.kind == ViolationKind::StaleOwner), "no stale-owner moment with two owners: {v:?}");
    drop(lab);
    assert_gone(&id);
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let id = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = id.clone();
    let result = std::thread::spawn(move || {
        let lab = ClusterLab::new(2, 1);
        *seen.lock().unwrap() = lab.id.clone();
        lab.cut_etcd(1, true);
        let _echo = lab.echo_on_all_nodes(7001);
        let _probes = ProbeStream::start(lab.client_ns(), CLUSTER_VIP, 7001, Duration::from_millis(2));
        let _capture = NeighCapture::start(lab.client_ns(), "eth0");
        panic!("deliberate panic with a lab up");
    })
    .join();
    assert!(result.is_err());
    let id = id.lock().unwrap().clone();
    assert!(!id.is_empty());
    assert_gone(&id);
}

/// havipd's process under the lab's control, with a single-node (non-cluster) config:
/// start, freeze, thaw, stop, crash, and the cleanup of its pins.
#[test]
fn node_process_control() {
    let mut lab = ClusterLab::new(2, 1);
    let id = lab.id.clone();
    let config = format!("[node]\nvip_interface = \"lo\"\n[[nic]]\nname = \"eth0\"\n[[nic]]\nname = \"eth1\"\n[[vip]]\naddress = \"{CLUSTER_VIP}\"\nnics = [\"eth0\", \"eth1\"]\n");
    let _echo = lab.echo_on_all_nodes(7002);
    lab.start_node_with(1, &config);
    let state = |lab: &ClusterLab| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", lab.node_pid(1).unwrap())).unwrap();
        status.lines().find(|l| l.starts_with("State:")).unwrap().split_whitespace().nth(1).unwrap().to_string()
    };
    // The VIP is served by n1's havipd once it has applied (the lab does not wait for that).
    let t = Instant::now();
    let report = loop {
        let probes = ProbeStream::start(lab.client_ns(), CLUSTER_VIP, 7002, Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(300));
        let r = probes.stop();
        if r.answered > 0 || t.elapsed() > Duration::from_secs(10) {
            break r;
        }
    };
    assert_eq!(report.answered_by.keys().collect::<Vec<_>>(), ["n1"], "{report:?}\n{}", lab.node_log(1));
    lab.pause_node(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(state(&lab), "T");
    lab.resume_node(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(state(&lab), "T");
    // SIGTERM also ends a frozen daemon (stop_node thaws it).
    lab.pause_node(1);
    let status = lab.stop_node(1);
    assert!(status.success(), "havipd exit after SIGTERM: {status}\n{}", lab.node_log(1));
    assert!(!lab.node_log(1).is_empty());
    lab.start_node_with(1, &config);
    lab.kill_node(1);
    assert!(lab.node_pin_root(1).exists(), "a crashed havipd leaves its pins");
    drop(lab);
    assert_gone(&id);
}
