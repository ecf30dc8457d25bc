//! havip's controller library. `havipd` and `havip` are thin binaries over it. The folders
//! are layers; each imports only from the layers listed before it:
//!
//! - `config`: the TOML file, validated whole into typed values (no I/O beyond reading it);
//! - `kernel`: everything that touches the kernel: the pinned dataplane and its maps, the
//!   map plan, qdiscs, rtnetlink, announcements, probe sockets, namespaces;
//! - `api`: the HTTP API's types, server and client (the server only parses and forwards);
//! - `node`: the controller: pure decisions (binder, rank, placer, pool) and the parts
//!   that carry them out (reconciler, prober, mover), driven by one event loop;
//! - `observe`: reading what runs: stats, Prometheus metrics, `havip top`;
//! - `cli`: the two binaries' verbs, the lab and teardown.
//!
//! `faults` (test-only fault points) stands outside the layers: any of them may use it.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod faults;
pub mod kernel;
pub mod node;
pub mod observe;

#[cfg(test)]
mod layers;

/// Logs to stderr, filtered by RUST_LOG (default: info).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // netlink-packet-route warns about every attribute newer than itself: not our news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("netlink_packet_route=error".parse().expect("static directive"));
    // Colour only on a terminal: logs in files and journals stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi).try_init();
}
