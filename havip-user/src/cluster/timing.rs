//! The timing bound that keeps two nodes from ever serving one VIP, derived from the
//! configured lease `L`, heartbeat interval and clock-rate error `r` (every node's clock
//! runs at a rate within `[1 - r, 1 + r]` of real time).
//!
//! - The owner sets serve-until := `t_sent + L` after a confirmation sent at `t_sent` (its
//!   clock): it serves at most `L / (1 - r)` real time after sending it.
//! - A successor that won the record's transaction (committed after every confirmation the
//!   old owner could hold was sent) waits `W` on its own clock, at least `W / (1 + r)`
//!   real time. `W >= L (1 + r) / (1 - r) + m` makes that longer than the old owner's
//!   longest lease, with `m` = [`MARGIN`] + [`IN_FLIGHT`]: the time between reading a clock
//!   and the kernel comparing with it, and the time a reply the old owner's kernel sent
//!   just before its deadline can still spend in queues on its way to the wire.
//! - A peer's acknowledgement of heartbeat `s` promises "I will not start serving the VIPs
//!   you listed before `t_recv + P`" on the peer's clock. The owner, which sent `s` at
//!   `t_sent < t_recv`, may serve until `t_sent + P (1 - r) / (1 + r) - m` on its clock:
//!   at most `P / (1 + r) - m` real time after sending, while the promise lasts at least
//!   `P / (1 + r)` real time after receiving.
//! - A planned handover: the giver closes its fence before writing the record over, and
//!   the receiver starts [`IN_FLIGHT`] after it reads the write.

use std::time::Duration;

use crate::config::cluster::Cluster;

/// Time between reading a clock and the kernel comparing a deadline with its own reading.
pub const MARGIN: Duration = Duration::from_millis(1);

/// How long a frame the kernel sent may still be on its way to the wire: an ARP reply the
/// old owner's XDP program sent a moment before its fence closed sits in its NIC's queue
/// (on veth, in the peer's backlog until a softirq runs) while the successor starts. The
/// client must not receive it after the successor's announcement. On a loaded 2-vCPU host
/// a softirq can wait milliseconds for ksoftirqd; 4 ms costs 4 ms of every failover.
pub const IN_FLIGHT: Duration = Duration::from_millis(4);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// `L`: what one etcd confirmation is worth.
    pub lease: Duration,
    /// `r`, as a fraction.
    pub clock_error: f64,
    /// `P`: what one acknowledged heartbeat promises (the lease: an owner cut from etcd
    /// serves on acknowledgements exactly as long as on confirmations).
    pub promise: Duration,
    /// `W`: how long a successor waits after winning before it answers.
    pub takeover_wait: Duration,
    /// How often the owner confirms: `L / 4`, so three confirmations may fail or be late
    /// before the lease lapses.
    pub confirm_every: Duration,
    pub heartbeat_every: Duration,
    /// A peer silent this long on every path is suspected.
    pub suspect_after: Duration,
    /// What a planned-restart acknowledgement promises.
    pub restart_grace: Duration,
}

impl Timing {
    pub fn new(c: &Cluster) -> Self {
        let r = c.clock_error;
        let lease = c.lease;
        Timing {
            lease,
            clock_error: r,
            promise: lease,
            takeover_wait: scale(lease, (1.0 + r) / (1.0 - r)) + MARGIN + IN_FLIGHT,
            confirm_every: lease / 4,
            heartbeat_every: c.heartbeat_interval,
            suspect_after: c.heartbeat_interval * c.heartbeat_misses,
            restart_grace: c.restart_grace,
        }
    }

    /// How long after sending an acknowledged heartbeat the owner may serve, for a promise
    /// of `promise` (see the module doc); zero if the margin eats it.
    pub fn acked_for(&self, promise: Duration) -> Duration {
        let r = self.clock_error;
        scale(promise, (1.0 - r) / (1.0 + r)).saturating_sub(MARGIN + IN_FLIGHT)
    }

