//! A node under test in network namespaces, with havipd running in it:
//!
//! ```text
//!  client ns               router ns                 server ns (havipd, instances)
//!  eth0 198.18.2.2 ---- c0 198.18.2.1 | s0 198.18.1.1 ---- eth0 198.18.1.2   VIPs on lo
//!       2001:db8:2::2       2001:db8:2::1 | 2001:db8:1::1       2001:db8:1::2
//! ```
//!
//! veth never computes checksums: a partial checksum crosses it and is trusted by the
//! receiver, so a wrong one would go unnoticed. The router's veths have TX checksum offload
//! off, so the kernel computes every checksum in software from what the server's programs
//! left in the packet, and both ends have RX offload off, so every checksum is verified
//! (`InCsumErrors` counts the failures).

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use havip_user::{
    kernel::netns::{enter, veth_pair, Netns},
    node::state::State,
};

pub const VIP1_V4: &str = "198.18.100.1";
pub const VIP2_V4: &str = "198.18.100.2";
pub const VIP1_V6: &str = "2001:db8:100::1";
pub const VIP2_V6: &str = "2001:db8:100::2";

pub struct Topology {
    pub srv: Netns,
    pub rtr: Netns,
    pub cli: Netns,
    pub pin_root: PathBuf,
    pub run_dir: PathBuf,
    pub config_path: PathBuf,
    daemon: Option<Child>,
    /// Pass-through XDP programs on switch ports (kept loaded for the topology's life).
    peer_xdp: Vec<aya::Ebpf>,
}

/// The file havipd reads its armed fault points from (`HAVIP_FAULTS`, see
/// `havip_user::faults`); every daemon a topology starts gets it.
pub fn fault_file(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("faults")
}

