//! `cargo xtask run` with no config: a three-node havip cluster in network namespaces with
//! its own three-member etcd, a client streaming probes at four configured VIPs and at two
//! VIPs applications request from the cluster (placed by the managing node's rules, from
//! the nodes' spare pools), and a schedule of real failures (a node crash, a node cut off the network, a node cut from its peers only,
//! the etcd leader killed, a stalled havipd). Every second it shows who serves each VIP,
//! the longest silence each client stream saw, and the nodes' health; at the end, every
//! gap and the two-owner check over every ARP/ND claim the client saw. Ctrl-C (or
//! --duration) stops it and removes everything.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use clap::Parser;
use havip_tests::cluster::{two_owner_moments, ArpAsker, ClusterLab, NeighCapture, ProbeStream};

#[derive(Parser)]
#[command(about = "A three-node havip cluster with its own etcd and live failures (run through `cargo xtask run`)")]
struct Args {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between display refreshes.
    #[arg(long, default_value_t = 1.0)]
    every: f64,
    /// Seconds between failures; each lasts half of it (0: no failures).
    #[arg(long, default_value_t = 12.0)]
    fail_every: f64,
    /// Giveback hold-down of the lab's nodes, ms (short, so a recovered node is seen taking
    /// its VIPs back; the default for real nodes is 30000).
    #[arg(long, default_value_t = 5000)]
    hold_down_ms: u64,
}

const VIPS: [&str; 4] = ["198.18.130.1", "198.18.130.2", "198.18.130.3", "2001:db8:130::4"];
const PORT: u16 = 7000;
/// The cluster's network for applications' VIPs, with spare pools on every node.
const APPS: &str = "\n[[cluster.network]]\nname = \"apps\"\nprefix = \"198.18.200.0/24\"\n\
                    [[cluster.network.range]]\nfirst = \"198.18.200.10\"\nlast = \"198.18.200.99\"\n\
                    [cluster.spares]\nnetwork = \"apps\"\nlow = 2\nhigh = 3\n";
/// Applications that ask the cluster for a VIP at the start: (app, node asked, service port).
const REQUESTS: [(&str, usize, u16); 2] = [("shop", 1, 7100), ("blog", 2, 7200)];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// One failure of the schedule: what was done, and how to undo it.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL havipd and pull its cables; undone by plugging them back and starting it.
    Crash(usize),
    /// Both cables out while havipd runs.
    Unplug(usize),
    /// Heartbeats dropped both ways (nftables); etcd still reachable.
    CutPeers(usize),
    /// The etcd raft leader SIGKILLed; undone by restarting it.
    KillEtcdLeader(usize),
    /// SIGSTOP to havipd; undone by SIGCONT.
    Stall(usize),
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::Crash(k) => format!("n{k} crashed: havipd SIGKILLed and its cables pulled"),
            Fault::Unplug(k) => format!("n{k} cut off the network: both cables out, havipd still running"),
            Fault::CutPeers(k) => format!("n{k} cut from its peers only: heartbeats dropped (nftables), etcd reachable"),
            Fault::KillEtcdLeader(i) => format!("etcd leader e{i} SIGKILLed"),
            Fault::Stall(k) => format!("n{k}'s havipd stalled (SIGSTOP)"),
        }
    }

    fn expectation(&self) -> &'static str {
        match self {
            Fault::Crash(_) | Fault::Unplug(_) | Fault::Stall(_) => "its VIPs move to their next candidate within about 100 ms",
            Fault::CutPeers(_) => "it keeps its VIPs: its sign of life in etcd tells the peers it is alive",
            Fault::KillEtcdLeader(_) => "nothing moves, no probe is lost",
        }
    }
}

