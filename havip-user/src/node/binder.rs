//! Which NIC owns each VIP. Pure decisions from link states, the VIP's candidates, its
//! current NIC and an operator's pin; the daemon applies them (one map write plus
//! gratuitous ARP / unsolicited NA from the new NIC).
//!
//! The rules:
//! - Preference order is the operator's pin (if any), then the configured candidates.
//! - Failover is immediate: when the owning NIC is down (or gone, or no longer a
//!   candidate), the VIP moves to the most preferred NIC that is up.
//! - Failback waits: a more preferred NIC takes the VIP back only once it has been up,
//!   without a change, for the hold-down time, so a flapping link does not flap the VIP.
//! - With no candidate up, the VIP stays where it is (nothing better exists).

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

/// What the link watcher knows about a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up with carrier.
    pub up: bool,
    /// When `up` last changed (or when havipd started watching).
    pub since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The VIP had no NIC yet.
    Initial,
    /// Its NIC went down or away.
    LinkDown,
    /// Its NIC is no longer a candidate (reload) .
    NotCandidate,
    /// A more preferred NIC has been stable for the hold-down time.
    Failback,
    /// An operator bound it.
    Operator,
    /// Another candidate's measured path quality beat it (see `rank`).
    Quality,
    /// Its paths to every target went dark with the link up (probes lost in a row) while
    /// another candidate still reached them: moved at once, as on a link down.
    PathDark,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Initial => "initial",
            Reason::LinkDown => "link_down",
            Reason::NotCandidate => "not_candidate",
            Reason::Failback => "failback",
            Reason::Operator => "operator",
            Reason::Quality => "quality",
            Reason::PathDark => "path_dark",
        })
    }
}

/// The inputs for one VIP.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    /// Configured candidates, most preferred first.
    pub candidates: &'a [String],
    /// The operator's choice, if any (always a candidate; checked when it was made).
    pub pinned: Option<&'a str>,
    /// The NIC that owns the VIP now.
    pub current: Option<&'a str>,
}

impl Placement<'_> {
    fn preference(&self) -> impl Iterator<Item = &str> {
        self.pinned.into_iter().chain(self.candidates.iter().map(String::as_str).filter(move |c| Some(*c) != self.pinned))
    }
}

/// Where the VIP should move, and why; `None` to stay.
pub fn decide(p: Placement<'_>, links: &BTreeMap<String, LinkState>, now: Instant, hold_down: Duration) -> Option<(String, Reason)> {
    let up = |n: &str| links.get(n).is_some_and(|l| l.up);
    let stable = |n: &str| links.get(n).is_some_and(|l| l.up && now.duration_since(l.since) >= hold_down);
    let first_up = || p.preference().find(|n| up(n)).map(str::to_string);
    let Some(current) = p.current else {
        return first_up().map(|n| (n, Reason::Initial));
    };
    if !p.candidates.iter().any(|c| c == current) {
        return first_up().map(|n| (n, Reason::NotCandidate));
    }
    if !up(current) {
        return first_up().map(|n| (n, Reason::LinkDown));
    }
    // Current is up: only a more preferred, stable NIC takes the VIP.
    for n in p.preference() {
        if n == current {
            return None;
        }
        if stable(n) {
            return Some((n.to_string(), Reason::Failback));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(5);

    fn links(t0: Instant, states: &[(&str, bool, u64)]) -> BTreeMap<String, LinkState> {
        states.iter().map(|&(n, up, ago)| (n.to_string(), LinkState { up, since: t0 - Duration::from_secs(ago) })).collect()
    }

    fn cands() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn initial_binding_takes_the_most_preferred_up_nic() {
        let now = Instant::now() + Duration::from_secs(100);
        let c = cands();
        let p = Placement { candidates: &c, pinned: None, current: None };
        assert_eq!(decide(p, &links(now, &[("a", false, 0), ("b", true, 0), ("c", true, 0)]), now, HOLD), Some(("b".into(), Reason::Initial)));
        assert_eq!(decide(p, &links(now, &[("a", false, 0), ("b", false, 0)]), now, HOLD), None);
    }

    #[test]
    fn failover_is_immediate_and_failback_waits_for_hold_down() {
        let now = Instant::now() + Duration::from_secs(100);
        let c = cands();
        let on = |cur| Placement { candidates: &c, pinned: None, current: Some(cur) };
        // a down: move to b at once, even if b only just came up.
        assert_eq!(decide(on("a"), &links(now, &[("a", false, 0), ("b", true, 0)]), now, HOLD), Some(("b".into(), Reason::LinkDown)));
        // a back for 2 s: stay on b.
        assert_eq!(decide(on("b"), &links(now, &[("a", true, 2), ("b", true, 50)]), now, HOLD), None);
        // a back for 5 s: fail back.
        assert_eq!(decide(on("b"), &links(now, &[("a", true, 5), ("b", true, 50)]), now, HOLD), Some(("a".into(), Reason::Failback)));
        // On the most preferred NIC: stay.
        assert_eq!(decide(on("a"), &links(now, &[("a", true, 0), ("b", true, 50)]), now, HOLD), None);
    }

    #[test]
    fn a_flapping_link_never_takes_the_vip_back() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let c = cands();
        let mut l = links(t0, &[("a", true, 0), ("b", true, 100)]);
        let mut current = "a".to_string();
        // a goes down and up every 100 ms, 20 times.
        for i in 0..40u64 {
            let now = t0 + Duration::from_millis(100 * i);
            l.get_mut("a").unwrap().up = i % 2 == 1;
            l.get_mut("a").unwrap().since = now;
            if let Some((n, _)) = decide(Placement { candidates: &c, pinned: None, current: Some(&current) }, &l, now, HOLD) {
                current = n;
            }
            if i > 0 {
                assert_eq!(current, "b", "step {i}");
            }
        }
        // Once a has been up for the hold-down, the VIP returns: one owner at the end.
        let later = t0 + Duration::from_millis(3900) + HOLD;
        assert_eq!(decide(Placement { candidates: &c, pinned: None, current: Some("b") }, &l, later, HOLD), Some(("a".into(), Reason::Failback)));
    }

    #[test]
    fn an_operator_pin_comes_first_but_never_keeps_a_vip_on_a_dead_nic() {
        let now = Instant::now() + Duration::from_secs(100);
        let c = cands();
        let pinned = |cur| Placement { candidates: &c, pinned: Some("c"), current: Some(cur) };
        assert_eq!(decide(pinned("c"), &links(now, &[("a", true, 100), ("c", true, 100)]), now, HOLD), None);
        assert_eq!(decide(pinned("c"), &links(now, &[("a", true, 100), ("c", false, 0)]), now, HOLD), Some(("a".into(), Reason::LinkDown)));
        // The pinned NIC comes back and is stable: it wins over the configured order.
        assert_eq!(decide(pinned("a"), &links(now, &[("a", true, 100), ("c", true, 10)]), now, HOLD), Some(("c".into(), Reason::Failback)));
    }

    #[test]
    fn a_nic_dropped_from_the_candidates_gives_the_vip_up() {
        let now = Instant::now() + Duration::from_secs(100);
        let c = vec!["b".to_string()];
        let p = Placement { candidates: &c, pinned: None, current: Some("a") };
        assert_eq!(decide(p, &links(now, &[("a", true, 100), ("b", true, 100)]), now, HOLD), Some(("b".into(), Reason::NotCandidate)));
    }
}
