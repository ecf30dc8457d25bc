//! Quality ranking of a VIP's candidate NICs from kernel-measured path quality. Pure
//! functions: measurements in, a preference order and its explanation out.
//!
//! The cost of a path (NIC -> target), lower is better:
//!
//! ```text
//! cost = weight_latency * rtt_ms + weight_loss * loss_pct + weight_hops * hops
//! ```
//!
//! Every term is >= 0, so loss always makes a path worse and no value divides by zero. A
//! path with no reply within the window is *unreachable*; one without samples yet is
//! *unknown*. A NIC's standing for a VIP: first how many of the VIP's targets it reaches
//! (more is better), then its targets' costs combined by mean or sum. A target no
//! candidate reaches says nothing about the NICs and is left out, so one dead target never
//! makes the whole VIP unplaceable.
//!
//! Moving is conservative: the best candidate must beat the current one by the margin
//! (relative *and* absolute) continuously for the hold-down, and if thresholds or top-K
//! are configured, the current path must break one of them. VIPs do not compete for
//! capacity, so this per-VIP hysteresis is also the fewest-moves assignment among
//! near-equal ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use serde::Serialize;

use crate::config::ranking::{Combine, Settings};

/// What was measured on one path over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Sample {
    pub rtt_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    pub hops: Option<u64>,
    /// Probes sent and replies received within the window.
    pub sent: u64,
    pub replies: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum PathScore {
    /// Not probed long enough to say.
    Unknown,
    /// Probes went out, nothing came back within the window.
    Unreachable,
    Cost(f64),
}

pub fn path_score(s: Option<&Sample>, w: &Settings) -> PathScore {
    let Some(s) = s else {
        return PathScore::Unknown;
    };
    if s.sent == 0 {
        return PathScore::Unknown;
    }
    if s.replies == 0 {
        return PathScore::Unreachable;
    }
    let rtt = s.rtt_ms.unwrap_or(0.0).max(0.0);
    let loss = s.loss_pct.unwrap_or(0.0).clamp(0.0, 100.0);
    let hops = s.hops.unwrap_or(0) as f64;
    PathScore::Cost(w.weight_latency * rtt + w.weight_loss * loss + w.weight_hops * hops)
}

/// One path of a candidate, as ranked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathEval {
    pub target: IpAddr,
    pub score: PathScore,
    pub rtt_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    /// False for a target no candidate reaches (left out of every NIC's standing).
    pub counted: bool,
}

/// One candidate's standing for a VIP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NicScore {
    pub nic: String,
    /// Targets it reaches (of those some candidate reaches).
    pub reachable: usize,
    /// Combined cost over the targets it reaches; `None` while any path is unknown.
    pub cost: Option<f64>,
    pub paths: Vec<PathEval>,
}

/// Candidates best first (reachable desc, cost asc, configured order among equals), and
/// whether every path had data.
pub fn rank(candidates: &[String], targets: &[IpAddr], samples: &BTreeMap<(String, IpAddr), Sample>, w: &Settings) -> (Vec<NicScore>, bool) {
    let sample = |n: &String, t: &IpAddr| samples.get(&(n.clone(), *t));
    let counted: BTreeSet<IpAddr> =
        targets.iter().filter(|t| candidates.iter().any(|n| !matches!(path_score(sample(n, t), w), PathScore::Unreachable))).copied().collect();
    let mut complete = true;
    let mut out: Vec<NicScore> = candidates
        .iter()
        .map(|n| {
            let paths: Vec<PathEval> = targets
                .iter()
                .map(|t| {
                    let s = sample(n, t);
                    PathEval {
                        target: *t,
                        score: path_score(s, w),
                        rtt_ms: s.and_then(|s| s.rtt_ms),
                        loss_pct: s.and_then(|s| s.loss_pct),
                        counted: counted.contains(t),
                    }
                })
                .collect();
            let unknown = paths.iter().any(|p| p.score == PathScore::Unknown);
            complete &= !unknown;
            let costs: Vec<f64> = paths.iter().filter(|p| p.counted).filter_map(|p| if let PathScore::Cost(c) = p.score { Some(c) } else { None }).collect();
            let cost = (!unknown && !costs.is_empty()).then(|| match w.combine {
                Combine::Sum => costs.iter().sum(),
                Combine::Mean => costs.iter().sum::<f64>() / costs.len() as f64,
            });
            NicScore { nic: n.clone(), reachable: costs.len(), cost, paths }
        })
        .collect();
    out.sort_by(|a, b| b.reachable.cmp(&a.reachable).then(a.cost.unwrap_or(f64::INFINITY).total_cmp(&b.cost.unwrap_or(f64::INFINITY))));
    (out, complete)
}

