//! A self-contained lab: a server namespace with two NICs (a0, b0) on a bridge with a
//! client, havipd serving two instances of one service behind two VIPs per family, and a
//! failure schedule that takes the owning NIC down and up again, so VIPs are seen steered
//! and failed over live while a long-lived connection keeps running. Ctrl-C (or
//! --duration) ends it and removes every namespace, pin and process it made.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;

use crate::{
    kernel::netns::{enter, veth_pair, Netns},
    kernel::pins::PinLayout,
    observe::stats::{render_table, Snapshot},
};

#[derive(Debug, Clone, Args)]
pub struct LabOptions {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds between stats refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub every: f64,
    /// Seconds between NIC failures (0: never fail a NIC).
    #[arg(long, default_value_t = 12.0)]
    pub fail_every: f64,
}

const SRV: &str = "havip-lab-srv";
const SW: &str = "havip-lab-sw";
const CLI: &str = "havip-lab-cli";
const PIN: &str = "/sys/fs/bpf/havip-lab";
const PEER_PIN: &str = "/sys/fs/bpf/havip-lab-peers";
const RUN: &str = "/run/havip-lab";

/// (instance name, its VIPs, its own port)
const INSTANCES: [(&str, [&str; 2], u16); 2] = [("A", ["198.18.20.10", "2001:db8:20::10"], 8081), ("B", ["198.18.20.11", "2001:db8:20::11"], 8082)];

fn lab_config() -> String {
    let mut s = String::from(
        "# Written by `havip lab`.\n[node]\nvip_interface = \"lo\"\n\n[passive]\ntcp = true\n\n[failover]\nannounce_count = 3\nannounce_interval_ms = 100\nfailback_hold_down_ms = 3000\n\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n\n",
    );
    for (_, vips, _) in INSTANCES {
        for v in vips {
            // The client is the peer that matters: its path through each NIC is probed.
            let target = if v.contains(':') { "2001:db8:20::100" } else { "198.18.20.100" };
            s.push_str(&format!("[[vip]]\naddress = \"{v}\"\nnics = [\"a0\", \"b0\"]\ntargets = [\"{target}\"]\n\n"));
        }
    }
    s.push_str("[[service]]\nname = \"web\"\nport = 80\nprotocols = [\"tcp\"]\n");
    for (_, vips, port) in INSTANCES {
        for v in vips {
            s.push_str(&format!("[[service.instance]]\nvip = \"{v}\"\nport = {port}\n"));
        }
    }
    s
}

/// A sibling binary of the running one (havipd next to havip).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.parent().context("no parent dir")?.join(name);
    if !path.exists() {
        bail!("{} not found next to {}; build with `cargo xtask build`", name, me.display());
    }
    Ok(path)
}

