//! `cargo xtask bench`: havip's performance figures, each as a ratio to a baseline measured
//! in the same run, printed as a table and saved as JSON.
//!
//! Per-packet cost (BPF_PROG_RUN, `repeat` runs per call, timed by the thread's CPU time
//! beside the kernel's whole-ns mean): the ingress program on a non-VIP packet, a VIP
//! packet with no mapping, remapped VIP packets, the passive and classed variants, against
//! `havip_baseline` (the same parse, then pass), as extra ns and as a ratio. Each case
//! checks its action and that its path's counter grew by exactly `repeat`. The kernel
//! reuses one buffer for every repetition, so the remapped case maps 80 -> 8081 and
//! 8081 -> 80: every repetition rewrites. Cases are interleaved over several rounds and the
//! median kept, so drift of the machine hits all of them alike.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use clap::Parser;
use havip_common::{maps as m, vip_slot, InlineRemap, Outcome, VipKey, IPPROTO_TCP, IPPROTO_UDP};
use havip_tests::{
    fixture::{Fixture, TWO_VIPS, XDP_PASS},
    packets::{build, L4},
};
use serde::Serialize;

#[global_allocator]
static ALLOC: havip_tests::quality_bench::CountingAlloc = havip_tests::quality_bench::CountingAlloc;

#[derive(Parser)]
#[command(about = "havip benchmarks (run through `cargo xtask bench`)")]
struct Args {
    /// Where to write the JSON figures (the last one given wins, so `cargo xtask bench --
    /// --out FILE` overrides the default).
    #[arg(long, default_value = "target/bench/bench.json", overrides_with = "out")]
    out: PathBuf,
    /// BPF_PROG_RUN repetitions per measurement.
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Failover trials (p50/p99 over them): at least 100, since a p99 of fewer is a maximum.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(100..))]
    failover_trials: u64,
    /// Pool request/release calls per second for the failover-under-API-load section.
    #[arg(long, default_value_t = 1000.0)]
    api_calls_per_sec: f64,
    /// Path-quality trials per kind (link down, dark path, 20 ms, 10% loss): at least 100.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(100..))]
    quality_trials: u64,
    /// Seconds of each path-quality noise run (jitter and loss; probe bursts): both at once.
    #[arg(long, default_value_t = 1800)]
    noise_s: u64,
    /// VIPs of the scrape benchmark's node (its baseline has 1).
    #[arg(long, default_value_t = 10_000)]
    scrape_vips: usize,
    /// Scrapes timed per node (p99 over them).
    #[arg(long, default_value_t = 101)]
    scrape_trials: usize,
    /// Cluster node-failover trials per kind (crash, link cut); each ends with a giveback.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(100..))]
    cluster_trials: u64,
    /// Randomized partition trials (heartbeat cuts, one-way loss, etcd cuts, cable pulls).
    #[arg(long, default_value_t = 1000)]
    partition_trials: usize,
    /// etcd leader kills (3 s each).
    #[arg(long, default_value_t = 5)]
    etcd_leader_kills: usize,
    /// Seconds the whole etcd cluster is stopped.
    #[arg(long, default_value_t = 60)]
    etcd_outage_s: u64,
    /// Rounds of the veth throughput section (each runs every case once, alternating).
    #[arg(long, default_value_t = 5)]
    veth_rounds: usize,
    /// Seconds each veth throughput run is timed (after a 1 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    veth_secs: f64,
    /// Managing-node failover trials (each a SIGKILL of the manager, with a lease-expiry
    /// baseline): at least 100, since a p99 of fewer is a maximum.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(100..))]
    manager_trials: u64,
    /// Trials of the heartbeat encoding section (each times 200 decodes and encodes per
    /// encoding): at least 100, since a p99 of fewer is a maximum.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(100..))]
    heartbeat_trials: u64,
    /// Trials of each read in the confirmation-read section, per record count: at least
    /// 100, since a p99 of fewer is a maximum.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(100..))]
    confirm_trials: u64,
    /// Run only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    PerPacket,
    /// TCP throughput on veth through a remapped VIP, per ingress hook, vs no havip.
    Veth,
    Isolation,
    Failover,
    FailoverApiLoad,
    Rerank,
    PathQuality,
    Scrape,
    Cluster,
    /// The managing node's failover (SIGKILL) against etcd's own lease expiry.
    Manager,
    /// Cluster VIP requests answered from the asked node's spares and through the managing
    /// node, against an etcd read.
    ClusterRequests,
    /// The managing node's planning round for 10,000 VIPs over 32 nodes.
    Planning,
    /// CPU per heartbeat decoded and encoded, binary against JSON, at 32 nodes.
    Heartbeats,
    /// What a node's confirmation read costs etcd, by the number of VIP records, against a
    /// one-key read.
    Confirm,
    /// Only the cluster's randomized partition trials.
    ClusterPartitions,
}

fn print_partitions(p: &havip_tests::cluster_bench::Partitions) {
    println!(
        "partitions: {} trials, {} ARP/ND claims captured, two-owner moments {}, moves {}, probes lost {} of {}",
        p.trials, p.claims_captured, p.two_owner_moments, p.moves, p.probes_lost, p.probes_sent
    );
    let closest: Vec<String> = p.closest_handoffs_ms.iter().map(|ms| format!("{ms:.1}")).collect();
    println!("  {} changes of owner seen by the client; closest (old owner's last claim to new owner's first, ms): {}", p.handoffs, closest.join(", "));
    for m in &p.moments {
        println!("  two-owner moment: {}\n    during {}", m.what, m.trial.as_deref().unwrap_or("no trial"));
        for l in &m.logs {
            println!("      {l}");
        }
    }
}

