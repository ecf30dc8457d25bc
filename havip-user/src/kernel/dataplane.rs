//! The one handle on havip's kernel side: loads the programs against the pinned maps
//! (creating them on first start), attaches them to NICs or adopts the links a previous
//! controller left pinned, and reads and writes the maps.

use std::{collections::BTreeMap, io, mem::size_of, path::Path, sync::OnceLock};

use anyhow::{bail, Context};
use aya::{
    maps::{Array, CpuMap, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        ProgramFd, RawTracePoint, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use havip_common::{
    maps as m, Binding, ClassCounters, ClassInfo, ClassStatsKey, CpuQueueCounters, Fence, HookReason, IngressHook, NicCounters, NicInfo, PassiveStats, PeerKey,
    PortClass, PortValue, ProbeSlot, ProbeStats, QueueCounters, RemapKey, VipCounters, VipInfo, VipKey, VipSlot,
};
use tracing::{info, warn};

use crate::{
    kernel::ingress_hook::Choice,
    kernel::map_layout::{self, MapShape},
    kernel::pins::{ensure_bpffs, Hook, PinLayout},
    kernel::plan::{Actual, Changes},
    kernel::versioned::VersionedArray,
};

/// The compiled eBPF object, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/havip.bpf.o"));

pub fn ebpf_object() -> anyhow::Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        bail!("this build has no eBPF object embedded; build with `cargo xtask build` (it compiles havip-ebpf first)");
    }
    Ok(EBPF_OBJECT)
}

/// The shapes of the object's pinned maps, parsed once per process: readers open the maps
/// on every refresh (`havip stats --watch`, `top`), and parsing takes milliseconds.
pub fn object_map_shapes() -> anyhow::Result<&'static BTreeMap<String, MapShape>> {
    static SHAPES: OnceLock<BTreeMap<String, MapShape>> = OnceLock::new();
    if let Some(shapes) = SHAPES.get() {
        return Ok(shapes);
    }
    let shapes = map_layout::expected_shapes(ebpf_object()?)?;
    Ok(SHAPES.get_or_init(|| shapes))
}

/// Typed handles on the pinned maps. Usable without any program loaded, so the CLI reads
/// live stats while havipd is stopped.
pub struct Maps {
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    /// Written by publication (see `kernel::versioned`).
    pub vip_slots: VersionedArray<VipSlot>,
    pub remap_in: HashMap<MapData, RemapKey, PortValue>,
    pub remap_out: HashMap<MapData, RemapKey, PortValue>,
    pub port_bitmap: Array<MapData, u64>,
    pub nics: HashMap<MapData, u32, NicInfo>,
    /// Written by publication (see `kernel::versioned`).
    pub bindings: VersionedArray<Binding>,
    pub fences: Array<MapData, Fence>,
    pub nic_stats: PerCpuArray<MapData, NicCounters>,
    pub probe_slots: Array<MapData, ProbeSlot>,
    pub probe_stats: Array<MapData, ProbeStats>,
    pub peer_quality: HashMap<MapData, PeerKey, PassiveStats>,
    pub vip_stats: PerCpuArray<MapData, VipCounters>,
    pub outcomes: PerCpuArray<MapData, u64>,
    pub classes: Array<MapData, ClassInfo>,
    pub port_classes: HashMap<MapData, RemapKey, PortClass>,
    pub class_stats: PerCpuArray<MapData, ClassCounters>,
    pub class_stats_index: HashMap<MapData, ClassStatsKey, u32>,
    pub cpumap: CpuMap<MapData>,
    /// The same cpumap untyped: its fd for deletes, its id for the tracepoint's filter.
    cpumap_raw: MapData,
    pub queue_stats: PerCpuArray<MapData, QueueCounters>,
    pub cpu_queues: PerCpuArray<MapData, CpuQueueCounters>,
    pub cpumap_id: Array<MapData, u32>,
}

/// The programs' own answer to "does this node serve `vip` now?": standalone VIPs always; a
/// cluster VIP while its fence's serve-until time (boot clock) lies ahead.
fn serving_in(vips: &HashMap<MapData, VipKey, VipInfo>, fences: &Array<MapData, Fence>, vip: std::net::IpAddr) -> bool {
    let Ok(info) = vips.get(&VipKey::from(vip), 0) else { return false };
    if info.flags & havip_common::VIP_FENCED == 0 {
        return true;
    }
    let Ok(f) = fences.get(&info.id, 0) else { return false };
    (crate::kernel::clock::kernel_now().as_nanos() as u64) < f.serve_until_ns
}

