//! The controller's failure paths, each against a real havipd on a server with NICs a0, b0
//! (and c0 where needed) on one bridge with the client (`Topology::switched`):
//! - a NIC deleted and created again is used as the new device, never the dead ifindex;
//! - a NIC removed by a reload gives up its VIPs before its programs go, and nothing
//!   answers for a VIP from it afterwards;
//! - a reload that fails at any stage says which stage and what it had applied, and the
//!   previous configuration is restored;
//! - a second havipd on the same pins is refused, naming the first;
//! - a link watcher that ends is resubscribed, and failover still works;
//! - `havip reload` prints the verdict of its own reload;
//! - a newer move cancels the announcements of the move it supersedes.
//!
//! Faults are injected through `HAVIP_FAULTS` (see `havip_user::faults`).

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use havip_tests::{
    packets::arp_request_from,
    topology::{spawn_in, Topology},
    traffic::{echo_instance, Stream},
    wire::{arp_reply_for, mac_str, parse_mac, RawLink},
};

const VIP4: &str = "198.18.20.10";
const VIP6: &str = "2001:db8:20::10";
const VIP2: &str = "198.18.20.11";

/// NICs `nics`; VIP4 and VIP6 on `vip_nics`; both reach the echo instance as :80 -> :8081.
fn config(hold_down_ms: u64, nics: &[&str], vip_nics: &[&str], extra: &str) -> String {
    let list = |v: &[&str]| v.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let mut s = format!("[failover]\nannounce_count = 3\nannounce_interval_ms = 50\nfailback_hold_down_ms = {hold_down_ms}\n\n");
    for n in nics {
        s += &format!("[[nic]]\nname = \"{n}\"\n");
    }
    for v in [VIP4, VIP6] {
        s += &format!("[[vip]]\naddress = \"{v}\"\nnics = [{}]\n", list(vip_nics));
    }
    s += extra;
    s += "[[service]]\nname = \"echo\"\nport = 80\n";
    for v in [VIP4, VIP6] {
        s += &format!("[[service.instance]]\nvip = \"{v}\"\nport = 8081\n");
    }
    s
}

fn start(cfg: &str) -> (Topology, Arc<AtomicBool>) {
    let mut t = Topology::switched();
    t.write_config_raw(cfg);
    t.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"", stop.clone());
    (t, stop)
}

