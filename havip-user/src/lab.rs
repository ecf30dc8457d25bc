//! A self-contained lab: a server namespace running havipd with two service instances
//! behind two VIPs, and a client namespace reaching both as VIP:80. Live stats print while
//! it runs; Ctrl-C (or --duration) ends it and removes every namespace, pin and process.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;

use crate::{
    netns::{veth_pair, Netns},
    pins::PinLayout,
    stats::{render_table, Snapshot},
};

#[derive(Debug, Clone, Args)]
pub struct LabOptions {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds between stats refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub every: f64,
}

const SRV: &str = "havip-lab-srv";
const CLI: &str = "havip-lab-cli";
const PIN: &str = "/sys/fs/bpf/havip-lab";
const RUN: &str = "/run/havip-lab";

/// (instance name, VIPs it is reached at, its own port)
const INSTANCES: [(&str, [&str; 2], u16); 2] =
    [("A", ["198.18.100.1", "2001:db8:100::1"], 8081), ("B", ["198.18.100.2", "2001:db8:100::2"], 8082)];

fn lab_config() -> String {
    let mut s = String::from(
        "# Written by `havip lab`.\n[node]\nvip_interface = \"lo\"\n\n[[nic]]\nname = \"eth0\"\n\n",
    );
    for (_, vips, _) in INSTANCES {
        for v in vips {
            s.push_str(&format!("[[vip]]\naddress = \"{v}\"\n\n"));
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

struct LabGuard {
    daemon: Option<Child>,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Err(e) = crate::teardown::down(Path::new(PIN), Path::new(RUN)) {
            eprintln!("lab cleanup: {e:#}");
        }
    }
}

/// An instance of the demo service: answers each connection with who it is and the
/// address it was reached at (after havip's remapping).
fn serve_instance(name: &'static str, port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    crate::netns::enter(SRV)?;
    let l = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    l.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, peer)) => {
                let local = s.local_addr()?;
                let (local, peer) = (SocketAddr::new(local.ip().to_canonical(), local.port()), SocketAddr::new(peer.ip().to_canonical(), peer.port()));
                let _ = writeln!(s, "instance {name} (listening on :{port}) reached at {local} by {peer}");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn client_round() -> Vec<String> {
    let mut lines = Vec::new();
    for (_, vips, _) in INSTANCES {
        for v in vips {
            let addr = SocketAddr::new(v.parse::<IpAddr>().unwrap(), 80);
            let line = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => {
                    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    let mut reply = String::new();
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let _ = BufReader::new(s).read_line(&mut reply);
                    format!("client -> {peer:<22} {}", reply.trim())
                }
                Err(e) => format!("client -> {addr:<22} FAILED: {e}"),
            };
            lines.push(line);
        }
    }
    lines
}

pub fn run(opts: LabOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    println!("[lab] creating namespaces {SRV} (server, havipd) and {CLI} (client)");
    // Leftovers of an interrupted lab go first.
    drop(LabGuard { daemon: None });
    let srv = Netns::create(SRV)?;
    let cli = Netns::create(CLI)?;
    veth_pair(&srv, "eth0", &cli, "eth0")?;
    srv.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    srv.ip(&["addr", "add", "2001:db8:0:1::1/64", "dev", "eth0", "nodad"])?;
    cli.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])?;
    cli.ip(&["addr", "add", "2001:db8:0:1::2/64", "dev", "eth0", "nodad"])?;
    cli.ip(&["route", "add", "198.18.100.0/24", "via", "198.18.0.1"])?;
    cli.ip(&["-6", "route", "add", "2001:db8:100::/64", "via", "2001:db8:0:1::1"])?;

    std::fs::create_dir_all(RUN)?;
    let cfg_path = Path::new(RUN).join("lab.toml");
    std::fs::write(&cfg_path, lab_config())?;
    println!("[lab] starting havipd in {SRV} with {}", cfg_path.display());
    let log = std::fs::File::create(Path::new(RUN).join("havipd.log"))?;
    let daemon = Command::new(sibling_binary("havipd")?)
        .args(["--netns", SRV, "--config"])
        .arg(&cfg_path)
        .args(["--pin-path", PIN, "--run-dir", RUN])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting havipd")?;
    let mut guard = LabGuard { daemon: Some(daemon) };

    let pins = PinLayout::new(PIN);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(pins.exists() && crate::state::State::load(Path::new(RUN))?.is_some_and(|s| s.last_apply.is_some())) {
        if let Some(status) = guard.daemon.as_mut().unwrap().try_wait()? {
            let log = std::fs::read_to_string(Path::new(RUN).join("havipd.log")).unwrap_or_default();
            bail!("havipd exited ({status}):\n{log}");
        }
        if Instant::now() > deadline {
            bail!("havipd did not come up within 20s; see {RUN}/havipd.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    for (name, _, port) in INSTANCES {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_instance(name, port, stop) {
                eprintln!("[lab] instance {name}: {e:#}");
            }
        });
    }
    println!("[lab] instances A (:8081) and B (:8082) listen in {SRV}; clients use VIP:80 only");
    println!("[lab] live stats every {}s; Ctrl-C stops the lab and removes everything\n", opts.every);

    let client_out = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let out = client_out.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            if crate::netns::enter(CLI).is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                let lines = client_round();
                *out.lock().unwrap() = lines;
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }

    let started = Instant::now();
    let mut prev: Option<Snapshot> = None;
    while !stop.load(Ordering::Relaxed) {
        if opts.duration.is_some_and(|d| started.elapsed().as_secs_f64() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(opts.every.max(0.2)));
        let snap = Snapshot::read(&pins, crate::state::State::load(Path::new(RUN)).ok().flatten().as_ref())?;
        println!("── {:>5.1}s ────────────────────────────────────────────────────────────", started.elapsed().as_secs_f64());
        for l in client_out.lock().unwrap().iter() {
            println!("{l}");
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
    drop(srv);
    println!("[lab] clean");
    Ok(())
}