/// The two maps that say whether a VIP is served, opened on their own so an announcement
/// task can ask before every frame it sends: a node that stopped serving a VIP must not
/// go on telling the link its MAC.
pub struct FenceView {
    vips: HashMap<MapData, VipKey, VipInfo>,
    fences: Array<MapData, Fence>,
}

impl FenceView {
    pub fn open(pins: &PinLayout) -> anyhow::Result<Self> {
        Ok(Self { vips: open_pinned(pins, m::VIPS)?.try_into()?, fences: open_pinned(pins, m::FENCES)?.try_into()? })
    }

    pub fn serving(&self, vip: std::net::IpAddr) -> bool {
        serving_in(&self.vips, &self.fences, vip)
    }
}

fn open_pinned(pins: &PinLayout, name: &str) -> anyhow::Result<Map> {
    let path = pins.map(name);
    let data =
        MapData::from_pin(&path).with_context(|| format!("cannot open pinned map {}: is havip installed here (havipd started once)?", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Maps {
    /// Opens the pinned maps, refusing (with what to do) pins of another layout than this
    /// build's: reading them as this build's types would show garbage.
    pub fn open(pins: &PinLayout) -> anyhow::Result<Self> {
        map_layout::check(pins, object_map_shapes()?)?;
        Ok(Self {
            vips: open_pinned(pins, m::VIPS)?.try_into()?,
            vip_slots: VersionedArray::new(open_pinned(pins, m::VIP_SLOTS)?, m::VIP_SLOTS)?,
            remap_in: open_pinned(pins, m::REMAP_IN)?.try_into()?,
            remap_out: open_pinned(pins, m::REMAP_OUT)?.try_into()?,
            port_bitmap: open_pinned(pins, m::PORT_BITMAP)?.try_into()?,
            nics: open_pinned(pins, m::NICS)?.try_into()?,
            bindings: VersionedArray::new(open_pinned(pins, m::BINDINGS)?, m::BINDINGS)?,
            fences: open_pinned(pins, m::FENCES)?.try_into()?,
            nic_stats: open_pinned(pins, m::NIC_STATS)?.try_into()?,
            probe_slots: open_pinned(pins, m::PROBE_SLOTS)?.try_into()?,
            probe_stats: open_pinned(pins, m::PROBE_STATS)?.try_into()?,
            peer_quality: open_pinned(pins, m::PEER_QUALITY)?.try_into()?,
            vip_stats: open_pinned(pins, m::VIP_STATS)?.try_into()?,
            outcomes: open_pinned(pins, m::OUTCOMES)?.try_into()?,
            classes: open_pinned(pins, m::CLASSES)?.try_into()?,
            port_classes: open_pinned(pins, m::PORT_CLASSES)?.try_into()?,
            class_stats: open_pinned(pins, m::CLASS_STATS)?.try_into()?,
            class_stats_index: open_pinned(pins, m::CLASS_STATS_INDEX)?.try_into()?,
            cpumap: open_pinned(pins, m::CPUMAP)?.try_into()?,
            cpumap_raw: MapData::from_pin(pins.map(m::CPUMAP)).context("opening the pinned cpumap")?,
            queue_stats: open_pinned(pins, m::QUEUE_STATS)?.try_into()?,
            cpu_queues: open_pinned(pins, m::CPU_QUEUES)?.try_into()?,
            cpumap_id: open_pinned(pins, m::CPUMAP_ID)?.try_into()?,
        })
    }

    /// Everything `plan` needs to know about the maps. `cpu_prog`: the id of the CPU-queue
    /// program this process runs; cpumap entries running another count as absent.
    pub fn read_actual(&self, cpu_prog: Option<u32>) -> anyhow::Result<Actual> {
        let vips = self.vips.iter().collect::<Result<BTreeMap<_, _>, _>>()?;
        let remap_in = self.remap_in.iter().collect::<Result<BTreeMap<_, _>, _>>()?;
        let remap_out = self.remap_out.iter().collect::<Result<BTreeMap<_, _>, _>>()?;
        let port_bitmap = self.port_bitmap.iter().collect::<Result<Vec<_>, _>>()?;
        let empty = VipSlot::default();
        let mut slots = BTreeMap::new();
        for (i, slot) in self.vip_slots.iter().enumerate() {
            let slot = slot?;
            if slot != empty {
                slots.insert(i as u32, slot);
            }
        }
        let mut classes = BTreeMap::new();
        for (i, c) in self.classes.iter().enumerate() {
            let c = c?;
            if c != ClassInfo::default() {
                classes.insert(i as u32, c);
            }
        }
        let port_classes = self.port_classes.iter().collect::<Result<BTreeMap<_, _>, _>>()?;
        let class_stats = self.class_stats_index.iter().collect::<Result<_, _>>()?;
        let mut cpumap = BTreeMap::new();
        for cpu in 0..self.cpumap.len() {
            // Unset entries read back as ENOENT.
            if let Ok(v) = self.cpumap.get(cpu, 0) {
                if cpu_prog.is_some() && v.prog_id.map(|p| p.get()) == cpu_prog {
                    cpumap.insert(cpu, v.queue_size);
                }
            }
        }
        Ok(Actual { vips, remap_in, remap_out, port_bitmap, slots, classes, port_classes, class_stats, cpumap })
    }

    /// Class name -> id, as the kernel holds them.
    pub fn class_ids(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        for (i, c) in self.classes.iter().enumerate() {
            let c = c?;
            if c != ClassInfo::default() {
                out.insert(c.name().to_string(), i as u32);
            }
        }
        Ok(out)
    }

    /// Writes `ch` in the order that keeps every packet consistent (see [`Changes`]).
    /// `cpu_prog`: the program CPU queues run (needed when `ch` creates queues).
    pub fn apply(&mut self, ch: &Changes, cpu_prog: Option<&ProgramFd>) -> anyhow::Result<()> {
        for &id in &ch.zero_new_stats {
            self.zero_stats(id)?;
        }
        for &(cpu, size) in &ch.cpumap_sets {
            let prog = cpu_prog.context("creating CPU queues needs the CPU-queue program loaded")?;
            self.cpumap.set(cpu, size, Some(prog), 0).with_context(|| format!("creating the queue of CPU {cpu}"))?;
        }
        let n = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for (k, i) in &ch.class_stats_creates {
            // Zeroed before the pair is recorded, and both before any VIP or port names it.
            self.class_stats.set(*i, PerCpuValues::try_from(vec![ClassCounters::default(); n])?, 0)?;
            self.class_stats_index.insert(k, i, 0)?;
        }
        for (i, v) in &ch.class_upserts {
            self.classes.set(*i, v, 0)?;
        }
        for (k, v) in &ch.port_class_upserts {
            self.port_classes.insert(k, v, 0)?;
        }
        for &(i, w) in &ch.bitmap_grow {
            self.port_bitmap.set(i, w, 0)?;
        }
        for (k, v) in &ch.remap_in_upserts {
            self.remap_in.insert(k, v, 0)?;
        }
        for (k, v) in &ch.remap_out_upserts {
            self.remap_out.insert(k, v, 0)?;
        }
        for (k, v) in &ch.vip_upserts {
            self.vips.insert(k, v, 0)?;
        }
        for (i, v) in &ch.slot_writes {
            self.vip_slots.publish(*i, *v)?;
        }
        for &i in &ch.slot_clears {
            self.vip_slots.publish(i, VipSlot::default())?;
        }
        for k in &ch.vip_deletes {
            self.vips.remove(k)?;
        }
        for k in &ch.remap_in_deletes {
            self.remap_in.remove(k)?;
        }
        for k in &ch.remap_out_deletes {
            self.remap_out.remove(k)?;
        }
        for &(i, w) in &ch.bitmap_shrink {
            self.port_bitmap.set(i, w, 0)?;
        }
        for k in &ch.port_class_deletes {
            self.port_classes.remove(k)?;
        }
        for &i in &ch.class_clears {
            self.classes.set(i, ClassInfo::default(), 0)?;
        }
        for k in &ch.class_stats_deletes {
            // The entry's counts stay until its index is handed out again, zeroed.
            self.class_stats_index.remove(k)?;
        }
        for &cpu in &ch.cpumap_deletes {
            remove_cpumap_entry(&self.cpumap_raw, cpu)?;
        }
        for &id in &ch.zero_freed_stats {
            self.zero_stats(id)?;
        }
        Ok(())
    }

    fn zero_stats(&mut self, id: u32) -> anyhow::Result<()> {
        let n = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let zeros = PerCpuValues::try_from(vec![VipCounters::default(); n])?;
        self.vip_stats.set(id, zeros, 0)?;
        // A new VIP starts unbound; a freed id forgets its NIC.
        self.bindings.publish(id, Binding::default())?;
        // ...and serves nothing until the cluster service confirms it (cluster VIPs only
        // read their fence): a reused id never inherits another VIP's serve-until time.
        self.fences.set(id, Fence::default(), 0)?;
        Ok(())
    }

    pub fn binding(&self, vip_id: u32) -> anyhow::Result<Binding> {
        Ok(self.bindings.get(&vip_id, 0)?)
    }

    /// Moves a VIP: one publication, read whole by both programs from their next packet.
    pub fn set_binding(&mut self, vip_id: u32, b: Binding) -> anyhow::Result<()> {
        self.bindings.publish(vip_id, b)
    }

    /// The current version of fast-path slot `idx`.
    pub fn slot(&self, idx: u32) -> anyhow::Result<VipSlot> {
        Ok(self.vip_slots.get(&idx, 0)?)
    }

    /// Publishes fast-path slot `idx` (`plan` decides what slots hold; this writes one).
    pub fn set_slot(&mut self, idx: u32, slot: VipSlot) -> anyhow::Result<()> {
        self.vip_slots.publish(idx, slot)
    }

    pub fn zero_nic_stats(&mut self, index: u32) -> anyhow::Result<()> {
        let n = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        self.nic_stats.set(index, PerCpuValues::try_from(vec![NicCounters::default(); n])?, 0)?;
        Ok(())
    }

    /// Starts measuring a path in `slot` (from zero) or, with `None`, stops.
    /// `kind`: `PROBE_KIND_*` and the target port (TCP and UDP probes).
    pub fn set_probe_slot(&mut self, slot: u32, path: Option<(u32, std::net::IpAddr)>, kind: (u8, Option<u16>)) -> anyhow::Result<()> {
        let (kind, tcp_port) = kind;
        self.probe_stats.set(slot, ProbeStats::default(), 0)?;
        let value = match path {
            Some((ifindex, target)) => {
                ProbeSlot { target: VipKey::from(target), ifindex, active: 1, port_be: tcp_port.unwrap_or(0).to_be(), kind, _pad: [0; 5] }
            }
            None => ProbeSlot::default(),
        };
        self.probe_slots.set(slot, value, 0)?;
        Ok(())
    }

    /// Active probe slots with what was measured.
    pub fn probe_paths(&self) -> anyhow::Result<Vec<(u32, ProbeSlot, ProbeStats)>> {
        let mut out = Vec::new();
        for (i, slot) in self.probe_slots.iter().enumerate() {
            let slot = slot?;
            if slot.active != 0 {
                out.push((i as u32, slot, self.probe_stats.get(&(i as u32), 0)?));
            }
        }
        Ok(out)
    }

    /// A NIC's counters summed over CPUs.
    pub fn nic_counters(&self, index: u32) -> anyhow::Result<NicCounters> {
        let mut t = NicCounters::default();
        for c in self.nic_stats.get(&index, 0)?.iter() {
            t.add(c);
        }
        Ok(t)
    }

    /// A VIP's counters summed over CPUs.
    pub fn vip_counters(&self, id: u32) -> anyhow::Result<VipCounters> {
        let mut total = VipCounters::default();
        for c in self.vip_stats.get(&id, 0)?.iter() {
            total.rx.add(&c.rx);
            total.tx.add(&c.tx);
            total.wire.add(&c.wire);
        }
        Ok(total)
    }

    /// The VIP's counters per CPU (for showing where packets were processed).
    pub fn vip_counters_per_cpu(&self, id: u32) -> anyhow::Result<Vec<VipCounters>> {
        Ok(self.vip_stats.get(&id, 0)?.iter().copied().collect())
    }

    /// Outcome counters summed over CPUs, indexed like `OUTCOMES`.
    pub fn outcome_totals(&self) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(m::OUTCOMES_LEN as usize);
        for i in 0..m::OUTCOMES_LEN {
            out.push(self.outcomes.get(&i, 0)?.iter().sum());
        }
        Ok(out)
    }

    /// ifindex -> NIC info, for every NIC havip runs on.
    pub fn nic_infos(&self) -> BTreeMap<u32, NicInfo> {
        self.nics.iter().flatten().collect()
    }
}

/// Deletes a CPU's queue (its kthread stops once drained). aya's `CpuMap` has no remove;
/// the kernel's BPF_MAP_DELETE_ELEM does it.
fn remove_cpumap_entry(map: &MapData, cpu: u32) -> anyhow::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    #[repr(C)]
    struct DeleteAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let attr = DeleteAttr { map_fd: fd as u32, _pad: 0, key: &cpu as *const u32 as u64 };
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_ELEM, &attr as *const DeleteAttr, size_of::<DeleteAttr>() as u32) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("removing the queue of CPU {cpu}"));
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns, used for binding ages.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How a NIC ended up attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachReport {
    pub nic: String,
    /// True if links pinned by an earlier controller were kept (and given the new programs).
    pub adopted: bool,
    /// Where its ingress program runs, and why.
    pub hook: IngressHook,
    pub reason: HookReason,
}

