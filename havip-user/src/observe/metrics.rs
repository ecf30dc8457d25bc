//! Prometheus metrics: havipd serves the kernel's counters and its own health as
//! OpenMetrics text on `[metrics] listen` (default `127.0.0.1:9469`), `GET /metrics`.
//!
//! The registry is built afresh at each scrape from the pinned maps, the same
//! [`Snapshot`] `havip stats` reads, so the numbers are the kernel's own and survive
//! havipd restarts (counters are never reset by the controller). Only the controller's
//! health ([`DaemonMetrics`]: rebinds, applies) lives in this process.
//!
//! Traffic counters are labelled by VIP only, never by the NIC that owns it: a counter
//! whose label set changes on every failover would restart from zero in Prometheus'
//! eyes. The owner is its own gauge, `havip_vip_bound{vip,nic}`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc},
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tracing::{debug, error, info};

use crate::{
    cluster::{decide::CHANGE_REASONS, status::Status as ClusterStatus},
    kernel::pins::PinLayout,
    node::{health::DaemonMetrics, state::State},
    observe::stats::Snapshot,
};

/// What Prometheus gets: OpenMetrics 1.0 text (Prometheus asks for it first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

type Labels = Vec<(&'static str, String)>;

/// A registry filled with values read at scrape time.
struct Exposition {
    registry: Registry,
}

impl Exposition {
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, samples: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).inc_by(v);
        }
        self.register(name, help, unit, family);
    }

    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, samples: impl IntoIterator<Item = (Labels, f64)>) {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).set(v);
        }
        self.register(name, help, unit, family);
    }

    /// An unlabelled counter (written without `{}`, which some parsers reject).
    fn counter1(&mut self, name: &str, help: &str, v: u64) {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(v);
        self.register(name, help, None, c);
    }

    /// An unlabelled gauge (written without `{}`, which some parsers reject).
    fn gauge1(&mut self, name: &str, help: &str, unit: Option<Unit>, v: f64) {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        self.register(name, help, unit, g);
    }

    fn register(&mut self, name: &str, help: &str, unit: Option<Unit>, metric: impl prometheus_client::registry::Metric) {
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, metric),
            None => self.registry.register(name, help, metric),
        }
    }
}

fn l1(k: &'static str, v: impl ToString) -> Labels {
    vec![(k, v.to_string())]
}

fn l2(k1: &'static str, v1: impl ToString, k2: &'static str, v2: impl ToString) -> Labels {
    vec![(k1, v1.to_string()), (k2, v2.to_string())]
}

fn ms_to_secs(ms: Option<f64>) -> Option<f64> {
    ms.map(|m| m / 1000.0)
}

