//! What reading stats costs: dataplanes with many VIPs and known counters, the bpf() calls
//! of `havip stats` counted from outside with strace, and the scrape figure of
//! `cargo xtask bench` (a snapshot of 10,000 VIPs read and rendered as metrics, against the
//! same for 1 VIP).

use std::{net::IpAddr, path::Path, process::Command, time::Instant};

use aya::maps::PerCpuValues;
use havip_common::{Binding, VipCounters, VipKey};
use havip_user::{
    kernel::pins::PinLayout,
    node::health::DaemonMetrics,
    observe::{metrics, stats::Snapshot},
};
use serde::Serialize;

use crate::{fixture::Fixture, percentile};

/// The address of VIP `i` (inside 198.19.0.0/16, part of the benchmarking range).
pub fn vip_address(i: usize) -> IpAddr {
    format!("198.19.{}.{}", i / 200, i % 200 + 1).parse().unwrap()
}

/// `n` VIPs on one NIC, each reaching its own instance on :8081 as :80 over TCP.
pub fn many_vips_config(n: usize) -> String {
    let mut s = String::from("[[nic]]\nname = \"eth0\"\n");
    for i in 0..n {
        s += &format!("[[vip]]\naddress = \"{}\"\n", vip_address(i));
    }
    s += "[[service]]\nname = \"web\"\nport = 80\n";
    for i in 0..n {
        s += &format!("[[service.instance]]\nvip = \"{}\"\nport = 8081\n", vip_address(i));
    }
    s
}

/// The counters [`fill_counters`] gives VIP id `id` on each CPU.
pub fn counters_of(id: u32) -> VipCounters {
    let mut c = VipCounters::default();
    c.rx.packets = id as u64 + 1;
    c.rx.bytes = 100 * (id as u64 + 1);
    c.tx.packets = 2 * (id as u64 + 1);
    c.wire.misdirected = 3;
    c
}

/// Gives every VIP of `fx` known counters on every CPU and binds it to ifindex 1 (a NIC
/// named `lo` in the NICS map, counter slot 0).
pub fn fill_counters(fx: &mut Fixture) {
    let ncpus = aya::util::nr_cpus().unwrap();
    fx.dp.set_nic(1, "lo", [2, 0, 0, 0, 0, 1], 0, None).unwrap();
    let ids: Vec<u32> = fx.maps.vips.iter().map(|e| e.unwrap().1.id).collect();
    for id in ids {
        let values = PerCpuValues::try_from(vec![counters_of(id); ncpus]).unwrap();
        fx.maps.vip_stats.set(id, values, 0).unwrap();
        let b = Binding { ifindex: 1, nic_index: 0, mac: [2, 0, 0, 0, 0, 1], moves: id as u64, ..Default::default() };
        fx.maps.set_binding(id, b).unwrap();
    }
}

/// Checks that `snap` holds exactly the VIPs of `fx`, each with the counters
/// [`fill_counters`] gave it, summed over CPUs, its binding and its mapping.
pub fn check_snapshot(fx: &Fixture, snap: &Snapshot) {
    let ncpus = aya::util::nr_cpus().unwrap() as u64;
    let vips: Vec<(VipKey, u32)> = fx.maps.vips.iter().map(|e| e.map(|(k, i)| (k, i.id)).unwrap()).collect();
    assert_eq!(snap.vips.len(), vips.len(), "the snapshot holds every VIP");
    for (key, id) in vips {
        let v = snap.vip(key.to_ip()).unwrap_or_else(|| panic!("{} missing from the snapshot", key.to_ip()));
        let want = counters_of(id);
        assert_eq!(v.id, id);
        assert_eq!(
            (v.rx.packets, v.rx.bytes, v.tx.packets, v.wire.misdirected),
            (ncpus * want.rx.packets, ncpus * want.rx.bytes, ncpus * want.tx.packets, ncpus * want.wire.misdirected),
            "{}: counters summed over {ncpus} CPUs",
            key.to_ip()
        );
        assert_eq!((v.nic.as_str(), v.moves), ("lo", id as u64), "{}: binding", key.to_ip());
        assert_eq!(v.mappings.len(), 1, "{}: its mapping", key.to_ip());
    }
}

/// Runs `havip stats --json` on the node at `pins` under strace; returns its bpf() calls
/// and its output.
pub fn strace_stats(pins: &PinLayout, run_dir: &Path) -> (u64, serde_json::Value) {
    let trace = std::env::temp_dir().join(format!("{}.strace", crate::unique("havip-stats")));
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=bpf", "-o"])
        .arg(&trace)
        .arg(crate::bin("havip"))
        .arg("--pin-path")
        .arg(&pins.root)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["stats", "--json"])
        .output()
        .expect("cannot run strace (`cargo xtask setup` installs it)");
    assert!(out.status.success(), "havip stats failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    // One line per call; with -f a call another thread interrupts is split into an
    // "unfinished" line (counted, it holds "bpf(") and a "resumed" one (not counted).
    let calls = text.lines().filter(|l| l.contains("bpf(")).count() as u64;
    (calls, serde_json::from_slice(&out.stdout).expect("stats --json prints JSON"))
}

