//! Prerequisites, checked in seconds when present and installed when missing, each step
//! printed. The recipe is the one verified in shared/docs/platform.md.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::{run, step};

/// Versions that build together here (newer bpf-linker releases need a newer rustc).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_LLVM: [&str; 2] = ["llvm-22-dev", "libpolly-22-dev"];

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"))
}

/// PATH with cargo's bin directory first, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> String {
    let bin = cargo_home().join("bin");
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.env("PATH", path_with_cargo_bin()).output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.env("PATH", path_with_cargo_bin())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    step(&format!("installing {} (apt)", pkgs.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get").args(["install", "-y", "-qq", "--no-install-recommends"]).args(pkgs).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Nightly with rust-src, and bpf-linker built against LLVM 22.
pub fn ensure_toolchain() -> anyhow::Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to nightly (needed for -Z build-std)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    } else {
        step("nightly with rust-src: present");
    }
    // protoc: the etcd-client crate (cluster mode) compiles etcd's gRPC protos when it builds.
    if !succeeds(Command::new("sh").args(["-c", "command -v protoc"])) {
        apt_install(&["protobuf-compiler"])?;
    } else {
        step("protoc: present");
    }
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        step("bpf-linker: present");
        return Ok(());
    }
    if !PathBuf::from(LLVM_PREFIX).join("lib/libLLVM.so").exists() && !PathBuf::from(LLVM_PREFIX).join("lib/libLLVM-22.so").exists() {
        apt_install(&APT_LLVM)?;
    }
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 1.5 minutes)"));
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22"]);
        if locked {
            c.arg("--locked");
        }
        c.env("LLVM_PREFIX", LLVM_PREFIX).env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO").env_remove("RUSTC");
        run(&mut c)
    };
    install(true).or_else(|_| install(false)).context("installing bpf-linker failed")?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker installed but does not run; check {}", cargo_home().join("bin").display());
    }
    Ok(())
}

/// The tools the lab and the tests call, and a mounted bpffs.
pub fn ensure_runtime() -> anyhow::Result<()> {
    // ethtool: the namespace tests turn checksum offload off so checksums are really verified.
    // strace: the stats-cost test and benchmark count `havip stats`' bpf() calls with it.
    // etcd, etcdctl, nft: the cluster lab and tests run their own etcd and cut links with
    // nftables.
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("strace", "strace"),
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
        ("nft", "nftables"),
    ]
        .into_iter()
        .filter(|(bin, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {bin}")])))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    } else {
        step("iproute2, ethtool, strace, etcd, etcdctl, nft: present");
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        step("bpffs: mounted");
    } else {
        step("mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

pub fn ensure_all() -> anyhow::Result<()> {
    step("checking prerequisites");
    ensure_toolchain()?;
    ensure_runtime()
}
