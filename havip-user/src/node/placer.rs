//! Where every VIP should be, as one pure function: link states, the quality ranking's
//! decisions and the operator's pins in, the moves to make out. The binder decides one VIP
//! from its preference order; the placer builds that order (measured quality, when there
//! is a decision, instead of the file's order), runs the binder for each VIP and says why
//! each move happens. The mover carries the moves out.
//!
//! Cluster ownership will be one more input here: a VIP this node does not own gets no
//! NIC, whatever its links say.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::node::{
    binder::{decide, LinkState, Placement, Reason},
    rank::Decision,
};

/// What the placer needs to know about one VIP.
#[derive(Debug, Clone, Copy)]
pub struct VipView<'a> {
    pub vip: IpAddr,
    /// The VIP's dataplane id (its slot in the maps).
    pub id: u32,
    /// Candidate NICs in the configured order.
    pub candidates: &'a [String],
    /// The latest quality ranking of the candidates, if the VIP has targets and was ranked.
    pub quality: Option<&'a Decision>,
    /// The operator's pin, if any.
    pub pinned: Option<&'a str>,
    /// The NIC that owns the VIP now (`None`: no NIC, or one havipd no longer knows).
    pub current: Option<&'a str>,
}

/// A move the placer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub vip: IpAddr,
    pub id: u32,
    /// The NIC that owns the VIP now, if any.
    pub from: Option<String>,
    pub to: String,
    pub reason: Reason,
    /// For a quality move: the ranking's explanation.
    pub why: Option<String>,
}

