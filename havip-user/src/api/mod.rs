//! havipd's HTTP API: JSON over HTTP on `<run dir>/control.sock` (mode 0660, group
//! `[api] socket_group`), and on a TCP address only if `[api] listen` is set, where every
//! request must carry `Authorization: Bearer <token>`.
//!
//! | method and path | body | what |
//! |---|---|---|
//! | `POST /v1/vips` | `VipRequest` | get a pool VIP, bound and remapped (201) |
//! | `GET /v1/vips` | | the pool and who holds what |
//! | `DELETE /v1/vips/{app}[?vip=ADDR]` | | release the app's VIPs (or one) |
//! | `POST /v1/bind` | `{"vip", "nic"}` | pin a VIP to a NIC |
//! | `POST /v1/unbind` | `{"vip"}` | drop the pin |
//! | `GET /v1/explain/{vip}` | | candidates, paths, costs, decision |
//! | `POST /v1/rerank` | | rank every VIP now |
//!
//! Errors are `{"error": "..."}` with the status of their [`ApiError`] kind. This module
//! holds the types both sides share; `server` parses and forwards every call to the node's
//! event loop, `client` is what the CLI speaks.

pub mod client;
pub mod server;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::Protocol;

/// Where the API socket of the havipd with run directory `run_dir` lives.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("control.sock")
}

/// `POST /v1/vips`: what an application asks for.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VipRequest {
    /// Who holds the VIP: an application or orchestrator id (1-64 of A-Z a-z 0-9 . _ - :).
    pub app: String,
    /// Exclusive VIPs are never shared with another application.
    #[serde(default = "yes")]
    pub exclusive: bool,
    /// Peers the application talks to: the VIP is chosen (and placed) by their paths.
    #[serde(default)]
    pub targets: Vec<IpAddr>,
    /// Application class of the VIP (a configured `[class.NAME]`).
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// The port clients address: VIP:service_port.
    pub service_port: u16,
    /// The port the application listens on; never changed.
    pub instance_port: u16,
    /// Cluster mode: the `[[cluster.network]]` to take the VIP from (default: the spare
    /// pools' network, or the only one).
    #[serde(default)]
    pub network: Option<String>,
    /// Cluster mode: never moved by rebalancing (it still fails over with its node).
    #[serde(default)]
    pub pinned: bool,
    /// Cluster mode: once released, the address is never handed out again.
    #[serde(default)]
    pub do_not_reassign: bool,
}

fn yes() -> bool {
    true
}
fn tcp() -> Protocol {
    Protocol::Tcp
}

/// A call for havipd's event loop.
#[derive(Debug, Clone)]
pub enum Call {
    Request(VipRequest),
    Release {
        app: String,
        vip: Option<IpAddr>,
    },
    List,
    Bind {
        vip: IpAddr,
        nic: String,
    },
    Unbind {
        vip: IpAddr,
    },
    Explain {
        vip: IpAddr,
    },
    Rerank,
    /// Cluster mode: nodes, heartbeats, each VIP's owner, epoch and lease.
    ClusterStatus,
}

/// A successful answer: 200 or 201 and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// 200 with `body`.
    pub fn json(body: impl Serialize) -> Self {
        Self { status: 200, body: serde_json::to_value(body).unwrap_or(Value::Null) }
    }
    /// 201 (something was created) with `body`.
    pub fn created(body: impl Serialize) -> Self {
        Self { status: 201, ..Self::json(body) }
    }
    /// 200 with `{"message": msg}`.
    pub fn message(msg: impl Into<String>) -> Self {
        Self::json(json!({ "message": msg.into() }))
    }
}

/// Why a call was not done; each kind is one HTTP status, and in every case nothing was
/// changed unless the message says what was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is wrong, at `field`.
    #[error("field `{field}`: {reason}")]
    Bad { field: String, reason: String },
    /// 401: no or a wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such thing (endpoint, holder).
    #[error("{0}")]
    NotFound(String),
    /// 409: valid, but not possible now.
    #[error("{0}")]
    Conflict(String),
    /// 500: havipd tried and failed; the message says what state it left.
    #[error("{0}")]
    Failed(String),
    /// 503: havipd is stopping.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn bad(field: &str, reason: impl Into<String>) -> Self {
        ApiError::Bad { field: field.into(), reason: reason.into() }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::Bad { .. } => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Failed(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }
}

/// What the node answers a call with.
pub type Reply = Result<Answer, ApiError>;

/// The channel calls travel on, each with the sender for its reply.
pub type Calls = mpsc::Sender<(Call, oneshot::Sender<Reply>)>;
