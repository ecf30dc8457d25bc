//! Command-line interfaces of `havip` and `havipd`: clap types and one function per verb.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::{
    config::Config,
    daemon::{self, DaemonOptions},
    pins::{PinLayout, DEFAULT_PIN_ROOT},
    state::{State, DEFAULT_RUN_DIR},
    stats::{render_table, Snapshot},
};

/// Where a node's kernel objects and run state live. Several nodes (labs, tests) can share
/// a machine by giving each its own pair.
#[derive(Debug, Clone, Args)]
pub struct Locations {
    /// bpffs directory holding havip's pinned maps, programs and links.
    #[arg(long, env = "HAVIP_PIN_PATH", default_value = DEFAULT_PIN_ROOT, global = true)]
    pub pin_path: PathBuf,
    /// Directory for havipd's state file.
    #[arg(long, env = "HAVIP_RUN_DIR", default_value = DEFAULT_RUN_DIR, global = true)]
    pub run_dir: PathBuf,
}

/// havipd: the havip node controller. Loads the XDP/TC dataplane, applies the configuration
/// and keeps it applied (SIGHUP reloads). Stopping it leaves traffic flowing; `havip down`
/// removes everything.
#[derive(Debug, Parser)]
#[command(name = "havipd", version)]
pub struct HavipdCli {
    /// The node configuration (TOML). See README.md, "Configuration".
    #[arg(long, short)]
    pub config: PathBuf,
    /// Validate the configuration and exit (0 if valid); applies nothing.
    #[arg(long)]
    pub check_config: bool,
    /// Run inside this network namespace (an `ip netns` name), for labs and tests.
    #[arg(long)]
    pub netns: Option<String>,
    #[command(flatten)]
    pub loc: Locations,
}

/// What a valid config holds, for `--check-config`.
fn summary(cfg: &Config) -> String {
    let mut s = format!("{} NIC(s), {} VIP(s), {} mapping(s)", cfg.nics.len(), cfg.vips.len(), cfg.remaps.len());
    if !cfg.classes.classes.is_empty() {
        s += &format!(", {} class(es)", cfg.classes.classes.len());
    }
    s
}

pub fn havipd_main(cli: HavipdCli) -> anyhow::Result<()> {
    if cli.check_config {
        let cfg = Config::load(&cli.config)?;
        println!("{}: valid ({})", cli.config.display(), summary(&cfg));
        return Ok(());
    }
    daemon::run(DaemonOptions { config: cli.config, pin_root: cli.loc.pin_path, run_dir: cli.loc.run_dir, netns: cli.netns })
}

/// havip: operate a havip node — live stats, reload, teardown, and a self-contained lab.
#[derive(Debug, Parser)]
#[command(name = "havip", version)]
pub struct HavipCli {
    #[command(flatten)]
    pub loc: Locations,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per-VIP counters read straight from the pinned maps (works while havipd is stopped).
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds, showing rates (Ctrl-C to stop).
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
    },
    /// Pin a VIP to one of its candidate NICs, moving it there now (gratuitous ARP /
    /// unsolicited NA from the NIC). Refused for a NIC that is down or not a candidate.
    Bind { vip: std::net::IpAddr, nic: String },
    /// Drop the pin set by `bind`: the VIP returns to automatic placement.
    Unbind { vip: std::net::IpAddr },
    /// Why a VIP is where it is: its candidates' measured path quality and the decision.
    Explain { vip: std::net::IpAddr },
    /// Rank every VIP's candidates now (instead of at the next ranking round).
    Rerank,
    /// Validate the running havipd's configuration file and make it apply it.
    Reload {
        /// Seconds to wait for havipd to report the result.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Stop havipd and remove everything havip installed (programs, maps, VIP addresses).
    Down,
    /// Validate a configuration file; applies nothing.
    CheckConfig { file: PathBuf },
    /// Start a self-contained lab in network namespaces and show live stats (Ctrl-C ends it
    /// and removes everything it made). This is what `cargo xtask run` starts.
    Lab(crate::lab::LabOptions),
}

