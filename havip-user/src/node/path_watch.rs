//! What each probe of a path says, probe by probe: the fast half of path quality. Pure:
//! probe outcomes in, a verdict and the next probe's time out; table-tested without a
//! kernel. The prober sends and reads the kernel's counters; `rank` acts on the verdicts.
//!
//! - **One probe in flight per path.** A probe is lost when no reply came by its deadline
//!   (`max(timeout floor, 3 x smoothed RTT)`); a reply is its own, so its RTT is exact.
//! - **Doubt.** A lost probe puts the path in doubt: it is probed every `doubt_interval`
//!   instead of its usual interval until the doubt is settled (a lossy path, until the
//!   test calls it clean again). Probing fast only where it
//!   matters keeps the probe traffic of healthy paths low.
//! - **Failed.** `fail_after` probes lost in a row: the path is dark although its link may
//!   keep carrier (an upstream port, optic or router dropping everything). `rank` moves a
//!   VIP off a NIC whose paths to every target failed while another NIC still reaches
//!   them, at once, as for a link down.
//! - **Lossy.** A sequential probability ratio test (Wald) between "loss <= `LOSS_OK`" and
//!   "loss >= `LOSS_BAD`" runs over the probes of a doubt; it ends the doubt as clean or
//!   as lossy, with the error rates below. A burst of 3 losses in a row is not enough
//!   evidence for either; random loss under `LOSS_OK` ends clean.
//! - **RTT spread.** A running variance of the per-probe RTTs, so `rank` can tell a
//!   difference between two paths from their noise.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Loss the test accepts as clean, and the loss it calls lossy (fractions).
pub const LOSS_OK: f64 = 0.01;
pub const LOSS_BAD: f64 = 0.05;
/// The test's error rates: calling a clean path lossy (a move on noise), and a lossy path
/// clean (its next lost probe starts a new test, so a miss costs time, not the verdict).
const FALSE_LOSSY: f64 = 1e-5;
const FALSE_CLEAN: f64 = 0.2;
/// Weight of a new RTT sample in the running mean and variance.
const RTT_WEIGHT: f64 = 1.0 / 16.0;

pub use crate::config::probe::Watch as Settings;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// No probe answered yet, or the last doubt ended clean.
    Clean,
    /// A probe was lost; probing fast until the test decides.
    Doubt,
    /// The test found loss of `LOSS_BAD` or more: `loss_pct` is what the doubt measured.
    Lossy { loss_pct: f64 },
    /// `lost` probes in a row lost.
    Failed { lost: u32 },
}

/// What became of one probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered; `late` more replies came with it, answers to earlier probes already given
    /// up on (a slow moment, not a loss: they are taken back).
    Reply {
        rtt: Duration,
        late: u64,
    },
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct InFlight {
    sent_at: Instant,
    /// The kernel's reply counter when it was sent.
    received_before: u64,
}

/// One path's probing state.
#[derive(Debug, Clone, PartialEq)]
pub struct PathWatch {
    in_flight: Option<InFlight>,
    last_sent: Option<Instant>,
    pub verdict: Verdict,
    /// Probes lost in a row.
    pub lost_in_row: u32,
    /// The test's log-likelihood ratio (lossy : clean) over the current doubt.
    llr: f64,
    /// Probes and losses of the current doubt.
    doubt_probes: u32,
    doubt_lost: u32,
    /// Running mean and variance of the per-probe RTT, ms.
    rtt_mean_ms: Option<f64>,
    rtt_var_ms2: f64,
    pub replies: u64,
    pub lost: u64,
}

impl Default for PathWatch {
    fn default() -> Self {
        PathWatch {
            in_flight: None,
            last_sent: None,
            verdict: Verdict::Clean,
            lost_in_row: 0,
            llr: 0.0,
            doubt_probes: 0,
            doubt_lost: 0,
            rtt_mean_ms: None,
            rtt_var_ms2: 0.0,
            replies: 0,
            lost: 0,
        }
    }
}

impl PathWatch {
    /// How long a probe sent now is waited for: three smoothed RTTs, or the mean plus
    /// four deviations as TCP's retransmission timer, and at least the floor.
    pub fn timeout(&self, s: &Settings) -> Duration {
        let rtt = self.rtt_mean_ms.map_or(Duration::ZERO, |m| Duration::from_secs_f64((3.0 * m).max(m + 4.0 * self.rtt_var_ms2.sqrt()) / 1e3));
        rtt.max(s.timeout_floor)
    }

