//! Map names (the pin file names under the pin directory) and capacities.
//!
//! Each constant's doc says: key -> value, who writes, who reads.

/// The version of the dataplane's layout: every map below and every `#[repr(C)]` type in
/// this crate. havipd records it in [`LAYOUT`] when it creates the pins and refuses to
/// adopt pins that carry another one (or none), because its programs would read the old
/// maps' bytes as the new types.
///
/// Bump it on any change to a map's key, value or capacity, or to a `#[repr(C)]` type's
/// meaning (a field added, removed, reordered or reinterpreted), even one that keeps the
/// size: havipd also compares each pinned map's type, key size, value size and capacity
/// with the programs' own, but only the version catches a change of meaning.
pub const LAYOUT_VERSION: u32 = 4;

/// `0 -> u32`: the [`LAYOUT_VERSION`] the pinned maps were created with. Written by havipd
/// when it creates fresh pins, read by havipd and the CLI before they trust any other map.
/// The programs never read it.
pub const LAYOUT: &str = "HAVIP_LAYOUT";
pub const LAYOUT_LEN: u32 = 1;

/// `VipKey -> VipInfo`. Written by havipd, read by both programs to recognise a VIP.
pub const VIPS: &str = "HAVIP_VIPS";
/// Also the length of `BINDINGS` and `VIP_STATS` (indexed by VIP id). 16384 holds a node
/// of 10,000 VIPs; `VIP_STATS` takes 184 bytes per VIP per possible CPU (3 MB per CPU).
pub const VIPS_MAX: u32 = 16384;

/// `u32 slot -> SlotCell` (a [`crate::Versioned`] `VipSlot`): the fast path. A
/// direct-mapped array indexed by [`crate::vip_slot`] of the address, holding the VIP and
/// its first mappings inline, so a packet costs one inlined array access instead of two
/// hash lookups. `VIPS` and the remap tables stay the source of truth; a slot says when to
/// consult them (shared slot, more mappings than fit). Written by havipd after the tables,
/// through the mapped array (`BPF_F_MMAPABLE`), by generation; read by both programs, which
/// fall back to the tables when they cannot read a consistent version.
pub const VIP_SLOTS: &str = "HAVIP_VIP_SLOTS";
pub const VIP_SLOTS_BITS: u32 = 14;
pub const VIP_SLOTS_LEN: u32 = 1 << VIP_SLOTS_BITS;

/// `RemapKey{vip_id, proto, designated port} -> PortValue{instance port}`.
/// Written by havipd, read by the XDP ingress program.
pub const REMAP_IN: &str = "HAVIP_REMAP_IN";
/// `RemapKey{vip_id, proto, instance port} -> PortValue{designated port}`.
/// Written by havipd together with `REMAP_IN`, read by the TC egress program.
pub const REMAP_OUT: &str = "HAVIP_REMAP_OUT";
pub const REMAPS_MAX: u32 = 16384;

/// `u32 word index -> u64 bitmap` over ports: "is this port mapped at all", the small
/// pre-check of the virtual-endpoint design, so unmapped ports skip the remap hash lookup.
/// Words `[0, PORT_WORDS)` cover ingress designated ports, `[PORT_WORDS, 2*PORT_WORDS)`
/// egress instance ports. Written by havipd, read by both programs.
pub const PORT_BITMAP: &str = "HAVIP_PORT_BITMAP";
pub const PORT_WORDS: u32 = 65536 / 64;
pub const PORT_BITMAP_LEN: u32 = 2 * PORT_WORDS;

/// `u32 ifindex -> NicInfo{mac, name}`. Written by havipd, read by the CLI (names) and by
/// the programs (the NIC's own MAC, for answering on the wire).
pub const NICS: &str = "HAVIP_NICS";
pub const NICS_MAX: u32 = 64;

/// `vip_id -> BindingCell` (a [`crate::Versioned`] `Binding`): the NIC that owns each VIP
/// on the wire, the single source of truth for ownership. Written by havipd (one
/// publication per move) through the mapped array (`BPF_F_MMAPABLE`), read by both
/// programs.
pub const BINDINGS: &str = "HAVIP_BINDINGS";