/// Per-VIP memory between rounds: who has been beating the current NIC, since when.
#[derive(Debug, Clone, Default)]
pub struct VipMemory {
    pub challenger: Option<(String, Instant)>,
}

/// The outcome of a ranking round for one VIP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Preference order for the binder: the current NIC first unless it lost.
    pub order: Vec<String>,
    /// Why the VIP is where it is, or why it moves.
    pub why: String,
    /// The NIC to move to now (the first of `order`), if the current one lost.
    pub moves_to: Option<String>,
}

/// What the current NIC breaks: configured thresholds, top-K, reachability.
fn broken(cur: &NicScore, best: &NicScore, ranked: &[NicScore], w: &Settings) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(k) = w.top_k {
        if !ranked.iter().take(k).any(|s| s.nic == cur.nic) {
            v.push(format!("not in the top {k}"));
        }
    }
    for p in cur.paths.iter().filter(|p| p.counted) {
        if p.score == PathScore::Unreachable {
            v.push(format!("{} unreachable", p.target));
        }
        if let (Some(max), Some(r)) = (w.max_rtt_ms, p.rtt_ms) {
            if r > max {
                v.push(format!("rtt to {} {r:.1} ms > {max} ms", p.target));
            }
        }
        if let (Some(max), Some(l)) = (w.max_loss_pct, p.loss_pct) {
            if l > max {
                v.push(format!("loss to {} {l:.1}% > {max}%", p.target));
            }
        }
    }
    if cur.reachable < best.reachable {
        v.push(format!("reaches {} target(s), {} reaches {}", cur.reachable, best.nic, best.reachable));
    }
    v
}

fn fmt_cost(s: &NicScore) -> String {
    match s.cost {
        Some(c) => format!("cost {c:.2}, {} target(s)", s.reachable),
        None => format!("no cost, {} target(s)", s.reachable),
    }
}