    /// Whether a probe is due now (none in flight, and its interval has passed).
    pub fn due(&self, now: Instant, active: bool, s: &Settings) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let every = match self.verdict {
            // A lossy path stays under test too: fast, so a healed one is called clean in
            // a second or two (300-odd answered probes), not half a minute at 20 ms.
            Verdict::Doubt | Verdict::Failed { .. } | Verdict::Lossy { .. } if s.fast => s.doubt_interval,
            _ if active => s.active_interval,
            _ => s.idle_interval,
        };
        self.last_sent.is_none_or(|t| now.saturating_duration_since(t) >= every)
    }

    /// The probe due now could not be sent (no socket, a send error): try again after
    /// the interval, with nothing in flight.
    pub fn skipped(&mut self, now: Instant) {
        self.last_sent = Some(now);
    }

    pub fn sent(&mut self, now: Instant, received_before: u64) {
        self.in_flight = Some(InFlight { sent_at: now, received_before });
        self.last_sent = Some(now);
    }

    /// The probe in flight, if its deadline has passed or the kernel counted a reply: its
    /// outcome, given the kernel's reply counter and last RTT now.
    pub fn check(&self, now: Instant, received: u64, last_rtt: Duration, s: &Settings) -> Option<Outcome> {
        let f = self.in_flight?;
        if received > f.received_before {
            return Some(Outcome::Reply { rtt: last_rtt, late: received - f.received_before - 1 });
        }
        (now.saturating_duration_since(f.sent_at) >= self.timeout(s)).then_some(Outcome::Lost)
    }

    /// Whether a probe is in flight (its outcome still to be checked).
    pub fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Takes a probe's outcome; returns the new verdict if it changed.
    pub fn record(&mut self, o: Outcome, s: &Settings) -> Option<Verdict> {
        self.in_flight = None;
        let before = self.verdict;
        let testing = matches!(self.verdict, Verdict::Doubt | Verdict::Failed { .. } | Verdict::Lossy { .. });
        match o {
            Outcome::Reply { rtt, late } => {
                // Replies to probes given up on: take those losses back, latest first.
                let back = late.min(u64::from(self.doubt_lost)).min(self.lost);
                if back > 0 && testing {
                    self.llr -= back as f64 * ((LOSS_BAD / LOSS_OK).ln() - ((1.0 - LOSS_BAD) / (1.0 - LOSS_OK)).ln());
                    self.doubt_lost -= back as u32;
                }
                self.lost -= back;
                self.replies += 1 + back;
                self.lost_in_row = 0;
                let ms = rtt.as_secs_f64() * 1e3;
                match self.rtt_mean_ms {
                    None => self.rtt_mean_ms = Some(ms),
                    Some(m) => {
                        let d = ms - m;
                        self.rtt_mean_ms = Some(m + RTT_WEIGHT * d);
                        self.rtt_var_ms2 = (1.0 - RTT_WEIGHT) * (self.rtt_var_ms2 + RTT_WEIGHT * d * d);
                    }
                }
                if testing {
                    self.llr += ((1.0 - LOSS_BAD) / (1.0 - LOSS_OK)).ln();
                    self.doubt_probes += 1;
                }
            }
            Outcome::Lost => {
                self.lost += 1;
                self.lost_in_row += 1;
                if !testing {
                    self.verdict = Verdict::Doubt;
                    self.llr = 0.0;
                    self.doubt_probes = 0;
                    self.doubt_lost = 0;
                }
                self.llr += (LOSS_BAD / LOSS_OK).ln();
                self.doubt_probes += 1;
                self.doubt_lost += 1;
            }
        }
        if self.verdict != Verdict::Clean {
            self.verdict = if self.lost_in_row >= s.fail_after {
                Verdict::Failed { lost: self.lost_in_row }
            } else if self.llr >= ((1.0 - FALSE_CLEAN) / FALSE_LOSSY).ln() {
                // Lossy stays until the test says clean again; the measured loss follows.
                self.llr = self.llr.min(((1.0 - FALSE_CLEAN) / FALSE_LOSSY).ln() + 2.0);
                Verdict::Lossy { loss_pct: 100.0 * self.doubt_lost as f64 / self.doubt_probes.max(1) as f64 }
            } else if self.llr <= (FALSE_CLEAN / (1.0 - FALSE_LOSSY)).ln() {
                Verdict::Clean
            } else if matches!(self.verdict, Verdict::Lossy { .. }) {
                Verdict::Lossy { loss_pct: 100.0 * self.doubt_lost as f64 / self.doubt_probes.max(1) as f64 }
            } else {
                Verdict::Doubt
            };
        }
        (std::mem::discriminant(&self.verdict) != std::mem::discriminant(&before)).then_some(self.verdict)
    }

    /// Mean and standard deviation of the per-probe RTT, ms.
    pub fn rtt_ms(&self) -> Option<(f64, f64)> {
        self.rtt_mean_ms.map(|m| (m, self.rtt_var_ms2.sqrt()))
    }

    pub fn failed(&self) -> bool {
        matches!(self.verdict, Verdict::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(outcomes: &str) -> (PathWatch, Vec<Verdict>) {
        let s = Settings::default();
        let mut w = PathWatch::default();
        let mut changes = Vec::new();
        for c in outcomes.chars() {
            let o = if c == 'x' { Outcome::Lost } else { Outcome::Reply { rtt: Duration::from_millis(1), late: 0 } };
            if let Some(v) = w.record(o, &s) {
                changes.push(v);
            }
        }
        (w, changes)
    }

    #[test]
    fn four_in_a_row_fail_a_path_and_one_reply_starts_the_doubt_over() {
        let (w, ch) = run("....xxxx");
        assert_eq!(w.verdict, Verdict::Failed { lost: 4 });
        assert_eq!(ch, vec![Verdict::Doubt, Verdict::Failed { lost: 4 }]);
        let (w, _) = run("....xxxx.");
        assert_eq!(w.verdict, Verdict::Doubt, "a reply after a failure: in doubt, not clean");
    }

    #[test]
    fn a_burst_of_three_neither_fails_nor_calls_the_path_lossy() {
        let (w, ch) = run(&format!("....xxx{}", ".".repeat(200)));
        assert_eq!(w.verdict, Verdict::Clean, "{ch:?}");
        assert_eq!(ch, vec![Verdict::Doubt, Verdict::Clean]);
    }

    #[test]
    fn ten_percent_loss_is_called_lossy_within_a_hundred_probes() {
        // One probe in ten lost, from the first loss on.
        let pattern: String = (0..200).map(|i| if i % 10 == 0 { 'x' } else { '.' }).collect();
        let s = Settings::default();
        let mut w = PathWatch::default();
        let mut at = None;
        for (i, c) in pattern.chars().enumerate() {
            let o = if c == 'x' { Outcome::Lost } else { Outcome::Reply { rtt: Duration::from_millis(1), late: 0 } };
            if let Some(Verdict::Lossy { .. }) = w.record(o, &s) {
                at = Some(i);
                break;
            }
        }
        let at = at.expect("never called lossy");
        assert!(at < 100, "called lossy only after {at} probes");
        let Verdict::Lossy { loss_pct } = w.verdict else { panic!() };
        assert!((8.0..=15.0).contains(&loss_pct), "{loss_pct}");
    }

    #[test]
    fn one_percent_loss_ends_each_doubt_clean() {
        let pattern: String = (0..5000).map(|i| if i % 100 == 7 { 'x' } else { '.' }).collect();
        let (w, ch) = run(&pattern);
        assert!(!ch.iter().any(|v| matches!(v, Verdict::Lossy { .. } | Verdict::Failed { .. })), "{ch:?}");
        assert_eq!(w.verdict, Verdict::Clean);
    }

    #[test]
    fn a_lossy_path_that_heals_is_called_clean_again() {
        let lossy: String = (0..100).map(|i| if i % 5 == 0 { 'x' } else { '.' }).collect();
        let (w, ch) = run(&format!("{lossy}{}", ".".repeat(400)));
        assert!(ch.iter().any(|v| matches!(v, Verdict::Lossy { .. })), "{ch:?}");
        assert_eq!(w.verdict, Verdict::Clean, "{ch:?}");
    }

    #[test]
    fn probes_in_doubt_go_faster_and_one_at_a_time() {
        let s = Settings::default();
        let t0 = Instant::now();
        let ms = |v: u64| t0 + Duration::from_millis(v);
        let mut w = PathWatch::default();
        assert!(w.due(t0, true, &s));
        w.sent(t0, 0);
        assert!(!w.due(ms(50), true, &s), "one in flight");
        assert_eq!(w.check(ms(5), 0, Duration::ZERO, &s), None, "not yet overdue");
        assert_eq!(w.check(ms(10), 0, Duration::ZERO, &s), Some(Outcome::Lost));
        w.record(Outcome::Lost, &s);
        assert!(w.due(ms(10), true, &s), "in doubt: 5 ms after the last send");
        w.sent(ms(10), 0);
        assert_eq!(w.check(ms(11), 1, Duration::from_micros(300), &s), Some(Outcome::Reply { rtt: Duration::from_micros(300), late: 0 }));
        w.record(Outcome::Reply { rtt: Duration::from_micros(300), late: 0 }, &s);
        assert!(!w.due(ms(14), true, &s) && w.due(ms(15), true, &s));
        // Clean again: back to the active interval; idle paths wait longer.
        let mut clean = PathWatch::default();
        clean.sent(t0, 0);
        clean.record(Outcome::Reply { rtt: Duration::from_millis(1), late: 0 }, &s);
        assert!(!clean.due(ms(19), true, &s) && clean.due(ms(20), true, &s));
        assert!(!clean.due(ms(999), false, &s) && clean.due(ms(1000), false, &s));
        // A lossy path is still tested fast, so a healed one is soon called clean.
        let lossy: String = (0..100).map(|i| if i % 5 == 0 { 'x' } else { '.' }).collect();
        let (mut l, _) = run(&lossy);
        assert!(matches!(l.verdict, Verdict::Lossy { .. }));
        l.sent(ms(0), 0);
        l.record(Outcome::Reply { rtt: Duration::from_millis(1), late: 0 }, &s);
        assert!(l.due(ms(5), true, &s), "a lossy path waits the doubt interval, not the active one");
        // UDP probes never go faster.
        let slow = Settings { fast: false, ..s };
        assert!(!w.due(ms(15), false, &slow));
    }

    #[test]
    fn late_replies_take_their_losses_back() {
        // A stall: three probes given up on, then one reply brings the three late ones.
        let s = Settings::default();
        let mut w = PathWatch::default();
        let reply = |late| Outcome::Reply { rtt: Duration::from_millis(1), late };
        for _ in 0..20 {
            w.record(reply(0), &s);
        }
        for _ in 0..3 {
            w.record(Outcome::Lost, &s);
        }
        assert_eq!((w.verdict, w.lost), (Verdict::Doubt, 3));
        w.record(reply(3), &s);
        assert_eq!((w.lost, w.replies, w.doubt_lost), (0, 24, 0));
        // The test is back where 4 answered probes leave it: far from lossy, soon clean.
        assert!(w.llr < 0.0, "{}", w.llr);
        // A stall under a real 10% loss still ends lossy: only answered probes come back.
        let pattern: String = (0..300).map(|i| if i % 10 == 0 { 'x' } else { '.' }).collect();
        let (w, _) = run(&pattern);
        assert!(matches!(w.verdict, Verdict::Lossy { .. }), "{:?}", w.verdict);
    }

    #[test]
    fn the_timeout_follows_the_rtt() {
        let s = Settings::default();
        let mut w = PathWatch::default();
        assert_eq!(w.timeout(&s), Duration::from_millis(10));
        w.record(Outcome::Reply { rtt: Duration::from_millis(20), late: 0 }, &s);
        assert_eq!(w.timeout(&s), Duration::from_millis(60));
        let (m, sd) = w.rtt_ms().unwrap();
        assert_eq!((m, sd), (20.0, 0.0));
        // A spread-out RTT waits longer than three means: mean + 4 deviations.
        let mut jittery = PathWatch::default();
        for ms in [1, 9, 1, 9, 1, 9, 1, 9] {
            jittery.record(Outcome::Reply { rtt: Duration::from_millis(ms), late: 0 }, &s);
        }
        let (m, sd) = jittery.rtt_ms().unwrap();
        assert!(jittery.timeout(&s) > Duration::from_secs_f64((3.0 * m) / 1e3), "mean {m} sd {sd}: {:?}", jittery.timeout(&s));
    }
}
