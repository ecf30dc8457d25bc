//! havipd: applies the configuration to the dataplane and keeps it applied. The dataplane
//! lives in pinned kernel objects, so this process may stop, crash or restart at any time
//! without interrupting traffic: on start it adopts what is pinned and applies the
//! difference.
//!
//! One task owns the node and handles, in order: link events (failover), a 100 ms tick
//! (failback after hold-down), control requests (`havip bind`), SIGHUP (reload) and
//! SIGTERM/SIGINT (stop, leaving the dataplane running).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use havip_common::{Binding, VipKey};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    announce,
    binder::{decide, LinkState, Placement, Reason},
    config::Config,
    api::{Call, Reply},
    control::{self, Response},
    dataplane::{monotonic_ns, Dataplane},
    netlink::{LinkInfo, Netlink},
    netns,
    pins::PinLayout,
    plan::Desired,
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
    // Egress classes need the NICs' root qdisc: never take one havip does not own unasked.
    if cfg.classes.needs_htb() {
        for (i, nic) in nics.iter().enumerate() {
            let replace = cfg.classes.nics.get(&nic.name).is_some_and(|n| n.replace_qdisc);
            if let crate::qdisc::RootQdisc::Foreign { kind, handle } = crate::qdisc::root_qdisc(nl.handle(), nic.index).await? {
                if !replace {
                    missing.push(format!(
                        "field `nic[{i}]`: {} already has a root qdisc havip did not create ({kind}, handle {:x}:); \
                         set `replace_qdisc = true` on this [[nic]] to replace it, or remove it (tc qdisc del dev {} root)",
                        nic.name, handle >> 16, nic.name));
                }
            }
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("configuration does not fit this node; nothing was applied:\n  - {}", missing.join("\n  - "));
    }
    Ok(Resolved { vip_interface: vip_interface.unwrap(), nics })
}

/// A NIC as the binder and the maps know it.
#[derive(Debug, Clone)]
struct Nic {
    ifindex: u32,
    mac: [u8; 6],
    /// Slot in NIC_STATS.
    index: u32,
}


/// What the ranking knows about one VIP.
#[derive(Default)]
struct Quality {
    memory: crate::rank::VipMemory,
    ranked: Vec<crate::rank::NicScore>,
    decision: Option<crate::rank::Decision>,
}

struct Node {
    /// Probe counters per path over the ranking window: (when, sent, received).
    history: BTreeMap<crate::prober::Path, std::collections::VecDeque<(Instant, u64, u64)>>,
    quality: BTreeMap<IpAddr, Quality>,
    /// Probe slot of each measured path.
    probe_slots: BTreeMap<crate::prober::Path, u32>,
    /// One raw probe socket per (NIC, IPv6?), with the NIC address it sends from.
    probe_sockets: BTreeMap<(String, bool), (std::os::fd::OwnedFd, IpAddr)>,
    probe_seq: u16,
    opts: DaemonOptions,
    nl: Netlink,
    dp: Dataplane,
    state: State,
    /// The configuration in force: the file's plus the held pool VIPs (`pool::overlay`).
    cfg: Config,
    /// The file's configuration alone.
    file_cfg: Config,
    nics: BTreeMap<String, Nic>,
    links: BTreeMap<String, LinkState>,
    /// Controller health for the metrics endpoint (rebinds, applies).
    metrics: std::sync::Arc<crate::metrics::DaemonMetrics>,
}

impl Node {
    /// A failback can only become due within the hold-down after a link change: the tick
    /// re-runs the binder only then.
    fn failback_pending(&self) -> bool {
        let hold = self.cfg.failover.failback_hold_down + Duration::from_millis(500);
        self.links.values().any(|l| l.since.elapsed() <= hold)
    }
}

