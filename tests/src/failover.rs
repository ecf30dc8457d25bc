//! Failover timing for `cargo xtask bench`: a server with two NICs on a bridge, a client
//! streaming UDP to a VIP (one datagram per 100 µs), and the owning NIC taken down with
//! SIOCSIFFLAGS inside the server namespace. Per trial:
//! - link event: when a raw rtnetlink listener in the namespace hears of it (the floor
//!   any controller waits for; the baseline);
//! - rebind: when the VIP's binding in the pinned map names the new NIC;
//! - first byte: when the new NIC's XDP counter sees the first datagram of the stream.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use havip_common::VipKey;
use havip_user::{kernel::dataplane::Maps, kernel::pins::PinLayout};
use serde::Serialize;

use crate::{
    api_load::{pool_config, ApiLoad, LoadReport},
    percentile,
    topology::{spawn_in, Topology},
};

const VIP: &str = "198.18.20.10";

#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub from: String,
    pub to: String,
    pub link_event_us: f64,
    pub rebind_us: f64,
    pub first_byte_us: f64,
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub method: String,
    pub trials: Vec<Trial>,
    pub link_event_p50_us: f64,
    pub link_event_p99_us: f64,
    pub rebind_p50_us: f64,
    pub rebind_p99_us: f64,
    pub first_byte_p50_us: f64,
    pub first_byte_p99_us: f64,
    /// Rebind p99 over link-event p99: what havipd adds to the kernel's notification.
    pub rebind_p99_ratio_to_link_event: f64,
    pub target_rebind_p99_ms: f64,
    pub target_met: bool,
    /// The API load the trials ran under, if any: what it achieved.
    pub api_load: Option<LoadReport>,
}

/// API load to fail over under: `apps` applications making `calls_per_sec` pool
/// request/release calls per second between them.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub apps: usize,
    pub calls_per_sec: f64,
}

/// Sets `dev` (of the calling thread's namespace) up or down with SIOCSIFFLAGS.
fn set_link(dev: &str, up: bool) {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    unsafe {
        assert_eq!(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req), 0);
        let flags = &mut req.ifr_ifru.ifru_flags;
        if up {
            *flags |= libc::IFF_UP as libc::c_short;
        } else {
            *flags &= !(libc::IFF_UP as libc::c_short);
        }
        assert_eq!(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req), 0, "{}", std::io::Error::last_os_error());
    }
}

/// A raw rtnetlink socket subscribed to link events: sends the arrival time of each.
fn link_event_clock(t: &Topology, stop: Arc<AtomicBool>) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    spawn_in(&t.srv, move || {
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_nl>() as u32) };
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), std::mem::size_of::<libc::timeval>() as u32) };
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {
                let _ = tx.send(Instant::now());
            }
        }
    });
    rx
}

pub fn run(trials: usize) -> FailoverReport {
    run_with(trials, None)
}

/// Like `run`, optionally under API load (which starts before the first trial and runs
/// until the last has ended). Panics if any API call failed; the rate the load reached
/// is in the report, for the caller to hold against what it asked.
pub fn run_with(trials: usize, load: Option<Load>) -> FailoverReport {
    let mut t = Topology::switched();
    // Default announcement settings; failback is held off so each trial fails the NIC
    // that owns the VIP now. The pool exists in both runs, so they differ only in the load.
    t.write_config_raw(&format!(
        "[failover]\nfailback_hold_down_ms = 3600000\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n[[vip]]\naddress = \"{VIP}\"\n{}",
        pool_config(50, 32)
    ));
    t.start_daemon();
    let api = load.map(|l| ApiLoad::start(&t.run_dir, l.apps, l.calls_per_sec));
    let maps = Maps::open(&PinLayout::new(&t.pin_root)).unwrap();
    let vip_id = maps.vips.get(&VipKey::from(VIP.parse::<std::net::IpAddr>().unwrap()), 0).unwrap().id;
    let nics = maps.nic_infos();
    let index_of = |name: &str| nics.values().find(|i| i.name() == name).unwrap().index;
    let ifindex_of = |name: &str| *nics.iter().find(|(_, i)| i.name() == name).unwrap().0;

    let stop = Arc::new(AtomicBool::new(false));
    let events = link_event_clock(&t, stop.clone());
    {
        let stop = stop.clone();
        spawn_in(&t.cli, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let dst: SocketAddr = format!("{VIP}:9").parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send_to(b"stream", dst);
                std::thread::sleep(Duration::from_micros(100));
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));

    let mut results = Vec::new();
    let mut owner = "a0".to_string();
    for i in 0..trials {
        let other = if owner == "a0" { "b0" } else { "a0" }.to_string();
        let before = maps.nic_counters(index_of(&other)).unwrap().rx_packets;
        while events.try_recv().is_ok() {}
        let dev = owner.clone();
        let t0 = spawn_in(&t.srv, move || {
            let t0 = Instant::now();
            set_link(&dev, false);
            t0
        })
        .join()
        .unwrap();
        let (mut rebind, mut first) = (None, None);
        let deadline = t0 + Duration::from_secs(3);
        while (rebind.is_none() || first.is_none()) && Instant::now() < deadline {
            if rebind.is_none() && maps.binding(vip_id).unwrap().ifindex == ifindex_of(&other) {
                rebind = Some(Instant::now());
            }
            if first.is_none() && maps.nic_counters(index_of(&other)).unwrap().rx_packets > before {
                first = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let event = events.recv_timeout(Duration::from_secs(1)).expect("no link event");
        let us = |x: Instant| x.duration_since(t0).as_secs_f64() * 1e6;
        let trial = Trial {
            from: owner.clone(),
            to: other.clone(),
            link_event_us: us(event),
            rebind_us: us(rebind.expect("the VIP was not rebound within 3 s")),
            first_byte_us: us(first.expect("no stream packet reached the new NIC within 3 s")),
        };
        eprint!("\r  failover: trial {}/{trials}", i + 1);
        results.push(trial);
        // Bring the old NIC back; the VIP stays (failback held off).
        let dev = owner.clone();
        spawn_in(&t.srv, move || set_link(&dev, true)).join().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        owner = other;
    }
    eprintln!();
    stop.store(true, Ordering::Relaxed);
    let api_load = api.map(|a| a.finish());
    if let Some(r) = &api_load {
        // A failed call means the load did not do what it names; a low rate is reported
        // (the caller compares it with what it asked).
        assert_eq!(r.failed, 0, "API calls failed under load: {r:?}");
    }
    let col = |f: fn(&Trial) -> f64| results.iter().map(f).collect::<Vec<_>>();
    let (ev, rb, fb) = (col(|t| t.link_event_us), col(|t| t.rebind_us), col(|t| t.first_byte_us));
    let target_ms = 20.0;
    FailoverReport {
        method: "SIOCSIFFLAGS down on the owning NIC; times from that call; UDP stream every 100 us; maps polled every 50 us".into(),
        link_event_p50_us: percentile(&ev, 0.5),
        link_event_p99_us: percentile(&ev, 0.99),
        rebind_p50_us: percentile(&rb, 0.5),
        rebind_p99_us: percentile(&rb, 0.99),
        first_byte_p50_us: percentile(&fb, 0.5),
        first_byte_p99_us: percentile(&fb, 0.99),
        rebind_p99_ratio_to_link_event: percentile(&rb, 0.99) / percentile(&ev, 0.99).max(1.0),
        target_rebind_p99_ms: target_ms,
        target_met: percentile(&rb, 0.99) / 1000.0 <= target_ms,
        trials: results,
        api_load,
    }
}