#[derive(Serialize)]
struct Row {
    case: String,
    program: String,
    /// Kernel-timed mean (whole ns) and CPU-time mean (fractional) per run.
    ns_per_packet: f64,
    cpu_ns_per_packet: f64,
    /// CPU-time ns over the baseline's, and the ratio of the CPU-time means.
    extra_ns: f64,
    ratio_to_baseline: f64,
    samples_cpu_ns: Vec<f64>,
}

#[derive(Serialize)]
struct PerPacket {
    method: String,
    repeat: u32,
    rounds: usize,
    baseline_cpu_ns: f64,
    rows: Vec<Row>,
    /// The passive TCP sampling path, timed as pairs of single runs (see `sampling_pairs`).
    sampling: Sampling,
    target_remap_max_extra_ns: f64,
    target_classed_max_extra_ns: f64,
    remap_worst_extra_ns: f64,
    classed_extra_ns: f64,
    target_met: bool,
    /// The floors (see the `floor of ...` rows): the remapped path without its counters and
    /// the owner's read; the classed path's lookups and CPU-queue helpers alone.
    remap_floor_extra_ns: f64,
    classed_floor_extra_ns: f64,
}

#[derive(Serialize)]
struct Sampling {
    pairs: u32,
    plain_ns_per_pair: f64,
    passive_ns_per_pair: f64,
    extra_ns: f64,
    samples_recorded: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Adds the reverse mapping (instance port -> designated port) on ingress, which config
/// validation would refuse as ambiguous, so that repeated runs rewrite back and forth. It
/// goes inline in the VIP's slot, next to the configured ones, as a mapping of the fast
/// path.
fn add_flip_mappings(fx: &mut Fixture) {
    for vip in ["198.18.100.1", "2001:db8:100::1"] {
        let idx = vip_slot(&VipKey::from(ip(vip)));
        let mut slot = fx.slot(idx);
        let free: Vec<usize> = (0..slot.remap_in.len()).filter(|&i| slot.remap_in[i].proto == 0).collect();
        assert!(free.len() >= 2, "no room for the flip mappings: {slot:?}");
        for (i, proto) in free.into_iter().zip([IPPROTO_TCP, IPPROTO_UDP]) {
            slot.remap_in[i] = InlineRemap { from_be: 8081u16.to_be(), to_be: 80u16.to_be(), proto, _pad: [0; 3] };
        }
        Fixture::write_slot(&mut fx.maps, idx, slot);
    }
}

/// `TWO_VIPS` with the IPv4 VIP in a class that has a CPU queue and an HTB class.
fn classed_vips() -> String {
    TWO_VIPS.replace("[[vip]]\naddress = \"198.18.100.1\"\n", "[[vip]]\naddress = \"198.18.100.1\"\nclass = \"latency\"\n")
        + "[class.latency]\ncpus = [0]\nrate = \"10mbit\"\n"
}

fn fixture(config: &str, passive_tcp: bool) -> Fixture {
    let mut fx = Fixture::new_with(config, passive_tcp);
    add_flip_mappings(&mut fx);
    // The common case: the VIP owned by the NIC the packet arrives on (BPF_PROG_RUN's
    // loopback, ifindex 1).
    for vip in ["198.18.100.1", "2001:db8:100::1"] {
        fx.bind(vip, 1, [2, 0, 0, 0, 0, 1]);
    }
    fx
}

/// Which fixture a per-packet case runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fx {
    Plain,
    Passive,
    Classed,
}

/// A timed case: what it runs, the action it must end with, and the counter its path bumps
/// once per run (read before and after each timing: it must grow by exactly `repeat`, or
/// the case timed another path and the bench fails).
struct Case {
    name: &'static str,
    fx: Fx,
    prog: &'static str,
    pkt: Vec<u8>,
    action: u32,
    counter: Box<dyn Fn(&Fixture) -> u64>,
}

const XDP_REDIRECT: u32 = 4;