/// The exposition: the dataplane's counters (`snap`; `None` when the pinned maps cannot
/// be read) and the controller's health.
pub fn render(snap: Option<&Snapshot>, daemon: &DaemonMetrics) -> String {
    let mut x = Exposition { registry: Registry::default() };
    let h = daemon.health();

    // The controller.
    x.gauge1("havip_controller_up", "1 while havipd runs and serves this endpoint", None, 1.0);
    x.gauge1("havip_controller_start_time", "When this havipd started, Unix time", Some(Unit::Seconds), unix_secs(daemon.started));
    x.gauge("havip_build_info", "havipd's version (value 1)", None, [(l1("version", env!("CARGO_PKG_VERSION")), 1.0)]);
    x.gauge1("havip_dataplane_up", "1 if the pinned maps could be read for this scrape", None, if snap.is_some() { 1.0 } else { 0.0 });
    x.gauge1(
        "havip_config_last_apply_success",
        "1 if the last configuration apply (start or reload) succeeded, 0 if it was refused",
        None,
        h.last_apply.map_or(0.0, |(ok, _)| if ok { 1.0 } else { 0.0 }),
    );
    x.gauge1(
        "havip_config_last_apply_timestamp",
        "When the last configuration apply was attempted, Unix time (0: not yet)",
        Some(Unit::Seconds),
        h.last_apply.map_or(0.0, |(_, t)| unix_secs(t)),
    );
    x.gauge1("havip_config_generation", "Apply attempts on this node so far (kept across restarts)", None, h.generation as f64);
    x.counter(
        "havip_config_applies",
        "Configuration applies by this havipd (start and reloads), by result",
        None,
        [(l1("result", "success"), h.applies_ok), (l1("result", "failure"), h.applies_failed)],
    );
    x.counter(
        "havip_rebinds",
        "VIPs bound to a NIC by this havipd, by reason (initial, link_down, not_candidate, failback, operator, quality, path_dark)",
        None,
        h.rebinds.iter().map(|(r, n)| (l1("reason", r), *n)),
    );

    if let Some(c) = daemon.cluster() {
        cluster(&mut x, &c);
    }

    let Some(s) = snap else {
        return encode(&x.registry);
    };

    // Per VIP. Labelled by VIP only: see the module's doc.
    let vip = |v: &crate::observe::stats::VipStats| v.vip.to_string();
    let per_vip = |f: fn(&crate::observe::stats::VipStats) -> u64| s.vips.iter().map(move |v| (l1("vip", vip(v)), f(v)));
    let per_dir = |f: fn(&havip_common::DirCounters) -> u64| {
        s.vips.iter().flat_map(move |v| [(l2("vip", vip(v), "direction", "rx"), f(&v.rx)), (l2("vip", vip(v), "direction", "tx"), f(&v.tx))])
    };
    x.counter("havip_vip_rx_packets", "Packets to the VIP seen by XDP", None, per_vip(|v| v.rx.packets));
    x.counter("havip_vip_rx", "Bytes to the VIP seen by XDP (frames, L2 header included)", Some(Unit::Bytes), per_vip(|v| v.rx.bytes));
    x.counter("havip_vip_tx_packets", "Packets from the VIP seen by TC (a GSO packet counts as its segments)", None, per_vip(|v| v.tx.packets));
    x.counter("havip_vip_tx", "Bytes from the VIP seen by TC (frames, L2 header included)", Some(Unit::Bytes), per_vip(|v| v.tx.bytes));
    x.counter("havip_vip_remapped_packets", "VIP packets whose port was rewritten, by direction (rx: XDP, tx: TC)", None, per_dir(|d| d.remapped));
    x.counter("havip_vip_passed_packets", "VIP packets left as they were (no mapping for the port, or not TCP/UDP)", None, per_dir(|d| d.passed));
    x.counter(
        "havip_vip_dropped_packets",
        "Packets of the VIP dropped by havip (rx: invalid neighbour solicitations for it; tx: fenced, or its owning NIC gone); reasons in havip_packets_total",
        None,
        per_dir(|d| d.dropped),
    );
    x.counter(
        "havip_vip_protocol_packets",
        "VIP packets by direction and protocol (tcp, udp, icmp, other)",
        None,
        s.vips.iter().flat_map(|v| {
            [("rx", &v.rx), ("tx", &v.tx)].into_iter().flat_map(move |(dir, d)| {
                [("tcp", d.tcp), ("udp", d.udp), ("icmp", d.icmp), ("other", d.other)]
                    .map(|(p, n)| (vec![("vip", vip(v)), ("direction", dir.to_string()), ("protocol", p.to_string())], n))
            })
        }),
    );
    x.counter("havip_vip_misdirected_packets", "Packets for the VIP that arrived on a NIC not owning it (accepted)", None, per_vip(|v| v.wire.misdirected));
    x.counter("havip_vip_steered_packets", "Packets from the VIP redirected to the owning NIC", None, per_vip(|v| v.wire.steered));
    x.counter(
        "havip_vip_neighbour_replies",
        "ARP requests (kind=arp) and neighbour solicitations (kind=nd) for the VIP answered by its owner",
        None,
        s.vips.iter().flat_map(|v| [(l2("vip", vip(v), "kind", "arp"), v.wire.arp_replies), (l2("vip", vip(v), "kind", "nd"), v.wire.nd_replies)]),
    );
    x.counter(
        "havip_vip_neighbour_dropped",
        "ARP requests / neighbour solicitations for the VIP dropped on non-owning NICs",
        None,
        per_vip(|v| v.wire.neigh_dropped),
    );
    x.counter("havip_vip_moves", "Moves of the VIP between NICs (kept in the kernel across havipd restarts)", None, per_vip(|v| v.moves));
    x.gauge(
        "havip_vip_bound",
        "1 for the NIC that owns the VIP; an unbound VIP has a single series without nic, value 0",
        None,
        s.vips.iter().map(|v| if v.nic == "-" { (l1("vip", vip(v)), 0.0) } else { (l2("vip", vip(v), "nic", &v.nic), 1.0) }),
    );
    x.gauge(
        "havip_vip_bound_duration",
        "Time since the VIP was bound to its NIC",
        Some(Unit::Seconds),
        s.vips.iter().filter_map(|v| Some((l1("vip", vip(v)), v.bound_for_secs?))),
    );
    x.gauge(
        "havip_vip_pinned",
        "1 for a VIP the operator pinned to a NIC (havip bind)",
        None,
        s.vips.iter().filter_map(|v| Some((l2("vip", vip(v), "nic", v.pinned.as_ref()?), 1.0))),
    );

    // Per NIC: the VIP traffic each carried.
    x.gauge(
        "havip_nic_ingress_hook",
        "1 for the hook each NIC's ingress program runs on (xdp-native, xdp-generic, tc)",
        None,
        s.nics.iter().map(|n| (l2("nic", &n.nic, "hook", &n.hook), 1.0)),
    );
    let per_nic = |f: fn(&havip_common::NicCounters) -> u64| s.nics.iter().map(move |n| (l1("nic", &n.nic), f(&n.counters)));
    x.counter("havip_nic_rx_packets", "VIP packets received while this NIC owned the VIP", None, per_nic(|c| c.rx_packets));
    x.counter("havip_nic_rx", "VIP bytes received while this NIC owned the VIP", Some(Unit::Bytes), per_nic(|c| c.rx_bytes));
    x.counter("havip_nic_tx_packets", "VIP packets that left through this NIC (steered ones included)", None, per_nic(|c| c.tx_packets));
    x.counter("havip_nic_tx", "VIP bytes that left through this NIC", Some(Unit::Bytes), per_nic(|c| c.tx_bytes));
    x.counter(
        "havip_nic_neighbour_replies",
        "ARP replies (kind=arp) and neighbour advertisements (kind=nd) this NIC sent for VIPs",
        None,
        s.nics.iter().flat_map(|n| [(l2("nic", &n.nic, "kind", "arp"), n.counters.arp_replies), (l2("nic", &n.nic, "kind", "nd"), n.counters.nd_replies)]),
    );

    // Per (VIP, class), and per class: its CPU queues.
    let per_class = |f: fn(&havip_common::ClassCounters) -> u64| {
        s.vips.iter().flat_map(move |v| v.classes.iter().map(move |c| (l2("vip", vip(v), "class", &c.class), f(&c.counters))))
    };
    x.counter("havip_vip_class_rx_packets", "Packets to the VIP in this class", None, per_class(|c| c.rx_packets));
    x.counter("havip_vip_class_rx", "Bytes to the VIP in this class", Some(Unit::Bytes), per_class(|c| c.rx_bytes));
    x.counter("havip_vip_class_rx_queued_packets", "Packets to the VIP in this class sent to the class's CPU queue", None, per_class(|c| c.rx_queued));
    x.counter("havip_vip_class_tx_packets", "Packets from the VIP in this class", None, per_class(|c| c.tx_packets));
    x.counter("havip_vip_class_tx", "Bytes from the VIP in this class", Some(Unit::Bytes), per_class(|c| c.tx_bytes));
    x.counter(
        "havip_class_processed_packets",
        "Frames of the class its CPU queues delivered, by the CPU that processed them",
        None,
        s.classes.iter().flat_map(|c| {
            c.processed_per_cpu.iter().enumerate().filter(|(i, n)| **n > 0 || c.cpus.contains(&(*i as u32))).map(|(i, n)| (l2("class", &c.class, "cpu", i), *n))
        }),
    );
    x.counter(
        "havip_class_processed",
        "Bytes of the class its CPU queues delivered",
        Some(Unit::Bytes),
        s.classes.iter().map(|c| (l1("class", &c.class), c.processed_bytes)),
    );
    x.counter(
        "havip_class_queue_dropped_packets",
        "Frames the kernel dropped because a CPU queue of the class was full (a CPU's queue is shared by its classes)",
        None,
        s.classes.iter().map(|c| (l1("class", &c.class), c.queue_drops)),
    );

    // Per path (probes from a NIC's own address to a target).
    let path = |p: &crate::observe::stats::PathStats| l2("nic", &p.nic, "target", p.target);
    x.counter("havip_path_probes_sent", "Probes sent on the path", None, s.paths.iter().map(|p| (path(p), p.sent)));
    x.counter("havip_path_probes_received", "Probe replies received on the path", None, s.paths.iter().map(|p| (path(p), p.received)));
    x.gauge(
        "havip_path_rtt_ewma",
        "Moving average (weight 1/8) of the path's kernel-measured RTT",
        Some(Unit::Seconds),
        s.paths.iter().filter_map(|p| Some((path(p), ms_to_secs(p.rtt_ewma_ms)?))),
    );
    x.gauge(
        "havip_path_rtt_p50",
        "Median RTT of the path (upper edge of its log2 histogram bucket)",
        Some(Unit::Seconds),
        s.paths.iter().filter_map(|p| Some((path(p), ms_to_secs(p.rtt_p50_ms)?))),
    );
    x.gauge(
        "havip_path_rtt_p99",
        "99th percentile RTT of the path (upper edge of its log2 histogram bucket)",
        Some(Unit::Seconds),
        s.paths.iter().filter_map(|p| Some((path(p), ms_to_secs(p.rtt_p99_ms)?))),
    );
    x.gauge(
        "havip_path_loss",
        "Probes without a reply since the path was set up, 0 to 1 (rate() of the probe counters gives recent loss)",
        Some(Unit::Other("ratio".into())),
        s.paths.iter().filter_map(|p| Some((path(p), p.loss_pct? / 100.0))),
    );
    x.gauge(
        "havip_path_hops",
        "Routers on the way back, from the last reply's TTL / hop limit",
        None,
        s.paths.iter().filter_map(|p| Some((path(p), p.hops? as f64))),
    );

    // Everything the programs saw, by what they did with it.
    x.counter(
        "havip_packets",
        "Packets the programs handled, by direction (ingress: XDP, egress: TC) and outcome; the drop outcomes name why havip dropped a packet",
        None,
        s.outcomes.iter().flat_map(|(dir, per)| per.iter().map(move |(o, n)| (l2("direction", dir, "outcome", o), *n))),
    );
    encode(&x.registry)
}

