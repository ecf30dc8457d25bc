//! The Prometheus endpoint against a real node: traffic of known size through a VIP, then
//! `/metrics` scraped over HTTP inside the server namespace (where havipd listens) and
//! parsed with a Prometheus text-format parser. Also: the listen address is configurable
//! and checked, shell completions, and `havipd --check-config FILE`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use havip_tests::{
    topology::{pattern, spawn_in, Topology, VIP1_V4, VIP2_V4},
    traffic::echo_instance,
};
use havip_user::node::state::State;
use prometheus_parse::{LineInfo, SampleType, Scrape, Value};

const DATAGRAMS: u64 = 40;
const PAYLOAD: usize = 300;
/// Ethernet + IPv4 + UDP headers: the programs count whole frames.
const UDP_FRAME: u64 = (14 + 20 + 8 + PAYLOAD) as u64;
const TCP_BYTES: usize = 64 * 1024;

/// UDP on VIP1 (exact counts), TCP on VIP2.
fn config(extra: &str) -> String {
    format!(
        "[[vip]]\naddress = \"{VIP1_V4}\"\n[[vip]]\naddress = \"{VIP2_V4}\"\n\
         [[service]]\nname = \"dgram\"\nport = 80\nprotocols = [\"udp\"]\n[[service.instance]]\nvip = \"{VIP1_V4}\"\nport = 8081\n\
         [[service]]\nname = \"stream\"\nport = 80\n[[service.instance]]\nvip = \"{VIP2_V4}\"\nport = 8082\n{extra}"
    )
}

/// `GET path` from inside the server namespace; (status line + headers, body).
fn http_get(t: &Topology, addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_string();
    spawn_in(&t.srv, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // HTTP/1.0: the answer ends with the connection, never chunked.
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((head.to_string(), body.to_string()))
    })
    .join()
    .unwrap()
}

/// A scrape, parsed, with the declared type of each metric family.
struct Metrics {
    scrape: Scrape,
    types: BTreeMap<String, SampleType>,
    text: String,
}

impl Metrics {
    fn scrape(t: &Topology, addr: &str) -> Self {
        let (head, body) = http_get(t, addr, "/metrics").unwrap_or_else(|e| panic!("scraping {addr}: {e}\n{}", t.daemon_log()));
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        let ctype = head.lines().find(|l| l.to_ascii_lowercase().starts_with("content-type:")).unwrap_or_default().to_ascii_lowercase();
        assert!(ctype.contains("application/openmetrics-text") && ctype.contains("version=1.0.0"), "{head}");
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("a Prometheus text exposition");
        let mut types = BTreeMap::new();
        for l in body.lines() {
            if let LineInfo::Type { metric_name, sample_type, .. } = LineInfo::parse(l) {
                types.insert(metric_name, sample_type);
            }
        }
        assert!(body.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF");
        Self { scrape, types, text: body }
    }

    /// The value of the one sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => panic!("{name}: not a plain value"),
            })
            .collect();
        assert!(hits.len() <= 1, "{name} {labels:?} matches {} samples", hits.len());
        hits.first().copied()
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in the scrape:\n{}", self.text))
    }

    /// Prometheus naming: every name starts with havip_, counters' samples (and only
    /// theirs) end with _total, and every sample belongs to a declared family.
    fn check_conventions(&self) {
        assert!(self.scrape.samples.len() > 50, "too few samples:\n{}", self.text);
        for (family, ty) in &self.types {
            assert!(family.starts_with("havip_"), "{family}");
            assert!(matches!(ty, SampleType::Counter | SampleType::Gauge), "{family}: {ty:?}");
        }
        for s in &self.scrape.samples {
            assert!(s.metric.starts_with("havip_"), "{}", s.metric);
            let counter = s.metric.strip_suffix("_total").is_some_and(|f| self.types.get(f) == Some(&SampleType::Counter));
            let gauge = self.types.get(&s.metric) == Some(&SampleType::Gauge);
            assert!(counter || gauge, "{} is neither a counter's _total sample nor a gauge", s.metric);
            assert!(!(gauge && s.metric.ends_with("_total")), "gauge {} ends with _total", s.metric);
        }
    }
}

/// One VIP's counters from `havip stats --json`: what the programs counted.
fn stats_counter(t: &Topology, vip: &str, dir: &str, field: &str) -> f64 {
    t.vip_stats(vip)[dir][field].as_u64().unwrap_or_else(|| panic!("{vip} {dir}.{field} missing")) as f64
}

