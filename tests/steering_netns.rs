//! VIP-to-NIC steering on a server with two NICs (a0, b0) on one bridge with the client:
//! only the owning NIC answers ARP/NDP for a VIP and carries its traffic; when it fails,
//! the VIP moves with its connections intact; a flapping link does not flap the VIP.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use havip_tests::{
    packets::{arp_request_from, neighbor_solicitation_from},
    topology::{spawn_in, Topology},
    traffic::{echo_instance, Stream},
    wire::{arp_reply_for, from_ip, na_for, parse_mac, RawLink},
};

const VIP4: &str = "198.18.20.10";
const VIP6: &str = "2001:db8:20::10";

fn config(hold_down_ms: u64, extra_nics: &[&str]) -> String {
    let mut s = format!(
        "[failover]\nannounce_count = 3\nannounce_interval_ms = 50\nfailback_hold_down_ms = {hold_down_ms}\n\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n"
    );
    for n in extra_nics {
        s += &format!("[[nic]]\nname = \"{n}\"\n");
    }
    for v in [VIP4, VIP6] {
        s += &format!("[[vip]]\naddress = \"{v}\"\nnics = [\"a0\", \"b0\"]\n");
    }
    s += "[[service]]\nname = \"echo\"\nport = 80\n";
    for v in [VIP4, VIP6] {
        s += &format!("[[service.instance]]\nvip = \"{v}\"\nport = 8081\n");
    }
    s
}

fn start(hold_down_ms: u64) -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::switched();
    t.write_config_raw(&config(hold_down_ms, &[]));
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"", stop.clone());
    (t, stop)
}

/// VIP frames seen on the switch side of each server NIC during `d`: (via a0, via b0).
fn vip_frames_per_nic(t: &Topology, vip: &str, d: Duration) -> (usize, usize) {
    let vip: IpAddr = vip.parse().unwrap();
    let count = |port: &'static str| {
        spawn_in(&t.rtr, move || RawLink::open(port).recv_for(d).iter().filter(|f| from_ip(f, vip)).count())
    };
    let (a, b) = (count("sa"), count("sb"));
    (a.join().unwrap(), b.join().unwrap())
}

