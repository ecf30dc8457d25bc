//! What this node knows of its peers from their heartbeats, and the promises exchanged
//! with them. Pure: every function takes the time (boot clock, as a `Duration`), so the
//! rules are table-tested without sockets.
//!
//! - *Alive*: heard on some path within `suspect_after`, or holding a planned-restart grace.
//! - *Suspected*: not alive here, and no alive peer reports hearing it within half that:
//!   a node that only this one cannot hear (one-way loss) is not taken over. Nor is anyone
//!   suspected until this node has listened for half the suspicion time since it was last
//!   stalled itself: silence heard across one's own stall (the whole machine paused, say)
//!   says nothing of the peer, whose heartbeats arrive once it runs again.
//! - *Promises*: acknowledging a peer's heartbeat promises not to start serving the VIPs it
//!   listed for `promise` after receiving it; the peer may serve on acknowledgements from all
//!   candidates of a VIP (see `timing`). This node keeps what it promised, so a takeover
//!   waits for it ([`Peers::start_not_before`]).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::Duration,
};

use super::{
    timing::Timing,
    wire::{Ack, Format, Heartbeat, BINARY_LAYOUT},
};

/// Heartbeats of this node remembered for matching acknowledgements (about 1 s at 5 ms).
const SENT_KEPT: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct PathStats {
    pub received: u64,
    /// Sequence numbers skipped on this path (copies lost, or reordered).
    pub lost: u64,
    pub last_seq: u64,
    pub last_heard: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub incarnation: u64,
    pub last_heard: Option<Duration>,
    /// Start of the current stretch of being alive (for the giveback hold-down).
    pub alive_since: Option<Duration>,
    /// A planned restart's grace: alive until then.
    pub restart_hold_until: Duration,
    /// Its latest heartbeat: sequence, when received, whether it announced a restart.
    pub last_seq: u64,
    pub last_seq_at: Duration,
    pub last_restarting: bool,
    /// What it serves, from its latest heartbeat.
    pub serves: BTreeMap<IpAddr, u64>,
    /// Whom it hears: name -> (age reported, when we received the report).
    pub hears: BTreeMap<String, (Duration, Duration)>,
    /// Its latest acknowledgement of our heartbeats: (our seq, promise).
    pub ack: Option<(u64, Duration)>,
    /// What we promised it: no start of a VIP it listed before this.
    pub promised_until: Duration,
    /// Our heartbeat round trip to it, from its latest acknowledgement.
    pub rtt: Option<Duration>,
    /// The binary heartbeat layout its latest heartbeat said it decodes (0: none; see `wire`).
    pub binary_layout: u8,
    pub paths: BTreeMap<String, PathStats>,
}

/// One of our recent heartbeats, kept to match acknowledgements: an acknowledgement
/// promises something only about what the acknowledged heartbeat said.
#[derive(Debug, Clone)]
struct Sent {
    seq: u64,
    at: Duration,
    restarting: bool,
    serves: BTreeSet<IpAddr>,
}

/// Where our heartbeat `seq` is in `sent`, if still remembered. Sequences are consecutive,
/// so its place is known (this runs for every VIP on every heartbeat round).
fn sent_index(sent: &VecDeque<Sent>, seq: u64) -> Option<usize> {
    let i = usize::try_from(seq.checked_sub(sent.front()?.seq)?).ok()?;
    (sent.get(i)?.seq == seq).then_some(i)
}

/// Our heartbeat `seq`, if still remembered.
fn find_sent(sent: &VecDeque<Sent>, seq: u64) -> Option<&Sent> {
    sent.get(sent_index(sent, seq)?)
}

pub struct Peers {
    pub me: String,
    pub incarnation: u64,
    timing: Timing,
    pub peers: BTreeMap<String, PeerState>,
    sent: VecDeque<Sent>,
    next_seq: u64,
    /// When this node last found itself stalled (see [`Peers::note_own_stall`]).
    listening_since: Duration,
}

impl Peers {
    pub fn new(me: &str, incarnation: u64, names: impl IntoIterator<Item = String>, timing: Timing) -> Self {
        Peers {
            me: me.to_string(),
            incarnation,
            timing,
            peers: names.into_iter().map(|n| (n, PeerState::default())).collect(),
            sent: VecDeque::new(),
            next_seq: 1,
            listening_since: Duration::ZERO,
        }
    }

