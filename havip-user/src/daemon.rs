//! havipd: applies the configuration to the dataplane and keeps it applied. The dataplane
//! lives in pinned kernel objects, so this process may stop, crash or restart at any time
//! without interrupting traffic: on start it adopts what is pinned and applies the
//! difference.

use std::{
    collections::BTreeSet,
    path::PathBuf,
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    dataplane::Dataplane,
    netlink::{LinkInfo, Netlink},
    netns,
    pins::PinLayout,
    plan::{plan, Desired},
    state::{ApplyStatus, InstalledAddress, State},
};

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub config: PathBuf,
    pub pin_root: PathBuf,
    pub run_dir: PathBuf,
    pub netns: Option<String>,
}

/// Runs havipd until SIGTERM/SIGINT. Returns an error (nothing applied) if the initial
/// configuration is invalid or cannot be applied.
pub fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    if let Some(ns) = &opts.netns {
        // Before any other thread exists: the runtime's threads inherit it.
        netns::enter(ns)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(opts))
}

/// The system facts a configuration is checked against before anything is applied.
struct Resolved {
    vip_interface: LinkInfo,
    nics: Vec<LinkInfo>,
}

async fn resolve(cfg: &Config, nl: &Netlink) -> anyhow::Result<Resolved> {
    let mut missing = Vec::new();
    let vip_interface = nl.link(&cfg.vip_interface).await?;
    if vip_interface.is_none() {
        missing.push(format!("field `node.vip_interface`: interface `{}` does not exist on this node", cfg.vip_interface));
    }
    let mut nics = Vec::new();
    for (i, name) in cfg.nics.iter().enumerate() {
        match nl.link(name).await? {
            Some(l) => nics.push(l),
            None => missing.push(format!("field `nic[{i}].name`: interface `{name}` does not exist on this node")),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("configuration does not fit this node; nothing was applied:\n  - {}", missing.join("\n  - "));
    }
    Ok(Resolved { vip_interface: vip_interface.unwrap(), nics })
}

struct Node {
    opts: DaemonOptions,
    nl: Netlink,
    dp: Dataplane,
    state: State,
}

impl Node {
    /// Brings the dataplane, addresses and state to `cfg`. Only differences are written.
    async fn apply(&mut self, cfg: &Config, res: &Resolved) -> anyhow::Result<String> {
        let mut notes = Vec::new();
        // NICs: attach new ones (or adopt pinned links), detach ones no longer configured.
        for nic in &res.nics {
            let report = self.dp.attach(&nic.name, cfg.xdp_mode)?;
            self.dp.set_nic(nic.index, &nic.name, nic.mac)?;
            if !self.state.nics.contains(&nic.name) {
                info!(nic = %nic.name, ifindex = nic.index, xdp = report.xdp_mode, adopted = report.adopted, "attached");
                notes.push(format!("attached {} ({})", nic.name, report.xdp_mode));
            }
        }
        let wanted: BTreeSet<&str> = cfg.nics.iter().map(String::as_str).collect();
        for old in self.dp.pins.pinned_nics() {
            if !wanted.contains(old.as_str()) {
                crate::dataplane::detach(&self.dp.pins, &old)?;
                if let Some(l) = self.nl.link(&old).await? {
                    self.dp.remove_nic(l.index)?;
                }
                notes.push(format!("detached {old}"));
            }
        }
        self.state.nics = cfg.nics.clone();

        // Maps.
        let ifindex = |name: &str| res.nics.iter().find(|n| n.name == name).map(|n| n.index).unwrap_or(0);
        let desired = Desired::from_config(cfg, ifindex);
        let changes = plan(&desired, &self.dp.maps.read_actual()?);
        if !changes.is_empty() {
            self.dp.maps.apply(&changes)?;
            info!(summary = %changes.summary(), "maps updated");
            notes.push(changes.summary());
        }

        // A VIP on a down interface serves nothing (no local route): the VIP interface is up.
        if !res.vip_interface.up {
            self.nl.set_up(res.vip_interface.index).await?;
            info!(interface = %res.vip_interface.name, "VIP interface set up");
        }

        // Addresses: add missing VIPs; remove those we added that are no longer wanted.
        let present = self.nl.addresses(res.vip_interface.index).await?;
        let want: BTreeSet<InstalledAddress> = cfg
            .vips
            .iter()
            .map(|v| InstalledAddress { interface: cfg.vip_interface.clone(), address: v.address })
            .collect();
        let mut installed: BTreeSet<InstalledAddress> = self.state.addresses.iter().cloned().collect();
        for a in &want {
            if !present.contains(&a.address) {
                self.nl.add_host_address(res.vip_interface.index, a.address).await?;
                info!(vip = %a.address, interface = %a.interface, "VIP address added");
                installed.insert(a.clone());
            }
        }
        for a in installed.clone() {
            if !want.contains(&a) {
                if let Some(l) = self.nl.link(&a.interface).await? {
                    self.nl.del_address(l.index, a.address).await?;
                }
                info!(vip = %a.address, interface = %a.interface, "VIP address removed");
                installed.remove(&a);
            }
        }
        self.state.addresses = installed.into_iter().collect();
        self.save()?;
        Ok(if notes.is_empty() { "no changes".into() } else { notes.join("; ") })
    }

    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.opts.run_dir)
    }

    async fn reload(&mut self) {
        self.state.generation += 1;
        let result = async {
            let cfg = Config::load(&self.opts.config)?;
            let res = resolve(&cfg, &self.nl).await?;
            self.apply(&cfg, &res).await
        }
        .await;
        let status = match result {
            Ok(summary) => {
                info!(%summary, "reload applied");
                ApplyStatus::now(true, summary)
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload rejected; the running state is unchanged");
                ApplyStatus::now(false, format!("{e:#}"))
            }
        };
        self.state.last_apply = Some(status);
        if let Err(e) = self.save() {
            error!(error = %e, "cannot write the state file");
        }
    }
}

async fn serve(opts: DaemonOptions) -> anyhow::Result<()> {
    // Validate before touching anything.
    let cfg = Config::load(&opts.config)?;
    let nl = Netlink::new()?;
    let res = resolve(&cfg, &nl).await?;

    let pins = PinLayout::new(&opts.pin_root);
    let adopting = pins.exists();
    let mut dp = Dataplane::open(&opts.pin_root)?;
    dp.pin_programs()?;
    let mut state = State::load(&opts.run_dir)?.unwrap_or_default();
    if let Some(pid) = state.live_pid() {
        if pid != std::process::id() {
            anyhow::bail!("another havipd (pid {pid}) is running with run directory {}; stop it first", opts.run_dir.display());
        }
    }
    state.pid = Some(std::process::id());
    state.config_path = Some(std::fs::canonicalize(&opts.config).unwrap_or(opts.config.clone()));
    state.netns = opts.netns.clone();
    let mut node = Node { opts, nl, dp, state };
    if adopting {
        info!(pins = %node.opts.pin_root.display(), "adopting the pinned dataplane");
    }
    node.state.generation += 1;
    let summary = node.apply(&cfg, &res).await.context("applying the configuration")?;
    node.state.last_apply = Some(ApplyStatus::now(true, summary.clone()));
    node.save()?;
    info!(config = %node.opts.config.display(), vips = cfg.vips.len(), mappings = cfg.remaps.len(), %summary, "havipd ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading");
                node.reload().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // The dataplane stays: pinned programs keep serving traffic until `havip down`.
    node.state.pid = None;
    if let Err(e) = node.save() {
        warn!(error = %e, "cannot write the state file");
    }
    info!("havipd stopped; the dataplane keeps running (havip down removes it)");
    Ok(())
}
