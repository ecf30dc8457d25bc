//! Live statistics read straight from the pinned maps: works whether havipd runs or not.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use havip_common::{DirCounters, Direction, NicCounters, Outcome, VipCounters, WireCounters};
use serde::Serialize;

use crate::{
    config::Protocol,
    kernel::dataplane::{monotonic_ns, Maps},
    kernel::pins::PinLayout,
};

#[derive(Debug, Clone, Serialize)]
pub struct VipStats {
    pub vip: IpAddr,
    pub id: u32,
    /// The NIC that owns the VIP ("-" when unbound).
    pub nic: String,
    /// Seconds since the VIP was bound to that NIC.
    pub bound_for_secs: Option<f64>,
    /// Moves between NICs so far.
    pub moves: u64,
    /// The operator's pin, if any (from havipd's state file).
    pub pinned: Option<String>,
    /// (protocol, designated port, instance port)
    pub mappings: Vec<MappingRow>,
    pub rx: DirCounters,
    pub tx: DirCounters,
    pub wire: WireCounters,
    /// Paths from the VIP's candidate NICs to its targets (needs havipd's config file).
    pub paths: Vec<PathStats>,
    /// Peers seen in live TCP traffic (passive RTT), busiest first.
    pub peers: Vec<PeerStats>,
    /// The VIP's default application class, if any.
    pub class: Option<String>,
    /// Its traffic per class (the default class and ports with their own).
    pub classes: Vec<VipClassStats>,
}

/// One VIP's traffic in one class.
#[derive(Debug, Clone, Serialize)]
pub struct VipClassStats {
    pub class: String,
    #[serde(flatten)]
    pub counters: havip_common::ClassCounters,
}

/// One class: its CPU queues (what each CPU took off them, and the kernel's queue-full
/// drops) and its HTB class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassStats {
    pub class: String,
    pub id: u32,
    pub cpus: Vec<u32>,
    /// Frames the class's CPU queues delivered, per CPU (index = CPU).
    pub processed_per_cpu: Vec<u64>,
    pub processed_bytes: u64,
    /// Frames the kernel dropped because a queue of the class's CPUs was full (a CPU's
    /// queue is shared by the classes on it).
    pub queue_drops: u64,
    /// skb priority of its HTB class (0: no egress class).
    pub skb_priority: u32,
}

/// A measured path: probes from a NIC's own address to a target.
#[derive(Debug, Clone, Serialize)]
pub struct PathStats {
    pub nic: String,
    pub target: IpAddr,
    pub sent: u64,
    pub received: u64,
    /// Probes without a reply, percent (the one in flight counts until it returns).
    pub loss_pct: Option<f64>,
    /// Moving average (weight 1/8) of the kernel-measured RTT.
    pub rtt_ewma_ms: Option<f64>,
    /// From the log2 histogram: the upper edge of the bucket holding the quantile.
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    /// Routers on the way back, from the reply's TTL / hop limit.
    pub hops: Option<u64>,
}

impl PathStats {
    fn from_kernel(nic: String, target: IpAddr, st: &havip_common::ProbeStats) -> Self {
        let hops = (st.received > 0).then(|| havip_common::hops_from_ttl(st.last_ttl));
        Self {
            nic,
            target,
            sent: st.sent,
            received: st.received,
            loss_pct: st.loss().map(|l| l * 100.0),
            rtt_ewma_ms: (st.received > 0).then(|| st.rtt_ewma_ns as f64 / 1e6),
            rtt_p50_ms: st.rtt_quantile_us(0.5).map(|u| u / 1000.0),
            rtt_p99_ms: st.rtt_quantile_us(0.99).map(|u| u / 1000.0),
            hops,
        }
    }
}