/// Sends one ARP request (IPv4 VIP) or neighbour solicitation (IPv6 VIP) from the client
/// and returns the MACs of every answer within `window`.
fn neighbour_answers(t: &Topology, vip: &str, window: Duration) -> Vec<String> {
    let mac = parse_mac(&Topology::mac(&t.cli, "eth0"));
    let vip: IpAddr = vip.parse().unwrap();
    spawn_in(&t.cli, move || {
        let link = RawLink::open("eth0");
        let req = match vip {
            IpAddr::V4(v4) => arp_request_from(mac, [198, 18, 20, 100], v4.octets()),
            IpAddr::V6(v6) => neighbor_solicitation_from(mac, "2001:db8:20::100".parse().unwrap(), v6, true),
        };
        link.send(&req);
        link.recv_for(window)
            .iter()
            .filter_map(|f| match vip {
                IpAddr::V4(v4) => arp_reply_for(f, v4),
                IpAddr::V6(v6) => na_for(f, v6),
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn owner(t: &Topology, vip: &str) -> (String, u64) {
    let v = t.vip_stats(vip);
    (v["nic"].as_str().unwrap().to_string(), v["moves"].as_u64().unwrap())
}

fn nic_tx(t: &Topology, nic: &str) -> u64 {
    let s = t.stats();
    let n = s["nics"].as_array().unwrap().iter().find(|n| n["nic"] == nic).unwrap().clone();
    n["counters"]["tx_packets"].as_u64().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails the owning NIC under a live stream and checks that nothing noticed.
fn failover(vip: &str, down_at_switch_end: bool) {
    let (t, stop) = start(60_000);
    let (a_mac, b_mac) = (Topology::mac(&t.srv, "a0"), Topology::mac(&t.srv, "b0"));
    let stream = Stream::start(&t.cli, vip, false);
    assert_eq!(owner(&t, vip), ("a0".into(), 0));
    assert_eq!(t.client_neighbour(vip), Some(a_mac.clone()), "the client resolved the VIP to a0");
    // Replies leave by the owner only: by the program's counters and on the wire.
    let (via_a, via_b) = vip_frames_per_nic(&t, vip, Duration::from_millis(300));
    assert!(via_a > 0 && via_b == 0, "VIP frames via a0 {via_a}, via b0 {via_b}");
    assert!(nic_tx(&t, "a0") > 0 && nic_tx(&t, "b0") == 0);

    if down_at_switch_end {
        t.rtr.ip(&["link", "set", "sa", "down"]).unwrap();
    } else {
        t.srv.ip(&["link", "set", "a0", "down"]).unwrap();
    }
    stream.progress("after a0 went down");
    assert_eq!(owner(&t, vip), ("b0".into(), 1));
    wait_for("the client's neighbour entry to move to b0", Duration::from_secs(3), || t.client_neighbour(vip) == Some(b_mac.clone()));
    let b_before = nic_tx(&t, "b0");
    let (_, via_b) = vip_frames_per_nic(&t, vip, Duration::from_millis(300));
    assert!(via_b > 0, "no VIP frames via b0 after the failover");
    assert!(nic_tx(&t, "b0") > b_before);
    stream.progress("a while later");
    let sent = stream.finish();
    assert!(sent > 256 * 1024, "only {sent} bytes went through");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn tcp_stream_survives_failover_ipv4_server_end() {
    failover(VIP4, false);
}

#[test]
fn tcp_stream_survives_failover_ipv4_switch_end() {
    failover(VIP4, true);
}

#[test]
fn tcp_stream_survives_failover_ipv6_switch_end() {
    failover(VIP6, true);
}

#[test]
fn tcp_stream_survives_failover_ipv6_server_end() {
    failover(VIP6, false);
}

#[test]
fn only_the_owner_answers_and_replies_are_steered_to_it() {
    let (t, stop) = start(0);
    let b_mac = Topology::mac(&t.srv, "b0");
    for vip in [VIP4, VIP6] {
        let out = t.havip(&["bind", vip, "b0"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("moved from a0 to b0"), "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(owner(&t, vip), ("b0".into(), 1));
        // a0 is up but does not own the VIP: exactly one answer, from b0.
        for _ in 0..3 {
            assert_eq!(neighbour_answers(&t, vip, Duration::from_millis(200)), vec![b_mac.clone()], "{vip}");
        }
    }
    // Routing prefers a0 (its subnet route came first): replies are steered to b0.
    let a0_before = nic_tx(&t, "a0");
    let stream = Stream::start(&t.cli, VIP4, false);
    let (via_a, via_b) = vip_frames_per_nic(&t, VIP4, Duration::from_millis(300));
    assert!(via_a == 0 && via_b > 0, "VIP frames via a0 {via_a}, via b0 {via_b}");
    assert!(t.vip_stats(VIP4)["wire"]["steered"].as_u64().unwrap() > 0, "nothing was steered");
    assert_eq!(nic_tx(&t, "a0"), a0_before, "VIP packets left through a0");
    // Unpinned, the VIP returns to its preferred NIC (hold-down 0 here), stream intact.
    let out = t.havip(&["unbind", VIP4]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(owner(&t, VIP4), ("a0".into(), 2));
    stream.progress("after the move back");
    stream.finish();
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_flapping_link_settles_with_one_owner_and_never_two_answers() {
    let hold = 1500;
    let (t, stop) = start(hold);
    // An ARP prober: one request every 30 ms, answers counted per request.
    let probing = Arc::new(AtomicBool::new(true));
    let (max_answers, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mac = parse_mac(&Topology::mac(&t.cli, "eth0"));
    let prober = {
        let (probing, max_answers, requests) = (probing.clone(), max_answers.clone(), requests.clone());
        let vip: Ipv4Addr = VIP4.parse().unwrap();
        spawn_in(&t.cli, move || {
            let link = RawLink::open("eth0");
            while probing.load(Ordering::Relaxed) {
                link.send(&arp_request_from(mac, [198, 18, 20, 100], vip.octets()));
                let n = link.recv_for(Duration::from_millis(30)).iter().filter(|f| arp_reply_for(f, vip).is_some()).count();
                max_answers.fetch_max(n, Ordering::Relaxed);
                requests.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for _ in 0..20 {
        t.srv.ip(&["link", "set", "a0", "down"]).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        t.srv.ip(&["link", "set", "a0", "up"]).unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    // a0 is up again but not stable yet: the VIP stays on b0, having moved once.
    assert_eq!(owner(&t, VIP4), ("b0".into(), 1));
    // After the hold-down it fails back, once.
    wait_for("failback to a0", Duration::from_millis(hold + 2000), || owner(&t, VIP4).0 == "a0");
    assert_eq!(owner(&t, VIP4), ("a0".into(), 2));
    assert_eq!(owner(&t, VIP6), ("a0".into(), 2));
    std::thread::sleep(Duration::from_millis(200));
    probing.store(false, Ordering::Relaxed);
    prober.join().unwrap();
    assert!(requests.load(Ordering::Relaxed) > 50);
    assert_eq!(max_answers.load(Ordering::Relaxed), 1, "a request got more than one answer");
    let answers = neighbour_answers(&t, VIP4, Duration::from_millis(200));
    assert_eq!(answers, vec![Topology::mac(&t.srv, "a0")]);
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn bad_bind_requests_are_refused_and_change_nothing() {
    let mut t = Topology::switched();
    havip_user::kernel::netns::veth_pair(&t.srv, "c0", &t.rtr, "sd").unwrap();
    t.write_config_raw(&config(0, &["c0"]));
    t.start_daemon();
    let state = || havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap();
    t.srv.ip(&["link", "set", "b0", "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let cases: [(&[&str], &str); 5] = [
        (&["bind", VIP4, "zz9"], "unknown NIC `zz9`"),
        (&["bind", VIP4, "c0"], "not a candidate"),
        (&["bind", VIP4, "b0"], "is down"),
        (&["bind", "198.18.20.99", "a0"], "not a VIP of this node"),
        (&["unbind", VIP6], "not pinned"),
    ];
    for (args, reason) in cases {
        let before = (owner(&t, VIP4), owner(&t, VIP6));
        let out = t.havip(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(reason) && err.contains("nothing changed"), "{args:?}: {err}");
        assert_eq!((owner(&t, VIP4), owner(&t, VIP6)), before, "{args:?} changed a binding");
        assert!(state().pins.is_empty(), "{args:?} left a pin");
    }
    // The CLI's own argument checks name the problem too.
    let out = t.havip(&["bind", "not-an-ip", "a0"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("invalid"));
}

#[test]
fn removing_the_owning_nic_moves_its_vips() {
    let (t, stop) = start(60_000);
    let stream = Stream::start(&t.cli, VIP4, false);
    assert_eq!(owner(&t, VIP4).0, "a0");
    t.srv.ip(&["link", "del", "a0"]).unwrap();
    stream.progress("after a0 was deleted");
    assert_eq!(owner(&t, VIP4), ("b0".into(), 1));
    assert_eq!(owner(&t, VIP6), ("b0".into(), 1));
    assert_eq!(neighbour_answers(&t, VIP4, Duration::from_millis(200)), vec![Topology::mac(&t.srv, "b0")]);
    stream.finish();
    stop.store(true, Ordering::Relaxed);
}
