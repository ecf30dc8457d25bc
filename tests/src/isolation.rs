//! The class-isolation scenario, shared by its test and `cargo xtask bench`: a node with a
//! latency-sensitive UDP service on one VIP and a bulk TCP service on another, behind a
//! 40 Mbit/s bottleneck with a deep buffer; the latency service's p99 round trip is
//! measured idle and under a bulk download, without classes, then shaped with one class
//! for both, then with a class each (applied by reloads, without restarting havipd).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::Serialize;

use crate::{
    load::{bulk_instance, download, quantile, udp_echo_instance, udp_round_trips},
    topology::{Topology, VIP1_V4, VIP2_V4},
};

/// VIP1 answers UDP requests on :7000 (instance :8007); VIP2 serves bulk TCP on :80
/// (instance :8082). `vip1`/`vip2` go into the VIP sections (e.g. `class = "latency"`),
/// `classes` after everything (class sections).
pub fn two_services(vip1: &str, vip2: &str, classes: &str) -> String {
    format!(
        "[[vip]]\naddress = \"{VIP1_V4}\"\n{vip1}\n[[vip]]\naddress = \"{VIP2_V4}\"\n{vip2}\n\
         [[service]]\nname = \"rr\"\nport = 7000\nprotocols = [\"udp\"]\n[[service.instance]]\nvip = \"{VIP1_V4}\"\nport = 8007\n\
         [[service]]\nname = \"bulk\"\nport = 80\n[[service.instance]]\nvip = \"{VIP2_V4}\"\nport = 8082\n\n{classes}"
    )
}

/// The router topology with havipd running `body` and both services' instances.
pub fn start(body: &str) -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::new();
    t.write_config(body);
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    udp_echo_instance(&t.srv, VIP1_V4, 8007, stop.clone());
    bulk_instance(&t.srv, 8082, stop.clone());
    (t, stop)
}

/// Classes for the egress tests: `latency` served first, `bulk` last, both borrowing up to
/// `nic_rate`, which is below the path's bottleneck so queues build in havip's classes.
pub fn egress_classes(nic_rate: &str) -> String {
    format!(
        "[class.latency]\nrate = \"5mbit\"\nceil = \"{nic_rate}\"\npriority = 0\n\
         [class.bulk]\nrate = \"10mbit\"\nceil = \"{nic_rate}\"\npriority = 7\n"
    )
}

/// p99 round trips of the latency service, idle and under the bulk flow.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub idle_p99_ms: f64,
    pub loaded_p99_ms: f64,
    pub loaded_p50_ms: f64,
    /// Bytes the bulk flow moved meanwhile, per second.
    pub bulk_mbit_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Isolation {
    /// No classes, no shaping, segmentation offload as the kernel has it.
    pub without_classes: Latency,
    /// Shaped just below the bottleneck with segmentation as `with_classes` has it, both
    /// services in one class: what shaping alone does, without prioritisation.
    pub shaped_one_class: Latency,
    /// Shaped the same, each service in its own class (latency first).
    pub with_classes: Latency,
    /// True if the reload that added the classes kept the programs attached.
    pub programs_kept: bool,
    /// The bulk VIP's egress bytes counted in its class.
    pub bulk_class_tx_bytes: u64,
}

fn measure(t: &Topology) -> Latency {
    let idle = udp_round_trips(&t.cli, VIP1_V4, 7000, 100, Duration::from_millis(5), None);
    let stop = Arc::new(AtomicBool::new(false));
    let dl = download(&t.cli, VIP2_V4, 80, stop.clone(), None);
    std::thread::sleep(Duration::from_millis(1000)); // let the bulk flow fill the queue
    let started = std::time::Instant::now();
    let loaded = udp_round_trips(&t.cli, VIP1_V4, 7000, 200, Duration::from_millis(10), None);
    let secs = started.elapsed().as_secs_f64() + 1.0;
    stop.store(true, Ordering::Relaxed);
    let bytes = dl.join().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Latency {
        idle_p99_ms: ms(quantile(&idle, 0.99)),
        loaded_p99_ms: ms(quantile(&loaded, 0.99)),
        loaded_p50_ms: ms(quantile(&loaded, 0.5)),
        bulk_mbit_s: bytes as f64 * 8.0 / secs / 1e6,
    }
}

/// Runs the scenario (about 30 s).
pub fn run() -> Isolation {
    let (t, stop) = start(&two_services("", "", ""));
    // The bottleneck: the router's link to the client, 40 Mbit/s with up to 150 ms of
    // queue, as a real uplink with a deep buffer.
    t.rtr.exec(&["tc", "qdisc", "add", "dev", "c0", "root", "tbf", "rate", "40mbit", "burst", "16kb", "latency", "150ms"]).unwrap();
    // Reno fills a queue within milliseconds at this RTT; CUBIC's HyStart would leave it
    // half-empty for seconds, hiding the interference to be shown.
    t.srv.exec(&["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"]).unwrap();
    let without_classes = measure(&t);

    // TCP hands the qdisc 64 KiB GSO packets, which leave a shaper as one burst (13 ms at
    // 40 Mbit/s) and queue at the bottleneck: shape wire-sized packets (see the README).
    t.srv.ip(&["link", "set", "dev", "eth0", "gso_max_segs", "1"]).unwrap();
    let links = t.links();
    let reload = |body: String| {
        t.write_config_raw(&format!("[[nic]]\nname = \"eth0\"\negress_rate = \"36mbit\"\n{body}"));
        let out = t.havip(&["reload"]);
        assert!(out.status.success(), "reload failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The same shaping and segmentation, one class for both: the baseline that separates
    // what prioritisation does from what shaping does.
    reload(two_services("class = \"all\"", "class = \"all\"", "[class.all]\nrate = \"36mbit\"\nceil = \"36mbit\"\npriority = 0\n"));
    let shaped_one_class = measure(&t);
    reload(two_services("class = \"latency\"", "class = \"bulk\"", &egress_classes("36mbit")));
    let programs_kept = t.links() == links;
    let with_classes = measure(&t);
    let v = t.vip_stats(VIP2_V4);
    let bulk_class_tx_bytes = v["classes"][0]["tx_bytes"].as_u64().unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    Isolation { without_classes, shaped_one_class, with_classes, programs_kept, bulk_class_tx_bytes }
}
