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
        let cfg = Config::load(&file)?;
        println!("{}: valid ({})", file.display(), summary(&cfg));
        return Ok(());
    }
    let config = cli.config.context("--config FILE is required")?;
    daemon::run(DaemonOptions { config, pin_root: cli.loc.pin_path, run_dir: cli.loc.run_dir, netns: cli.netns })
}

/// Writes `bin`'s completion script for `shell` to stdout.
fn print_completions<C: clap::CommandFactory>(shell: clap_complete::Shell, bin: &str) {
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
    /// Pool VIPs for applications, through havipd's API (the same one orchestrators use).
    #[command(subcommand)]
    Vip(VipCommand),
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
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// A live terminal view: per VIP its NIC, score, RTT, loss, packets/s and class, and the
    /// latest moves with their reasons (q quits, s sorts, r reverses).
    Top(crate::top::TopOptions),
}

pub fn havip_main(cli: HavipCli) -> anyhow::Result<()> {
    let pins = PinLayout::new(&cli.loc.pin_path);
    match cli.cmd {
        Command::Stats { json, watch } => stats(&pins, &cli.loc, json, watch),
        Command::Bind { vip, nic } => api(&cli.loc, "POST", "/v1/bind", Some(serde_json::json!({ "vip": vip, "nic": nic })), false),
        Command::Unbind { vip } => api(&cli.loc, "POST", "/v1/unbind", Some(serde_json::json!({ "vip": vip })), false),
        Command::Explain { vip } => api(&cli.loc, "GET", &format!("/v1/explain/{vip}"), None, false),
        Command::Rerank => api(&cli.loc, "POST", "/v1/rerank", None, false),
        Command::Vip(v) => vip_command(&cli.loc, v),
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
        Command::Completions { shell } => {
            print_completions::<HavipCli>(shell, "havip");
            Ok(())
        }
        Command::Top(opts) => crate::top::run(&cli.loc.pin_path, &cli.loc.run_dir, opts),
    }
}

#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Get a pool VIP for an application: the best-ranked usable one for its targets,
    /// bound and remapped (clients reach VIP:SERVICE_PORT, the application keeps listening
    /// on INSTANCE_PORT).
    Request {
        /// Application (or orchestrator) id holding the VIP.
        #[arg(long)]
        app: String,
        #[arg(long)]
        service_port: u16,
        #[arg(long)]
        instance_port: u16,
        /// Let other applications share the VIP (on other ports).
        #[arg(long)]
        shared: bool,
        /// Peers the application talks to (repeatable): the VIP is chosen by their paths.
        #[arg(long = "target")]
        targets: Vec<std::net::IpAddr>,
        /// Application class.
        #[arg(long)]
        class: Option<String>,
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: ProtocolArg,
        /// Print havipd's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Release an application's VIPs (or only VIP).
    Release {
        #[arg(long)]
        app: String,
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
    },
    /// The pool: free VIPs, the reserve, and who holds which VIP where.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

/// One API call; prints the message (or the JSON with `json`), fails on a non-2xx status.
fn api(loc: &Locations, method: &str, path: &str, body: Option<serde_json::Value>, json: bool) -> anyhow::Result<()> {
    let (status, v) = crate::api::call(&loc.run_dir, method, path, body)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !(200..300).contains(&status) {
        let why = v.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| v.to_string());
        bail!("refused ({status}): {why} (nothing changed)");
    }
    if !json {
        if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
            println!("{m}");
        }
    }
    Ok(())
}

fn vip_command(loc: &Locations, cmd: VipCommand) -> anyhow::Result<()> {
    match cmd {
        VipCommand::Request { app, service_port, instance_port, shared, targets, class, protocol, json } => {
            let protocol = match protocol {
                ProtocolArg::Tcp => "tcp",
                ProtocolArg::Udp => "udp",
            };
            let body = serde_json::json!({
                "app": app, "exclusive": !shared, "targets": targets, "class": class,
                "protocol": protocol, "service_port": service_port, "instance_port": instance_port,
            });
            let (status, v) = crate::api::call(&loc.run_dir, "POST", "/v1/vips", Some(body))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            if status != 201 {
                bail!("refused ({status}): {} (nothing changed)", v.get("error").and_then(|e| e.as_str()).unwrap_or_default());
            }
            if !json {
                println!(
                    "{app}: {}:{service_port} ({protocol}) -> :{instance_port}, on {}\n  {}",
                    v["vip"].as_str().unwrap_or("?"),
                    v["nic"].as_str().unwrap_or("no NIC yet"),
                    v["why"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        VipCommand::Release { app, vip, json } => {
            let path = match vip {
                Some(v) => format!("/v1/vips/{app}?vip={v}"),
                None => format!("/v1/vips/{app}"),
            };
            let (status, v) = crate::api::call(&loc.run_dir, "DELETE", &path, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            if status != 200 {
                bail!("refused ({status}): {} (nothing changed)", v.get("error").and_then(|e| e.as_str()).unwrap_or_default());
            }
            if !json {
                for a in v["released"].as_array().into_iter().flatten() {
                    println!("released {}:{} ({})", a["vip"].as_str().unwrap_or("?"), a["service_port"], a["protocol"].as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
        VipCommand::List { json } => {
            let (status, v) = crate::api::call(&loc.run_dir, "GET", "/v1/vips", None)?;
            if json || status != 200 {
                println!("{}", serde_json::to_string_pretty(&v)?);
                anyhow::ensure!(status == 200, "havipd answered {status}");
                return Ok(());
            }
            let ips = |k: &str| v[k].as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ");
            println!("pool: {} (free: {}; reserve {})", ips("pool"), if ips("free").is_empty() { "none".into() } else { ips("free") }, v["reserve"]);
            println!("{:<20} {:<22} {:<8} {:>7} {:>9} {:<9} {:<8}", "APP", "VIP", "NIC", "PORT", "INSTANCE", "KIND", "PROTO");
            for h in v["held"].as_array().into_iter().flatten() {
                let a = &h["allocation"];
                println!(
                    "{:<20} {:<22} {:<8} {:>7} {:>9} {:<9} {:<8}",
                    a["app"].as_str().unwrap_or("?"),
                    a["vip"].as_str().unwrap_or("?"),
                    h["nic"].as_str().unwrap_or("-"),
                    a["service_port"],
                    a["instance_port"],
                    if a["exclusive"].as_bool() == Some(true) { "exclusive" } else { "shared" },
                    a["protocol"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
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
