//! Where havipd's API socket lives, and the verdict type of its operator calls (bind,
//! unbind, explain, rerank). The HTTP API itself is `api`.

use std::path::{Path, PathBuf};

/// The outcome of an operator call: done, or refused with the reason (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self { ok: true, message: message.into() }
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self { ok: false, message: message.into() }
    }
    /// As an API reply: 200, or 409 for a refusal.
    pub fn reply(self) -> crate::api::Reply {
        if self.ok { crate::api::Reply::message(self.message) } else { crate::api::Reply::error(409, self.message) }
    }
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("control.sock")
}
