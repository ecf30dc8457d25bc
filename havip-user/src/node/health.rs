//! The controller's own health (rebinds by reason, config applies), kept by havipd and read
//! by the metrics exporter. The kernel's counters are read from the maps, not from here.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::{cluster::status::Status as ClusterStatus, node::binder::Reason};

/// Every binder reason, so each rebind series exists from the start (a series that
/// appears only on its first increment hides that increment from `increase()`).
const REASONS: [Reason; 7] = [Reason::Initial, Reason::LinkDown, Reason::NotCandidate, Reason::Failback, Reason::Operator, Reason::Quality, Reason::PathDark];

/// Fails to compile when a reason is added without being listed in `REASONS`.
const _: fn(Reason) = |r| match r {
    Reason::Initial | Reason::LinkDown | Reason::NotCandidate | Reason::Failback | Reason::Operator | Reason::Quality | Reason::PathDark => (),
};

/// The controller's own health, kept by havipd (the kernel knows nothing of it).
#[derive(Debug)]
pub struct DaemonMetrics {
    pub started: SystemTime,
    health: Mutex<Health>,
    /// The cluster service's status, when the node runs in cluster mode.
    cluster: Mutex<Option<Arc<Mutex<ClusterStatus>>>>,
}

#[derive(Debug, Default, Clone)]
pub struct Health {
    /// Rebinds by reason since this havipd started.
    pub rebinds: BTreeMap<String, u64>,
    /// (succeeded, when) of the last apply (start or reload).
    pub last_apply: Option<(bool, SystemTime)>,
    /// The state file's apply generation (bumped by every attempt, kept across restarts).
    pub generation: u64,
    pub applies_ok: u64,
    pub applies_failed: u64,
}

impl DaemonMetrics {
    pub fn new() -> Arc<Self> {
        let rebinds = REASONS.iter().map(|r| (r.to_string(), 0)).collect();
        Arc::new(Self { started: SystemTime::now(), health: Mutex::new(Health { rebinds, ..Health::default() }), cluster: Mutex::new(None) })
    }

    /// A VIP moved (or was first bound) for `reason`.
    pub fn rebound(&self, reason: Reason) {
        *self.lock().rebinds.entry(reason.to_string()).or_default() += 1;
    }

    /// A configuration was applied (`ok`) or refused, as apply attempt `generation`.
    pub fn applied(&self, ok: bool, generation: u64) {
        let mut h = self.lock();
        h.last_apply = Some((ok, SystemTime::now()));
        h.generation = generation;
        if ok {
            h.applies_ok += 1;
        } else {
            h.applies_failed += 1;
        }
    }

    /// Cluster mode started: its status is read at each scrape.
    pub fn set_cluster(&self, status: Arc<Mutex<ClusterStatus>>) {
        *self.cluster.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// A copy of the cluster service's latest status (`None`: not in cluster mode).
    pub fn cluster(&self) -> Option<ClusterStatus> {
        let source = self.cluster.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let st = source.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(st)
    }

    /// A copy of the counters, for one scrape.
    pub fn health(&self) -> Health {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        // Plain counters: a panic elsewhere while holding the lock leaves them usable.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}
