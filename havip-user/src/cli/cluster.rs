//! `havip cluster status`: the cluster as this node sees it, from havipd's API.

use clap::Subcommand;

use crate::{
    cli::{operator::refusal, Locations},
    cluster::service::Status,
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
}

pub fn run(loc: &Locations, cmd: ClusterCommand) -> anyhow::Result<()> {
    let (json, pools) = match cmd {
        ClusterCommand::Status { json } => (json, false),
        ClusterCommand::Pools { json } => (json, true),
    };
    let (status, v) = crate::api::client::call(&loc.run_dir, "GET", "/v1/cluster", None)?;
    if !(200..300).contains(&status) {
        let why = v.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| v.to_string());
        anyhow::bail!("{}", refusal(status, &why));
    }
    if pools {
        let s: Status = serde_json::from_value(v)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s.manager.pools)?);
        } else {
            print!("{}", render_pools(&s));
        }
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: Status = serde_json::from_value(v)?;
    print!("{}", render(&s));
    Ok(())
}

fn render_pools(s: &Status) -> String {
    let mut out = String::new();
    if s.manager.pools.is_empty() {
        return "no spare pools: configure [cluster.spares] (network, low, high)\n".into();
    }
    out += &format!("{:<12} {:>7} {:>8}  {}\n", "NODE", "SPARES", "GRANTED", "SPARE VIPS");
    for (node, l) in &s.manager.pools {
        let addrs: Vec<String> = l.spares.iter().map(|a| a.to_string()).collect();
        out += &format!("{:<12} {:>7} {:>8}  {}\n", node, l.spares.len(), l.granted, addrs.join(" "));
    }
    out
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| format!("{v} ms"))
}

/// The tables, as text.
pub fn render(s: &Status) -> String {
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
    out += &format!("\n{:<40} {:<12} {:>8} {:<9} {:>10}  {}\n", "VIP", "OWNER", "EPOCH", "HERE", "LEASE", "CANDIDATES");
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
    let c = &s.counters;
    let claims: Vec<String> = c.claims.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out += &format!(
        "\nheartbeats sent {} received {}; etcd reads {} failed {}; acknowledged extensions {}; claims [{}] lost {}; starts {} stops {}\n",
        c.heartbeats_sent,
        c.heartbeats_received,
        c.confirmations,
        c.confirmation_failures,
        c.acked_extensions,
        claims.join(", "),
        c.claims_lost,
        c.starts,
        c.stops
    );
    out
}
