//! Every map of the dataplane. Names, sizes and value types come from `havip_common`; see
//! `havip_common::maps` for who writes and who reads each one. All are pinned by name so a
//! restarted controller adopts them and traffic never stops.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, CpuMap, HashMap, LruHashMap, PerCpuArray},
};
use havip_common::{
    maps as m, BindingCell, ClassCounters, ClassInfo, ClassStatsKey, CpuQueueCounters, Fence, NicCounters, NicInfo, PassiveStats, PeerKey, PortValue,
    PortClass, ProbeSlot, ProbeStats, QueueCounters, RemapKey, SlotCell, VipCounters, VipInfo, VipKey,
};

/// 0 -> the layout version the pins were created with (see `havip_common::maps::LAYOUT`).
/// Only userspace reads it; no program refers to it, and a unit test
/// (`kernel::map_layout`) checks that the object still carries it.
#[map(name = "HAVIP_LAYOUT")]
pub static LAYOUT: Array<u32> = Array::pinned(m::LAYOUT_LEN, 0);

/// VIP address -> VIP id and settings.
#[map(name = "HAVIP_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::pinned(m::VIPS_MAX, 0);

/// Fast path: slot -> VIP with its first mappings inline, by generation (see `versioned`).
/// Mappable: havipd publishes with plain stores in the order the readers rely on.
#[map(name = "HAVIP_VIP_SLOTS")]
pub static VIP_SLOTS: Array<SlotCell> = Array::pinned(m::VIP_SLOTS_LEN, BPF_F_MMAPABLE);

/// (VIP id, protocol, designated port) -> instance port. Ingress.
#[map(name = "HAVIP_REMAP_IN")]
pub static REMAP_IN: HashMap<RemapKey, PortValue> = HashMap::pinned(m::REMAPS_MAX, 0);

/// (VIP id, protocol, instance port) -> designated port. Egress.
#[map(name = "HAVIP_REMAP_OUT")]
pub static REMAP_OUT: HashMap<RemapKey, PortValue> = HashMap::pinned(m::REMAPS_MAX, 0);

/// Port -> "mapped at all" bit, ingress words then egress words.
#[map(name = "HAVIP_PORT_BITMAP")]
pub static PORT_BITMAP: Array<u64> = Array::pinned(m::PORT_BITMAP_LEN, 0);

/// ifindex -> the NIC's MAC and name.
#[map(name = "HAVIP_NICS")]
pub static NICS: HashMap<u32, NicInfo> = HashMap::pinned(m::NICS_MAX, 0);

/// VIP id -> the NIC that owns it, by generation (see `versioned`); mappable, as above.
#[map(name = "HAVIP_BINDINGS")]
pub static BINDINGS: Array<BindingCell> = Array::pinned(m::VIPS_MAX, BPF_F_MMAPABLE);

/// VIP id -> until when this node may serve it (cluster VIPs only).
#[map(name = "HAVIP_FENCES")]
pub static FENCES: Array<Fence> = Array::pinned(m::VIPS_MAX, 0);

/// NIC index -> per-CPU counters of VIP traffic.
#[map(name = "HAVIP_NIC_STATS")]
pub static NIC_STATS: PerCpuArray<NicCounters> = PerCpuArray::pinned(m::NICS_MAX, 0);

/// VIP id -> per-CPU counters.
#[map(name = "HAVIP_VIP_STATS")]
pub static VIP_STATS: PerCpuArray<VipCounters> = PerCpuArray::pinned(m::VIPS_MAX, 0);

/// (direction, outcome) -> per-CPU packet count.
#[map(name = "HAVIP_OUTCOMES")]
pub static OUTCOMES: PerCpuArray<u64> = PerCpuArray::pinned(m::OUTCOMES_LEN, 0);

/// Probe slot -> the (NIC, target) path it measures.
#[map(name = "HAVIP_PROBE_SLOTS")]
pub static PROBE_SLOTS: Array<ProbeSlot> = Array::pinned(m::PROBE_SLOTS_MAX, 0);