/// Passive TCP measurement of one peer of a VIP through one NIC.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStats {
    pub peer: IpAddr,
    pub nic: String,
    pub samples: u64,
    pub rtt_ewma_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub retransmits: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NicStats {
    pub nic: String,
    pub ifindex: u32,
    pub counters: NicCounters,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappingRow {
    pub protocol: String,
    pub designated_port: u16,
    pub instance_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub vips: Vec<VipStats>,
    pub nics: Vec<NicStats>,
    /// Every measured path.
    pub paths: Vec<PathStats>,
    pub classes: Vec<ClassStats>,
    /// Packets by outcome, per direction: what the programs did with everything they saw.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(skip)]
    pub taken: Option<Instant>,
}

impl Snapshot {
    /// Reads the pinned maps; `state` (havipd's state file, if any) adds operator pins.
    pub fn read(pins: &PinLayout, state: Option<&crate::node::state::State>) -> anyhow::Result<Self> {
        let maps = Maps::open(pins)?;
        let nic_names = maps.nic_names();
        let actual = maps.read_actual(None)?;
        let mut mappings: BTreeMap<u32, Vec<MappingRow>> = BTreeMap::new();
        for (k, v) in &actual.remap_in {
            mappings.entry(k.vip_id).or_default().push(MappingRow {
                protocol: Protocol::from_number(k.proto).map(|p| p.to_string()).unwrap_or_else(|| k.proto.to_string()),
                designated_port: u16::from_be(k.port_be),
                instance_port: u16::from_be(v.port_be),
            });
        }
        let mut vips = Vec::new();
        let mut paths = Vec::new();
        for (_, slot, st) in maps.probe_paths()? {
            let nic = nic_names.get(&slot.ifindex).cloned().unwrap_or_else(|| format!("if{}", slot.ifindex));
            paths.push(PathStats::from_kernel(nic, slot.target.to_ip(), &st));
        }
        paths.sort_by(|a, b| (&a.nic, a.target).cmp(&(&b.nic, b.target)));
        // Which paths belong to which VIP is in the configuration havipd runs.
        let cfg = state.and_then(|s| s.config_path.as_ref()).and_then(|p| crate::config::Config::load(p).ok());

        let index_names: BTreeMap<u32, String> = maps.nic_infos().values().map(|i| (i.index, i.name().to_string())).collect();
        let mut peers: BTreeMap<u32, Vec<PeerStats>> = BTreeMap::new();
        for (k, st) in maps.peer_quality.iter().flatten() {
            let q = |p: f64| havip_common::hist_quantile_us(&st.rtt_hist, p).map(|u| u / 1000.0);
            peers.entry(k.vip_id).or_default().push(PeerStats {
                peer: k.peer.to_ip(),
                nic: index_names.get(&k.nic_index).cloned().unwrap_or_else(|| format!("#{}", k.nic_index)),
                samples: st.samples,
                rtt_ewma_ms: (st.samples > 0).then(|| st.rtt_ewma_ns as f64 / 1e6),
                rtt_p50_ms: q(0.5),
                rtt_p99_ms: q(0.99),
                retransmits: st.retransmits,
            });
        }
        for v in peers.values_mut() {
            v.sort_by_key(|p| std::cmp::Reverse(p.samples));
        }

        let now = monotonic_ns();
        for (key, info) in &actual.vips {
            let VipCounters { rx, tx, wire } = maps.vip_counters(info.id)?;
            let b = maps.binding(info.id)?;
            let nic = match b.ifindex {
                0 => "-".to_string(),
                i => nic_names.get(&i).cloned().unwrap_or_else(|| format!("if{i}")),
            };
            let bound_for_secs = (b.ifindex != 0).then(|| now.saturating_sub(b.bound_at_ns) as f64 / 1e9);
            let mut m = mappings.remove(&info.id).unwrap_or_default();
            m.sort();
            let vip = key.to_ip();
            let pinned = state.and_then(|s| s.pins.get(&vip).cloned());
            let vip_paths = cfg
                .as_ref()
                .and_then(|c| c.vips.iter().find(|v| v.address == vip))
                .map(|v| paths.iter().filter(|p| v.nics.contains(&p.nic) && v.targets.contains(&p.target)).cloned().collect())
                .unwrap_or_default();
            let class_name = |id: u32| actual.classes.get(&id).map(|c| c.name().to_string()).unwrap_or_else(|| format!("#{id}"));
            let mut vip_classes = Vec::new();
            for k in actual.class_stats.iter().filter(|k| k.vip_id == info.id) {
                let mut counters = havip_common::ClassCounters::default();
                for c in maps.class_stats.get(k, 0)?.iter() {
                    counters.add(c);
                }
                vip_classes.push(VipClassStats { class: class_name(k.class), counters });
            }
            vips.push(VipStats {
                vip,
                class: (info.class != 0).then(|| class_name(info.class)),
                classes: vip_classes,
                id: info.id,
                nic,
                bound_for_secs,
                moves: b.moves,
                pinned,
                mappings: m,
                rx,
                tx,
                wire,
                paths: vip_paths,
                peers: peers.remove(&info.id).unwrap_or_default(),
            });
        }
        let mut nics = Vec::new();
        for (ifindex, info) in maps.nic_infos() {
            nics.push(NicStats { nic: info.name().to_string(), ifindex, counters: maps.nic_counters(info.index)? });
        }
        nics.sort_by(|a, b| a.nic.cmp(&b.nic));
        vips.sort_by_key(|v| (v.vip.is_ipv6(), v.vip));
        let totals = maps.outcome_totals()?;
        let mut outcomes = BTreeMap::new();
        for (dir, name) in [(Direction::Ingress, "ingress"), (Direction::Egress, "egress")] {
            let per: BTreeMap<String, u64> = Outcome::ALL.iter().map(|o| (o.name().to_string(), totals[o.index(dir) as usize])).collect();
            outcomes.insert(name.to_string(), per);
        }
        let mut classes = Vec::new();
        for (&id, info) in &actual.classes {
            let per_cpu = maps.queue_stats.get(&id, 0)?;
            let cpus: Vec<u32> = info.cpus[..(info.ncpus as usize).min(info.cpus.len())].to_vec();
            let mut queue_drops = 0;
            for &cpu in &cpus {
                queue_drops += maps.cpu_queues.get(&cpu, 0)?.iter().map(|q| q.drops).sum::<u64>();
            }
            classes.push(ClassStats {
                class: info.name().to_string(),
                id,
                cpus,
                processed_per_cpu: per_cpu.iter().map(|q| q.packets).collect(),
                processed_bytes: per_cpu.iter().map(|q| q.bytes).sum(),
                queue_drops,
                skb_priority: info.skb_priority,
            });
        }
        Ok(Self { vips, nics, paths, classes, outcomes, taken: Some(Instant::now()) })
    }

    pub fn vip(&self, ip: IpAddr) -> Option<&VipStats> {
        self.vips.iter().find(|v| v.vip == ip)
    }
}

/// Human-readable counts: 1234567 -> "1.2M".
pub fn human(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=9_999_999 => format!("{:.1}k", n as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

fn human_secs(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.0}h", s / 3600.0),
        s => format!("{:.0}d", s / 86400.0),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n}B"),
        10_000..=9_999_999 => format!("{:.1}kB", n as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1}MB", n as f64 / 1e6),
        _ => format!("{:.1}GB", n as f64 / 1e9),
    }
}