impl Node {
    /// Brings the dataplane, addresses and state to `cfg`. Only differences are written.
    async fn apply(&mut self, cfg: &Config, res: &Resolved) -> anyhow::Result<String> {
        let mut notes = Vec::new();
        // NICs: attach new ones (or adopt pinned links), detach ones no longer configured.
        let known = self.dp.maps.nic_infos();
        let mut used: BTreeSet<u32> =
            known.iter().filter(|(ifx, _)| res.nics.iter().any(|n| n.index == **ifx)).map(|(_, i)| i.index).collect();
        for nic in &res.nics {
            let report = self.dp.attach(&nic.name, cfg.xdp_mode)?;
            let index = match known.get(&nic.index) {
                Some(info) => info.index,
                None => {
                    let i = (0..).find(|i| !used.contains(i)).unwrap();
                    used.insert(i);
                    self.dp.maps.zero_nic_stats(i)?;
                    i
                }
            };
            self.dp.set_nic(nic.index, &nic.name, nic.mac, index)?;
            self.nics.insert(nic.name.clone(), Nic { ifindex: nic.index, mac: nic.mac, index });
            self.links.entry(nic.name.clone()).or_insert(LinkState { up: nic.up, since: Instant::now() });
            self.host_settings_for_nic(&nic.name)?;
            if !self.state.nics.contains(&nic.name) {
                info!(nic = %nic.name, ifindex = nic.index, xdp = report.xdp_mode, adopted = report.adopted, up = nic.up, "attached");
                notes.push(format!("attached {} ({})", nic.name, report.xdp_mode));
            }
        }
        let wanted: BTreeSet<&str> = cfg.nics.iter().map(String::as_str).collect();
        for old in self.dp.pins.pinned_nics() {
            if !wanted.contains(old.as_str()) {
                crate::dataplane::detach(&self.dp.pins, &old)?;
                if let Some(n) = self.nics.remove(&old) {
                    self.dp.remove_nic(n.ifindex)?;
                    crate::qdisc::remove(self.nl.handle(), n.ifindex).await?;
                }
                self.links.remove(&old);
                notes.push(format!("detached {old}"));
            }
        }
        self.state.nics = cfg.nics.clone();

        // Maps.
        let changes = self.dp.apply_desired(&Desired::from_config(cfg))?;
        if !changes.is_empty() {
            info!(summary = %changes.summary(), "maps updated");
            notes.push(changes.summary());
        }

        // Egress classes, after the maps: a new class's first packets may carry a priority
        // HTB does not know yet and land in the unclassified class for a moment; a removed
        // class's packets stopped carrying its priority before its HTB class goes.
        let class_ids = self.dp.maps.class_ids()?;
        for nic in &res.nics {
            match crate::classes::htb_spec(&cfg.classes, &class_ids, &nic.name) {
                Some(spec) => {
                    let replace = cfg.classes.nics.get(&nic.name).is_some_and(|n| n.replace_qdisc);
                    crate::qdisc::apply(self.nl.handle(), nic.index, &spec, replace)
                        .await
                        .with_context(|| format!("setting up the egress classes of {}", nic.name))?;
                }
                None => {
                    if crate::qdisc::remove(self.nl.handle(), nic.index).await? {
                        info!(nic = %nic.name, "egress classes removed");
                    }
                }
            }
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

        self.setup_probes(cfg).await?;
        // Later steps compare against the configuration in force; record it now.

        // Pins that no longer make sense go.
        self.state.pins.retain(|vip, nic| {
            let keep = cfg.vips.iter().any(|v| v.address == *vip && v.nics.contains(nic));
            if !keep {
                warn!(%vip, %nic, "dropping the operator's pin: no longer a configured VIP/candidate");
            }
            keep
        });
        self.cfg = cfg.clone();
        let moved = self.place_all(None);
        if moved > 0 {
            notes.push(format!("{moved} VIP(s) bound"));
        }
        self.save()?;
        Ok(if notes.is_empty() { "no changes".into() } else { notes.join("; ") })
    }

    /// Host settings a multi-NIC VIP node needs on each NIC (restored by `havip down`):
    /// - `arp_announce = 2`: ARP requests the kernel sends use the NIC's own address as the
    ///   sender, never a VIP, so no NIC but the owner ever claims a VIP on the wire;
    /// - `ignore_routes_with_linkdown = 1` (IPv4 and IPv6): a NIC that lost carrier but is
    ///   administratively up stops attracting routes; otherwise the kernel keeps sending
    ///   there and waits on neighbour resolution that never completes.
    fn host_settings_for_nic(&mut self, nic: &str) -> anyhow::Result<()> {
        for (path, want) in [
            (format!("/proc/sys/net/ipv4/conf/{nic}/arp_announce"), "2"),
            (format!("/proc/sys/net/ipv4/conf/{nic}/ignore_routes_with_linkdown"), "1"),
            (format!("/proc/sys/net/ipv6/conf/{nic}/ignore_routes_with_linkdown"), "1"),
        ] {
            let path = PathBuf::from(path);
            let old = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            if old.trim() != want {
                std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
                if !self.state.sysctls.iter().any(|(p, _)| *p == path) {
                    self.state.sysctls.push((path, old.trim().to_string()));
                }
            }
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.opts.run_dir)
    }

    /// Assigns probe slots to the configured paths and opens their sockets.
    async fn setup_probes(&mut self, cfg: &Config) -> anyhow::Result<()> {
        use crate::prober::{assign_slots, probe_socket, wanted_paths};
        let wanted = wanted_paths(cfg);
        let (slots, freed) = assign_slots(&self.probe_slots, &wanted);
        // A change of probe kind restarts every path's measurement.
        let kind_changed = cfg.probe_kind != self.cfg.probe_kind;
        if kind_changed {
            self.probe_sockets.clear();
        }
        for s in freed {
            self.dp.maps.set_probe_slot(s, None, (0, None))?;
        }
        for (path, &slot) in &slots {
            if kind_changed || self.probe_slots.get(path) != Some(&slot) {
                let ifindex = self.nics.get(&path.nic).map(|n| n.ifindex).context("probe NIC not attached")?;
                self.dp.maps.set_probe_slot(slot, Some((ifindex, path.target)), cfg.probe_kind.wire())?;
            }
            let key = (path.nic.clone(), path.target.is_ipv6());
            if self.probe_sockets.contains_key(&key) {
                continue;
            }
            // Send from the NIC's own address of the target's family.
            let ifindex = self.nics[&path.nic].ifindex;
            let source = self.nl.addresses(ifindex).await?.into_iter().find(|a| {
                a.is_ipv6() == path.target.is_ipv6()
                    && !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())
            });
            match source {
                Some(src) => {
                    self.probe_sockets.insert(key, (probe_socket(&path.nic, src, cfg.probe_kind)?, src));
                    info!(nic = %path.nic, source = %src, kind = ?cfg.probe_kind, "probing from");
                }
                None => warn!(nic = %path.nic, target = %path.target, "no address of the target's family on this NIC: the path is not probed"),
            }
        }
        self.probe_slots = slots;
        Ok(())
    }

