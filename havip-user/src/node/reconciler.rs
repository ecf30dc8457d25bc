//! Brings the kernel to a configuration: first `resolve` checks it against this node
//! (interfaces exist, no foreign qdisc) with nothing applied; then `apply` runs the stages
//! below in order, writing only differences. If a stage fails, the error names it and
//! lists what the earlier stages changed, so nobody is told "nothing changed" when
//! something did.
//!
//! The order matters for traffic:
//! - maps before qdiscs: a new class's packets may land in the unclassified HTB class for
//!   a moment, never in a class that does not exist yet;
//! - bindings before detaching a removed NIC: its VIPs move to a NIC that answers for
//!   them before its programs go, so no moment exists where nothing (or the kernel's own
//!   ARP, from the wrong NIC) answers.

use std::{collections::BTreeSet, fmt, path::PathBuf, time::Instant};

use anyhow::Context;
use tracing::{info, warn};

use crate::{
    config::Config,
    faults,
    kernel::{
        classes::htb_spec,
        dataplane,
        ingress_hook::{self, NicKind},
        netlink::{LinkInfo, Netlink},
        plan::Desired,
        qdisc,
    },
    node::{binder::LinkState, nics::Nic, state::InstalledAddress, Node},
};

/// The system facts a configuration is checked against before anything is applied.
pub struct Resolved {
    pub vip_interface: LinkInfo,
    pub nics: Vec<LinkInfo>,
}

/// Checks `cfg` against this node for an apply of `scope`. An error here means nothing was
/// applied. A `Vips` apply touches no NIC, so the NICs and their qdiscs are not looked up
/// (`Resolved::nics` is empty): a pool call costs one netlink lookup here, not one per NIC.
pub async fn resolve(cfg: &Config, nl: &Netlink, scope: Scope) -> anyhow::Result<Resolved> {
    let mut missing = Vec::new();
    let vip_interface = nl.link(&cfg.vip_interface).await?;
    if vip_interface.is_none() {
        missing.push(format!("field `node.vip_interface`: interface `{}` does not exist on this node", cfg.vip_interface));
    }
    let mut nics = Vec::new();
    let nic_names = if scope == Scope::Full { cfg.nics.as_slice() } else { &[] };
    for (i, name) in nic_names.iter().enumerate() {
        match nl.link(name).await? {
            Some(l) => nics.push(l),
            None => missing.push(format!("field `nic[{i}].name`: interface `{name}` does not exist on this node")),
        }
    }
    // Egress classes need the NICs' root qdisc: never take one havip does not own unasked.
    if cfg.classes.needs_htb() {
        // (Empty for a `Vips` apply, which leaves qdiscs alone.)
        for (i, nic) in nics.iter().enumerate() {
            let replace = cfg.classes.nics.get(&nic.name).is_some_and(|n| n.replace_qdisc);
            if let qdisc::RootQdisc::Foreign { kind, handle } = qdisc::root_qdisc(nl.handle(), nic.index).await? {
                if !replace {
                    missing.push(format!(
                        "field `nic[{i}]`: {} already has a root qdisc havip did not create ({kind}, handle {:x}:); \
                         set `replace_qdisc = true` on this [[nic]] to replace it, or remove it (tc qdisc del dev {} root)",
                        nic.name,
                        handle >> 16,
                        nic.name
                    ));
                }
            }
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("configuration does not fit this node; nothing was applied:\n  - {}", missing.join("\n  - "));
    }
    Ok(Resolved { vip_interface: vip_interface.expect("checked above"), nics })
}

/// The stages of an apply, in the order they run. Each is also a fault point
/// (`HAVIP_FAULTS`, see `faults`) named `apply:<stage>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Attach (or adopt) the programs on each NIC and record it in the NICS map.
    Nics,
    /// Host settings on each NIC (arp_announce, arp_ignore, ignore_routes_with_linkdown).
    Sysctls,
    /// VIPs, mappings, classes and CPU queues in the maps.
    Maps,
    /// havip's HTB on each NIC (egress classes).
    Qdiscs,
    /// The VIP interface up, VIP addresses added and removed.
    Addresses,
    /// Probe slots and sockets.
    Probes,
    /// The placer's moves.
    Bindings,
    /// Programs and qdiscs off NICs no longer configured.
    Detach,
    /// The state file.
    State,
}