/// Cluster mode: ownership changes, heartbeats, etcd round trips, lease renewals, and
/// per-peer and per-VIP state, from the cluster service's latest status (100 ms old at most).
fn cluster(x: &mut Exposition, c: &ClusterStatus) {
    let n = &c.counters;
    x.counter(
        "havip_cluster_ownership_changes",
        "VIP ownership changes this node won in etcd, by reason (initial, owner-silent, giveback)",
        None,
        CHANGE_REASONS.iter().map(|r| (l1("reason", r), n.claims.get(*r).copied().unwrap_or(0))),
    );
    x.counter1("havip_cluster_claims_lost", "Ownership claims that lost their etcd transaction to another writer", n.claims_lost);
    x.counter1(
        "havip_cluster_takeovers_held",
        "Takeovers not made because the silent owner was alive in etcd (cut from its peers, not dead)",
        n.takeovers_held,
    );
    x.counter1("havip_cluster_signs_of_life_written", "Rewrites of this node's sign of life in etcd (while it misses some peer's heartbeats)", n.marks_written);
    x.counter1("havip_cluster_serving_starts", "Times this node started serving a cluster VIP", n.starts);
    x.counter1("havip_cluster_serving_stops", "Times this node stopped serving a cluster VIP", n.stops);
    x.counter1("havip_cluster_heartbeats_sent", "Heartbeat datagrams sent (one per path and peer address)", n.heartbeats_sent);
    x.counter1(
        "havip_cluster_heartbeats_late",
        "Heartbeat rounds sent a quarter of the suspicion time or more after they were due (the cluster thread did not get the CPU)",
        n.heartbeats_late,
    );
    x.counter1(
        "havip_cluster_etcd_reads_slow",
        "Confirmation reads etcd answered after their period (lease / 4) had passed (fences then hold by acknowledgements)",
        n.etcd_reads_slow,
    );
    x.gauge1(
        "havip_cluster_heartbeat_late_max",
        "The latest any heartbeat round went out past its due time since havipd started",
        Some(Unit::Seconds),
        n.heartbeat_late_max_us as f64 / 1e6,
    );
    x.counter(
        "havip_cluster_heartbeats_received",
        "Heartbeats received, by peer and the path (sender's NIC) they came over",
        None,
        c.peers.iter().flat_map(|p| p.paths.iter().map(move |q| (l2("peer", &p.name, "path", &q.path), q.received))),
    );
    x.counter(
        "havip_cluster_heartbeats_lost",
        "Heartbeat sequence numbers skipped, by peer and path",
        None,
        c.peers.iter().flat_map(|p| p.paths.iter().map(move |q| (l2("peer", &p.name, "path", &q.path), q.lost))),
    );
    x.gauge(
        "havip_cluster_peer_up",
        "1 while the peer's heartbeats arrive (or it holds a planned-restart grace)",
        None,
        c.peers.iter().map(|p| (l1("peer", &p.name), if p.alive { 1.0 } else { 0.0 })),
    );
    x.gauge(
        "havip_cluster_peer_rtt",
        "Heartbeat round trip to the peer, from its latest acknowledgement",
        Some(Unit::Seconds),
        c.peers.iter().filter_map(|p| Some((l1("peer", &p.name), p.rtt_us? as f64 / 1e6))),
    );
    x.counter(
        "havip_cluster_lease_renewals",
        "Fence extensions: confirmed by an etcd read (etcd), or on peer acknowledgements alone while etcd was unconfirmed (acknowledged)",
        None,
        [(l1("by", "etcd"), n.confirmations), (l1("by", "acknowledged"), n.acked_extensions)],
    );
    x.counter1("havip_cluster_etcd_read_failures", "etcd confirmation reads that failed", n.confirmation_failures);
    x.counter(
        "havip_cluster_etcd_requests",
        "etcd round trips, by operation (read: the confirmation of every record; write: a transaction)",
        None,
        [(l1("op", "read"), n.etcd_reads), (l1("op", "write"), n.etcd_writes)],
    );
    let secs = |us: u64| us as f64 / 1e6;
    let f = Family::<Labels, Counter<f64, AtomicU64>>::default();
    f.get_or_create(&l1("op", "read")).inc_by(secs(n.etcd_read_us_total));
    f.get_or_create(&l1("op", "write")).inc_by(secs(n.etcd_write_us_total));
    x.register("havip_cluster_etcd_request_seconds", "Summed etcd round-trip time, by operation (divide by havip_cluster_etcd_requests for the mean)", None, f);
    x.gauge1(
        "havip_cluster_etcd_last_read_latency",
        "The latest etcd confirmation read's round trip",
        Some(Unit::Seconds),
        c.etcd_read_latency_us.map_or(f64::NAN, |u| secs(u)),
    );
    x.gauge1(
        "havip_cluster_etcd_last_ok_age",
        "Since the latest successful etcd read was sent (NaN: none yet)",
        Some(Unit::Seconds),
        c.etcd_last_ok_ms.map_or(f64::NAN, |m| m as f64 / 1000.0),
    );
    let m = &c.manager;
    x.gauge(
        "havip_cluster_manager_term",
        "The managing node's term (its election key's revision), labelled with its name; no series while none is elected",
        None,
        m.manager.iter().map(|name| (l1("manager", name), m.term.unwrap_or(0) as f64)),
    );
    x.gauge1("havip_cluster_manager_here", "1 while this node is the managing node", None, if m.this_node { 1.0 } else { 0.0 });
    x.counter1("havip_cluster_manager_elections_won", "Elections for the managing node this node won", m.elections_won);
    x.gauge(
        "havip_cluster_pool_spares",
        "Spare VIPs assigned to each node (checked on the link or not yet), from the ledger",
        None,
        m.pools.iter().map(|(n, l)| (l1("node", n), l.spares.len() as f64)),
    );
    x.gauge(
        "havip_cluster_pool_unchecked",
        "Of each node's spares, those not yet checked on the link",
        None,
        m.pools.iter().map(|(n, l)| (l1("node", n), l.unchecked as f64)),
    );
    x.gauge(
        "havip_cluster_pool_granted",
        "VIPs granted to applications on each node, from the ledger",
        None,
        m.pools.iter().map(|(n, l)| (l1("node", n), l.granted as f64)),
    );
    x.gauge(
        "havip_cluster_pool_conflicts",
        "Addresses each node's checks found in use on the link",
        None,
        m.pools.iter().map(|(n, l)| (l1("node", n), l.conflicts as f64)),
    );
    x.counter1("havip_cluster_manager_writes_refused", "Guarded writes etcd refused because this node was no longer the manager", m.deposed_writes);
    x.counter(
        "havip_cluster_moves",
        "Granted VIPs this node moved between nodes as the managing node, by reason (node-gone, quality, load)",
        None,
        crate::cluster::rebalance::Reason::ALL.iter().map(|r| (l1("reason", r.name()), m.moves.get(r.name()).copied().unwrap_or(0))),
    );
    x.counter1("havip_cluster_plans", "Planning (rebalancing) rounds this node ran as the managing node", m.plans);
    x.gauge1("havip_cluster_plan_last", "How long the last planning round's decision took", Some(Unit::Seconds), m.last_plan_ms / 1000.0);
    x.counter(
        "havip_cluster_grants",
        "VIP requests granted through this node's API, by how (packed into a shared VIP, a node's spare, generated by the managing node)",
        None,
        crate::cluster::requests::How::ALL.iter().map(|h| (l1("how", h.name()), m.grants.get(h.name()).copied().unwrap_or(0))),
    );
    x.counter1("havip_cluster_forwarded_answered", "Requests forwarded to the managing node that this node answered as the manager", m.forwarded_answered);
    x.counter1(
        "havip_cluster_answers_swept",
        "Answers to forwarded requests that this node, as the manager, deleted because their requesters never collected them",
        m.answers_swept,
    );
    x.counter1("havip_cluster_compactions", "Compactions of etcd's history this node made as the managing node (cluster.compact_history_ms)", m.compactions);
    x.gauge(
        "havip_cluster_vip_serving",
        "1 while this node serves the cluster VIP (its kernel fence is open)",
        None,
        c.vips.iter().map(|v| (l1("vip", v.vip), if v.here == "serving" { 1.0 } else { 0.0 })),
    );
    x.gauge(
        "havip_cluster_vip_epoch",
        "The VIP's ownership epoch in etcd (the record's revision)",
        None,
        c.vips.iter().map(|v| (l1("vip", v.vip), v.epoch as f64)),
    );
    x.gauge(
        "havip_cluster_vip_lease_left",
        "Time left on this node's kernel fence for the VIP",
        Some(Unit::Seconds),
        c.vips.iter().map(|v| (l1("vip", v.vip), v.lease_left_ms as f64 / 1000.0)),
    );
}

