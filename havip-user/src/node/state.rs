//! What havipd installed outside bpffs, kept in a small JSON file in the run directory so
//! a restarted controller, `havip reload` and `havip down` know it even after a crash.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const DEFAULT_RUN_DIR: &str = "/run/havip";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The running havipd, if any.
    pub pid: Option<u32>,
    pub config_path: Option<PathBuf>,
    /// Network namespace havipd runs in (`ip netns` name), if not the initial one.
    pub netns: Option<String>,
    /// NICs havip is attached to.
    pub nics: Vec<String>,
    /// VIP addresses havip added (and so will remove), with their interface.
    pub addresses: Vec<InstalledAddress>,
    /// Operator pins: VIP -> NIC (`havip bind`).
    #[serde(default)]
    pub pins: std::collections::BTreeMap<IpAddr, String>,
    /// sysctls havipd changed, with the value to restore on `havip down`.
    #[serde(default)]
    pub sysctls: Vec<(PathBuf, String)>,
    /// Pool VIPs held by applications (the API), re-applied on restart.
    #[serde(default)]
    pub allocations: Vec<crate::node::pool::Allocation>,
    /// Bumped on every apply attempt; `havip reload` waits for it to move.
    pub generation: u64,
    pub last_apply: Option<ApplyStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstalledAddress {
    pub interface: String,
    pub address: IpAddr,
}

/// The verdict of one apply attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyStatus {
    /// The attempt this verdict is for (`State::generation` when it started).
    #[serde(default)]
    pub generation: u64,
    pub ok: bool,
    pub message: String,
    pub unix_time: u64,
}

impl ApplyStatus {
    pub fn now(generation: u64, ok: bool, message: impl Into<String>) -> Self {
        let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { generation, ok, message: message.into(), unix_time }
    }
}

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join("state.json")
}

impl State {
    pub fn load(run_dir: &Path) -> anyhow::Result<Option<State>> {
        let path = state_path(run_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes atomically (temp file + rename): a crash never leaves half a file.
    pub fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = state_path(run_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The pid of a live havipd recorded here.
    pub fn live_pid(&self) -> Option<u32> {
        let pid = self.pid?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "havipd").then_some(pid)
    }
}