fn per_packet(args: &Args) -> PerPacket {
    use havip_common::Direction::Ingress;
    // The remap path with passive TCP measurement off, and the same with it on.
    let mut fx = fixture(TWO_VIPS, false);
    let mut fx_passive = fixture(TWO_VIPS, true);
    let mut fx_class = fixture(&classed_vips(), false);
    let (c4, v4, c6, v6) = (ip("198.18.2.2"), ip("198.18.100.1"), ip("2001:db8:2::2"), ip("2001:db8:100::1"));
    let payload = [0u8; 64];
    let outcome = |o: Outcome| -> Box<dyn Fn(&Fixture) -> u64> { Box::new(move |f: &Fixture| f.outcome(Ingress, o)) };
    let remapped = |vip: &'static str| -> Box<dyn Fn(&Fixture) -> u64> { Box::new(move |f: &Fixture| f.vip(vip).rx.remapped) };
    let tcp4 = build(L4::Tcp, c4, 40000, v4, 80, None, &payload);
    let cases: Vec<Case> = vec![
        Case {
            name: "baseline: parse and pass (TCP/IPv4)",
            fx: Fx::Plain,
            prog: m::PROG_BASELINE,
            pkt: tcp4.clone(),
            action: XDP_PASS,
            counter: outcome(Outcome::VipPassed),
        },
        Case {
            name: "non-VIP destination (TCP/IPv4)",
            fx: Fx::Plain,
            prog: m::PROG_INGRESS,
            pkt: build(L4::Tcp, c4, 40000, ip("198.18.100.9"), 80, None, &payload),
            action: XDP_PASS,
            counter: outcome(Outcome::NotVip),
        },
        Case {
            name: "VIP, port not mapped (TCP/IPv4)",
            fx: Fx::Plain,
            prog: m::PROG_INGRESS,
            pkt: build(L4::Tcp, c4, 40000, v4, 443, None, &payload),
            action: XDP_PASS,
            counter: Box::new(|f: &Fixture| f.vip("198.18.100.1").rx.passed),
        },
        Case { name: "VIP, remapped (TCP/IPv4)", fx: Fx::Plain, prog: m::PROG_INGRESS, pkt: tcp4.clone(), action: XDP_PASS, counter: remapped("198.18.100.1") },
        Case {
            name: "VIP, remapped (UDP/IPv4)",
            fx: Fx::Plain,
            prog: m::PROG_INGRESS,
            pkt: build(L4::Udp, c4, 40000, v4, 80, None, &payload),
            action: XDP_PASS,
            counter: remapped("198.18.100.1"),
        },
        Case {
            name: "VIP, remapped (TCP/IPv6)",
            fx: Fx::Plain,
            prog: m::PROG_INGRESS,
            pkt: build(L4::Tcp, c6, 40000, v6, 80, None, &payload),
            action: XDP_PASS,
            counter: remapped("2001:db8:100::1"),
        },
        Case {
            name: "VIP, remapped (TCP/IPv4) + passive, ACK ends no sample",
            fx: Fx::Passive,
            prog: m::PROG_INGRESS,
            pkt: tcp4.clone(),
            action: XDP_PASS,
            counter: remapped("198.18.100.1"),
        },
        Case {
            name: "floor of the remapped path: VIP + remap, no counters",
            fx: Fx::Plain,
            prog: m::PROG_REMAP_FLOOR,
            pkt: tcp4.clone(),
            action: XDP_PASS,
            counter: outcome(Outcome::VipRemapped),
        },
        Case {
            name: "floor of the classed path: VIP + class + queue helpers",
            fx: Fx::Classed,
            prog: m::PROG_QUEUE_FLOOR,
            pkt: tcp4.clone(),
            action: XDP_REDIRECT,
            counter: outcome(Outcome::VipPassed),
        },
        Case {
            name: "VIP, remapped (TCP/IPv4) + class CPU queue",
            fx: Fx::Classed,
            prog: m::PROG_INGRESS,
            pkt: tcp4.clone(),
            action: XDP_REDIRECT,
            counter: Box::new(|f: &Fixture| f.class_counters("198.18.100.1", "latency").rx_queued),
        },
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut kernel: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..args.rounds {
        eprint!("\r  per-packet cost: round {}/{}", round + 1, args.rounds);
        for (i, c) in cases.iter().enumerate() {
            let f = match c.fx {
                Fx::Plain => &mut fx,
                Fx::Passive => &mut fx_passive,
                Fx::Classed => &mut fx_class,
            };
            let before = (c.counter)(f);
            let (r, wall) = f.timed(c.prog, &c.pkt, args.repeat);
            let grew = (c.counter)(f) - before;
            assert_eq!(r.action, c.action, "{}: took another path (action {})", c.name, r.action);
            assert_eq!(grew, args.repeat as u64, "{}: its counter grew by {grew} in {} runs: another path was timed", c.name, args.repeat);
            if c.fx == Fx::Classed {
                // Exactly one ClassMeta in front of the frame: stored on every run.
                assert_eq!(r.out.len(), c.pkt.len() + 8, "{}: the class metadata was not stored each run", c.name);
            }
            samples[i].push(wall);
            kernel[i].push(r.duration_ns as f64);
        }
    }
    eprintln!();
    let medians: Vec<f64> = samples.iter().map(|s| median(&mut s.clone())).collect();
    let baseline = medians[0];
    let rows: Vec<Row> = cases
        .iter()
        .zip(samples)
        .zip(&medians)
        .zip(kernel)
        .map(|(((c, samples_cpu_ns), &ns), mut k)| Row {
            case: c.name.to_string(),
            program: c.prog.to_string(),
            ns_per_packet: median(&mut k),
            cpu_ns_per_packet: ns,
            extra_ns: ns - baseline,
            ratio_to_baseline: ns / baseline,
            samples_cpu_ns,
        })
        .collect();
    let sampling = sampling_pairs(&mut fx, &mut fx_passive);
    // The targets are the remap path's and the classed path's; passive measurement is an
    // opt-in cost shown beside them.
    let remap_worst = rows.iter().filter(|r| r.case.starts_with("VIP, remapped") && !r.case.contains('+')).map(|r| r.extra_ns).fold(f64::MIN, f64::max);
    let extra = |name: &str| rows.iter().find(|r| r.case.starts_with(name)).map(|r| r.extra_ns).expect("a case of the table");
    let (classed, remap_floor, classed_floor) =
        (extra("VIP, remapped (TCP/IPv4) + class CPU queue"), extra("floor of the remapped path"), extra("floor of the classed path"));
    let (t_remap, t_class) = (10.0, 15.0);
    PerPacket {
        method: "BPF_PROG_RUN, `repeat` runs per call, timed by the thread's CPU time (the kernel's whole-ns mean beside it); median of interleaved rounds"
            .into(),
        repeat: args.repeat,
        rounds: args.rounds,
        baseline_cpu_ns: baseline,
        rows,
        sampling,
        target_remap_max_extra_ns: t_remap,
        target_classed_max_extra_ns: t_class,
        remap_worst_extra_ns: remap_worst,
        classed_extra_ns: classed,
        target_met: remap_worst <= t_remap && classed <= t_class,
        remap_floor_extra_ns: remap_floor,
        classed_floor_extra_ns: classed_floor,
    }
}

/// The passive TCP sampling path: a data segment leaving the VIP starts a sample (TC
/// egress) and the client's ACK of it ends one (XDP ingress). Each changes state the next
/// run of the same packet would find, so they cannot be repeated within one call: they are
/// timed as single runs, alternating, and compared with the same pairs through the plain
/// variant. Each single run's kernel time includes the timer's own cost, the same in both.
fn sampling_pairs(plain: &mut Fixture, passive: &mut Fixture) -> Sampling {
    use etherparse::PacketBuilder;
    const PAIRS: u32 = 20_000;
    let seg = |from_vip: bool, seq: u32, ack: u32, payload: &[u8]| {
        let (src, dst, sp, dp) = if from_vip { ([198, 18, 100, 1], [198, 18, 2, 2], 8081, 40000) } else { ([198, 18, 2, 2], [198, 18, 100, 1], 40000, 80) };
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]).ipv4(src, dst, 64).tcp(sp, dp, seq, 65535).ack(ack).write(&mut out, payload).unwrap();
        out
    };
    let data = seg(true, 1000, 5000, &[7; 100]);
    let ack = seg(false, 5000, 1100, b"");
    let vip_id = passive.maps.vips.get(&VipKey::from(ip("198.18.100.1")), 0).unwrap().id;
    let key = havip_common::PeerKey { peer: VipKey::from(ip("198.18.2.2")), vip_id, nic_index: 0 };
    let samples = |f: &Fixture| f.maps.peer_quality.get(&key, 0).map(|s| s.samples).unwrap_or(0);
    let time = |f: &mut Fixture| -> f64 {
        let mut ns = 0u128;
        for _ in 0..PAIRS {
            ns += f.time(m::PROG_EGRESS, &data, 1).duration_ns + f.time(m::PROG_INGRESS, &ack, 1).duration_ns;
        }
        ns as f64 / PAIRS as f64
    };
    let before = samples(passive);
    let passive_ns = time(passive);
    let recorded = samples(passive) - before;
    assert_eq!(recorded, PAIRS as u64, "passive sampling: {recorded} samples from {PAIRS} data/ACK pairs: another path was timed");
    let plain_ns = time(plain);
    assert_eq!(samples(plain), 0, "the plain variant recorded samples");
    Sampling { pairs: PAIRS, plain_ns_per_pair: plain_ns, passive_ns_per_pair: passive_ns, extra_ns: passive_ns - plain_ns, samples_recorded: recorded }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    havip_tests::require_root();
    let mut report = BTreeMap::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let run = |s: Section| args.only.is_empty() || args.only.contains(&s);

    if run(Section::PerPacket) {
        eprintln!("[bench] ingress per-packet cost ({} rounds x {} runs per case)", args.rounds, args.repeat);
        let pp = per_packet(&args);
        println!("\nIngress XDP per-packet cost (BPF_PROG_RUN, {} runs per call), kernel {kernel}", args.repeat);
        println!("{:<56} {:>9} {:>9} {:>9} {:>8}", "case", "kernel ns", "CPU ns", "extra ns", "x base");
        for r in &pp.rows {
            println!("{:<56} {:>9.0} {:>9.2} {:>9.2} {:>8.2}", r.case, r.ns_per_packet, r.cpu_ns_per_packet, r.extra_ns, r.ratio_to_baseline);
        }
        let sm = &pp.sampling;
        println!(
            "{:<56} {:>9} {:>9.1} {:>9.2} {:>8.2}",
            "passive sampling pair: data out starts, ACK in ends",
            "",
            sm.passive_ns_per_pair,
            sm.extra_ns,
            sm.passive_ns_per_pair / sm.plain_ns_per_pair
        );
        println!(
            "  (pairs of single runs, {} of them, vs the same pairs through the plain variant: {:.1} ns; {} samples recorded)",
            sm.pairs, sm.plain_ns_per_pair, sm.samples_recorded
        );
        println!(
            "target: remapped <= {:.0} ns over the baseline (worst {:.2}), classed <= {:.0} ns ({:.2}): {}",
            pp.target_remap_max_extra_ns,
            pp.remap_worst_extra_ns,
            pp.target_classed_max_extra_ns,
            pp.classed_extra_ns,
            if pp.target_met { "met" } else { "NOT met" }
        );
        println!("(class CPU queue: BPF_PROG_RUN returns XDP_REDIRECT without carrying it out, so this is the program's cost of classifying, counting, storing the class and choosing the queue)");
        println!(
            "floors: the remapped path without counters and the owner's read {:.2} ns (counting and the consistent read add {:.2}); the classed path's lookups and CPU-queue helpers alone {:.2} ns{}",
            pp.remap_floor_extra_ns,
            pp.remap_worst_extra_ns - pp.remap_floor_extra_ns,
            pp.classed_floor_extra_ns,
            if pp.classed_floor_extra_ns > pp.target_classed_max_extra_ns { ", over the classed target before any of havip's own work" } else { "" }
        );
        report.insert("per_packet_ingress", serde_json::to_value(&pp)?);
    }

    if run(Section::Veth) {
        eprintln!("\n[bench] veth throughput ({} rounds, {} s per run, 1 and 8 TCP streams)", args.veth_rounds, args.veth_secs);
        let v = havip_tests::veth_speed::run(args.veth_rounds, args.veth_secs);
        use havip_tests::veth_speed::Case;
        println!("\nTCP through a remapped VIP on veth (client - bridge - server), median of {} rounds; x = ratio to no havip in the same round", v.rounds);
        println!("{:<20} {:<12} {:>12} {:>8} {:>12} {:>8}", "case", "hook", "1 stream", "x", "8 streams", "x");
        for c in &v.cases {
            println!(
                "{:<20} {:<12} {:>8.2} Gb/s {:>8.3} {:>8.2} Gb/s {:>8.3}",
                c.case.name(),
                c.hook.unwrap_or("-"),
                v.median_gbit_s(c.case, 1),
                v.ratio(c.case, 1),
                v.median_gbit_s(c.case, 8),
                v.ratio(c.case, 8)
            );
        }
        let (one, eight) = (v.ratio(Case::Auto, 1), v.ratio(Case::Auto, 8));
        let met = one >= 0.95 && eight >= 0.95;
        println!("target: havip auto >= 0.95x no havip for 1 and 8 streams: {}", if met { "met" } else { "NOT met" });
        let mut json = serde_json::to_value(&v)?;
        json["ratios_to_no_havip"] = serde_json::json!(Case::ALL
            .iter()
            .map(|&c| (c.name().to_string(), serde_json::json!({"one_stream": v.ratio(c, 1), "eight_streams": v.ratio(c, 8)})))
            .collect::<serde_json::Map<_, _>>());
        json["target_min_ratio"] = serde_json::json!(0.95);
        json["target_met"] = serde_json::json!(met);
        report.insert("veth_throughput", json);
    }

    if run(Section::Isolation) {
        eprintln!("\n[bench] class isolation (about 30 s)");
        let iso = havip_tests::isolation::run();
        println!("\nLatency-class p99 round trip behind a 40 Mbit/s bottleneck, idle vs under a bulk download (ms)");
        println!("{:<24} {:>10} {:>12} {:>10} {:>12}", "", "idle p99", "loaded p99", "x idle", "bulk Mbit/s");
        for (name, l) in
            [("no classes, no shaping", iso.without_classes), ("shaped, one class", iso.shaped_one_class), ("shaped, a class each", iso.with_classes)]
        {
            println!("{:<24} {:>10.2} {:>12.2} {:>10.1} {:>12.1}", name, l.idle_p99_ms, l.loaded_p99_ms, l.loaded_p99_ms / l.idle_p99_ms, l.bulk_mbit_s);
        }
        report.insert("class_isolation", serde_json::to_value(&iso)?);
    }

    if run(Section::Failover) {
        eprintln!("\n[bench] failover ({} trials)", args.failover_trials);
        let fo = havip_tests::failover::run(args.failover_trials as usize);
        println!("\nFailover: owning NIC down -> ... (µs, from the SIOCSIFFLAGS call)");
        println!("{:<44} {:>10} {:>10}", "", "p50", "p99");
        println!("{:<44} {:>10.0} {:>10.0}", "link event heard (baseline)", fo.link_event_p50_us, fo.link_event_p99_us);
        println!("{:<44} {:>10.0} {:>10.0}", "VIP rebound in the pinned map", fo.rebind_p50_us, fo.rebind_p99_us);
        println!("{:<44} {:>10.0} {:>10.0}", "first stream byte through the new NIC", fo.first_byte_p50_us, fo.first_byte_p99_us);
        println!(
            "rebind p99 = {:.1}x the link-event p99; target: rebind p99 <= {} ms: {}",
            fo.rebind_p99_ratio_to_link_event,
            fo.target_rebind_p99_ms,
            if fo.target_met { "met" } else { "NOT met" }
        );
        report.insert("failover", serde_json::to_value(&fo)?);
    }

    if run(Section::FailoverApiLoad) {
        let load = havip_tests::failover::Load { apps: 8, calls_per_sec: args.api_calls_per_sec };
        eprintln!(
            "\n[bench] failover under API load ({} trials idle, then {} under {} pool calls/s)",
            args.failover_trials, args.failover_trials, load.calls_per_sec
        );
        let idle = havip_tests::failover::run_with(args.failover_trials as usize, None);
        let loaded = havip_tests::failover::run_with(args.failover_trials as usize, Some(load));
        let l = loaded.api_load.clone().expect("the loaded run reports its load");
        println!("\nFailover under API load: VIP rebound after the owning NIC went down (µs)");
        println!("{:<44} {:>10} {:>10}", "", "p50", "p99");
        println!("{:<44} {:>10.0} {:>10.0}", "no API calls (baseline)", idle.rebind_p50_us, idle.rebind_p99_us);
        println!(
            "{:<44} {:>10.0} {:>10.0}",
            format!("{:.0} pool calls/s ({} granted, {} released)", l.rate(), l.granted, l.released),
            loaded.rebind_p50_us,
            loaded.rebind_p99_us
        );
        let ratio = loaded.rebind_p99_us / idle.rebind_p99_us.max(1.0);
        let load_reached = l.rate() >= 0.9 * load.calls_per_sec;
        println!(
            "rebind p99 under load = {ratio:.1}x idle; target: rebind p99 <= {} ms under {} calls/s: {}",
            loaded.target_rebind_p99_ms,
            load.calls_per_sec,
            if !load_reached {
                format!("NOT measured (the load reached only {:.0} calls/s)", l.rate())
            } else if loaded.target_met {
                "met".into()
            } else {
                "NOT met".into()
            }
        );
        report.insert(
            "failover_api_load",
            serde_json::json!({ "idle": idle, "loaded": loaded, "rebind_p99_ratio_to_idle": ratio, "calls_per_sec_asked": load.calls_per_sec, "load_reached": load_reached }),
        );
    }

    if run(Section::Rerank) {
        eprintln!("\n[bench] controller: ranking 10,000 VIPs over 4 NICs");
        let rr = havip_tests::quality_bench::rerank_cost();
        println!("\nRe-ranking {} VIPs over {} NICs ({} targets each), median of 7 rounds", rr.vips, rr.nics, rr.targets_per_vip);
        println!("{:<44} {:>10.2} ms", "link-state binder round (baseline)", rr.binder_round_ms);
        println!("{:<44} {:>10.2} ms  ({:.1}x)", "quality ranking + binder round", rr.ranking_round_ms, rr.ratio_to_binder_round);
        println!("{:<44} {:>10.2} MB", "peak heap of a ranking round", rr.ranking_peak_heap_mb);
        report.insert("rerank", serde_json::to_value(&rr)?);
    }

    if run(Section::PathQuality) {
        eprintln!(
            "\n[bench] path quality: {} trials each of link down, dark path, 20 ms and 10% loss; two {} s noise runs alongside",
            args.quality_trials, args.noise_s
        );
        let pq = havip_tests::quality_bench::path_quality(args.quality_trials as usize, args.noise_s);
        println!("\nPath quality: impairment on the owning NIC's path -> VIP moved (ms; default settings)");
        println!("{:<44} {:>7} {:>8} {:>8} {:>8} {:>10} {:>12}", "", "trials", "p50", "p99", "max", "p50 x base", "moves by");
        for (m, ratio) in [(&pq.link_down, None), (&pq.dark, Some(pq.dark_p50_ratio_to_link_down)), (&pq.delay_20ms, None), (&pq.loss_10pct, None)] {
            let base = m.reasons.contains_key("link_down");
            let r = ratio.map(|r| format!("{r:.1}")).unwrap_or_else(|| if base { "1 (base)".into() } else { String::new() });
            let reasons: Vec<String> = m.reasons.iter().map(|(k, n)| format!("{k} {n}")).collect();
            println!("{:<44} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10} {:>12}", m.what, m.trials, m.p50_ms, m.p99_ms, m.max_ms, r, reasons.join(", "));
        }
        for n in [&pq.noise, &pq.bursts] {
            println!(
                "{} for {:.0} s: {} moves ({} bursts, {} doubts); {:.1} probes/s per path",
                n.what, n.seconds, n.moves, n.bursts, n.doubts, n.probes_per_s_per_path
            );
            for (k, m) in n.moves_context.iter().enumerate() {
                println!("  move {}: the 3 s before it:", k + 1);
                for l in m {
                    println!("    {l}");
                }
            }
        }
        println!(
            "targets: dark path p99 <= 150 ms; 20 ms and 10% loss p50 <= 1 s, p99 <= 2 s; no move on noise: {}",
            if pq.targets_met { "met" } else { "NOT met" }
        );
        report.insert("path_quality", serde_json::to_value(&pq)?);
    }
    if run(Section::Scrape) {
        eprintln!("\n[bench] stats scrape: {} VIPs against 1 ({} trials each)", args.scrape_vips, args.scrape_trials);
        let sc = havip_tests::scrape::scrape_cost(args.scrape_vips, args.scrape_trials);
        println!("\nOne metrics scrape (Snapshot::read + render), {} trials, interleaved", sc.trials);
        println!("{:<28} {:>9} {:>9} {:>10} {:>10} {:>10} {:>12}", "", "read p50", "read p99", "scrape p50", "scrape p99", "bpf calls", "strace (CLI)");
        for (name, c) in [("1 VIP (baseline)".to_string(), &sc.baseline), (format!("{} VIPs", sc.many.vips), &sc.many)] {
            println!(
                "{:<28} {:>6.2} ms {:>6.2} ms {:>7.2} ms {:>7.2} ms {:>10} {:>12}",
                name, c.read_ms_p50, c.read_ms_p99, c.scrape_ms_p50, c.scrape_ms_p99, c.bpf_calls, c.bpf_calls_strace_cli
            );
        }
        println!(
            "x baseline: read {:.1}x, scrape {:.1}x, bpf calls {:.2}x",
            sc.read_ratio_to_baseline, sc.scrape_ratio_to_baseline, sc.bpf_calls_ratio_to_baseline
        );
        report.insert("scrape", serde_json::to_value(&sc)?);
    }
    if run(Section::Cluster) {
        eprintln!(
            "\n[bench] cluster: {} crash and {} link-cut failovers (each with a giveback), {} partition trials, {} etcd leader kills, a {} s etcd outage (about {} min)",
            args.cluster_trials,
            args.cluster_trials,
            args.partition_trials,
            args.etcd_leader_kills,
            args.etcd_outage_s,
            (args.cluster_trials * 2 * 3 + args.partition_trials as u64 / 2 + args.etcd_leader_kills as u64 * 12 + args.etcd_outage_s * 2) / 60 + 1
        );
        let cb = havip_tests::cluster_bench::run(
            args.cluster_trials as usize,
            args.partition_trials,
            args.etcd_leader_kills,
            std::time::Duration::from_secs(args.etcd_outage_s),
        );
        println!("\nCluster: node failover and giveback, gap in a 2 ms probe stream (ms; 3 nodes, 3 etcd members)");
        println!("{:<48} {:>7} {:>8} {:>8} {:>8} {:>10} {:>10}", "", "trials", "p50", "p99", "max", "p50 x base", "two-owner");
        for (name, k) in [("crash (SIGKILL + cables out)", &cb.crash), ("link cut (cables out)", &cb.link_cut)] {
            println!(
                "{:<48} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10} {:>10}",
                format!("{name}: no fault (baseline)"),
                k.baseline.trials,
                k.baseline.p50_ms,
                k.baseline.p99_ms,
                k.baseline.max_ms,
                "",
                ""
            );
            println!(
                "{:<48} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10.1} {:>10}",
                format!("{name}: failover"),
                k.failover.trials,
                k.failover.p50_ms,
                k.failover.p99_ms,
                k.failover.max_ms,
                k.failover_p50_ratio_to_baseline,
                k.two_owner_moments
            );
            println!(
                "{:<48} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10} {:>10}",
                format!("{name}: giveback"),
                k.giveback.trials,
                k.giveback.p50_ms,
                k.giveback.p99_ms,
                k.giveback.max_ms,
                "",
                ""
            );
        }
        print_partitions(&cb.partitions);
        for e in [&cb.etcd_leader_kill, &cb.etcd_outage] {
            println!(
                "{} ({} x {:.0} s): probes lost {} of {}, moves {}; same window without the fault: lost {}, moves {}",
                e.what, e.trials, e.window_s, e.probes_lost, e.probes_sent, e.moves, e.baseline_probes_lost, e.baseline_moves
            );
        }
        println!(
            "targets: failover p50 <= {} ms and p99 <= {} ms, giveback p99 <= {} ms, no two-owner moment over >= 1000 partition trials, nothing lost or moved across etcd faults: {}",
            cb.target_failover_p50_ms,
            cb.target_failover_p99_ms,
            cb.target_giveback_p99_ms,
            if cb.targets_met { "met" } else { "NOT met" }
        );
        report.insert("cluster", serde_json::to_value(&cb)?);
    }
    if run(Section::Manager) {
        eprintln!("\n[bench] managing node: {} failovers and as many lease expiries (about {} min)", args.manager_trials, args.manager_trials * 4 / 60 + 1);
        let mf = havip_tests::manager_bench::run(args.manager_trials as usize);
        println!("\nManaging node: SIGKILL of the manager -> a survivor reports a new one (ms); baseline: a kept-alive 1 s etcd lease's keeper SIGKILLed -> its key gone");
        println!("{:<34} {:>7} {:>9} {:>9} {:>9}", "", "trials", "p50", "p99", "max");
        for (name, g) in [
            ("lease expiry (baseline)", &mf.lease_expiry_baseline),
            ("manager failover", &mf.failover),
            ("requests through it served again", &mf.requests_served_again),
        ] {
            println!("{:<34} {:>7} {:>9.1} {:>9.1} {:>9.1}", name, g.trials, g.p50_ms, g.p99_ms, g.max_ms);
        }
        println!(
            "ratio to the baseline: p50 {:.2}x, p99 {:.2}x; target: a new manager within 2 s: {}",
            mf.p50_ratio,
            mf.p99_ratio,
            if mf.failover.p99_ms <= 2000.0 { "met" } else { "NOT met" }
        );
        println!(
            "requests through the manager served again: ratio p50 {:.2}x, p99 {:.2}x (a request sent at the kill, granted by the new manager)",
            mf.requests_p50_ratio, mf.requests_p99_ratio
        );
        report.insert("manager_failover", serde_json::to_value(&mf)?);
    }

    if run(Section::ClusterRequests) {
        eprintln!("\n[bench] cluster VIP requests answered from the asked node's spares and through the managing node ({} requests each)", args.manager_trials);
        let sr = havip_tests::manager_bench::run_requests(args.manager_trials as usize);
        println!("\nCluster VIP request answered from local spares (call -> havipd's reply, granted and applied; ms); baseline: one etcd read");
        println!("{:<34} {:>7} {:>9} {:>9} {:>9}", "", "calls", "p50", "p99", "max");
        for (name, g) in [
            ("etcd round trip (baseline)", &sr.etcd_round_trip_baseline),
            ("request from spares", &sr.request),
            ("  of which the ledger (etcd)", &sr.ledger_part),
            ("  of which the local apply", &sr.apply_part),
        ] {
            println!("{:<34} {:>7} {:>9.2} {:>9.2} {:>9.2}", name, g.trials, g.p50_ms, g.p99_ms, g.max_ms);
        }
        println!(
            "{:<34} {:>7} {:>9.2} {:>9.2} {:>9.2}",
            "request through the manager", sr.through_manager.trials, sr.through_manager.p50_ms, sr.through_manager.p99_ms, sr.through_manager.max_ms
        );
        println!(
            "ratio to the baseline: from spares p50 {:.1}x, p99 {:.1}x; target: p99 <= 10 ms: {}",
            sr.p50_ratio,
            sr.p99_ratio,
            if sr.request.p99_ms <= 10.0 { "met" } else { "NOT met" }
        );
        println!(
            "ratio to the baseline: through the manager p50 {:.1}x, p99 {:.1}x; target: p99 <= 100 ms: {}",
            sr.manager_p50_ratio,
            sr.manager_p99_ratio,
            if sr.through_manager.p99_ms <= 100.0 { "met" } else { "NOT met" }
        );
        report.insert("cluster_requests_from_spares", serde_json::to_value(&sr)?);
    }

    if run(Section::Planning) {
        eprintln!(
            "\n[bench] planning rounds: {} VIPs over {} nodes in a real etcd ({} rounds)",
            havip_tests::placement_bench::VIPS,
            havip_tests::placement_bench::NODES,
            args.manager_trials
        );
        let p = havip_tests::placement_bench::run(args.manager_trials as usize);
        println!(
            "\nPlanning round of the managing node: {} VIPs over {} nodes, one just joined (read ledger + reports + owners, plan, write; ms); baseline: one etcd read",
            p.vips, p.nodes
        );
        println!("{:<34} {:>7} {:>9} {:>9} {:>9}", "", "rounds", "p50", "p99", "max");
        for (name, g) in [
            ("etcd round trip (baseline)", &p.etcd_round_trip_baseline),
            ("planning round", &p.round),
            ("  of which reading", &p.read),
            ("  of which planning", &p.plan),
            ("  of which writing", &p.write),
        ] {
            println!("{:<34} {:>7} {:>9.2} {:>9.2} {:>9.2}", name, g.trials, g.p50_ms, g.p99_ms, g.max_ms);
        }
        println!(
            "each round: {} moves (the budget {}) in {} etcd write transaction(s); ratio to the baseline: p50 {:.1}x, p99 {:.1}x; target: a round <= 100 ms: {}",
            p.moves_per_round,
            p.move_budget,
            p.writes_per_round,
            p.p50_ratio,
            p.p99_ratio,
            if p.round.p99_ms <= 100.0 { "met" } else { "NOT met" }
        );
        report.insert("planning", serde_json::to_value(&p)?);
    }

    if run(Section::Heartbeats) {
        eprintln!("\n[bench] heartbeat encodings: {} trials per case", args.heartbeat_trials);
        let h = havip_tests::heartbeat_bench::run(args.heartbeat_trials as usize);
        println!(
            "\nHeartbeats of a {}-node cluster (31 peers' hears and acknowledgements; µs per heartbeat; baseline: JSON, what every version reads)",
            h.nodes
        );
        println!(
            "{:<7} {:<7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>14} {:>9}",
            "serves", "format", "bytes", "decode p50", "decode p99", "encode p50", "encode p99", "decode ratio", "core @32"
        );
        for c in &h.cases {
            for (name, bytes, d, e, share) in [
                ("json", c.json_bytes, &c.json_decode_us, &c.json_encode_us, c.json_core_share),
                ("binary", c.binary_bytes, &c.binary_decode_us, &c.binary_encode_us, c.binary_core_share),
            ] {
                let ratio = if name == "json" { "1.00 / 1.00".to_string() } else { format!("{:.2} / {:.2}", c.decode_ratio.0, c.decode_ratio.1) };
                println!(
                    "{:<7} {:<7} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>14} {:>8.1}%",
                    c.serves,
                    name,
                    bytes,
                    d.p50_ms,
                    d.p99_ms,
                    e.p50_ms,
                    e.p99_ms,
                    ratio,
                    share * 100.0
                );
            }
        }
        println!(
            "core @32: one core's share that decoding takes at {:.0} heartbeats/s (31 peers x 2 paths every 5 ms), from the decode p50",
            h.decodes_per_second
        );
        report.insert("heartbeats", serde_json::to_value(&h)?);
    }

    if run(Section::Confirm) {
        eprintln!("\n[bench] confirmation reads: {} trials per read and record count", args.confirm_trials);
        let c = havip_tests::confirm_bench::run(args.confirm_trials as usize, &[100, 1000, 10_000]);
        println!("\nConfirmation reads against one etcd member (ms per read; baseline: a linearizable read of one key; etcd CPU µs per read)");
        println!(
            "{:>8} {:>12} {:>11} {:>11} {:>10} {:>10} {:>11} {:>10} {:>10} {:>11} {:>11}",
            "records", "one key p50", "cached p50", "cached p99", "ratio p50", "count p50", "full p50", "cpu 1 key", "cpu count", "cpu cached", "nodes/core"
        );
        for k in &c.cases {
            println!(
                "{:>8} {:>12.3} {:>11.3} {:>11.3} {:>10.2} {:>10.3} {:>11.2} {:>10.0} {:>10.0} {:>11.0} {:>11.0}",
                k.records,
                k.baseline_ms.p50_ms,
                k.cached_ms.p50_ms,
                k.cached_ms.p99_ms,
                k.cached_ratio.0,
                k.count_only_ms.p50_ms,
                k.full_ms.p50_ms,
                k.baseline_etcd_cpu_us,
                k.count_only_etcd_cpu_us,
                k.cached_etcd_cpu_us,
                k.nodes_per_etcd_core
            );
        }
        println!("count: the key count alone (etcd's index, no record read); nodes/core: nodes whose confirmation reads (100 a second each) one core of etcd serves, from its CPU per cached read");
        report.insert("confirm", serde_json::to_value(&c)?);
    }

    if args.only.contains(&Section::ClusterPartitions) {
        eprintln!("\n[bench] cluster: {} partition trials", args.partition_trials);
        let p = havip_tests::cluster_bench::run_partitions(args.partition_trials);
        print_partitions(&p);
        report.insert("cluster_partitions", serde_json::to_value(&p)?);
    }
    report.insert("kernel", serde_json::Value::String(kernel));

    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("\nfigures written to {}", args.out.display());
    Ok(())
}
