//! `havipd`: run the controller, or check a configuration, or print completions.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use crate::{
    cli::{print_completions, Locations},
    config::Config,
    node::{self, DaemonOptions},
};

/// havipd: the havip node controller. Loads the XDP/TC dataplane, applies the configuration
/// and keeps it applied (SIGHUP reloads). Stopping it leaves traffic flowing; `havip down`
/// removes everything.
#[derive(Debug, Parser)]
#[command(name = "havipd", version)]
pub struct HavipdCli {
    /// The node configuration (TOML). See README.md, "Configuration".
    #[arg(long, short, required_unless_present_any = ["check_config", "completions"])]
    pub config: Option<PathBuf>,
    /// Validate a configuration and exit (0 if valid); applies nothing. Checks FILE, or
    /// the --config file when given no value.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub check_config: Option<Option<PathBuf>>,
    /// Print the shell completion script for SHELL and exit.
    #[arg(long, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,
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
    match cfg.metrics {
        Some(addr) => s += &format!(", metrics on {addr}"),
        None => s += ", metrics off",
    }
    s
}

pub fn havipd_main(cli: HavipdCli) -> anyhow::Result<()> {
    if let Some(shell) = cli.completions {
        print_completions::<HavipdCli>(shell, "havipd");
        return Ok(());
    }
    if let Some(file) = cli.check_config {
        let file = file.or(cli.config).context("--check-config needs a file: havipd --check-config FILE")?;
        let cfg = Config::load_for_apply(&file)?;
        println!("{}: valid ({})", file.display(), summary(&cfg));
        return Ok(());
    }
    let config = cli.config.context("--config FILE is required")?;
    let (pins, run_dir) = (cli.loc.pin_path.clone(), cli.loc.run_dir.clone());
    let exporter: node::StartExporter =
        Box::new(move |listen, health| Box::pin(async move { crate::observe::metrics::serve(listen, &pins, &run_dir, health).await }));
    node::run(DaemonOptions { config, pin_root: cli.loc.pin_path, run_dir: cli.loc.run_dir, netns: cli.netns }, exporter)
}

/// `havip check-config FILE` and `havipd --check-config FILE`.
pub fn check_config(file: &Path) -> anyhow::Result<()> {
    let cfg = Config::load_for_apply(file)?;
    println!("{}: valid ({})", file.display(), summary(&cfg));
    Ok(())
}
