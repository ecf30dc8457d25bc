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
    isolation::{egress_classes, start, two_services},
    load::{download, rx_bytes, udp_round_trips},
    topology::{Topology, VIP1_V4, VIP2_V4},
};



fn class_stats(t: &Topology, class: &str) -> serde_json::Value {
    let s = t.stats();
    s["classes"].as_array().unwrap().iter().find(|c| c["class"] == class).unwrap_or_else(|| panic!("no class {class}: {s}")).clone()
}

fn per_cpu(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
}

#[test]
fn a_bulk_flow_adds_no_latency_to_the_latency_class_and_does_without_classes() {
    let r = havip_tests::isolation::run();
    let (w, c) = (r.without_classes, r.with_classes);
    eprintln!("latency p99 without classes: idle {:.2} ms, under bulk {:.2} ms", w.idle_p99_ms, w.loaded_p99_ms);
    eprintln!("latency p99 with classes:    idle {:.2} ms, under bulk {:.2} ms", c.idle_p99_ms, c.loaded_p99_ms);
    assert!(w.bulk_mbit_s > 10.0 && r.shaped_one_class.bulk_mbit_s > 10.0 && c.bulk_mbit_s > 10.0, "the bulk flow did not run: {r:?}");
    // Without classes the answers queue behind the bulk flow...
    assert!(w.loaded_p99_ms > w.idle_p99_ms + 20.0, "no interference to demonstrate: {w:?}");
    // ...with them (applied by a reload that kept the programs) they do not.
    assert!(r.programs_kept, "classes were applied by detaching the programs");
    assert!(c.loaded_p99_ms <= 2.0 * c.idle_p99_ms + 3.0, "the latency class still suffers: {r:?}");
    assert!(r.bulk_class_tx_bytes > 1_000_000, "bulk egress not counted in its class: {r:?}");
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
    let cpus = havip_user::config::classes::online_cpus();
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
    let maps = havip_user::kernel::dataplane::Maps::open(&havip_user::kernel::pins::PinLayout::new(&t.pin_root)).unwrap();
    let id = t.vip_stats(VIP1_V4)["id"].as_u64().unwrap() as u32;
    let rx_per_cpu: Vec<u64> = maps.vip_counters_per_cpu(id).unwrap().iter().map(|c| c.rx.packets).collect();
    assert!(rx_per_cpu[1] >= 200, "the requests did not arrive on CPU 1: {rx_per_cpu:?}");
    let v = t.vip_stats(VIP1_V4);
    let c = &v["classes"].as_array().unwrap()[0];
    assert_eq!((c["class"].as_str(), v["class"].as_str()), (Some("latency"), Some("latency")));
    assert!(c["rx_queued"].as_u64().unwrap() >= 200, "{v}");
    stop.store(true, Ordering::Relaxed);
}