/// Ownership as the cluster reports it: VIP -> (owner, epoch), from any node that answers.
fn owners(lab: &ClusterLab) -> BTreeMap<String, (String, u64)> {
    for k in 1..=lab.node_count() {
        if lab.node_pid(k).is_none() {
            continue;
        }
        let out = lab.havip(k, &["cluster", "status", "--json"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { continue };
        let mut m = BTreeMap::new();
        for vip in v["vips"].as_array().into_iter().flatten() {
            let (Some(ip), Some(owner)) = (vip["vip"].as_str(), vip["owner"].as_str()) else { continue };
            m.insert(ip.to_string(), (owner.to_string(), vip["epoch"].as_u64().unwrap_or(0)));
        }
        if !m.is_empty() {
            return m;
        }
    }
    BTreeMap::new()
}

/// The spare pools as any node reports them: checked spares and granted VIPs per node.
fn pools(lab: &ClusterLab) -> Option<String> {
    let k = (1..=lab.node_count()).find(|&k| lab.node_pid(k).is_some())?;
    let v: serde_json::Value = serde_json::from_slice(&lab.havip(k, &["cluster", "status", "--json"]).stdout).ok()?;
    let pools = v["manager"]["pools"].as_object()?;
    let parts: Vec<String> = pools
        .iter()
        .map(|(n, l)| {
            let spares = l["spares"].as_array().map_or(0, Vec::len);
            format!("{n} {} spare(s) ({} unchecked), {} granted", spares, l["unchecked"].as_u64().unwrap_or(0), l["granted"].as_u64().unwrap_or(0))
        })
        .collect();
    Some(format!("pools: {}", parts.join("; ")))
}

/// One line per node: havipd's state, which peers it hears, whether etcd answers it, and
/// what it serves.
fn node_lines(lab: &ClusterLab, faults: &[Fault]) -> Vec<String> {
    (1..=lab.node_count())
        .map(|k| {
            let name = lab.node_name(k);
            let fault = faults.iter().find(|f| matches!(f, Fault::Crash(j) | Fault::Unplug(j) | Fault::CutPeers(j) | Fault::Stall(j) if *j == k));
            if lab.node_pid(k).is_none() {
                return format!("{name:<4} havipd down");
            }
            if matches!(fault, Some(Fault::Stall(_))) {
                return format!("{name:<4} havipd stalled (SIGSTOP): answers nothing, its fence runs out");
            }
            let out = lab.havip(k, &["cluster", "status", "--json"]);
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return format!("{name:<4} havipd up, status unavailable");
            };
            let hears: Vec<String> = v["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["alive"].as_bool() == Some(true))
                .map(|p| format!("{}({} µs)", p["name"].as_str().unwrap_or("?"), p["rtt_us"].as_u64().unwrap_or(0)))
                .collect();
            let etcd = match v["etcd_last_ok_ms"].as_u64() {
                Some(ms) if ms < 200 => format!("etcd ok ({} µs)", v["etcd_read_latency_us"].as_u64().unwrap_or(0)),
                Some(ms) => format!("etcd silent {:.1} s", ms as f64 / 1000.0),
                None => "etcd never answered".into(),
            };
            let serving: Vec<&str> = v["vips"].as_array().into_iter().flatten().filter(|x| x["here"] == "serving").filter_map(|x| x["vip"].as_str()).collect();
            // The managing node, as this node sees it (marked when it is this node).
            let manager = match (v["manager"]["manager"].as_str(), v["manager"]["this_node"].as_bool()) {
                (Some(_), Some(true)) => "  MANAGER".to_string(),
                _ => String::new(),
            };
            format!(
                "{name:<4} havipd up   hears [{}]  {etcd:<22} serves [{}]{manager}",
                if hears.is_empty() { "nobody".to_string() } else { hears.join(" ") },
                serving.join(" ")
            )
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    havip_tests::require_root();
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        // `cargo xtask run` (this process's parent) stopped by a signal other than Ctrl-C
        // (SIGTERM, a closed session) would leave the lab's namespaces, etcd members and
        // havipds running: its death stops the lab as Ctrl-C does.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() == 1 {
            STOP.store(true, Ordering::Relaxed);
        }
    }
    println!("[lab] creating the cluster: namespaces for 3 nodes (2 NICs each), 3 etcd members, a switch and a client");
    let mut lab = ClusterLab::new(3, 3);
    lab.set_vips(&VIPS);
    let config = |lab: &ClusterLab, k: usize| {
        lab.node_config(k, &VIPS, APPS).replace("giveback_hold_down_ms = 30000", &format!("giveback_hold_down_ms = {}", args.hold_down_ms))
    };
    for k in 1..=3 {
        println!("[lab] starting havipd on n{k} (log: {})", lab.node_run_dir(k).join("havipd.log").display());
        let c = config(&lab, k);
        lab.start_node_with(k, &c);
    }
    let _echo = lab.echo_on_all_nodes(PORT);
    let capture = NeighCapture::start(lab.client_ns(), "eth0");
    let asker = ArpAsker::start(lab.client_ns(), &VIPS, Duration::from_millis(20));
    let mut vips: Vec<(String, u16)> = VIPS.iter().map(|v| (v.to_string(), PORT)).collect();
    let mut streams: Vec<ProbeStream> = VIPS.iter().map(|v| ProbeStream::start(lab.client_ns(), v, PORT, Duration::from_millis(5))).collect();
    println!("[lab] the client sends a UDP probe to each VIP every 5 ms; whichever node serves it answers with its name");
    let wait = Instant::now();
    while owners(&lab).len() < VIPS.len() && wait.elapsed() < Duration::from_secs(20) && !STOP.load(Ordering::Relaxed) {
        sleep(Duration::from_millis(100));
    }
    // Applications ask the cluster for VIPs (their spares need their wire check first).
    lab.client_ns().ip(&["route", "add", "198.18.200.0/24", "dev", "eth0"])?;
    for (app, k, port) in REQUESTS {
        let body = serde_json::json!({ "app": app, "protocol": "udp", "service_port": port, "instance_port": PORT });
        let wait = Instant::now();
        loop {
            let (status, v) = lab.api(k, "POST", "/v1/vips", Some(body.clone()));
            if status == 201 {
                let vip = v["vip"].as_str().unwrap_or("?").to_string();
                let node = v["node"].as_str().unwrap_or("?");
                let how = match v["how"].as_str() {
                    Some("spare") => format!("one of {node}'s spares"),
                    Some("packed") => "packed into a shared VIP".into(),
                    _ => "generated by the managing node".into(),
                };
                println!(
                    "[lab] application `{app}` asked n{k} for a VIP (port {port} -> {PORT}): {vip} on {node}, {how} ({})",
                    v["why"].as_str().unwrap_or("")
                );
                streams.push(ProbeStream::start(lab.client_ns(), &vip, port, Duration::from_millis(5)));
                vips.push((vip, port));
                break;
            }
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            if wait.elapsed() > Duration::from_secs(20) {
                println!("[lab] application `{app}` got no VIP from n{k}: {v}");
                break;
            }
            sleep(Duration::from_millis(200));
        }
    }
    println!("[lab] VIP i prefers node i (n1, n2, n3, then n1 again); a failure every {} s; Ctrl-C stops the lab\n", args.fail_every);

    let started = Instant::now();
    let mut active: Vec<(Fault, Instant)> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let mut next_fault = args.fail_every;
    let mut round = 0usize;
    let mut window_max: Vec<Duration> = vec![Duration::ZERO; vips.len()];
    while !STOP.load(Ordering::Relaxed) {
        let now = started.elapsed().as_secs_f64();
        if args.duration.is_some_and(|d| now >= d) {
            break;
        }
        sleep(Duration::from_secs_f64(args.every.max(0.2)));
        let now = started.elapsed().as_secs_f64();
        let stamp = |e: &str| format!("{:>6.1}s  {e}", started.elapsed().as_secs_f64());

        // Undo failures whose time is up.
        let half = Duration::from_secs_f64(args.fail_every / 2.0);
        let (done, still): (Vec<_>, Vec<_>) = active.drain(..).partition(|(_, at)| at.elapsed() >= half);
        active = still;
        for (f, _) in done {
            match f {
                Fault::Crash(k) => {
                    lab.node_links(k, true);
                    let c = config(&lab, k);
                    lab.start_node_with(k, &c);
                    events.push(stamp(&format!("n{k} back: cables in, havipd started; it takes its VIPs back after the {} ms hold-down", args.hold_down_ms)));
                }
                Fault::Unplug(k) => {
                    lab.node_links(k, true);
                    events.push(stamp(&format!("n{k} cables back in: it reads etcd, sees it lost its VIPs, stays silent until the giveback")));
                }
                Fault::CutPeers(k) => {
                    lab.cut_peers(k, false);
                    events.push(stamp(&format!("n{k} hears its peers again")));
                }
                Fault::KillEtcdLeader(i) => {
                    lab.restart_etcd_member(i);
                    events.push(stamp(&format!("etcd member e{i} restarted; it rejoins as a follower")));
                }
                Fault::Stall(k) => {
                    lab.resume_node(k);
                    events.push(stamp(&format!("n{k}'s havipd resumed (SIGCONT): its fence has expired, it learns it lost its VIPs")));
                }
            }
        }
        // Inject the next failure, against whoever owns the round's VIP now.
        if args.fail_every > 0.0 && now >= next_fault && active.is_empty() {
            let own = owners(&lab);
            let vip = &vips[round % vips.len()].0;
            let owner = own.get(vip).and_then(|(o, _)| o.strip_prefix('n')?.parse::<usize>().ok()).unwrap_or(1);
            let fault = match round % 5 {
                0 => Fault::Crash(owner),
                1 => Fault::Unplug(owner),
                2 => Fault::CutPeers(owner),
                3 => Fault::KillEtcdLeader(lab.try_etcd_leader().unwrap_or(0)),
                _ => Fault::Stall(owner),
            };
            match fault {
                Fault::Crash(k) => {
                    lab.kill_node(k);
                    lab.node_links(k, false);
                }
                Fault::Unplug(k) => lab.node_links(k, false),
                Fault::CutPeers(k) => lab.cut_peers(k, true),
                Fault::KillEtcdLeader(i) => lab.kill_etcd_member(i),
                Fault::Stall(k) => lab.pause_node(k),
            }
            events.push(stamp(&format!("FAILURE: {}; expected: {}", fault.describe(), fault.expectation())));
            active.push((fault, Instant::now()));
            round += 1;
            next_fault = now + args.fail_every;
        }

        let own = owners(&lab);
        println!("── {now:>6.1}s ─────────────────────────────────────────────────────────────────────");
        println!("{:<18} {:<6} {:>7} {:>9} {:<8} {:>16}", "VIP", "owner", "epoch", "answered", "last by", "longest gap (1s)");
        for (i, ((vip, _), s)) in vips.iter().zip(&streams).enumerate() {
            let live = s.live();
            window_max[i] = window_max[i].max(live.longest_gap);
            let (o, e) = own.get(vip).cloned().unwrap_or_else(|| ("?".into(), 0));
            let gap = live.longest_gap.as_secs_f64() * 1e3;
            let mark = if gap > 20.0 { "  <- failover" } else { "" };
            println!("{:<18} {:<6} {:>7} {:>9} {:<8} {:>13.1} ms{mark}", vip, o, e, live.answered, live.last_node, gap);
        }
        println!();
        for l in node_lines(&lab, &active.iter().map(|(f, _)| *f).collect::<Vec<_>>()) {
            println!("{l}");
        }
        if let Some(p) = pools(&lab) {
            println!("{p}");
        }
        for e in events.iter().rev().take(4).rev() {
            println!("event {e}");
        }
        println!();
    }

    println!("[lab] stopping: final report");
    for (f, _) in active.drain(..) {
        if let Fault::Stall(k) = f {
            lab.resume_node(k);
        }
    }
    asker.stop();
    let claims = capture.stop();
    let two = two_owner_moments(&claims, &lab.mac_to_node());
    println!("{:<18} {:>8} {:>9} {:>12}  gaps over 20 ms (before -> after)", "VIP", "sent", "answered", "longest gap");
    for ((vip, _), s) in vips.iter().zip(streams) {
        let r = s.stop();
        let gaps: Vec<String> =
            r.gaps_over(Duration::from_millis(20)).iter().map(|g| format!("{:.0} ms {}->{}", g.len.as_secs_f64() * 1e3, g.before, g.after)).collect();
        println!("{:<18} {:>8} {:>9} {:>9.1} ms  {}", vip, r.sent, r.answered, r.longest_gap.as_secs_f64() * 1e3, gaps.join(", "));
    }
    println!(
        "{} ARP/ND claims captured at the client; moments two nodes answered for one VIP: {}",
        claims.len(),
        if two.is_empty() { "none".to_string() } else { format!("{} {two:?}", two.len()) }
    );
    if !two.is_empty() {
        // What each node decided, to see how it happened (the logs go with the lab).
        for k in 1..=lab.node_count() {
            println!("--- n{k}'s ownership decisions:");
            for l in lab.node_log(k).lines().filter(|l| l.contains("ownership")) {
                println!("{l}");
            }
        }
    }
    println!("[lab] removing namespaces, etcd data, pins");
    drop(lab);
    println!("[lab] clean");
    if !two.is_empty() {
        anyhow::bail!("two nodes answered for one VIP {} time(s): see the decisions above", two.len());
    }
    Ok(())
}
