//! Application classes: what the programs need to put a VIP's traffic into its class's
//! queues (a CPU queue of the cpumap on ingress, an HTB class on egress) and count it.

use core::mem::size_of;

/// Class ids index `CLASSES`; 0 means "no class": the normal path.
pub const CLASSES_MAX: u32 = 64;
/// How many CPUs one class may spread its ingress over.
pub const CLASS_CPUS_MAX: usize = 8;
/// Entries of the cpumap: CPU ids havip can steer to.
pub const CPUMAP_MAX: u32 = 256;

/// `VipInfo::flags`: some (proto, port) of this VIP has its own class in `PORT_CLASSES`.
pub const VIP_PORT_CLASSES: u32 = 1;

/// XDP metadata the ingress program leaves in front of a frame it sends to a CPU queue, so
/// the program running on that CPU knows the class without parsing the packet again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassMeta {
    /// `CLASS_META_MAGIC`: metadata someone else left is not mistaken for ours.
    pub magic: u32,
    pub class: u32,
}
pub const CLASS_META_MAGIC: u32 = 0x4856_434c;

/// One class: where its ingress goes and which HTB class its egress joins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassInfo {
    /// skb->priority selecting the class's HTB class on egress; 0: leave the packet's own.
    pub skb_priority: u32,
    /// How many of `cpus` are in use; 0: ingress takes the normal path.
    pub ncpus: u32,
    /// The CPUs (cpumap keys) of the class's ingress queues; a flow sticks to one.
    pub cpus: [u32; CLASS_CPUS_MAX],
    /// The class's name, NUL-padded: the CLI names classes without the config, and a
    /// restarted havipd keeps each class's id.
    pub name: [u8; 16],
}

/// A port's own class (value of `PORT_CLASSES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PortClass {
    /// Class id (`CLASSES` index).
    pub class: u32,
    /// `CLASS_STATS` index of (VIP, class).
    pub stats: u32,
}

/// Key of `CLASS_STATS_INDEX`: one VIP's traffic in one class.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClassStatsKey {
    pub vip_id: u32,
    pub class: u32,
}

/// Per-CPU counters of one VIP in one class. Bytes are L2 frame bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ClassCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Of those, sent to the class's CPU queue (the rest had no queue: normal path).
    pub rx_queued: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl ClassCounters {
    pub fn add(&mut self, o: &ClassCounters) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.rx_queued += o.rx_queued;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
    }
}

/// Per-CPU counters of a class's packets taken off a CPU queue, counted by the program the
/// cpumap runs on the queue's CPU: which CPU's slot grows shows where the class ran.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct QueueCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one CPU queue as the kernel reports them (tracepoint `xdp_cpumap_enqueue`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct CpuQueueCounters {
    pub enqueued: u64,
    /// Frames dropped because the queue was full.
    pub drops: u64,
}

const _: () = assert!(size_of::<ClassMeta>() == 8);
const _: () = assert!(size_of::<ClassInfo>() == 8 + 4 * CLASS_CPUS_MAX + 16);
const _: () = assert!(size_of::<ClassStatsKey>() == 8);
const _: () = assert!(size_of::<PortClass>() == 8);
const _: () = assert!(size_of::<ClassCounters>() == 5 * 8);
const _: () = assert!(size_of::<QueueCounters>() == 2 * 8);
const _: () = assert!(size_of::<CpuQueueCounters>() == 2 * 8);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ClassInfo {}
    unsafe impl aya::Pod for super::ClassStatsKey {}
    unsafe impl aya::Pod for super::PortClass {}
    unsafe impl aya::Pod for super::ClassCounters {}
    unsafe impl aya::Pod for super::QueueCounters {}
    unsafe impl aya::Pod for super::CpuQueueCounters {}
}