    /// Windowed samples of every probed path, from the kernel's counters.
    fn samples(&mut self, now: Instant) -> BTreeMap<(String, IpAddr), crate::rank::Sample> {
        let window = self.cfg.ranking.window;
        let by_slot: BTreeMap<u32, crate::prober::Path> = self.probe_slots.iter().map(|(p, s)| (*s, p.clone())).collect();
        let mut out = BTreeMap::new();
        let Ok(paths) = self.dp.maps.probe_paths() else { return out };
        for (slot, _, st) in paths {
            let Some(path) = by_slot.get(&slot) else { continue };
            let h = self.history.entry(path.clone()).or_default();
            h.push_back((now, st.sent, st.received));
            // Keep one entry older than the window as its base.
            while h.len() > 2 && now.duration_since(h[1].0) > window {
                h.pop_front();
            }
            let (base, last) = (h[0], h[h.len() - 1]);
            let sent = last.1.saturating_sub(base.1);
            let replies = last.2.saturating_sub(base.2).min(sent);
            let rtt_ms = (st.received > 0).then(|| st.rtt_ewma_ns as f64 / 1e6);
            // Probes sent within the last RTT cannot have been answered yet.
            let in_flight = rtt_ms.map(|r| (r / self.cfg.probe_interval.as_secs_f64() / 1000.0).ceil() as u64).unwrap_or(0);
            let lost = (sent - replies).saturating_sub(in_flight);
            let loss_pct = (sent > 0).then(|| 100.0 * lost as f64 / sent as f64);
            let hops = (st.received > 0).then(|| havip_common::hops_from_ttl(st.last_ttl));
            out.insert((path.nic.clone(), path.target), crate::rank::Sample { rtt_ms, loss_pct, hops, sent, replies });
        }
        out
    }

    /// A ranking round: rank every VIP with targets, then let the binder act on the new
    /// preference orders.
    fn rank_round(&mut self) {
        let now = Instant::now();
        let samples = self.samples(now);
        let w = self.cfg.ranking;
        let links = self.links.clone();
        let up = |n: &str| links.get(n).is_some_and(|l| l.up);
        for vip in self.cfg.vips.clone().iter().filter(|v| !v.targets.is_empty()) {
            let Ok(info) = self.dp.maps.vips.get(&VipKey::from(vip.address), 0) else { continue };
            let current = self.current(info.id).ok().and_then(|(c, _)| c);
            let (ranked, complete) = crate::rank::rank(&vip.nics, &vip.targets, &samples, &w);
            let q = self.quality.entry(vip.address).or_default();
            let d = crate::rank::decide(&ranked, complete, current.as_deref(), &up, &mut q.memory, now, &w);
            if q.decision.as_ref().map(|o| &o.why) != Some(&d.why) {
                tracing::debug!(vip = %vip.address, why = %d.why, "ranking");
            }
            q.ranked = ranked;
            q.decision = Some(d);
        }
        self.quality.retain(|ip, _| self.cfg.vips.iter().any(|v| v.address == *ip && !v.targets.is_empty()));
        self.place_all(None);
    }