    /// Takes in a received heartbeat. Unknown senders are ignored (the caller logs them).
    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now: Duration) -> bool {
        let Some(p) = self.peers.get_mut(&hb.node) else { return false };
        if hb.incarnation != p.incarnation {
            // A restarted peer: its sequence starts over.
            p.incarnation = hb.incarnation;
            p.last_seq = 0;
            p.paths.clear();
            p.binary_layout = 0;
        }
        let alive_before = p.last_heard.is_some_and(|t| now.saturating_sub(t) < self.timing.suspect_after) || p.restart_hold_until > now;
        if !alive_before {
            p.alive_since = Some(now);
        }
        p.last_heard = Some(now);
        let path = p.paths.entry(hb.path.clone()).or_default();
        if path.last_seq != 0 && hb.seq > path.last_seq + 1 {
            path.lost += hb.seq - path.last_seq - 1;
        }
        if hb.seq > path.last_seq {
            path.last_seq = hb.seq;
        }
        path.received += 1;
        path.last_heard = now;
        if hb.seq <= p.last_seq {
            return true; // the same round on another path, or reordered: state is newer
        }
        p.last_seq = hb.seq;
        p.last_seq_at = now;
        p.last_restarting = hb.restarting;
        p.binary_layout = hb.binary_layout;
        if hb.restarting {
            p.restart_hold_until = p.restart_hold_until.max(now + self.timing.restart_grace);
        } else {
            p.restart_hold_until = Duration::ZERO;
        }
        p.serves = hb.serves.iter().copied().collect();
        p.hears = hb.hears.iter().map(|(n, age)| (n.clone(), (Duration::from_millis(*age as u64), now))).collect();
        p.ack = None;
        for a in &hb.acks {
            if a.node == self.me && a.incarnation == self.incarnation {
                p.ack = Some((a.seq, Duration::from_millis(a.promise_ms as u64)));
                if let Some(sent) = find_sent(&self.sent, a.seq) {
                    p.rtt = Some(now.saturating_sub(sent.at).saturating_sub(Duration::from_micros(a.delay_us as u64)));
                }
            }
        }
        true
    }

    pub fn alive(&self, name: &str, now: Duration) -> bool {
        if name == self.me {
            return true;
        }
        self.peers.get(name).is_some_and(|p| p.last_heard.is_some_and(|t| now.saturating_sub(t) < self.timing.suspect_after) || p.restart_hold_until > now)
    }

    /// This node did not run for a while (a heartbeat round went out late): until it has
    /// listened again for half the suspicion time, the silence it saw suspects nobody.
    pub fn note_own_stall(&mut self, now: Duration) {
        self.listening_since = now;
    }

    /// Not alive here, and no alive peer heard it within half the suspicion time (and this
    /// node has been listening that long since its own last stall).
    pub fn suspected(&self, name: &str, now: Duration) -> bool {
        if self.alive(name, now) || now.saturating_sub(self.listening_since) < self.timing.suspect_after / 2 {
            return false;
        }
        let fresh = self.timing.suspect_after / 2;
        !self.peers.iter().any(|(q, ps)| q != name && self.alive(q, now) && ps.hears.get(name).is_some_and(|(age, at)| *age + now.saturating_sub(*at) < fresh))
    }

    /// How long it has been alive without a break (zero if not alive).
    pub fn alive_for(&self, name: &str, now: Duration) -> Duration {
        match self.peers.get(name) {
            Some(p) if self.alive(name, now) => p.alive_since.map_or(Duration::ZERO, |s| now.saturating_sub(s)),
            _ => Duration::ZERO,
        }
    }

    fn sent(&self, seq: u64) -> Option<&Sent> {
        find_sent(&self.sent, seq)
    }

    /// Until when this node may serve `vip` on acknowledgements alone: every other
    /// candidate acknowledged a heartbeat that listed it, and serves it not itself.
    /// `None` when one of them has not. An acknowledgement of a heartbeat that did not
    /// list the VIP promises nothing about it: the peer only holds back VIPs our latest
    /// heartbeat it received listed.
    pub fn acked_until(&self, vip: IpAddr, candidates: &[String]) -> Option<Duration> {
        let mut until: Option<Duration> = None;
        for c in candidates.iter().filter(|c| **c != self.me) {
            let p = self.peers.get(c)?;
            if p.serves.contains_key(&vip) {
                return None;
            }
            let (seq, promise) = p.ack?;
            let sent = self.sent(seq).filter(|s| s.serves.contains(&vip))?;
            let t = sent.at + self.timing.acked_for(promise);
            until = Some(until.map_or(t, |u| u.min(t)));
        }
        // A VIP with no other candidate has nobody to take it over: acknowledgements are
        // not needed, but neither do they extend anything.
        until
    }

    /// The earliest this node may start serving `vip`: after every promise it gave a peer
    /// that listed the VIP.
    pub fn start_not_before(&self, vip: IpAddr) -> Duration {
        self.peers.values().filter(|p| p.serves.contains_key(&vip)).map(|p| p.promised_until).max().unwrap_or(Duration::ZERO)
    }

    /// Builds this round's heartbeat (one sequence for all paths) and records the promises
    /// its acknowledgements make. `withhold`: peers not acknowledged this round (this node
    /// is taking over one of their VIPs and must let their leases run out).
    pub fn next_heartbeat(&mut self, now: Duration, serves: Vec<(IpAddr, u64)>, restarting: bool, withhold: &BTreeSet<String>) -> Heartbeat {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.push_back(Sent { seq, at: now, restarting, serves: serves.iter().map(|(v, _)| *v).collect() });
        while self.sent.len() > SENT_KEPT {
            self.sent.pop_front();
        }
        let mut acks = Vec::new();
        let mut hears = Vec::new();
        for (name, p) in self.peers.iter_mut() {
            if let Some(t) = p.last_heard {
                hears.push((name.clone(), now.saturating_sub(t).as_millis().min(u32::MAX as u128) as u32));
            }
            // Acknowledge only a fresh heartbeat: an old one's promise would be short anyway,
            // and a silent peer must not keep extending its lease on our word.
            if p.last_seq == 0 || withhold.contains(name) || now.saturating_sub(p.last_seq_at) >= self.timing.suspect_after {
                continue;
            }
            let promise = if p.last_restarting { self.timing.restart_grace } else { self.timing.promise };
            p.promised_until = p.promised_until.max(p.last_seq_at + promise);
            acks.push(Ack {
                node: name.clone(),
                incarnation: p.incarnation,
                seq: p.last_seq,
                delay_us: now.saturating_sub(p.last_seq_at).as_micros().min(u32::MAX as u128) as u32,
                promise_ms: promise.as_millis().min(u32::MAX as u128) as u32,
            });
        }
        Heartbeat {
            node: self.me.clone(),
            incarnation: self.incarnation,
            seq,
            path: String::new(),
            restarting,
            serves,
            hears,
            acks,
            binary_layout: BINARY_LAYOUT,
        }
    }

    /// The latest restarting heartbeat every one of `names` acknowledged, if any: its send time
    /// and the shortest promise given for it.
    pub fn restart_acked(&self, names: &[String]) -> Option<(Duration, Duration)> {
        let mut out: Option<(Duration, Duration)> = None;
        for n in names.iter().filter(|n| **n != self.me) {
            let p = self.peers.get(n)?;
            let (seq, promise) = p.ack?;
            let sent = self.sent(seq).filter(|s| s.restarting)?;
            let at = sent.at;
            out = Some(match out {
                None => (at, promise),
                Some((a, pr)) => (a.min(at), pr.min(promise)),
            });
        }
        out
    }

    /// Narrows what round `seq` listed to `serves` (the VIPs that fit in every copy sent):
    /// an acknowledgement promises only about VIPs the acknowledged datagram carried.
    pub fn listed(&mut self, seq: u64, serves: &[(IpAddr, u64)]) {
        if let Some(i) = sent_index(&self.sent, seq) {
            self.sent[i].serves = serves.iter().map(|(v, _)| *v).collect();
        }
    }

    /// How to encode heartbeats for `name`: binary once its latest heartbeat said it reads
    /// this version's layout, JSON (what every version reads) otherwise.
    pub fn format_for(&self, name: &str) -> Format {
        if self.peers.get(name).is_some_and(|p| p.binary_layout == BINARY_LAYOUT) {
            Format::Binary
        } else {
            Format::Json
        }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Round figures close to the defaults, for tables that reason in whole milliseconds.
    pub(crate) fn timing() -> Timing {
        Timing {
            lease: ms(40),
            clock_error: 0.01,
            promise: ms(40),
            takeover_wait: ms(42),
            confirm_every: ms(10),
            heartbeat_every: ms(5),
            suspect_after: ms(40),
            restart_grace: ms(10_000),
        }
    }

    /// A heartbeat of `node` (incarnation 1, path eth0) with what it serves, hears and acknowledges.
    pub(crate) fn hb(node: &str, seq: u64, serves: &[(&str, u64)], hears: &[(&str, u32)], acks: &[(&str, u64, u64)]) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            incarnation: 1,
            seq,
            path: "eth0".into(),
            restarting: false,
            serves: serves.iter().map(|(v, e)| (v.parse().unwrap(), *e)).collect(),
            hears: hears.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
            acks: acks.iter().map(|(n, inc, s)| Ack { node: n.to_string(), incarnation: *inc, seq: *s, delay_us: 0, promise_ms: 40 }).collect(),
            binary_layout: 0,
        }
    }

    fn peers() -> Peers {
        Peers::new("a", 100, ["b".to_string(), "c".to_string()], timing())
    }

    #[test]
    fn alive_suspected_and_one_way_loss() {
        let mut p = peers();
        p.on_heartbeat(&hb("b", 1, &[], &[], &[]), ms(0));
        p.on_heartbeat(&hb("c", 1, &[], &[("b", 1)], &[]), ms(0));
        assert!(p.alive("b", ms(39)));
        assert!(!p.alive("b", ms(40)));
        // c heard b 5 ms before its report at 44 ms: at 45 ms that is 6 ms ago, fresh.
        p.on_heartbeat(&hb("c", 2, &[], &[("b", 5)], &[]), ms(44));
        assert!(!p.suspected("b", ms(45)));
        // At 60 ms c's report is 21 ms old: b is suspected.
        assert!(p.suspected("b", ms(60)));
    }

    #[test]
    fn silence_across_our_own_stall_suspects_nobody_until_we_listened_again() {
        let mut p = peers();
        p.on_heartbeat(&hb("b", 1, &[], &[], &[]), ms(0));
        assert!(p.suspected("b", ms(45)), "b silent 45 ms while we listened");
        // We ran again at 50 ms after a stall: b's heartbeats may be on their way.
        p.note_own_stall(ms(50));
        assert!(!p.suspected("b", ms(50)));
        assert!(!p.suspected("b", ms(69)));
        assert!(p.suspected("b", ms(70)), "listened 20 ms and still nothing from b");
        // b was only stalled with us: heard again, alive.
        p.on_heartbeat(&hb("b", 2, &[], &[], &[]), ms(55));
        assert!(!p.suspected("b", ms(70)));
    }

    /// Binary heartbeats go only to a peer whose latest heartbeat said it reads them; a
    /// restart (new incarnation) or an older version's heartbeat returns it to JSON.
    #[test]
    fn binary_only_to_peers_that_said_they_read_it() {
        let mut p = peers();
        assert_eq!(p.format_for("b"), Format::Json, "never heard");
        let mut hb1 = hb("b", 1, &[], &[], &[]);
        p.on_heartbeat(&hb1, ms(0));
        assert_eq!(p.format_for("b"), Format::Json, "b did not say it reads binary");
        hb1.seq = 2;
        hb1.binary_layout = BINARY_LAYOUT + 1;
        p.on_heartbeat(&hb1, ms(5));
        assert_eq!(p.format_for("b"), Format::Json, "b reads another layout only");
        hb1.seq = 3;
        hb1.binary_layout = BINARY_LAYOUT;
        p.on_heartbeat(&hb1, ms(6));
        assert_eq!(p.format_for("b"), Format::Binary);
        // b restarted as an older version.
        let old = Heartbeat { incarnation: 2, ..hb("b", 1, &[], &[], &[]) };
        p.on_heartbeat(&old, ms(10));
        assert_eq!(p.format_for("b"), Format::Json);
        assert_eq!(p.format_for("nobody"), Format::Json);
    }

    /// A round's acknowledgement promises only about the VIPs its datagrams carried.
    #[test]
    fn a_round_lists_only_what_fit_in_its_datagrams() {
        let mut p = peers();
        let v1: IpAddr = "198.18.130.1".parse().unwrap();
        let v2: IpAddr = "198.18.130.2".parse().unwrap();
        let round = p.next_heartbeat(ms(0), vec![(v1, 7), (v2, 8)], false, &BTreeSet::new());
        p.listed(round.seq, &[(v1, 7)]);
        p.on_heartbeat(&hb("b", 1, &[], &[], &[("a", 100, round.seq)]), ms(1));
        p.on_heartbeat(&hb("c", 1, &[], &[], &[("a", 100, round.seq)]), ms(1));
        let all = ["a".to_string(), "b".to_string(), "c".to_string()];
        assert!(p.acked_until(v1, &all).is_some());
        assert_eq!(p.acked_until(v2, &all), None, "v2 did not fit: nobody promised anything about it");
    }

    #[test]
    fn third_party_hearing_prevents_suspicion() {
        let mut p = peers();
        p.on_heartbeat(&hb("b", 1, &[], &[], &[]), ms(0));
        // We lose b's heartbeats (one-way loss b -> a) while c keeps hearing b.
        p.on_heartbeat(&hb("c", 9, &[], &[("b", 3)], &[]), ms(60));
        assert!(!p.alive("b", ms(61)));
        assert!(!p.suspected("b", ms(61)), "c heard b 4 ms ago");
        // c stops hearing b too: now b is suspected.
        p.on_heartbeat(&hb("c", 10, &[], &[("b", 30)], &[]), ms(65));
        assert!(p.suspected("b", ms(66)));
        // A dead witness does not count.
        let mut q = peers();
        q.on_heartbeat(&hb("c", 1, &[], &[("b", 0)], &[]), ms(0));
        assert!(q.suspected("b", ms(41)), "b never heard here, c dead");
    }

    #[test]
    fn acknowledgements_extend_only_with_every_candidate() {
        let mut p = peers();
        let cands: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let vip: IpAddr = "198.18.130.1".parse().unwrap();
        let h = p.next_heartbeat(ms(100), vec![(vip, 7)], false, &BTreeSet::new());
        assert_eq!(h.seq, 1);
        p.on_heartbeat(&hb("b", 1, &[], &[], &[("a", 100, 1)]), ms(102));
        assert_eq!(p.acked_until(vip, &cands), None, "c has not acknowledged");
        p.on_heartbeat(&hb("c", 1, &[], &[], &[("a", 100, 1)]), ms(103));
        assert_eq!(p.acked_until(vip, &cands), Some(ms(100) + timing().acked_for(ms(40))));
        // Only the candidates count: a VIP of a and b alone needs b only.
        assert!(p.acked_until(vip, &cands[..2]).is_some());
        // An acknowledgement of an earlier run does not count.
        p.on_heartbeat(&hb("c", 2, &[], &[], &[("a", 99, 1)]), ms(104));
        assert_eq!(p.acked_until(vip, &cands), None);
        // Nor one of a heartbeat that did not list the VIP.
        let other: IpAddr = "198.18.130.2".parse().unwrap();
        p.on_heartbeat(&hb("c", 3, &[], &[], &[("a", 100, 1)]), ms(104));
        assert_eq!(p.acked_until(other, &cands), None, "heartbeat 1 listed only {vip}");
        let h = p.next_heartbeat(ms(110), vec![(vip, 7), (other, 8)], false, &BTreeSet::new());
        p.on_heartbeat(&hb("b", 2, &[], &[], &[("a", 100, h.seq)]), ms(111));
        p.on_heartbeat(&hb("c", 4, &[], &[], &[("a", 100, h.seq)]), ms(111));
        assert_eq!(p.acked_until(other, &cands), Some(ms(110) + timing().acked_for(ms(40))));
        // Nor one from a peer that serves the VIP itself.
        p.on_heartbeat(&hb("c", 5, &[("198.18.130.1", 9)], &[], &[("a", 100, 2)]), ms(112));
        assert_eq!(p.acked_until(vip, &cands), None);
    }

    #[test]
    fn promises_given_delay_a_start_and_withholding_stops_them() {
        let mut p = peers();
        let vip: IpAddr = "198.18.130.1".parse().unwrap();
        p.on_heartbeat(&hb("b", 1, &[("198.18.130.1", 3)], &[], &[]), ms(10));
        let h = p.next_heartbeat(ms(12), vec![], false, &BTreeSet::new());
        assert_eq!(h.acks.len(), 1);
        assert_eq!(p.start_not_before(vip), ms(50));
        // While taking over, b is not acknowledged: the promise does not grow.
        p.on_heartbeat(&hb("b", 2, &[("198.18.130.1", 3)], &[], &[]), ms(20));
        let h = p.next_heartbeat(ms(21), vec![], false, &BTreeSet::from(["b".to_string()]));
        assert!(h.acks.is_empty());
        assert_eq!(p.start_not_before(vip), ms(50));
        // A stale heartbeat is not acknowledged either.
        let h = p.next_heartbeat(ms(61), vec![], false, &BTreeSet::new());
        assert!(h.acks.is_empty());
    }

    #[test]
    fn planned_restart_holds_a_peer_alive_and_promises_the_grace() {
        let mut p = peers();
        let mut r = hb("b", 1, &[("198.18.130.1", 3)], &[], &[]);
        r.restarting = true;
        p.on_heartbeat(&r, ms(10));
        assert!(p.alive("b", ms(5_000)));
        assert!(!p.suspected("b", ms(5_000)));
        let h = p.next_heartbeat(ms(11), vec![], false, &BTreeSet::new());
        assert_eq!(h.acks[0].promise_ms, 10_000);
        assert!(!p.alive("b", ms(10_011)));
    }
}
