//! Ownership fencing for cluster mode: a VIP of a cluster is answered for (ARP/ND) and
//! sourced (egress) by this node only before its serve-until time, so two nodes never
//! answer for one VIP even when a controller is dead or paused while its programs keep
//! running. havipd extends the time only after a fresh confirmation of its ownership
//! (see `havip_user::cluster`); the programs compare it with the boot clock.

use core::mem::size_of;

/// `VipInfo::flags`: the VIP is cluster-managed; the programs consult `FENCES` for it.
/// VIPs without the flag (a node without `[cluster]`) are served unconditionally.
pub const VIP_FENCED: u32 = 2;

/// `FENCES[vip_id]`: until when this node may serve the VIP, and under which ownership.
///
/// Written only by havipd's cluster service once the VIP has an id (the reconciler zeroes
/// the entry when it assigns the id, so a new or reused id serves nothing). A zero entry
/// serves nothing: a node that boots or restarts is silent until it holds a confirmed
/// epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Fence {
    /// CLOCK_BOOTTIME ns (`bpf_ktime_get_boot_ns`, counts through suspend): serve while
    /// now < this. 0: never.
    pub serve_until_ns: u64,
    /// The ownership epoch (the etcd mod revision of the VIP's record) the time was
    /// confirmed for; for operators and for adoption after a restart, not read by programs.
    pub epoch: u64,
}

const _: () = assert!(size_of::<Fence>() == 16);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of two u64, no padding (asserted above): every bit pattern is valid.
unsafe impl aya::Pod for Fence {}
