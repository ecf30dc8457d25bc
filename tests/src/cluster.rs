//! Cluster labs: several havipd nodes, real etcd members and a client on one Ethernet
//! segment, with the faults cluster mode must survive and the instruments that judge it.
//!
//! ```text
//!                      switch ns: br0 198.18.30.254 (admin host: etcdctl runs here)
//!  client eth0 198.18.30.100 ──┤
//!  etcd e<i> eth0 198.18.30.(200+i) ──┤            (one namespace per member)
//!  node n<k> eth0 198.18.30.(10k+1) ──┤ n<k>a     (two NICs per node; XDP pass-through
//!  node n<k> eth1 198.18.30.(10k+2) ──┘ n<k>b      on the switch side of both)
//! ```
//!
//! IPv6 mirrors it in 2001:db8:30::/64 (same host numbers). VIPs live in 198.18.130.0/24
//! and 2001:db8:130::/64, which are on-link for the client: it resolves them with ARP/NDP
//! straight from the nodes, so which node answers is visible on the client's wire.
//!
//! Everything a lab creates (namespaces, etcd and havipd processes, pins, run directories)
//! goes away when it drops, also when a test panics. etcd and havipd also die with the
//! test process when it is killed from outside (no Drop runs then; its namespaces and
//! run directory stay behind until deleted by hand).
//!
//! The instruments:
//! - [`ProbeStream`]: sequence-numbered UDP from the client to a VIP, answered by an
//!   [`EchoResponder`] on every node that names itself; reports gaps and who answered.
//! - [`NeighCapture`] + [`ArpAsker`] + [`two_owner_moments`]: every ARP/NDP claim the
//!   client sees, kernel-timestamped, and the check that no two nodes own a VIP at once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use havip_user::kernel::netns::{in_netns, veth_pair, Netns};

use crate::{
    topology::Topology,
    wire::{mac_str, parse_mac, RawLink},
};

/// VIPs of cluster tests come from here (on-link for the client).
pub const VIP_NET_V4: &str = "198.18.130.0/24";
pub const VIP_NET_V6: &str = "2001:db8:130::/64";
/// The VIP a lab's nodes get unless the test sets others ([`ClusterLab::set_vips`]).
pub const CLUSTER_VIP: &str = "198.18.130.1";
pub const CLIENT_V4: &str = "198.18.30.100";
pub const CLIENT_V6: &str = "2001:db8:30::100";
/// The switch's own address: the admin host that watches etcd without touching the
/// namespaces under test.
pub const ADMIN_V4: &str = "198.18.30.254";
/// havipd's node-to-node heartbeat port (UDP).
pub const HEARTBEAT_PORT: u16 = 7947;
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

/// A node NIC's addresses: node `k` (1-based), NIC `nic` (0 = eth0, 1 = eth1).
pub fn node_v4(k: usize, nic: usize) -> String {
    format!("198.18.30.{}", 10 * k + 1 + nic)
}

pub fn node_v6(k: usize, nic: usize) -> String {
    format!("2001:db8:30::{}", 10 * k + 1 + nic)
}

pub fn etcd_v4(i: usize) -> String {
    format!("198.18.30.{}", 200 + i)
}

struct EtcdMember {
    name: String,
    ns: Netns,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

struct Node {
    name: String,
    ns: Netns,
    pin_root: PathBuf,
    run_dir: PathBuf,
    macs: [String; 2],
    daemon: Option<Child>,
    /// Extra environment for havipd (test hooks such as `HAVIP_TEST_CLOCK_RATE`).
    env: Vec<(String, String)>,
}

pub struct ClusterLab {
    /// Unique per lab: in namespace names, the etcd cluster token and the key prefix.
    pub id: String,
    run_root: PathBuf,
    /// etcd's data directories: in memory (see [`etcd_data_root`]).
    etcd_root: PathBuf,
    sw: Netns,
    cli: Netns,
    nodes: Vec<Node>,
    etcd: Vec<EtcdMember>,
    vips: Vec<String>,
    peer_pins: PathBuf,
    /// Pass-through XDP programs on the switch side of node NICs (kept loaded for the lab's life).
    peer_xdp: Vec<aya::Ebpf>,
}

/// Spawns `cmd` so that the child is SIGKILLed when the test process dies: a test killed
/// from outside (a CI timeout), where no Drop runs, leaves no etcd or havipd behind.
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so children are
/// forked by one spawner thread that lives as long as the process, never by the calling
/// thread (a test may restart etcd from a helper thread that ends early).
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    spawner.lock().unwrap().send((cmd, tx)).expect("spawner thread gone");
    rx.recv().expect("spawner thread gone")
}

fn run(ns: &Netns, args: &[&str]) {
    ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
}