impl Topology {
    /// Three fresh namespaces (server, middle, client) and this node's pin and run
    /// directories; nothing connected yet.
    fn namespaces(middle: &str) -> Self {
        crate::require_root();
        let id = crate::unique("");
        let run_dir = PathBuf::from(format!("/run/havip-test/{id}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        Self {
            srv: Netns::create(&format!("hv-srv{id}")).unwrap(),
            rtr: Netns::create(&format!("hv-{middle}{id}")).unwrap(),
            cli: Netns::create(&format!("hv-cli{id}")).unwrap(),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/havip-test{id}")),
            config_path: run_dir.join("havip.toml"),
            run_dir,
            daemon: None,
            peer_xdp: Vec::new(),
        }
    }

    /// Server and client namespaces (and an unused middle one), nothing connected: for
    /// tests that wire their own links.
    pub fn bare() -> Self {
        Self::namespaces("mid")
    }

    /// Builds the namespaces; havipd is not started yet.
    #[allow(clippy::new_without_default, reason = "creates namespaces: not a default value")]
    pub fn new() -> Self {
        let t = Self::namespaces("rtr");
        veth_pair(&t.srv, "eth0", &t.rtr, "s0").unwrap();
        veth_pair(&t.cli, "eth0", &t.rtr, "c0").unwrap();
        let cmds: [(&Netns, &[&str]); 14] = [
            (&t.srv, &["addr", "add", "198.18.1.2/24", "dev", "eth0"]),
            (&t.srv, &["addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad"]),
            (&t.srv, &["route", "add", "default", "via", "198.18.1.1"]),
            (&t.srv, &["-6", "route", "add", "default", "via", "2001:db8:1::1"]),
            (&t.rtr, &["addr", "add", "198.18.1.1/24", "dev", "s0"]),
            (&t.rtr, &["addr", "add", "2001:db8:1::1/64", "dev", "s0", "nodad"]),
            (&t.rtr, &["addr", "add", "198.18.2.1/24", "dev", "c0"]),
            (&t.rtr, &["addr", "add", "2001:db8:2::1/64", "dev", "c0", "nodad"]),
            (&t.rtr, &["route", "add", "198.18.100.0/24", "via", "198.18.1.2"]),
            (&t.rtr, &["-6", "route", "add", "2001:db8:100::/64", "via", "2001:db8:1::2"]),
            (&t.cli, &["addr", "add", "198.18.2.2/24", "dev", "eth0"]),
            (&t.cli, &["addr", "add", "2001:db8:2::2/64", "dev", "eth0", "nodad"]),
            (&t.cli, &["route", "add", "default", "via", "198.18.2.1"]),
            (&t.cli, &["-6", "route", "add", "default", "via", "2001:db8:2::1"]),
        ];
        for (ns, args) in cmds {
            ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
        }
        t.rtr.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]).unwrap();
        for (ns, dev, what) in [(&t.rtr, "s0", "tx"), (&t.rtr, "c0", "tx"), (&t.srv, "eth0", "rx"), (&t.cli, "eth0", "rx")] {
            ns.exec(&["ethtool", "-K", dev, what, "off"]).unwrap_or_else(|e| panic!("{e}"));
        }
        t
    }

    /// A server with two NICs on one Ethernet segment with the client (a bridge in the
    /// middle namespace, `rtr`):
    ///
    /// ```text
    ///  server a0 198.18.20.1 ──┐
    ///  server b0 198.18.20.2 ──┤ br0 (ports sa, sb, sc) ── client eth0 198.18.20.100
    /// ```
    ///
    /// VIPs in 198.18.20.0/24 and 2001:db8:20::/64 are on-link for the client, so it
    /// resolves them with ARP/NDP: the steering under test.
    pub fn switched() -> Self {
        let t = Self::namespaces("sw");
        t.rtr.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        t.rtr.ip(&["link", "set", "br0", "up"]).unwrap();
        veth_pair(&t.srv, "a0", &t.rtr, "sa").unwrap();
        veth_pair(&t.srv, "b0", &t.rtr, "sb").unwrap();
        veth_pair(&t.cli, "eth0", &t.rtr, "sc").unwrap();
        for port in ["sa", "sb", "sc"] {
            t.rtr.ip(&["link", "set", port, "master", "br0"]).unwrap();
        }
        // A frame a veth sends with XDP_TX lands in its peer's XDP ring, which only an XDP
        // program on the peer drains: give the server NICs' peers a pass-through one.
        let mut t = t;
        let peer_pins = t.peer_pin_dir();
        for port in ["sa", "sb"] {
            t.peer_xdp.push(havip_user::cli::lab::pass_through_xdp(&t.rtr.name, port, &peer_pins).unwrap());
        }
        let cmds: [(&Netns, &[&str]); 6] = [
            (&t.srv, &["addr", "add", "198.18.20.1/24", "dev", "a0"]),
            (&t.srv, &["addr", "add", "2001:db8:20::1/64", "dev", "a0", "nodad"]),
            (&t.srv, &["addr", "add", "198.18.20.2/24", "dev", "b0"]),
            (&t.srv, &["addr", "add", "2001:db8:20::2/64", "dev", "b0", "nodad"]),
            (&t.cli, &["addr", "add", "198.18.20.100/24", "dev", "eth0"]),
            (&t.cli, &["addr", "add", "2001:db8:20::100/64", "dev", "eth0", "nodad"]),
        ];
        for (ns, args) in cmds {
            ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
        }
        t
    }

    /// bpffs directory for the maps of the switch ports' pass-through programs.
    fn peer_pin_dir(&self) -> PathBuf {
        let mut p = self.pin_root.clone().into_os_string();
        p.push("-peers");
        PathBuf::from(p)
    }

    /// Writes the whole config file.
    pub fn write_config_raw(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// A link's MAC in namespace `ns`.
    pub fn mac(ns: &Netns, dev: &str) -> String {
        let out = ns.ip(&["-br", "link", "show", "dev", dev]).unwrap();
        out.split_whitespace().nth(2).unwrap_or_default().to_string()
    }

    /// The client's neighbour entry for `ip`: its MAC, if it has one.
    pub fn client_neighbour(&self, ip: &str) -> Option<String> {
        let out = self.cli.ip(&["neigh", "show", ip]).unwrap();
        let mut f = out.split_whitespace();
        while let Some(w) = f.next() {
            if w == "lladdr" {
                return f.next().map(str::to_string);
            }
        }
        None
    }

    /// The config for this node: `[[nic]] eth0` plus `body` (VIPs, services).
    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config_path, format!("[node]\nvip_interface = \"lo\"\n\n[[nic]]\nname = \"eth0\"\n\n{body}")).unwrap();
    }

    /// Starts havipd and waits until it has applied its configuration.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with(|_| {});
    }

    /// [`Self::start_daemon`] with `adjust` applied to havipd's command first (to set its
    /// umask, for example).
    pub fn start_daemon_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        assert!(self.daemon.is_none(), "havipd already started");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.run_dir.join("havipd.log")).unwrap();
        let mut cmd = Command::new(crate::bin("havipd"));
        adjust(&mut cmd);
        let child = cmd
            .arg("--netns")
            .arg(&self.srv.name)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--pin-path")
            .arg(&self.pin_root)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .env("HAVIP_FAULTS", fault_file(&self.run_dir))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting havipd");
        let pid = child.id();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = State::load(&self.run_dir) {
                if s.pid == Some(pid) && s.last_apply.is_some() {
                    return;
                }
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("havipd exited early ({status}):\n{}", self.daemon_log());
            }
            assert!(Instant::now() < deadline, "havipd not ready after 20s:\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs havipd for this node in the foreground (as `start_daemon` would start it) and
    /// returns how it ended: for starts that must be refused.
    pub fn havipd_once(&self) -> Output {
        Command::new(crate::bin("havipd"))
            .args(["--netns", &self.srv.name, "--config", self.config_path.to_str().unwrap()])
            .args(["--pin-path", self.pin_root.to_str().unwrap(), "--run-dir", self.run_dir.to_str().unwrap()])
            .output()
            .expect("running havipd")
    }

    /// Stops havipd with `signal` (SIGTERM: orderly; SIGKILL: a crash) and reaps it.
    pub fn stop_daemon(&mut self, signal: i32) {
        let mut child = self.daemon.take().expect("havipd not running");
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap();
    }

    /// Arms fault point `name` in the running havipd: it fails once, the next time it is
    /// reached (see `havip_user::faults`).
    pub fn arm_fault(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(fault_file(&self.run_dir)).unwrap();
        writeln!(f, "{name}").unwrap();
    }

    /// Whether every armed fault has fired.
    pub fn faults_fired(&self) -> bool {
        std::fs::read_to_string(fault_file(&self.run_dir)).unwrap_or_default().trim().is_empty()
    }

    /// havipd's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Connects a new server NIC `nic` to the bridge of a `switched` topology through
    /// switch port `port`, with the pass-through program the port needs (see `switched`).
    pub fn plug_switched(&mut self, nic: &str, port: &str) {
        veth_pair(&self.srv, nic, &self.rtr, port).unwrap();
        self.rtr.ip(&["link", "set", port, "master", "br0"]).unwrap();
        let peer_pins = self.peer_pin_dir();
        self.peer_xdp.push(havip_user::cli::lab::pass_through_xdp(&self.rtr.name, port, &peer_pins).unwrap());
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("havipd.log")).unwrap_or_default()
    }

    /// Runs the `havip` CLI against this node.
    pub fn havip(&self, args: &[&str]) -> Output {
        Command::new(crate::bin("havip")).arg("--pin-path").arg(&self.pin_root).arg("--run-dir").arg(&self.run_dir).args(args).output().expect("running havip")
    }

    /// `havip stats --json`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.havip(&["stats", "--json"]);
        assert!(out.status.success(), "havip stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// One VIP's entry of `havip stats --json`.
    pub fn vip_stats(&self, vip: &str) -> serde_json::Value {
        let s = self.stats();
        s["vips"].as_array().unwrap().iter().find(|v| v["vip"] == vip).unwrap_or_else(|| panic!("{vip} not in stats: {s}")).clone()
    }

    /// A counter of /proc/net/snmp in namespace `ns` (e.g. "Tcp", "InCsumErrors").
    pub fn snmp(ns: &Netns, proto: &str, field: &str) -> u64 {
        let text = ns.exec(&["cat", "/proc/net/snmp", "/proc/net/snmp6"]).unwrap();
        // snmp: header line and value line per protocol; snmp6: "Udp6InCsumErrors  0".
        let lines: Vec<&str> = text.lines().collect();
        for w in lines.windows(2) {
            let (h, v) = (w[0], w[1]);
            if h.starts_with(&format!("{proto}:")) && v.starts_with(&format!("{proto}:")) {
                let names: Vec<&str> = h.split_whitespace().collect();
                let vals: Vec<&str> = v.split_whitespace().collect();
                if let Some(i) = names.iter().position(|n| *n == field) {
                    return vals[i].parse().unwrap();
                }
            }
        }
        for l in &lines {
            let mut f = l.split_whitespace();
            if f.next() == Some(&format!("{proto}{field}")) {
                return f.next().unwrap().parse().unwrap();
            }
        }
        panic!("{proto} {field} not in /proc/net/snmp of {}", ns.name)
    }

    /// Checksum failures seen by the server's and the client's stacks (TCP, UDP, both families).
    pub fn checksum_errors(&self) -> u64 {
        let mut n = 0;
        for ns in [&self.srv, &self.cli] {
            n += Self::snmp(ns, "Tcp", "InCsumErrors") + Self::snmp(ns, "Udp", "InCsumErrors") + Self::snmp(ns, "Udp6", "InCsumErrors");
        }
        n
    }

    /// (link id, program id) of the pinned ingress (XDP or TC) and egress links on eth0.
    pub fn links(&self) -> Vec<(u32, u32)> {
        use aya::programs::links::{FdLink, PinnedLink};
        let pins = havip_user::kernel::pins::PinLayout::new(&self.pin_root);
        havip_user::kernel::pins::Hook::ALL
            .into_iter()
            .filter(|hook| pins.link("eth0", *hook).exists())
            .map(|hook| {
                let link = FdLink::from(PinnedLink::from_pin(pins.link("eth0", hook)).expect("link pinned"));
                let info = link.info().unwrap();
                (info.id(), info.program_id())
            })
            .collect()
    }

    /// Addresses on the server's loopback (where VIPs live).
    pub fn server_lo_addresses(&self) -> String {
        self.srv.ip(&["addr", "show", "dev", "lo"]).unwrap()
    }

    /// Is an ingress program (XDP or TC) attached to the server's eth0?
    pub fn ingress_attached(&self) -> bool {
        ingress_hook_on(&self.srv, "eth0").is_some()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if std::thread::panicking() {
            eprintln!("havipd log:\n{}", self.daemon_log());
        }
        if let Err(e) = havip_user::cli::teardown::down(&self.pin_root, &self.run_dir) {
            eprintln!("teardown: {e:#}");
        }
        self.peer_xdp.clear();
        let _ = std::fs::remove_dir_all(self.peer_pin_dir());
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if let Some(parent) = self.run_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Spawns `f` on a thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        enter(&name).unwrap();
        f()
    })
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Which ingress hook has a program on `nic` in `ns`, as the kernel reports it:
/// `xdp-native`, `xdp-generic`, `tc` (a TCX ingress program), or `None`.
pub fn ingress_hook_on(ns: &Netns, nic: &str) -> Option<&'static str> {
    let link = ns.ip(&["-d", "link", "show", "dev", nic]).ok()?;
    if link.contains("xdpgeneric") {
        return Some("xdp-generic");
    }
    if link.contains("prog/xdp") {
        return Some("xdp-native");
    }
    let nic = nic.to_string();
    let tc = havip_user::kernel::netns::in_netns(&ns.name, move || {
        aya::programs::SchedClassifier::query_tcx(&nic, aya::programs::TcAttachType::Ingress).map(|(_, progs)| progs.len()).unwrap_or(0)
    })
    .unwrap_or(0);
    (tc > 0).then_some("tc")
}