pub fn havip_main(cli: HavipCli) -> anyhow::Result<()> {
    let pins = PinLayout::new(&cli.loc.pin_path);
    match cli.cmd {
        Command::Stats { json, watch } => stats(&pins, &cli.loc, json, watch),
        Command::Bind { vip, nic } => control(&cli.loc, crate::control::Request::Bind { vip, nic }),
        Command::Unbind { vip } => control(&cli.loc, crate::control::Request::Unbind { vip }),
        Command::Explain { vip } => control(&cli.loc, crate::control::Request::Explain { vip }),
        Command::Rerank => control(&cli.loc, crate::control::Request::Rerank),
        Command::Reload { timeout } => reload(&cli.loc, Duration::from_secs_f64(timeout)),
        Command::Down => {
            let r = crate::teardown::down(&cli.loc.pin_path, &cli.loc.run_dir)?;
            if let Some(pid) = r.stopped_pid {
                println!("stopped havipd (pid {pid})");
            }
            println!(
                "removed {} VIP address(es){}",
                r.removed_addresses,
                if r.removed_pins { format!(", and all pins under {}", cli.loc.pin_path.display()) } else { String::new() }
            );
            Ok(())
        }
        Command::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            println!("{}: valid ({})", file.display(), summary(&cfg));
            Ok(())
        }
        Command::Lab(opts) => crate::lab::run(opts),
    }
}

fn control(loc: &Locations, req: crate::control::Request) -> anyhow::Result<()> {
    let resp = crate::control::call(&loc.run_dir, &req)?;
    if !resp.ok {
        bail!("refused: {} (nothing changed)", resp.message);
    }
    println!("{}", resp.message);
    Ok(())
}

fn stats(pins: &PinLayout, loc: &Locations, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    if !pins.exists() {
        bail!("no havip dataplane pinned at {}; start havipd first (or pass --pin-path)", pins.root.display());
    }
    let Some(every) = watch else {
        let snap = Snapshot::read(pins, State::load(&loc.run_dir).ok().flatten().as_ref())?;
        if json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            print!("{}", render_table(&snap, None));
        }
        return Ok(());
    };
    let mut prev: Option<Snapshot> = None;
    loop {
        let snap = Snapshot::read(pins, State::load(&loc.run_dir).ok().flatten().as_ref())?;
        if json {
            println!("{}", serde_json::to_string(&snap)?);
        } else {
            // Clear the screen and home the cursor: a refreshing view, not a scroll.
            print!("\x1b[2J\x1b[H{}", render_table(&snap, prev.as_ref()));
            println!("(every {every}s; rates since the last refresh; Ctrl-C to stop)");
        }
        prev = Some(snap);
        std::thread::sleep(Duration::from_secs_f64(every.max(0.1)));
    }
}

fn reload(loc: &crate::cli::Locations, timeout: Duration) -> anyhow::Result<()> {
    let state = State::load(&loc.run_dir)?
        .with_context(|| format!("no havipd state in {}; is havipd running (or pass --run-dir)?", loc.run_dir.display()))?;
    let pid = state.live_pid().with_context(|| "havipd is not running; start it with `havipd --config FILE`")?;
    let config = state.config_path.clone().context("the state file names no configuration")?;
    // Check here first so the operator sees the errors directly.
    Config::load(&config)?;
    let before = state.generation;
    if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
        bail!("signalling havipd (pid {pid}) failed: {}", std::io::Error::last_os_error());
    }
    let start = Instant::now();
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(s) = State::load(&loc.run_dir)? {
            if s.generation > before {
                let status = s.last_apply.context("havipd recorded no result")?;
                if status.ok {
                    println!("reloaded {}: {}", config.display(), status.message);
                    return Ok(());
                }
                bail!("havipd rejected the reload; the running state is unchanged:\n{}", status.message);
            }
        }
    }
    bail!("havipd (pid {pid}) did not report a result within {timeout:?}; check its log")
}
