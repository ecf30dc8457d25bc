//! `[metrics]`: where havipd serves Prometheus metrics (the exporter is `observe::metrics`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Where the endpoint listens unless configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9469";

/// `[metrics]`: where the endpoint listens. On by default, on loopback only: the counters
/// name the node's VIPs and peers, so exposing them beyond the host is a deliberate choice.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `false` serves no metrics (and opens no port).
    pub enabled: bool,
    /// `IP:PORT` to listen on, e.g. `"127.0.0.1:9469"`, `"[::1]:9469"`, `"0.0.0.0:9469"`.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true, listen: DEFAULT_LISTEN.into() }
    }
}

/// The address to serve metrics on (`None`: disabled). The address is checked even when
/// disabled, so turning it back on cannot surprise.
pub fn validate(section: &MetricsSection, err: &mut impl FnMut(String, String)) -> Option<SocketAddr> {
    let addr = match section.listen.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            err("metrics.listen".into(), format!("`{}` has port 0; give the port Prometheus scrapes (default {DEFAULT_LISTEN})", section.listen));
            None
        }
        Ok(a) => Some(a),
        Err(_) if section.listen.trim().is_empty() => {
            err("metrics.listen".into(), format!("is empty; give an IP:PORT such as {DEFAULT_LISTEN}, or set `enabled = false` to serve no metrics"));
            None
        }
        Err(_) => {
            err(
                "metrics.listen".into(),
                format!("`{}` is not an IP:PORT socket address (e.g. {DEFAULT_LISTEN} or [::1]:9469; host names are not resolved)", section.listen),
            );
            None
        }
    };
    addr.filter(|_| section.enabled)
}