    /// The expected gap of a node failover: detection, then the wait (the transaction and
    /// the announcement add a few ms).
    pub fn expected_failover(&self) -> Duration {
        self.suspect_after + self.takeover_wait
    }
}

/// `d * f`, rounded up to the next microsecond (waits are rounded up, leases down by the
/// callers' margins: both err on the safe side).
fn scale(d: Duration, f: f64) -> Duration {
    Duration::from_micros((d.as_micros() as f64 * f).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(lease_ms: u64, ppm: u32) -> Timing {
        let mut c = crate::config::Config::parse(
            &format!("[[nic]]\nname = \"a0\"\n[cluster]\nnode = \"a\"\netcd_endpoints = [\"http://198.18.0.1:2379\"]\nheartbeat_interval_ms = 1\nlease_ms = {lease_ms}\nclock_error_ppm = {ppm}\n"),
            "t",
        )
        .unwrap()
        .cluster
        .unwrap();
        c.clock_error = ppm as f64 / 1e6;
        Timing::new(&c)
    }

    /// The bound holds at the extremes of clock rates: the old owner's clock slow by r
    /// (its lease lasts longest in real time), the successor's fast by r (its wait is
    /// shortest).
    #[test]
    fn successor_waits_longer_than_any_lease_in_real_time() {
        for (lease, ppm) in [(40, 10_000), (40, 0), (10, 100_000), (60_000, 10_000), (500, 50_000)] {
            let t = timing(lease, ppm);
            let r = t.clock_error;
            let longest_lease_real = t.lease.as_secs_f64() / (1.0 - r);
            let shortest_wait_real = t.takeover_wait.as_secs_f64() / (1.0 + r);
            assert!(shortest_wait_real > longest_lease_real, "L={lease} ms r={ppm} ppm: wait {shortest_wait_real} <= lease {longest_lease_real}");
            // ...by the margins, and not wastefully more: within them plus rounding.
            let margins = (MARGIN + IN_FLIGHT).as_secs_f64();
            assert!(
                shortest_wait_real - longest_lease_real >= margins * (1.0 - r) - 2e-6,
                "L={lease} r={ppm}: wait {shortest_wait_real} lease {longest_lease_real}"
            );
            assert!(shortest_wait_real - longest_lease_real < margins + 1e-4 + 2e-6, "L={lease} r={ppm}: wait {shortest_wait_real} lease {longest_lease_real}");
        }
    }

    #[test]
    fn acknowledged_serving_ends_before_the_promise_in_real_time() {
        for (lease, ppm) in [(40, 10_000), (40, 0), (10, 100_000)] {
            let t = timing(lease, ppm);
            let r = t.clock_error;
            // Owner clock slow (serves longest), peer clock fast (promise shortest).
            let serve_real = t.acked_for(t.promise).as_secs_f64() / (1.0 - r);
            let promise_real = t.promise.as_secs_f64() / (1.0 + r);
            // ...with its last frames delivered too.
            let delivered_real = serve_real + IN_FLIGHT.as_secs_f64();
            assert!(delivered_real < promise_real, "L={lease} r={ppm}: serve {serve_real} + in flight >= promise {promise_real}");
        }
    }

    #[test]
    fn defaults_give_the_documented_figures() {
        let c = crate::config::Config::parse("[[nic]]\nname = \"a0\"\n[cluster]\nnode = \"a\"\netcd_endpoints = [\"http://198.18.0.1:2379\"]\n", "t").unwrap();
        let t = Timing::new(&c.cluster.unwrap());
        assert_eq!(t.takeover_wait, Duration::from_micros(45_809));
        assert_eq!(t.confirm_every, Duration::from_millis(10));
        assert_eq!(t.suspect_after, Duration::from_millis(40));
        assert_eq!(t.acked_for(t.promise), Duration::from_micros(34_208));
    }
}
