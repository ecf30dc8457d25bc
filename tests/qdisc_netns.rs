//! havip's HTB egress classes (`havip_user::kernel::qdisc`) against the real kernel, on a veth pair
//! between two fresh namespaces:
//!
//! ```text
//!  ns a: hq0 198.18.60.1 (HTB here) ──── ns b: hq1 198.18.60.2
//! ```
//!
//! Classes are checked through the module, cross-checked with `tc`, and fed real UDP
//! traffic whose class is chosen with SO_PRIORITY, as the egress program chooses it with
//! skb->priority.

use std::{
    future::Future,
    net::UdpSocket,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use havip_tests::{require_root, unique};
use havip_user::{
    kernel::netns::{enter, in_netns, veth_pair, Netns},
    config::rate::parse_rate,
    kernel::qdisc::{self, skb_priority, ClassState, HtbClass, HtbSpec, RootQdisc},
};

const NIC: &str = "hq0";
const PEER: &str = "hq1";
const PEER_ADDR: &str = "198.18.60.2:9";

/// Two namespaces joined by a veth; deleted on drop, also when a test panics.
struct Pair {
    a: Netns,
    b: Netns,
    ifindex: u32,
}

impl Pair {
    fn new() -> Self {
        require_root();
        let a = Netns::create(&unique("hv-qa")).unwrap();
        let b = Netns::create(&unique("hv-qb")).unwrap();
        veth_pair(&a, NIC, &b, PEER).unwrap();
        a.ip(&["addr", "add", "198.18.60.1/24", "dev", NIC]).unwrap();
        b.ip(&["addr", "add", "198.18.60.2/24", "dev", PEER]).unwrap();
        let ifindex = a.exec(&["cat", &format!("/sys/class/net/{NIC}/ifindex")]).unwrap().trim().parse().unwrap();
        Self { a, b, ifindex }
    }

    /// Runs `f` with a route socket opened inside namespace a, on a thread of its own.
    fn nl<T, Fut>(&self, f: impl FnOnce(rtnetlink::Handle, u32) -> Fut + Send + 'static) -> T
    where
        T: Send + 'static,
        Fut: Future<Output = T>,
    {
        let ifindex = self.ifindex;
        in_netns(&self.a.name, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink socket");
                tokio::spawn(conn);
                f(handle, ifindex).await
            })
        })
        .expect("entering namespace a")
    }

    fn apply(&self, spec: &HtbSpec, replace_foreign: bool) -> anyhow::Result<()> {
        let spec = spec.clone();
        self.nl(move |h, i| async move { qdisc::apply(&h, i, &spec, replace_foreign).await })
    }

    fn remove(&self) -> bool {
        self.nl(|h, i| async move { qdisc::remove(&h, i).await }).unwrap()
    }

    fn root(&self) -> RootQdisc {
        self.nl(|h, i| async move { qdisc::root_qdisc(&h, i).await }).unwrap()
    }

    fn classes(&self) -> Vec<ClassState> {
        self.nl(|h, i| async move { qdisc::classes(&h, i).await }).unwrap()
    }

    fn class(&self, minor: u16) -> ClassState {
        self.classes().into_iter().find(|c| c.minor == minor).unwrap_or_else(|| panic!("no class {minor:x}"))
    }

    /// `tc OBJECT COMMAND dev hq0 ARGS` in namespace a, e.g. `tc("class show", &[])`.
    fn tc(&self, object_command: &str, args: &[&str]) -> String {
        let mut full = vec!["tc"];
        full.extend(object_command.split_whitespace());
        full.extend_from_slice(&["dev", NIC]);
        full.extend_from_slice(args);
        self.a.exec(&full).unwrap()
    }

    /// Someone else's root qdisc.
    fn add_tbf(&self) {
        self.tc("qdisc add", &["root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "32k", "latency", "50ms"]);
    }

    /// Sends `count` UDP datagrams of `size` bytes from a to b in class `minor`, then waits
    /// until the class has sent them.
    fn send(&self, minor: u16, count: u64, size: usize) {
        let before = self.class(minor).packets;
        in_netns(&self.a.name, move || {
            let s = udp_socket(minor);
            for _ in 0..count {
                s.send_to(&vec![0u8; size], PEER_ADDR).unwrap();
            }
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.class(minor).packets < before + count {
            assert!(Instant::now() < deadline, "class {minor:x} did not send {count} packets: {:?}", self.class(minor));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes hq1 received, at L2 as HTB counts them.
    fn peer_rx_bytes(&self) -> u64 {
        self.b.exec(&["cat", &format!("/sys/class/net/{PEER}/statistics/rx_bytes")]).unwrap().trim().parse().unwrap()
    }
}

/// A UDP socket whose packets go to class `minor` of havip's HTB.
fn udp_socket(minor: u16) -> UdpSocket {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    let prio = skb_priority(minor) as libc::c_int;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let (fd, opt) = (s.as_raw_fd(), (&raw const prio).cast());
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_PRIORITY, opt, len) };
    assert_eq!(rc, 0, "SO_PRIORITY: {}", std::io::Error::last_os_error());
    s
}

/// UDP from namespace a to b in class `minor`, as fast as the socket takes it, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    fn start(ns: &Netns, minor: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, ns) = (stop.clone(), ns.name.clone());
        let thread = std::thread::spawn(move || {
            enter(&ns).unwrap();
            let s = udp_socket(minor);
            let payload = vec![0u8; 1400];
            while !stop2.load(Ordering::Relaxed) {
                // A full queue is what the flood is for: drops are not errors here.
                let _ = s.send_to(&payload, PEER_ADDR);
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn class(minor: u16, rate: &str, ceil: &str, prio: u8) -> HtbClass {
    HtbClass { minor, rate_bps: parse_rate(rate).unwrap(), ceil_bps: parse_rate(ceil).unwrap(), prio }
}

fn spec(default_minor: u16, classes: Vec<HtbClass>) -> HtbSpec {
    HtbSpec { rate_bps: parse_rate("1gbit").unwrap(), default_minor, classes }
}

/// What `classes()` must report for `spec`, counters aside.
fn shape_of_spec(spec: &HtbSpec) -> Vec<(u16, u64, u64, u8)> {
    let mut v: Vec<_> = spec.classes.iter().map(|c| (c.minor, c.rate_bps, c.ceil_bps, c.prio)).collect();
    v.sort();
    v
}

fn shape(classes: &[ClassState]) -> Vec<(u16, u64, u64, u8)> {
    classes.iter().map(|c| (c.minor, c.rate_bps, c.ceil_bps, c.prio)).collect()
}

/// tc's spelling of a round rate: "20mbit" -> "20Mbit".
fn tc_rate(rate: &str) -> String {
    rate.replace("gbit", "Gbit").replace("mbit", "Mbit").replace("kbit", "Kbit")
}

/// Asserts `tc class show` lists the class with these parameters.
fn assert_tc_class(tc_out: &str, minor: u16, prio: u8, rate: &str, ceil: &str) {
    let head = format!("class htb 4856:{minor:x} parent 4856:1 ");
    let want = format!("prio {prio} rate {} ceil {} ", tc_rate(rate), tc_rate(ceil));
    assert!(
        tc_out.lines().any(|l| l.starts_with(&head) && l.contains(&want)),
        "tc does not show class 4856:{minor:x} with {want}:\n{tc_out}"
    );
}

#[test]
fn apply_creates_htb_on_the_default_root_qdisc() {
    let p = Pair::new();
    assert_eq!(p.root(), RootQdisc::KernelDefault);
    let s = spec(
        0x10,
        vec![class(0x10, "100mbit", "1gbit", 1), class(0x20, "20mbit", "20mbit", 3), class(0x30, "800kbit", "5mbit", 7)],
    );
    p.apply(&s, false).unwrap();

    assert_eq!(p.root(), RootQdisc::Havip);
    assert_eq!(shape(&p.classes()), shape_of_spec(&s));
    let qdiscs = p.tc("qdisc show", &[]);
    assert!(qdiscs.contains("qdisc htb 4856: root") && qdiscs.contains("default 0x10"), "{qdiscs}");
    let tc_classes = p.tc("class show", &[]);
    let root = "class htb 4856:1 root rate 1Gbit ceil 1Gbit ";
    assert!(tc_classes.lines().any(|l| l.starts_with(root)), "{tc_classes}");
    assert_tc_class(&tc_classes, 0x10, 1, "100mbit", "1gbit");
    assert_tc_class(&tc_classes, 0x20, 3, "20mbit", "20mbit");
    assert_tc_class(&tc_classes, 0x30, 7, "800kbit", "5mbit");

    // Applying it again changes nothing.
    p.apply(&s, false).unwrap();
    assert_eq!(shape(&p.classes()), shape_of_spec(&s));
    assert_eq!(p.tc("class show", &[]), tc_classes);
}

#[test]
fn rates_beyond_32_bits_of_bytes_per_second_round_trip() {
    let p = Pair::new();
    let mut s = spec(0x10, vec![class(0x10, "40gbit", "100gbit", 0), class(0x20, "1gbit", "35gbit", 0)]);
    s.rate_bps = parse_rate("100gbit").unwrap();
    p.apply(&s, false).unwrap();
    assert_eq!(shape(&p.classes()), shape_of_spec(&s));
    let tc_classes = p.tc("class show", &[]);
    let root = "class htb 4856:1 root rate 100Gbit ceil 100Gbit ";
    assert!(tc_classes.lines().any(|l| l.starts_with(root)), "{tc_classes}");
    assert_tc_class(&tc_classes, 0x10, 0, "40gbit", "100gbit");
    assert_tc_class(&tc_classes, 0x20, 0, "1gbit", "35gbit");
}

#[test]
fn apply_changes_classes_in_place() {
    let p = Pair::new();
    let before = spec(
        0x10,
        vec![
            class(0x10, "100mbit", "1gbit", 0),
            class(0x20, "50mbit", "1gbit", 2),
            class(0x30, "10mbit", "100mbit", 4),
            class(0x40, "5mbit", "5mbit", 5),
        ],
    );
    p.apply(&before, false).unwrap();
    p.send(0x20, 40, 1000);
    p.send(0x30, 30, 500);
    let sent = p.classes();
    assert!(sent.iter().all(|c| c.drops == 0), "{sent:?}");

    // 0x20 unchanged, 0x30 faster with a new prio, 0x40 gone, 0x50 new, and a slower root.
    let mut after = spec(
        0x10,
        vec![
            class(0x10, "100mbit", "1gbit", 0),
            class(0x20, "50mbit", "1gbit", 2),
            class(0x30, "20mbit", "50mbit", 6),
            class(0x50, "1mbit", "2mbit", 1),
        ],
    );
    after.rate_bps = parse_rate("900mbit").unwrap();
    p.apply(&after, false).unwrap();
    let now = p.classes();
    assert_eq!(shape(&now), shape_of_spec(&after));
    let tc_classes = p.tc("class show", &[]);
    let root = "class htb 4856:1 root rate 900Mbit ceil 900Mbit ";
    assert!(tc_classes.lines().any(|l| l.starts_with(root)), "{tc_classes}");
    assert!(!tc_classes.contains("4856:40 "), "{tc_classes}");
    // Neither the unchanged class nor the changed one was recreated: counters kept.
    let counters = |cs: &[ClassState], minor| {
        let c = cs.iter().find(|c| c.minor == minor).unwrap();
        (c.bytes, c.packets)
    };
    assert_eq!(counters(&now, 0x20), counters(&sent, 0x20));
    assert_eq!(counters(&now, 0x30), counters(&sent, 0x30));
    assert_eq!(counters(&now, 0x50), (0, 0));
    // Traffic still flows in both.
    p.send(0x20, 10, 1000);
    p.send(0x50, 10, 100);
}

#[test]
fn a_new_default_class_recreates_the_qdisc() {
    let p = Pair::new();
    p.apply(&spec(0x10, vec![class(0x10, "100mbit", "1gbit", 0), class(0x20, "50mbit", "1gbit", 0)]), false).unwrap();
    p.send(0x20, 10, 1000);
    let s = spec(0x20, vec![class(0x10, "100mbit", "1gbit", 0), class(0x20, "50mbit", "1gbit", 0)]);
    p.apply(&s, false).unwrap();
    assert!(p.tc("qdisc show", &[]).contains("default 0x20"));
    assert_eq!(shape(&p.classes()), shape_of_spec(&s));
    // The documented cost: the classes are new.
    assert!(p.class(0x20).packets < 10, "{:?}", p.class(0x20));
}

#[test]
fn a_foreign_root_qdisc_is_replaced_only_when_allowed() {
    let p = Pair::new();
    p.add_tbf();
    assert_eq!(p.root(), RootQdisc::Foreign { kind: "tbf".into(), handle: 0x1_0000 });
    let s = spec(0x10, vec![class(0x10, "100mbit", "1gbit", 0)]);

    let e = format!("{:#}", p.apply(&s, false).unwrap_err());
    for part in ["hq0", "tbf 1:", "replace_qdisc = true", "tc qdisc del dev hq0 root"] {
        assert!(e.contains(part), "the error does not mention {part:?}: {e}");
    }
    assert!(p.tc("qdisc show", &[]).contains("qdisc tbf 1: root"), "the tbf was touched");

    p.apply(&s, true).unwrap();
    assert_eq!(p.root(), RootQdisc::Havip);
    assert_eq!(shape(&p.classes()), shape_of_spec(&s));
    assert!(!p.tc("qdisc show", &[]).contains("tbf"));
}

#[test]
fn remove_deletes_only_havips_qdisc() {
    let p = Pair::new();
    p.apply(&spec(0x10, vec![class(0x10, "100mbit", "1gbit", 0)]), false).unwrap();
    assert!(p.remove());
    assert_eq!(p.root(), RootQdisc::KernelDefault);
    assert!(p.tc("qdisc show", &[]).contains("qdisc noqueue 0: root"));
    assert!(p.classes().is_empty());
    assert!(!p.remove(), "nothing left to remove");

    p.add_tbf();
    assert!(!p.remove(), "removed a foreign qdisc");
    assert!(p.tc("qdisc show", &[]).contains("qdisc tbf 1: root"));
}

#[test]
fn a_leaf_class_limits_udp_to_its_rate() {
    let p = Pair::new();
    let rate = parse_rate("20mbit").unwrap();
    p.apply(&spec(0x10, vec![class(0x10, "1gbit", "1gbit", 0), class(0x20, "20mbit", "20mbit", 0)]), false).unwrap();

    let flood = Flood::start(&p.a, 0x20);
    // Past the initial burst, into the steady state.
    std::thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (p.peer_rx_bytes(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (b1, t1) = (p.peer_rx_bytes(), Instant::now());
    drop(flood);

    let measured = (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64();
    let c = p.class(0x20);
    eprintln!("class 0x20 at rate=ceil=20mbit: received {:.2} Mbit/s at the peer; class {c:?}", measured / 1e6);
    assert!((measured / rate as f64 - 1.0).abs() <= 0.10, "received {:.2} Mbit/s, shaped to 20", measured / 1e6);
    assert!(c.bytes as f64 >= 0.9 * (b1 - b0) as f64, "the flood did not go through class 0x20: {c:?}");
}
