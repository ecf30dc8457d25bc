//! What reading stats costs the kernel. A snapshot reads only the entries in use, each map
//! in one batch, so a dataplane with a handful of VIPs costs a few dozen bpf() calls (read
//! element by element, it cost about 23,000 whatever the dataplane held). Counted by the
//! read itself and, from outside, by strace around `havip stats`.

use std::net::IpAddr;

use havip_common::PROBE_KIND_ICMP;
use havip_tests::{
    fixture::Fixture,
    scrape::{check_snapshot, fill_counters, strace_stats},
};
use havip_user::observe::stats::Snapshot;

/// Three calls for the layout version (see `map_layout`), and at most three for each map the
/// read needs (open it, read its layout, one batch),
/// for the 15 maps a dataplane using every feature makes it read: NICS, VIPS, REMAP_IN,
/// PROBE_SLOTS, PROBE_STATS, PEER_QUALITY, CLASSES, CLASS_STATS_INDEX, CLASS_STATS,
/// BINDINGS, VIP_STATS, NIC_STATS, OUTCOMES, QUEUE_STATS, CPU_QUEUES.
const MAX_CALLS: u64 = 3 + 3 * 15;

/// Four VIPs, one with a class that has a CPU queue, each reaching an instance.
const CONFIG: &str = r#"
[[nic]]
name = "eth0"
[[vip]]
address = "198.19.0.1"
class = "latency"
[[vip]]
address = "198.19.0.2"
[[vip]]
address = "2001:db8:100::1"
[[vip]]
address = "2001:db8:100::2"
[[service]]
name = "web"
port = 80
[[service.instance]]
vip = "198.19.0.1"
port = 8081
[[service.instance]]
vip = "198.19.0.2"
port = 8082
[[service.instance]]
vip = "2001:db8:100::1"
port = 8081
[[service.instance]]
vip = "2001:db8:100::2"
port = 8082
[class.latency]
cpus = [0]
rate = "10mbit"
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_snapshot_of_a_few_vips_makes_a_few_dozen_bpf_calls() {
    let mut fx = Fixture::new_with(CONFIG, false);
    fill_counters(&mut fx);
    fx.dp.set_probe_slot(7, Some((1, ip("198.18.2.2"))), (PROBE_KIND_ICMP, None)).unwrap();

    // From outside: every bpf() call of `havip stats --json`, whatever made it.
    let no_state = std::env::temp_dir().join(havip_tests::unique("havip-no-run-dir"));
    let (cli_calls, json) = strace_stats(fx.pins(), &no_state);
    eprintln!("`havip stats --json` of 4 VIPs: {cli_calls} bpf() calls");
    assert!(cli_calls <= MAX_CALLS, "`havip stats` of 4 VIPs made {cli_calls} bpf() calls, more than {MAX_CALLS}");
    assert_eq!(json["vips"].as_array().unwrap().len(), 4, "{json}");

    // In-process: the snapshot counts its own calls, and reads what it names.
    let snap = Snapshot::read(fx.pins(), None).unwrap();
    check_snapshot(&fx, &snap);
    let classed = snap.vip(ip("198.19.0.1")).unwrap();
    assert_eq!(classed.class.as_deref(), Some("latency"));
    assert_eq!(classed.classes.iter().map(|c| c.class.as_str()).collect::<Vec<_>>(), ["latency"]);
    assert_eq!(snap.classes.iter().map(|c| (c.class.as_str(), c.cpus.clone())).collect::<Vec<_>>(), [("latency", vec![0])]);
    assert_eq!(snap.paths.iter().map(|p| (p.nic.as_str(), p.target)).collect::<Vec<_>>(), [("lo", ip("198.18.2.2"))]);
    assert_eq!(snap.nics.iter().map(|n| n.nic.as_str()).collect::<Vec<_>>(), ["lo"]);
    assert!(snap.bpf_calls > 0 && snap.bpf_calls <= MAX_CALLS, "the snapshot made {} bpf() calls", snap.bpf_calls);
    // The counter misses nothing: the CLI's read of the same maps made exactly as many.
    assert_eq!(cli_calls, snap.bpf_calls, "strace and the read's counter disagree");
}
