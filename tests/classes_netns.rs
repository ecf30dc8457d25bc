//! Application classes with real traffic: each class's ingress is processed on its own
//! CPU, its egress is shaped by its own HTB class, a bulk flow does not add latency to a
//! latency-sensitive class, and on a NIC failure `merge` shares a surviving NIC while
//! `isolate` keeps the class off the others'.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use havip_tests::{
    load::{bulk_instance, download, quantile, rx_bytes, udp_echo_instance, udp_round_trips},
    topology::{Topology, VIP1_V4, VIP2_V4},
};

/// VIP1 answers UDP requests on :7000 (instance :8007); VIP2 serves bulk TCP on :80
/// (instance :8082). `classes` is appended (class sections), `vip1`/`vip2` go into the
/// VIP sections (e.g. `class = "latency"`).
fn two_services(vip1: &str, vip2: &str, classes: &str) -> String {
    format!(
        "[[vip]]\naddress = \"{VIP1_V4}\"\n{vip1}\n[[vip]]\naddress = \"{VIP2_V4}\"\n{vip2}\n\
         [[service]]\nname = \"rr\"\nport = 7000\nprotocols = [\"udp\"]\n[[service.instance]]\nvip = \"{VIP1_V4}\"\nport = 8007\n\
         [[service]]\nname = \"bulk\"\nport = 80\n[[service.instance]]\nvip = \"{VIP2_V4}\"\nport = 8082\n\n{classes}"
    )
}

fn start(body: &str) -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::new();
    t.write_config(body);
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    udp_echo_instance(&t.srv, 8007, stop.clone());
    bulk_instance(&t.srv, 8082, stop.clone());
    (t, stop)
}

fn class_stats(t: &Topology, class: &str) -> serde_json::Value {
    let s = t.stats();
    s["classes"].as_array().unwrap().iter().find(|c| c["class"] == class).unwrap_or_else(|| panic!("no class {class}: {s}")).clone()
}

fn per_cpu(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
}

/// Runs a download of VIP2's bulk service for `d`; returns the bytes received.
fn download_for(t: &Topology, d: Duration, cpu: Option<usize>) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let h = download(&t.cli, VIP2_V4, 80, stop.clone(), cpu);
    std::thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap()
}

#[test]
fn each_class_is_processed_on_its_own_cpu_whatever_cpu_received_it() {
    let cpus = havip_user::classes::online_cpus();
    assert!(cpus.contains(&0) && cpus.contains(&1), "this test needs CPUs 0 and 1");
    let classes = "[class.latency]\ncpus = [0]\n[class.bulk]\ncpus = [1]\n";
    let (t, stop) = start(&two_services("class = \"latency\"", "class = \"bulk\"", classes));

    // A veth delivers a packet on the CPU that sent it: the latency requests are sent, and
    // so received, on CPU 1.
    let rtts = udp_round_trips(&t.cli, VIP1_V4, 7000, 200, Duration::ZERO, Some(1));
    assert!(rtts.iter().all(|r| *r < Duration::from_secs(1)), "requests to the latency VIP were lost");
    let got = download_for(&t, Duration::from_millis(1500), Some(0));
    assert!(got > 100_000, "the bulk download moved only {got} bytes");

    let lat = class_stats(&t, "latency");
    let bulk = class_stats(&t, "bulk");
    let (l, b) = (per_cpu(&lat["processed_per_cpu"]), per_cpu(&bulk["processed_per_cpu"]));
    assert!(l[0] >= 200, "latency's requests were not processed on CPU 0: {lat}");
    assert_eq!(l[1], 0, "latency traffic was processed on CPU 1: {lat}");
    assert!(b[1] > 50, "bulk's ACKs were not processed on CPU 1: {bulk}");
    assert_eq!(b[0], 0, "bulk traffic was processed on CPU 0: {bulk}");

    // The XDP program saw the latency requests arrive on CPU 1 and queued them all.
    let maps = havip_user::dataplane::Maps::open(&havip_user::pins::PinLayout::new(&t.pin_root)).unwrap();
    let id = t.vip_stats(VIP1_V4)["id"].as_u64().unwrap() as u32;
    let rx_per_cpu: Vec<u64> = maps.vip_counters_per_cpu(id).unwrap().iter().map(|c| c.rx.packets).collect();
    assert!(rx_per_cpu[1] >= 200, "the requests did not arrive on CPU 1: {rx_per_cpu:?}");
    let v = t.vip_stats(VIP1_V4);
    let c = &v["classes"].as_array().unwrap()[0];
    assert_eq!((c["class"].as_str(), v["class"].as_str()), (Some("latency"), Some("latency")));
    assert!(c["rx_queued"].as_u64().unwrap() >= 200, "{v}");
    stop.store(true, Ordering::Relaxed);
}