impl Stage {
    pub const ALL: [Stage; 9] =
        [Stage::Nics, Stage::Sysctls, Stage::Maps, Stage::Qdiscs, Stage::Addresses, Stage::Probes, Stage::Bindings, Stage::Detach, Stage::State];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Nics => "nics",
            Stage::Sysctls => "sysctls",
            Stage::Maps => "maps",
            Stage::Qdiscs => "qdiscs",
            Stage::Addresses => "addresses",
            Stage::Probes => "probes",
            Stage::Bindings => "bindings",
            Stage::Detach => "detach",
            Stage::State => "state",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an apply covers. A pool grant or release changes VIPs and mappings only, never
/// NICs, host settings or classes, so it skips those stages (they are the slow ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Full,
    Vips,
}

impl Scope {
    fn runs(self, stage: Stage) -> bool {
        self == Scope::Full || !matches!(stage, Stage::Nics | Stage::Sysctls | Stage::Qdiscs | Stage::Detach)
    }
}

/// A failed apply: the stage that failed, and every change the stages before it made.
#[derive(Debug)]
pub struct ApplyError {
    pub stage: Stage,
    pub applied: Vec<String>,
    pub source: anyhow::Error,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage `{}` failed: {:#}; ", self.stage, self.source)?;
        if self.applied.is_empty() {
            f.write_str("nothing had been changed")
        } else {
            write!(f, "already applied: {}", self.applied.join("; "))
        }
    }
}

impl std::error::Error for ApplyError {}

/// The changes one apply made, stage by stage.
#[derive(Default)]
struct Applied {
    notes: Vec<String>,
}

impl Applied {
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
    fn summary(&self) -> String {
        if self.notes.is_empty() {
            "no changes".into()
        } else {
            self.notes.join("; ")
        }
    }
}

impl Node {
    /// Brings the kernel, addresses and state to `cfg`; only differences are written.
    /// Returns a summary of the changes.
    pub(super) async fn apply(&mut self, cfg: &Config, res: &Resolved, scope: Scope) -> Result<String, ApplyError> {
        let mut applied = Applied::default();
        for stage in Stage::ALL.into_iter().filter(|s| scope.runs(*s)) {
            let started = Instant::now();
            let r = match faults::check(&format!("apply:{stage}")) {
                Err(e) => Err(e),
                Ok(()) => self.run_stage(stage, cfg, res, &mut applied).await,
            };
            tracing::debug!(%stage, ?scope, took_us = started.elapsed().as_micros() as u64, ok = r.is_ok(), "apply stage");
            if let Err(source) = r {
                return Err(ApplyError { stage, applied: applied.notes, source });
            }
        }
        Ok(applied.summary())
    }

    async fn run_stage(&mut self, stage: Stage, cfg: &Config, res: &Resolved, applied: &mut Applied) -> anyhow::Result<()> {
        match stage {
            Stage::Nics => self.attach_nics(cfg, res, applied),
            Stage::Sysctls => {
                for nic in &res.nics {
                    self.host_settings_for_nic(&nic.name, applied)?;
                }
                Ok(())
            }
            Stage::Maps => {
                let changes = self.dp.apply_desired(&Desired::from_config(cfg))?;
                if !changes.is_empty() {
                    info!(summary = %changes.summary(), "maps updated");
                    applied.note(changes.summary());
                }
                Ok(())
            }
            Stage::Qdiscs => self.apply_qdiscs(cfg, res, applied).await,
            Stage::Addresses => self.apply_addresses(cfg, res, applied).await,
            Stage::Probes => self.prober.setup(cfg, &self.nics, &mut self.dp, &self.nl).await,
            Stage::Bindings => {
                // Pins that no longer make sense go.
                self.state.pins.retain(|vip, nic| {
                    let keep = cfg.vips.iter().any(|v| v.address == *vip && v.nics.contains(nic));
                    if !keep {
                        warn!(%vip, %nic, "dropping the operator's pin: no longer a configured VIP/candidate");
                    }
                    keep
                });
                // The placer works on the configuration in force: from here on, that is `cfg`.
                self.cfg = cfg.clone();
                let moved = self.place_all(None);
                if moved > 0 {
                    applied.note(format!("{moved} VIP(s) bound"));
                }
                Ok(())
            }
            Stage::Detach => self.detach_removed(cfg, applied).await,
            Stage::State => self.save(),
        }
    }

