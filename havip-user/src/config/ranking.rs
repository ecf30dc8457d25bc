//! `[ranking]` as validated: how path quality orders a VIP's candidate NICs. The ranking
//! itself is `node::rank`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    #[default]
    Mean,
    Sum,
}

/// Validated `[ranking]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    pub window: Duration,
    pub weight_latency: f64,
    pub weight_loss: f64,
    pub weight_hops: f64,
    pub combine: Combine,
    pub margin: f64,
    pub min_gain: f64,
    /// Seconds of a lead of two allowances a challenger must show (see `node::rank`).
    pub evidence: Duration,
    pub max_rtt_ms: Option<f64>,
    pub max_loss_pct: Option<f64>,
    pub top_k: Option<usize>,
}

impl Settings {
    /// The cost of one path, lower is better (the ranking's model, see `node::rank`; the
    /// cluster's placement uses the same): every term >= 0.
    pub fn path_cost(&self, rtt_ms: f64, loss_pct: f64, hops: f64) -> f64 {
        self.weight_latency * rtt_ms.max(0.0) + self.weight_loss * loss_pct.clamp(0.0, 100.0) + self.weight_hops * hops.max(0.0)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            window: Duration::from_millis(5000),
            weight_latency: 1.0,
            weight_loss: 2.0,
            weight_hops: 1.0,
            combine: Combine::Mean,
            margin: 0.2,
            min_gain: 1.0,
            evidence: Duration::from_millis(1000),
            max_rtt_ms: None,
            max_loss_pct: None,
            top_k: None,
        }
    }
}
