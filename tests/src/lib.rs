//! Test harness shared by havip's kernel tests and benchmarks: packet builders, a fixture
//! that loads the programs for BPF_PROG_RUN, and network-namespace topologies with a real
//! havipd, all cleaned up on drop (also when a test panics).

pub mod api_load;
pub mod cluster;
pub mod cluster_bench;
pub mod confirm_bench;
pub mod failover;
pub mod heartbeat_bench;
pub mod fixture;
pub mod isolation;
pub mod load;
pub mod manager_bench;
pub mod packets;
pub mod paths;
pub mod placement_bench;
pub mod quality_bench;
pub mod relay;
pub mod scrape;
pub mod topology;
pub mod traffic;
pub mod veth_speed;
pub mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The `p` quantile (0..=1) of `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// Tests load eBPF and create namespaces: they need root, and say so instead of skipping.
pub fn require_root() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "havip's kernel tests need root (CAP_BPF, CAP_NET_ADMIN); run `cargo xtask test` as root");
}

/// A short name unique to this process and call, for namespaces and pin directories.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

/// Where the havipd and havip binaries are (set by `cargo xtask test`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HAVIP_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run the tests with `cargo xtask test` (it builds the binaries)", path.display());
    path
}
