//! Network namespaces: entering one by name (havipd and the CLI use it to run a node inside
//! a lab or test namespace) and an RAII guard that creates one and always deletes it.

use std::{fs::File, os::fd::AsRawFd, process::Command};

use anyhow::{bail, Context};

/// Moves the calling thread into the named namespace (`ip netns` naming). Call before
/// starting other threads: new threads inherit the namespace of the thread that made them.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).with_context(|| format!("network namespace {name} not found ({path})"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("entering network namespace {name} failed: {e}");
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `name` (the caller's namespace is unchanged).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> anyhow::Result<T> {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` inside namespace `ns`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// A network namespace that is deleted when the guard drops, also on panic.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name`, deleting a leftover of the same name first. Loopback is brought up,
    /// and IPv6 duplicate address detection is off for interfaces created in it later: on a
    /// fresh veth it keeps link-local addresses tentative for a second or more, which delays
    /// neighbour discovery and so the first packets of every test.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ip_in(name, &["link", "set", "lo", "up"])?;
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        ip_in(&self.name, args)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths too.
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Creates a veth pair with one end in each namespace, named `a_name` and `b_name` there.
pub fn veth_pair(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    sh(&["ip", "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns", &b.name])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}
