//! Quality figures for `cargo xtask bench`:
//! - degradation to rebind: 20 ms added to the owning NIC's path, time until the VIP is
//!   on the other NIC, at default probe/ranking settings;
//! - the controller's cost to rank 10,000 VIPs over 4 NICs, against a round of the
//!   link-state binder alone over the same VIPs.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use havip_user::{
    config::ranking::Settings,
    node::binder::{self, LinkState, Placement},
    node::rank::{self, Sample, VipMemory},
};
use serde::Serialize;

use crate::{
    paths::{lab, CLEAN, VIP},
    percentile,
    relay::Impairment,
};

/// Counts live heap bytes and their peak, for the ranking round's memory figure.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

/// Time from an impairment to the VIP's move, over trials.
#[derive(Debug, Serialize)]
pub struct MoveTimes {
    pub what: String,
    pub trials: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The rebind reasons a trial's move may have (checked: exactly one such move per
    /// trial), and how many moves had each.
    pub reasons: std::collections::BTreeMap<String, usize>,
}

impl MoveTimes {
    fn of(what: &str, (ms, reasons): (Vec<f64>, std::collections::BTreeMap<String, usize>)) -> Self {
        let max_ms = ms.iter().copied().fold(0.0, f64::max);
        MoveTimes { what: what.into(), trials: ms.len(), p50_ms: percentile(&ms, 0.5), p99_ms: percentile(&ms, 0.99), max_ms, reasons }
    }
}

/// A long run of impairments that must move nothing.
#[derive(Debug, Serialize)]
pub struct NoiseRun {
    pub what: String,
    pub seconds: f64,
    pub moves: u64,
    /// Probe bursts the relay injected (0 for the jitter-and-loss run).
    pub bursts: u64,
    /// Paths put in doubt, and probes sent per second on each of the 2 paths.
    pub doubts: usize,
    pub probes_per_s_per_path: f64,
    /// For each move: the daemon's log lines of the 3 s before it (verdicts, the decision).
    pub moves_context: Vec<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct PathQualityReport {
    pub method: String,
    /// Baseline: the owning NIC's link set down (carrier lost), the failure the kernel
    /// reports at once.
    pub link_down: MoveTimes,
    pub dark: MoveTimes,
    pub dark_p50_ratio_to_link_down: f64,
    pub dark_p99_ratio_to_link_down: f64,
    pub delay_20ms: MoveTimes,
    pub loss_10pct: MoveTimes,
    pub noise: NoiseRun,
    pub bursts: NoiseRun,
    pub targets_met: bool,
}

/// `reason=...` rebinds in a daemon log, and the wall-clock second of the last one.
fn rebinds(log: &str, reason: &str) -> (usize, Option<f64>) {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("VIP bound") && l.contains(&format!("reason={reason} "))).collect();
    (lines.len(), lines.last().and_then(|l| crate::cluster::log_secs(l)))
}

fn day_secs_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() % 86_400.0
}

fn owner(t: &crate::topology::Topology) -> String {
    t.vip_stats(VIP)["nic"].as_str().unwrap().to_string()
}