fn owner(t: &Topology, vip: &str) -> String {
    t.vip_stats(vip)["nic"].as_str().unwrap_or("-").to_string()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One ARP request for `vip` from the client; the MACs of the answers within `window`.
fn arp_answers(t: &Topology, vip: &str, window: Duration) -> Vec<String> {
    let mac = parse_mac(&Topology::mac(&t.cli, "eth0"));
    let vip: Ipv4Addr = vip.parse().unwrap();
    spawn_in(&t.cli, move || {
        let link = RawLink::open("eth0");
        link.send(&arp_request_from(mac, [198, 18, 20, 100], vip.octets()));
        link.recv_for(window).iter().filter_map(|f| arp_reply_for(f, vip)).collect()
    })
    .join()
    .unwrap()
}

fn attached_on(t: &Topology, nic: &str) -> bool {
    havip_tests::topology::ingress_hook_on(&t.srv, nic).is_some()
}

fn reload(t: &Topology) -> (bool, String) {
    let out = t.havip(&["reload"]);
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_nic_deleted_and_created_again_serves_its_vips_as_the_new_device() {
    let hold = 500;
    let (mut t, stop) = start(&config(hold, &["a0", "b0"], &["a0", "b0"], ""));
    assert_eq!(owner(&t, VIP4), "a0");
    t.srv.ip(&["link", "del", "a0"]).unwrap();
    wait_for("the VIPs to leave the deleted a0", Duration::from_secs(3), || owner(&t, VIP4) == "b0");

    // The same name again, a new device (new ifindex, new MAC), on the same switch port.
    t.plug_switched("a0", "sa");
    t.srv.ip(&["addr", "add", "198.18.20.1/24", "dev", "a0"]).unwrap();
    t.srv.ip(&["addr", "add", "2001:db8:20::1/64", "dev", "a0", "nodad"]).unwrap();
    let new_mac = Topology::mac(&t.srv, "a0");
    // After the hold-down the VIPs fail back to a0: to the new device.
    wait_for("failback to the new a0", Duration::from_millis(hold + 3000), || owner(&t, VIP4) == "a0");
    assert!(attached_on(&t, "a0"), "the new a0 has no XDP program: it was never re-attached");
    assert_eq!(arp_answers(&t, VIP4, Duration::from_millis(200)), vec![new_mac.clone()], "exactly one answer, from the new a0");
    // Real traffic through the new device, remapped both ways (:80 <-> :8081).
    t.cli.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    let stream = Stream::start(&t.cli, VIP4, false);
    stream.progress("on the re-created a0");
    assert_eq!(t.client_neighbour(VIP4), Some(new_mac));
    let v6 = Stream::start(&t.cli, VIP6, false);
    v6.progress("IPv6 on the re-created a0");
    stream.finish();
    v6.finish();
    assert!(t.daemon_log().contains("new device under a known name"), "{}", t.daemon_log());
    stop.store(true, Ordering::Relaxed);
}

/// One ARP request: when it left, and the MACs that answered it.
type Asked = (Instant, Vec<String>);

#[test]
fn a_nic_removed_by_a_reload_gives_up_its_vips_before_it_is_detached() {
    let (t, stop) = start(&config(60_000, &["a0", "b0"], &["a0", "b0"], ""));
    assert_eq!(owner(&t, VIP4), "a0");
    let (a_mac, b_mac) = (Topology::mac(&t.srv, "a0"), Topology::mac(&t.srv, "b0"));

    // The client asks for the VIP every 20 ms, all through the reload; each request's
    // answers are kept with the time the request left.
    let asking = Arc::new(AtomicBool::new(true));
    let answers: Arc<Mutex<Vec<Asked>>> = Arc::default();
    let prober = {
        let (asking, answers) = (asking.clone(), answers.clone());
        let mac = parse_mac(&Topology::mac(&t.cli, "eth0"));
        let vip: Ipv4Addr = VIP4.parse().unwrap();
        spawn_in(&t.cli, move || {
            let link = RawLink::open("eth0");
            while asking.load(Ordering::Relaxed) {
                let at = Instant::now();
                link.send(&arp_request_from(mac, [198, 18, 20, 100], vip.octets()));
                let got = link.recv_for(Duration::from_millis(20)).iter().filter_map(|f| arp_reply_for(f, vip)).collect();
                answers.lock().unwrap().push((at, got));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    t.write_config_raw(&config(60_000, &["b0"], &["b0"], ""));
    let (ok, out) = reload(&t);
    assert!(ok, "reload: {out}");
    let moved = Instant::now();
    // What the removed NIC's switch port carries from now on.
    let a_frames = {
        let a_mac = a_mac.clone();
        spawn_in(&t.rtr, move || {
            RawLink::open("sa").recv_for(Duration::from_millis(800)).into_iter().filter(|f| mac_str(&f[6..12]) == a_mac).collect::<Vec<_>>()
        })
    };
    let a_frames = a_frames.join().unwrap();
    asking.store(false, Ordering::Relaxed);
    prober.join().unwrap();

    let vip: Ipv4Addr = VIP4.parse().unwrap();
    let a_answers = a_frames.iter().filter(|f| arp_reply_for(f, vip).is_some()).count();
    assert_eq!(a_answers, 0, "the removed a0 answered for the VIP {a_answers} time(s) after the move");
    let answers = answers.lock().unwrap();
    assert!(answers.iter().all(|(_, a)| a.len() <= 1), "a request got two answers: {answers:?}");
    let after: Vec<&Vec<String>> = answers.iter().filter(|(at, _)| *at > moved).map(|(_, a)| a).collect();
    assert!(after.len() >= 10, "only {} requests after the reload", after.len());
    assert!(after.iter().all(|a| *a == &vec![b_mac.clone()]), "after the move every request must be answered by b0 only: {after:?}");
    assert!(answers.iter().any(|(_, a)| *a == vec![a_mac.clone()]), "a0 never answered before the reload: the probe saw nothing");
    // The log shows the order: the VIP was bound to b0 before a0 was detached.
    let log = t.daemon_log();
    let bound = log.find(&format!("VIP bound vip={VIP4} from=\"a0\" to=b0")).expect("no move off a0 logged");
    let detached = log.find("detached nic=\"a0\"").expect("no detach of a0 logged");
    assert!(bound < detached, "a0 was detached before its VIPs moved:\n{log}");
    assert!(!attached_on(&t, "a0"), "a0 is still attached");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_reload_failing_at_any_stage_says_what_it_applied_and_restores_the_previous_configuration() {
    let mut t = Topology::switched();
    t.plug_switched("c0", "sd");
    t.srv.ip(&["addr", "add", "198.18.20.3/24", "dev", "c0"]).unwrap();
    let old = config(60_000, &["a0", "b0"], &["a0", "b0"], "");
    // The new one attaches c0, detaches b0 and adds a VIP on c0: every stage has work.
    let new = config(60_000, &["a0", "c0"], &["a0"], &format!("[[vip]]\naddress = \"{VIP2}\"\nnics = [\"c0\", \"a0\"]\n"));
    t.write_config_raw(&old);
    t.start_daemon();
    let stages = ["nics", "sysctls", "maps", "qdiscs", "addresses", "probes", "bindings", "detach", "state"];
    for stage in stages {
        t.write_config_raw(&new);
        t.arm_fault(&format!("apply:{stage}"));
        let (ok, out) = reload(&t);
        assert!(!ok, "{stage}: the reload was accepted: {out}");
        assert!(t.faults_fired(), "{stage}: the fault point was never reached");
        assert!(out.contains(&format!("stage `{stage}` failed: injected fault")), "{stage}: the stage is not named: {out}");
        if stage == "nics" {
            assert!(out.contains("nothing had been changed"), "{stage}: {out}");
        } else {
            assert!(out.contains("already applied:") && out.contains("attached c0"), "{stage}: what was applied is not listed: {out}");
        }
        assert!(out.contains("the previous configuration was restored"), "{stage}: {out}");
        // The previous configuration runs: b0 attached, c0 not, VIP2 nowhere.
        assert!(attached_on(&t, "a0") && attached_on(&t, "b0"), "{stage}: a0 or b0 lost its program");
        assert!(!attached_on(&t, "c0"), "{stage}: c0 is still attached");
        assert!(!t.server_lo_addresses().contains(VIP2), "{stage}: {VIP2} is still installed");
        assert!(t.stats()["vips"].as_array().unwrap().iter().all(|v| v["vip"] != VIP2), "{stage}: {VIP2} is in the maps");
        assert_eq!(owner(&t, VIP4), "a0", "{stage}");
        let state = havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap();
        assert_eq!(state.nics, ["a0", "b0"], "{stage}");
    }
    // Without a fault the same reload applies.
    let (ok, out) = reload(&t);
    assert!(ok, "{out}");
    assert!(attached_on(&t, "c0") && !attached_on(&t, "b0"));
    assert!(t.server_lo_addresses().contains(VIP2));
    assert_eq!(owner(&t, VIP2), "c0");
}

#[test]
fn a_second_havipd_on_the_same_pins_is_refused_naming_the_first() {
    let (t, stop) = start(&config(60_000, &["a0", "b0"], &["a0", "b0"], ""));
    let first = t.daemon_pid().unwrap();
    let other_run = t.run_dir.join("second");
    let mut second = Command::new(havip_tests::bin("havipd"))
        .args(["--netns", &t.srv.name, "--config", t.config_path.to_str().unwrap(), "--pin-path", t.pin_root.to_str().unwrap()])
        .arg("--run-dir")
        .arg(&other_run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        let _ = havip_user::cli::teardown::down(&t.pin_root, &other_run);
        panic!("a second havipd on the same pins kept running");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the second havipd exited 0: {err}");
    assert!(err.contains(&format!("pid {first}")), "the first havipd's pid is not named: {err}");
    // The first one goes on untouched.
    assert_eq!(owner(&t, VIP4), "a0");
    assert!(t.havip(&["explain", VIP4]).status.success(), "the first havipd stopped answering");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_link_watcher_that_ends_is_resubscribed_and_a_pulled_cable_still_moves_the_vip() {
    let (t, stop) = start(&config(60_000, &["a0", "b0"], &["a0", "b0"], ""));
    assert_eq!(owner(&t, VIP4), "a0");
    // The watcher ends on the next link message, which is the cable pull itself: the event
    // is lost with the stream, so only the resynchronisation can find a0 down.
    t.arm_fault("link_watch:end");
    t.rtr.ip(&["link", "set", "sa", "down"]).unwrap();
    wait_for("the VIPs to move to b0", Duration::from_secs(3), || owner(&t, VIP4) == "b0" && owner(&t, VIP6) == "b0");
    assert!(t.faults_fired(), "the watcher never ended");
    let log = t.daemon_log();
    assert!(log.contains("the link watcher ended; subscribing again"), "{log}");
    // The new watcher works: b0's cable goes, a0's comes back, the VIPs follow.
    t.rtr.ip(&["link", "set", "sa", "up"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    t.rtr.ip(&["link", "set", "sb", "down"]).unwrap();
    wait_for("the VIPs to move back to a0", Duration::from_secs(3), || owner(&t, VIP4) == "a0");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn havip_reload_reports_the_verdict_of_its_own_reload() {
    let (t, stop) = start(&config(60_000, &["a0", "b0"], &["a0", "b0"], ""));
    // A reload havipd rejects (no NIC zz9 on this node): its verdict is on record.
    t.write_config_raw(&config(60_000, &["a0", "b0", "zz9"], &["a0", "b0"], ""));
    let (ok, out) = reload(&t);
    assert!(!ok && out.contains("zz9"), "{out}");
    // A good one, whose verdict havipd holds back for a second after the new generation
    // is already in the state file: the CLI must wait for this reload's verdict.
    t.write_config_raw(&config(60_000, &["a0", "b0"], &["a0", "b0"], &format!("[[vip]]\naddress = \"{VIP2}\"\nnics = [\"a0\"]\n")));
    t.arm_fault("reload:slow_verdict");
    let (ok, out) = reload(&t);
    assert!(t.faults_fired(), "the verdict was not held back");
    assert!(ok, "havip reload printed an earlier verdict: {out}");
    assert!(out.contains("reloaded") && out.contains(VIP2), "{out}");
    stop.store(true, Ordering::Relaxed);
}

/// Gratuitous ARPs for `vip` sent from `mac` among `frames`.
fn garps(frames: &[Vec<u8>], vip: Ipv4Addr, mac: &str) -> usize {
    frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[28..32] == vip.octets() && f[38..42] == vip.octets())
        .filter(|f| mac_str(&f[22..28]) == mac)
        .count()
}

#[test]
fn a_newer_move_cancels_the_announcements_of_the_one_it_supersedes() {
    // 20 announcements, 50 ms apart: a move announces for about a second.
    let cfg = config(0, &["a0", "b0"], &["a0", "b0"], "").replace("announce_count = 3", "announce_count = 20");
    let (t, stop) = start(&cfg);
    let (a_mac, b_mac) = (Topology::mac(&t.srv, "a0"), Topology::mac(&t.srv, "b0"));
    let vip: Ipv4Addr = VIP4.parse().unwrap();
    let out = t.havip(&["bind", VIP4, "b0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = t.havip(&["bind", VIP4, "a0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(owner(&t, VIP4), "a0");
    let capture = |port: &'static str| spawn_in(&t.rtr, move || RawLink::open(port).recv_for(Duration::from_millis(700)));
    let (on_a, on_b) = (capture("sa"), capture("sb"));
    let (on_a, on_b) = (on_a.join().unwrap(), on_b.join().unwrap());
    // The owner keeps announcing; the superseded move's announcements stopped (one may
    // have been on its way when the second bind cancelled them).
    assert!(garps(&on_a, vip, &a_mac) >= 5, "a0 (the owner) stopped announcing");
    let stale = garps(&on_b, vip, &b_mac);
    assert!(stale <= 1, "b0 announced the VIP {stale} times after it moved away");
    assert!(t.daemon_log().contains("earlier announcements cancelled"), "{}", t.daemon_log());
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn link_failover_stays_fast_while_applications_hammer_the_api() {
    // The bench measures this at 1,000 calls/s against its 20 ms p99 target; here the debug
    // build (on a machine that may be busy) runs a lighter load with a looser bound, and the load must really have run
    // (`run_with` checks that every call succeeded at the asked rate).
    let load = havip_tests::failover::Load { apps: 4, calls_per_sec: 100.0 };
    let r = havip_tests::failover::run_with(10, Some(load));
    let l = r.api_load.as_ref().unwrap();
    assert!(l.rate() >= 0.9 * load.calls_per_sec, "the API load reached only {:.0} calls/s: {l:?}", l.rate());
    assert!(l.granted >= 100 && l.released >= 100, "the API load did not run: {l:?}");
    let worst = r.trials.iter().map(|t| t.rebind_us).fold(0.0, f64::max);
    assert!(worst < 100_000.0, "a failover under API load took {:.1} ms: {:?}", worst / 1000.0, r.trials);
}