/// Attaches a pass-through XDP program (native mode) to `dev` in namespace `ns`, its maps
/// pinned under `pins`. A frame a veth sends with XDP_TX lands in its peer's XDP ring,
/// which only an XDP program on the peer drains: on real NICs this is not needed.
pub fn pass_through_xdp(ns: &str, dev: &str, pins: &Path) -> anyhow::Result<aya::Ebpf> {
    std::fs::create_dir_all(pins)?;
    let (ns, dev, pins) = (ns.to_string(), dev.to_string(), pins.to_path_buf());
    std::thread::spawn(move || -> anyhow::Result<aya::Ebpf> {
        enter(&ns)?;
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&pins).load(crate::kernel::dataplane::ebpf_object()?)?;
        let prog: &mut aya::programs::Xdp = ebpf.program_mut(havip_common::maps::PROG_BASELINE).context("program missing")?.try_into()?;
        prog.load()?;
        prog.attach(&dev, aya::programs::XdpMode::Driver)?;
        Ok(ebpf)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

struct LabGuard {
    daemon: Option<Child>,
    peer_xdp: Vec<aya::Ebpf>,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Err(e) = crate::cli::teardown::down(Path::new(PIN), Path::new(RUN)) {
            eprintln!("lab cleanup: {e:#}");
        }
        self.peer_xdp.clear();
        let _ = std::fs::remove_dir_all(PEER_PIN);
        let _ = std::fs::remove_dir_all(RUN);
    }
}

/// An instance of the demo service: greets with who it is and where it was reached (after
/// havip's remapping), then echoes.
fn serve_instance(name: &'static str, port: u16, stop: Arc<AtomicBool>, ready: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    enter(SRV)?;
    let l = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    l.set_nonblocking(true)?;
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                let local = s.local_addr()?;
                let local = SocketAddr::new(local.ip().to_canonical(), local.port());
                std::thread::spawn(move || {
                    let _ = writeln!(s, "instance {name} (listening on :{port}), reached at {local}");
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One round of the client: each VIP on port 80, who answered, and which server NIC the
/// client's neighbour entry points at.
fn client_round(macs: &[(String, &'static str)]) -> Vec<String> {
    let neigh = crate::kernel::netns::sh(&["ip", "neigh", "show"]).unwrap_or_default();
    let via = |vip: &str| {
        let line = neigh.lines().find(|l| l.split_whitespace().next() == Some(vip)).unwrap_or("");
        macs.iter().find(|(m, _)| line.contains(m.as_str())).map(|(_, n)| *n).unwrap_or("?")
    };
    let mut lines = Vec::new();
    for (_, vips, _) in INSTANCES {
        for v in vips {
            let addr = SocketAddr::new(v.parse::<IpAddr>().unwrap(), 80);
            let answer = match TcpStream::connect_timeout(&addr, Duration::from_millis(800)) {
                Ok(s) => {
                    let mut reply = String::new();
                    let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
                    let _ = BufReader::new(s).read_line(&mut reply);
                    reply.trim().to_string()
                }
                Err(e) => format!("FAILED: {e}"),
            };
            lines.push(format!("client -> {addr:<24} via {:<3} {answer}", via(v)));
        }
    }
    lines
}

pub fn run(opts: LabOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    // One lab per machine: its namespaces and pins have fixed names.
    if let Some(pid) = crate::node::state::State::load(Path::new(RUN)).ok().flatten().and_then(|s| s.live_pid()) {
        bail!("another havip lab is running (its havipd is pid {pid}); stop it with Ctrl-C first");
    }
    println!("[lab] creating namespaces {SRV} (havipd, NICs a0 and b0), {SW} (bridge) and {CLI} (client)");
    drop(LabGuard { daemon: None, peer_xdp: Vec::new() }); // leftovers of an interrupted lab
    let srv = Netns::create(SRV)?;
    let sw = Netns::create(SW)?;
    let cli = Netns::create(CLI)?;
    sw.ip(&["link", "add", "br0", "type", "bridge"])?;
    sw.ip(&["link", "set", "br0", "up"])?;
    veth_pair(&srv, "a0", &sw, "sa")?;
    veth_pair(&srv, "b0", &sw, "sb")?;
    veth_pair(&cli, "eth0", &sw, "sc")?;
    for port in ["sa", "sb", "sc"] {
        sw.ip(&["link", "set", port, "master", "br0"])?;
    }
    for (ns, args) in [
        (&srv, ["addr", "add", "198.18.20.1/24", "dev", "a0"].as_slice()),
        (&srv, &["addr", "add", "2001:db8:20::1/64", "dev", "a0", "nodad"]),
        (&srv, &["addr", "add", "198.18.20.2/24", "dev", "b0"]),
        (&srv, &["addr", "add", "2001:db8:20::2/64", "dev", "b0", "nodad"]),
        (&cli, &["addr", "add", "198.18.20.100/24", "dev", "eth0"]),
        (&cli, &["addr", "add", "2001:db8:20::100/64", "dev", "eth0", "nodad"]),
    ] {
        ns.ip(args)?;
    }
    let mut guard = LabGuard { daemon: None, peer_xdp: Vec::new() };
    for port in ["sa", "sb"] {
        guard.peer_xdp.push(pass_through_xdp(SW, port, Path::new(PEER_PIN))?);
    }
    let mac =
        |dev: &str| -> anyhow::Result<String> { Ok(srv.ip(&["-br", "link", "show", "dev", dev])?.split_whitespace().nth(2).unwrap_or_default().to_string()) };
    let macs = vec![(mac("a0")?, "a0"), (mac("b0")?, "b0")];

    std::fs::create_dir_all(RUN)?;
    let cfg_path = Path::new(RUN).join("lab.toml");
    std::fs::write(&cfg_path, lab_config())?;
    println!("[lab] starting havipd in {SRV} with {}", cfg_path.display());
    let log = std::fs::File::create(Path::new(RUN).join("havipd.log"))?;
    guard.daemon = Some(
        Command::new(sibling_binary("havipd")?)
            .args(["--netns", SRV, "--config"])
            .arg(&cfg_path)
            .args(["--pin-path", PIN, "--run-dir", RUN])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting havipd")?,
    );
    let pins = PinLayout::new(PIN);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(pins.exists() && crate::node::state::State::load(Path::new(RUN))?.is_some_and(|s| s.last_apply.is_some())) {
        if let Some(status) = guard.daemon.as_mut().unwrap().try_wait()? {
            let log = std::fs::read_to_string(Path::new(RUN).join("havipd.log")).unwrap_or_default();
            bail!("havipd exited ({status}):\n{log}");
        }
        if Instant::now() > deadline {
            bail!("havipd did not come up within 20s; see {RUN}/havipd.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Clients start once both instances listen: a connection racing a bind would be reset.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    for (name, _, port) in INSTANCES {
        let (stop, ready_tx) = (stop.clone(), ready_tx.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve_instance(name, port, stop, ready_tx) {
                eprintln!("[lab] instance {name}: {e:#}");
            }
        });
    }
    for _ in INSTANCES {
        ready.recv_timeout(Duration::from_secs(5)).context("a lab instance did not start listening")?;
    }
    println!("[lab] instances A (:8081) and B (:8082) listen in {SRV}; clients use VIP:80 only");
    println!("[lab] every {}s the NIC owning the VIPs goes down for a while; watch them move", opts.fail_every);
    println!("[lab] live stats every {}s; Ctrl-C stops the lab and removes everything\n", opts.every);

    let client_out = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let (out, stop, macs) = (client_out.clone(), stop.clone(), macs.clone());
        std::thread::spawn(move || {
            if enter(CLI).is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                *out.lock().unwrap() = client_round(&macs);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
    }
    // A long-lived connection across every failover: its byte count keeps growing.
    let (echoed, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    {
        let (echoed, errors, stop) = (echoed.clone(), errors.clone(), stop.clone());
        std::thread::spawn(move || {
            if enter(CLI).is_err() {
                return;
            }
            let addr: SocketAddr = "198.18.20.10:80".parse().unwrap();
            let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut greeting = String::new();
            let _ = r.read_line(&mut greeting);
            let chunk = [0x5au8; 1024];
            while !stop.load(Ordering::Relaxed) {
                let mut back = [0u8; 1024];
                if w.write_all(&chunk).and_then(|_| r.read_exact(&mut back)).is_err() || back != chunk {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                echoed.fetch_add(1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    let started = Instant::now();
    let mut prev: Option<Snapshot> = None;
    let mut next_fail = opts.fail_every;
    let mut restore: Option<(f64, String)> = None;
    let mut events: Vec<String> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = started.elapsed().as_secs_f64();
        if opts.duration.is_some_and(|d| now >= d) {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(opts.every.max(0.2)));
        let now = started.elapsed().as_secs_f64();
        let state = crate::node::state::State::load(Path::new(RUN)).ok().flatten();
        let snap = Snapshot::read(&pins, state.as_ref())?;
        // Failures are injected as carrier loss (the switch port goes down, as when a cable
        // is pulled): the server's NIC stays configured, as it would.
        let port = |nic: &str| if nic == "a0" { "sa" } else { "sb" };
        if let Some((at, nic)) = restore.clone() {
            if now >= at {
                sw.ip(&["link", "set", port(&nic), "up"])?;
                events.push(format!("{now:>6.1}s  {nic} carrier back (its VIPs return after the 3 s hold-down)"));
                restore = None;
            }
        } else if opts.fail_every > 0.0 && now >= next_fail {
            let owner = snap.vips.first().map(|v| v.nic.clone()).unwrap_or_else(|| "a0".into());
            if owner == "a0" || owner == "b0" {
                sw.ip(&["link", "set", port(&owner), "down"])?;
                events.push(format!("{now:>6.1}s  {owner} lost carrier (failure injected): its VIPs move"));
                restore = Some((now + opts.fail_every / 2.0, owner));
            }
            next_fail = now + opts.fail_every;
        }
        println!("── {now:>5.1}s ──────────────────────────────────────────────────────────────");
        for l in client_out.lock().unwrap().iter() {
            println!("{l}");
        }
        println!("long-lived connection to 198.18.20.10:80: {} KiB echoed, {} errors", echoed.load(Ordering::Relaxed) / 1024, errors.load(Ordering::Relaxed));
        for e in events.iter().rev().take(3).rev() {
            println!("event {e}");
        }
        println!();
        print!("{}", render_table(&snap, prev.as_ref()));
        println!();
        prev = Some(snap);
    }
    stop.store(true, Ordering::Relaxed);
    println!("[lab] stopping: havipd, pins under {PIN}, namespaces");
    drop(guard);
    drop(cli);
    drop(sw);
    drop(srv);
    println!("[lab] clean");
    Ok(())
}
