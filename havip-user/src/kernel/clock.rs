//! The one clock of cluster mode: CLOCK_BOOTTIME, which the programs read as
//! `bpf_ktime_get_boot_ns` and which keeps counting through a suspend (a suspended owner
//! must find its fence expired, not paused).
//!
//! Test hook: with `HAVIP_TEST_CLOCK_RATE=<f>` this node's clock runs at `f` times real
//! time. All namespaces on a test host share one clock, so without it no test could give
//! two nodes clocks that drift apart, which is what the timing bound's `r` is for. Every
//! deadline goes into the kernel through [`to_kernel`], which undoes the scaling: a lease
//! of `L` on this clock lasts `L / f` of real time, as on a node whose oscillator runs at
//! `f`. Without the variable every conversion is the identity.

use std::{sync::OnceLock, time::Duration};

/// The kernel's boot clock, unscaled: what the programs compare fences with.
pub fn kernel_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_BOOTTIME exists on every kernel havip supports.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// This node's clock: the boot clock, or with the test hook, one running at its rate from
/// the moment of the first reading.
pub fn now() -> Duration {
    from_kernel(kernel_now())
}

/// `(rate, real boot time when the scaled clock started)`, when the hook is on.
fn scaling() -> Option<(f64, Duration)> {
    static SCALING: OnceLock<Option<(f64, Duration)>> = OnceLock::new();
    *SCALING.get_or_init(|| {
        let rate: f64 = std::env::var("HAVIP_TEST_CLOCK_RATE").ok()?.parse().ok().filter(|r: &f64| *r > 0.5 && *r < 2.0)?;
        tracing::warn!(rate, "test hook: this node's clock runs at {rate} x real time (HAVIP_TEST_CLOCK_RATE)");
        Some((rate, kernel_now()))
    })
}

/// A time on this node's clock as the kernel's boot clock reads it. Zero (a closed fence)
/// stays zero.
pub fn to_kernel(t: Duration) -> Duration {
    match scaling() {
        Some((rate, base)) if !t.is_zero() => shift(base, (t.as_secs_f64() - base.as_secs_f64()) / rate),
        _ => t,
    }
}

/// A kernel boot-clock time on this node's clock. Zero stays zero.
pub fn from_kernel(t: Duration) -> Duration {
    match scaling() {
        Some((rate, base)) if !t.is_zero() => shift(base, (t.as_secs_f64() - base.as_secs_f64()) * rate),
        _ => t,
    }
}

fn shift(base: Duration, by_secs: f64) -> Duration {
    Duration::from_secs_f64((base.as_secs_f64() + by_secs).max(0.0))
}
