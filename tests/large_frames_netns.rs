//! Bulk TCP through a remapped VIP with the frames TCP really makes: generic XDP and the
//! TC ingress hook see packets up to 64 KiB (GSO packets forwarded whole, as GRO-merged
//! ones are, or frames of a 30 KiB MTU), and GSO packets up to 64 KiB leave through TC. 16 MiB each way, per
//! address family, on every path below (native XDP on veth refuses to attach with a peer
//! MTU over about 3.5 KiB: the programs are not loaded with `xdp.frags`, so the jumbo
//! paths are generic). Checksums are verified by the receiving stack (see `topology`).

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use havip_tests::{
    topology::{ingress_hook_on, pattern, spawn_in, Topology, VIP1_V4, VIP1_V6},
    traffic::echo_instance,
};

const MIB: usize = 1 << 20;
const BULK: usize = 16 * MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Generic XDP, MTU 1500, the router's NIC to the server with segmentation offload:
    /// the client's GSO packets (up to 64 KiB) cross the router and veth whole, as packets
    /// merged by GRO upstream do. (GRO on the server's own NIC is skipped while generic
    /// XDP is attached to it.) They arrive with partial checksums, which the server's
    /// stack trusts: the replies' checksums are still verified by the client.
    GenericGso,
    /// Generic XDP, MTU 30000 on every link, checksums computed in software by the router
    /// and verified by the server: real frames of 30 KiB, each checksum verified after the
    /// remap. (Not higher: with an MSS over 32 KiB, TCP's minimum of two segments per GSO
    /// packet makes packets over 64 KiB, whose zero IPv4 length havip passes as malformed;
    /// see BIG TCP in the README's limits.)
    GenericMtu30k,
    /// Generic XDP, MTU 9000 on every link.
    GenericJumbo,
    /// Native XDP on veth, MTU 1500: wire-sized frames (veth turns its peer's GSO off).
    Native,
    /// `auto` on veth, which picks the TC ingress hook, MTU 1500, GSO packets up to 64 KiB
    /// as in `GenericGso`: TC sees them as they are (each is many segments).
    TcGso,
    /// `auto`, TC, MTU 9000 on every link.
    TcJumbo,
}

impl Path {
    /// `[node] xdp_mode` for the path.
    fn mode(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::TcGso | Path::TcJumbo => "auto",
            _ => "generic",
        }
    }

    /// The hook the kernel must show the ingress program on.
    fn hook(self) -> &'static str {
        match self {
            Path::Native => "xdp-native",
            Path::TcGso | Path::TcJumbo => "tc",
            _ => "xdp-generic",
        }
    }

    fn mtu(self) -> Option<&'static str> {
        match self {
            Path::GenericMtu30k => Some("30000"),
            Path::GenericJumbo | Path::TcJumbo => Some("9000"),
            _ => None,
        }
    }
}

fn config(mode: &str) -> String {
    let mut s = format!("[node]\nvip_interface = \"lo\"\nxdp_mode = \"{mode}\"\n\n[[nic]]\nname = \"eth0\"\n\n");
    for v in [VIP1_V4, VIP1_V6] {
        s += &format!("[[vip]]\naddress = \"{v}\"\n");
    }
    s += "[[service]]\nname = \"echo\"\nport = 80\n";
    for v in [VIP1_V4, VIP1_V6] {
        s += &format!("[[service.instance]]\nvip = \"{v}\"\nport = 8081\n");
    }
    s
}

/// The node for `path`: the MTU set on every link, havipd attached in the path's mode, an
/// echo instance on :8081.
fn serving_node(path: Path) -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::new();
    if let Some(mtu) = path.mtu() {
        for (ns, dev) in [(&t.srv, "eth0"), (&t.rtr, "s0"), (&t.rtr, "c0"), (&t.cli, "eth0")] {
            ns.ip(&["link", "set", "dev", dev, "mtu", mtu]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    if path == Path::GenericGso || path == Path::TcGso {
        t.rtr.exec(&["ethtool", "-K", "s0", "tx", "on", "tso", "on", "gso", "on"]).unwrap_or_else(|e| panic!("{e}"));
    }
    t.write_config_raw(&config(path.mode()));
    t.start_daemon();
    assert_eq!(ingress_hook_on(&t.srv, "eth0"), Some(path.hook()), "{path:?}: the ingress program is not where it should be");
    let nic = &t.stats()["nics"][0];
    assert_eq!(nic["hook"], path.hook(), "{path:?}: havip stats reports another hook: {nic}");
    // The log line of the attach names the hook and why.
    let log = t.daemon_log();
    let attached = log.lines().find(|l| l.contains("attached") && l.contains("eth0")).unwrap_or_else(|| panic!("{path:?}: no attach line in\n{log}"));
    assert!(attached.contains(&format!("hook=\"{}\"", path.hook())) && attached.contains("why="), "{path:?}: {attached}");
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"A", stop.clone());
    (t, stop)
}

/// Sends `data` to vip:80 and reads it back, both at once; returns the echoed bytes.
fn bulk_exchange(vip: IpAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let s = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(5)).expect("connect to VIP:80");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut name = [0u8];
    r.read_exact(&mut name).expect("the instance's greeting");
    assert_eq!(&name, b"A");
    let mut back = Vec::with_capacity(BULK);
    r.read_to_end(&mut back).unwrap_or_else(|e| panic!("{vip}: reading the echo after {} bytes: {e}", back.len()));
    writer.join().expect("writer failed");
    back
}