/// (slot, seq) -> when the probe left, ns.
#[map(name = "HAVIP_PROBE_SENT")]
pub static PROBE_SENT: Array<u64> = Array::pinned(m::PROBE_SLOTS_MAX * m::PROBE_SEQ_WINDOW, 0);

/// Probe slot -> what was measured.
#[map(name = "HAVIP_PROBE_STATS")]
pub static PROBE_STATS: Array<ProbeStats> = Array::pinned(m::PROBE_SLOTS_MAX, 0);

/// Flow hash -> (check << 32 | end sequence) of the flow's sampled segment in flight.
#[map(name = "HAVIP_TCP_SAMPLE_SEQ")]
pub static TCP_SAMPLE_SEQ: Array<u64> = Array::pinned(m::TCP_SAMPLE_SLOTS, 0);

/// Flow hash -> when that segment left, ns.
#[map(name = "HAVIP_TCP_SAMPLE_TIME")]
pub static TCP_SAMPLE_TIME: Array<u64> = Array::pinned(m::TCP_SAMPLE_SLOTS, 0);

/// (peer, VIP, NIC) -> passive TCP RTT and retransmissions.
#[map(name = "HAVIP_PEER_QUALITY")]
pub static PEER_QUALITY: LruHashMap<PeerKey, PassiveStats> = LruHashMap::pinned(m::PEER_QUALITY_MAX, 0);

/// Class id -> its CPU queues and HTB class.
#[map(name = "HAVIP_CLASSES")]
pub static CLASSES: Array<ClassInfo> = Array::pinned(havip_common::CLASSES_MAX, 0);

/// (VIP id, protocol, designated port) -> class id and counters, for ports with a class of
/// their own.
#[map(name = "HAVIP_PORT_CLASSES")]
pub static PORT_CLASSES: HashMap<RemapKey, PortClass> = HashMap::pinned(m::PORT_CLASSES_MAX, 0);

/// Counters index (from the class's VIP info or port class) -> per-CPU counters of one
/// (VIP, class); havipd zeroes an entry before it hands out its index.
#[map(name = "HAVIP_CLASS_STATS")]
pub static CLASS_STATS: PerCpuArray<ClassCounters> = PerCpuArray::pinned(m::CLASS_STATS_MAX, 0);

/// (VIP id, class) -> its `CLASS_STATS` index. The programs never read it: declared here
/// so that it is created and pinned with the others, for havipd and the CLI.
#[map(name = "HAVIP_CLASS_STATS_INDEX")]
pub static CLASS_STATS_INDEX: HashMap<ClassStatsKey, u32> = HashMap::pinned(m::CLASS_STATS_MAX, 0);

/// CPU -> the classes' ingress queue on it.
#[map(name = "HAVIP_CPUMAP")]
pub static CPUMAP: CpuMap = CpuMap::pinned(havip_common::CPUMAP_MAX, 0);

/// Class id -> per-CPU packets taken off its CPU queues.
#[map(name = "HAVIP_QUEUE_STATS")]
pub static QUEUE_STATS: PerCpuArray<QueueCounters> = PerCpuArray::pinned(havip_common::CLASSES_MAX, 0);

/// Target CPU -> per-CPU (enqueuing CPU) queue counters from the kernel's tracepoint.
#[map(name = "HAVIP_CPU_QUEUES")]
pub static CPU_QUEUES: PerCpuArray<CpuQueueCounters> = PerCpuArray::pinned(havip_common::CPUMAP_MAX, 0);

/// 0 -> the id of `CPUMAP`.
#[map(name = "HAVIP_CPUMAP_ID")]
pub static CPUMAP_ID: Array<u32> = Array::pinned(1, 0);

/// Per-CPU room to build ARP/ND replies in before they are stored into the packet. Not on
/// the stack: the stack is 512 bytes, most of it the fast path's, and the verifier refuses
/// misaligned stack access, where wire headers put their addresses (a map value may be
/// accessed misaligned). Not pinned: nothing outside one program run reads it.
#[map(name = "HAVIP_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// See [`SCRATCH`].
#[repr(C, align(8))]
pub struct Scratch {
    pub bytes: [u8; 96],
}