/// `vip_id -> Fence`: until when this node may serve a cluster VIP (flag `VIP_FENCED`).
/// Written by havipd's cluster service (zeroed by the reconciler when an id is assigned),
/// read by both programs for flagged VIPs only.
pub const FENCES: &str = "HAVIP_FENCES";

/// Per-CPU `NicInfo::index -> NicCounters`. Written by both programs, read by the CLI.
pub const NIC_STATS: &str = "HAVIP_NIC_STATS";

/// `slot -> ProbeSlot`: which (NIC, target) path a probe slot measures. Written by
/// havipd, read by the XDP program to accept a reply only from the probed target.
pub const PROBE_SLOTS: &str = "HAVIP_PROBE_SLOTS";
pub const PROBE_SLOTS_MAX: u32 = 4096;
/// `slot * PROBE_SEQ_WINDOW + seq % PROBE_SEQ_WINDOW -> u64` CLOCK_MONOTONIC ns when the
/// probe left (0: none in flight). Written by the TC program, consumed by the XDP program.
pub const PROBE_SENT: &str = "HAVIP_PROBE_SENT";
pub const PROBE_SEQ_WINDOW: u32 = 64;
/// `slot -> ProbeStats`. Written by both programs, read by havipd and the CLI.
pub const PROBE_STATS: &str = "HAVIP_PROBE_STATS";

/// Passive TCP RTT: `flow hash (16 bits) -> (flow check << 32) | end sequence` of the one
/// sampled segment in flight per flow (0: none), and `-> send time, ns`. Arrays, so the
/// per-packet check is an inlined access, not a hash lookup. Written by TC (sample taken)
/// and XDP (sample answered).
pub const TCP_SAMPLE_SEQ: &str = "HAVIP_TCP_SAMPLE_SEQ";
pub const TCP_SAMPLE_TIME: &str = "HAVIP_TCP_SAMPLE_TIME";
pub const TCP_SAMPLE_SLOTS: u32 = 65536;
/// LRU `PeerKey{peer, vip id, NIC index} -> PassiveStats`: RTT from handshakes and sampled
/// data/ACK pairs, and retransmissions. Written by both programs (once per sample), read
/// by havipd and the CLI.
pub const PEER_QUALITY: &str = "HAVIP_PEER_QUALITY";
pub const PEER_QUALITY_MAX: u32 = 16384;

/// Per-CPU `vip_id -> VipCounters`. Written by both programs, read by the CLI; havipd zeroes
/// a slot when it frees the id so a later VIP starts from zero.
pub const VIP_STATS: &str = "HAVIP_VIP_STATS";

/// Per-CPU `Direction * Outcome::COUNT + Outcome -> u64` packets: what happened to every
/// packet the programs saw, VIP or not. Written by both programs, read by the CLI.
pub const OUTCOMES: &str = "HAVIP_OUTCOMES";
pub const OUTCOMES_LEN: u32 = 2 * crate::types::Outcome::COUNT;