/// The moves that bring every VIP in `vips` to where it belongs now. `hold_down` is the
/// failback hold-down: a more preferred NIC takes a VIP back only after being stable up
/// for that long.
pub fn moves(vips: &[VipView<'_>], links: &BTreeMap<String, LinkState>, now: Instant, hold_down: Duration) -> Vec<Move> {
    let mut out = Vec::new();
    for v in vips {
        // Path quality, once measured, orders the candidates instead of the file.
        let order = v.quality.map(|d| d.order.as_slice()).unwrap_or(v.candidates);
        let placement = Placement { candidates: order, pinned: v.pinned, current: v.current };
        // A dark path is a failure, not a preference: the binder sees the current NIC as
        // down for this VIP, so it fails over at once instead of waiting for a failback.
        let dark = v.quality.filter(|d| d.dark.is_some() && d.dark.as_deref() == v.current);
        let dark_links;
        let links_here = match (dark, v.current) {
            (Some(_), Some(cur)) => {
                let mut l = links.clone();
                if let Some(s) = l.get_mut(cur) {
                    s.up = false;
                }
                dark_links = l;
                &dark_links
            }
            _ => links,
        };
        let Some((to, mut reason)) = decide(placement, links_here, now, hold_down) else {
            continue;
        };
        let mut why = None;
        if let (Some(d), Reason::LinkDown) = (dark, reason) {
            reason = Reason::PathDark;
            why = Some(d.why.clone());
        }
        // A failback the ranking asked for is a quality move: say so, with its evidence.
        if reason == Reason::Failback {
            if let Some(d) = v.quality.filter(|d| d.moves_to.as_deref() == Some(to.as_str())) {
                reason = Reason::Quality;
                why = Some(d.why.clone());
            }
        }
        out.push(Move { vip: v.vip, id: v.id, from: v.current.map(str::to_string), to, reason, why });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(now: Instant, states: &[(&str, bool, u64)]) -> BTreeMap<String, LinkState> {
        states.iter().map(|(n, up, secs_ago)| (n.to_string(), LinkState { up: *up, since: now - Duration::from_secs(*secs_ago) })).collect()
    }

    fn nics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const HOLD: Duration = Duration::from_secs(3);

    #[test]
    fn table() {
        let now = Instant::now() + Duration::from_secs(100);
        let ab = nics(&["a0", "b0"]);
        let quality_b = Decision { order: nics(&["b0", "a0"]), why: "b0 beats a0 by 40%".into(), moves_to: Some("b0".into()), dark: None };
        let quality_keep = Decision { order: nics(&["a0", "b0"]), why: "a0 stays".into(), moves_to: None, dark: None };
        struct Case<'a> {
            name: &'a str,
            links: &'a [(&'a str, bool, u64)],
            current: Option<&'a str>,
            pinned: Option<&'a str>,
            quality: Option<&'a Decision>,
            want: Option<(&'a str, Reason)>,
        }
        let cases = [
            Case {
                name: "unbound VIP goes to the first up NIC",
                links: &[("a0", true, 10), ("b0", true, 10)],
                current: None,
                pinned: None,
                quality: None,
                want: Some(("a0", Reason::Initial)),
            },
            Case {
                name: "owner down: fail over at once",
                links: &[("a0", false, 0), ("b0", true, 0)],
                current: Some("a0"),
                pinned: None,
                quality: None,
                want: Some(("b0", Reason::LinkDown)),
            },
            Case {
                name: "preferred back but not stable: stay",
                links: &[("a0", true, 1), ("b0", true, 10)],
                current: Some("b0"),
                pinned: None,
                quality: None,
                want: None,
            },
            Case {
                name: "preferred stable: fail back",
                links: &[("a0", true, 5), ("b0", true, 10)],
                current: Some("b0"),
                pinned: None,
                quality: None,
                want: Some(("a0", Reason::Failback)),
            },
            Case {
                name: "ranking prefers b0: a quality move with its reason",
                links: &[("a0", true, 10), ("b0", true, 10)],
                current: Some("a0"),
                pinned: None,
                quality: Some(&quality_b),
                want: Some(("b0", Reason::Quality)),
            },
            Case {
                name: "ranking keeps a0: no move",
                links: &[("a0", true, 10), ("b0", true, 10)],
                current: Some("a0"),
                pinned: None,
                quality: Some(&quality_keep),
                want: None,
            },
            Case {
                name: "pin beats the ranking",
                links: &[("a0", true, 10), ("b0", true, 10)],
                current: Some("a0"),
                pinned: Some("a0"),
                quality: Some(&quality_b),
                want: None,
            },
            Case {
                name: "current NIC unknown (removed): move",
                links: &[("a0", true, 10), ("b0", true, 10)],
                current: Some("c0"),
                pinned: None,
                quality: None,
                want: Some(("a0", Reason::NotCandidate)),
            },
            Case { name: "nothing up: stay", links: &[("a0", false, 10), ("b0", false, 10)], current: Some("a0"), pinned: None, quality: None, want: None },
        ];
        for c in cases {
            let l = links(now, c.links);
            let view = VipView { vip: "198.18.0.10".parse().unwrap(), id: 3, candidates: &ab, quality: c.quality, pinned: c.pinned, current: c.current };
            let got = moves(&[view], &l, now, HOLD);
            let got = got.first().map(|m| (m.to.as_str(), m.reason));
            assert_eq!(got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn a_quality_move_carries_the_rankings_explanation() {
        let now = Instant::now() + Duration::from_secs(100);
        let ab = nics(&["a0", "b0"]);
        let d = Decision { order: nics(&["b0", "a0"]), why: "b0 beats a0 by 40%".into(), moves_to: Some("b0".into()), dark: None };
        let view = VipView { vip: "198.18.0.10".parse().unwrap(), id: 3, candidates: &ab, quality: Some(&d), pinned: None, current: Some("a0") };
        let m = moves(&[view], &links(now, &[("a0", true, 10), ("b0", true, 10)]), now, HOLD);
        assert_eq!(m, vec![Move { vip: view.vip, id: 3, from: Some("a0".into()), to: "b0".into(), reason: Reason::Quality, why: Some(d.why.clone()) }]);
    }

    #[test]
    fn a_dark_path_fails_over_at_once_even_to_a_nic_up_for_less_than_the_hold_down() {
        let now = Instant::now() + Duration::from_secs(100);
        let ab = nics(&["a0", "b0"]);
        let d = Decision { order: nics(&["b0", "a0"]), why: "a0: every path dark".into(), moves_to: Some("b0".into()), dark: Some("a0".into()) };
        let view = VipView { vip: "198.18.0.10".parse().unwrap(), id: 3, candidates: &ab, quality: Some(&d), pinned: None, current: Some("a0") };
        // b0 came up 1 s ago: a failback would wait for the hold-down; a dark path does not.
        let m = moves(&[view], &links(now, &[("a0", true, 10), ("b0", true, 1)]), now, HOLD);
        assert_eq!(m, vec![Move { vip: view.vip, id: 3, from: Some("a0".into()), to: "b0".into(), reason: Reason::PathDark, why: Some(d.why.clone()) }]);
        let quality = Decision { dark: None, ..d.clone() };
        let view = VipView { quality: Some(&quality), ..view };
        assert!(moves(&[view], &links(now, &[("a0", true, 10), ("b0", true, 1)]), now, HOLD).is_empty(), "a preference waits for the hold-down");
        // Once on b0, the decision made for a0 moves nothing back.
        let view = VipView { quality: Some(&d), current: Some("b0"), ..view };
        assert!(moves(&[view], &links(now, &[("a0", true, 10), ("b0", true, 1)]), now, HOLD).is_empty());
    }
}
