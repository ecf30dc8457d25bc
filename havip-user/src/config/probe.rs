//! `[probe]` as validated: how often each kind of path is probed and when a run of lost
//! probes makes it dark. The decisions on each probe are `node::path_watch`.

use std::time::Duration;

/// How paths are probed (the `[probe]` settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watch {
    /// Paths that matter to no bound VIP (free pool VIPs' paths).
    pub idle_interval: Duration,
    /// Paths of the candidate NICs of bound VIPs with targets.
    pub active_interval: Duration,
    /// Paths in doubt.
    pub doubt_interval: Duration,
    /// The shortest time a probe is waited for.
    pub timeout_floor: Duration,
    /// Probes lost in a row that fail a path.
    pub fail_after: u32,
    /// False for UDP probes: Linux targets rate-limit their ICMP port-unreachable to about
    /// one a second, so a path cannot be probed faster to settle a doubt.
    pub fast: bool,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            idle_interval: Duration::from_millis(1000),
            active_interval: Duration::from_millis(20),
            doubt_interval: Duration::from_millis(5),
            timeout_floor: Duration::from_millis(10),
            fail_after: 4,
            fast: true,
        }
    }
}
