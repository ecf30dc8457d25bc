//! `havip cluster status|vips|nodes|pools`: the cluster as this node sees it, from
//! havipd's API.

use clap::Subcommand;

use crate::{
    cli::{operator::refusal, Locations},
    cluster::status::Status,
};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes (alive, heartbeat RTT and loss per path), etcd, and each VIP's owner, epoch
    /// and the lease left on this node's fence.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Every node's spare VIPs and granted ones, as the managing node's ledger in etcd holds
    /// them (with `[cluster.spares]`).
    Pools {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Each cluster VIP (configured or granted): owner, epoch, this node's state, lease left.
    Vips {
        #[arg(long)]
        json: bool,
    },
    /// The nodes: the managing node, and each peer's health, heartbeat RTT and loss per path.
    Nodes {
        #[arg(long)]
        json: bool,
    },
}

/// Which part of the status a command prints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    All,
    Pools,
    Vips,
    Nodes,
}

pub fn run(loc: &Locations, cmd: ClusterCommand) -> anyhow::Result<()> {
    let (json, part) = match cmd {
        ClusterCommand::Status { json } => (json, Part::All),
        ClusterCommand::Pools { json } => (json, Part::Pools),
        ClusterCommand::Vips { json } => (json, Part::Vips),
        ClusterCommand::Nodes { json } => (json, Part::Nodes),
    };
    let (status, v) = crate::api::client::call(&loc.run_dir, "GET", "/v1/cluster", None)?;
    if !(200..300).contains(&status) {
        let why = v.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| v.to_string());
        anyhow::bail!("{}", refusal(status, &why));
    }
    let s: Status = serde_json::from_value(v.clone())?;
    let (text, part_json) = match part {
        Part::All => (render(&s), v),
        Part::Pools => (render_pools(&s), serde_json::to_value(&s.manager.pools)?),
        Part::Vips => (render_vips(&s), serde_json::to_value(&s.vips)?),
        Part::Nodes => (render_nodes(&s), serde_json::json!({ "node": s.node, "manager": s.manager.manager, "term": s.manager.term, "peers": s.peers })),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&part_json)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

fn render_pools(s: &Status) -> String {
    let mut out = String::new();
    if s.manager.pools.is_empty() {
        return "no spare pools: configure [cluster.spares] (network, low, high)\n".into();
    }
    out += &format!("{:<12} {:>7} {:>10} {:>8} {:>10}  {}\n", "NODE", "SPARES", "UNCHECKED", "GRANTED", "CONFLICTS", "SPARE VIPS");
    for (node, l) in &s.manager.pools {
        let addrs: Vec<String> = l.spares.iter().map(|a| a.to_string()).collect();
        out += &format!("{:<12} {:>7} {:>10} {:>8} {:>10}  {}\n", node, l.spares.len(), l.unchecked, l.granted, l.conflicts, addrs.join(" "));
    }
    out
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| format!("{v} ms"))
}

/// The tables, as text.
pub fn render(s: &Status) -> String {
    let mut out = render_nodes(s);
    out += "\n";
    out += &render_vips(s);
    let c = &s.counters;
    let claims: Vec<String> = c.claims.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out += &format!(
        "\nheartbeats sent {} received {} late {}; etcd reads {} failed {} slow {}; acknowledged extensions {}; claims [{}] lost {}; starts {} stops {}\n",
        c.heartbeats_sent,
        c.heartbeats_received,
        c.heartbeats_late,
        c.confirmations,
        c.confirmation_failures,
        c.etcd_reads_slow,
        c.acked_extensions,
        claims.join(", "),
        c.claims_lost,
        c.starts,
        c.stops
    );
    out
}

/// This node, etcd, the managing node and the peers.
fn render_nodes(s: &Status) -> String {
    let mut out = String::new();
    let etcd = match s.etcd_last_ok_ms {
        Some(age) => format!("last read {age} ms ago, {} µs", s.etcd_read_latency_us.unwrap_or(0)),
        None => "never read".into(),
    };
    out += &format!("node {}   etcd {} ({etcd})   lease {} ms, takeover wait {:.1} ms\n", s.node, s.etcd_endpoints.join(","), s.lease_ms, s.takeover_wait_ms);
    let m = &s.manager;
    out += &match (&m.manager, m.term) {
        (Some(name), Some(term)) => format!(
            "managing node {name} (term {term}{})   elections won here {}, writes refused as deposed {}\n\n",
            if m.this_node { ", this node" } else { "" },
            m.elections_won,
            m.deposed_writes
        ),
        _ => format!("managing node: none elected (or etcd unreachable)   elections won here {}\n\n", m.elections_won),
    };
    let counts = |c: &std::collections::BTreeMap<String, u64>| {
        if c.is_empty() {
            "none".to_string()
        } else {
            c.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    out += &format!(
        "as manager here: {} planning round(s) (last {:.2} ms), moves: {}, forwarded requests answered {} (uncollected answers deleted {}), etcd history compacted {} time(s){}\nrequests granted through this node: {}\n\n",
        m.plans,
        m.last_plan_ms,
        counts(&m.moves),
        m.forwarded_answered,
        m.answers_swept,
        m.compactions,
        if m.compactions > 0 { format!(" (last to revision {})", m.compacted_revision) } else { String::new() },
        counts(&m.grants)
    );
    out += &format!("{:<12} {:<10} {:>12} {:>10}  {}\n", "PEER", "HEALTH", "ALIVE FOR", "RTT", "PATHS (received/lost, last heard)");
    for p in &s.peers {
        let health = if p.alive {
            "alive"
        } else if p.suspected {
            "SUSPECTED"
        } else {
            "silent"
        };
        let paths: Vec<String> = p.paths.iter().map(|x| format!("{} {}/{} {}ms", x.path, x.received, x.lost, x.last_heard_ms)).collect();
        let rtt = p.rtt_us.map_or("-".into(), |r| format!("{r} µs"));
        out += &format!("{:<12} {:<10} {:>12} {:>10}  {}\n", p.name, health, ms(Some(p.alive_for_ms)), rtt, paths.join("  "));
    }
    out
}

/// Each cluster VIP's owner, epoch, state here and lease left.
fn render_vips(s: &Status) -> String {
    let mut out = format!("{:<40} {:<12} {:>8} {:<9} {:>10}  {}\n", "VIP", "OWNER", "EPOCH", "HERE", "LEASE", "CANDIDATES");
    for v in &s.vips {
        out += &format!(
            "{:<40} {:<12} {:>8} {:<9} {:>10}  {}\n",
            v.vip.to_string(),
            v.owner.as_deref().unwrap_or("-"),
            v.epoch,
            v.here,
            ms(Some(v.lease_left_ms)),
            v.candidates.join(",")
        );
    }
    out
}