    fn explain(&self, vip: IpAddr) -> Response {
        let Some(v) = self.cfg.vips.iter().find(|v| v.address == vip) else {
            return Response::refused(format!("{vip} is not a VIP of this node"));
        };
        let Ok(info) = self.dp.maps.vips.get(&VipKey::from(vip), 0) else {
            return Response::refused(format!("{vip} is not in the dataplane yet"));
        };
        let (current, b) = self.current(info.id).unwrap_or((None, Binding::default()));
        let w = &self.cfg.ranking;
        let mut out = format!(
            "{vip} is on {} ({} move(s)){}\ncandidates: {}; links: {}\n",
            current.as_deref().unwrap_or("no NIC"),
            b.moves,
            self.state.pins.get(&vip).map(|p| format!(", pinned to {p}")).unwrap_or_default(),
            v.nics.join(", "),
            v.nics.iter().map(|n| format!("{n} {}", if self.links.get(n).is_some_and(|l| l.up) { "up" } else { "down" })).collect::<Vec<_>>().join(", ")
        );
        if v.targets.is_empty() {
            out += "no targets configured: placed by link state and the configured order only\n";
            return Response::ok(out.trim_end());
        }
        out += &format!(
            "cost = {}*rtt_ms + {}*loss_pct + {}*hops, {:?} over targets; margin {:.0}% (at least {}), hold-down {:.1}s\n",
            w.weight_latency, w.weight_loss, w.weight_hops, w.combine, w.margin * 100.0, w.min_gain, w.hold_down.as_secs_f64()
        );
        let Some(q) = self.quality.get(&vip) else {
            out += "not ranked yet\n";
            return Response::ok(out.trim_end());
        };
        for s in &q.ranked {
            out += &format!(
                "  {:<8} reaches {}/{} target(s), cost {}\n",
                s.nic,
                s.reachable,
                v.targets.len(),
                s.cost.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into())
            );
            for p in &s.paths {
                let score = match p.score {
                    crate::rank::PathScore::Cost(c) => format!("cost {c:.2}"),
                    crate::rank::PathScore::Unreachable => "UNREACHABLE".into(),
                    crate::rank::PathScore::Unknown => "not measured yet".into(),
                };
                out += &format!(
                    "    -> {:<20} rtt {} ms, loss {}%: {score}{}\n",
                    p.target,
                    p.rtt_ms.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
                    p.loss_pct.map(|l| format!("{l:.1}")).unwrap_or_else(|| "-".into()),
                    if p.counted { "" } else { " (no candidate reaches it: ignored)" }
                );
            }
        }
        if let Some(d) = &q.decision {
            out += &format!("decision: {}\n", d.why);
        }
        Response::ok(out.trim_end())
    }

    /// One probe on every path.
    fn send_probes(&mut self) {
        self.probe_seq = self.probe_seq.wrapping_add(1);
        for (path, &slot) in &self.probe_slots {
            let Some((sock, src)) = self.probe_sockets.get(&(path.nic.clone(), path.target.is_ipv6())) else { continue };
            let seq = self.probe_seq;
            let msg = match self.cfg.probe_kind {
                crate::config::ProbeKind::Tcp(port) => crate::prober::tcp_syn(*src, path.target, port, slot, seq as u32),
                crate::config::ProbeKind::Udp(port) => crate::prober::udp_probe(*src, path.target, port, slot, seq as u32),
                crate::config::ProbeKind::Icmp => crate::prober::echo_request(path.target.is_ipv6(), slot, seq),
            };
            if let Err(e) = crate::prober::send(sock, path.target, &msg) {
                tracing::debug!(nic = %path.nic, target = %path.target, error = %e, "probe not sent");
            }
        }
    }

    /// The NIC that owns a VIP now, by name, and its binding.
    fn current(&self, id: u32) -> anyhow::Result<(Option<String>, Binding)> {
        let b = self.dp.maps.binding(id)?;
        let name = (b.ifindex != 0).then(|| self.nics.iter().find(|(_, n)| n.ifindex == b.ifindex).map(|(k, _)| k.clone())).flatten();
        Ok((name, b))
    }

    /// Runs the binder for every VIP (or one) and applies its moves. Returns the moves made.
    fn place_all(&mut self, only: Option<IpAddr>) -> usize {
        let now = Instant::now();
        let hold = self.cfg.failover.failback_hold_down;
        let mut moves = Vec::new();
        for vip in self.cfg.vips.iter().filter(|v| only.is_none_or(|o| o == v.address)) {
            let Ok(info) = self.dp.maps.vips.get(&VipKey::from(vip.address), 0) else { continue };
            let Ok((current, _)) = self.current(info.id) else { continue };
            // Path quality, once measured, orders the candidates instead of the file.
            let q = self.quality.get(&vip.address).and_then(|q| q.decision.as_ref());
            let candidates = q.map(|d| d.order.clone()).unwrap_or_else(|| vip.nics.clone());
            let placement = Placement {
                candidates: &candidates,
                pinned: self.state.pins.get(&vip.address).map(String::as_str),
                current: current.as_deref(),
            };
            if let Some((nic, mut reason)) = decide(placement, &self.links, now, hold) {
                if reason == Reason::Failback && q.is_some_and(|d| d.moves_to.as_deref() == Some(nic.as_str())) {
                    reason = Reason::Quality;
                    info!(vip = %vip.address, decision = %q.unwrap().why, "quality decision");
                }
                moves.push((vip.address, info.id, nic, reason));
            }
        }
        let n = moves.len();
        for (vip, id, nic, reason) in moves {
            if let Err(e) = self.bind(vip, id, &nic, reason) {
                error!(%vip, %nic, error = %format!("{e:#}"), "binding failed");
            }
        }
        n
    }

    /// Moves a VIP to `nic`: one map write, then announcements from the new NIC.
    fn bind(&mut self, vip: IpAddr, id: u32, nic: &str, reason: Reason) -> anyhow::Result<()> {
        let n = self.nics.get(nic).context("unknown NIC")?.clone();
        let (from, old) = self.current(id)?;
        let b = Binding {
            ifindex: n.ifindex,
            nic_index: n.index,
            mac: n.mac,
            _pad: [0; 2],
            bound_at_ns: monotonic_ns(),
            moves: old.moves + u64::from(old.ifindex != 0),
        };
        self.dp.maps.set_binding(id, b)?;
        let links: Vec<String> = self.links.iter().map(|(k, l)| format!("{k}={}", if l.up { "up" } else { "down" })).collect();
        info!(%vip, from = from.as_deref().unwrap_or("-"), to = nic, %reason, links = %links.join(","), moves = b.moves, "VIP bound");
        self.metrics.rebound(reason);
        let event = crate::events::Move { at_ms: crate::events::now_ms(), vip, from, to: nic.to_string(), reason: reason.to_string(), moves: b.moves };
        if let Err(e) = crate::events::record(&self.opts.run_dir, &event) {
            warn!(error = %e, "cannot record the move in the event log");
        }
        let (count, interval) = (self.cfg.failover.announce_count, self.cfg.failover.announce_interval);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = announce::announce(n.ifindex, n.mac, vip, count, interval) {
                warn!(%vip, error = %format!("{e:#}"), "announcement failed");
            }
        });
        Ok(())
    }

    fn on_link(&mut self, link: LinkInfo, deleted: bool) {
        let Some(state) = self.links.get_mut(&link.name) else { return };
        let up = link.up && !deleted;
        if state.up == up {
            return;
        }
        *state = LinkState { up, since: Instant::now() };
        info!(nic = %link.name, up, "link changed");
        if !up && !deleted {
            self.invalidate_ipv6_route_caches(link.index);
        }
        if deleted {
            warn!(nic = %link.name, "NIC removed; its VIPs move (reload to re-attach if it returns)");
        }
        self.place_all(None);
    }

    /// Connected sockets cache their route. When a NIC loses carrier, IPv4 drops those
    /// caches but IPv6 does not (its routes only get `linkdown`), so IPv6 connections keep
    /// queueing on the dead NIC behind a neighbour entry that never resolves. Removing an
    /// IPv6 address bumps the kernel's IPv6 route generation, which makes every socket
    /// route again: havipd adds and removes a throwaway link-local /128 on the dead NIC.
    fn invalidate_ipv6_route_caches(&self, ifindex: u32) {
        let nl = self.nl.clone();
        tokio::spawn(async move {
            let probe: IpAddr = "fe80::ffff:ffff:ffff:fffe".parse().unwrap();
            let r = async {
                nl.add_host_address(ifindex, probe).await?;
                nl.del_address(ifindex, probe).await
            }
            .await;
            if let Err(e) = r {
                warn!(ifindex, error = %format!("{e:#}"), "cannot invalidate IPv6 route caches");
            }
        });
    }

    /// One API call, decided here on the node's task so calls never race each other.
    async fn on_api(&mut self, call: Call) -> Reply {
        match call {
            Call::Request(r) => self.pool_request(r).await,
            Call::Release { app, vip } => self.pool_release(&app, vip).await,
            Call::List => self.pool_list(),
            Call::Bind { vip, nic } => self.operator_bind(vip, nic).reply(),
            Call::Unbind { vip } => self.operator_unbind(vip).reply(),
            Call::Explain { vip } => self.explain(vip).reply(),
            Call::Rerank => {
                self.rank_round();
                Reply::message(format!("ranked {} VIP(s) with targets", self.quality.len()))
            }
        }
    }

    /// `POST /v1/vips`: the best-ranked usable pool VIP, bound and remapped in one apply;
    /// on any failure the allocation is undone and the reply says why.
    async fn pool_request(&mut self, r: crate::pool::VipRequest) -> Reply {
        use crate::pool::{check, choose, Allocation, Refusal};
        let refused = |e: Refusal| match e {
            Refusal::Bad { field, reason } => Reply::error(400, format!("field `{field}`: {reason}")),
            Refusal::Conflict(m) => Reply::error(409, m),
            Refusal::NotFound(m) => Reply::error(404, m),
        };
        if let Err(e) = check(&self.file_cfg, &r, &self.state.allocations) {
            return refused(e);
        }
        let samples = self.samples(Instant::now());
        let weights = self.cfg.ranking;
        let cost = |v: &crate::config::Vip| {
            if r.targets.is_empty() {
                return None;
            }
            let (ranked, _) = crate::rank::rank(&v.nics, &r.targets, &samples, &weights);
            let best = ranked.first()?;
            Some((best.cost?, best.nic.clone()))
        };
        let (vip, why) = match choose(&self.file_cfg, &self.state.allocations, &r, cost) {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
        let a = Allocation {
            app: r.app.clone(),
            vip,
            exclusive: r.exclusive,
            protocol: r.protocol,
            service_port: r.service_port,
            instance_port: r.instance_port,
            targets: r.targets.clone(),
            class: r.class.clone(),
            at_ms: crate::events::now_ms(),
        };
        self.state.allocations.push(a.clone());
        if let Err(e) = self.apply_allocations().await {
            self.state.allocations.pop();
            let undo = self.apply_allocations().await;
            error!(app = %r.app, %vip, error = %format!("{e:#}"), undone = undo.is_ok(), "VIP request failed; undone");
            return Reply::error(500, format!("applying {vip} failed: {e:#}; nothing is held"));
        }
        let nic = self.nic_of(vip);
        info!(app = %a.app, %vip, nic = nic.as_deref().unwrap_or("-"), exclusive = a.exclusive, service_port = a.service_port, instance_port = a.instance_port, %why, "VIP granted");
        Reply::json(201, serde_json::json!({ "vip": vip, "nic": nic, "why": why, "allocation": a }))
    }

    /// `DELETE /v1/vips/{app}`: drops the app's allocations (or the one on `vip`); a pool
    /// VIP nobody holds leaves the dataplane with its address and mappings.
    async fn pool_release(&mut self, app: &str, vip: Option<IpAddr>) -> Reply {
        let before = self.state.allocations.clone();
        self.state.allocations.retain(|a| !(a.app == app && vip.is_none_or(|v| v == a.vip)));
        let released: Vec<_> = before.iter().filter(|a| !self.state.allocations.contains(a)).cloned().collect();
        if released.is_empty() {
            return Reply::error(404, format!("`{app}` holds no VIP{}", vip.map(|v| format!(" {v}")).unwrap_or_default()));
        }
        if let Err(e) = self.apply_allocations().await {
            self.state.allocations = before;
            let _ = self.apply_allocations().await;
            return Reply::error(500, format!("releasing failed: {e:#}; nothing changed"));
        }
        info!(%app, released = released.len(), "VIP(s) released");
        Reply::json(200, serde_json::json!({ "released": released }))
    }

    /// `GET /v1/vips`: the pool, what is held, by whom, and where each VIP is.
    fn pool_list(&self) -> Reply {
        let held: Vec<serde_json::Value> = self
            .state
            .allocations
            .iter()
            .map(|a| serde_json::json!({ "allocation": a, "nic": self.nic_of(a.vip) }))
            .collect();
        let free: Vec<IpAddr> = self.file_cfg.pool.iter().map(|v| v.address).filter(|v| !self.state.allocations.iter().any(|a| a.vip == *v)).collect();
        Reply::json(200, serde_json::json!({
            "pool": self.file_cfg.pool.iter().map(|v| v.address).collect::<Vec<_>>(),
            "free": free,
            "reserve": self.file_cfg.pool_reserve,
            "held": held,
        }))
    }

    /// The NIC a VIP is bound to now, if any.
    fn nic_of(&self, vip: IpAddr) -> Option<String> {
        let info = self.dp.maps.vips.get(&VipKey::from(vip), 0).ok()?;
        self.current(info.id).ok().and_then(|(c, _)| c)
    }

    /// Applies the file's configuration plus the held pool VIPs, and saves the state.
    async fn apply_allocations(&mut self) -> anyhow::Result<String> {
        let cfg = crate::pool::overlay(&self.file_cfg, &self.state.allocations);
        let res = resolve(&cfg, &self.nl).await?;
        let summary = self.apply(&cfg, &res).await?;
        self.save()?;
        Ok(summary)
    }

    fn operator_bind(&mut self, vip: IpAddr, nic: String) -> Response {
        let Some(v) = self.cfg.vips.iter().find(|v| v.address == vip) else {
            return Response::refused(format!("{vip} is not a VIP of this node"));
        };
        if !self.nics.contains_key(&nic) {
            return Response::refused(format!("unknown NIC `{nic}`; this node's NICs: {}", self.cfg.nics.join(", ")));
        }
        if !v.nics.contains(&nic) {
            return Response::refused(format!("NIC `{nic}` is not a candidate for {vip} (candidates: {})", v.nics.join(", ")));
        }
        if !self.links.get(&nic).is_some_and(|l| l.up) {
            return Response::refused(format!("NIC `{nic}` is down; refusing to bind {vip} to it"));
        }
        let Ok(info) = self.dp.maps.vips.get(&VipKey::from(vip), 0) else {
            return Response::refused(format!("{vip} is not in the dataplane yet"));
        };
        self.state.pins.insert(vip, nic.clone());
        let current = self.current(info.id).ok().and_then(|(c, _)| c);
        let msg = if current.as_deref() == Some(nic.as_str()) {
            format!("{vip} is on {nic}; pinned there")
        } else if let Err(e) = self.bind(vip, info.id, &nic, Reason::Operator) {
            self.state.pins.remove(&vip);
            return Response::refused(format!("binding failed: {e:#}"));
        } else {
            format!("{vip} moved from {} to {nic}; pinned there", current.as_deref().unwrap_or("-"))
        };
        match self.save() {
            Ok(()) => Response::ok(msg),
            Err(e) => Response::refused(format!("{msg}, but saving the pin failed: {e:#}")),
        }
    }

    fn operator_unbind(&mut self, vip: IpAddr) -> Response {
        if self.state.pins.remove(&vip).is_none() {
            return Response::refused(format!("{vip} is not pinned (nothing to unbind)"));
        }
        self.place_all(Some(vip));
        let now = self
            .dp
            .maps
            .vips
            .get(&VipKey::from(vip), 0)
            .ok()
            .and_then(|i| self.current(i.id).ok())
            .and_then(|(c, _)| c)
            .unwrap_or_else(|| "-".into());
        if let Err(e) = self.save() {
            return Response::refused(format!("saving state failed: {e:#}"));
        }
        Response::ok(format!("{vip} unpinned; automatic placement keeps it on {now}"))
    }

    async fn reload(&mut self) {
        self.state.generation += 1;
        let result = async {
            let file = Config::load(&self.opts.config)?;
            if file.passive_tcp != self.cfg.passive_tcp {
                warn!(passive_tcp = file.passive_tcp, "passive.tcp changes when the programs load: restart havipd to apply it");
            }
            if file.metrics != self.cfg.metrics {
                warn!(listen = ?file.metrics, "metrics.listen changes when havipd starts: restart havipd to apply it");
            }
            let (kept, dropped) = held_that_fit(&file, &self.state.allocations);
            let cfg = crate::pool::overlay(&file, &kept);
            let res = resolve(&cfg, &self.nl).await?;
            let summary = self.apply(&cfg, &res).await?;
            for a in &dropped {
                warn!(app = %a.app, vip = %a.vip, "released: its pool VIP or class is no longer configured");
            }
            self.state.allocations = kept;
            self.file_cfg = file;
            anyhow::Ok(summary)
        }
        .await;
        let status = match result {
            Ok(summary) => {
                info!(%summary, "reload applied");
                // NICs or targets may have changed: rank now, not at the next round.
                self.rank_round();
                ApplyStatus::now(true, summary)
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload rejected; the running state is unchanged");
                ApplyStatus::now(false, format!("{e:#}"))
            }
        };
        self.metrics.applied(status.ok, self.state.generation);
        self.state.last_apply = Some(status);
        if let Err(e) = self.save() {
            error!(error = %e, "cannot write the state file");
        }
    }
}

