//! Traffic for the class tests: a UDP request/response service and its round-trip
//! timer, a TCP bulk source and a downloader, CPU pinning and interface byte counters.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use havip_user::kernel::netns::Netns;

use crate::topology::spawn_in;

/// A UDP instance in `ns` on vip:port answering each datagram with itself. Bound to the
/// VIP: a wildcard UDP socket would answer from the route's source address, not the VIP.
pub fn udp_echo_instance(ns: &Netns, vip: &str, port: u16, stop: Arc<AtomicBool>) {
    let addr: SocketAddr = format!("{vip}:{port}").parse().unwrap();
    spawn_in(ns, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
}

/// A TCP instance in `ns` on `port` that sends zeros to each client as fast as it can.
pub fn bulk_instance(ns: &Netns, port: u16, stop: Arc<AtomicBool>) {
    let until = stop.clone();
    crate::traffic::tcp_instance(ns, port, stop, move |mut s| {
        let chunk = vec![0u8; 64 * 1024];
        while !until.load(Ordering::Relaxed) && s.write_all(&chunk).is_ok() {}
    });
}

/// Downloads from vip:port in `ns` until `stop`, from a thread pinned to `cpu` (if
/// given); returns the bytes received.
pub fn download(ns: &Netns, vip: &str, port: u16, stop: Arc<AtomicBool>, cpu: Option<usize>) -> JoinHandle<u64> {
    let addr: SocketAddr = format!("{vip}:{port}").parse().unwrap();
    spawn_in(ns, move || {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu);
        }
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connecting to the bulk VIP");
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("bulk download failed: {e}"),
            }
        }
        total
    })
}

/// `count` request/response round trips to vip:port from `ns`, one every `gap`, from a
/// thread pinned to `cpu` (if given). A request without a reply within 1 s counts as 1 s.
pub fn udp_round_trips(ns: &Netns, vip: &str, port: u16, count: usize, gap: Duration, cpu: Option<usize>) -> Vec<Duration> {
    let addr: SocketAddr = format!("{vip}:{port}").parse().unwrap();
    spawn_in(ns, move || {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu);
        }
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(bind).unwrap();
        s.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut out = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        for i in 0..count as u32 {
            let t = Instant::now();
            s.send(&i.to_be_bytes()).unwrap();
            // Skip late answers to earlier requests.
            let rtt = loop {
                match s.recv(&mut buf) {
                    Ok(4) if buf[..4] == i.to_be_bytes() => break t.elapsed(),
                    Ok(_) => continue,
                    Err(_) => break Duration::from_secs(1),
                }
            };
            out.push(rtt);
            std::thread::sleep(gap);
        }
        out
    })
    .join()
    .unwrap()
}

/// The `q` quantile (0..=1) of `v`.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pinning to CPU {cpu}");
    }
}

/// Bytes received by `dev` in `ns` (L2, as the kernel counts them).
pub fn rx_bytes(ns: &Netns, dev: &str) -> u64 {
    let out = ns.ip(&["-j", "-s", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["bytes"].as_u64().unwrap_or_else(|| panic!("no rx bytes in {out}"))
}
