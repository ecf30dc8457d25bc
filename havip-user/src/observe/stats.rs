//! Live statistics read straight from the pinned maps: works whether havipd runs or not.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use anyhow::Context;
use aya::util::nr_cpus;
use havip_common::{
    maps as m, BindingCell, ClassCounters, HookReason, IngressHook, ClassInfo, ClassStatsKey, CpuQueueCounters, DirCounters, Direction, NicCounters, NicInfo, Outcome, PassiveStats,
    PeerKey, PortValue, ProbeSlot, ProbeStats, QueueCounters, RemapKey, VipCounters, VipInfo, VipKey, WireCounters,
};
use serde::Serialize;

use crate::{
    config::Protocol,
    kernel::bpf_read::{self, PinnedMap},
    kernel::map_layout::{self, PinnedVersion},
    kernel::dataplane::monotonic_ns,
    kernel::pins::PinLayout,
};

/// Array elements this far apart are read in one batch call: a few unused elements cost
/// less than another call.
const RUN_GAP: u32 = 64;

/// Each VIP's candidate NICs and targets, from the config file havipd runs: all a snapshot
/// needs of it, to say which measured paths are a VIP's.
type VipPaths = BTreeMap<IpAddr, (Vec<String>, Vec<IpAddr>)>;

/// The file's identity and last change: a different value means the file may differ.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).ok()?;
        Some(Self { path: path.to_path_buf(), modified: md.modified().ok()?, len: md.len(), inode: md.ino() })
    }
}

/// The config's VIP paths, parsed again only when the file changed (its path, mtime, size
/// or inode). Loading validates the whole file, which costs more than all the map reads of
/// a snapshot and would be repeated at every `havip top` refresh and `--watch` tick for an
/// answer that only changes when the file does. A file that does not load gives no paths,
/// and that verdict too is kept until the file changes.
struct ConfigPathsCache {
    entry: Mutex<Option<(FileStamp, Option<Arc<VipPaths>>)>>,
    parses: std::sync::atomic::AtomicU64,
}

static VIP_PATHS: ConfigPathsCache = ConfigPathsCache::new();

impl ConfigPathsCache {
    const fn new() -> Self {
        Self { entry: Mutex::new(None), parses: std::sync::atomic::AtomicU64::new(0) }
    }

    /// The VIP paths of the config at `path` (`None` if it does not load).
    fn get(&self, path: &Path) -> Option<Arc<VipPaths>> {
        let stamp = FileStamp::of(path)?;
        let mut entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, paths)) = entry.as_ref() {
            if *cached == stamp {
                return paths.clone();
            }
        }
        self.parses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let paths = crate::config::Config::load(path).ok().map(|c| {
            let mut out = VipPaths::new();
            for v in c.vips {
                out.entry(v.address).or_insert((v.nics, v.targets));
            }
            Arc::new(out)
        });
        *entry = Some((stamp, paths.clone()));
        paths
    }

    /// How many times a file was parsed.
    #[cfg(test)]
    fn parses(&self) -> u64 {
        self.parses.load(std::sync::atomic::Ordering::Relaxed)
    }
}

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
    /// Where its ingress program runs (`xdp-native`, `xdp-generic`, `tc`; `-` if not
    /// recorded) and why.
    pub hook: String,
    pub hook_reason: String,
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
    /// bpf() calls the read made (all of them: it reads the maps only through `bpf_read`).
    #[serde(skip)]
    pub bpf_calls: u64,
}

