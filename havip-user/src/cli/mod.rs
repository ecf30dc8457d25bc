//! Command-line interfaces of `havip` and `havipd`: the clap types here, one file per
//! verb beside them.

mod cluster;
pub mod havipd;
pub mod lab;
mod operator;
mod reload;
mod stats;
pub mod teardown;
mod vip;

pub use havipd::{havipd_main, HavipdCli};

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    kernel::pins::{PinLayout, DEFAULT_PIN_ROOT},
    node::state::DEFAULT_RUN_DIR,
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

/// Writes `bin`'s completion script for `shell` to stdout.
pub(crate) fn print_completions<C: clap::CommandFactory>(shell: clap_complete::Shell, bin: &str) {
    clap_complete::generate(shell, &mut C::command(), bin, &mut std::io::stdout());
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
    /// Cluster mode: nodes, heartbeats, etcd, and who owns each VIP.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Pool VIPs for applications, through havipd's API (the same one orchestrators use).
    #[command(subcommand)]
    Vip(vip::VipCommand),
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
    Lab(crate::cli::lab::LabOptions),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// A live terminal view: per VIP its NIC, score, RTT, loss, packets/s and class, and the
    /// latest moves with their reasons (q quits, s sorts, r reverses).
    Top(crate::observe::top::TopOptions),
}

pub fn havip_main(cli: HavipCli) -> anyhow::Result<()> {
    let pins = PinLayout::new(&cli.loc.pin_path);
    match cli.cmd {
        Command::Stats { json, watch } => stats::run(&pins, &cli.loc, json, watch),
        Command::Bind { vip, nic } => operator::bind(&cli.loc, vip, &nic),
        Command::Unbind { vip } => operator::unbind(&cli.loc, vip),
        Command::Explain { vip } => operator::explain(&cli.loc, vip),
        Command::Rerank => operator::rerank(&cli.loc),
        Command::Cluster(c) => cluster::run(&cli.loc, c),
        Command::Vip(v) => vip::run(&cli.loc, v),
        Command::Reload { timeout } => reload::run(&cli.loc, Duration::from_secs_f64(timeout)),
        Command::Down => teardown::run(&cli.loc),
        Command::CheckConfig { file } => havipd::check_config(&file),
        Command::Lab(opts) => crate::cli::lab::run(opts),
        Command::Completions { shell } => {
            print_completions::<HavipCli>(shell, "havip");
            Ok(())
        }
        Command::Top(opts) => crate::observe::top::run(&cli.loc.pin_path, &cli.loc.run_dir, opts),
    }
}
