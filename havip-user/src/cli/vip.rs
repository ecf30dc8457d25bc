//! `havip vip request|release|list`: pool VIPs for applications, through havipd's API.

use anyhow::bail;
use clap::Subcommand;

use crate::cli::{operator::refusal, Locations};

#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Get a VIP for an application, bound and remapped (clients reach VIP:SERVICE_PORT,
    /// the application keeps listening on INSTANCE_PORT). Standalone: the best-ranked usable
    /// pool VIP for its targets. Cluster mode: placed on the best-ranked node (its measured
    /// paths to the targets, the application's spread, load), from a shared VIP, that
    /// node's spares, or the managing node.
    Request {
        /// Application (or orchestrator) id holding the VIP.
        #[arg(long)]
        app: String,
        /// The port clients address: VIP:SERVICE_PORT.
        #[arg(long)]
        service_port: u16,
        /// The port the application listens on (never changed).
        #[arg(long)]
        instance_port: u16,
        /// Let other applications share the VIP (on other ports).
        #[arg(long)]
        shared: bool,
        /// Peers the application talks to (repeatable): the VIP is chosen by their paths.
        #[arg(long = "target")]
        targets: Vec<std::net::IpAddr>,
        /// Application class.
        #[arg(long)]
        class: Option<String>,
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: ProtocolArg,
        /// Cluster mode: the [[cluster.network]] to take the VIP from (default: the spare
        /// pools' network).
        #[arg(long)]
        network: Option<String>,
        /// Cluster mode: never moved by rebalancing (it still fails over with its node).
        #[arg(long)]
        pinned: bool,
        /// Cluster mode: once released, the address is never handed out again.
        #[arg(long)]
        do_not_reassign: bool,
        /// Print havipd's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Release an application's VIPs (or only VIP).
    Release {
        #[arg(long)]
        app: String,
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
    },
    /// The pool: free VIPs, the reserve, and who holds which VIP where.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

pub fn run(loc: &Locations, cmd: VipCommand) -> anyhow::Result<()> {
    match cmd {
        VipCommand::Request { app, service_port, instance_port, shared, targets, class, protocol, network, pinned, do_not_reassign, json } => {
            let protocol = match protocol {
                ProtocolArg::Tcp => "tcp",
                ProtocolArg::Udp => "udp",
            };
            let body = serde_json::json!({
                "app": app, "exclusive": !shared, "targets": targets, "class": class,
                "protocol": protocol, "service_port": service_port, "instance_port": instance_port,
                "network": network, "pinned": pinned, "do_not_reassign": do_not_reassign,
            });
            let (status, v) = crate::api::client::call(&loc.run_dir, "POST", "/v1/vips", Some(body))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            if status != 201 {
                bail!("{}", refusal(status, v.get("error").and_then(|e| e.as_str()).unwrap_or_default()));
            }
            if !json {
                // Standalone the answer names the NIC; in cluster mode the node (and how).
                let place = match (v["nic"].as_str(), v["node"].as_str()) {
                    (Some(nic), _) => nic.to_string(),
                    (None, Some(node)) => format!("node {node} ({})", v["how"].as_str().unwrap_or("?")),
                    (None, None) => "no NIC yet".into(),
                };
                println!(
                    "{app}: {}:{service_port} ({protocol}) -> :{instance_port}, on {place}\n  {}",
                    v["vip"].as_str().unwrap_or("?"),
                    v["why"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        VipCommand::Release { app, vip, json } => {
            let path = match vip {
                Some(v) => format!("/v1/vips/{app}?vip={v}"),
                None => format!("/v1/vips/{app}"),
            };
            let (status, v) = crate::api::client::call(&loc.run_dir, "DELETE", &path, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            if status != 200 {
                bail!("{}", refusal(status, v.get("error").and_then(|e| e.as_str()).unwrap_or_default()));
            }
            if !json {
                for a in v["released"].as_array().into_iter().flatten() {
                    // Cluster mode answers with the addresses released.
                    if let Some(addr) = a.as_str() {
                        println!("released {addr}");
                        continue;
                    }
                    println!("released {}:{} ({})", a["vip"].as_str().unwrap_or("?"), a["service_port"], a["protocol"].as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
        VipCommand::List { json } => {
            let (status, v) = crate::api::client::call(&loc.run_dir, "GET", "/v1/vips", None)?;
            if json || status != 200 {
                println!("{}", serde_json::to_string_pretty(&v)?);
                anyhow::ensure!(status == 200, "havipd answered {status}");
                return Ok(());
            }
            if v["cluster"] == true {
                // Cluster mode: the ledger's granted VIPs, one line per use.
                println!("{:<20} {:<22} {:<6} {:<8} {:>7} {:>9} {:<9} {:<6} {:<7}", "APP", "VIP", "NODE", "NIC", "PORT", "INSTANCE", "KIND", "PROTO", "HERE");
                for g in v["granted"].as_array().into_iter().flatten() {
                    for u in g["uses"].as_array().into_iter().flatten() {
                        println!(
                            "{:<20} {:<22} {:<6} {:<8} {:>7} {:>9} {:<9} {:<6} {:<7}",
                            u["app"].as_str().unwrap_or("?"),
                            g["vip"].as_str().unwrap_or("?"),
                            g["node"].as_str().unwrap_or("?"),
                            g["nic"].as_str().unwrap_or("-"),
                            u["service_port"],
                            u["instance_port"],
                            if u["exclusive"].as_bool() == Some(true) { "exclusive" } else { "shared" },
                            u["protocol"].as_str().unwrap_or("?"),
                            if g["served_here"] == true { "serving" } else { "standby" }
                        );
                    }
                }
                return Ok(());
            }
            let ips = |k: &str| v[k].as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ");
            println!("pool: {} (free: {}; reserve {})", ips("pool"), if ips("free").is_empty() { "none".into() } else { ips("free") }, v["reserve"]);
            println!("{:<20} {:<22} {:<8} {:>7} {:>9} {:<9} {:<8}", "APP", "VIP", "NIC", "PORT", "INSTANCE", "KIND", "PROTO");
            for h in v["held"].as_array().into_iter().flatten() {
                let a = &h["allocation"];
                println!(
                    "{:<20} {:<22} {:<8} {:>7} {:>9} {:<9} {:<8}",
                    a["app"].as_str().unwrap_or("?"),
                    a["vip"].as_str().unwrap_or("?"),
                    h["nic"].as_str().unwrap_or("-"),
                    a["service_port"],
                    a["instance_port"],
                    if a["exclusive"].as_bool() == Some(true) { "exclusive" } else { "shared" },
                    a["protocol"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}