/// `trials` times: `fault` applied to the owning NIC's path (it returns the undo), the
/// time until the daemon logged the move with one of `reasons` (its log is stamped by the
/// wall clock), checked to be exactly one such move; then undone and settled for `settle`.
fn timed_moves(
    l: &crate::paths::Lab,
    label: &str,
    trials: usize,
    reasons: &[&str],
    settle: Duration,
    fault: &dyn Fn(&crate::paths::Lab, &str) -> Box<dyn Fn()>,
) -> (Vec<f64>, std::collections::BTreeMap<String, usize>) {
    let mut out = Vec::new();
    let mut by_reason = std::collections::BTreeMap::new();
    let count = |log: &str| -> Vec<(usize, Option<f64>)> { reasons.iter().map(|r| rebinds(log, r)).collect() };
    for i in 0..trials {
        eprint!("\r  {label}: trial {}/{trials}   ", i + 1);
        let from = owner(&l.t);
        let other = if from == "a0" { "b0" } else { "a0" };
        let before = count(&l.t.daemon_log());
        let t0 = day_secs_now();
        let undo = fault(l, &from);
        let start = Instant::now();
        while owner(&l.t) != other {
            assert!(start.elapsed() < Duration::from_secs(15), "{label} trial {i}: the VIP did not leave {from} within 15 s:\n{}", l.t.daemon_log());
            std::thread::sleep(Duration::from_millis(10));
        }
        undo();
        // The log line is written before the map shows the move... or just after: wait for it.
        let total = |c: &[(usize, Option<f64>)]| c.iter().map(|(n, _)| n).sum::<usize>();
        let mut moved = count(&l.t.daemon_log());
        while total(&moved) == total(&before) && start.elapsed() < Duration::from_secs(16) {
            std::thread::sleep(Duration::from_millis(10));
            moved = count(&l.t.daemon_log());
        }
        assert_eq!(total(&moved), total(&before) + 1, "{label} trial {i}: the move was not exactly one {reasons:?} rebind:\n{}", l.t.daemon_log());
        let k = (0..reasons.len()).find(|&k| moved[k].0 > before[k].0).expect("one reason grew");
        *by_reason.entry(reasons[k].to_string()).or_insert(0) += 1;
        out.push((moved[k].1.expect("a stamped log line") - t0) * 1e3);
        std::thread::sleep(settle);
    }
    eprintln!();
    (out, by_reason)
}

/// One noise run of `secs` on a fresh lab: `a` and `b` on the two paths (both ways).
/// Ends early when `stop` is set (the trials beside it failed: the lab must still be
/// torn down).
fn noise_run(what: &str, secs: u64, a: Impairment, b: Impairment, stop: &std::sync::atomic::AtomicBool) -> NoiseRun {
    let mut l = lab(&[crate::paths::TARGET], "");
    l.t.start_daemon();
    std::thread::sleep(Duration::from_secs(7));
    let sent0: u64 = ["a0", "b0"].iter().map(|n| path_sent(&l.t, n)).sum();
    let moves0 = l.t.vip_stats(VIP)["moves"].as_u64().unwrap();
    let t0 = Instant::now();
    l.a.set(a, a);
    l.b.set(b, b);
    while t0.elapsed() < Duration::from_secs(secs) && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    l.a.set(CLEAN, CLEAN);
    l.b.set(CLEAN, CLEAN);
    let seconds = t0.elapsed().as_secs_f64();
    let sent1: u64 = ["a0", "b0"].iter().map(|n| path_sent(&l.t, n)).sum();
    let log = l.t.daemon_log();
    NoiseRun {
        what: what.into(),
        seconds,
        moves: l.t.vip_stats(VIP)["moves"].as_u64().unwrap() - moves0,
        bursts: l.a.bursts(),
        doubts: log.lines().filter(|l| l.contains("path verdict") && l.contains("Doubt")).count(),
        probes_per_s_per_path: (sent1 - sent0) as f64 / seconds / 2.0,
        moves_context: move_context(&log),
    }
}

/// The log lines of the 3 s before each move after the first (initial) binding.
fn move_context(log: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = log.lines().collect();
    let secs = |l: &str| crate::cluster::log_secs(l).unwrap_or(0.0);
    lines
        .iter()
        .filter(|l| l.contains("VIP bound") && !l.contains("reason=initial"))
        .map(|m| {
            let t = secs(m);
            lines
                .iter()
                .filter(|l| (t - 3.0..=t).contains(&secs(l)) && (l.contains("path verdict") || l.contains("quality decision") || l.contains("VIP bound")))
                .map(|l| l.to_string())
                .collect()
        })
        .collect()
}

fn path_sent(t: &crate::topology::Topology, nic: &str) -> u64 {
    let v = t.vip_stats(VIP);
    v["paths"].as_array().unwrap().iter().find(|p| p["nic"] == nic).and_then(|p| p["sent"].as_u64()).unwrap_or(0)
}

