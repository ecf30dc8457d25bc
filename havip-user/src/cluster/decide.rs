//! Who should own each VIP, decided from its etcd record, this node's part in it and what
//! the heartbeats say of the peers. Pure, table-tested; the service carries the actions out
//! (every one through a revision-compared transaction, so a wrong guess here can lose a
//! race but never make two owners).

use std::{net::IpAddr, time::Duration};

use super::{peers::Peers, record::VipRecord};

/// This node's part in a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Not serving it.
    Idle,
    /// Won it from another owner: silent until `not_before` (boot clock), then confirms
    /// and serves.
    Starting { epoch: u64, not_before: Duration },
    /// Serving it at `epoch`.
    Serving { epoch: u64 },
}

/// Every reason an ownership change is made for (the records and the metrics name them):
/// `initial` (first claim of an unowned VIP), `owner-silent` (takeover), `giveback` (a
/// planned handover to a recovered preferred node).
pub const CHANGE_REASONS: [&str; 3] = ["initial", "owner-silent", "giveback"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the record with this node as owner, if its revision is still `expected`
    /// (`None`: the record does not exist yet).
    Claim { expected: Option<u64>, from: Option<String>, reason: &'static str },
    /// Planned move: stop answering, then write the record for `to` (giveback).
    Handover { epoch: u64, to: String },
    /// The record names this node and nobody else can serve without changing it: confirm
    /// and serve, at once or (`wait`) after the old owner's longest lease. A record that
    /// this node finds naming it as the winner of a takeover it did not see complete (its
    /// write failed, but committed) must wait like any takeover: the old owner may still
    /// hold a lease from a read sent just before the commit.
    Start { epoch: u64, wait: bool },
    /// The record names another node: stop answering now.
    Stop { owner: String },
}

pub struct Inputs<'a> {
    pub vip: IpAddr,
    /// Candidates from this node's configuration (used for a record not created yet).
    pub configured: &'a [String],
    /// `configured` is the managing node's placement (a granted VIP, ordered by the
    /// ledger, the same on every node): the owner gives the VIP to its first candidate
    /// rather than by the record's creation-time order. This is how rebalancing moves VIPs.
    pub placed: bool,
    pub record: Option<(&'a VipRecord, u64)>,
    pub local: Local,
    /// The record's owner rewrote its sign of life in etcd recently: it is alive, only cut
    /// from (some of) its peers.
    pub owner_alive_in_etcd: bool,
    /// How long this node has served the VIP at the record's epoch (zero if it does not).
    pub serving_for: Duration,
}

pub struct Settings {
    pub giveback_hold_down: Duration,
    /// This node has listened for at least the suspicion time since it started: it knows
    /// which peers are alive, so silence means something.
    pub settled: bool,
    /// Send time of the etcd read the records come from (`None`: none yet). A claim needs
    /// a fresh one: a node cut off from etcd would otherwise claim on an old view, and its
    /// write would land when it reconnects, before it hears its peers again.
    pub view_sent_at: Option<Duration>,
}

/// Whether the view is recent enough to claim on: sent within half the suspicion time,
/// and, for a takeover from `owner`, sent at least three quarters of the suspicion time
/// after `owner` was last heard. A live owner cut from its peers starts rewriting its sign
/// of life a quarter of that time into the silence, so such a read shows it.
fn fresh_for_claim(peers: &Peers, owner: Option<&str>, now: Duration, s: &Settings) -> bool {
    let d = peers.timing().suspect_after;
    let Some(sent) = s.view_sent_at else { return false };
    let last_heard = owner.and_then(|o| peers.peers.get(o)).and_then(|p| p.last_heard);
    now.saturating_sub(sent) <= d / 2 && last_heard.is_none_or(|h| sent >= h + d * 3 / 4)
}

/// Why a decision was taken, for the one-line log of every automatic decision.
pub fn decide(i: &Inputs, peers: &Peers, now: Duration, s: &Settings) -> Option<Action> {
    let me = peers.me.as_str();
    let Some((rec, epoch)) = i.record else {
        if !s.settled || i.local != Local::Idle {
            return None;
        }
        let first = i.configured.iter().find(|c| peers.alive(c, now))?;
        return (first == me && fresh_for_claim(peers, None, now, s)).then_some(Action::Claim { expected: None, from: None, reason: "initial" });
    };
    if rec.owner == me {
        match i.local {
            Local::Idle => {
                let takeover = !rec.handover && rec.from.as_deref().is_some_and(|f| f != me);
                return Some(Action::Start { epoch, wait: takeover });
            }
            Local::Serving { epoch: e } if e != epoch => return Some(Action::Start { epoch, wait: false }),
            Local::Starting { .. } => return None,
            Local::Serving { .. } => {}
        }
        if !s.settled {
            return None;
        }
        // Giveback: the most preferred candidate ahead of this node that has been alive
        // for the whole hold-down.
        let order = if i.placed { i.configured } else { &rec.candidates };
        // The node that just handed the VIP here put this node first by its view of the
        // ledger; if this node's view still shows the older order, it lags (a watch is
        // milliseconds behind) and handing back would bounce the VIP. The managing node
        // moves a VIP at most once per its hold-down, so waiting one here loses nothing.
        let just_handed_by = rec.handover.then_some(rec.from.as_deref()).flatten().filter(|_| i.serving_for < s.giveback_hold_down);
        for c in order.iter().take_while(|c| *c != me).filter(|c| Some(c.as_str()) != just_handed_by) {
            if peers.alive_for(c, now) >= s.giveback_hold_down && peers.alive(c, now) {
                return Some(Action::Handover { epoch, to: c.clone() });
            }
        }
        return None;
    }
    match i.local {
        Local::Idle => {}
        // A record older than the epoch we won or serve is a stale view, not a loss.
        Local::Starting { epoch: mine, .. } | Local::Serving { epoch: mine } if epoch < mine => return None,
        _ => return Some(Action::Stop { owner: rec.owner.clone() }),
    }
    if !s.settled {
        return None;
    }
    let owner_gone = if peers.peers.contains_key(&rec.owner) { peers.suspected(&rec.owner, now) && !i.owner_alive_in_etcd } else { true };
    if !owner_gone {
        return None;
    }
    let successor = rec.candidates.iter().filter(|c| **c != rec.owner).find(|c| peers.alive(c, now))?;
    (successor == me && fresh_for_claim(peers, Some(&rec.owner), now, s)).then(|| Action::Claim {
        expected: Some(epoch),
        from: Some(rec.owner.clone()),
        reason: "owner-silent",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::peers::tests::hb;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn peers(me: &str, alive: &[(&str, u64)], now: u64) -> Peers {
        let t = crate::cluster::peers::tests::timing();
        let names = ["a", "b", "c"].iter().filter(|n| **n != me).map(|n| n.to_string());
        let mut p = Peers::new(me, 1, names, t);
        // Each alive peer has been heard every 10 ms since `since` ms, up to now.
        for (n, since) in alive {
            for at in (*since..=now).step_by(10) {
                p.on_heartbeat(&hb(n, at + 1, &[], &[], &[]), ms(at));
            }
        }
        p
    }

    fn rec(owner: &str) -> VipRecord {
        VipRecord { owner: owner.into(), candidates: vec!["a".into(), "b".into(), "c".into()], handover: false, from: None, reason: "t".into(), at_unix_ms: 0 }
    }

    /// A record naming `a` as the winner of a takeover from `from`.
    fn won_from(from: &str) -> VipRecord {
        VipRecord { from: Some(from.into()), reason: "owner-silent".into(), ..rec("a") }
    }

    fn run(me: &str, alive: &[(&str, u64)], record: Option<&VipRecord>, local: Local, settled: bool) -> Option<Action> {
        run_with(me, alive, record, local, settled, false)
    }

    fn run_with(me: &str, alive: &[(&str, u64)], record: Option<&VipRecord>, local: Local, settled: bool, owner_alive_in_etcd: bool) -> Option<Action> {
        run_full(me, alive, record, local, settled, owner_alive_in_etcd, Some(ms(100_000)))
    }

    fn run_full(
        me: &str,
        alive: &[(&str, u64)],
        record: Option<&VipRecord>,
        local: Local,
        settled: bool,
        owner_alive_in_etcd: bool,
        view_sent_at: Option<Duration>,
    ) -> Option<Action> {
        let now = 100_000;
        let p = peers(me, alive, now);
        let configured: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let i = Inputs {
            vip: "198.18.130.1".parse().unwrap(),
            configured: &configured,
            placed: false,
            record: record.map(|r| (r, 7)),
            local,
            owner_alive_in_etcd,
            serving_for: ms(0),
        };
        decide(&i, &p, ms(now), &Settings { giveback_hold_down: ms(30_000), settled, view_sent_at })
    }

    #[test]
    fn table() {
        let all_old = [("a", 0), ("b", 0), ("c", 0)];
        let serving = Local::Serving { epoch: 7 };
        let claim_initial = Some(Action::Claim { expected: None, from: None, reason: "initial" });
        let takeover_from = |o: &str| Some(Action::Claim { expected: Some(7), from: Some(o.into()), reason: "owner-silent" });
        let cases: Vec<(&str, &str, &[(&str, u64)], Option<VipRecord>, Local, bool, Option<Action>)> = vec![
            ("no record: the most preferred alive candidate creates it", "a", &all_old, None, Local::Idle, true, claim_initial.clone()),
            ("no record: not the most preferred", "b", &all_old, None, Local::Idle, true, None),
            ("no record: the preferred one is dead", "b", &[("c", 0)], None, Local::Idle, true, claim_initial.clone()),
            ("no record: not settled yet, wait", "a", &all_old, None, Local::Idle, false, None),
            ("owner me, idle (restart): start at once", "a", &all_old, Some(rec("a")), Local::Idle, false, Some(Action::Start { epoch: 7, wait: false })),
            (
                "owner me by a takeover I did not see complete: wait",
                "a",
                &all_old,
                Some(won_from("b")),
                Local::Idle,
                true,
                Some(Action::Start { epoch: 7, wait: true }),
            ),
            (
                "owner me by a handover: start at once",
                "a",
                &all_old,
                Some(VipRecord { handover: true, ..won_from("b") }),
                Local::Idle,
                true,
                Some(Action::Start { epoch: 7, wait: false }),
            ),
            ("owner me, serving: nothing", "a", &all_old, Some(rec("a")), serving, true, None),
            ("owner other, alive: nothing", "b", &all_old, Some(rec("a")), Local::Idle, true, None),
            ("owner dead: first successor takes over", "b", &[("c", 0)], Some(rec("a")), Local::Idle, true, takeover_from("a")),
            ("owner dead: second successor waits for the first", "c", &[("b", 0)], Some(rec("a")), Local::Idle, true, None),
            ("owner and first successor dead", "c", &[], Some(rec("a")), Local::Idle, true, takeover_from("a")),
            ("owner dead but not settled", "b", &[("c", 0)], Some(rec("a")), Local::Idle, false, None),
            ("record moved away while serving: stop", "a", &all_old, Some(rec("b")), serving, true, Some(Action::Stop { owner: "b".into() })),
            ("an older record than the epoch we serve is stale", "a", &all_old, Some(rec("b")), Local::Serving { epoch: 9 }, true, None),
            ("...or the epoch we won", "a", &all_old, Some(rec("b")), Local::Starting { epoch: 9, not_before: ms(0) }, true, None),
            ("giveback after the hold-down", "b", &all_old, Some(rec("b")), serving, true, Some(Action::Handover { epoch: 7, to: "a".into() })),
            ("no giveback before the hold-down", "b", &[("a", 90_000), ("c", 0)], Some(rec("b")), serving, true, None),
            ("the most preferred never gives back", "a", &all_old, Some(rec("a")), serving, true, None),
            ("record of an unknown node: taken over", "a", &all_old, Some(rec("zz")), Local::Idle, true, takeover_from("zz")),
        ];
        for (name, me, alive, record, local, settled, want) in cases {
            assert_eq!(run(me, alive, record.as_ref(), local, settled), want, "{name}");
        }
    }

    /// A granted VIP the managing node moved: the owner follows the ledger's order (its
    /// first candidate), not the record's creation-time order; an unplaced VIP does not.
    #[test]
    fn a_placed_vip_is_handed_to_the_first_of_the_ledgers_order() {
        let p = peers("a", &[("a", 0), ("b", 0), ("c", 0)], 100_000);
        let moved: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        let r = rec("a");
        let s = Settings { giveback_hold_down: ms(30_000), settled: true, view_sent_at: Some(ms(100_000)) };
        let go = |placed: bool, configured: &[String]| {
            let i = Inputs {
                vip: "198.18.130.1".parse().unwrap(),
                configured,
                placed,
                record: Some((&r, 7)),
                local: Local::Serving { epoch: 7 },
                owner_alive_in_etcd: false,
                serving_for: ms(0),
            };
            decide(&i, &p, ms(100_000), &s)
        };
        assert_eq!(go(true, &moved), Some(Action::Handover { epoch: 7, to: "c".into() }));
        assert_eq!(go(false, &moved), None, "a configured VIP keeps the record's order");
        // The target must have been alive for the hold-down.
        let young = peers("a", &[("a", 0), ("b", 0), ("c", 90_000)], 100_000);
        let i = Inputs {
            vip: "198.18.130.1".parse().unwrap(),
            configured: &moved,
            placed: true,
            record: Some((&r, 7)),
            local: Local::Serving { epoch: 7 },
            owner_alive_in_etcd: false,
            serving_for: ms(0),
        };
        assert_eq!(decide(&i, &young, ms(100_000), &s), None);
    }

    /// The managing node moved a VIP from a to c: a saw the new ledger order first and
    /// handed over. c's view still shows the old order (a first): c must not hand it
    /// straight back (a bounce) until it has served it for the hold-down; a third node
    /// ahead of it in that order still gets it.
    #[test]
    fn a_handed_over_vip_is_not_handed_back_to_its_giver_on_a_lagging_ledger_view() {
        let p = peers("c", &[("a", 0), ("b", 0), ("c", 0)], 100_000);
        let stale: Vec<String> = ["a", "c", "b"].iter().map(|s| s.to_string()).collect();
        let handed =
            VipRecord { handover: true, from: Some("a".into()), reason: "giveback".into(), candidates: vec!["c".into(), "a".into(), "b".into()], ..rec("c") };
        let s = Settings { giveback_hold_down: ms(30_000), settled: true, view_sent_at: Some(ms(100_000)) };
        let go = |configured: &[String], record: &VipRecord, serving_for: u64| {
            let i = Inputs {
                vip: "198.18.130.1".parse().unwrap(),
                configured,
                placed: true,
                record: Some((record, 7)),
                local: Local::Serving { epoch: 7 },
                owner_alive_in_etcd: false,
                serving_for: ms(serving_for),
            };
            decide(&i, &p, ms(100_000), &s)
        };
        assert_eq!(go(&stale, &handed, 10), None, "handed straight back to a");
        assert_eq!(go(&stale, &handed, 30_000), Some(Action::Handover { epoch: 7, to: "a".into() }), "after the hold-down the ledger's order holds again");
        let b_first: Vec<String> = ["b", "a", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(go(&b_first, &handed, 10), Some(Action::Handover { epoch: 7, to: "b".into() }), "only the giver waits");
        // A takeover record (not a handover) is followed at once, as before.
        let taken = VipRecord { from: Some("a".into()), reason: "owner-silent".into(), ..rec("c") };
        assert_eq!(go(&stale, &taken, 10), Some(Action::Handover { epoch: 7, to: "a".into() }));
    }

    #[test]
    fn claims_need_a_fresh_view_read_well_into_the_owners_silence() {
        let takeover = Some(Action::Claim { expected: Some(7), from: Some("a".into()), reason: "owner-silent" });
        let b_takes = |view: Option<u64>| run_full("b", &[("c", 0)], Some(&rec("a")), Local::Idle, true, false, view.map(ms));
        assert_eq!(b_takes(Some(100_000)), takeover);
        assert_eq!(b_takes(Some(99_980)), takeover, "20 ms old: fresh (half the suspicion time)");
        assert_eq!(b_takes(Some(99_970)), None, "30 ms old: stale");
        assert_eq!(b_takes(None), None, "etcd never read");
        // a was heard last at 99_950 (heartbeats every 10 ms from 0 until then, so silent 50 ms):
        // the view must be sent at >= 99_950 + 30 ms.
        let from_a = |view: u64| {
            let now = 100_000;
            let mut p = peers("b", &[("c", 0)], now);
            p.on_heartbeat(&hb("a", 1, &[], &[], &[]), ms(99_950));
            let configured: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
            let r = rec("a");
            let i = Inputs {
                vip: "198.18.130.1".parse().unwrap(),
                configured: &configured,
                placed: false,
                record: Some((&r, 7)),
                local: Local::Idle,
                owner_alive_in_etcd: false,
                serving_for: ms(0),
            };
            decide(&i, &p, ms(now), &Settings { giveback_hold_down: ms(30_000), settled: true, view_sent_at: Some(ms(view)) })
        };
        assert_eq!(from_a(99_990), takeover);
        assert_eq!(from_a(99_980), takeover);
        assert_eq!(from_a(99_979), None, "sent before a's sign of life could show");
        // The initial claim needs a fresh view too.
        assert_eq!(run_full("a", &[("a", 0), ("b", 0), ("c", 0)], None, Local::Idle, true, false, Some(ms(99_900))), None);
    }

    #[test]
    fn an_owner_silent_on_heartbeats_but_alive_in_etcd_keeps_its_vip() {
        // Cut from its peers, not dead: no takeover (the other side of a split would take
        // it back the same way, and they would fight over it).
        assert_eq!(run_with("b", &[("c", 0)], Some(&rec("a")), Local::Idle, true, true), None);
        assert_eq!(
            run_with("b", &[("c", 0)], Some(&rec("a")), Local::Idle, true, false),
            Some(Action::Claim { expected: Some(7), from: Some("a".into()), reason: "owner-silent" })
        );
        // It only holds back takeovers: the owner itself still serves, a loser still stops.
        assert_eq!(run_with("a", &[], Some(&rec("a")), Local::Idle, true, true), Some(Action::Start { epoch: 7, wait: false }));
        assert_eq!(run_with("a", &[], Some(&rec("b")), Local::Serving { epoch: 7 }, true, true), Some(Action::Stop { owner: "b".into() }));
    }
}
