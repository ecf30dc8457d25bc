//! `havip reload`: make the running havipd apply its configuration file again, and print
//! the verdict of this reload (never an earlier one).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cli::Locations, config::Config, node::state::State};

pub fn run(loc: &Locations, timeout: Duration) -> anyhow::Result<()> {
    let state = State::load(&loc.run_dir)?.with_context(|| format!("no havipd state in {}; is havipd running (or pass --run-dir)?", loc.run_dir.display()))?;
    let pid = state.live_pid().with_context(|| "havipd is not running; start it with `havipd --config FILE`")?;
    let config = state.config_path.clone().context("the state file names no configuration")?;
    // Check here first so the operator sees the errors directly.
    Config::load_for_apply(&config)?;
    let before = state.generation;
    if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
        bail!("signalling havipd (pid {pid}) failed: {}", std::io::Error::last_os_error());
    }
    let start = Instant::now();
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        // The verdict of this reload: one recorded for an attempt after `before`. (The
        // generation itself moves when the attempt starts, before its verdict exists.)
        let verdict = State::load(&loc.run_dir)?.and_then(|s| s.last_apply).filter(|a| a.generation > before);
        if let Some(status) = verdict {
            if status.ok {
                println!("reloaded {}: {}", config.display(), status.message);
                return Ok(());
            }
            bail!("havipd rejected the reload:\n{}", status.message);
        }
    }
    bail!("havipd (pid {pid}) did not report a result within {timeout:?}; check its log")
}
