//! Path quality measured in the kernel, against impairments injected on one path:
//!
//! ```text
//!  server a0 198.18.40.1 ── relay (delay / loss) ── tA 198.18.40.2 ┐
//!                                                                  target, 198.18.50.1 on lo
//!  server b0 198.18.41.1 ─────────────────────────── tB 198.18.41.2 ┘
//! ```

use std::time::{Duration, Instant};

use havip_tests::{
    relay::{Impairment, Relay},
    topology::Topology,
};
use havip_user::netns::{veth_pair, Netns};

const TARGET: &str = "198.18.50.1";
const VIP: &str = "198.18.60.1";

struct Paths {
    t: Topology,
    relay_ns: Netns,
}

fn paths(probe_interval_ms: u64) -> Paths {
    let mut t = Topology::bare();
    let relay_ns = Netns::create(&format!("{}-rl", t.srv.name)).unwrap();
    relay_ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]).unwrap();
    veth_pair(&t.srv, "a0", &relay_ns, "r0").unwrap();
    veth_pair(&relay_ns, "r1", &t.cli, "tA").unwrap();
    veth_pair(&t.srv, "b0", &t.cli, "tB").unwrap();
    for (ns, args) in [
        (&t.srv, ["addr", "add", "198.18.40.1/24", "dev", "a0"].as_slice()),
        (&t.srv, &["addr", "add", "198.18.41.1/24", "dev", "b0"]),
        (&t.srv, &["route", "add", TARGET, "via", "198.18.40.2", "dev", "a0", "metric", "10"]),
        (&t.srv, &["route", "add", TARGET, "via", "198.18.41.2", "dev", "b0", "metric", "20"]),
        (&t.cli, &["addr", "add", "198.18.40.2/24", "dev", "tA"]),
        (&t.cli, &["addr", "add", "198.18.41.2/24", "dev", "tB"]),
        (&t.cli, &["addr", "add", &format!("{TARGET}/32"), "dev", "lo"]),
    ] {
        ns.ip(args).unwrap();
    }
    t.write_config_raw(&format!(
        "[probe]\ninterval_ms = {probe_interval_ms}\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n[[vip]]\naddress = \"{VIP}\"\nnics = [\"a0\", \"b0\"]\ntargets = [\"{TARGET}\"]\n"
    ));
    Paths { t, relay_ns }
}

fn path(t: &Topology, nic: &str) -> serde_json::Value {
    let v = t.vip_stats(VIP);
    v["paths"].as_array().unwrap().iter().find(|p| p["nic"] == nic).unwrap_or_else(|| panic!("no path via {nic}: {v}")).clone()
}

fn wait_for_replies(t: &Topology, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (a, b) = (path(t, "a0"), path(t, "b0"));
        if a["sent"].as_u64().unwrap() >= n && b["received"].as_u64().unwrap() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "not enough probes: a0 {a}, b0 {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn injected_delay_is_measured_within_two_ms() {
    let mut p = paths(20);
    let _relay = Relay::start(
        &p.relay_ns,
        "r0",
        "r1",
        Impairment { delay: Duration::from_millis(20), loss: 0.0 },
        Impairment::default(),
    );
    p.t.start_daemon();
    wait_for_replies(&p.t, 150, Duration::from_secs(20));
    let (a, b) = (path(&p.t, "a0"), path(&p.t, "b0"));
    let (ra, rb) = (a["rtt_ewma_ms"].as_f64().unwrap(), b["rtt_ewma_ms"].as_f64().unwrap());
    eprintln!("measured: a0 {ra:.2} ms, b0 {rb:.2} ms, difference {:.2} ms (injected 20)", ra - rb);
    assert!(((ra - rb) - 20.0).abs() <= 2.0, "measured difference {:.2} ms, injected 20: a0 {a}, b0 {b}", ra - rb);
    assert!(rb < 2.0, "the clean path is slow: {b}");
    assert_eq!(a["hops"], 0, "directly connected: {a}");
    // The histogram agrees: a0's median lies in the bucket holding 20 ms.
    assert_eq!(a["rtt_p50_ms"].as_f64().unwrap(), 32.768, "{a}");
    // Replies were consumed: no ICMP echo reply reached the server's stack.
    let snmp = p.t.srv.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let (h, v) = {
        let mut l = snmp.lines().filter(|l| l.starts_with("Icmp:"));
        (l.next().unwrap().to_string(), l.next().unwrap().to_string())
    };
    let i = h.split_whitespace().position(|f| f == "InEchoReps").unwrap();
    assert_eq!(v.split_whitespace().nth(i).unwrap(), "0", "probe replies reached the stack");
}

#[test]
fn injected_loss_is_measured_within_five_points() {
    let mut p = paths(10);
    let _relay = Relay::start(
        &p.relay_ns,
        "r0",
        "r1",
        Impairment::default(),
        Impairment { delay: Duration::ZERO, loss: 0.3 },
    );
    p.t.start_daemon();
    wait_for_replies(&p.t, 600, Duration::from_secs(30));
    let (a, b) = (path(&p.t, "a0"), path(&p.t, "b0"));
    let (la, lb) = (a["loss_pct"].as_f64().unwrap(), b["loss_pct"].as_f64().unwrap());
    eprintln!("measured loss: a0 {la:.1}% (injected 30%), b0 {lb:.1}%");
    assert!((la - 30.0).abs() <= 5.0, "measured loss {la:.1}% with 30% injected: {a}");
    assert!(lb <= 1.0, "loss on the clean path: {b}");
}
