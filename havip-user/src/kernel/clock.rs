//! The one clock of cluster mode: CLOCK_BOOTTIME, which the programs read as
//! `bpf_ktime_get_boot_ns` and which keeps counting through a suspend (a suspended owner
//! must find its fence expired, not paused).

use std::time::Duration;

pub fn now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_BOOTTIME exists on every kernel havip supports.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
