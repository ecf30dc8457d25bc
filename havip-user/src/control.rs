//! havipd's local control socket: one JSON request per line, one JSON response per line,
//! on `<run dir>/control.sock` (mode 0600). Used by `havip bind` and `havip unbind`.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Pin a VIP to a NIC (moving it there now).
    Bind { vip: IpAddr, nic: String },
    /// Drop the pin: the VIP returns to automatic placement.
    Unbind { vip: IpAddr },
    /// The VIP's candidates, their measured quality, and why it is where it is.
    Explain { vip: IpAddr },
    /// Run a ranking round now.
    Rerank,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("control.sock")
}

/// Sends one request to the havipd of `run_dir` and returns its answer.
pub fn call(run_dir: &Path, req: &Request) -> anyhow::Result<Response> {
    let path = socket_path(run_dir);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("cannot reach havipd at {} (is it running? pass --run-dir)", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).context("no answer from havipd")?;
    serde_json::from_str(&answer).with_context(|| format!("unreadable answer from havipd: {answer:?}"))
}