#[test]
fn a_class_limited_to_a_rate_delivers_that_rate() {
    let classes = "[class.bulk]\nrate = \"20mbit\"\n";
    let (t, stop) = start(&two_services("", "class = \"bulk\"", classes));
    let dl_stop = Arc::new(AtomicBool::new(false));
    let dl = download(&t.cli, VIP2_V4, 80, dl_stop.clone(), None);
    std::thread::sleep(Duration::from_millis(700));
    let (b0, t0) = (rx_bytes(&t.cli, "eth0"), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (b1, t1) = (rx_bytes(&t.cli, "eth0"), Instant::now());
    dl_stop.store(true, Ordering::Relaxed);
    dl.join().unwrap();
    // Link-layer bytes, as HTB counts them.
    let mbit = (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64() / 1e6;
    eprintln!("bulk class at 20mbit delivered {mbit:.2} Mbit/s");
    assert!((18.0..=22.0).contains(&mbit), "bulk class delivered {mbit:.2} Mbit/s, configured 20");
    stop.store(true, Ordering::Relaxed);
}

/// Does vip:80 answer a TCP echo from the client within a second?
fn reachable(t: &Topology, vip: &str) -> bool {
    let addr: std::net::SocketAddr = format!("{vip}:80").parse().unwrap();
    havip_tests::topology::spawn_in(&t.cli, move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    })
    .join()
    .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn on_nic_failure_merge_shares_a_surviving_nic_and_isolate_waits_for_its_own() {
    // latency lives on a0 and isolates; bulk lives on b0 and merges.
    const LAT: &str = "198.18.20.10";
    const BULK: &str = "198.18.20.11";
    let mut t = Topology::switched();
    t.write_config_raw(&format!(
        "[failover]\nannounce_interval_ms = 50\nfailback_hold_down_ms = 500\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n\
         [class.latency]\non_nic_failure = \"isolate\"\n[class.bulk]\non_nic_failure = \"merge\"\n\
         [[vip]]\naddress = \"{LAT}\"\nnics = [\"a0\", \"b0\"]\nclass = \"latency\"\n\
         [[vip]]\naddress = \"{BULK}\"\nnics = [\"b0\", \"a0\"]\nclass = \"bulk\"\n\
         [[service]]\nname = \"echo\"\nport = 80\n[[service.instance]]\nvip = \"{LAT}\"\nport = 8081\n[[service.instance]]\nvip = \"{BULK}\"\nport = 8081\n"
    ));
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    havip_tests::traffic::echo_instance(&t.srv, 8081, b"", stop.clone());
    let nic = |vip: &str| t.vip_stats(vip)["nic"].as_str().unwrap().to_string();
    assert_eq!((nic(LAT), nic(BULK)), ("a0".into(), "b0".into()));
    assert!(reachable(&t, LAT) && reachable(&t, BULK));

    // b0 fails: bulk merges onto a0, next to latency, and stays reachable.
    t.rtr.ip(&["link", "set", "sb", "down"]).unwrap();
    wait_for("bulk to fail over to a0", Duration::from_secs(3), || nic(BULK) == "a0");
    assert!(reachable(&t, BULK), "the merged class is unreachable");
    assert!(reachable(&t, LAT));
    // b0 returns: bulk goes home.
    t.rtr.ip(&["link", "set", "sb", "up"]).unwrap();
    wait_for("bulk to return to b0", Duration::from_secs(5), || nic(BULK) == "b0");
    assert!(reachable(&t, BULK));

    // a0 fails: latency does not move onto bulk's b0; it is unreachable until a0 returns.
    t.rtr.ip(&["link", "set", "sa", "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(nic(LAT), "a0", "the isolated class moved onto another class's NIC");
    assert!(!reachable(&t, LAT), "the isolated class is reachable through another class's NIC");
    assert_eq!(nic(BULK), "b0");
    assert!(reachable(&t, BULK), "the other class was disturbed");
    t.rtr.ip(&["link", "set", "sa", "up"]).unwrap();
    wait_for("latency to be reachable again on a0", Duration::from_secs(5), || reachable(&t, LAT));
    assert_eq!(nic(LAT), "a0");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_root_qdisc_havip_did_not_create_is_kept_unless_replacing_is_asked_for() {
    let mut t = Topology::new();
    t.srv.exec(&["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "1gbit", "burst", "64kb", "latency", "50ms"]).unwrap();
    let body = two_services("class = \"latency\"", "", &egress_classes("1gbit"));
    t.write_config(&body);
    let out = t.havipd_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "havipd took over a foreign root qdisc");
    for needle in ["nic[0]", "tbf", "replace_qdisc", "nothing was applied"] {
        assert!(err.contains(needle), "the error does not say `{needle}`:\n{err}");
    }
    assert!(!t.ingress_attached(), "programs were attached");
    let qdisc = t.srv.exec(&["tc", "qdisc", "show", "dev", "eth0", "root"]).unwrap();
    assert!(qdisc.contains("tbf 1:"), "the foreign qdisc was touched: {qdisc}");

    // Asked to, havipd replaces it; `havip down` leaves the kernel's default behind.
    t.write_config_raw(&format!("[[nic]]\nname = \"eth0\"\nreplace_qdisc = true\n{body}"));
    t.start_daemon();
    let qdisc = t.srv.exec(&["tc", "qdisc", "show", "dev", "eth0", "root"]).unwrap();
    assert!(qdisc.contains("htb 4856:"), "havip's HTB is not in place: {qdisc}");

    // A reload with a bad class is refused whole: the classes stay as they were.
    let before = t.srv.exec(&["tc", "class", "show", "dev", "eth0"]).unwrap();
    let classes_before = t.stats()["classes"].clone();
    t.write_config_raw(&format!("[[nic]]\nname = \"eth0\"\nreplace_qdisc = true\n{}", body.replace("priority = 7", "priority = 9")));
    let out = t.havip(&["reload"]);
    assert!(!out.status.success(), "a bad class was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("class.bulk.priority"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.srv.exec(&["tc", "class", "show", "dev", "eth0"]).unwrap(), before);
    assert_eq!(t.stats()["classes"], classes_before);

    let out = t.havip(&["down"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let qdisc = t.srv.exec(&["tc", "qdisc", "show", "dev", "eth0", "root"]).unwrap();
    assert!(!qdisc.contains("htb"), "havip down left its HTB: {qdisc}");
}

#[test]
fn queue_full_drops_reported_by_the_kernel_are_counted() {
    // A one-frame queue behind a flood: the kernel drops most of each bulk enqueue.
    let classes = "[class.tiny]\ncpus = [1]\nqueue_size = 1\n";
    let (t, stop) = start(&two_services("class = \"tiny\"", "", classes));
    havip_tests::topology::spawn_in(&t.cli, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(format!("{VIP1_V4}:7000")).unwrap();
        for _ in 0..50_000 {
            let _ = s.send(&[0u8; 16]);
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = class_stats(&t, "tiny");
    let drops = c["queue_drops"].as_u64().unwrap();
    let processed: u64 = per_cpu(&c["processed_per_cpu"]).iter().sum();
    let queued = t.vip_stats(VIP1_V4)["classes"][0]["rx_queued"].as_u64().unwrap();
    eprintln!("queued {queued}, processed {processed}, dropped {drops}");
    assert!(drops > 0, "no queue-full drops counted: {c}");
    // Every frame sent to the queue was either processed or dropped by the kernel.
    assert_eq!(processed + drops, queued, "{c}");
    stop.store(true, Ordering::Relaxed);
}