impl Snapshot {
    /// Reads the pinned maps; `state` (havipd's state file, if any) adds operator pins and,
    /// through its config path, which probe paths belong to which VIP.
    ///
    /// Only what is in use is read: the VIP ids from `VIPS`, the NIC slots from `NICS`, the
    /// active probe slots and the defined classes, then the counters of exactly those, each
    /// map in one or a few batch calls (see [`bpf_read`]). The read makes all its bpf()
    /// calls through `bpf_read`, so `bpf_calls` counts every one of them.
    pub fn read(pins: &PinLayout, state: Option<&crate::node::state::State>) -> anyhow::Result<Self> {
        let calls_before = bpf_read::calls();
        let ncpus = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        // Pins of another layout would read as garbage: every map opened is checked against
        // what this build's programs define, and the version once, from the maps the read
        // opens anyway (three calls for the version, none more per map).
        let expected = crate::kernel::dataplane::object_map_shapes()?;
        let version = if pins.map(m::LAYOUT).exists() {
            match PinnedMap::open(&pins.map(m::LAYOUT)).and_then(|v| v.array_all::<u32>()) {
                Ok(v) => PinnedVersion::Value(v.first().map_or(0, |(_, x)| *x)),
                Err(e) => PinnedVersion::Unreadable(format!("{e:#}")),
            }
        } else {
            PinnedVersion::Absent
        };
        let open = |name: &str| -> anyhow::Result<PinnedMap> {
            let map = PinnedMap::open(&pins.map(name))?;
            let found = map_layout::mismatches(expected, &BTreeMap::from([(name.to_string(), map.shape())]), &version);
            anyhow::ensure!(found.is_empty(), "{}", map_layout::refusal(&pins.root, &found));
            Ok(map)
        };

        let nic_infos: BTreeMap<u32, NicInfo> = open(m::NICS)?.hash::<u32, NicInfo>()?.into_iter().collect();
        let nic_names: BTreeMap<u32, String> = nic_infos.iter().map(|(ifindex, info)| (*ifindex, info.name().to_string())).collect();
        let index_names: BTreeMap<u32, String> = nic_infos.values().map(|i| (i.index, i.name().to_string())).collect();
        let vip_infos: BTreeMap<VipKey, VipInfo> = open(m::VIPS)?.hash::<VipKey, VipInfo>()?.into_iter().collect();
        let vip_ids = bpf_read::runs(vip_infos.values().map(|i| i.id), RUN_GAP);

        let mut mappings: BTreeMap<u32, Vec<MappingRow>> = BTreeMap::new();
        for (k, v) in open(m::REMAP_IN)?.hash::<RemapKey, PortValue>()? {
            mappings.entry(k.vip_id).or_default().push(MappingRow {
                protocol: Protocol::from_number(k.proto).map(|p| p.to_string()).unwrap_or_else(|| k.proto.to_string()),
                designated_port: u16::from_be(k.port_be),
                instance_port: u16::from_be(v.port_be),
            });
        }

        // Probe slots say themselves whether they are in use (`active`): the whole array
        // comes back in one call, then the stats of the active ones.
        let active: Vec<(u32, ProbeSlot)> = open(m::PROBE_SLOTS)?.array_all::<ProbeSlot>()?.into_iter().filter(|(_, s)| s.active != 0).collect();
        let mut paths = Vec::new();
        if !active.is_empty() {
            let stats: BTreeMap<u32, ProbeStats> =
                open(m::PROBE_STATS)?.array::<ProbeStats>(&bpf_read::runs(active.iter().map(|(i, _)| *i), RUN_GAP))?.into_iter().collect();
            for (i, slot) in &active {
                let st = stats.get(i).with_context(|| format!("probe slot {i} has no stats entry"))?;
                let nic = nic_names.get(&slot.ifindex).cloned().unwrap_or_else(|| format!("if{}", slot.ifindex));
                paths.push(PathStats::from_kernel(nic, slot.target.to_ip(), st));
            }
        }
        paths.sort_by(|a, b| (&a.nic, a.target).cmp(&(&b.nic, b.target)));
        // Which paths belong to which VIP is in the configuration havipd runs.
        let cfg = state.and_then(|s| s.config_path.as_deref()).and_then(|p| VIP_PATHS.get(p));

        let mut peers: BTreeMap<u32, Vec<PeerStats>> = BTreeMap::new();
        for (k, st) in open(m::PEER_QUALITY)?.hash::<PeerKey, PassiveStats>()? {
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

        let class_infos: BTreeMap<u32, ClassInfo> =
            open(m::CLASSES)?.array_all::<ClassInfo>()?.into_iter().filter(|(_, c)| *c != ClassInfo::default()).collect();
        let class_name = |id: u32| class_infos.get(&id).map(|c| c.name().to_string()).unwrap_or_else(|| format!("#{id}"));
        // In key order: each VIP's classes by class id. The index map says which entry of
        // the counters array counts which (VIP, class); only those entries are read.
        let index: BTreeMap<u32, ClassStatsKey> = open(m::CLASS_STATS_INDEX)?.hash::<ClassStatsKey, u32>()?.into_iter().map(|(k, i)| (i, k)).collect();
        let mut class_stats: BTreeMap<ClassStatsKey, ClassCounters> = BTreeMap::new();
        if !index.is_empty() {
            for (i, per_cpu) in open(m::CLASS_STATS)?.percpu_array::<ClassCounters>(&bpf_read::runs(index.keys().copied(), RUN_GAP), ncpus)? {
                if let Some(k) = index.get(&i) {
                    let mut counters = ClassCounters::default();
                    per_cpu.iter().for_each(|c| counters.add(c));
                    class_stats.insert(*k, counters);
                }
            }
        }
        let mut vip_class_stats: BTreeMap<u32, Vec<VipClassStats>> = BTreeMap::new();
        for (k, counters) in &class_stats {
            vip_class_stats.entry(k.vip_id).or_default().push(VipClassStats { class: class_name(k.class), counters: *counters });
        }

        let (mut bindings, mut counters) = (BTreeMap::new(), BTreeMap::new());
        if !vip_ids.is_empty() {
            bindings = open(m::BINDINGS)?.array::<BindingCell>(&vip_ids)?.into_iter().map(|(id, cell)| (id, cell.current())).collect();
            for (id, per_cpu) in open(m::VIP_STATS)?.percpu_array::<VipCounters>(&vip_ids, ncpus)? {
                let mut total = VipCounters::default();
                for c in &per_cpu {
                    total.rx.add(&c.rx);
                    total.tx.add(&c.tx);
                    total.wire.add(&c.wire);
                }
                counters.insert(id, total);
            }
        }
        let now = monotonic_ns();
        let mut vips = Vec::new();
        for (key, info) in &vip_infos {
            let missing = || anyhow::anyhow!("VIP id {} is beyond the counter arrays", info.id);
            let VipCounters { rx, tx, wire } = *counters.get(&info.id).ok_or_else(missing)?;
            let b = *bindings.get(&info.id).ok_or_else(missing)?;
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
                .and_then(|c| c.get(&vip))
                .map(|(nics, targets)| paths.iter().filter(|p| nics.contains(&p.nic) && targets.contains(&p.target)).cloned().collect())
                .unwrap_or_default();
            vips.push(VipStats {
                vip,
                class: (info.class != 0).then(|| class_name(info.class)),
                classes: vip_class_stats.remove(&info.id).unwrap_or_default(),
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
        if !nic_infos.is_empty() {
            let per_index: BTreeMap<u32, Vec<NicCounters>> =
                open(m::NIC_STATS)?.percpu_array::<NicCounters>(&bpf_read::runs(nic_infos.values().map(|i| i.index), RUN_GAP), ncpus)?.into_iter().collect();
            for (ifindex, info) in &nic_infos {
                let per_cpu = per_index.get(&info.index).with_context(|| format!("NIC slot {} is beyond the NIC counters", info.index))?;
                let mut c = NicCounters::default();
                per_cpu.iter().for_each(|x| c.add(x));
                nics.push(NicStats {
                    nic: info.name().to_string(),
                    ifindex: *ifindex,
                    hook: IngressHook::from_u8(info.hook).map_or("-", IngressHook::name).to_string(),
                    hook_reason: HookReason::from_u8(info.hook_reason).map_or("-", HookReason::explain).to_string(),
                    counters: c,
                });
            }
        }
        nics.sort_by(|a, b| a.nic.cmp(&b.nic));
        vips.sort_by_key(|v| (v.vip.is_ipv6(), v.vip));

        let mut totals = vec![0u64; m::OUTCOMES_LEN as usize];
        for (i, per_cpu) in open(m::OUTCOMES)?.percpu_array_all::<u64>(ncpus)? {
            if let Some(t) = totals.get_mut(i as usize) {
                *t = per_cpu.iter().sum();
            }
        }
        let mut outcomes = BTreeMap::new();
        for (dir, name) in [(Direction::Ingress, "ingress"), (Direction::Egress, "egress")] {
            let per: BTreeMap<String, u64> = Outcome::ALL.iter().map(|o| (o.name().to_string(), totals[o.index(dir) as usize])).collect();
            outcomes.insert(name.to_string(), per);
        }

        let mut classes = Vec::new();
        if !class_infos.is_empty() {
            let cpus_of = |info: &ClassInfo| info.cpus[..(info.ncpus as usize).min(info.cpus.len())].to_vec();
            let processed: BTreeMap<u32, Vec<QueueCounters>> =
                open(m::QUEUE_STATS)?.percpu_array::<QueueCounters>(&bpf_read::runs(class_infos.keys().copied(), RUN_GAP), ncpus)?.into_iter().collect();
            let all_cpus = bpf_read::runs(class_infos.values().flat_map(cpus_of), RUN_GAP);
            let queue_drops: BTreeMap<u32, u64> = if all_cpus.is_empty() {
                BTreeMap::new()
            } else {
                open(m::CPU_QUEUES)?
                    .percpu_array::<CpuQueueCounters>(&all_cpus, ncpus)?
                    .into_iter()
                    .map(|(cpu, per_cpu)| (cpu, per_cpu.iter().map(|q| q.drops).sum()))
                    .collect()
            };
            for (&id, info) in &class_infos {
                let per_cpu = processed.get(&id).with_context(|| format!("class {id} is beyond the queue counters"))?;
                let cpus = cpus_of(info);
                let mut drops = 0;
                for cpu in &cpus {
                    drops += queue_drops.get(cpu).with_context(|| format!("CPU {cpu} is beyond the CPU-queue counters"))?;
                }
                classes.push(ClassStats {
                    class: info.name().to_string(),
                    id,
                    cpus,
                    processed_per_cpu: per_cpu.iter().map(|q| q.packets).collect(),
                    processed_bytes: per_cpu.iter().map(|q| q.bytes).sum(),
                    queue_drops: drops,
                    skb_priority: info.skb_priority,
                });
            }
        }
        let bpf_calls = bpf_read::calls() - calls_before;
        Ok(Self { vips, nics, paths, classes, outcomes, taken: Some(Instant::now()), bpf_calls })
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
        out.push_str(&format!(
            "\n{:<10} {:<11} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n",
            "NIC", "HOOK", "VIP IN", "IN BYTES", "VIP OUT", "OUT BYTES", "ARP ANS", "ND ANS"
        ));
        for n in &now.nics {
            let c = &n.counters;
            out.push_str(&format!(
                "{:<10} {:<11} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n",
                n.nic,
                n.hook,
                human(c.rx_packets),
                human_bytes(c.rx_bytes),
                human(c.tx_packets),
                human_bytes(c.tx_bytes),
                human(c.arp_replies),
                human(c.nd_replies)
            ));
        }
        // Why each hook, once per distinct reason.
        let mut reasons: Vec<(&str, &str)> = now.nics.iter().map(|n| (n.hook.as_str(), n.hook_reason.as_str())).filter(|(h, _)| *h != "-").collect();
        reasons.sort();
        reasons.dedup();
        for (hook, why) in reasons {
            let nics: Vec<&str> = now.nics.iter().filter(|n| n.hook == hook && n.hook_reason == why).map(|n| n.nic.as_str()).collect();
            out.push_str(&format!("  {} on {}: {why}\n", hook, nics.join(", ")));
        }
    }
    // Everything else the programs did, by outcome: first what they dropped, by reason.
    let is_drop = |name: &str| Outcome::ALL.iter().any(|o| o.name() == name && o.is_drop());
    let outcomes = |drops: bool| -> Vec<String> {
        now.outcomes
            .iter()
            .flat_map(|(dir, per)| {
                per.iter()
                    .filter(move |(name, &n)| n > 0 && !matches!(name.as_str(), "vip_passed" | "vip_remapped") && is_drop(name) == drops)
                    .map(move |(name, n)| format!("{dir} {name}={}", human(*n)))
            })
            .collect()
    };
    for (label, list) in [("dropped by havip", outcomes(true)), ("other packets", outcomes(false))] {
        if !list.is_empty() {
            out.push_str(&format!("{label}: {}\n", list.join(", ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::ConfigPathsCache;

    fn vip_config(target: &str) -> String {
        format!("[[nic]]\nname = \"eth0\"\n[[nic]]\nname = \"eth1\"\n[[vip]]\naddress = \"198.18.0.1\"\nnics = [\"eth1\"]\ntargets = [\"{target}\"]\n")
    }

    #[test]
    fn drops_are_listed_by_reason_apart_from_other_packets() {
        let per = |v: &[(&str, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        let outcomes = [
            ("ingress".to_string(), per(&[("neigh_dropped", 4), ("nd_hop_limit", 1), ("not_ip", 3), ("vip_remapped", 9), ("fragment", 0)])),
            ("egress".to_string(), per(&[("steer_failed", 2), ("steered", 5)])),
        ]
        .into_iter()
        .collect();
        let snap = super::Snapshot { vips: vec![], nics: vec![], paths: vec![], classes: vec![], outcomes, taken: None, bpf_calls: 0 };
        let text = super::render_table(&snap, None);
        assert!(text.contains("\ndropped by havip: egress steer_failed=2, ingress nd_hop_limit=1, ingress neigh_dropped=4\n"), "{text}");
        assert!(text.contains("\nother packets: egress steered=5, ingress not_ip=3\n"), "{text}");
    }

    #[test]
    fn config_is_parsed_again_only_when_its_file_changes() {
        let dir = std::env::temp_dir().join(format!("havip-stats-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        let cache = ConfigPathsCache::new();
        assert!(cache.get(&path).is_none(), "no file, no paths");
        assert_eq!(cache.parses(), 0, "a missing file is not parsed");

        std::fs::write(&path, vip_config("198.18.2.2")).unwrap();
        let first = cache.get(&path).expect("a valid config");
        assert_eq!(first[&"198.18.0.1".parse().unwrap()], (vec!["eth1".to_string()], vec!["198.18.2.2".parse().unwrap()]));
        for _ in 0..10 {
            assert!(Arc::ptr_eq(&first, &cache.get(&path).unwrap()));
        }
        assert_eq!(cache.parses(), 1, "ten more reads of an unchanged file parse nothing");

        // Same length, new content and a later mtime (set explicitly: two writes within one
        // timer tick can share an mtime).
        let touch = |secs: u64| {
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(std::time::SystemTime::now() + Duration::from_secs(secs)).unwrap();
        };
        std::fs::write(&path, vip_config("198.18.2.3")).unwrap();
        touch(5);
        let second = cache.get(&path).unwrap();
        assert_eq!(second[&"198.18.0.1".parse().unwrap()].1, vec!["198.18.2.3".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(cache.parses(), 2);

        // An invalid file gives no paths, and is not parsed again until it changes.
        std::fs::write(&path, "[[vip]]\naddress = 7\n").unwrap();
        touch(10);
        assert!(cache.get(&path).is_none());
        assert!(cache.get(&path).is_none());
        assert_eq!(cache.parses(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