/// Allocations whose pool VIP (and class) `cfg` still has, and those it does not.
fn held_that_fit(cfg: &Config, held: &[crate::pool::Allocation]) -> (Vec<crate::pool::Allocation>, Vec<crate::pool::Allocation>) {
    held.iter().cloned().partition(|a| crate::pool::still_valid(cfg, a))
}

async fn serve(opts: DaemonOptions) -> anyhow::Result<()> {
    // Validate before touching anything.
    let cfg = Config::load(&opts.config)?;
    let nl = Netlink::new()?;
    // Subscribe to link events before reading link states, so no change falls in between.
    let mut link_events = crate::netlink::watch_links()?;
    let res = resolve(&cfg, &nl).await?;
    // Before anything is applied: a metrics address already taken changes nothing.
    let metrics = crate::metrics::DaemonMetrics::new();
    crate::metrics::serve(cfg.metrics, &opts.pin_root, &opts.run_dir, metrics.clone()).await?;

    let pins = PinLayout::new(&opts.pin_root);
    let adopting = pins.exists();
    let mut dp = Dataplane::open_with(&opts.pin_root, cfg.passive_tcp)?;
    dp.pin_programs()?;
    if let Err(e) = dp.attach_queue_drops() {
        warn!(error = format!("{e:#}"), "CPU-queue drops will not be counted");
    }
    let mut state = State::load(&opts.run_dir)?.unwrap_or_default();
    if let Some(pid) = state.live_pid() {
        if pid != std::process::id() {
            anyhow::bail!("another havipd (pid {pid}) is running with run directory {}; stop it first", opts.run_dir.display());
        }
    }
    state.pid = Some(std::process::id());
    state.config_path = Some(std::fs::canonicalize(&opts.config).unwrap_or(opts.config.clone()));
    state.netns = opts.netns.clone();
    std::fs::create_dir_all(&opts.run_dir)?;
    // Pool VIPs applications held before a restart are held again.
    let (kept, dropped) = held_that_fit(&cfg, &state.allocations);
    for a in &dropped {
        warn!(app = %a.app, vip = %a.vip, "released: its pool VIP or class is no longer configured");
    }
    state.allocations = kept;
    let file_cfg = cfg;
    let cfg = crate::pool::overlay(&file_cfg, &state.allocations);
    let mut node = Node {
        history: BTreeMap::new(),
        quality: BTreeMap::new(),
        probe_slots: BTreeMap::new(),
        probe_sockets: BTreeMap::new(),
        probe_seq: 0,
        opts,
        nl,
        dp,
        state,
        cfg: cfg.clone(),
        file_cfg,
        nics: BTreeMap::new(),
        links: BTreeMap::new(),
        metrics,
    };
    if adopting {
        info!(pins = %node.opts.pin_root.display(), "adopting the pinned dataplane");
    }
    node.state.generation += 1;
    let summary = node.apply(&cfg, &res).await.context("applying the configuration")?;
    node.state.last_apply = Some(ApplyStatus::now(true, summary.clone()));
    node.metrics.applied(true, node.state.generation);

    let sock = control::socket_path(&node.opts.run_dir);
    let (tx, mut rx) = mpsc::channel(256);
    crate::api::serve_unix(&sock, node.file_cfg.api.socket_group.as_deref(), tx.clone())?;
    if let (Some(addr), Some(token_file)) = (node.file_cfg.api.listen, node.file_cfg.api.token_file.clone()) {
        crate::api::serve_tcp(addr, crate::api::read_token(&token_file)?, tx.clone()).await?;
        info!(%addr, "API also on TCP (bearer token)");
    }
    node.save()?;
    info!(config = %node.opts.config.display(), vips = cfg.vips.len(), mappings = cfg.remaps.len(), %summary, "havipd ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rank_every = node.cfg.ranking.interval;
    let mut rank_tick = tokio::time::interval(rank_every);
    rank_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_every = node.cfg.probe_interval;
    let mut probe_tick = tokio::time::interval(probe_every);
    probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some((link, deleted)) = link_events.recv() => node.on_link(link, deleted),
            Some((call, reply)) = rx.recv() => { let r = node.on_api(call).await; let _ = reply.send(r); }
            _ = tick.tick() => {
                if node.failback_pending() {
                    node.place_all(None);
                }
            }
            _ = probe_tick.tick() => node.send_probes(),
            _ = rank_tick.tick() => node.rank_round(),
            _ = hup.recv() => {
                info!("SIGHUP: reloading");
                node.reload().await;
                if node.cfg.probe_interval != probe_every {
                    probe_every = node.cfg.probe_interval;
                    probe_tick = tokio::time::interval(probe_every);
                }
                if node.cfg.ranking.interval != rank_every {
                    rank_every = node.cfg.ranking.interval;
                    rank_tick = tokio::time::interval(rank_every);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // The dataplane stays: pinned programs keep serving traffic until `havip down`.
    node.state.pid = None;
    let _ = std::fs::remove_file(&sock);
    if let Err(e) = node.save() {
        warn!(error = %e, "cannot write the state file");
    }
    info!("havipd stopped; the dataplane keeps running (havip down removes it)");
    Ok(())
}
