//! Real traffic through the attached programs: two instances of the same service, each on
//! its own port, reached concurrently by a client as VIP1:80 and VIP2:80. Every checksum
//! is computed and verified in software on the way (see `topology`), so a wrong one fails.

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use havip_tests::{
    topology::{pattern, spawn_in, Topology, VIP1_V4, VIP1_V6, VIP2_V4, VIP2_V6},
    traffic::echo_instance,
};

const MIB: usize = 1 << 20;

fn config() -> String {
    let mut s = String::new();
    for v in [VIP1_V4, VIP2_V4, VIP1_V6, VIP2_V6] {
        s += &format!("[[vip]]\naddress = \"{v}\"\n");
    }
    s += "[[service]]\nname = \"echo\"\nport = 80\nprotocols = [\"tcp\", \"udp\"]\n";
    for (v, port) in [(VIP1_V4, 8081), (VIP1_V6, 8081), (VIP2_V4, 8082), (VIP2_V6, 8082)] {
        s += &format!("[[service.instance]]\nvip = \"{v}\"\nport = {port}\n");
    }
    s
}

/// A service instance in the server namespace: says its name, then echoes. It listens only
/// on its own port (dual-stack), never on 80.
fn start_instances(t: &Topology, stop: Arc<AtomicBool>) {
    for (name, port) in [(b'A', 8081u16), (b'B', 8082u16)] {
        echo_instance(&t.srv, port, if name == b'A' { b"A" } else { b"B" }, stop.clone());
        // An unconnected UDP socket on the wildcard address would reply from the route's
        // preferred source, not the VIP: UDP instances bind their VIPs.
        let vips: [&str; 2] = if name == b'A' { [VIP1_V4, VIP1_V6] } else { [VIP2_V4, VIP2_V6] };
        for vip in vips {
            let stop_udp = stop.clone();
            let addr = SocketAddr::new(vip.parse().unwrap(), port);
            spawn_in(&t.srv, move || {
                let s = UdpSocket::bind(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut buf = vec![0u8; 65536];
                while !stop_udp.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let mut reply = vec![name];
                        reply.extend_from_slice(&buf[..n]);
                        s.send_to(&reply, peer).unwrap();
                    }
                }
            });
        }
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// Sends `data` to vip:80 over TCP and reads it back; returns (instance name, echoed bytes).
fn tcp_exchange(vip: IpAddr, data: Vec<u8>) -> (u8, Vec<u8>) {
    let s = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(5)).expect("connect to VIP:80");
    assert_eq!(s.peer_addr().unwrap().port(), 80, "the client must only ever see port 80");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(16 * 1024) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut name = [0u8];
    r.read_exact(&mut name).unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    (name[0], back)
}

/// Sends `data` to vip:80 over UDP in 1000-byte datagrams, one at a time, checking each
/// reply; returns (datagrams, bytes echoed).
fn udp_exchange(vip: IpAddr, data: Vec<u8>, expect: u8) -> (usize, usize) {
    let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dst = SocketAddr::new(vip, 80);
    let (mut n, mut bytes) = (0, 0);
    let mut buf = vec![0u8; 2048];
    for chunk in data.chunks(1000) {
        s.send_to(chunk, dst).unwrap();
        let (len, from) = s.recv_from(&mut buf).expect("UDP reply");
        assert_eq!(from, dst, "reply must come from VIP:80");
        assert_eq!(buf[0], expect, "answered by the wrong instance");
        assert_eq!(&buf[1..len], chunk, "UDP payload corrupted");
        n += 1;
        bytes += len - 1;
    }
    (n, bytes)
}

fn counter(v: &serde_json::Value, dir: &str, field: &str) -> u64 {
    v[dir][field].as_u64().unwrap_or_else(|| panic!("{dir}.{field} missing in {v}"))
}

/// The node under test: havipd attached, both instances listening.
fn serving_node() -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::new();
    t.write_config(&config());
    t.start_daemon();
    assert!(t.ingress_attached());
    let stop = Arc::new(AtomicBool::new(false));
    start_instances(&t, stop.clone());
    (t, stop)
}

/// Runs `client(vip, expected instance, data)` for both VIPs at once, in the client
/// namespace, with 1 MiB of distinct data each.
fn concurrently<T: Send + 'static>(
    t: &Topology,
    vips: [&str; 2],
    client: impl Fn(IpAddr, u8, Vec<u8>) -> T + Send + Copy + 'static,
) -> Vec<std::thread::JoinHandle<T>> {
    vips.iter()
        .zip([b'A', b'B'])
        .enumerate()
        .map(|(i, (vip, name))| {
            let vip: IpAddr = vip.parse().unwrap();
            let data = pattern(MIB, 7 + i as u32);
            spawn_in(&t.cli, move || client(vip, name, data))
        })
        .collect()
}