    /// Attaches new NICs (or adopts pinned links) and records each in the NICS map.
    fn attach_nics(&mut self, cfg: &Config, res: &Resolved, applied: &mut Applied) -> anyhow::Result<()> {
        let known = self.dp.nic_infos();
        // Entries of configured NICs under an ifindex that is no longer theirs (the NIC
        // was deleted and created again) go: their NIC_STATS slot moves to the new one.
        for (ifindex, info) in &known {
            if res.nics.iter().any(|n| n.name == info.name() && n.index != *ifindex) {
                self.dp.remove_nic(*ifindex)?;
            }
        }
        let slot_of = |name: &str| known.values().find(|i| i.name() == name).map(|i| i.index);
        let mut used: BTreeSet<u32> = res.nics.iter().filter_map(|n| slot_of(&n.name)).collect();
        for nic in &res.nics {
            let kind = NicKind { virtual_kind: nic.kind.clone() };
            let report = self.dp.attach(&nic.name, ingress_hook::choose(cfg.xdp_mode, &kind, cfg.classes.cpu_queues()))?;
            let index = match slot_of(&nic.name) {
                Some(i) => i,
                None => {
                    let i = (0..).find(|i| !used.contains(i)).expect("an unused slot");
                    used.insert(i);
                    self.dp.zero_nic_stats(i)?;
                    i
                }
            };
            self.dp.set_nic(nic.index, &nic.name, nic.mac, index, Some((report.hook, report.reason)))?;
            let was = self.nics.get(&nic.name).cloned();
            self.nics.insert(&nic.name, Nic { ifindex: nic.index, mac: nic.mac, index });
            // The link state as the kernel has it now starts a new history when it differs
            // from what havipd holds: a NIC seen for the first time, or one a link event
            // marked down until this reconcile attached it as a new device.
            let new_device = was.as_ref().is_none_or(|w| w.ifindex != nic.index);
            if self.links.get(&nic.name).is_none_or(|l| l.up != nic.up) {
                self.links.insert(nic.name.clone(), LinkState { up: nic.up, since: Instant::now() });
            }
            let hook_changed = known.get(&nic.index).is_some_and(|i| i.hook != report.hook as u8);
            if !self.state.nics.contains(&nic.name) || new_device && was.is_some() || hook_changed {
                info!(
                    nic = %nic.name,
                    ifindex = nic.index,
                    hook = report.hook.name(),
                    why = report.reason.explain(),
                    kind = nic.kind.as_deref().unwrap_or("driver"),
                    xdp_mode = ?cfg.xdp_mode,
                    cpu_queues = cfg.classes.cpu_queues(),
                    adopted = report.adopted,
                    up = nic.up,
                    "attached"
                );
                applied.note(format!("attached {} ({}: {})", nic.name, report.hook.name(), report.reason.explain()));
            }
        }
        let mut nics: Vec<String> = self.state.nics.clone();
        for n in &cfg.nics {
            if !nics.contains(n) {
                nics.push(n.clone());
            }
        }
        // Removed NICs stay listed until the detach stage has taken them off.
        self.state.nics = nics;
        Ok(())
    }

    /// Host settings a multi-NIC VIP node needs on each NIC (restored by `havip down`):
    /// - `arp_announce = 2`: ARP requests the kernel sends use the NIC's own address as the
    ///   sender, never a VIP, so no NIC but the owner ever claims a VIP on the wire;
    /// - `arp_ignore = 1`: the kernel answers ARP only for addresses on the NIC itself, so
    ///   it never answers for a VIP (those live on the VIP interface) from a NIC whose
    ///   program is gone: only the owner's XDP program answers for a VIP;
    /// - `ignore_routes_with_linkdown = 1` (IPv4 and IPv6): a NIC that lost carrier but is
    ///   administratively up stops attracting routes; otherwise the kernel keeps sending
    ///   there and waits on neighbour resolution that never completes.
    fn host_settings_for_nic(&mut self, nic: &str, applied: &mut Applied) -> anyhow::Result<()> {
        for (path, want) in [
            (format!("/proc/sys/net/ipv4/conf/{nic}/arp_announce"), "2"),
            (format!("/proc/sys/net/ipv4/conf/{nic}/arp_ignore"), "1"),
            (format!("/proc/sys/net/ipv4/conf/{nic}/ignore_routes_with_linkdown"), "1"),
            (format!("/proc/sys/net/ipv6/conf/{nic}/ignore_routes_with_linkdown"), "1"),
        ] {
            let path = PathBuf::from(path);
            let old = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            if old.trim() != want {
                std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
                if !self.state.sysctls.iter().any(|(p, _)| *p == path) {
                    self.state.sysctls.push((path.clone(), old.trim().to_string()));
                }
                applied.note(format!("{} = {want}", path.display()));
            }
        }
        Ok(())
    }

