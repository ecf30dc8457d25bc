//! Application classes: which class a VIP packet belongs to, the CPU queue its ingress is
//! processed on (a cpumap redirect), the HTB class its egress joins (skb->priority), and
//! the per-class counters, including the kernel's queue-full drops.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_meta,
    programs::{RawTracePointContext, TcContext, XdpContext},
};
use havip_common::{
    ClassCounters, ClassInfo, ClassMeta, RemapKey, CLASS_CPUS_MAX, CLASS_META_MAGIC, IPPROTO_TCP,
    IPPROTO_UDP, VIP_PORT_CLASSES,
};

use crate::{
    maps::{CLASSES, CLASS_STATS, CPUMAP, CPUMAP_ID, CPU_QUEUES, PORT_CLASSES, QUEUE_STATS},
    parse::PacketMeta,
    vips::VipHit,
};

/// A packet's class: its id, its `CLASS_STATS` index for this VIP, its settings.
#[derive(Clone, Copy)]
pub struct Class {
    pub id: u32,
    pub stats: u32,
    pub info: *const ClassInfo,
}

/// The class of a VIP packet: its (proto, VIP-side port)'s own class, else the VIP's.
/// `port_be` is the designated port, as the peer addresses it, in both directions.
#[inline(always)]
pub fn of(vip: &VipHit, proto: u8, port_be: u16) -> Option<Class> {
    let (mut id, mut stats) = (vip.class, vip.class_stats);
    if vip.flags & VIP_PORT_CLASSES != 0 && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        if let Some(c) = unsafe { PORT_CLASSES.get(RemapKey::new(vip.id, proto, port_be)) } {
            (id, stats) = (c.class, c.stats);
        }
    }
    if id == 0 {
        return None;
    }
    Some(Class { id, stats, info: CLASSES.get_ptr(id)? })
}

/// This CPU's counters of (VIP, class), by the class's index; havipd zeroed the entry
/// before handing the index out, the programs only count.
#[inline(always)]
pub fn counters(stats: u32) -> Option<&'static mut ClassCounters> {
    CLASS_STATS.get_ptr_mut(stats).map(|p| unsafe { &mut *p })
}

/// Ingress: hands the frame to one of the class's CPU queues, a flow always to the same one
/// (order within a flow is kept). Returns whether it did: false when the class has no
/// queue or the queue's CPU has none (the caller passes the frame on the normal path). The frame carries a
/// [`ClassMeta`] in its XDP metadata for the program on the queue's CPU.
/// Call last: adjusting the metadata invalidates every packet pointer.
#[inline(always)]
pub fn to_cpu_queue(ctx: &XdpContext, meta: &PacketMeta, class: u32, info: *const ClassInfo) -> bool {
    let n = unsafe { (*info).ncpus } as usize;
    if n == 0 || n > CLASS_CPUS_MAX {
        return false;
    }
    let s = meta.src[0] ^ meta.src[1];
    let h = ((s ^ (s >> 32)) as u32 ^ ((meta.sport_be as u32) << 16 | meta.dport_be as u32)).wrapping_mul(0x9e37_79b1);
    // Multiply-shift instead of `%`: the verifier tracks the bound (< n <= 8) through it.
    let i = (((h >> 16) as usize) * n) >> 16;
    let cpu = unsafe { (*info).cpus[i] };
    // Metadata of exactly one ClassMeta: a fresh frame has none (grow by one); a frame run
    // again by BPF_PROG_RUN keeps the last run's (grow by nothing, so the bench times the
    // helper and the store every run instead of a full metadata area after a few). The
    // pointer difference needs CAP_PERFMON, which havipd has.
    let size = core::mem::size_of::<ClassMeta>() as i32;
    let have = (ctx.data() - ctx.metadata()) as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, have - size) } == 0 {
        let (m, data) = (ctx.metadata(), ctx.data());
        if m + core::mem::size_of::<ClassMeta>() <= data {
            unsafe { *(m as *mut ClassMeta) = ClassMeta { magic: CLASS_META_MAGIC, class } };
        }
    }
    // A CPU without a queue (removed by a reload racing this packet): pass normally.
    CPUMAP.redirect(cpu, xdp_action::XDP_PASS as u64) == Ok(xdp_action::XDP_REDIRECT)
}

/// Egress: puts the packet into the class's HTB class.
#[inline(always)]
pub fn set_priority(ctx: &TcContext, info: *const ClassInfo) {
    let prio = unsafe { (*info).skb_priority };
    if prio != 0 {
        unsafe { (*ctx.skb.skb).priority = prio };
    }
}

/// On a class's CPU: counts the frame for its class, on this CPU's slot.
#[inline(always)]
pub fn on_cpu_queue(ctx: &XdpContext) {
    let (m, data) = (ctx.metadata(), ctx.data());
    if m + core::mem::size_of::<ClassMeta>() > data {
        return;
    }
    let cm = unsafe { *(m as *const ClassMeta) };
    if cm.magic != CLASS_META_MAGIC {
        return;
    }
    if let Some(q) = QUEUE_STATS.get_ptr_mut(cm.class) {
        unsafe {
            (*q).packets += 1;
            (*q).bytes += (ctx.data_end() - data) as u64;
        }
    }
}

/// Tracepoint `xdp_cpumap_enqueue(int map_id, u32 processed, u32 drops, int to_cpu)`: how
/// many frames a bulk flush offered a CPU queue and how many it dropped because it was full.
#[inline(always)]
pub fn on_enqueue(ctx: &RawTracePointContext) {
    let map_id: u64 = ctx.arg(0);
    let processed: u64 = ctx.arg(1);
    let drops: u64 = ctx.arg(2);
    let to_cpu: u64 = ctx.arg(3);
    match CPUMAP_ID.get(0) {
        Some(&ours) if ours != 0 && ours == map_id as u32 => {}
        _ => return,
    }
    let (processed, drops) = (processed as u32 as u64, drops as u32 as u64);
    if let Some(c) = CPU_QUEUES.get_ptr_mut(to_cpu as u32) {
        unsafe {
            (*c).enqueued += processed.saturating_sub(drops);
            (*c).drops += drops;
        }
    }
}