fn run_tcp(vips: [&str; 2]) {
    let (t, stop) = serving_node();
    let clients = concurrently(&t, vips, |vip, name, data| {
        let (got, back) = tcp_exchange(vip, data.clone());
        assert_eq!(got, name, "{vip}:80 answered by the wrong instance");
        assert_eq!(back.len(), data.len(), "{vip}: bytes lost");
        assert!(back == data, "{vip}: echoed data differs");
    });
    for c in clients {
        c.join().expect("client failed");
    }
    stop.store(true, Ordering::Relaxed);

    assert_eq!(t.checksum_errors(), 0, "a checksum failed verification");
    let (client_resent, server_resent) = (Topology::snmp(&t.cli, "Tcp", "RetransSegs"), Topology::snmp(&t.srv, "Tcp", "RetransSegs"));
    for vip in vips {
        let v = t.vip_stats(vip);
        let (rx_bytes, tx_bytes) = (counter(&v, "rx", "bytes"), counter(&v, "tx", "bytes"));
        // 1 MiB of payload each way plus headers (and ACKs), nowhere near double. TCP may
        // retransmit (a loaded machine overflows a veth backlog): each retransmitted segment
        // adds at most one full frame, counted for both VIPs of the sending namespace.
        for (dir, b, resent) in [("rx", rx_bytes, client_resent), ("tx", tx_bytes, server_resent)] {
            let most = (MIB + resent as usize * 1514) * 13 / 10;
            assert!(
                b as usize >= MIB && (b as usize) < most,
                "{vip} {dir} bytes {b} do not match 1 MiB sent (at most {most} with {resent} segments retransmitted): {v}"
            );
        }
        // Every TCP packet of this test went to or from port 80: all were remapped.
        assert_eq!(counter(&v, "rx", "tcp"), counter(&v, "rx", "remapped"), "{v}");
        assert_eq!(counter(&v, "tx", "tcp"), counter(&v, "tx", "remapped"), "{v}");
        assert!(counter(&v, "rx", "tcp") >= (MIB / 1500) as u64, "{v}");
    }
}

fn run_udp(vips: [&str; 2]) {
    let (t, stop) = serving_node();
    let clients = concurrently(&t, vips, |vip, name, data| udp_exchange(vip, data, name));
    let results: Vec<(usize, usize)> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_else(|_| panic!("client failed; checksum errors {}; stats {}", t.checksum_errors(), t.stats())))
        .collect();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(t.checksum_errors(), 0, "a checksum failed verification");

    for (vip, (datagrams, bytes)) in vips.iter().zip(results) {
        assert_eq!(bytes, MIB);
        let v = t.vip_stats(vip);
        let ip_hdr = if vip.contains(':') { 40 } else { 20 };
        // Exactly the datagrams sent, and exactly their bytes on the wire.
        let wire = |payload_total: usize| (payload_total + datagrams * (14 + ip_hdr + 8)) as u64;
        assert_eq!(counter(&v, "rx", "udp"), datagrams as u64, "{v}");
        assert_eq!(counter(&v, "rx", "remapped"), datagrams as u64, "{v}");
        assert_eq!(counter(&v, "rx", "packets"), datagrams as u64, "{v}");
        assert_eq!(counter(&v, "rx", "bytes"), wire(MIB), "{v}");
        assert_eq!(counter(&v, "tx", "udp"), datagrams as u64, "{v}");
        assert_eq!(counter(&v, "tx", "remapped"), datagrams as u64, "{v}");
        // Replies carry one extra byte: the instance's name. For IPv6, havip's own
        // unsolicited neighbour advertisements (86-byte frames, sent when the VIP is bound)
        // leave from the VIP too; IPv4 gratuitous ARPs are not IP.
        let announcements = counter(&v, "tx", "icmp") * 86;
        assert_eq!(counter(&v, "tx", "bytes") - announcements, wire(MIB + datagrams), "{v}");
    }
}

#[test]
fn tcp_ipv4_two_instances_behind_two_vips() {
    run_tcp([VIP1_V4, VIP2_V4]);
}

#[test]
fn tcp_ipv6_two_instances_behind_two_vips() {
    run_tcp([VIP1_V6, VIP2_V6]);
}

#[test]
fn udp_ipv4_two_instances_behind_two_vips() {
    run_udp([VIP1_V4, VIP2_V4]);
}

#[test]
fn udp_ipv6_two_instances_behind_two_vips() {
    run_udp([VIP1_V6, VIP2_V6]);
}
