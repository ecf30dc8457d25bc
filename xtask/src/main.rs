//! `cargo xtask`: the project's commands. `run` and `test` check prerequisites first and
//! install whatever is missing (the recipe verified in shared/docs/platform.md), so a
//! fresh machine needs nothing but these two commands.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "havip's build, run, test and bench commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check prerequisites (nightly + rust-src, bpf-linker on LLVM 22, bpffs) and install
    /// or mount whatever is missing.
    Setup,
    /// Build the eBPF programs and the userspace binaries.
    Build {
        /// Build userspace in release mode.
        #[arg(long)]
        release: bool,
    },
    /// With no arguments: start the cluster lab (three havipd nodes and a three-member etcd
    /// in network namespaces, a client streaming probes at four VIPs, a crash, a cable pull,
    /// a peer cut, an etcd leader kill and a stall on a schedule) and show live who serves
    /// what; Ctrl-C removes everything (options: `-- --help`). With `-- --single-node`: the
    /// one-node lab (two NICs, NIC failover, remapped service instances). With
    /// `-- --config FILE [havipd options]`: run havipd on this node's NICs.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite (unit, BPF_PROG_RUN fixtures, network-namespace tests).
    /// Extra arguments go to `cargo test` (e.g. a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure per-packet cost and more; prints a table and writes target/bench/bench.json.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

pub fn step(msg: &str) {
    eprintln!("\x1b[1m[xtask]\x1b[0m {msg}");
}

/// Runs a command, echoing it; fails with a message naming it.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("  $ {}", format_cmd(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", format_cmd(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", format_cmd(cmd));
    }
    Ok(())
}

fn format_cmd(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `cargo` for the host build, without the variables the outer `cargo run` set.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn build_ebpf() -> anyhow::Result<()> {
    step("building the eBPF programs (nightly, bpfel-unknown-none)");
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root())
        .args(["+nightly", "build", "-p", "havip-ebpf", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    // The outer stable cargo's settings must not leak into the nightly BPF build.
    for var in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER"] {
        c.env_remove(var);
    }
    c.env("PATH", setup::path_with_cargo_bin());
    run(&mut c)
}

fn build_user(release: bool) -> anyhow::Result<()> {
    step(&format!("building havipd and havip ({})", if release { "release" } else { "debug" }));
    let mut c = cargo();
    c.args(["build", "-p", "havip-user", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} needs root (loading eBPF programs, creating network namespaces): run it with sudo or as root");
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::ensure_all(),
        Cmd::Build { release } => {
            setup::ensure_toolchain()?;
            build_ebpf()?;
            build_user(release)
        }
        Cmd::Run { args } => {
            require_root("cargo xtask run")?;
            setup::ensure_all()?;
            build_ebpf()?;
            build_user(true)?;
            let bin = target_dir().join("release");
            let mut c = if args.iter().any(|a| a == "--config" || a.starts_with("--config=") || a == "-c") {
                step("starting havipd on this node");
                let mut c = Command::new(bin.join("havipd"));
                c.args(&args);
                c
            } else if args.iter().any(|a| a == "--single-node") {
                step("starting the single-node lab (Ctrl-C stops it and removes everything)");
                let mut c = Command::new(bin.join("havip"));
                c.arg("lab").args(args.iter().filter(|a| *a != "--single-node"));
                c
            } else {
                step("starting the cluster lab: 3 nodes, 3 etcd members (Ctrl-C stops it and removes everything)");
                let mut c = cargo();
                c.args(["run", "--release", "-p", "havip-tests", "--bin", "havip-cluster-lab", "--"]).args(&args);
                c.env("HAVIP_BIN_DIR", &bin);
                c
            };
            run(&mut c)
        }
        Cmd::Test { args } => {
            require_root("cargo xtask test")?;
            setup::ensure_all()?;
            build_ebpf()?;
            build_user(false)?;
            step("running the test suite");
            let mut c = cargo();
            c.args(["test", "--workspace", "--exclude", "havip-ebpf"]).args(&args);
            c.env("HAVIP_BIN_DIR", target_dir().join("debug"));
            run(&mut c)?;
            step("all tests passed");
            Ok(())
        }
        Cmd::Bench { args } => {
            require_root("cargo xtask bench")?;
            setup::ensure_all()?;
            build_ebpf()?;
            build_user(true)?;
            step("running benchmarks");
            let out = target_dir().join("bench");
            std::fs::create_dir_all(&out)?;
            let mut c = cargo();
            c.args(["run", "--release", "-p", "havip-tests", "--bin", "havip-bench", "--"])
                .arg("--out")
                .arg(out.join("bench.json"))
                .args(&args);
            c.env("HAVIP_BIN_DIR", target_dir().join("release"));
            run(&mut c)
        }
    }
}
