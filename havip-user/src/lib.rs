//! havip's controller library: configuration, planning, the dataplane handle, the daemon,
//! live stats and the lab. `havipd` and `havip` are thin binaries over it.

pub mod announce;
pub mod api;
pub mod binder;
pub mod classes;
pub mod cli;
pub mod control;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod lab;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod pins;
pub mod plan;
pub mod pool;
pub mod rank;
pub mod prober;
pub mod qdisc;
pub mod state;
pub mod stats;
pub mod teardown;
pub mod top;

/// Logs to stderr, filtered by RUST_LOG (default: info).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // netlink-packet-route warns about every attribute newer than itself: not our news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("netlink_packet_route=error".parse().expect("static directive"));
    // Colour only on a terminal: logs in files and journals stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}
