//! TCP throughput through a remapped VIP on veth, with and without havip, side by side in
//! one run (`cargo xtask bench`, section `veth`): what each ingress hook costs on the NIC
//! kind containers and pods reach the network through.
//!
//! ```text
//!  client eth0 198.18.60.100 ── c0 ┐ br0 ┌ s0 ── server eth0 198.18.60.1, VIP 198.18.160.1 on lo
//! ```
//!
//! Offloads stay as veth has them (segmentation and checksum offload on), as in a
//! container. The client routes the VIP via the server's address, so no case depends on
//! ARP for the VIP. The baseline is the same path with no program: the VIP is a plain
//! address on the server's loopback and the client connects straight to the instance port.
//! Every havip case connects to the designated port and must be remapped: the case checks
//! the hook the kernel shows on eth0 and that the VIP's ingress counters carried at least
//! every byte the instance received, all of it remapped.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use havip_user::kernel::netns::veth_pair;
use serde::Serialize;

use crate::topology::{ingress_hook_on, spawn_in, Topology};

const VIP: &str = "198.18.160.1";
const SERVER: &str = "198.18.60.1";
const DESIGNATED: u16 = 80;
const INSTANCE: u16 = 8081;

/// One way of running the server's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Case {
    /// No program: the baseline.
    NoHavip,
    /// havipd with `xdp_mode = "auto"` (on veth: the TC hook).
    Auto,
    Generic,
    Native,
}

impl Case {
    pub const ALL: [Case; 4] = [Case::NoHavip, Case::Auto, Case::Generic, Case::Native];

    pub fn name(self) -> &'static str {
        match self {
            Case::NoHavip => "no havip",
            Case::Auto => "havip auto",
            Case::Generic => "havip xdp-generic",
            Case::Native => "havip xdp-native",
        }
    }

    fn mode(self) -> Option<&'static str> {
        match self {
            Case::NoHavip => None,
            Case::Auto => Some("auto"),
            Case::Generic => Some("generic"),
            Case::Native => Some("native"),
        }
    }

    /// The hook the kernel must show on the server's eth0.
    fn hook(self) -> Option<&'static str> {
        match self {
            Case::NoHavip => None,
            Case::Auto => Some("tc"),
            Case::Generic => Some("xdp-generic"),
            Case::Native => Some("xdp-native"),
        }
    }
}

/// One case's throughput per round, for 1 and for 8 streams.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: Case,
    pub hook: Option<&'static str>,
    pub one_stream_gbit_s: Vec<f64>,
    pub eight_streams_gbit_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VethSpeed {
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub cases: Vec<CaseResult>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

impl VethSpeed {
    /// Median over rounds of a case's throughput divided by the baseline's of the same
    /// round (the rounds alternate the cases, so slow spells of the machine hit both).
    pub fn ratio(&self, case: Case, streams: usize) -> f64 {
        let pick = |c: &CaseResult| if streams == 1 { c.one_stream_gbit_s.clone() } else { c.eight_streams_gbit_s.clone() };
        let base = pick(self.cases.iter().find(|c| c.case == Case::NoHavip).unwrap());
        let this = pick(self.cases.iter().find(|c| c.case == case).unwrap());
        median(&this.iter().zip(&base).map(|(t, b)| t / b).collect::<Vec<_>>())
    }

    pub fn median_gbit_s(&self, case: Case, streams: usize) -> f64 {
        let c = self.cases.iter().find(|c| c.case == case).unwrap();
        median(if streams == 1 { &c.one_stream_gbit_s } else { &c.eight_streams_gbit_s })
    }
}

/// The namespaces and links of the diagram above, no havipd yet.
fn lab() -> Topology {
    let t = Topology::bare();
    veth_pair(&t.srv, "eth0", &t.rtr, "s0").unwrap();
    veth_pair(&t.cli, "eth0", &t.rtr, "c0").unwrap();
    let cmds: [(&havip_user::kernel::netns::Netns, &[&str]); 7] = [
        (&t.rtr, &["link", "add", "br0", "type", "bridge"]),
        (&t.rtr, &["link", "set", "br0", "up"]),
        (&t.rtr, &["link", "set", "s0", "master", "br0"]),
        (&t.rtr, &["link", "set", "c0", "master", "br0"]),
        (&t.srv, &["addr", "add", "198.18.60.1/24", "dev", "eth0"]),
        (&t.cli, &["addr", "add", "198.18.60.100/24", "dev", "eth0"]),
        (&t.cli, &["route", "add", "198.18.160.1/32", "via", SERVER]),
    ];
    for (ns, args) in cmds {
        ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
    }
    t
}

/// The instance: counts every byte its connections receive.
fn sink(t: &Topology, received: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let listener = crate::topology::spawn_in(&t.srv, move || TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], INSTANCE))).unwrap()).join().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let (received, stop) = (received.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    received.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

/// `streams` connections to VIP:`port` writing as fast as they can for a warm-up second
/// and `secs` more; returns the instance's receive rate over the `secs` in Gbit/s and the
/// bytes it received in all.
fn blast(t: &Topology, port: u16, streams: usize, secs: f64, received: &Arc<AtomicU64>) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let addr: SocketAddr = format!("{VIP}:{port}").parse().unwrap();
    let start = received.load(Ordering::Relaxed);
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let stop = stop.clone();
            spawn_in(&t.cli, move || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
                let chunk = vec![0x5au8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) && s.write_all(&chunk).is_ok() {}
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (t0, b0) = (Instant::now(), received.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (dt, db) = (t0.elapsed().as_secs_f64(), received.load(Ordering::Relaxed) - b0);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("a writer failed");
    }
    // Let the last bytes in flight arrive before the totals are compared.
    std::thread::sleep(Duration::from_millis(300));
    (db as f64 * 8.0 / dt / 1e9, received.load(Ordering::Relaxed) - start)
}

fn counter(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("{} missing in {v}", path.join(".")))
}

