//! `havip explain VIP`: why a VIP is where it is, as text. Pure: the node gathers the
//! inputs, this formats them.

use std::collections::BTreeMap;

use crate::{
    config::{ranking::Settings, Vip},
    node::{binder::LinkState, path_watch::Verdict, quality::Quality, rank::PathScore},
};

/// What `explain` shows about one VIP.
pub struct Inputs<'a> {
    pub vip: &'a Vip,
    pub current: Option<&'a str>,
    pub moves: u64,
    pub pinned: Option<&'a str>,
    pub links: &'a BTreeMap<String, LinkState>,
    pub weights: &'a Settings,
    pub quality: Option<&'a Quality>,
}

pub fn render(i: &Inputs<'_>) -> String {
    let v = i.vip;
    let mut out = format!(
        "{} is on {} ({} move(s)){}\ncandidates: {}; links: {}\n",
        v.address,
        i.current.unwrap_or("no NIC"),
        i.moves,
        i.pinned.map(|p| format!(", pinned to {p}")).unwrap_or_default(),
        v.nics.join(", "),
        v.nics.iter().map(|n| format!("{n} {}", if i.links.get(n).is_some_and(|l| l.up) { "up" } else { "down" })).collect::<Vec<_>>().join(", ")
    );
    if v.targets.is_empty() {
        out += "no targets configured: placed by link state and the configured order only\n";
        return out.trim_end().to_string();
    }
    let w = i.weights;
    out += &format!(
        "cost = {}*rtt_ms + {}*loss_pct + {}*hops, {:?} over targets; allowance: margin {:.0}% (at least {}) + 3 sd of noise; evidence {:.2}s; dark or lossy paths move at once\n",
        w.weight_latency,
        w.weight_loss,
        w.weight_hops,
        w.combine,
        w.margin * 100.0,
        w.min_gain,
        w.evidence.as_secs_f64()
    );
    let Some(q) = i.quality else {
        out += "not ranked yet\n";
        return out.trim_end().to_string();
    };
    for s in &q.ranked {
        out += &format!(
            "  {:<8} reaches {}/{} target(s), cost {} (noise sd {:.2})\n",
            s.nic,
            s.reachable,
            v.targets.len(),
            s.cost.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            s.noise
        );
        for p in &s.paths {
            let score = match p.score {
                PathScore::Cost(c) => format!("cost {c:.2}"),
                PathScore::Unreachable => "UNREACHABLE".into(),
                PathScore::Unknown => "not measured yet".into(),
            };
            out += &format!(
                "    -> {:<20} rtt {} ms, loss {}%: {score}{}{}\n",
                p.target,
                p.rtt_ms.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
                p.loss_pct.map(|l| format!("{l:.1}")).unwrap_or_else(|| "-".into()),
                match p.verdict {
                    Some(Verdict::Failed { lost }) => format!(" DARK ({lost} probes lost in a row)"),
                    Some(Verdict::Lossy { loss_pct }) => format!(" LOSSY ({loss_pct:.1}% by the loss test)"),
                    Some(Verdict::Doubt) => " (in doubt: probing fast)".into(),
                    _ => String::new(),
                },
                if p.counted { "" } else { " (no candidate reaches it: ignored)" }
            );
        }
    }
    if let Some(d) = &q.decision {
        out += &format!("decision: {}\n", d.why);
    }
    out.trim_end().to_string()
}