/// Programs loaded in this process plus the pinned maps. The controller changes the
/// kernel only through its verbs; readers (stats, fixtures) open their own [`Maps`].
pub struct Dataplane {
    pub pins: PinLayout,
    ebpf: Ebpf,
    maps: Maps,
    /// What the configuration maps (VIPs, mappings, slots, bitmap, classes, CPU queues)
    /// hold, as of the last plan applied in full. Only this process writes them (the pin
    /// lock makes sure of that; the programs only read them), so after the first read the
    /// view is kept current from the changes written instead of reading ~20,000 entries
    /// back before every plan. `None`: read them afresh (first use, or a write failed
    /// half-way).
    actual: Option<Actual>,
    /// The program variants loaded (with or without passive TCP measurement).
    pub ingress: &'static str,
    pub ingress_tc: &'static str,
    pub egress: &'static str,
}

fn is_not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

impl Dataplane {
    /// Loads the programs; maps already pinned under `pin_root` are reused, missing ones are
    /// created and pinned. Nothing is attached yet. Pins of another layout (see
    /// [`map_layout`]) are refused before anything is created, loaded or written.
    pub fn open(pin_root: &Path) -> anyhow::Result<Self> {
        Self::open_with(pin_root, true)
    }

    /// Refuses pins of another layout than this build's (see [`map_layout`]), reading only.
    /// `open_with` checks too; havipd calls this first so that it refuses before it starts
    /// anything else.
    pub fn check_pins(pins: &PinLayout) -> anyhow::Result<()> {
        map_layout::check(pins, object_map_shapes()?)
    }