#[derive(Debug, Serialize)]
pub struct ScrapeCase {
    pub vips: usize,
    /// Snapshot::read, median and p99 over the trials.
    pub read_ms_p50: f64,
    pub read_ms_p99: f64,
    /// Snapshot::read and the metrics endpoint's render of it.
    pub scrape_ms_p50: f64,
    pub scrape_ms_p99: f64,
    /// bpf() calls of one read, by its counter (the same in every trial).
    pub bpf_calls: u64,
    /// bpf() calls of `havip stats --json` on the same maps, counted by strace.
    pub bpf_calls_strace_cli: u64,
    pub metrics_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct ScrapeReport {
    pub method: String,
    pub trials: usize,
    pub baseline: ScrapeCase,
    pub many: ScrapeCase,
    pub scrape_ratio_to_baseline: f64,
    pub read_ratio_to_baseline: f64,
    pub bpf_calls_ratio_to_baseline: f64,
}

/// One scrape of a node with `many` VIPs against the same with 1 VIP, `trials` of each,
/// interleaved.
pub fn scrape_cost(many: usize, trials: usize) -> ScrapeReport {
    let run_dir = std::env::temp_dir().join(crate::unique("havip-scrape-run"));
    let daemon = DaemonMetrics::new();
    let mut setups = Vec::new();
    for n in [1, many] {
        eprintln!("  setting up a dataplane with {n} VIP(s)");
        let mut fx = Fixture::new_with(&many_vips_config(n), false);
        fill_counters(&mut fx);
        setups.push((n, fx));
    }
    let mut cases = Vec::new();
    let mut samples = vec![(Vec::new(), Vec::new(), 0u64, 0usize); setups.len()];
    for t in 0..trials {
        eprint!("\r  scrape: trial {}/{trials}", t + 1);
        for (i, (n, fx)) in setups.iter().enumerate() {
            let start = Instant::now();
            let snap = Snapshot::read(fx.pins(), None).expect("reading the snapshot");
            let read = start.elapsed();
            let body = metrics::render(Some(&snap), &daemon);
            let scrape = start.elapsed();
            if t == 0 {
                // Check once that the timed path read what it names.
                check_snapshot(fx, &snap);
                let series = body.lines().filter(|l| l.starts_with("havip_vip_rx_packets_total{")).count();
                assert_eq!(series, *n, "one rx series per VIP");
            }
            let s = &mut samples[i];
            s.0.push(read.as_secs_f64() * 1e3);
            s.1.push(scrape.as_secs_f64() * 1e3);
            assert!(t == 0 || s.2 == snap.bpf_calls, "a read's calls do not vary with unchanged maps");
            s.2 = snap.bpf_calls;
            s.3 = body.len();
        }
    }
    eprintln!();
    for ((n, fx), (read, scrape, calls, bytes)) in setups.iter().zip(samples) {
        let (strace_calls, json) = strace_stats(fx.pins(), &run_dir);
        assert_eq!(json["vips"].as_array().unwrap().len(), *n);
        assert_eq!(strace_calls, calls, "strace counts the same bpf() calls as the read's counter ({n} VIPs)");
        cases.push(ScrapeCase {
            vips: *n,
            read_ms_p50: percentile(&read, 0.5),
            read_ms_p99: percentile(&read, 0.99),
            scrape_ms_p50: percentile(&scrape, 0.5),
            scrape_ms_p99: percentile(&scrape, 0.99),
            bpf_calls: calls,
            bpf_calls_strace_cli: strace_calls,
            metrics_bytes: bytes,
        });
    }
    let many = cases.pop().unwrap();
    let baseline = cases.pop().unwrap();
    ScrapeReport {
        method: "Snapshot::read of the pinned maps, then the metrics endpoint's render, in-process; dataplanes with 1 and with N VIPs (each with one mapping, a binding and counters on every CPU), trials interleaved".into(),
        trials,
        scrape_ratio_to_baseline: many.scrape_ms_p50 / baseline.scrape_ms_p50,
        read_ratio_to_baseline: many.read_ms_p50 / baseline.read_ms_p50,
        bpf_calls_ratio_to_baseline: many.bpf_calls as f64 / baseline.bpf_calls as f64,
        baseline,
        many,
    }
}