/// One run of `case` with 1 and with 8 streams: (Gbit/s, Gbit/s).
fn run_case(case: Case, secs: f64) -> (f64, f64) {
    let mut t = lab();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    sink(&t, received.clone(), stop.clone());
    let port = match case.mode() {
        None => {
            t.srv.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]).unwrap();
            INSTANCE
        }
        Some(mode) => {
            t.write_config_raw(&format!(
                "[node]\nvip_interface = \"lo\"\nxdp_mode = \"{mode}\"\n\n[[nic]]\nname = \"eth0\"\n\n[[vip]]\naddress = \"{VIP}\"\n\n\
                 [[service]]\nname = \"sink\"\nport = {DESIGNATED}\n[[service.instance]]\nvip = \"{VIP}\"\nport = {INSTANCE}\n"
            ));
            t.start_daemon();
            DESIGNATED
        }
    };
    assert_eq!(ingress_hook_on(&t.srv, "eth0"), case.hook(), "{}: the server's eth0 is not on the hook the case names", case.name());
    let (one, bytes_one) = blast(&t, port, 1, secs, &received);
    let (eight, bytes_eight) = blast(&t, port, 8, secs, &received);
    if case != Case::NoHavip {
        let v = t.vip_stats(VIP);
        let (rx_bytes, tcp, remapped) = (counter(&v, &["rx", "bytes"]), counter(&v, &["rx", "tcp"]), counter(&v, &["rx", "remapped"]));
        assert!(
            rx_bytes >= bytes_one + bytes_eight,
            "{}: havip counted {rx_bytes} bytes in, the instance received {}: traffic bypassed it",
            case.name(),
            bytes_one + bytes_eight
        );
        assert_eq!(tcp, remapped, "{}: not every packet to the VIP was remapped: {v}", case.name());
        let s = t.stats();
        assert_eq!(s["nics"][0]["hook"], case.hook().unwrap(), "{}: havip stats names another hook", case.name());
        assert_eq!(counter(&s, &["outcomes", "ingress", "malformed"]), 0, "{}: malformed packets: {}", case.name(), s["outcomes"]);
    }
    stop.store(true, Ordering::Relaxed);
    (one, eight)
}

/// `rounds` rounds, each running every case once (1 stream, then 8), `secs` per run.
pub fn run(rounds: usize, secs: f64) -> VethSpeed {
    let mut cases: Vec<CaseResult> =
        Case::ALL.iter().map(|&case| CaseResult { case, hook: case.hook(), one_stream_gbit_s: Vec::new(), eight_streams_gbit_s: Vec::new() }).collect();
    for round in 0..rounds {
        for c in &mut cases {
            eprint!("\r  round {}/{rounds}: {:<20}", round + 1, c.case.name());
            let (one, eight) = run_case(c.case, secs);
            c.one_stream_gbit_s.push(one);
            c.eight_streams_gbit_s.push(eight);
        }
    }
    eprintln!();
    VethSpeed { rounds, seconds_per_run: secs, cases }
}