impl ClusterLab {
    /// `nodes` havipd nodes (not started) n1..nN and an etcd cluster of `etcd_members`
    /// members, answering before this returns.
    pub fn new(nodes: usize, etcd_members: usize) -> Self {
        crate::require_root();
        assert!((1..=9).contains(&nodes), "a lab has 1 to 9 nodes (address plan: 198.18.30.10k+1)");
        assert!((1..=5).contains(&etcd_members), "a lab has 1 to 5 etcd members");
        let id = crate::unique("c");
        let run_root = PathBuf::from(format!("/run/havip-test/{id}"));
        std::fs::create_dir_all(&run_root).unwrap();
        let etcd_root = etcd_data_root(&id, &run_root);
        // Built up in place: a panic half way drops what exists so far.
        let mut lab = Self {
            sw: Netns::create(&format!("hv-{id}-sw")).unwrap(),
            cli: Netns::create(&format!("hv-{id}-cli")).unwrap(),
            peer_pins: PathBuf::from(format!("/sys/fs/bpf/havip-test{id}-peers")),
            id,
            run_root,
            etcd_root,
            nodes: Vec::new(),
            etcd: Vec::new(),
            vips: vec![CLUSTER_VIP.to_string()],
            peer_xdp: Vec::new(),
        };
        run(&lab.sw, &["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        run(&lab.sw, &["link", "set", "br0", "up"]);
        run(&lab.sw, &["addr", "add", &format!("{ADMIN_V4}/24"), "dev", "br0"]);
        lab.plug(&lab.cli, "eth0", "cli");
        for args in [
            vec!["addr", "add", "198.18.30.100/24", "dev", "eth0"],
            vec!["addr", "add", "2001:db8:30::100/64", "dev", "eth0", "nodad"],
            // VIPs on-link: the client ARPs for them itself instead of using a gateway.
            vec!["route", "add", VIP_NET_V4, "dev", "eth0"],
            vec!["-6", "route", "add", VIP_NET_V6, "dev", "eth0"],
        ] {
            run(&lab.cli, &args);
        }
        for k in 1..=nodes {
            let name = format!("n{k}");
            let ns = Netns::create(&format!("hv-{}-{name}", lab.id)).unwrap();
            let run_dir = lab.run_root.join(&name);
            std::fs::create_dir_all(&run_dir).unwrap();
            for (nic, dev) in ["eth0", "eth1"].into_iter().enumerate() {
                let port = format!("{name}{}", ["a", "b"][nic]);
                lab.plug(&ns, dev, &port);
                // A frame a veth sends with XDP_TX lands in its peer's XDP ring, which only
                // an XDP program on the peer drains: give the node NICs' peers a pass-through one.
                lab.peer_xdp.push(havip_user::cli::lab::pass_through_xdp(&lab.sw.name, &port, &lab.peer_pins).unwrap());
                run(&ns, &["addr", "add", &format!("{}/24", node_v4(k, nic)), "dev", dev]);
                run(&ns, &["addr", "add", &format!("{}/64", node_v6(k, nic)), "dev", dev, "nodad"]);
            }
            let macs = [Topology::mac(&ns, "eth0"), Topology::mac(&ns, "eth1")];
            let pin_root = PathBuf::from(format!("/sys/fs/bpf/havip-test{}-{name}", lab.id));
            lab.nodes.push(Node { name, ns, pin_root, run_dir, macs, daemon: None, env: Vec::new() });
        }
        for i in 0..etcd_members {
            let ns = Netns::create(&format!("hv-{}-e{i}", lab.id)).unwrap();
            lab.plug(&ns, "eth0", &format!("e{i}"));
            run(&ns, &["addr", "add", &format!("{}/24", etcd_v4(i)), "dev", "eth0"]);
            let dir = lab.run_root.join(format!("etcd{i}"));
            let data_dir = lab.etcd_root.join(format!("etcd{i}"));
            lab.etcd.push(EtcdMember { name: format!("e{i}"), ns, data_dir, log: dir.join("etcd.log"), child: None });
        }
        for i in 0..etcd_members {
            lab.spawn_etcd(i, "new");
        }
        lab.wait_etcd_healthy(Duration::from_secs(10));
        lab
    }

    /// Connects `dev` of `ns` to the bridge through switch port `port`.
    fn plug(&self, ns: &Netns, dev: &str, port: &str) {
        veth_pair(ns, dev, &self.sw, port).unwrap();
        run(&self.sw, &["link", "set", port, "master", "br0"]);
    }

    // --- accessors ---

    pub fn client_ns(&self) -> &Netns {
        &self.cli
    }

    pub fn switch_ns(&self) -> &Netns {
        &self.sw
    }

    fn node(&self, k: usize) -> &Node {
        assert!(k >= 1 && k <= self.nodes.len(), "no node n{k} (nodes are 1-based, 1..={})", self.nodes.len());
        &self.nodes[k - 1]
    }

    fn node_mut(&mut self, k: usize) -> &mut Node {
        assert!(k >= 1 && k <= self.nodes.len(), "no node n{k} (nodes are 1-based, 1..={})", self.nodes.len());
        &mut self.nodes[k - 1]
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// "n1", "n2", ...
    pub fn node_name(&self, k: usize) -> &str {
        &self.node(k).name
    }

    pub fn node_ns(&self, k: usize) -> &Netns {
        &self.node(k).ns
    }

    /// MACs of node `k`'s eth0 and eth1.
    pub fn node_macs(&self, k: usize) -> [String; 2] {
        self.node(k).macs.clone()
    }

    /// Every node NIC's MAC to its node's name: what [`two_owner_moments`] needs.
    pub fn mac_to_node(&self) -> HashMap<String, String> {
        self.nodes.iter().flat_map(|n| n.macs.iter().map(|m| (m.clone(), n.name.clone()))).collect()
    }

    pub fn node_pin_root(&self, k: usize) -> &Path {
        &self.node(k).pin_root
    }

    pub fn node_run_dir(&self, k: usize) -> &Path {
        &self.node(k).run_dir
    }

    /// havipd's pid on node `k`, while started.
    /// The nice value of node `k`'s havipd thread named `name` (from /proc), if running.
    pub fn thread_nice(&self, k: usize, name: &str) -> Option<i32> {
        let pid = self.node_pid(k)?;
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            if std::fs::read_to_string(t.path().join("comm")).ok()?.trim() == name {
                // Fields after the command's closing parenthesis start at field 3; nice is 19.
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                return stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok();
            }
        }
        None
    }

    pub fn node_pid(&self, k: usize) -> Option<u32> {
        self.node(k).daemon.as_ref().map(|c| c.id())
    }

    /// Client URLs of all etcd members, e.g. "http://198.18.30.200:2379".
    pub fn etcd_endpoints(&self) -> Vec<String> {
        (0..self.etcd.len()).map(|i| format!("http://{}:{ETCD_CLIENT_PORT}", etcd_v4(i))).collect()
    }

    /// The etcd key prefix of this lab's nodes.
    pub fn key_prefix(&self) -> String {
        format!("/havip-test-{}", self.id)
    }

    /// The VIPs `start_node` configures (default: [`CLUSTER_VIP`]).
    pub fn set_vips(&mut self, vips: &[&str]) {
        self.vips = vips.iter().map(|v| v.to_string()).collect();
    }

    // --- havipd ---

    /// Node `k`'s havipd config: its two NICs, the lab's etcd, every other node as a peer
    /// and `vips` with every node as a candidate (VIP i prefers node i+1, then the following
    /// ones, wrapping: the first VIP n1, n2, ...), then `extra` verbatim.
    /// The timing lines are exact, so a test can `.replace("lease_ms = 40", ...)`.
    pub fn node_config(&self, k: usize, vips: &[&str], extra: &str) -> String {
        cluster_config(k, self.nodes.len(), &self.etcd_endpoints(), &self.key_prefix(), vips, extra)
    }

    /// Starts havipd on node `k` with [`Self::node_config`] for the lab's VIPs.
    pub fn start_node(&mut self, k: usize) {
        let vips: Vec<&str> = self.vips.iter().map(String::as_str).collect();
        let config = self.node_config(k, &vips, "");
        self.start_node_with(k, &config);
    }

    /// Node `k`'s clock runs at `rate` times real time from its next start (the test hook
    /// in `havip_user::kernel::clock`): all namespaces share one clock otherwise.
    pub fn set_clock_rate(&mut self, k: usize, rate: f64) {
        self.node_mut(k).env.retain(|(name, _)| name != "HAVIP_TEST_CLOCK_RATE");
        self.node_mut(k).env.push(("HAVIP_TEST_CLOCK_RATE".into(), rate.to_string()));
    }

    /// Writes `config` to node `k`'s run directory and starts havipd with it. Returns once
    /// the process runs and its control socket exists: in cluster mode readiness (applying
    /// VIPs) depends on etcd, which a test may have cut on purpose.
    pub fn start_node_with(&mut self, k: usize, config: &str) {
        let node = self.node_mut(k);
        assert!(node.daemon.is_none(), "havipd already started on {}", node.name);
        let config_path = node.run_dir.join("havip.toml");
        std::fs::write(&config_path, config).unwrap();
        let _ = std::fs::remove_file(havip_user::api::socket_path(&node.run_dir));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.run_dir.join("havipd.log")).unwrap();
        let mut cmd = Command::new(crate::bin("havipd"));
        cmd.arg("--netns")
            .arg(&node.ns.name)
            .arg("--config")
            .arg(&config_path)
            .arg("--pin-path")
            .arg(&node.pin_root)
            .arg("--run-dir")
            .arg(&node.run_dir)
            .env("HAVIP_FAULTS", crate::topology::fault_file(&node.run_dir))
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_tied(cmd).expect("starting havipd");
        node.daemon = Some(child);
        let socket = havip_user::api::socket_path(&node.run_dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() {
                return;
            }
            if let Some(status) = self.node_mut(k).daemon.as_mut().unwrap().try_wait().unwrap() {
                self.node_mut(k).daemon = None;
                panic!("havipd on n{k} exited early ({status}):\n{}", self.node_log(k));
            }
            assert!(Instant::now() < deadline, "havipd on n{k}: no control socket after 20s:\n{}", self.node_log(k));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to node `k`'s havipd, and its exit status (it gets 10 s, then SIGKILL and a panic).
    pub fn stop_node(&mut self, k: usize) -> ExitStatus {
        let mut child = self.node_mut(k).daemon.take().unwrap_or_else(|| panic!("havipd not running on n{k}"));
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        // A stopped (SIGSTOP) daemon cannot act on SIGTERM.
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("havipd on n{k} did not stop within 10s of SIGTERM:\n{}", self.node_log(k));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to node `k`'s havipd (a crash), reaped. Its pins and addresses stay, as after a real crash.
    pub fn kill_node(&mut self, k: usize) {
        let mut child = self.node_mut(k).daemon.take().unwrap_or_else(|| panic!("havipd not running on n{k}"));
        let _ = child.kill();
        let _ = child.wait();
    }

    fn signal_node(&self, k: usize, signal: i32) {
        let pid = self.node_pid(k).unwrap_or_else(|| panic!("havipd not running on n{k}"));
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// SIGSTOP: havipd is frozen (a stalled process: no heartbeats, no lease renewals).
    pub fn pause_node(&self, k: usize) {
        self.signal_node(k, libc::SIGSTOP);
    }

    pub fn resume_node(&self, k: usize) {
        self.signal_node(k, libc::SIGCONT);
    }

    /// Node `k`'s cables: both of its switch ports down (or up). The node's NICs lose
    /// carrier, as when a node drops off the network; their own configuration is untouched.
    pub fn node_links(&self, k: usize, up: bool) {
        let name = &self.node(k).name;
        for port in [format!("{name}a"), format!("{name}b")] {
            run(&self.sw, &["link", "set", &port, if up { "up" } else { "down" }]);
        }
    }

    /// One of node `k`'s cables: the switch port of its NIC `nic` (0: eth0, 1: eth1).
    pub fn node_link(&self, k: usize, nic: usize, up: bool) {
        let port = format!("{}{}", self.node(k).name, ["a", "b"][nic]);
        run(&self.sw, &["link", "set", &port, if up { "up" } else { "down" }]);
    }

    pub fn node_log(&self, k: usize) -> String {
        std::fs::read_to_string(self.node(k).run_dir.join("havipd.log")).unwrap_or_default()
    }

    /// Runs the `havip` CLI against node `k`.
    pub fn havip(&self, k: usize, args: &[&str]) -> Output {
        let node = self.node(k);
        Command::new(crate::bin("havip")).arg("--pin-path").arg(&node.pin_root).arg("--run-dir").arg(&node.run_dir).args(args).output().expect("running havip")
    }

    /// Node `k`'s Prometheus exposition (`/metrics` on its default address, in its namespace).
    pub fn metrics(&self, k: usize) -> String {
        self.try_metrics(k).unwrap_or_else(|e| panic!("scraping n{k}'s metrics: {e}"))
    }

    /// [`ClusterLab::metrics`], or why it could not be scraped (a node killed or stopped).
    pub fn try_metrics(&self, k: usize) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let ns = self.node(k).ns.name.clone();
        let text = havip_user::kernel::netns::in_netns(&ns, move || -> std::io::Result<String> {
            let addr: std::net::SocketAddr = "127.0.0.1:9469".parse().unwrap();
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            // HTTP/1.0: the answer ends with the connection.
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
        });
        text.expect("entering the node's namespace")
    }

    /// One sample of node `k`'s metrics (`name{labels} value`), if present.
    pub fn metric(&self, k: usize, sample: &str) -> Option<f64> {
        self.metrics(k).lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    // --- faults in a node's namespace (nftables) ---

    /// Installs (or removes) nftables table `table` in node `k`'s namespace. Each fault has
    /// its own table, so faults combine and lift independently.
    fn nft_table(&self, k: usize, table: &str, on: bool, chains: &str) {
        let ns = &self.node(k).ns;
        let _ = ns.exec(&["nft", "delete", "table", "inet", table]);
        if on {
            let script = format!("table inet {table} {{\n{chains}\n}}\n");
            let path = self.node(k).run_dir.join(format!("{table}.nft"));
            std::fs::write(&path, script).unwrap();
            ns.exec(&["nft", "-f", path.to_str().unwrap()]).unwrap_or_else(|e| panic!("nft on n{k}: {e}"));
        }
    }

    /// Node `k` cannot reach etcd (nor etcd it): TCP to and from port 2379 dropped both ways.
    pub fn cut_etcd(&self, k: usize, on: bool) {
        self.nft_table(
            k,
            "havip_cut_etcd",
            on,
            "chain in { type filter hook input priority 0; tcp sport 2379 drop; tcp dport 2379 drop; }\n\
             chain out { type filter hook output priority 0; tcp dport 2379 drop; tcp sport 2379 drop; }",
        );
    }

    /// Node `k` neither sends nor receives heartbeats: UDP port 7947 (either end) dropped both ways.
    pub fn cut_peers(&self, k: usize, on: bool) {
        self.nft_table(
            k,
            "havip_cut_peers",
            on,
            "chain in { type filter hook input priority 0; udp dport 7947 drop; udp sport 7947 drop; }\n\
             chain out { type filter hook output priority 0; udp dport 7947 drop; udp sport 7947 drop; }",
        );
    }

    /// Only node `k`'s outgoing (or only its incoming) heartbeats are lost.
    pub fn one_way_loss(&self, k: usize, outgoing: bool, on: bool) {
        let (table, hook) = if outgoing { ("havip_loss_out", "output") } else { ("havip_loss_in", "input") };
        self.nft_table(k, table, on, &format!("chain c {{ type filter hook {hook} priority 0; udp dport 7947 drop; udp sport 7947 drop; }}"));
    }

    /// Node `k` stops receiving node `from`'s heartbeats (only those: one direction of
    /// one pair), while everything else still flows.
    pub fn drop_heartbeats_from(&self, k: usize, from: usize, on: bool) {
        let srcs = format!("{{ {}, {} }}", node_v4(from, 0), node_v4(from, 1));
        self.nft_table(k, "havip_loss_pair", on, &format!("chain c {{ type filter hook input priority 0; ip saddr {srcs} udp dport 7947 drop; }}"));
    }

    // --- etcd ---

    fn initial_cluster(&self) -> String {
        (0..self.etcd.len()).map(|i| format!("e{i}=http://{}:{ETCD_PEER_PORT}", etcd_v4(i))).collect::<Vec<_>>().join(",")
    }

    /// Starts member `i` in its namespace; `state` is "new" on first start, "existing" on
    /// restarts (same data dir, so it rejoins as itself).
    fn spawn_etcd(&mut self, i: usize, state: &str) {
        let cluster = self.initial_cluster();
        let token = format!("havip-test-{}", self.id);
        let m = &mut self.etcd[i];
        assert!(m.child.is_none(), "etcd member {i} already running");
        std::fs::create_dir_all(m.log.parent().unwrap()).unwrap();
        std::fs::create_dir_all(m.data_dir.parent().unwrap()).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).unwrap();
        let addr = etcd_v4(i);
        let client = format!("http://{addr}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://{addr}:{ETCD_PEER_PORT}");
        let mut cmd = Command::new("ip");
        // `ip netns exec` execs etcd in place: the child's pid is etcd's.
        cmd.args(["netns", "exec", &m.ns.name, "etcd", "--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", state, "--initial-cluster-token", &token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = spawn_tied(cmd).expect("starting etcd");
        m.child = Some(child);
    }

    /// Endpoints of the members whose process runs.
    fn live_endpoints(&self) -> Vec<String> {
        let all = self.etcd_endpoints();
        self.etcd.iter().zip(all).filter(|(m, _)| m.child.is_some()).map(|(_, e)| e).collect()
    }

    /// How slow etcd's disk was: for each running member, its WAL fsyncs and backend
    /// commits slower than 16 and 64 ms, of all, from etcd's own histograms. A timing test
    /// that failed while these were slow failed on the disk, not on havip.
    pub fn etcd_disk_report(&self) -> String {
        let mut out = Vec::new();
        for (i, m) in self.etcd.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let addr: std::net::SocketAddr = format!("{}:{ETCD_CLIENT_PORT}", etcd_v4(i)).parse().unwrap();
            let text = havip_user::kernel::netns::in_netns(&self.client_ns().name, move || -> std::io::Result<String> {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            let Ok(Ok(text)) = text else {
                out.push(format!("{}: metrics not readable", m.name));
                continue;
            };
            let bucket = |name: &str, le: &str| -> u64 {
                let sample = format!("{name}_bucket{{le=\"{le}\"}} ");
                text.lines().find_map(|l| l.strip_prefix(&sample)?.trim().parse::<f64>().ok()).unwrap_or(0.0) as u64
            };
            let slow = |name: &str| {
                let all = bucket(name, "+Inf");
                format!("{} > 16 ms, {} > 64 ms of {all}", all - bucket(name, "0.016"), all - bucket(name, "0.064"))
            };
            out.push(format!(
                "{}: WAL fsyncs {}; backend commits {}",
                m.name,
                slow("etcd_disk_wal_fsync_duration_seconds"),
                slow("etcd_disk_backend_commit_duration_seconds")
            ));
        }
        out.join("\n")
    }

    fn etcd_log_tails(&self) -> String {
        self.etcd.iter().map(|m| format!("--- etcd {} log (end):\n{}", m.name, tail(&std::fs::read_to_string(&m.log).unwrap_or_default(), 30))).collect()
    }

    /// Waits until every running member reports healthy.
    pub fn wait_etcd_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let eps = self.live_endpoints().join(",");
        loop {
            let out = self.etcdctl(&["--endpoints", &eps, "endpoint", "health"]);
            if out.status.success() {
                return;
            }
            for (i, m) in self.etcd.iter().enumerate() {
                if let Some(pid) = m.child.as_ref().map(|c| c.id()) {
                    assert!(Path::new(&format!("/proc/{pid}")).exists(), "etcd member {i} exited:\n{}", self.etcd_log_tails());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd ({eps}) not healthy within {within:?}: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.etcd_log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl` (API v3) from the switch's admin address, against all members unless
    /// `args` names `--endpoints`. Short timeouts: a dead member fails fast.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_in(&self.sw, args)
    }

    /// The ledger of `network` in etcd: address -> the record's whole JSON.
    pub fn ledger(&self, network: &str) -> BTreeMap<String, serde_json::Value> {
        let prefix = format!("{}-manager/alloc/{network}/", self.key_prefix());
        let text = String::from_utf8_lossy(&self.etcdctl(&["get", "--prefix", &prefix]).stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        lines.chunks(2).filter_map(|kv| Some((kv[0].strip_prefix(&prefix)?.to_string(), serde_json::from_str(kv.get(1)?).ok()?))).collect()
    }

    /// The managing node as node `k` sees it: (manager, term, this node manages, writes
    /// refused as deposed).
    pub fn manager_seen(&self, k: usize) -> Option<(String, u64, bool, u64)> {
        let out = self.havip(k, &["cluster", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let m = &v["manager"];
        Some((m["manager"].as_str()?.to_string(), m["term"].as_u64()?, m["this_node"].as_bool()?, m["deposed_writes"].as_u64()?))
    }

    /// Waits until every node in `ks` names the same manager other than `not`; returns it
    /// and its term.
    pub fn wait_manager(&self, ks: &[usize], not: Option<&str>, within: Duration) -> (String, u64) {
        let t = Instant::now();
        loop {
            let seen: Vec<_> = ks.iter().map(|&k| self.manager_seen(k)).collect();
            if let Some(Some((m, term, _, _))) = seen.first() {
                if seen.iter().all(|s| s.as_ref().is_some_and(|s| &s.0 == m && s.1 == *term)) && Some(m.as_str()) != not {
                    return (m.clone(), *term);
                }
            }
            assert!(t.elapsed() < within, "no agreed manager within {within:?}: {seen:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One call of node `k`'s API (its Unix socket): (HTTP status, JSON body).
    pub fn api(&self, k: usize, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        havip_user::api::client::call(self.node_run_dir(k), method, path, body).expect("calling the node's API")
    }

    /// `etcdctl` run inside namespace `ns` (a node's, to see what that node can reach).
    pub fn etcdctl_in(&self, ns: &Netns, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "etcdctl", "--dial-timeout", "1s", "--command-timeout", "2s"]);
        if !args.contains(&"--endpoints") {
            cmd.args(["--endpoints", &self.etcd_endpoints().join(",")]);
        }
        cmd.args(args).env("ETCDCTL_API", "3").output().expect("running etcdctl")
    }

    /// Writes `key` = `value` in etcd, then at once (one shell in the single etcd member's
    /// namespace, a few ms later) cuts node `k` off from etcd on etcd's side. Node `k`'s
    /// last successful read was then sent before the write committed: the tightest case
    /// of the timing bound, which cutting first and writing after (an etcdctl start, tens
    /// of ms) would loosen. `cut_etcd_at_etcd(k, false)` lifts the cut.
    pub fn write_then_cut_etcd(&self, k: usize, key: &str, value: &str) {
        assert_eq!(self.etcd.len(), 1, "write_then_cut_etcd needs a single etcd member");
        let m = &self.etcd[0];
        let nft = self.cut_at_etcd_script(k, m);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &m.ns.name,
                "sh",
                "-c",
                "etcdctl --dial-timeout 1s --command-timeout 2s --endpoints \"$1\" put \"$2\" \"$3\" && nft -f \"$4\"",
                "sh",
            ])
            .args([&self.etcd_endpoints()[0], key, value, nft.to_str().unwrap()])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("running etcdctl and nft");
        assert!(out.status.success(), "write then cut n{k} at etcd: {out:?}");
    }

    /// Lifts (or sets) the cut of [`Self::write_then_cut_etcd`].
    pub fn cut_etcd_at_etcd(&self, k: usize, on: bool) {
        let m = &self.etcd[0];
        let _ = m.ns.exec(&["nft", "delete", "table", "inet", &format!("havip_cut_n{k}")]);
        if on {
            let nft = self.cut_at_etcd_script(k, m);
            m.ns.exec(&["nft", "-f", nft.to_str().unwrap()]).unwrap_or_else(|e| panic!("nft at etcd: {e}"));
        }
    }

    fn cut_at_etcd_script(&self, k: usize, m: &EtcdMember) -> PathBuf {
        let addrs = format!("{{ {}, {} }}", node_v4(k, 0), node_v4(k, 1));
        let script = format!(
            "table inet havip_cut_n{k} {{\nchain in {{ type filter hook input priority 0; ip saddr {addrs} tcp dport 2379 drop; }}\n\
             chain out {{ type filter hook output priority 0; ip daddr {addrs} tcp sport 2379 drop; }}\n}}\n"
        );
        let path = m.log.with_extension(format!("cut-n{k}.nft"));
        std::fs::write(&path, script).unwrap();
        path
    }

    /// SIGKILL to etcd member `i` (a crashed member; the others keep quorum if they can).
    pub fn kill_etcd_member(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed member again with its data: it rejoins as itself.
    pub fn restart_etcd_member(&mut self, i: usize) {
        self.spawn_etcd(i, "existing");
    }

    /// The whole etcd cluster down (`true`: every member SIGKILLed, so clients see their
    /// connections reset and new ones refused, as when etcd crashes or its hosts reboot)
    /// or back (`false`: every member restarted with its data, waited for until healthy).
    /// For a hung etcd that holds connections open without answering, see [`Self::freeze_etcd`].
    pub fn stop_etcd(&mut self, on: bool) {
        if on {
            for i in 0..self.etcd.len() {
                self.kill_etcd_member(i);
            }
        } else {
            for i in 0..self.etcd.len() {
                if self.etcd[i].child.is_none() {
                    self.spawn_etcd(i, "existing");
                }
            }
            self.wait_etcd_healthy(Duration::from_secs(10));
        }
    }

    /// SIGSTOP (or SIGCONT) to every member: etcd hangs, TCP stays up, nothing answers.
    pub fn freeze_etcd(&self, on: bool) {
        for m in &self.etcd {
            if let Some(c) = &m.child {
                unsafe { libc::kill(c.id() as i32, if on { libc::SIGSTOP } else { libc::SIGCONT }) };
            }
        }
    }

    /// The process id of etcd member `i`, while it runs.
    pub fn etcd_pid(&self, i: usize) -> Option<u32> {
        self.etcd[i].child.as_ref().map(|c| c.id())
    }

    /// Index of the member that is raft leader now, per `etcdctl endpoint status` of the
    /// running members. Panics if none is (no quorum).
    pub fn etcd_leader(&self) -> usize {
        self.try_etcd_leader().unwrap_or_else(|e| panic!("no etcd leader: {e}"))
    }

    /// [`Self::etcd_leader`], or why there is none (during an election, without quorum).
    pub fn try_etcd_leader(&self) -> Result<usize, String> {
        let all = self.etcd_endpoints();
        let out = self.etcdctl(&["--endpoints", &self.live_endpoints().join(","), "endpoint", "status", "-w", "json"]);
        let said = || format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // A dead member makes etcdctl fail, but it still prints the others' status.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("etcdctl endpoint status: {e}: {}", said()))?;
        for s in v.as_array().into_iter().flatten() {
            let (id, leader) = (&s["Status"]["header"]["member_id"], &s["Status"]["leader"]);
            if id.as_u64().is_some() && id == leader {
                let ep = s["Endpoint"].as_str().unwrap_or_default();
                return all.iter().position(|e| e == ep).ok_or_else(|| format!("leader endpoint {ep} is not a member"));
            }
        }
        Err(format!("no member says it leads: {}", said()))
    }

    // --- probes ---

    /// An [`EchoResponder`] on `port` in every node (they stop when the returned guards drop).
    pub fn echo_on_all_nodes(&self, port: u16) -> Vec<EchoResponder> {
        self.nodes.iter().map(|n| EchoResponder::start(&n.ns, &n.name, port)).collect()
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut d) = node.daemon.take() {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        if std::thread::panicking() {
            // Decisions first: CI shows only the start of a failure's output, and the
            // question is nearly always which node decided what, when.
            for (k, node) in self.nodes.iter().enumerate() {
                eprintln!("--- decisions of {}:\n{}", node.name, decisions(&self.node_log(k + 1), 40));
            }
            for (k, node) in self.nodes.iter().enumerate() {
                eprintln!("--- havipd log of {} (end):\n{}", node.name, tail(&self.node_log(k + 1), 200));
            }
            eprintln!("--- etcd's disk:\n{}", self.etcd_disk_report());
            eprintln!("{}", self.etcd_log_tails());
        }
        // What `havip down` does for each node: pins, addresses and sysctls havipd left.
        for node in &self.nodes {
            if let Err(e) = havip_user::cli::teardown::down(&node.pin_root, &node.run_dir) {
                eprintln!("teardown of {}: {e:#}", node.name);
            }
            let _ = std::fs::remove_dir_all(&node.pin_root);
        }
        self.peer_xdp.clear();
        let _ = std::fs::remove_dir_all(&self.peer_pins);
        for m in &mut self.etcd {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.run_root);
        let _ = std::fs::remove_dir_all(&self.etcd_root);
        if let Some(parent) = self.run_root.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        // The namespaces (fields) are deleted after this, taking their veths along.
    }
}

/// Where a lab's etcd keeps its data: in memory (`/dev/shm`) where the machine has it, so
/// the timing tests measure havip and not the machine's disk. On the 2-core VM the suite
/// runs on, etcd's WAL fsyncs on disk sometimes took over 64 ms (etcd's own histogram,
/// printed by [`ClusterLab::etcd_disk_report`]), and every etcd write and linearizable read
/// waits for them: fences confirmed only by etcd lapsed, and signs of life went stale.
/// etcd still runs its real code path; only the fsync is fast.
fn etcd_data_root(id: &str, run_root: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(format!("havip-test-{id}"))
    } else {
        run_root.to_path_buf()
    }
}

/// The config of node `k` of `nodes` ([`ClusterLab::node_config`]), from the address plan.
pub fn cluster_config(k: usize, nodes: usize, etcd_endpoints: &[String], key_prefix: &str, vips: &[&str], extra: &str) -> String {
    let quoted = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut s = String::new();
    s += "[node]\nvip_interface = \"lo\"\n[[nic]]\nname = \"eth0\"\n[[nic]]\nname = \"eth1\"\n";
    s += &format!("[cluster]\nnode = \"n{k}\"\netcd_endpoints = [{}]\nkey_prefix = {key_prefix:?}\n", quoted(etcd_endpoints));
    s += "heartbeat_interval_ms = 5\nheartbeat_misses = 8\nlease_ms = 40\ngiveback_hold_down_ms = 30000\n";
    for j in (1..=nodes).filter(|&j| j != k) {
        s += &format!("[[cluster.peer]]\nname = \"n{j}\"\naddresses = [{}]\n", quoted(&[node_v4(j, 0), node_v4(j, 1)]));
    }
    // VIP i prefers node i+1 (wrapping), then the next ones: the first VIP prefers n1.
    for (i, vip) in vips.iter().enumerate() {
        let order: Vec<String> = (0..nodes).map(|j| format!("n{}", (i + j) % nodes + 1)).collect();
        s += &format!("[[vip]]\naddress = {vip:?}\nnodes = [{}]\n", quoted(&order));
    }
    s += extra;
    s
}

/// Tests that time failovers to tens of milliseconds run beside each other, but never beside
/// a test that loads the machine on purpose (hundreds of concurrent requests on three
/// nodes): on 2 cores that load alone holds threads up for the suspicion time, and the
/// timing test then fails on the machine, not on havip.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by a test whose assertions are tens of milliseconds.
pub fn timing_sensitive() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test that loads the machine: it runs alone among those of its binary that
/// hold [`timing_sensitive`].
pub fn loads_the_machine() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// The last `lines` automatic decisions in a havipd log (ownership, management, moves,
/// stalls).
fn decisions(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().filter(|l| l.contains("ownership:") || l.contains("managing node:") || l.contains("went out late")).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// --- kernel receive timestamps ---

/// Converts the kernel's CLOCK_REALTIME receive stamps (SO_TIMESTAMPNS) to `Instant`s,
/// so capture events and probe answers compare with times the test takes. Stamps taken
/// by the kernel on receipt are what make 1 ms comparisons meaningful on a busy 2-core
/// machine: a reader thread may run late and read several frames at once.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    real: Duration,
}

impl Clock {
    fn now() -> Self {
        Self { instant: Instant::now(), real: SystemTime::now().duration_since(UNIX_EPOCH).unwrap() }
    }

    fn instant(&self, ts: libc::timespec) -> Instant {
        let real = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        match real.checked_sub(self.real) {
            Some(ahead) => self.instant + ahead,
            None => self.instant.checked_sub(self.real - real).unwrap_or(self.instant),
        }
    }
}

fn enable_timestamps(fd: RawFd) {
    let one: libc::c_int = 1;
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, (&raw const one).cast(), 4) };
    assert_eq!(rc, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
}

fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) {
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), 4) };
    assert_eq!(rc, 0, "setsockopt({level}, {name}): {}", std::io::Error::last_os_error());
}

/// What `recvmsg` returned besides the data.
struct Received {
    len: usize,
    /// The kernel's receive time (or the time of reading, without a stamp).
    at: Instant,
    from: libc::sockaddr_storage,
    from_len: libc::socklen_t,
    /// The datagram's destination address (IP_PKTINFO / IPV6_PKTINFO), when asked for.
    dst: Option<IpAddr>,
}

/// One datagram or frame from `fd`, waiting up to 50 ms.
fn recv_msg(fd: RawFd, buf: &mut [u8], clock: &Clock) -> Option<Received> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
        return None;
    }
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 32];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let mut r = Received { len: n as usize, at: Instant::now(), from, from_len: msg.msg_namelen, dst: None };
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => r.at = clock.instant(std::ptr::read_unaligned(data.cast())),
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let p: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    r.dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let p: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    r.dst = Some(IpAddr::V6(Ipv6Addr::from(p.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some(r)
}

/// Sends `data` to `to` from source address `src` (IP_PKTINFO / IPV6_PKTINFO).
fn send_from(fd: RawFd, data: &[u8], to: &libc::sockaddr_storage, to_len: libc::socklen_t, src: IpAddr) {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut control = [0u64; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (to as *const libc::sockaddr_storage) as *mut _;
    msg.msg_namelen = to_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    unsafe {
        let (level, kind, size) = match src {
            IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, size_of::<libc::in_pktinfo>()),
            IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, size_of::<libc::in6_pktinfo>()),
        };
        msg.msg_controllen = libc::CMSG_SPACE(size as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(size as u32) as usize;
        match src {
            IpAddr::V4(a) => {
                let p =
                    libc::in_pktinfo { ipi_ifindex: 0, ipi_spec_dst: libc::in_addr { s_addr: u32::from(a).to_be() }, ipi_addr: libc::in_addr { s_addr: 0 } };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
            }
            IpAddr::V6(a) => {
                let p = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: a.octets() }, ipi6_ifindex: 0 };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
            }
        }
        libc::sendmsg(fd, &msg, 0);
    }
}

/// A UDP socket on the wildcard address and `port` (IPv6: v6 only, so a v4 one can share the port).
fn wildcard_udp(v6: bool, port: u16) -> UdpSocket {
    unsafe {
        let fd = libc::socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let sock = UdpSocket::from_raw_fd(fd);
        let rc = if v6 {
            set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
            let mut a: libc::sockaddr_in6 = std::mem::zeroed();
            a.sin6_family = libc::AF_INET6 as u16;
            a.sin6_port = port.to_be();
            libc::bind(fd, (&raw const a).cast(), size_of::<libc::sockaddr_in6>() as u32)
        } else {
            let mut a: libc::sockaddr_in = std::mem::zeroed();
            a.sin_family = libc::AF_INET as u16;
            a.sin_port = port.to_be();
            libc::bind(fd, (&raw const a).cast(), size_of::<libc::sockaddr_in>() as u32)
        };
        assert_eq!(rc, 0, "binding UDP port {port}: {}", std::io::Error::last_os_error());
        sock
    }
}

// --- probe stream ---

/// A UDP echo service on a node, IPv4 and IPv6, on the wildcard address: it answers
/// whatever VIP the node holds right now. A wildcard socket's replies would leave from the
/// route's source address, so each reply is sent from the address the request was sent to
/// (IP_PKTINFO): the VIP. The reply is the request's sequence number followed by the
/// node's name.
pub struct EchoResponder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoResponder {
    pub fn start(ns: &Netns, node: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for v6 in [false, true] {
            let sock = in_netns(&ns.name, move || wildcard_udp(v6, port)).unwrap();
            let fd = sock.as_raw_fd();
            if v6 {
                set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1);
            } else {
                set_int_opt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
            }
            let (stop, node) = (stop.clone(), node.to_string());
            threads.push(std::thread::spawn(move || {
                let clock = Clock::now();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Some(r) = recv_msg(sock.as_raw_fd(), &mut buf, &clock) else { continue };
                    let (Some(dst), true) = (r.dst, r.len >= 8) else { continue };
                    let mut reply = buf[..8].to_vec();
                    reply.extend_from_slice(node.as_bytes());
                    send_from(sock.as_raw_fd(), &reply, &r.from, r.from_len, dst);
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for EchoResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One answered probe, as the client saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub seq: u64,
    /// Kernel receive time at the client.
    pub at: Instant,
    pub node: String,
}

/// A stretch without answers between two answered probes.
#[derive(Debug, Clone)]
pub struct Gap {
    /// When the last answer before the gap arrived.
    pub start: Instant,
    pub len: Duration,
    /// Who answered before and after it.
    pub before: String,
    pub after: String,
}

#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub started: Instant,
    pub stopped: Instant,
    pub sent: u64,
    /// Distinct probes answered.
    pub answered: u64,
    /// Answers to probes already answered (a datagram delivered twice).
    pub duplicates: u64,
    /// Longest time between two consecutive answers, by client receive time. It includes
    /// stalls of the client and of the echo responders (a probe answered late), not only
    /// outages of the VIP; [`ProbeReport::longest_loss`] counts only probes never answered.
    pub longest_gap: Duration,
    /// Longest run of probes never answered, as send time from the first of them to the
    /// next probe that was answered: how long the VIP dropped traffic. A stalled client
    /// sends nothing and a stalled responder answers late, so neither shows here.
    pub longest_loss: Duration,
    /// Gaps over [`ProbeReport::GAP_THRESHOLD`], in order.
    pub gaps: Vec<Gap>,
    /// Distinct probes answered per node.
    pub answered_by: BTreeMap<String, u64>,
    /// Longest time between two sends: when this is large, the client itself stalled.
    pub longest_send_gap: Duration,
    /// Every answer, in order of arrival.
    pub answers: Vec<Answer>,
}

/// Longest stretch of send time covered by consecutive unanswered probes (`sent_at[seq]`
/// is when probe `seq` left). Probes still unanswered at the end count up to `end`.
fn longest_loss(sent_at: &[Instant], answered: &HashSet<u64>, end: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    let mut first_lost: Option<Instant> = None;
    for (seq, at) in sent_at.iter().enumerate() {
        if answered.contains(&(seq as u64)) {
            if let Some(f) = first_lost.take() {
                longest = longest.max(at.saturating_duration_since(f));
            }
        } else if first_lost.is_none() {
            first_lost = Some(*at);
        }
    }
    if let Some(f) = first_lost {
        longest = longest.max(end.saturating_duration_since(f));
    }
    longest
}

impl ProbeReport {
    pub const GAP_THRESHOLD: Duration = Duration::from_millis(20);

    /// Gaps between consecutive answers longer than `threshold`.
    pub fn gaps_over(&self, threshold: Duration) -> Vec<Gap> {
        self.answers
            .windows(2)
            .filter_map(|w| {
                let len = w[1].at.saturating_duration_since(w[0].at);
                (len > threshold).then(|| Gap { start: w[0].at, len, before: w[0].node.clone(), after: w[1].node.clone() })
            })
            .collect()
    }

    /// Time from the last answer to the end of the stream (the gap still open at the end).
    pub fn tail_gap(&self) -> Duration {
        self.stopped.saturating_duration_since(self.answers.last().map_or(self.started, |a| a.at))
    }

    /// Which node answered the answers received in `[from, to)`.
    pub fn answered_between(&self, from: Instant, to: Instant) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for a in self.answers.iter().filter(|a| a.at >= from && a.at < to) {
            *m.entry(a.node.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// Sequence-numbered UDP datagrams from the client to `vip:port`, one every `every`,
/// answered by the nodes' [`EchoResponder`]s.
pub struct ProbeStream {
    /// Separate flags: the receiver keeps reading a while after the last send.
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    started: Instant,
    sender: Option<JoinHandle<(Duration, Vec<Instant>)>>,
    receiver: Option<JoinHandle<Vec<Answer>>>,
    live: Arc<Mutex<LiveProbe>>,
}

/// The stream as it runs, for a live display.
#[derive(Debug, Clone, Default)]
pub struct LiveProbe {
    /// Answers so far (duplicates included).
    pub answered: u64,
    /// Who answered last, and when.
    pub last_node: String,
    pub last_at: Option<Instant>,
    /// Longest time between two answers since the last [`ProbeStream::live`] call.
    pub longest_gap: Duration,
}

impl ProbeStream {
    pub fn start(client_ns: &Netns, vip: &str, port: u16, every: Duration) -> Self {
        let to: SocketAddr = SocketAddr::new(vip.parse().expect("VIP address"), port);
        let sock = in_netns(&client_ns.name, move || {
            let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            s.connect(to).unwrap();
            s
        })
        .unwrap();
        enable_timestamps(sock.as_raw_fd());
        let (stop_send, stop_recv) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let sent = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let rx = sock.try_clone().unwrap();
        let stop = stop_recv.clone();
        let live = Arc::new(Mutex::new(LiveProbe::default()));
        let live_rx = live.clone();
        let receiver = std::thread::spawn(move || {
            let clock = Clock::now();
            let mut buf = [0u8; 2048];
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Errors (ICMP port unreachable while no one answers) are just no answer.
                if let Some(r) = recv_msg(rx.as_raw_fd(), &mut buf, &clock) {
                    if r.len >= 8 {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        let node = String::from_utf8_lossy(&buf[8..r.len]).into_owned();
                        {
                            let mut l = live_rx.lock().unwrap();
                            if let Some(prev) = l.last_at {
                                l.longest_gap = l.longest_gap.max(r.at.saturating_duration_since(prev));
                            }
                            l.answered += 1;
                            l.last_at = Some(r.at);
                            l.last_node.clone_from(&node);
                        }
                        answers.push(Answer { seq, at: r.at, node });
                    }
                }
            }
            answers
        });
        let (stop, sent_tx) = (stop_send.clone(), sent.clone());
        let sender = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut sent_at = Vec::new();
            let mut last: Option<Instant> = None;
            let mut next = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send(&seq.to_be_bytes());
                let now = Instant::now();
                sent_at.push(now);
                if let Some(l) = last {
                    longest = longest.max(now - l);
                }
                last = Some(now);
                seq += 1;
                sent_tx.store(seq, Ordering::Relaxed);
                // A fixed schedule; after a stall, resume from now rather than burst.
                next = (next + every).max(now);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (longest, sent_at)
        });
        Self { stop_send, stop_recv, sent, started, sender: Some(sender), receiver: Some(receiver), live }
    }

    /// The stream so far; starts a new window for [`LiveProbe::longest_gap`]. A stream
    /// without answers now shows its current silence as the gap.
    pub fn live(&self) -> LiveProbe {
        let mut l = self.live.lock().unwrap();
        let mut out = l.clone();
        if let Some(at) = l.last_at {
            out.longest_gap = out.longest_gap.max(Instant::now().saturating_duration_since(at));
        }
        l.longest_gap = Duration::ZERO;
        out
    }

    /// Probes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, waits 100 ms for late answers, and reports.
    pub fn stop(mut self) -> ProbeReport {
        self.stop_send.store(true, Ordering::Relaxed);
        let stopped = Instant::now();
        let (longest_send_gap, sent_at) = self.sender.take().unwrap().join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        self.stop_recv.store(true, Ordering::Relaxed);
        let answers = self.receiver.take().unwrap().join().unwrap();
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        let mut duplicates = 0;
        let mut answered_by = BTreeMap::new();
        for a in answers {
            if seen.insert(a.seq) {
                *answered_by.entry(a.node.clone()).or_insert(0) += 1;
                unique.push(a);
            } else {
                duplicates += 1;
            }
        }
        let mut report = ProbeReport {
            started: self.started,
            stopped,
            sent: self.sent(),
            answered: unique.len() as u64,
            duplicates,
            longest_gap: Duration::ZERO,
            longest_loss: Duration::ZERO,
            gaps: Vec::new(),
            answered_by,
            longest_send_gap,
            answers: unique,
        };
        report.longest_gap = report.answers.windows(2).map(|w| w[1].at.saturating_duration_since(w[0].at)).max().unwrap_or_default();
        report.longest_loss = longest_loss(&sent_at, &seen, stopped.max(sent_at.last().copied().unwrap_or(stopped)));
        report.gaps = report.gaps_over(ProbeReport::GAP_THRESHOLD);
        report
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        self.stop_send.store(true, Ordering::Relaxed);
        self.stop_recv.store(true, Ordering::Relaxed);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
    }
}

// --- who claims which address: the two-owner checker ---

/// What kind of claim a frame makes. Every kind makes a client that hears it map the
/// address to the MAC; announcements are the ones a node sends on its own when it takes
/// an address over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighKind {
    /// ARP reply to a request.
    ArpReply,
    /// ARP request whose sender is the address (a node asking for someone, from the VIP).
    ArpRequest,
    /// Gratuitous ARP: a request for its own address, or a broadcast reply.
    GratuitousArp,
    /// Solicited neighbour advertisement.
    Na,
    /// Unsolicited neighbour advertisement (an announcement).
    UnsolicitedNa,
    /// Neighbour solicitation from the address, with a source link-layer address.
    Ns,
}

impl NeighKind {
    /// Is this an announcement: a node saying on its own that it holds the address now?
    pub fn announcement(self) -> bool {
        matches!(self, NeighKind::GratuitousArp | NeighKind::UnsolicitedNa)
    }
}

/// One frame seen by the client that maps `ip` to `mac`.
#[derive(Debug, Clone)]
pub struct NeighEvent {
    /// Kernel receive time at the client.
    pub at: Instant,
    /// The link-layer address claimed (ARP sender hardware address, NA target / NS source
    /// link-layer option; else the Ethernet source).
    pub mac: String,
    pub ip: IpAddr,
    pub kind: NeighKind,
}

/// Parses an incoming frame into a claim, if it is one.
pub fn parse_neigh(frame: &[u8], at: Instant) -> Option<NeighEvent> {
    let eth_src = || mac_str(&frame[6..12]);
    if frame.len() >= 42 && frame[12..14] == [8, 6] && frame[14..22] == [0, 1, 8, 0, 6, 4, 0, frame[21]] {
        let spa = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
        if spa.is_unspecified() {
            return None; // an ARP probe claims nothing
        }
        let kind = match frame[21] {
            1 if frame[28..32] == frame[38..42] => NeighKind::GratuitousArp,
            1 => NeighKind::ArpRequest,
            2 if frame[0..6] == [0xff; 6] => NeighKind::GratuitousArp,
            2 => NeighKind::ArpReply,
            _ => return None,
        };
        return Some(NeighEvent { at, mac: mac_str(&frame[22..28]), ip: IpAddr::V4(spa), kind });
    }
    // IPv6 with ICMPv6 directly after the fixed header (how NDP is sent).
    if frame.len() >= 78 && frame[12..14] == [0x86, 0xdd] && frame[20] == 58 {
        let option_mac = |first: usize, want: u8| {
            let mut o = first;
            while o + 8 <= frame.len() && frame[o + 1] != 0 {
                if frame[o] == want && frame[o + 1] == 1 {
                    return Some(mac_str(&frame[o + 2..o + 8]));
                }
                o += frame[o + 1] as usize * 8;
            }
            None
        };
        let bytes16 = |o: usize| -> [u8; 16] { frame[o..o + 16].try_into().unwrap() };
        return match frame[54] {
            136 => {
                let kind = if frame[58] & 0x40 != 0 { NeighKind::Na } else { NeighKind::UnsolicitedNa };
                let ip = IpAddr::V6(Ipv6Addr::from(bytes16(62)));
                Some(NeighEvent { at, mac: option_mac(78, 2).unwrap_or_else(eth_src), ip, kind })
            }
            135 => {
                let src = Ipv6Addr::from(bytes16(22));
                let mac = option_mac(78, 1)?; // without a source link-layer option it claims nothing
                (!src.is_unspecified()).then_some(NeighEvent { at, mac, ip: IpAddr::V6(src), kind: NeighKind::Ns })
            }
            _ => None,
        };
    }
    None
}

/// Every ARP and NDP claim arriving on a link of the client, with kernel receive times.
pub struct NeighCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<NeighEvent>>>,
}

impl NeighCapture {
    /// Starts capturing on `dev` of `client_ns` (frames the client sends are not recorded).
    pub fn start(client_ns: &Netns, dev: &str) -> Self {
        let dev = dev.to_string();
        let link = in_netns(&client_ns.name, move || RawLink::open(&dev)).unwrap();
        let fd = link.fd().as_raw_fd();
        enable_timestamps(fd);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let clock = Clock::now();
            let mut buf = vec![0u8; 2048];
            let mut events = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Some(r) = recv_msg(fd, &mut buf, &clock) else { continue };
                let ll: libc::sockaddr_ll = unsafe { std::ptr::read_unaligned((&raw const r.from).cast()) };
                if ll.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                events.extend(parse_neigh(&buf[..r.len], r.at));
            }
            drop(link);
            events
        });
        // Let the capture thread reach its first read before the test acts.
        std::thread::sleep(Duration::from_millis(20));
        Self { stop, thread: Some(thread) }
    }

    /// Stops and returns the events in order of arrival.
    pub fn stop(mut self) -> Vec<NeighEvent> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for NeighCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Keeps the client asking who has each VIP (ARP requests, IPv6 neighbour solicitations),
/// every `every`, broadcast from the client's eth0: every node that still answers for a
/// VIP shows up in a [`NeighCapture`], not only the one the client's cache points at.
pub struct ArpAsker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl ArpAsker {
    pub fn start(client_ns: &Netns, vips: &[&str], every: Duration) -> Self {
        let mac = parse_mac(&Topology::mac(client_ns, "eth0"));
        let link = in_netns(&client_ns.name, || RawLink::open("eth0")).unwrap();
        let sender4: Ipv4Addr = CLIENT_V4.parse().unwrap();
        let sender6: Ipv6Addr = CLIENT_V6.parse().unwrap();
        let frames: Vec<Vec<u8>> = vips
            .iter()
            .map(|v| match v.parse::<IpAddr>().expect("VIP address") {
                IpAddr::V4(a) => crate::packets::arp_request_from(mac, sender4.octets(), a.octets()),
                IpAddr::V6(a) => crate::packets::neighbor_solicitation_from(mac, sender6, a, true),
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 0;
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                for f in &frames {
                    let _ = link.try_send(f);
                }
                rounds += 1;
                next = (next + every).max(Instant::now());
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            rounds
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops asking; returns how many rounds of requests went out.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for ArpAsker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one gratuitous ARP for `ip` from `dev` of `ns` (what `arping -U` does): for tests
/// that move an address by hand.
pub fn announce(ns: &Netns, dev: &str, ip: Ipv4Addr) {
    let mac = parse_mac(&Topology::mac(ns, dev));
    let dev = dev.to_string();
    let link = in_netns(&ns.name, move || RawLink::open(&dev)).unwrap();
    link.send(&crate::packets::arp_request_from(mac, ip.octets(), ip.octets()));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// `node` claimed the address after `other` had taken it over (by an announcement, or
    /// by its first claim), without announcing a takeover of its own: the old owner still
    /// answering.
    StaleOwner,
    /// `node` and `other` claimed the address within 1 ms of each other.
    Simultaneous,
}

/// A moment when two nodes claimed one address.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: ViolationKind,
    pub ip: IpAddr,
    /// The offending claim.
    pub at: Instant,
    pub node: String,
    pub mac: String,
    /// The other node, and since when it held the address (StaleOwner) or when it
    /// claimed it last (Simultaneous).
    pub other: String,
    pub other_since: Instant,
}

/// Seconds since midnight UTC of a havipd log line's RFC 3339 stamp (`2026-12-01T05:53:07.324612Z`).
pub fn log_secs(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let (h, m, s) = (t.get(0..2)?.parse::<f64>().ok()?, t.get(3..5)?.parse::<f64>().ok()?, t.get(6..15)?.parse::<f64>().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// How close two nodes' claims for one address may come before they count as simultaneous.
pub const SIMULTANEOUS: Duration = Duration::from_millis(1);

/// How long after opening its fence a node may send its first announcement: its XDP
/// program answers a request at once, while the announcement goes out from a task.
pub const ANNOUNCE_LAG: Duration = Duration::from_millis(5);

/// Whether the claim at `evs[i]` is the start of a takeover by `node` whose announcement
/// follows within [`ANNOUNCE_LAG`], with no claim by any other node in between.
fn announces_next<'a>(evs: &[&'a NeighEvent], i: usize, node: &str, node_of: impl Fn(&'a NeighEvent) -> &'a str) -> bool {
    let at = evs[i].at;
    for e in &evs[i + 1..] {
        if e.at.saturating_duration_since(at) > ANNOUNCE_LAG || node_of(e) != node {
            return false;
        }
        if e.kind.announcement() {
            return true;
        }
    }
    false
}

/// The moments in `events` when two nodes claimed one address. `mac_to_node` maps MACs
/// to node names, so a node's two NICs count as one owner; a MAC not in it counts as an
/// owner of its own.
///
/// Per address, in time order, the owner is whoever took it over last. A node takes over
/// with an announcement (gratuitous ARP, unsolicited NA), or with its first claim ever
/// (a takeover whose announcement was missed), or with a reply its own announcement
/// follows within [`ANNOUNCE_LAG`] with nobody else claiming in between (a request
/// answered the moment its fence opened). Any other claim by a node that is not the
/// owner is a [`ViolationKind::StaleOwner`] moment, with a tolerance of 0: the old owner
/// answering after the new one started. A node that hands an address back announces it,
/// so a give-back is clean. Separately, claims by two nodes within [`SIMULTANEOUS`] of
/// each other are a [`ViolationKind::Simultaneous`] moment.
pub fn two_owner_moments(events: &[NeighEvent], mac_to_node: &HashMap<String, String>) -> Vec<Violation> {
    let mut out = Vec::new();
    walk(events, mac_to_node, |e, node, claim, last_claim| {
        let violation = |kind, other: &str, other_since| Violation {
            kind,
            ip: e.ip,
            at: e.at,
            node: node.to_string(),
            mac: e.mac.clone(),
            other: other.to_string(),
            other_since,
        };
        for (&other, &t) in last_claim {
            if other != node && e.at.saturating_duration_since(t) <= SIMULTANEOUS {
                out.push(violation(ViolationKind::Simultaneous, other, t));
            }
        }
        if let Claim::Stale { owner, since } = claim {
            out.push(violation(ViolationKind::StaleOwner, owner, since));
        }
    });
    out
}

/// For every change of owner in `events` (a takeover, as [`two_owner_moments`] sees one):
/// how long before the new owner's first claim the old owner claimed last. The smallest of
/// these is how close the cluster came to a two-owner moment; a negative margin would be
/// a [`ViolationKind::StaleOwner`] moment instead.
pub fn handoff_separations(events: &[NeighEvent], mac_to_node: &HashMap<String, String>) -> Vec<Duration> {
    let mut out = Vec::new();
    walk(events, mac_to_node, |e, _, claim, _| {
        if let Claim::Takeover { old_owners_last: Some(t) } = claim {
            out.push(e.at.saturating_duration_since(t));
        }
    });
    out
}

/// One claim, as the owner tracking of [`two_owner_moments`] sees it.
enum Claim<'a> {
    /// By the address's owner.
    ByOwner,
    /// By a node that is not the owner and did not take over.
    Stale { owner: &'a str, since: Instant },
    /// A takeover; the previous owner's last claim, if there was one.
    Takeover { old_owners_last: Option<Instant> },
}

/// Per address, in time order: each claim, its node, what it was, and every node's last
/// claim before it.
fn walk<'a>(
    events: &'a [NeighEvent],
    mac_to_node: &'a HashMap<String, String>,
    mut f: impl FnMut(&'a NeighEvent, &'a str, Claim<'a>, &HashMap<&'a str, Instant>),
) {
    let node_of = |e: &'a NeighEvent| mac_to_node.get(&e.mac).map_or(e.mac.as_str(), String::as_str);
    let mut by_ip: BTreeMap<IpAddr, Vec<&NeighEvent>> = BTreeMap::new();
    for e in events {
        by_ip.entry(e.ip).or_default().push(e);
    }
    for evs in by_ip.values_mut() {
        evs.sort_by_key(|e| e.at);
        let mut owner: Option<(&str, Instant)> = None;
        let mut seen: HashSet<&str> = HashSet::new();
        let mut last_claim: HashMap<&str, Instant> = HashMap::new();
        for (i, e) in evs.iter().enumerate() {
            let node = node_of(e);
            let claim = match owner {
                Some((o, _)) if o == node => Claim::ByOwner,
                Some((o, since)) if !e.kind.announcement() && seen.contains(node) && !announces_next(evs, i, node, |e| node_of(e)) => {
                    Claim::Stale { owner: o, since }
                }
                old => {
                    owner = Some((node, e.at));
                    Claim::Takeover { old_owners_last: old.map(|(o, _)| last_claim[o]) }
                }
            };
            f(e, node, claim, &last_claim);
            seen.insert(node);
            last_claim.insert(node, e.at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A1: &str = "02:00:00:00:01:01";
    const A2: &str = "02:00:00:00:01:02";
    const B1: &str = "02:00:00:00:02:01";
    const C1: &str = "02:00:00:00:03:01";
    const V1: &str = "198.18.130.1";
    const V2: &str = "198.18.130.2";

    fn macs() -> HashMap<String, String> {
        [(A1, "n1"), (A2, "n1"), (B1, "n2"), (C1, "n3")].into_iter().map(|(m, n)| (m.to_string(), n.to_string())).collect()
    }

    /// Events from a table of (ms after t0, MAC, address, kind).
    fn table(rows: &[(u64, &str, &str, NeighKind)]) -> Vec<NeighEvent> {
        let t0 = Instant::now();
        rows.iter().map(|&(ms, mac, ip, kind)| NeighEvent { at: t0 + Duration::from_millis(ms), mac: mac.to_string(), ip: ip.parse().unwrap(), kind }).collect()
    }

    use NeighKind::*;

    #[test]
    fn clean_handover() {
        let ev = table(&[
            (0, A1, V1, ArpReply),
            (20, A1, V1, ArpReply),
            (40, A1, V1, ArpReply),
            (55, B1, V1, GratuitousArp),
            (60, B1, V1, ArpReply),
            (80, B1, V1, ArpReply),
        ]);
        assert!(two_owner_moments(&ev, &macs()).is_empty());
    }

    #[test]
    fn old_owner_answers_after_new_one() {
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (25, B1, V1, ArpReply), (40, A1, V1, ArpReply), (45, B1, V1, ArpReply)]);
        let v = two_owner_moments(&ev, &macs());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].kind, v[0].node.as_str(), v[0].other.as_str()), (ViolationKind::StaleOwner, "n1", "n2"));
        assert_eq!(v[0].other_since, ev[1].at);
        // Also without an announcement: the new owner's first reply is its takeover.
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, ArpReply), (40, A1, V1, ArpReply)]);
        let v = two_owner_moments(&ev, &macs());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].node.as_str(), v[0].at), ("n1", ev[2].at));
    }

    #[test]
    fn same_node_two_nics_is_one_owner() {
        let ev = table(&[
            (0, A1, V1, ArpReply),
            (0, A2, V1, ArpReply),
            (20, A2, V1, ArpReply),
            (20, A1, V1, ArpReply),
            (30, A2, V1, GratuitousArp),
            (40, A1, V1, ArpReply),
        ]);
        assert!(two_owner_moments(&ev, &macs()).is_empty());
    }

    #[test]
    fn interleaved_vips_are_separate() {
        let ev = table(&[
            (0, A1, V1, ArpReply),
            (0, B1, V2, ArpReply),
            (10, B1, V2, ArpReply),
            (10, A1, V1, ArpReply),
            (20, A1, V1, ArpReply),
            (20, B1, V2, ArpReply),
        ]);
        assert!(two_owner_moments(&ev, &macs()).is_empty());
    }

    #[test]
    fn two_nodes_within_a_millisecond() {
        let t0 = Instant::now();
        let ev = vec![
            NeighEvent { at: t0, mac: A1.into(), ip: V1.parse().unwrap(), kind: ArpReply },
            NeighEvent { at: t0 + Duration::from_micros(400), mac: B1.into(), ip: V1.parse().unwrap(), kind: GratuitousArp },
        ];
        let v = two_owner_moments(&ev, &macs());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].kind, v[0].node.as_str(), v[0].other.as_str()), (ViolationKind::Simultaneous, "n2", "n1"));
    }

    #[test]
    fn announced_give_back_is_clean_but_a_stale_answer_after_it_is_not() {
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (40, B1, V1, ArpReply), (60, A1, V1, GratuitousArp), (80, A1, V1, ArpReply)]);
        assert!(two_owner_moments(&ev, &macs()).is_empty());
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (60, A1, V1, GratuitousArp), (80, B1, V1, ArpReply)]);
        let v = two_owner_moments(&ev, &macs());
        assert_eq!((v.len(), v[0].node.as_str(), v[0].other.as_str()), (1, "n2", "n1"), "{v:?}");
    }

    #[test]
    fn handoff_separation_is_from_the_old_owners_last_claim() {
        // n1 -> n2 (last n1 claim at 40, n2 announces at 55), n2 -> n1 (last n2 claim at
        // 80, n1 announces at 83); V2 has one owner throughout; a stale n1 answer is no handoff.
        let ev = table(&[
            (0, A1, V1, ArpReply),
            (40, A1, V1, ArpReply),
            (55, B1, V1, GratuitousArp),
            (80, B1, V1, ArpReply),
            (83, A2, V1, GratuitousArp),
            (10, C1, V2, ArpReply),
            (90, C1, V2, ArpReply),
            (95, B1, V1, ArpReply),
        ]);
        let s = handoff_separations(&ev, &macs());
        assert_eq!(s, vec![Duration::from_millis(15), Duration::from_millis(3)]);
    }

    #[test]
    fn a_reply_just_before_the_nodes_own_announcement_starts_its_takeover() {
        // n1 gets the VIP back: its program answers a request the moment its fence opens,
        // 1 ms before its announcement leaves. Not a stale answer...
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (40, B1, V1, ArpReply), (60, A1, V1, ArpReply), (61, A1, V1, GratuitousArp)]);
        assert!(two_owner_moments(&ev, &macs()).is_empty());
        assert_eq!(handoff_separations(&ev, &macs()), vec![Duration::from_millis(20), Duration::from_millis(20)]);
        // ...but it is when n2 claims in between, or the announcement comes too late.
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (60, A1, V1, ArpReply), (61, B1, V1, ArpReply), (62, A1, V1, GratuitousArp)]);
        let v = two_owner_moments(&ev, &macs());
        assert!(v.iter().any(|v| v.kind == ViolationKind::StaleOwner && v.node == "n1"), "{v:?}");
        let ev = table(&[(0, A1, V1, ArpReply), (20, B1, V1, GratuitousArp), (60, A1, V1, ArpReply), (70, A1, V1, GratuitousArp)]);
        let v = two_owner_moments(&ev, &macs());
        assert_eq!((v.len(), v[0].kind, v[0].node.as_str()), (1, ViolationKind::StaleOwner, "n1"), "{v:?}");
    }

    #[test]
    fn unknown_mac_is_an_owner_of_its_own() {
        let ev = table(&[(0, A1, V1, ArpReply), (20, "02:ff:00:00:00:01", V1, ArpReply), (40, A1, V1, ArpReply)]);
        let v = two_owner_moments(&ev, &macs());
        assert_eq!((v.len(), v[0].other.as_str()), (1, "02:ff:00:00:00:01"), "{v:?}");
    }

    #[test]
    fn node_config_text() {
        let text = cluster_config(1, 3, &["http://198.18.30.200:2379".to_string()], "/havip-test-c1x0", &["198.18.130.1"], "");
        let want = r#"[node]
vip_interface = "lo"
[[nic]]
name = "eth0"
[[nic]]
name = "eth1"
[cluster]
node = "n1"
etcd_endpoints = ["http://198.18.30.200:2379"]
key_prefix = "/havip-test-c1x0"
heartbeat_interval_ms = 5
heartbeat_misses = 8
lease_ms = 40
giveback_hold_down_ms = 30000
[[cluster.peer]]
name = "n2"
addresses = ["198.18.30.21", "198.18.30.22"]
[[cluster.peer]]
name = "n3"
addresses = ["198.18.30.31", "198.18.30.32"]
[[vip]]
address = "198.18.130.1"
nodes = ["n1", "n2", "n3"]
"#;
        assert_eq!(text, want);
    }

    #[test]
    fn parses_arp_and_ndp_claims() {
        let t = Instant::now();
        let mac = [2, 0, 0, 0, 1, 1];
        let garp = crate::packets::arp_request_from(mac, [198, 18, 130, 1], [198, 18, 130, 1]);
        let e = parse_neigh(&garp, t).unwrap();
        assert_eq!((e.kind, e.mac.as_str(), e.ip), (GratuitousArp, A1, V1.parse().unwrap()));
        let req = crate::packets::arp_request_from(mac, [198, 18, 30, 11], [198, 18, 30, 100]);
        assert_eq!(parse_neigh(&req, t).unwrap().kind, ArpRequest);
        let mut reply = req.clone();
        reply[0..6].copy_from_slice(&[2, 0, 0, 0, 9, 9]);
        reply[21] = 2;
        assert_eq!(parse_neigh(&reply, t).unwrap().kind, ArpReply);
        let probe = crate::packets::arp_request_from(mac, [0; 4], [198, 18, 130, 1]);
        assert!(parse_neigh(&probe, t).is_none());
        let ns = crate::packets::neighbor_solicitation_from(mac, "2001:db8:130::1".parse().unwrap(), "2001:db8:30::100".parse().unwrap(), true);
        let e = parse_neigh(&ns, t).unwrap();
        assert_eq!((e.kind, e.mac.as_str()), (Ns, A1));
        // An NA: the NS turned around (type 136, flags, target, option 2).
        let mut na = ns.clone();
        na[54] = 136;
        na[58] = 0x20; // override only: unsolicited
        na[62..78].copy_from_slice(&"2001:db8:130::1".parse::<Ipv6Addr>().unwrap().octets());
        na[78] = 2;
        let e = parse_neigh(&na, t).unwrap();
        assert_eq!((e.kind, e.mac.as_str(), e.ip), (UnsolicitedNa, A1, "2001:db8:130::1".parse().unwrap()));
    }

    #[test]
    fn longest_loss_counts_only_probes_never_answered() {
        let t0 = Instant::now();
        let sent: Vec<Instant> = (0..10u64).map(|i| t0 + Duration::from_millis(2 * i)).collect();
        let end = t0 + Duration::from_millis(20);
        let answered = |seqs: &[u64]| seqs.iter().copied().collect::<HashSet<u64>>();
        // Every probe answered (however late): no loss.
        assert_eq!(longest_loss(&sent, &answered(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), end), Duration::ZERO);
        // 3, 4, 5 lost: from the send of 3 to the send of 6.
        assert_eq!(longest_loss(&sent, &answered(&[0, 1, 2, 6, 7, 8, 9]), end), Duration::from_millis(6));
        // The longer of two runs; a run still open at the end counts up to the end.
        assert_eq!(longest_loss(&sent, &answered(&[0, 2, 3, 4, 5]), end), end - sent[6]);
    }
}