/// `class id -> ClassInfo{CPUs, skb priority}`. Written by havipd, read by both programs.
pub const CLASSES: &str = "HAVIP_CLASSES";
/// `RemapKey{vip_id, proto, designated port} -> PortClass{class id, counters index}`: ports
/// with a class of their own, consulted only for VIPs flagged `VIP_PORT_CLASSES`. Written
/// by havipd, read by both.
pub const PORT_CLASSES: &str = "HAVIP_PORT_CLASSES";
pub const PORT_CLASSES_MAX: u32 = 16384;
/// Per-CPU `u32 index -> ClassCounters`: one VIP's traffic in one class. An array, so a
/// packet's count is an inlined access, not a hash lookup: the index comes with the class
/// (`VipInfo::class_stats` for the VIP's own class, `PortClass::stats` for a port's).
/// havipd assigns the indices (`CLASS_STATS_INDEX`) and zeroes an entry before any packet
/// can be counted in it. Written by both programs, read by the CLI.
pub const CLASS_STATS: &str = "HAVIP_CLASS_STATS";
pub const CLASS_STATS_MAX: u32 = 16384;
/// `ClassStatsKey{vip_id, class} -> u32`: which `CLASS_STATS` entry counts which (VIP,
/// class). Written by havipd, read by havipd (a restart keeps each pair's counters) and the
/// CLI. The programs never read it.
pub const CLASS_STATS_INDEX: &str = "HAVIP_CLASS_STATS_INDEX";
/// Cpumap `cpu -> {queue size, program}`: the classes' ingress CPU queues. Written by
/// havipd, used by the XDP ingress program's redirect.
pub const CPUMAP: &str = "HAVIP_CPUMAP";
/// Per-CPU `class id -> QueueCounters`: packets the cpumap program took off a class's CPU
/// queue, on that CPU. Written by the cpumap program, read by the CLI and tests.
pub const QUEUE_STATS: &str = "HAVIP_QUEUE_STATS";
/// Per-CPU `target cpu -> CpuQueueCounters`, from the kernel's `xdp_cpumap_enqueue`
/// tracepoint (on the enqueuing CPU). Written by the tracepoint program, read by the CLI.
pub const CPU_QUEUES: &str = "HAVIP_CPU_QUEUES";
/// `0 -> id of havip's cpumap`: the tracepoint fires for every cpumap on the host, and
/// counts only ours. Written by havipd.
pub const CPUMAP_ID: &str = "HAVIP_CPUMAP_ID";

/// Every map, for pin handling and teardown.
pub const ALL: [&str; 26] = [
    LAYOUT, VIPS, VIP_SLOTS, REMAP_IN, REMAP_OUT, PORT_BITMAP, NICS, BINDINGS, FENCES, NIC_STATS, VIP_STATS, OUTCOMES, PROBE_SLOTS,
    PROBE_SENT, PROBE_STATS, TCP_SAMPLE_SEQ, TCP_SAMPLE_TIME, PEER_QUALITY, CLASSES, PORT_CLASSES, CLASS_STATS, CLASS_STATS_INDEX, CPUMAP,
    QUEUE_STATS, CPU_QUEUES, CPUMAP_ID,
];

/// Program names as compiled into the object.
pub const PROG_INGRESS: &str = "havip_ingress";
pub const PROG_EGRESS: &str = "havip_egress";
/// The same programs with passive TCP measurement compiled in (`[passive] tcp`).
pub const PROG_INGRESS_PASSIVE: &str = "havip_ingress_p";
pub const PROG_EGRESS_PASSIVE: &str = "havip_egress_p";
/// The ingress program for the TC hook (virtual NICs), without and with passive TCP.
pub const PROG_INGRESS_TC: &str = "havip_ingress_tc";
pub const PROG_INGRESS_TC_PASSIVE: &str = "havip_ingress_tc_p";
/// XDP program the cpumap runs on a class's CPU: counts what each CPU queue delivered.
pub const PROG_CPU_QUEUE: &str = "havip_cpu_queue";
/// Raw tracepoint program on `xdp_cpumap_enqueue`: the kernel's queue-full drops.
pub const PROG_QUEUE_DROPS: &str = "havip_queue_drops";
/// The tracepoint it attaches to.
pub const QUEUE_DROPS_TRACEPOINT: &str = "xdp_cpumap_enqueue";
/// Parse-and-pass XDP program: the baseline `cargo xtask bench` compares against.
pub const PROG_BASELINE: &str = "havip_baseline";
/// The remapped path's floor in the bench: parse, VIP lookup, remap; no binding read, no
/// counters.
pub const PROG_REMAP_FLOOR: &str = "havip_remap_floor";
/// The classed path's floor in the bench: parse, VIP and class lookups, the CPU queue's
/// helpers; no remap, no counters.
pub const PROG_QUEUE_FLOOR: &str = "havip_queue_floor";