/// The per-VIP table (fits 80 columns). With `prev`, packet columns show rates.
pub fn render_table(now: &Snapshot, prev: Option<&Snapshot>) -> String {
    let mut out = String::new();
    let rates = prev.and_then(|p| Some((p, now.taken?.duration_since(p.taken?).as_secs_f64())));
    let header = if rates.is_some() {
        format!("{:<22} {:<8} {:>9} {:>8} {:>9} {:>8} {:>7} {:>5}\n", "VIP", "NIC", "IN pkt/s", "IN B/s", "OUT pkt/s", "OUT B/s", "REMAP", "DROP")
    } else {
        format!("{:<22} {:<8} {:>9} {:>8} {:>9} {:>8} {:>7} {:>5}\n", "VIP", "NIC", "IN PKTS", "IN BYTES", "OUT PKTS", "OUT BYTES", "REMAP", "DROP")
    };
    out.push_str(&header);
    for v in &now.vips {
        let (inp, inb, outp, outb) = match rates {
            Some((p, secs)) if secs > 0.0 => {
                let old = p.vip(v.vip);
                let d = |f: fn(&VipStats) -> u64| {
                    let before = old.map(f).unwrap_or(0);
                    (f(v).saturating_sub(before) as f64 / secs) as u64
                };
                (human(d(|s| s.rx.packets)), human_bytes(d(|s| s.rx.bytes)), human(d(|s| s.tx.packets)), human_bytes(d(|s| s.tx.bytes)))
            }
            _ => (human(v.rx.packets), human_bytes(v.rx.bytes), human(v.tx.packets), human_bytes(v.tx.bytes)),
        };
        out.push_str(&format!(
            "{:<22} {:<8} {:>9} {:>8} {:>9} {:>8} {:>7} {:>5}\n",
            v.vip.to_string(),
            v.nic,
            inp,
            inb,
            outp,
            outb,
            human(v.rx.remapped + v.tx.remapped),
            human(v.rx.dropped + v.tx.dropped)
        ));
        let age = v.bound_for_secs.map(human_secs).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  bound {age} ago, {} move(s){}; misdirected {}, steered {}, arp/nd answered {}/{}, dropped on other NICs {}\n",
            v.moves,
            v.pinned.as_ref().map(|p| format!(", pinned to {p}")).unwrap_or_default(),
            human(v.wire.misdirected),
            human(v.wire.steered),
            human(v.wire.arp_replies),
            human(v.wire.nd_replies),
            human(v.wire.neigh_dropped),
        ));
        for m in &v.mappings {
            out.push_str(&format!("  {} :{} -> :{}\n", m.protocol, m.designated_port, m.instance_port));
        }
        for c in &v.classes {
            let k = &c.counters;
            out.push_str(&format!(
                "  class {}{}: in {} pkts / {} ({} to its CPU queue), out {} pkts / {}\n",
                c.class,
                if v.class.as_deref() == Some(c.class.as_str()) { " (default)" } else { "" },
                human(k.rx_packets),
                human_bytes(k.rx_bytes),
                human(k.rx_queued),
                human(k.tx_packets),
                human_bytes(k.tx_bytes)
            ));
        }
        for p in v.peers.iter().take(5) {
            out.push_str(&format!(
                "  peer {} via {}: tcp rtt {} ms, {} sample(s), {} retransmit(s)\n",
                p.peer,
                p.nic,
                p.rtt_ewma_ms.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
                human(p.samples),
                human(p.retransmits)
            ));
        }
        for p in &v.paths {
            let ms = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "  path {} -> {}: rtt {} ms (p50 {}, p99 {}), loss {}%, hops {}\n",
                p.nic,
                p.target,
                ms(p.rtt_ewma_ms),
                ms(p.rtt_p50_ms),
                ms(p.rtt_p99_ms),
                p.loss_pct.map(|l| format!("{l:.1}")).unwrap_or_else(|| "-".into()),
                p.hops.map(|h| h.to_string()).unwrap_or_else(|| "-".into())
            ));
        }
    }
    if now.vips.is_empty() {
        out.push_str("(no VIPs configured)\n");
    }
    if !now.classes.is_empty() {
        out.push_str(&format!("\n{:<16} {:<10} {:<24} {:>10} {:>11}\n", "CLASS", "CPUS", "PROCESSED PER CPU", "BYTES", "QUEUE DROPS"));
        for c in &now.classes {
            let cpus = if c.cpus.is_empty() { "-".into() } else { c.cpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",") };
            let per_cpu: Vec<String> = c.processed_per_cpu.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| format!("{i}:{}", human(*n))).collect();
            let per_cpu = if per_cpu.is_empty() { "-".into() } else { per_cpu.join(" ") };
            out.push_str(&format!("{:<16} {:<10} {:<24} {:>10} {:>11}\n", c.class, cpus, per_cpu, human_bytes(c.processed_bytes), human(c.queue_drops)));
        }
    }
    if !now.nics.is_empty() {
        out.push_str(&format!("\n{:<10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n", "NIC", "VIP IN", "IN BYTES", "VIP OUT", "OUT BYTES", "ARP ANS", "ND ANS"));
        for n in &now.nics {
            let c = &n.counters;
            out.push_str(&format!(
                "{:<10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n",
                n.nic,
                human(c.rx_packets),
                human_bytes(c.rx_bytes),
                human(c.tx_packets),
                human_bytes(c.tx_bytes),
                human(c.arp_replies),
                human(c.nd_replies)
            ));
        }
    }
    let interesting: Vec<String> = now
        .outcomes
        .iter()
        .flat_map(|(dir, per)| {
            per.iter()
                .filter(|(name, &n)| n > 0 && !matches!(name.as_str(), "vip_passed" | "vip_remapped"))
                .map(move |(name, n)| format!("{dir} {name}={}", human(*n)))
        })
        .collect();
    if !interesting.is_empty() {
        out.push_str(&format!("other packets: {}\n", interesting.join(", ")));
    }
    out
}