/// Path quality at default settings: link down (baseline), a dark path (carrier kept),
/// 20 ms added, 10% loss, each `trials` times; and two noise runs of `noise_secs`, at once
/// on two labs: jitter with random loss on every path, and bursts of lost probes on one.
pub fn path_quality(trials: usize, noise_secs: u64) -> PathQualityReport {
    use crate::relay::ProbeBursts;
    let noise = Impairment { jitter: Duration::from_millis(2), loss: 0.005, ..CLEAN };
    let bursty = Impairment { probe_bursts: Some(ProbeBursts { max_len: 3, gap_min: Duration::from_secs(2), gap_max: Duration::from_secs(6) }), ..CLEAN };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s1, s2) = (stop.clone(), stop.clone());
    let noise_thread = std::thread::spawn(move || noise_run("2 ms jitter + 0.5% random loss on every path, both ways", noise_secs, noise, noise, &s1));
    let burst_thread = std::thread::spawn(move || noise_run("bursts of 1-3 lost probes every 2-6 s on one path", noise_secs, bursty, CLEAN, &s2));
    let trials_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| timed_trials(trials)));
    let (link_down, dark, delay_20ms, loss_10pct) = match trials_result {
        Ok(t) => t,
        Err(e) => {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = noise_thread.join();
            let _ = burst_thread.join();
            std::panic::resume_unwind(e);
        }
    };
    eprintln!("  noise runs: {noise_secs} s each, started with the trials");
    let noise = noise_thread.join().expect("noise run");
    let bursts = burst_thread.join().expect("burst run");
    let targets_met = dark.p99_ms <= 150.0
        && delay_20ms.p50_ms <= 1000.0
        && delay_20ms.p99_ms <= 2000.0
        && loss_10pct.p50_ms <= 1000.0
        && loss_10pct.p99_ms <= 2000.0
        && noise.moves == 0
        && bursts.moves == 0;
    PathQualityReport {
        method: "2 paths through userspace impairment relays (veth, namespaces); default probe and ranking settings; time from the impairment to havipd's log line of the move (wall clock)".into(),
        dark_p50_ratio_to_link_down: dark.p50_ms / link_down.p50_ms.max(0.001),
        dark_p99_ratio_to_link_down: dark.p99_ms / link_down.p99_ms.max(0.001),
        link_down,
        dark,
        delay_20ms,
        loss_10pct,
        noise,
        bursts,
        targets_met,
    }
}

/// The timed trials of [`path_quality`], on their own lab.
fn timed_trials(trials: usize) -> (MoveTimes, MoveTimes, MoveTimes, MoveTimes) {
    // A short failback, so the link-down trials alternate quickly; the moves measured here
    // do not wait for it.
    let mut l = lab(&[crate::paths::TARGET], "[failover]\nfailback_hold_down_ms = 300");
    l.t.start_daemon();
    std::thread::sleep(Duration::from_secs(7));
    let relay = |l: &crate::paths::Lab, nic: &str| if nic == "a0" { l.a.set_handle() } else { l.b.set_handle() };
    let link_down = timed_moves(&l, "link down", trials, &["link_down"], Duration::from_millis(600), &|l, nic| {
        l.t.srv.ip(&["link", "set", nic, "down"]).unwrap();
        let (ns, nic) = (l.t.srv.name.clone(), nic.to_string());
        Box::new(move || {
            let _ = std::process::Command::new("ip").args(["-n", &ns, "link", "set", &nic, "up"]).status();
        })
    });
    let dark = timed_moves(&l, "dark path", trials, &["path_dark"], Duration::from_millis(1500), &|l, nic| {
        let r = relay(l, nic);
        let dark = Impairment { loss: 1.0, ..CLEAN };
        r(dark, dark);
        Box::new(move || r(CLEAN, CLEAN))
    });
    let delay = timed_moves(&l, "20 ms added", trials, &["quality"], Duration::from_millis(2500), &|l, nic| {
        let r = relay(l, nic);
        r(crate::paths::delay(20), CLEAN);
        Box::new(move || r(CLEAN, CLEAN))
    });
    let loss = timed_moves(&l, "10% loss", trials, &["quality", "path_dark"], Duration::from_millis(2500), &|l, nic| {
        let r = relay(l, nic);
        r(Impairment { loss: 0.1, ..CLEAN }, CLEAN);
        Box::new(move || r(CLEAN, CLEAN))
    });
    let (link_down, dark) = (MoveTimes::of("owning NIC's link set down", link_down), MoveTimes::of("owning path drops everything, link up", dark));
    let delay_20ms = MoveTimes::of("20 ms added to the owning path", delay);
    // 10% loss moves by the loss test, or now and then by 4 probes lost in a row first.
    let loss_10pct = MoveTimes::of("10% loss on the owning path", loss);
    (link_down, dark, delay_20ms, loss_10pct)
}