fn encode(r: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, r);
    out
}

/// What a scrape needs: where the node's maps and state are, and the controller's health.
struct Scraper {
    pins: PinLayout,
    run_dir: PathBuf,
    daemon: Arc<DaemonMetrics>,
}

impl Scraper {
    fn scrape(&self) -> String {
        // The state file adds operator pins. Its config path is dropped: it only assigns
        // paths to VIPs, which the metrics don't label (paths are series of their own).
        let state = State::load(&self.run_dir).ok().flatten().map(|s| State { config_path: None, ..s });
        match Snapshot::read(&self.pins, state.as_ref()) {
            Ok(snap) => render(Some(&snap), &self.daemon),
            Err(e) => {
                debug!(error = %format!("{e:#}"), "metrics: cannot read the pinned maps");
                render(None, &self.daemon)
            }
        }
    }
}

/// Listens on `listen` (nothing when `None`) and serves `/metrics` in the background.
/// Call before applying anything: a taken address fails the start with nothing changed.
/// The socket belongs to the network namespace havipd runs in (`--netns`).
pub async fn serve(listen: Option<SocketAddr>, pin_root: &Path, run_dir: &Path, daemon: Arc<DaemonMetrics>) -> anyhow::Result<()> {
    let Some(addr) = listen else {
        info!("metrics disabled ([metrics] enabled = false)");
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another havipd in this network namespace, or another program, has it: give this node its own address, or set `enabled = false`)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (no interface of this node has that address)",
            _ => "",
        };
        anyhow::anyhow!("field `metrics.listen`: cannot listen on {addr}: {e}{hint}; nothing was applied")
    })?;
    let scraper = Arc::new(Scraper { pins: PinLayout::new(pin_root), run_dir: run_dir.to_path_buf(), daemon });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/", axum::routing::get(|| async { "havipd: metrics at /metrics\n" }))
        .with_state(scraper);
    info!(listen = %addr, "serving metrics at http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics_handler(axum::extract::State(scraper): axum::extract::State<Arc<Scraper>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Reading the maps is a few dozen syscalls and, with many VIPs, milliseconds of
    // decoding and rendering: off the runtime's worker threads.
    match tokio::task::spawn_blocking(move || scraper.scrape()).await {
        Ok(body) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("scrape failed: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::metrics::DEFAULT_LISTEN,
        node::binder::Reason,
        observe::stats::{ClassStats, NicStats, PathStats, VipClassStats, VipStats},
    };

    fn cfg(metrics: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(&format!("[[nic]]\nname = \"eth0\"\n{metrics}"), "metrics")
    }

    #[test]
    fn the_listen_address_is_validated_and_named() {
        assert_eq!(cfg("").unwrap().metrics, Some(DEFAULT_LISTEN.parse().unwrap()));
        assert_eq!(cfg("[metrics]\nlisten = \"[::1]:9100\"").unwrap().metrics, Some("[::1]:9100".parse().unwrap()));
        assert_eq!(cfg("[metrics]\nenabled = false").unwrap().metrics, None);
        for bad in ["localhost:9469", "127.0.0.1", "", "127.0.0.1:0", "1.2.3.4:99999"] {
            let e = cfg(&format!("[metrics]\nlisten = \"{bad}\"")).expect_err(bad);
            assert!(e.to_string().contains("metrics.listen"), "{bad}: {e}");
        }
        let e = cfg("[metrics]\nport = 1").unwrap_err();
        assert!(e.to_string().contains("metrics"), "{e}");
    }

    fn snapshot() -> Snapshot {
        let rx = havip_common::DirCounters { packets: 10, bytes: 1000, ..Default::default() };
        let vip = |ip: &str, nic: &str| VipStats {
            vip: ip.parse().unwrap(),
            id: 0,
            nic: nic.into(),
            bound_for_secs: (nic != "-").then_some(2.5),
            moves: 1,
            pinned: None,
            mappings: vec![],
            rx,
            tx: Default::default(),
            wire: Default::default(),
            paths: vec![],
            peers: vec![],
            class: Some("gold".into()),
            classes: vec![VipClassStats { class: "gold".into(), counters: Default::default() }],
        };
        Snapshot {
            vips: vec![vip("198.18.0.1", "eth0"), vip("2001:db8::1", "-")],
            nics: vec![NicStats { nic: "eth0".into(), ifindex: 2, hook: "tc".into(), hook_reason: "virtual NIC".into(), counters: Default::default() }],
            paths: vec![PathStats {
                nic: "eth0".into(),
                target: "198.18.0.9".parse().unwrap(),
                sent: 10,
                received: 9,
                loss_pct: Some(10.0),
                rtt_ewma_ms: Some(20.0),
                rtt_p50_ms: Some(16.384),
                rtt_p99_ms: Some(32.768),
                hops: Some(1),
            }],
            classes: vec![ClassStats {
                class: "gold".into(),
                id: 1,
                cpus: vec![0],
                processed_per_cpu: vec![5, 0],
                processed_bytes: 500,
                queue_drops: 0,
                skb_priority: 0,
            }],
            outcomes: [("ingress".to_string(), [("not_vip".to_string(), 3u64)].into())].into(),
            taken: None,
            bpf_calls: 0,
        }
    }

    #[test]
    fn the_exposition_follows_prometheus_conventions() {
        let d = DaemonMetrics::new();
        d.rebound(Reason::Initial);
        d.applied(true, 3);
        let text = render(Some(&snapshot()), &d);
        for line in [
            "havip_vip_rx_packets_total{vip=\"198.18.0.1\"} 10",
            "havip_vip_rx_bytes_total{vip=\"198.18.0.1\"} 1000",
            "havip_vip_bound{vip=\"198.18.0.1\",nic=\"eth0\"} 1.0",
            "havip_vip_bound{vip=\"2001:db8::1\"} 0.0",
            "havip_rebinds_total{reason=\"initial\"} 1",
            "havip_rebinds_total{reason=\"quality\"} 0",
            "havip_controller_up 1.0",
            "havip_config_last_apply_success 1.0",
            "havip_config_generation 3.0",
            "havip_path_rtt_ewma_seconds{nic=\"eth0\",target=\"198.18.0.9\"} 0.02",
            "havip_path_loss_ratio{nic=\"eth0\",target=\"198.18.0.9\"} 0.1",
            "havip_class_processed_packets_total{class=\"gold\",cpu=\"0\"} 5",
            "havip_packets_total{direction=\"ingress\",outcome=\"not_vip\"} 3",
            "# UNIT havip_path_rtt_p99_seconds seconds",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        let mut types = BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), ty.to_string());
            }
        }
        for (name, ty) in &types {
            assert!(name.starts_with("havip_"), "{name}");
            assert!(["counter", "gauge"].contains(&ty.as_str()), "{name}: {ty}");
            assert!(!name.ends_with("_total"), "{name}: the encoder adds _total to the samples");
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name.strip_suffix("_total").filter(|f| types.get(*f).map(String::as_str) == Some("counter"));
            assert!(family.is_some() || types.get(name).map(String::as_str) == Some("gauge"), "{name} is neither a counter sample nor a gauge");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn cluster_mode_adds_its_series_with_every_reason_present() {
        use crate::cluster::status::{Counters, PathStatus, PeerStatus, Status, VipStatus};
        let d = DaemonMetrics::new();
        assert!(!render(None, &d).contains("havip_cluster_"), "standalone nodes have no cluster series");
        let mut counters =
            Counters { heartbeats_sent: 40, confirmations: 7, acked_extensions: 2, etcd_reads: 9, etcd_read_us_total: 4_500, ..Default::default() };
        counters.claims.insert("owner-silent".into(), 3);
        let status = Status {
            node: "n1".into(),
            etcd_read_latency_us: Some(1_500),
            etcd_last_ok_ms: Some(250),
            peers: vec![PeerStatus {
                name: "n2".into(),
                alive: true,
                rtt_us: Some(200),
                paths: vec![PathStatus { path: "eth1".into(), received: 11, lost: 1, last_heard_ms: 3 }],
                ..Default::default()
            }],
            vips: vec![VipStatus {
                vip: "198.18.130.1".parse().unwrap(),
                owner: Some("n1".into()),
                epoch: 12,
                here: "serving".into(),
                lease_left_ms: 35,
                candidates: vec!["n1".into(), "n2".into()],
            }],
            counters,
            ..Default::default()
        };
        d.set_cluster(Arc::new(std::sync::Mutex::new(status)));
        let text = render(None, &d);
        for line in [
            "havip_cluster_ownership_changes_total{reason=\"owner-silent\"} 3",
            "havip_cluster_ownership_changes_total{reason=\"initial\"} 0",
            "havip_cluster_ownership_changes_total{reason=\"giveback\"} 0",
            "havip_cluster_heartbeats_sent_total 40",
            "havip_cluster_heartbeats_received_total{peer=\"n2\",path=\"eth1\"} 11",
            "havip_cluster_heartbeats_lost_total{peer=\"n2\",path=\"eth1\"} 1",
            "havip_cluster_peer_up{peer=\"n2\"} 1.0",
            "havip_cluster_peer_rtt_seconds{peer=\"n2\"} 0.0002",
            "havip_cluster_lease_renewals_total{by=\"etcd\"} 7",
            "havip_cluster_lease_renewals_total{by=\"acknowledged\"} 2",
            "havip_cluster_etcd_requests_total{op=\"read\"} 9",
            "havip_cluster_etcd_request_seconds_total{op=\"read\"} 0.0045",
            "havip_cluster_etcd_last_read_latency_seconds 0.0015",
            "havip_cluster_vip_serving{vip=\"198.18.130.1\"} 1.0",
            "havip_cluster_vip_epoch{vip=\"198.18.130.1\"} 12.0",
            "havip_cluster_vip_lease_left_seconds{vip=\"198.18.130.1\"} 0.035",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn without_the_maps_the_controller_is_still_reported() {
        let text = render(None, &DaemonMetrics::new());
        assert!(text.contains("havip_dataplane_up 0.0"), "{text}");
        assert!(text.contains("havip_controller_up 1.0"), "{text}");
        assert!(!text.contains("havip_vip_rx"), "{text}");
    }

    #[test]
    fn the_grafana_dashboard_is_valid_json_over_these_metrics() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/grafana-havip.json")).unwrap();
        let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is not JSON");
        assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
        let panels = d["panels"].as_array().expect("panels");
        assert!(panels.len() >= 6);
        let exposed = render(Some(&snapshot()), &DaemonMetrics::new());
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("expr");
                // Every havip_ name a query uses is one the endpoint exposes.
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("havip_")) {
                    assert!(exposed.lines().any(|l| l.split(['{', ' ']).next() == Some(word)), "panel {}: {word} is not exposed", p["title"]);
                }
            }
        }
    }
}