/// Decides a VIP's preference order from a ranking, applying margin, thresholds and
/// hold-down. `up` says which candidates can carry traffic now.
pub fn decide(
    ranked: &[NicScore],
    complete: bool,
    current: Option<&str>,
    up: &dyn Fn(&str) -> bool,
    memory: &mut VipMemory,
    now: Instant,
    w: &Settings,
) -> Decision {
    let ranked_order: Vec<String> = ranked.iter().map(|s| s.nic.clone()).collect();
    let keep = |why: String| {
        let mut order = ranked_order.clone();
        if let Some(c) = current {
            order.retain(|n| n != c);
            order.insert(0, c.to_string());
        }
        Decision { order, why, moves_to: None }
    };
    let Some(current) = current else {
        memory.challenger = None;
        return Decision { order: ranked_order, why: "not bound yet: best-ranked first".into(), moves_to: None };
    };
    if !complete {
        memory.challenger = None;
        return keep("not every path measured yet: staying".into());
    }
    let (Some(cur), Some(best)) = (ranked.iter().find(|s| s.nic == current), ranked.iter().find(|s| up(&s.nic))) else {
        return keep("no ranked candidate is up".into());
    };
    if best.nic == current {
        memory.challenger = None;
        return keep(format!("{current} ranks best ({})", fmt_cost(cur)));
    }
    let beats = best.reachable > cur.reachable
        || match (best.cost, cur.cost) {
            (Some(b), Some(c)) => c - b > (w.margin * c).max(w.min_gain),
            (Some(_), None) => true,
            _ => false,
        };
    if !beats {
        memory.challenger = None;
        return keep(format!(
            "{current} ({}) stays: {} ({}) is not better by the margin ({:.0}%, at least {})",
            fmt_cost(cur),
            best.nic,
            fmt_cost(best),
            w.margin * 100.0,
            w.min_gain
        ));
    }
    let broken = broken(cur, best, ranked, w);
    let gated = w.top_k.is_some() || w.max_rtt_ms.is_some() || w.max_loss_pct.is_some();
    if gated && broken.is_empty() {
        memory.challenger = None;
        return keep(format!("{current} ({}) stays: within the thresholds and the top-K", fmt_cost(cur)));
    }
    let since = match &memory.challenger {
        Some((n, t)) if *n == best.nic => *t,
        _ => {
            memory.challenger = Some((best.nic.clone(), now));
            now
        }
    };
    let held = now.duration_since(since);
    if held < w.hold_down {
        return keep(format!(
            "{} ({}) has beaten {current} ({}) for {:.1}s of the {:.1}s hold-down",
            best.nic,
            fmt_cost(best),
            fmt_cost(cur),
            held.as_secs_f64(),
            w.hold_down.as_secs_f64()
        ));
    }
    memory.challenger = None;
    let mut why = format!("{} ({}) beat {current} ({}) through the hold-down", best.nic, fmt_cost(best), fmt_cost(cur));
    if !broken.is_empty() {
        why += &format!("; {current}: {}", broken.join(", "));
    }
    let mut order = ranked_order;
    order.retain(|n| *n != best.nic);
    order.insert(0, best.nic.clone());
    Decision { order, why, moves_to: Some(best.nic.clone()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T1: &str = "198.18.50.1";
    const T2: &str = "198.18.50.2";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sample(rtt: f64, loss: f64) -> Sample {
        Sample { rtt_ms: Some(rtt), loss_pct: Some(loss), hops: Some(1), sent: 10, replies: 10 }
    }

    fn samples(v: &[(&str, &str, Sample)]) -> BTreeMap<(String, IpAddr), Sample> {
        v.iter().map(|(n, t, s)| ((n.to_string(), ip(t)), *s)).collect()
    }

    fn nics() -> Vec<String> {
        vec!["a0".into(), "b0".into()]
    }

    #[test]
    fn cost_is_weighted_and_loss_always_hurts() {
        let w = Settings::default();
        let PathScore::Cost(clean) = path_score(Some(&sample(10.0, 0.0)), &w) else { panic!() };
        let PathScore::Cost(lossy) = path_score(Some(&sample(10.0, 5.0)), &w) else { panic!() };
        assert_eq!(clean, 10.0 + 1.0);
        assert!(lossy > clean);
        assert_eq!(path_score(Some(&Sample { sent: 5, ..Default::default() }), &w), PathScore::Unreachable);
        assert_eq!(path_score(None, &w), PathScore::Unknown);
        // Zero RTT and missing fields are fine.
        assert_eq!(path_score(Some(&Sample { sent: 1, replies: 1, ..Default::default() }), &w), PathScore::Cost(0.0));
    }

    #[test]
    fn more_reachable_targets_beat_a_lower_cost_and_dead_targets_are_ignored() {
        let w = Settings::default();
        let dead = Sample { sent: 10, replies: 0, ..Default::default() };
        let s = samples(&[("a0", T1, sample(1.0, 0.0)), ("a0", T2, dead), ("b0", T1, sample(50.0, 0.0)), ("b0", T2, sample(5.0, 0.0))]);
        let (r, complete) = rank(&nics(), &[ip(T1), ip(T2)], &s, &w);
        assert!(complete);
        assert_eq!(r[0].nic, "b0", "b0 reaches both targets: {r:?}");
        // A target nobody reaches is left out: the NICs compare on the others.
        let s = samples(&[("a0", T1, sample(1.0, 0.0)), ("a0", T2, dead), ("b0", T1, sample(50.0, 0.0)), ("b0", T2, dead)]);
        let (r, _) = rank(&nics(), &[ip(T1), ip(T2)], &s, &w);
        assert_eq!((r[0].nic.as_str(), r[0].reachable, r[1].reachable), ("a0", 1, 1));
        assert!(r[0].paths.iter().any(|p| p.target == ip(T2) && !p.counted));
    }

    #[test]
    fn sum_and_mean_combine_targets() {
        let mut w = Settings::default();
        let s = samples(&[("a0", T1, sample(10.0, 0.0)), ("a0", T2, sample(20.0, 0.0))]);
        let (r, _) = rank(&["a0".into()], &[ip(T1), ip(T2)], &s, &w);
        assert_eq!(r[0].cost, Some(16.0));
        w.combine = Combine::Sum;
        let (r, _) = rank(&["a0".into()], &[ip(T1), ip(T2)], &s, &w);
        assert_eq!(r[0].cost, Some(32.0));
    }

    fn run(s: &BTreeMap<(String, IpAddr), Sample>, current: &str, mem: &mut VipMemory, now: Instant, w: &Settings) -> Decision {
        let (r, complete) = rank(&nics(), &[ip(T1)], s, w);
        decide(&r, complete, Some(current), &|_| true, mem, now, w)
    }

    #[test]
    fn a_better_path_wins_only_by_the_margin_and_after_the_hold_down() {
        let w = Settings::default();
        let t0 = Instant::now();
        let mut mem = VipMemory::default();
        // 20 ms vs 0.1 ms: b0 beats a0 by far, but must hold for 3 s.
        let slow_a = samples(&[("a0", T1, sample(20.0, 0.0)), ("b0", T1, sample(0.1, 0.0))]);
        let d = run(&slow_a, "a0", &mut mem, t0, &w);
        assert_eq!((d.moves_to.as_deref(), d.order[0].as_str()), (None, "a0"), "{}", d.why);
        let d = run(&slow_a, "a0", &mut mem, t0 + Duration::from_secs(2), &w);
        assert_eq!(d.moves_to, None, "{}", d.why);
        let d = run(&slow_a, "a0", &mut mem, t0 + Duration::from_secs(3), &w);
        assert_eq!(d.moves_to.as_deref(), Some("b0"), "{}", d.why);
        assert_eq!(d.order[0], "b0");
        // Noise: 1.2 vs 1.0 ms is within the margin: never moves.
        let mut mem = VipMemory::default();
        let noisy = samples(&[("a0", T1, sample(1.2, 0.0)), ("b0", T1, sample(1.0, 0.0))]);
        for s in 0..60 {
            let d = run(&noisy, "a0", &mut mem, t0 + Duration::from_secs(s), &w);
            assert_eq!(d.moves_to, None, "{}", d.why);
        }
        // A challenger that stops beating the current one resets the hold-down.
        let mut mem = VipMemory::default();
        run(&slow_a, "a0", &mut mem, t0, &w);
        run(&noisy, "a0", &mut mem, t0 + Duration::from_secs(2), &w);
        let d = run(&slow_a, "a0", &mut mem, t0 + Duration::from_secs(4), &w);
        assert_eq!(d.moves_to, None, "the hold-down restarted: {}", d.why);
    }

    #[test]
    fn with_thresholds_only_a_broken_current_path_moves() {
        let w = Settings { max_rtt_ms: Some(50.0), hold_down: Duration::ZERO, ..Default::default() };
        let t0 = Instant::now();
        let mut mem = VipMemory::default();
        let a_ok = samples(&[("a0", T1, sample(20.0, 0.0)), ("b0", T1, sample(1.0, 0.0))]);
        assert_eq!(run(&a_ok, "a0", &mut mem, t0, &w).moves_to, None, "20 ms is within the 50 ms threshold");
        let a_bad = samples(&[("a0", T1, sample(80.0, 0.0)), ("b0", T1, sample(1.0, 0.0))]);
        let d = run(&a_bad, "a0", &mut mem, t0, &w);
        assert_eq!(d.moves_to.as_deref(), Some("b0"));
        assert!(d.why.contains("80.0 ms > 50 ms"), "{}", d.why);
    }

    #[test]
    fn without_complete_data_or_a_live_alternative_nothing_moves() {
        let w = Settings { hold_down: Duration::ZERO, ..Default::default() };
        let t0 = Instant::now();
        let partial = samples(&[("a0", T1, sample(20.0, 0.0))]);
        let (r, complete) = rank(&nics(), &[ip(T1)], &partial, &w);
        assert!(!complete);
        assert_eq!(decide(&r, complete, Some("a0"), &|_| true, &mut VipMemory::default(), t0, &w).moves_to, None);
        let slow_a = samples(&[("a0", T1, sample(20.0, 0.0)), ("b0", T1, sample(0.1, 0.0))]);
        let (r, complete) = rank(&nics(), &[ip(T1)], &slow_a, &w);
        let d = decide(&r, complete, Some("a0"), &|n| n != "b0", &mut VipMemory::default(), t0, &w);
        assert_eq!(d.moves_to, None, "b0 is down: {}", d.why);
    }
}