/// UDP instance on VIP1:8081 echoing each datagram as it came.
fn udp_echo(t: &Topology, stop: Arc<AtomicBool>) {
    let addr = SocketAddr::new(VIP1_V4.parse().unwrap(), 8081);
    spawn_in(&t.srv, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..n], peer).unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn the_scraped_counters_match_the_traffic_sent() {
    let mut t = Topology::new();
    t.write_config(&config(""));
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    udp_echo(&t, stop.clone());
    echo_instance(&t.srv, 8082, b"B", stop.clone());

    // Before any traffic: the node is up, both VIPs bound to eth0, nothing counted yet.
    let m = Metrics::scrape(&t, "127.0.0.1:9469");
    m.check_conventions();
    for (name, want) in [("havip_controller_up", 1.0), ("havip_dataplane_up", 1.0), ("havip_config_last_apply_success", 1.0)] {
        assert_eq!(m.must(name, &[]), want, "{name}");
    }
    assert_eq!(m.must("havip_vip_rx_packets_total", &[("vip", VIP1_V4)]), 0.0);
    for vip in [VIP1_V4, VIP2_V4] {
        assert_eq!(m.must("havip_vip_bound", &[("vip", vip), ("nic", "eth0")]), 1.0, "{vip}");
    }
    assert_eq!(m.must("havip_rebinds_total", &[("reason", "initial")]), 2.0, "one initial binding per VIP");
    assert_eq!(m.must("havip_rebinds_total", &[("reason", "link_down")]), 0.0, "every reason is there from the start");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = m.must("havip_controller_start_time_seconds", &[]);
    assert!(now - started >= 0.0 && now - started < 60.0, "start time {started}, now {now}");

    // UDP: exactly DATAGRAMS datagrams of PAYLOAD bytes each way through VIP1.
    let dst = SocketAddr::new(VIP1_V4.parse().unwrap(), 80);
    spawn_in(&t.cli, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..DATAGRAMS {
            let data = pattern(PAYLOAD, i as u32);
            s.send_to(&data, dst).unwrap();
            let (n, from) = s.recv_from(&mut buf).expect("UDP reply");
            assert_eq!((from, &buf[..n]), (dst, &data[..]));
        }
    })
    .join()
    .expect("UDP client failed");

    // TCP: 64 KiB to VIP2 and back.
    let dst = SocketAddr::new(VIP2_V4.parse().unwrap(), 80);
    spawn_in(&t.cli, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let data = pattern(TCP_BYTES, 9);
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), TCP_BYTES + 1, "greeting and echo");
    })
    .join()
    .expect("TCP client failed");
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));

    let m = Metrics::scrape(&t, "127.0.0.1:9469");
    m.check_conventions();
    let v1 = [("vip", VIP1_V4)];
    // Nothing but the test's datagrams reaches VIP1: the counts are exact.
    assert_eq!(m.must("havip_vip_rx_packets_total", &v1), DATAGRAMS as f64);
    assert_eq!(m.must("havip_vip_rx_bytes_total", &v1), (DATAGRAMS * UDP_FRAME) as f64);
    assert_eq!(m.must("havip_vip_tx_packets_total", &v1), DATAGRAMS as f64);
    assert_eq!(m.must("havip_vip_tx_bytes_total", &v1), (DATAGRAMS * UDP_FRAME) as f64);
    for dir in ["rx", "tx"] {
        assert_eq!(m.must("havip_vip_remapped_packets_total", &[("vip", VIP1_V4), ("direction", dir)]), DATAGRAMS as f64, "{dir}");
        assert_eq!(m.must("havip_vip_protocol_packets_total", &[("vip", VIP1_V4), ("direction", dir), ("protocol", "udp")]), DATAGRAMS as f64);
        assert_eq!(m.must("havip_vip_dropped_packets_total", &[("vip", VIP1_V4), ("direction", dir)]), 0.0);
    }
    // TCP: the payload each way plus headers and ACKs, and what the programs counted.
    let v2 = [("vip", VIP2_V4)];
    // The echo goes back in whatever pieces the server happened to read, each its own
    // segment with its own headers: on a busy machine that is many small ones (seen: 1.55x
    // in a clean-checkout run). The client's write goes out in large segments.
    for (name, dir, most) in [("havip_vip_rx_bytes_total", "rx", 1.3), ("havip_vip_tx_bytes_total", "tx", 2.5)] {
        let b = m.must(name, &v2);
        assert!(b >= TCP_BYTES as f64 && b < TCP_BYTES as f64 * most, "{name} {b} for {TCP_BYTES} bytes sent");
        assert_eq!(b, stats_counter(&t, VIP2_V4, dir, "bytes"), "{name}: not what the programs counted");
    }
    for (name, dir) in [("havip_vip_rx_packets_total", "rx"), ("havip_vip_tx_packets_total", "tx")] {
        for (vip, labels) in [(VIP1_V4, &v1), (VIP2_V4, &v2)] {
            assert_eq!(m.must(name, labels), stats_counter(&t, vip, dir, "packets"), "{name} {vip}");
        }
    }
    // The NIC carried both VIPs' traffic; the outcomes saw every remapped packet.
    let rx_all = m.must("havip_vip_rx_packets_total", &v1) + m.must("havip_vip_rx_packets_total", &v2);
    assert_eq!(m.must("havip_nic_rx_packets_total", &[("nic", "eth0")]), rx_all);
    assert!(m.must("havip_packets_total", &[("direction", "ingress"), ("outcome", "vip_remapped")]) >= rx_all);
    assert!(m.must("havip_vip_bound_duration_seconds", &v1) > 0.0);
    // No move happened: still the two initial bindings.
    assert_eq!(m.must("havip_rebinds_total", &[("reason", "initial")]), 2.0);

    // A refused reload shows in the controller's health; the counters stay. (SIGHUP
    // directly: `havip reload` refuses a bad file before havipd sees it.)
    let generation = m.must("havip_config_generation", &[]);
    t.write_config_raw("[[vip]]\naddress = \"not an address\"\n");
    let state = State::load(&t.run_dir).unwrap().unwrap();
    assert_eq!(state.generation as f64, generation);
    assert_eq!(unsafe { libc::kill(state.pid.unwrap() as i32, libc::SIGHUP) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while State::load(&t.run_dir).unwrap().unwrap().generation == state.generation {
        assert!(std::time::Instant::now() < deadline, "havipd did not answer the SIGHUP:\n{}", t.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = Metrics::scrape(&t, "127.0.0.1:9469");
    assert_eq!(m.must("havip_config_last_apply_success", &[]), 0.0);
    assert_eq!(m.must("havip_config_applies_total", &[("result", "failure")]), 1.0);
    assert_eq!(m.must("havip_config_generation", &[]), generation + 1.0);
    assert_eq!(m.must("havip_vip_rx_packets_total", &v1), DATAGRAMS as f64);
}

#[test]
fn the_listen_address_is_configurable_and_checked() {
    let mut t = Topology::new();
    // Another address (IPv6 loopback, another port): served there, not on the default.
    t.write_config(&config("[metrics]\nlisten = \"[::1]:19469\"\n"));
    t.start_daemon();
    let m = Metrics::scrape(&t, "[::1]:19469");
    assert_eq!(m.must("havip_controller_up", &[]), 1.0);
    assert!(http_get(&t, "127.0.0.1:9469", "/metrics").is_err(), "the default address answers too");
    t.stop_daemon(libc::SIGTERM);

    // Invalid addresses are refused before anything is applied, naming the field.
    for bad in ["localhost:9469", "127.0.0.1", "127.0.0.1:0", ""] {
        t.write_config(&config(&format!("[metrics]\nlisten = \"{bad}\"\n")));
        for args in [vec!["--check-config", t.config_path.to_str().unwrap()], vec!["--config", t.config_path.to_str().unwrap(), "--netns", &t.srv.name]] {
            let out = Command::new(havip_tests::bin("havipd")).args(&args).args(["--pin-path", t.pin_root.to_str().unwrap(), "--run-dir", t.run_dir.to_str().unwrap()]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{bad:?} accepted by havipd {args:?}");
            assert!(err.contains("metrics.listen") && err.contains("nothing was applied"), "{bad:?}: {err}");
        }
    }

    // An address already taken in the node's namespace: a clear refusal, no havipd left.
    let taken = spawn_in(&t.srv, || std::net::TcpListener::bind("127.0.0.1:19470").unwrap()).join().unwrap();
    t.write_config(&config("[metrics]\nlisten = \"127.0.0.1:19470\"\n"));
    let out = Command::new(havip_tests::bin("havipd"))
        .args(["--netns", &t.srv.name, "--config", t.config_path.to_str().unwrap()])
        .args(["--pin-path", t.pin_root.to_str().unwrap(), "--run-dir", t.run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "havipd started on a taken address");
    assert!(err.contains("metrics.listen") && err.contains("127.0.0.1:19470") && err.contains("in use"), "{err}");
    drop(taken);

    // Disabled: nothing listens.
    t.write_config(&config("[metrics]\nenabled = false\n"));
    t.start_daemon();
    assert!(http_get(&t, "127.0.0.1:9469", "/metrics").is_err(), "metrics served while disabled");
    assert!(t.daemon_log().contains("metrics disabled"), "{}", t.daemon_log());
}

#[test]
fn completions_and_check_config_forms() {
    let run = |bin: &str, args: &[&str]| Command::new(havip_tests::bin(bin)).args(args).output().unwrap();
    let out = run("havip", &["completions", "bash"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8_lossy(&out.stdout);
    for word in ["stats", "reload", "bind", "explain", "down", "check-config", "completions", "--pin-path"] {
        assert!(script.contains(word), "havip's bash completion lacks {word}");
    }
    for shell in ["zsh", "fish"] {
        let out = run("havip", &["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 500, "{shell}");
    }
    let out = run("havipd", &["--completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("--check-config") && script.contains("--netns"), "{script}");

    // `--check-config FILE` and `--check-config --config FILE` give the same verdict.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/example.toml");
    for args in [vec!["--check-config", example], vec!["--check-config", "--config", example], vec!["--config", example, "--check-config"]] {
        let out = run("havipd", &args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid") && String::from_utf8_lossy(&out.stdout).contains("metrics on 127.0.0.1:9469"), "{args:?}");
    }
    let out = run("havipd", &["--check-config"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--check-config"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run("havipd", &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--config"), "{}", String::from_utf8_lossy(&out.stderr));
}
