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
    node::binder::{self, LinkState, Placement},
    node::rank::{self, Sample, VipMemory},
    config::ranking::Settings,
};
use serde::Serialize;

use crate::{
    paths::{delay, lab, CLEAN, VIP},
    percentile,
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

#[derive(Debug, Serialize)]
pub struct RebindReport {
    pub method: String,
    pub trials_s: Vec<f64>,
    pub p50_s: f64,
    pub p99_s: f64,
    /// The configured ranking hold-down: the floor any trial waits by design.
    pub hold_down_s: f64,
    pub p50_ratio_to_hold_down: f64,
}

/// Degradation to completed rebind at the default probe and ranking settings.
pub fn degradation_to_rebind(trials: usize) -> RebindReport {
    let mut l = lab(&[crate::paths::TARGET], "");
    l.t.start_daemon();
    let owner = |t: &crate::topology::Topology| t.vip_stats(VIP)["nic"].as_str().unwrap().to_string();
    // Links must be up for the failback hold-down, and the window full, before the VIP may
    // move for quality.
    std::thread::sleep(Duration::from_secs(7));
    let mut out = Vec::new();
    for i in 0..trials {
        let from = owner(&l.t);
        let (relay, other) = if from == "a0" { (&l.a, "b0") } else { (&l.b, "a0") };
        let t0 = Instant::now();
        relay.set(delay(20), CLEAN);
        while owner(&l.t) != other {
            assert!(t0.elapsed() < Duration::from_secs(30), "no rebind within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        out.push(t0.elapsed().as_secs_f64());
        eprint!("\r  degradation to rebind: trial {}/{trials}", i + 1);
        // Heal the old path: the VIP stays (hysteresis) and the next trial degrades it
        // where it is now. Let the EWMA forget the delay first.
        relay.set(CLEAN, CLEAN);
        std::thread::sleep(Duration::from_secs(6));
    }
    eprintln!();
    let hold = Settings::default().evidence.as_secs_f64();
    let p50 = percentile(&out, 0.5);
    RebindReport {
        method: "20 ms added to the owning NIC's path; time until the VIP is bound elsewhere; default settings".into(),
        p50_s: p50,
        p99_s: percentile(&out, 0.99),
        hold_down_s: hold,
        p50_ratio_to_hold_down: p50 / hold,
        trials_s: out,
    }
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
            samples.insert((n.clone(), *t), Sample { rtt_ms: Some(rtt), loss_pct: Some((j % 3) as f64), hops: Some(2), sent: 5, replies: 5, ..Default::default() });
        }
    }
    let vip_targets: Vec<Vec<IpAddr>> = (0..vips).map(|v| (0..targets_per_vip).map(|k| targets[(v + k * 5) % targets.len()]).collect()).collect();
    let links: BTreeMap<String, LinkState> = nics.iter().map(|n| (n.clone(), LinkState { up: true, since: Instant::now() - Duration::from_secs(60) })).collect();
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
        for (v, mem) in memories.iter_mut().enumerate() {
            let (ranked, complete) = rank::rank(&nics, &vip_targets[v], &samples, &w);
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