fn counter(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("{} missing in {v}", path.join(".")))
}

fn run(vip: &str, path: Path) {
    let (t, stop) = serving_node(path);
    let data = Arc::new(pattern(BULK, 23));
    let sent = data.clone();
    let vip_ip: IpAddr = vip.parse().unwrap();
    let started = Instant::now();
    let back =
        spawn_in(&t.cli, move || bulk_exchange(vip_ip, sent)).join().unwrap_or_else(|_| panic!("{path:?} {vip}: the transfer failed; stats {}", t.stats()));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(back.len(), BULK, "{path:?} {vip}: bytes lost");
    assert!(back == *data, "{path:?} {vip}: echoed data differs");
    assert_eq!(t.checksum_errors(), 0, "{path:?} {vip}: a checksum failed verification");

    let s = t.stats();
    for dir in ["ingress", "egress"] {
        assert_eq!(counter(&s, &["outcomes", dir, "malformed"]), 0, "{path:?} {vip}: {dir} counted malformed packets: {}", s["outcomes"]);
    }
    let v = t.vip_stats(vip);
    // TCP may retransmit on a loaded machine (spurious timer retransmissions): each
    // retransmitted segment adds at most one full frame of the path's MTU.
    let frame = path.mtu().map_or(1500, |m| m.parse().unwrap()) + 14;
    for (dir, sender) in [("rx", &t.cli), ("tx", &t.srv)] {
        // Every TCP packet of this test went to or from port 80: all were remapped.
        assert_eq!(counter(&v, &[dir, "tcp"]), counter(&v, &[dir, "remapped"]), "{path:?} {vip} {dir}: {v}");
        let bytes = counter(&v, &[dir, "bytes"]) as usize;
        let resent = Topology::snmp(sender, "Tcp", "RetransSegs") as usize;
        let most = (BULK + resent * frame) * 11 / 10;
        assert!(
            (BULK..most).contains(&bytes),
            "{path:?} {vip} {dir} bytes {bytes} do not match 16 MiB (at most {most} with {resent} segments retransmitted): {v}"
        );
    }
    // What ingress saw: frames larger than any wire frame of MTU 9000 on average on the
    // large paths (the mean includes the client's ACKs, so it stays well below the largest
    // packets: about 20-47 KiB measured), wire frames in native mode. Without large frames
    // this test would prove nothing; with the 16 KiB limit it resets at the first one.
    let (rx_bytes, rx_packets) = (counter(&v, &["rx", "bytes"]), counter(&v, &["rx", "packets"]));
    let mean = rx_bytes / rx_packets.max(1);
    match path {
        Path::GenericGso | Path::GenericMtu30k => {
            assert!(mean > 9014, "{path:?} {vip}: ingress saw {mean}-byte packets on average: no large frames")
        }
        Path::GenericJumbo | Path::TcJumbo => assert!(mean > 1514 && mean <= 9014, "{path:?} {vip}: ingress saw {mean}-byte frames on average"),
        Path::Native => assert!(mean <= 1514, "{path:?} {vip}: native XDP saw {mean}-byte frames on average"),
        Path::TcGso => {
            // TC counts a GSO packet as its segments, so the mean is a wire frame's; the
            // program runs, one per packet, show the large packets: several segments each.
            let runs = counter(&s, &["outcomes", "ingress", "vip_remapped"]);
            assert!(runs * 2 < rx_packets, "{path:?} {vip}: {runs} TC runs for {rx_packets} segments: no large packets");
        }
    }
    eprintln!("{path:?} {vip}: 16 MiB each way in {took:.2?}; ingress {rx_packets} packets, {mean} bytes on average");
}

/// Every path in turn, each on a fresh node; the generic ones first (they carry the
/// large frames).
const PATHS: [Path; 6] = [Path::GenericGso, Path::GenericMtu30k, Path::GenericJumbo, Path::TcGso, Path::TcJumbo, Path::Native];

#[test]
fn tcp_ipv4_16_mib_each_way_through_a_remapped_vip_on_every_path() {
    for path in PATHS {
        run(VIP1_V4, path);
    }
}

#[test]
fn tcp_ipv6_16_mib_each_way_through_a_remapped_vip_on_every_path() {
    for path in PATHS {
        run(VIP1_V6, path);
    }
}