    /// Like `open`; `passive_tcp` switches passive TCP RTT measurement (a load-time
    /// constant of the programs: off, it costs nothing per packet).
    pub fn open_with(pin_root: &Path, passive_tcp: bool) -> anyhow::Result<Self> {
        let (ingress, ingress_tc, egress) = if passive_tcp {
            (m::PROG_INGRESS_PASSIVE, m::PROG_INGRESS_TC_PASSIVE, m::PROG_EGRESS_PASSIVE)
        } else {
            (m::PROG_INGRESS, m::PROG_INGRESS_TC, m::PROG_EGRESS)
        };
        ensure_bpffs(pin_root)?;
        let pins = PinLayout::new(pin_root);
        // The loader adopts any pinned map of the right name, whatever its shape: check first.
        Self::check_pins(&pins)?;
        for dir in [pins.maps_dir(), pins.progs_dir(), pins.links_dir(), pins.host_links_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.maps_dir()).load(ebpf_object()?).context("loading the eBPF object (maps) failed")?;
        // Fresh pins get their version now, before any program can use them; adopted ones
        // passed the check, so this rewrites the same value.
        let mut layout: Array<&mut MapData, u32> = ebpf.map_mut(m::LAYOUT).context("map HAVIP_LAYOUT missing from the eBPF object")?.try_into()?;
        layout.set(0, m::LAYOUT_VERSION, 0).context("recording the layout version in HAVIP_LAYOUT")?;
        for name in [ingress, m::PROG_BASELINE, m::PROG_REMAP_FLOOR, m::PROG_QUEUE_FLOOR] {
            let prog: &mut Xdp = ebpf.program_mut(name).context("program missing from object")?.try_into()?;
            prog.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        for name in [ingress_tc, egress] {
            let tc: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
            tc.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        let cpu: &mut Xdp = ebpf.program_mut(m::PROG_CPU_QUEUE).context("program missing")?.try_into()?;
        cpu.load().context("the kernel refused the CPU-queue program")?;
        let mut maps = Maps::open(&pins)?;
        let cpumap_id = maps.cpumap_raw.info().context("reading the cpumap's id")?.id();
        maps.cpumap_id.set(0, cpumap_id, 0)?;
        Ok(Self { pins, ebpf, maps, actual: None, ingress, ingress_tc, egress })
    }

    /// Counts the kernel's CPU-queue drops from now on (tracepoint `xdp_cpumap_enqueue`),
    /// replacing a link an earlier havipd pinned.
    pub fn attach_queue_drops(&mut self) -> anyhow::Result<()> {
        let path = self.pins.host_link(m::PROG_QUEUE_DROPS);
        let prog: &mut RawTracePoint = self.ebpf.program_mut(m::PROG_QUEUE_DROPS).context("program missing")?.try_into()?;
        if prog.fd().is_err() {
            prog.load().context("the kernel refused the queue-drop tracepoint program")?;
        }
        let id = prog.attach(m::QUEUE_DROPS_TRACEPOINT).context("attaching to tracepoint xdp_cpumap_enqueue")?;
        let link: FdLink = prog.take_link(id)?.into();
        let _ = std::fs::remove_file(&path);
        link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    /// The program CPU queues run, and its id (see `Maps::read_actual`).
    pub fn cpu_prog(&self) -> anyhow::Result<(&ProgramFd, u32)> {
        let prog: &Xdp = self.ebpf.program(m::PROG_CPU_QUEUE).context("program missing")?.try_into()?;
        let fd = prog.fd()?;
        Ok((fd, prog.info()?.id()))
    }

    /// Plans and applies `desired` against the maps.
    pub fn apply_desired(&mut self, desired: &crate::kernel::plan::Desired) -> anyhow::Result<Changes> {
        let (fd, id) = self.cpu_prog()?;
        let fd = fd.try_clone()?;
        let mut actual = match self.actual.take() {
            Some(a) => a,
            None => self.maps.read_actual(Some(id))?,
        };
        let ch = crate::kernel::plan::plan(desired, &actual);
        // On failure the view stays `None`: the maps are in between, read them next time.
        self.maps.apply(&ch, Some(&fd))?;
        crate::kernel::plan::apply_to(&mut actual, &ch);
        self.actual = Some(actual);
        Ok(ch)
    }

    /// The dataplane id of VIP `vip`, if it is one.
    pub fn vip_id(&self, vip: std::net::IpAddr) -> Option<u32> {
        self.maps.vips.get(&VipKey::from(vip), 0).ok().map(|i| i.id)
    }

    /// Whether this node serves VIP `id` now: standalone VIPs always; a cluster VIP while
    /// its fence's serve-until time (boot clock) lies ahead, as the programs decide.
    pub fn serving(&self, vip: std::net::IpAddr) -> bool {
        serving_in(&self.maps.vips, &self.maps.fences, vip)
    }

    /// Which NIC VIP `id` is bound to now (`ifindex` 0: none).
    /// A VIP's counters summed over CPUs.
    pub fn vip_counters(&self, id: u32) -> anyhow::Result<VipCounters> {
        self.maps.vip_counters(id)
    }

    pub fn binding_of(&self, id: u32) -> anyhow::Result<Binding> {
        self.maps.binding(id)
    }

    /// Moves VIP `id`: one array element, read by both programs on their next packet.
    pub fn set_binding(&mut self, id: u32, b: Binding) -> anyhow::Result<()> {
        self.maps.set_binding(id, b)
    }

    /// Zeroes NIC_STATS slot `index` (a NIC taking a slot nobody had).
    pub fn zero_nic_stats(&mut self, index: u32) -> anyhow::Result<()> {
        self.maps.zero_nic_stats(index)
    }

    /// See [`Maps::set_probe_slot`].
    pub fn set_probe_slot(&mut self, slot: u32, path: Option<(u32, std::net::IpAddr)>, kind: (u8, Option<u16>)) -> anyhow::Result<()> {
        self.maps.set_probe_slot(slot, path, kind)
    }

    /// What probe slot `slot` measured so far.
    pub fn probe_stats(&self, slot: u32) -> anyhow::Result<ProbeStats> {
        Ok(self.maps.probe_stats.get(&slot, 0)?)
    }

    /// ifindex -> NIC info, for every NIC in the NICS map.
    pub fn nic_infos(&self) -> BTreeMap<u32, NicInfo> {
        self.maps.nic_infos()
    }

    /// Class name -> id, as the maps hold them.
    pub fn class_ids(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        self.maps.class_ids()
    }

    /// Pins the loaded programs (replacing pins of an earlier version).
    pub fn pin_programs(&mut self) -> anyhow::Result<()> {
        for (pin, name) in [(m::PROG_INGRESS, self.ingress), (m::PROG_INGRESS_TC, self.ingress_tc), (m::PROG_EGRESS, self.egress)] {
            let path = self.pins.prog(pin);
            let _ = std::fs::remove_file(&path);
            let prog = self.ebpf.program_mut(name).context("program missing")?;
            prog.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(())
    }

    pub fn xdp(&mut self, name: &str) -> anyhow::Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(name).context("program missing")?.try_into()?)
    }

    pub fn tc(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        self.classifier(self.egress)
    }

    /// The TC ingress program (variant as loaded).
    pub fn tc_ingress(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        self.classifier(self.ingress_tc)
    }

    fn classifier(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self.ebpf.program_mut(name).context("program missing")?.try_into()?)
    }

    /// Attaches the ingress program to `nic` on the hook `choice` names (its fallback if the
    /// kernel refuses that), and the egress program. Where links are already pinned for
    /// it, they are kept and atomically switched to this process's programs: traffic is
    /// never without a program. A pinned link on the other ingress hook (a reload changed
    /// the choice) goes once the new one is in place; for that moment both see packets,
    /// which is harmless (the second finds the port already rewritten, or the ARP/ND
    /// request already answered and gone).
    pub fn attach(&mut self, nic: &str, choice: Choice) -> anyhow::Result<AttachReport> {
        let ((hook, reason), ingress_adopted) = match self.attach_ingress(nic, choice.first.0) {
            Ok(adopted) => (choice.first, adopted),
            Err(e) => match choice.fallback {
                Some((hook, reason)) => {
                    warn!(nic, refused = choice.first.0.name(), error = %format!("{e:#}"), fallback = hook.name(), "ingress hook refused; falling back");
                    ((hook, reason), self.attach_ingress(nic, hook)?)
                }
                None => return Err(e),
            },
        };
        let other = if hook == IngressHook::Tc { Hook::Xdp } else { Hook::TcIngress };
        drop_link(&self.pins, nic, other)?;
        let tc_adopted = self.attach_tc(nic, Hook::TcEgress)?;
        Ok(AttachReport { nic: nic.to_string(), adopted: ingress_adopted && tc_adopted, hook, reason })
    }

    fn attach_ingress(&mut self, nic: &str, hook: IngressHook) -> anyhow::Result<bool> {
        match hook {
            IngressHook::XdpNative => self.attach_xdp(nic, XdpMode::Driver),
            IngressHook::XdpGeneric => self.attach_xdp(nic, XdpMode::Skb),
            IngressHook::Tc => self.attach_tc(nic, Hook::TcIngress),
        }
    }

    /// Attaches (or adopts, returning true) the XDP link of `nic`. An adopted link keeps
    /// the mode it was made in.
    fn attach_xdp(&mut self, nic: &str, mode: XdpMode) -> anyhow::Result<bool> {
        let path = self.pins.link(nic, Hook::Xdp);
        std::fs::create_dir_all(self.pins.nic_dir(nic))?;
        let ingress = self.ingress;
        let prog = self.xdp(ingress)?;
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin still holds the link; our copy of the fd can go.
                        let _ = prog.take_link(id)?;
                        return Ok(true);
                    }
                    Err(e) => {
                        warn!(nic, error = %e, "pinned XDP link is stale (NIC gone or replaced); attaching anew");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("reading pinned link {}", path.display())),
        }
        let id = prog.attach(nic, mode).map_err(|e| {
            anyhow::anyhow!(
                "attaching XDP ({mode:?}) to {nic} failed: {e}. If another XDP program is attached there, remove it first (ip link set dev {nic} xdp off)"
            )
        })?;
        let link: FdLink = prog.take_link(id)?.try_into().context("XDP attached without a bpf_link (kernel < 5.9?)")?;
        link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        Ok(false)
    }

    /// Attaches (or adopts, returning true) a TC link of `nic`: the ingress or the egress
    /// program.
    fn attach_tc(&mut self, nic: &str, hook: Hook) -> anyhow::Result<bool> {
        let (name, attach_type) = match hook {
            Hook::TcIngress => (self.ingress_tc, TcAttachType::Ingress),
            _ => (self.egress, TcAttachType::Egress),
        };
        let path = self.pins.link(nic, hook);
        std::fs::create_dir_all(self.pins.nic_dir(nic))?;
        let prog = self.classifier(name)?;
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        let _ = prog.take_link(id)?;
                        return Ok(true);
                    }
                    Err(e) => {
                        warn!(nic, error = %e, "pinned TC link is stale; attaching anew");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("reading pinned link {}", path.display())),
        }
        let id = prog.attach(nic, attach_type).with_context(|| format!("attaching the TC {} program to {nic} failed", hook.suffix()))?;
        let link: FdLink = prog.take_link(id)?.try_into().context("TC attached without a bpf_link (kernel < 6.6?)")?;
        link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        Ok(false)
    }

    /// Records a NIC's identity for the CLI and the programs; `index` is its `NIC_STATS`
    /// slot, `hook` where its ingress runs and why.
    pub fn set_nic(&mut self, ifindex: u32, name: &str, mac: [u8; 6], index: u32, hook: Option<(IngressHook, HookReason)>) -> anyhow::Result<()> {
        let (hook, hook_reason) = hook.map_or((0, 0), |(h, r)| (h as u8, r as u8));
        let info = NicInfo { mac, index, name: havip_common::names::padded(name), hook, hook_reason, ..Default::default() };
        self.maps.nics.insert(ifindex, info, 0)?;
        Ok(())
    }

    pub fn remove_nic(&mut self, ifindex: u32) -> anyhow::Result<()> {
        match self.maps.nics.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Detaches havip from `nic` by dropping its pinned links.
pub fn detach(pins: &PinLayout, nic: &str) -> anyhow::Result<()> {
    for hook in Hook::ALL {
        drop_link(pins, nic, hook)?;
    }
    let _ = std::fs::remove_dir(pins.nic_dir(nic));
    Ok(())
}

/// Detaches one hook of `nic` by dropping its pinned link, if there is one.
fn drop_link(pins: &PinLayout, nic: &str, hook: Hook) -> anyhow::Result<()> {
    let path = pins.link(nic, hook);
    match PinnedLink::from_pin(&path) {
        Ok(link) => {
            // Unpinning drops the last reference once our fd closes: the link detaches.
            drop(link.unpin().with_context(|| format!("unpinning {}", path.display()))?);
            info!(nic, hook = hook.suffix(), "detached");
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            warn!(nic, error = %e, "pinned link unreadable; removing the pin");
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Removes everything under the pin root: links (detaching the programs), programs, maps.
pub fn remove_all_pins(pins: &PinLayout) -> anyhow::Result<()> {
    for nic in pins.pinned_nics() {
        detach(pins, &nic)?;
    }
    for dir in [pins.host_links_dir(), pins.links_dir(), pins.progs_dir(), pins.maps_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    match std::fs::remove_dir(&pins.root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pins.root.display())),
    }
}