    /// Egress classes, after the maps: a new class's first packets may carry a priority
    /// HTB does not know yet and land in the unclassified class for a moment; a removed
    /// class's packets stopped carrying its priority before its HTB class goes.
    async fn apply_qdiscs(&mut self, cfg: &Config, res: &Resolved, applied: &mut Applied) -> anyhow::Result<()> {
        let class_ids = self.dp.class_ids()?;
        for nic in &res.nics {
            match htb_spec(&cfg.classes, &class_ids, &nic.name) {
                Some(spec) => {
                    let replace = cfg.classes.nics.get(&nic.name).is_some_and(|n| n.replace_qdisc);
                    qdisc::apply(self.nl.handle(), nic.index, &spec, replace)
                        .await
                        .with_context(|| format!("setting up the egress classes of {}", nic.name))?;
                }
                None => {
                    if qdisc::remove(self.nl.handle(), nic.index).await? {
                        info!(nic = %nic.name, "egress classes removed");
                        applied.note(format!("egress classes removed from {}", nic.name));
                    }
                }
            }
        }
        Ok(())
    }

    /// The VIP interface up; VIP addresses added where missing and removed where havip
    /// added them and they are no longer wanted.
    async fn apply_addresses(&mut self, cfg: &Config, res: &Resolved, applied: &mut Applied) -> anyhow::Result<()> {
        // A VIP on a down interface serves nothing (no local route).
        if !res.vip_interface.up {
            self.nl.set_up(res.vip_interface.index).await?;
            info!(interface = %res.vip_interface.name, "VIP interface set up");
            applied.note(format!("{} set up", res.vip_interface.name));
        }
        let present = self.nl.addresses(res.vip_interface.index).await?;
        let want: BTreeSet<InstalledAddress> = cfg.vips.iter().map(|v| InstalledAddress { interface: cfg.vip_interface.clone(), address: v.address }).collect();
        for a in &want {
            if !present.contains(&a.address) {
                self.nl.add_host_address(res.vip_interface.index, a.address).await?;
                info!(vip = %a.address, interface = %a.interface, "VIP address added");
                applied.note(format!("added {}", a.address));
                // Recorded at once: a later failure must still let `havip down` remove it.
                if !self.state.addresses.contains(a) {
                    self.state.addresses.push(a.clone());
                }
            }
        }
        for a in self.state.addresses.clone() {
            if !want.contains(&a) {
                if let Some(l) = self.nl.link(&a.interface).await? {
                    self.nl.del_address(l.index, a.address).await?;
                }
                info!(vip = %a.address, interface = %a.interface, "VIP address removed");
                applied.note(format!("removed {}", a.address));
                self.state.addresses.retain(|x| *x != a);
            }
        }
        Ok(())
    }

    /// Takes havip off NICs no longer configured, after their VIPs moved.
    async fn detach_removed(&mut self, cfg: &Config, applied: &mut Applied) -> anyhow::Result<()> {
        let wanted: BTreeSet<&str> = cfg.nics.iter().map(String::as_str).collect();
        for old in self.dp.pins.pinned_nics() {
            if wanted.contains(old.as_str()) {
                continue;
            }
            dataplane::detach(&self.dp.pins, &old)?;
            if let Some(n) = self.nics.remove(&old) {
                self.dp.remove_nic(n.ifindex)?;
                qdisc::remove(self.nl.handle(), n.ifindex).await?;
            }
            self.links.remove(&old);
            self.prober.forget_nic(&old);
            self.state.nics.retain(|n| *n != old);
            applied.note(format!("detached {old}"));
        }
        self.state.nics.retain(|n| wanted.contains(n.as_str()));
        Ok(())
    }
}