#[derive(Debug, Serialize)]
pub struct RerankReport {
    pub vips: usize,
    pub nics: usize,
    pub targets_per_vip: usize,
    pub binder_round_ms: f64,
    pub ranking_round_ms: f64,
    pub ratio_to_binder_round: f64,
    pub ranking_peak_heap_mb: f64,
}

/// Ranks 10,000 VIPs over 4 NICs (2 targets each, from 16), median of 7 rounds.
pub fn rerank_cost() -> RerankReport {
    let (vips, nic_count, targets_per_vip) = (10_000usize, 4usize, 2usize);
    let nics: Vec<String> = (0..nic_count).map(|i| format!("eth{i}")).collect();
    let targets: Vec<IpAddr> = (0..16).map(|i| format!("198.18.50.{i}").parse().unwrap()).collect();
    let mut samples = BTreeMap::new();
    for (i, n) in nics.iter().enumerate() {
        for (j, t) in targets.iter().enumerate() {
            let rtt = 1.0 + ((i * 7 + j * 3) % 11) as f64;
            samples.insert(
                (n.clone(), *t),
                Sample { rtt_ms: Some(rtt), loss_pct: Some((j % 3) as f64), hops: Some(2), sent: 5, replies: 5, ..Default::default() },
            );
        }
    }
    let vip_targets: Vec<Vec<IpAddr>> = (0..vips).map(|v| (0..targets_per_vip).map(|k| targets[(v + k * 5) % targets.len()]).collect()).collect();
    let links: BTreeMap<String, LinkState> =
        nics.iter().map(|n| (n.clone(), LinkState { up: true, since: Instant::now() - Duration::from_secs(60) })).collect();
    let w = Settings::default();
    let mut memories: Vec<VipMemory> = vec![VipMemory::default(); vips];
    let median = |mut f: Box<dyn FnMut()>| {
        let mut t: Vec<f64> = (0..7)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        t[3]
    };
    let binder_ms = median(Box::new(|| {
        let mut moves = 0;
        for _ in 0..vips {
            let p = Placement { candidates: &nics, pinned: None, current: Some("eth1") };
            moves += binder::decide(p, &links, Instant::now(), Duration::from_secs(5)).is_some() as usize;
        }
        std::hint::black_box(moves);
    }));
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let ranking_ms = median(Box::new(|| {
        let now = Instant::now();
        let up = |_: &str| true;
        let mut moves = 0;
        // As havipd's round: VIPs sharing candidates and targets are ranked once.
        let mut cache = rank::RoundCache::default();
        for (v, mem) in memories.iter_mut().enumerate() {
            let (ranked, complete) = cache.rank(&nics, &vip_targets[v], &samples, &w).clone();
            let d = rank::decide(&ranked, complete, Some("eth1"), &up, mem, now, &w);
            let p = Placement { candidates: &d.order, pinned: None, current: Some("eth1") };
            moves += binder::decide(p, &links, now, Duration::from_secs(5)).is_some() as usize;
        }
        std::hint::black_box(moves);
    }));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    RerankReport {
        vips,
        nics: nic_count,
        targets_per_vip,
        binder_round_ms: binder_ms,
        ranking_round_ms: ranking_ms,
        ratio_to_binder_round: ranking_ms / binder_ms.max(1e-6),
        ranking_peak_heap_mb: peak as f64 / 1e6,
    }
}
