//! The node configuration: a TOML file, parsed strictly and validated as a whole into typed
//! values before anything is applied. Every error names the field (as a path such as
//! `service[0].instance[1].port`) and the reason.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::Path,
};

pub mod capacity;
pub mod classes;
pub mod cluster;
pub mod metrics;
pub mod networks;
pub mod probe;
pub mod ranking;
pub mod rate;
pub mod token;
use serde::{Deserialize, Serialize};

/// The file as written. Unknown fields are errors: a typo must not silently do nothing.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub failover: FailoverSection,
    #[serde(default)]
    pub probe: ProbeSection,
    #[serde(default)]
    pub ranking: RankingSection,
    #[serde(default)]
    pub passive: PassiveSection,
    #[serde(default)]
    pub nic: Vec<NicSection>,
    #[serde(default)]
    pub vip: Vec<VipSection>,
    #[serde(default)]
    pub service: Vec<ServiceSection>,
    /// Application classes by name (`[class.latency]`), see `classes`.
    #[serde(default)]
    pub class: BTreeMap<String, classes::ClassSection>,
    /// The Prometheus endpoint (`[metrics]`), see `metrics`.
    #[serde(default)]
    pub metrics: metrics::MetricsSection,
    /// VIPs handed out to applications through the API (`[[vip]] pool = true`).
    #[serde(default)]
    pub pool: PoolSection,
    /// The application API (see `api`).
    #[serde(default)]
    pub api: ApiSection,
    /// Cluster mode (see `cluster`); absent: this node runs standalone.
    #[serde(default)]
    pub cluster: Option<cluster::ClusterSection>,
}

/// `[pool]`: how the API hands out pool VIPs.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// Free pool VIPs kept back: a request that would leave fewer is refused (409).
    #[serde(default)]
    pub reserve: usize,
}

/// `[api]`: where havipd serves its HTTP API. Always on `<run dir>/control.sock`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Group that owns the socket (mode 0660), so its members may call the API.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Also listen on this TCP address (e.g. "127.0.0.1:7946"); requires `token_file`.
    /// havipd warns if it is not a loopback address (plain HTTP: the token crosses the wire).
    #[serde(default)]
    pub listen: Option<String>,
    /// File holding the bearer token TCP clients must send. It must be private (no mode bit
    /// for group or others, e.g. `chmod 600`), or the configuration is refused.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The interface that holds the VIPs as local addresses. It never goes down while the
    /// host is up (the VIPA idea), so applications bound to a VIP survive NIC changes.
    #[serde(default = "default_vip_interface")]
    pub vip_interface: String,
    /// Where the ingress program attaches: `auto` (native XDP on NICs with a driver, TC on
    /// virtual NICs such as veth unless classes have CPU queues; see
    /// `kernel::ingress_hook`), `native` (XDP in the driver, fail if it cannot), `generic`
    /// (XDP on the skb) or `tc` (a TC ingress program).
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self { vip_interface: default_vip_interface(), xdp_mode: XdpModeSetting::default() }
    }
}

fn default_vip_interface() -> String {
    "lo".into()
}

/// How VIPs move between a node's NICs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// Gratuitous ARPs / unsolicited neighbour advertisements sent from the new NIC per move.
    #[serde(default = "default_announce_count")]
    pub announce_count: u32,
    /// Spacing between them, in milliseconds (the first goes at once).
    #[serde(default = "default_announce_interval_ms")]
    pub announce_interval_ms: u64,
    /// A more preferred NIC takes a VIP back only after being up this long without a change.
    #[serde(default = "default_failback_hold_down_ms")]
    pub failback_hold_down_ms: u64,
}

impl Default for FailoverSection {
    fn default() -> Self {
        Self {
            announce_count: default_announce_count(),
            announce_interval_ms: default_announce_interval_ms(),
            failback_hold_down_ms: default_failback_hold_down_ms(),
        }
    }
}

fn default_announce_count() -> u32 {
    3
}
fn default_announce_interval_ms() -> u64 {
    200
}
fn default_failback_hold_down_ms() -> u64 {
    5000
}

/// How paths are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Icmp,
    Tcp(u16),
    Udp(u16),
}

impl ProbeKind {
    /// (`PROBE_KIND_*`, target port) as the kernel's probe slots hold them.
    pub fn wire(self) -> (u8, Option<u16>) {
        match self {
            ProbeKind::Icmp => (havip_common::PROBE_KIND_ICMP, None),
            ProbeKind::Tcp(p) => (havip_common::PROBE_KIND_TCP, Some(p)),
            ProbeKind::Udp(p) => (havip_common::PROBE_KIND_UDP, Some(p)),
        }
    }
}

/// Validated failover settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    pub announce_count: u32,
    pub announce_interval: std::time::Duration,
    pub failback_hold_down: std::time::Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    #[default]
    Auto,
    Native,
    Generic,
    Tc,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NicSection {
    pub name: String,
    /// The rate havip's HTB shapes this NIC's egress to when classes have egress rates
    /// (tc units: "900mbit"). Set it just below the real bottleneck so queues build in
    /// havip's classes, where priorities apply, not beyond. Default 10gbit.
    #[serde(default)]
    pub egress_rate: Option<String>,
    /// Replace a root qdisc on this NIC that havip did not create (default: refuse).
    #[serde(default)]
    pub replace_qdisc: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    pub address: IpAddr,
    /// Candidate NICs in order of preference; all NICs when absent.
    pub nics: Option<Vec<String>>,
    /// Peers whose path quality matters to this VIP: probed from each candidate NIC.
    #[serde(default)]
    pub targets: Vec<IpAddr>,
    /// The VIP's application class (a `[class.NAME]`).
    #[serde(default)]
    pub class: Option<String>,
    /// Ports of this VIP with a class of their own.
    #[serde(default)]
    pub port_class: Vec<classes::PortClassSection>,
    /// Handed out to applications by the API instead of served by `[[service]]`s: not in
    /// the dataplane until an application holds it.
    #[serde(default)]
    pub pool: bool,
    /// Cluster mode: the nodes that may serve this VIP, most preferred first (default: all
    /// nodes, by name).
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
}

/// How candidates are ranked by path quality (see `rank` for the formula).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankingSection {
    /// Time between ranking rounds, ms.
    pub interval_ms: u64,
    /// Measurements considered: loss and reachability over this window, ms.
    pub window_ms: u64,
    /// Cost per ms of RTT, per percent of loss, per hop.
    pub weight_latency: f64,
    pub weight_loss: f64,
    pub weight_hops: f64,
    /// How a VIP's targets combine: "mean" or "sum".
    pub combine: ranking::Combine,
    /// A challenger must be cheaper by this fraction of the current cost...
    pub margin: f64,
    /// ...and by at least this much cost (plus three standard deviations of the measured
    /// noise): the allowance...
    pub min_gain: f64,
    /// ...and gather this much evidence, ms: the time a lead of two allowances takes (a
    /// clear lead, five allowances or more, a quarter of it; a lead inside the allowance
    /// drains it). Dark and lossy paths move at once.
    pub evidence_ms: u64,
    /// Replaced by `evidence_ms`: refused with a pointer to it.
    #[serde(skip_serializing)]
    pub hold_down_ms: Option<u64>,
    /// Optional gates: with any set, a VIP moves only when its current path breaks one.
    pub max_rtt_ms: Option<f64>,
    pub max_loss_pct: Option<f64>,
    pub top_k: Option<usize>,
}

impl Default for RankingSection {
    fn default() -> Self {
        let d = ranking::Settings::default();
        Self {
            interval_ms: d.interval.as_millis() as u64,
            window_ms: d.window.as_millis() as u64,
            weight_latency: d.weight_latency,
            weight_loss: d.weight_loss,
            weight_hops: d.weight_hops,
            combine: d.combine,
            margin: d.margin,
            min_gain: d.min_gain,
            evidence_ms: d.evidence.as_millis() as u64,
            hold_down_ms: None,
            max_rtt_ms: None,
            max_loss_pct: None,
            top_k: None,
        }
    }
}

/// Passive measurement of live traffic.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PassiveSection {
    /// TCP RTT per (peer, VIP, NIC) from handshakes and sampled data/ACK pairs, and
    /// retransmissions: observational (placement ranks the active probes, the only
    /// measurement of the NICs a VIP is not on). Costs about 12 ns per TCP packet of a VIP
    /// (see `cargo xtask bench`), so it is off unless asked for; fixed when the programs
    /// load (a restart applies a change).
    #[serde(default)]
    pub tcp: bool,
}

/// Active path probes (ICMP echo, timestamped in the kernel).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Time between two probes of a path that matters to no bound VIP (free pool VIPs'), ms.
    #[serde(default = "default_probe_interval_ms")]
    pub interval_ms: u64,
    /// Time between two probes of a candidate NIC's path of a bound VIP with targets, ms.
    #[serde(default = "default_active_interval_ms")]
    pub active_interval_ms: u64,
    /// Time between two probes of a path in doubt (a probe lost), ms.
    #[serde(default = "default_doubt_interval_ms")]
    pub doubt_interval_ms: u64,
    /// The shortest time a probe is waited for (at least 3 smoothed RTTs), ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Probes lost in a row that make a path dark.
    #[serde(default = "default_fail_after")]
    pub fail_after: u32,
    /// Probe with TCP SYNs to this port of the targets instead of ICMP echoes (for
    /// networks that filter ICMP); the SYN-ACK or RST is the reply.
    #[serde(default)]
    pub tcp_port: Option<u16>,
    /// Probe with UDP datagrams to this port instead: the reply is a UDP answer from that
    /// port or the target's ICMP port unreachable (rate-limited by Linux targets to about
    /// one per second per source by default: keep the interval at 1 s or more).
    #[serde(default)]
    pub udp_port: Option<u16>,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            interval_ms: default_probe_interval_ms(),
            active_interval_ms: default_active_interval_ms(),
            doubt_interval_ms: default_doubt_interval_ms(),
            timeout_ms: default_timeout_ms(),
            fail_after: default_fail_after(),
            tcp_port: None,
            udp_port: None,
        }
    }
}

fn default_probe_interval_ms() -> u64 {
    1000
}
fn default_active_interval_ms() -> u64 {
    20
}
fn default_doubt_interval_ms() -> u64 {
    5
}
fn default_timeout_ms() -> u64 {
    10
}
fn default_fail_after() -> u32 {
    4
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: String,
    /// The designated port clients address.
    pub port: u16,
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    pub instance: Vec<InstanceSection>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSection {
    /// The VIP this instance is reached at.
    pub vip: IpAddr,
    /// The port the instance really listens on.
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => havip_common::IPPROTO_TCP,
            Protocol::Udp => havip_common::IPPROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            havip_common::IPPROTO_TCP => Some(Protocol::Tcp),
            havip_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A validated configuration: everything in it can be applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vip_interface: String,
    pub xdp_mode: XdpModeSetting,
    pub failover: Failover,
    /// Time between two probes of an idle path (see `watch` for the others).
    pub probe_interval: std::time::Duration,
    /// How paths are probed and judged probe by probe.
    pub watch: probe::Watch,
    /// Probe kind and port: ICMP echo (no port), TCP SYN or UDP to the port.
    pub probe_kind: ProbeKind,
    pub ranking: ranking::Settings,
    pub passive_tcp: bool,
    /// NIC names, in file order.
    pub nics: Vec<String>,
    pub vips: Vec<Vip>,
    pub remaps: Vec<Remap>,
    /// Application classes and each NIC's egress settings.
    pub classes: classes::Classes,
    /// Where the Prometheus endpoint listens (`None`: disabled).
    pub metrics: Option<std::net::SocketAddr>,
    /// Pool VIPs, in file order (see `pool`); not in `vips`.
    pub pool: Vec<Vip>,
    pub pool_reserve: usize,
    pub api: Api,
    /// Cluster mode (`None`: standalone).
    pub cluster: Option<cluster::Cluster>,
}

/// Validated `[api]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Api {
    pub socket_group: Option<String>,
    pub listen: Option<std::net::SocketAddr>,
    pub token_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub address: IpAddr,
    /// Candidate NICs in order of preference (never empty).
    pub nics: Vec<String>,
    /// Peers probed from each candidate NIC.
    pub targets: Vec<IpAddr>,
    /// The VIP's default class.
    pub class: Option<String>,
    /// (protocol, designated port) -> class, overriding the default.
    pub port_classes: BTreeMap<(Protocol, u16), String>,
    /// Configured candidates the class's `isolate` policy keeps it off (see `classes`);
    /// already removed from `nics`.
    pub isolated_from: Vec<String>,
    /// Cluster mode: candidate nodes, most preferred first (empty when standalone).
    pub nodes: Vec<String>,
}

/// One (VIP, protocol, designated port) -> instance port mapping.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Remap {
    pub vip: IpAddr,
    pub protocol: Protocol,
    pub designated_port: u16,
    pub instance_port: u16,
    pub service: String,
}

impl Remap {
    /// An application's mapping (pool VIPs and cluster grants): its service is `app:<id>`.
    pub fn for_app(vip: IpAddr, protocol: Protocol, service_port: u16, instance_port: u16, app: &str) -> Self {
        Remap { vip, protocol, designated_port: service_port, instance_port, service: format!("app:{app}") }
    }
}

/// One problem, at one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Why a configuration was rejected: every problem found, each at its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration {} ({} problem{}); nothing was applied:",
            self.source_name,
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  - field `{}`: {}", e.field, e.reason)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            errors: vec![FieldError { field: "(file)".into(), reason: format!("cannot read it: {e}") }],
        })?;
        Self::parse(&text, &name)
    }

    /// [`Config::load`], then the checks of the files the configuration names on this host
    /// ([`Config::check_files`]): what havipd starts and reloads with, and what
    /// `--check-config` and `havip reload` check.
    pub fn load_for_apply(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Self::load(path)?;
        cfg.check_files(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Checks the files the configuration names, as they are on this host: today the API
    /// token file, which must be private (see `token`).
    ///
    /// Why here: a config error is refused whole, naming the field, before havipd touches
    /// the dataplane (startup loads the config first) or changes anything on a reload, and
    /// `--check-config` gives the same verdict. Why not in `validate` (text only, so
    /// unit-testable) or `load`: `havip stats` and `havip top` load the file to label what
    /// they show, may run as a user who cannot see the secret, and must not fail on it.
    pub fn check_files(&self, source_name: &str) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Some(path) = &self.api.token_file {
            if let Err(reason) = token::check(path) {
                errors.push(FieldError { field: "api.token_file".into(), reason });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { source_name: source_name.into(), errors })
        }
    }

    /// Parses and validates TOML text; `source_name` only labels errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let file = parse_file(text).map_err(|e| ConfigError { source_name: source_name.into(), errors: vec![e] })?;
        validate(&file).map_err(|errors| ConfigError { source_name: source_name.into(), errors })
    }
}

fn parse_file(text: &str) -> Result<ConfigFile, FieldError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize::<_, ConfigFile>(de).map_err(|e| {
        let path = e.path().to_string();
        // toml's message carries the line and column; keep it, minus the quoted source.
        let inner = e.into_inner();
        let mut reason = inner.message().trim().to_string();
        let mut field = (path != "." && !path.is_empty()).then_some(path);
        if let Some(span) = inner.span() {
            let line = text[..span.start].matches('\n').count() + 1;
            reason = format!("{reason} (line {line})");
            // Errors of the TOML syntax itself (a number beyond 64 bits) come before any
            // field is known: name the one written at that line.
            field = field.or_else(|| field_at_line(text, line));
        }
        FieldError { field: field.unwrap_or_else(|| "(top level)".into()), reason }
    })
}

/// The field path of the `key = value` at 1-based `line`, from the table headers above it
/// (`[probe]` gives `probe.interval_ms`, the second `[[vip]]` gives `vip[1].address`).
fn field_at_line(text: &str, line: usize) -> Option<String> {
    let mut table: Vec<String> = Vec::new();
    // Elements seen of each array of tables, by its full name; a new element of an array
    // restarts the counts of the arrays inside it.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for l in lines.iter().take(line.saturating_sub(1)) {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
            *counts.entry(name.clone()).or_default() += 1;
            let parts: Vec<&str> = name.split('.').collect();
            table = (0..parts.len())
                .map(|i| {
                    let full = parts[..=i].join(".");
                    match counts.get(&full) {
                        Some(n) => format!("{}[{}]", parts[i], n - 1),
                        None => parts[i].to_string(),
                    }
                })
                .collect();
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().split('.').map(|p| p.trim().to_string()).collect();
        }
    }
    let key = lines.get(line.checked_sub(1)?)?.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    table.push(key.to_string());
    Some(table.join("."))
}

/// Linux interface names: 1..=15 bytes, no '/', ':' or whitespace, not "." or "..".
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty; give an interface name such as eth0".into());
    }
    if name.len() > 15 {
        return Err(format!("`{name}` is longer than 15 bytes, the Linux limit for interface names"));
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    Ok(())
}

fn check_vip_address(ip: &IpAddr) -> Result<(), String> {
    let bad = match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("the unspecified address")
            } else if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_multicast() {
                Some("a multicast address")
            } else if v4.is_broadcast() {
                Some("the broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_loopback() {
                Some("the loopback address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if v6.is_unicast_link_local() {
                Some("link-local (scoped to one link, it cannot move between NICs)")
            } else if v6.to_ipv4_mapped().is_some() {
                Some("an IPv4-mapped address; write the IPv4 address instead")
            } else {
                None
            }
        }
    };
    match bad {
        Some(what) => Err(format!("{ip} is {what}; a VIP must be a unicast address")),
        None => Ok(()),
    }
}

/// The longest window and hold-down (and the bound that keeps every derived duration far
/// from overflowing).
const HOUR_MS: u64 = 3_600_000;

/// Checks everything that can be checked without changing the system (CPUs are checked
/// against this machine's online ones). Returns all problems.
pub fn validate(file: &ConfigFile) -> Result<Config, Vec<FieldError>> {
    validate_on(file, &classes::online_cpus())
}

/// [`validate`] against a given set of online CPUs.
pub fn validate_on(file: &ConfigFile, online_cpus: &BTreeSet<u32>) -> Result<Config, Vec<FieldError>> {
    let mut errs = Vec::new();
    let cluster = cluster::validate(file.cluster.as_ref(), &mut errs);
    let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });

    if let Err(r) = check_ifname(&file.node.vip_interface) {
        err("node.vip_interface".into(), r);
    }
    let f = &file.failover;
    if !(1..=50).contains(&f.announce_count) {
        err("failover.announce_count".into(), format!("{} is out of range; send 1 to 50 announcements per move", f.announce_count));
    }
    if !(1..=60_000).contains(&f.announce_interval_ms) {
        err("failover.announce_interval_ms".into(), format!("{} is out of range; use 1 to 60000 ms", f.announce_interval_ms));
    }
    let probe_interval_ok = (10..=60_000).contains(&file.probe.interval_ms);
    if !probe_interval_ok {
        err("probe.interval_ms".into(), format!("{} is out of range; probe every 10 to 60000 ms", file.probe.interval_ms));
    }
    let pr = &file.probe;
    for (name, v, lo) in [("active_interval_ms", pr.active_interval_ms, 1), ("doubt_interval_ms", pr.doubt_interval_ms, 1), ("timeout_ms", pr.timeout_ms, 1)] {
        if !(lo..=60_000).contains(&v) {
            err(format!("probe.{name}"), format!("{v} is out of range; use {lo} to 60000 ms"));
        }
    }
    if !(2..=100).contains(&pr.fail_after) {
        err(
            "probe.fail_after".into(),
            format!("{} is out of range; 2 to 100 probes lost in a row (a burst of 3 should not move a VIP: 4 or more)", pr.fail_after),
        );
    }
    if file.probe.tcp_port == Some(0) {
        err("probe.tcp_port".into(), "0 is not a port; give the targets' TCP port to probe, or leave it out for ICMP".into());
    }
    if file.probe.udp_port == Some(0) {
        err("probe.udp_port".into(), "0 is not a port; give the targets' UDP port to probe, or leave it out for ICMP".into());
    }
    if file.probe.tcp_port.is_some() && file.probe.udp_port.is_some() {
        err("probe.udp_port".into(), "probes are TCP or UDP, not both: set tcp_port or udp_port".into());
    }
    let r = &file.ranking;
    if !(20..=600_000).contains(&r.interval_ms) {
        err("ranking.interval_ms".into(), format!("{} is out of range; rank every 20 to 600000 ms", r.interval_ms));
    }
    // The window's floor is three probe intervals, formed only from a valid interval: an
    // invalid one is reported at its own field, and its product could overflow.
    let min_window = if probe_interval_ok { file.probe.interval_ms.checked_mul(3) } else { None };
    if r.window_ms > HOUR_MS {
        err("ranking.window_ms".into(), format!("{} ms is more than an hour; use at most {HOUR_MS} ms (and at least 3 probe intervals)", r.window_ms));
    } else if let Some(min) = min_window.filter(|&min| r.window_ms < min) {
        err("ranking.window_ms".into(), format!("{} ms must cover at least 3 probe intervals ({min} ms) and at most an hour", r.window_ms));
    }
    for (name, v) in [("weight_latency", r.weight_latency), ("weight_loss", r.weight_loss), ("weight_hops", r.weight_hops), ("min_gain", r.min_gain)] {
        if !v.is_finite() || v < 0.0 {
            err(format!("ranking.{name}"), format!("{v} must be a number >= 0"));
        }
    }
    if !(0.0..1.0).contains(&r.margin) {
        err("ranking.margin".into(), format!("{} must be in [0, 1): a fraction of the current cost", r.margin));
    }
    if r.evidence_ms > HOUR_MS {
        err("ranking.evidence_ms".into(), format!("{} ms is more than an hour; use 0 to {HOUR_MS} ms", r.evidence_ms));
    }
    if r.hold_down_ms.is_some() {
        err(
            "ranking.hold_down_ms".into(),
            "was replaced by evidence_ms: a VIP moves once a better path has shown enough evidence (a clear lead fast, a small one slowly, noise never); remove hold_down_ms and set evidence_ms (default 1000) if needed".into(),
        );
    }
    for (name, v) in [("max_rtt_ms", r.max_rtt_ms), ("max_loss_pct", r.max_loss_pct)] {
        if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
            err(format!("ranking.{name}"), "must be > 0 (leave it out to disable)".into());
        }
    }
    if r.top_k == Some(0) {
        err("ranking.top_k".into(), "must be >= 1 (leave it out to disable)".into());
    }
    if f.failback_hold_down_ms > 86_400_000 {
        err("failover.failback_hold_down_ms".into(), format!("{} ms is more than a day; use 0 to 86400000", f.failback_hold_down_ms));
    }

    // NICs
    if file.nic.is_empty() {
        err("nic".into(), "no NIC configured; add at least one [[nic]] with a name".into());
    }
    let mut nic_names = BTreeSet::new();
    for (i, nic) in file.nic.iter().enumerate() {
        if let Err(r) = check_ifname(&nic.name) {
            err(format!("nic[{i}].name"), r);
        } else if !nic_names.insert(nic.name.as_str()) {
            err(format!("nic[{i}].name"), format!("NIC `{}` is listed twice", nic.name));
        } else if nic.name == file.node.vip_interface {
            err(format!("nic[{i}].name"), format!("`{}` is also node.vip_interface; VIPs live there, traffic uses the NICs", nic.name));
        }
    }

    // VIPs
    let mut vip_set = BTreeSet::new();
    let mut vips = Vec::new();
    for (i, vip) in file.vip.iter().enumerate() {
        if let Err(r) = check_vip_address(&vip.address) {
            err(format!("vip[{i}].address"), r);
        } else if !vip_set.insert(vip.address) {
            err(format!("vip[{i}].address"), format!("VIP {} is listed twice", vip.address));
        }
        let nics = match &vip.nics {
            None => file.nic.iter().map(|n| n.name.clone()).collect(),
            Some(list) => {
                if list.is_empty() {
                    err(format!("vip[{i}].nics"), "is empty; list at least one NIC, or leave it out to use all NICs".into());
                }
                let mut seen = BTreeSet::new();
                for (j, n) in list.iter().enumerate() {
                    if !nic_names.contains(n.as_str()) {
                        err(format!("vip[{i}].nics[{j}]"), format!("NIC `{n}` is not configured in any [[nic]]"));
                    } else if !seen.insert(n) {
                        err(format!("vip[{i}].nics[{j}]"), format!("NIC `{n}` is listed twice"));
                    }
                }
                list.clone()
            }
        };
        let mut seen_targets = BTreeSet::new();
        for (j, t) in vip.targets.iter().enumerate() {
            if t.is_unspecified() || t.is_multicast() || t.is_loopback() {
                err(format!("vip[{i}].targets[{j}]"), format!("{t} cannot be probed; give a unicast address of a peer"));
            } else if !seen_targets.insert(*t) {
                err(format!("vip[{i}].targets[{j}]"), format!("{t} is listed twice"));
            }
        }
        vips.push(Vip {
            address: vip.address,
            nics,
            targets: vip.targets.clone(),
            class: vip.class.clone(),
            port_classes: BTreeMap::new(),
            isolated_from: Vec::new(),
            nodes: cluster::vip_nodes(cluster.as_ref(), file.cluster.is_some(), i, vip.nodes.as_ref(), &mut err),
        });
        if vip.pool && file.cluster.is_some() {
            err(format!("vip[{i}].pool"), "pool VIPs are not cluster-managed yet; in cluster mode serve VIPs through [[service]]s".into());
        }
    }

    // Services and their instances -> remaps
    let mut service_names = BTreeSet::new();
    // (vip, proto, designated) and (vip, proto, instance) must each be unique, and the two
    // port sets of one (vip, proto) must not overlap, so both directions are functions.
    let mut designated: BTreeMap<(IpAddr, Protocol, u16), String> = BTreeMap::new();
    let mut instance_ports: BTreeMap<(IpAddr, Protocol, u16), String> = BTreeMap::new();
    let mut remaps = Vec::new();
    for (i, svc) in file.service.iter().enumerate() {
        let at = |f: &str| format!("service[{i}].{f}");
        if svc.name.trim().is_empty() {
            err(at("name"), "is empty; name the service (it labels stats and errors)".into());
        } else if !service_names.insert(svc.name.as_str()) {
            err(at("name"), format!("service `{}` is defined twice", svc.name));
        }
        if svc.port == 0 {
            err(at("port"), "0 is not a port; give the designated port clients connect to (1-65535)".into());
        }
        if svc.protocols.is_empty() {
            err(at("protocols"), "is empty; use [\"tcp\"], [\"udp\"] or both".into());
        }
        let protos: BTreeSet<Protocol> = svc.protocols.iter().copied().collect();
        if protos.len() != svc.protocols.len() {
            err(at("protocols"), "lists a protocol twice".into());
        }
        if svc.instance.is_empty() {
            err(at("instance"), "no instance; add at least one [[service.instance]] with a vip and a port".into());
        }
        for (j, inst) in svc.instance.iter().enumerate() {
            let at = |f: &str| format!("service[{i}].instance[{j}].{f}");
            if !vip_set.contains(&inst.vip) {
                err(at("vip"), format!("{} is not a configured VIP; add it as a [[vip]] first", inst.vip));
                continue;
            }
            if file.vip.iter().any(|v| v.pool && v.address == inst.vip) {
                err(at("vip"), format!("{} is a pool VIP: the API assigns its mappings; remove `pool = true` or this instance", inst.vip));
                continue;
            }
            if inst.port == 0 {
                err(at("port"), "0 is not a port; give the port this instance listens on".into());
                continue;
            }
            if inst.port == svc.port {
                err(at("port"), format!("equals the service's designated port {}; an instance needs its own port", svc.port));
                continue;
            }
            if svc.port == 0 {
                continue;
            }
            for &proto in &protos {
                let label = format!("service `{}`", svc.name);
                if let Some(other) = designated.insert((inst.vip, proto, svc.port), label.clone()) {
                    err(at("vip"), format!("{}:{} ({proto}) is already the designated endpoint of {other}", inst.vip, svc.port));
                }
                if let Some(other) = instance_ports.insert((inst.vip, proto, inst.port), label.clone()) {
                    err(at("port"), format!("{}:{} ({proto}) is already an instance port of {other}", inst.vip, inst.port));
                }
                remaps.push(Remap { vip: inst.vip, protocol: proto, designated_port: svc.port, instance_port: inst.port, service: svc.name.clone() });
            }
        }
    }
    for ((vip, proto, port), owner) in &instance_ports {
        if let Some(other) = designated.get(&(*vip, *proto, *port)) {
            err(
                "service".into(),
                format!("{vip}:{port} ({proto}) is both an instance port of {owner} and the designated port of {other}; the mapping would be ambiguous"),
            );
        }
    }

    let metrics = metrics::validate(&file.metrics, &mut err);
    let classes = classes::validate(file, &mut vips, online_cpus, &mut err);
    if file.node.xdp_mode == XdpModeSetting::Tc {
        if let Some((name, _)) = file.class.iter().find(|(_, c)| c.cpus.as_ref().is_some_and(|v| !v.is_empty())) {
            err(
                "node.xdp_mode".into(),
                format!("\"tc\" cannot feed the CPU queues of class `{name}` (only XDP can redirect to a CPU): use \"auto\" or \"generic\", or drop the class's cpus"),
            );
        }
    }
    let pool_size = file.vip.iter().filter(|v| v.pool).count();
    if file.pool.reserve > pool_size {
        err("pool.reserve".into(), format!("{} is more than the {pool_size} pool VIP(s) (`[[vip]] pool = true`)", file.pool.reserve));
    }
    let mut api = Api { socket_group: file.api.socket_group.clone(), listen: None, token_file: file.api.token_file.clone() };
    if let Some(l) = &file.api.listen {
        // A bare port listens on loopback: the API is local unless an address says otherwise.
        let parsed = l.parse::<std::net::SocketAddr>().ok().or_else(|| l.trim_start_matches(':').parse::<u16>().ok().map(|p| ([127, 0, 0, 1], p).into()));
        match parsed {
            Some(a) if a.port() != 0 => api.listen = Some(a),
            _ => err("api.listen".into(), format!("`{l}` is not a port or an address:port such as 127.0.0.1:7946")),
        }
        if file.api.token_file.is_none() {
            err("api.token_file".into(), "is required with api.listen: TCP clients must present a bearer token".into());
        }
    }
    if let Some(g) = &file.api.socket_group {
        if g.is_empty() || g.contains(|c: char| c.is_whitespace() || c == ':') {
            err("api.socket_group".into(), format!("`{g}` is not a group name"));
        }
    }

    remaps.sort();
    let cfg = Config {
        vip_interface: file.node.vip_interface.clone(),
        xdp_mode: file.node.xdp_mode,
        probe_interval: std::time::Duration::from_millis(file.probe.interval_ms),
        watch: probe::Watch {
            idle_interval: std::time::Duration::from_millis(file.probe.interval_ms),
            // Never slower than a less important path: an `interval_ms` below the active
            // interval speeds every path up.
            active_interval: std::time::Duration::from_millis(file.probe.active_interval_ms.min(file.probe.interval_ms)),
            doubt_interval: std::time::Duration::from_millis(file.probe.doubt_interval_ms.min(file.probe.active_interval_ms).min(file.probe.interval_ms)),
            timeout_floor: std::time::Duration::from_millis(file.probe.timeout_ms),
            fail_after: file.probe.fail_after,
            fast: file.probe.udp_port.is_none(),
        },
        probe_kind: match (file.probe.tcp_port, file.probe.udp_port) {
            (Some(p), _) => ProbeKind::Tcp(p),
            (_, Some(p)) => ProbeKind::Udp(p),
            _ => ProbeKind::Icmp,
        },
        passive_tcp: file.passive.tcp,
        ranking: {
            let r = &file.ranking;
            ranking::Settings {
                interval: std::time::Duration::from_millis(r.interval_ms),
                window: std::time::Duration::from_millis(r.window_ms),
                weight_latency: r.weight_latency,
                weight_loss: r.weight_loss,
                weight_hops: r.weight_hops,
                combine: r.combine,
                margin: r.margin,
                min_gain: r.min_gain,
                evidence: std::time::Duration::from_millis(r.evidence_ms),
                max_rtt_ms: r.max_rtt_ms,
                max_loss_pct: r.max_loss_pct,
                top_k: r.top_k,
            }
        },
        failover: Failover {
            announce_count: f.announce_count,
            announce_interval: std::time::Duration::from_millis(f.announce_interval_ms),
            failback_hold_down: std::time::Duration::from_millis(f.failback_hold_down_ms),
        },
        nics: file.nic.iter().map(|n| n.name.clone()).collect(),
        vips: vips.iter().zip(&file.vip).filter(|(_, f)| !f.pool).map(|(v, _)| v.clone()).collect(),
        pool: vips.iter().zip(&file.vip).filter(|(_, f)| f.pool).map(|(v, _)| v.clone()).collect(),
        pool_reserve: file.pool.reserve,
        api,
        remaps,
        classes,
        metrics,
        cluster,
    };
    // Capacities are counted on the validated shape (pool VIPs as held, isolation applied),
    // by the same function the pool asks before it grants a request.
    for e in capacity::check(&cfg) {
        err(e.field.clone(), e.reason());
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
vip_interface = "lo"

[[nic]]
name = "eth0"
[[nic]]
name = "eth1"

[[vip]]
address = "198.18.0.10"
[[vip]]
address = "2001:db8::10"
nics = ["eth1"]

[[service]]
name = "web"
port = 80
protocols = ["tcp", "udp"]
[[service.instance]]
vip = "198.18.0.10"
port = 8081
[[service.instance]]
vip = "2001:db8::10"
port = 8082
"#;

    #[test]
    fn parses_a_good_file() {
        let c = Config::parse(GOOD, "good").unwrap();
        assert_eq!(c.nics, ["eth0", "eth1"]);
        assert_eq!(c.vips[0].nics, ["eth0", "eth1"]);
        assert_eq!(c.vips[1].nics, ["eth1"]);
        assert_eq!(c.remaps.len(), 4);
        assert!(c
            .remaps
            .iter()
            .any(|r| r.vip.to_string() == "198.18.0.10" && r.protocol == Protocol::Udp && r.designated_port == 80 && r.instance_port == 8081));
    }

    /// The table of invalid configurations: (what is wrong, replacement, field named).
    #[test]
    fn invalid_configurations_are_rejected_with_the_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("unknown top-level key", "[node]", "[node]\ncolour = \"red\"", "node"),
            ("typo in an instance field", "port = 8081", "prot = 8081", "service[0].instance[0]"),
            ("bad address", "address = \"198.18.0.10\"", "address = \"198.18.0.300\"", "vip[0].address"),
            ("multicast VIP", "address = \"198.18.0.10\"", "address = \"224.0.0.1\"", "vip[0].address"),
            ("port out of range", "port = 8081", "port = 70000", "service[0].instance[0].port"),
            ("port zero", "port = 80\n", "port = 0\n", "service[0].port"),
            ("unknown protocol", "[\"tcp\", \"udp\"]", "[\"sctp\"]", "service[0].protocols"),
            ("instance on unknown VIP", "vip = \"2001:db8::10\"", "vip = \"2001:db8::99\"", "service[0].instance[1].vip"),
            ("VIP on unconfigured NIC", "nics = [\"eth1\"]", "nics = [\"eth9\"]", "vip[1].nics[0]"),
            ("empty NIC list", "nics = [\"eth1\"]", "nics = []", "vip[1].nics"),
            ("duplicate NIC", "name = \"eth1\"", "name = \"eth0\"", "nic[1].name"),
            ("interface name too long", "name = \"eth1\"", "name = \"averyveryverylongname\"", "nic[1].name"),
            ("instance port equals designated", "port = 8082", "port = 80", "service[0].instance[1].port"),
            ("xdp mode", "vip_interface = \"lo\"", "xdp_mode = \"fast\"", "node.xdp_mode"),
            ("vip listed twice", "address = \"2001:db8::10\"", "address = \"198.18.0.10\"", "vip[1].address"),
            ("wrong type", "port = 80\n", "port = \"eighty\"\n", "service[0].port"),
            ("no announcements", "[node]", "[failover]\nannounce_count = 0\n[node]", "failover.announce_count"),
            ("interval zero", "[node]", "[failover]\nannounce_interval_ms = 0\n[node]", "failover.announce_interval_ms"),
            ("unknown failover key", "[node]", "[failover]\nholddown = 1\n[node]", "failover"),
            ("probe interval too short", "[node]", "[probe]\ninterval_ms = 1\n[node]", "probe.interval_ms"),
            ("negative weight", "[node]", "[ranking]\nweight_loss = -1.0\n[node]", "ranking.weight_loss"),
            ("margin of 1", "[node]", "[ranking]\nmargin = 1.0\n[node]", "ranking.margin"),
            ("window shorter than 3 probes", "[node]", "[ranking]\nwindow_ms = 500\n[node]", "ranking.window_ms"),
            ("unknown combine", "[node]", "[ranking]\ncombine = \"max\"\n[node]", "ranking.combine"),
            ("tcp and udp probes", "[node]", "[probe]\ntcp_port = 1\nudp_port = 2\n[node]", "probe.udp_port"),
            ("multicast target", "nics = [\"eth1\"]", "nics = [\"eth1\"]\ntargets = [\"ff02::1\"]", "vip[1].targets[0]"),
            ("probe interval whose triple overflows", "[node]", "[probe]\ninterval_ms = 9223372036854775807\n[node]", "probe.interval_ms"),
            ("probe interval beyond u64", "[node]", "[probe]\ninterval_ms = 18446744073709551615\n[node]", "probe.interval_ms"),
            ("window beyond an hour", "[node]", "[ranking]\nwindow_ms = 3600001\n[node]", "ranking.window_ms"),
            ("evidence beyond an hour", "[node]", "[ranking]\nevidence_ms = 9223372036854775807\n[node]", "ranking.evidence_ms"),
            ("the replaced hold-down", "[node]", "[ranking]\nhold_down_ms = 3000\n[node]", "ranking.hold_down_ms"),
            ("fail after one", "[node]", "[probe]\nfail_after = 1\n[node]", "probe.fail_after"),
            ("zero timeout", "[node]", "[probe]\ntimeout_ms = 0\n[node]", "probe.timeout_ms"),
        ];
        for (what, from, to, field) in cases {
            assert!(GOOD.contains(from), "{what}: fixture does not contain {from:?}");
            let text = GOOD.replacen(from, to, 1);
            let err = Config::parse(&text, "case").expect_err(what);
            assert!(err.errors.iter().any(|e| e.field.starts_with(field)), "{what}: expected an error at {field}, got {err}");
            assert!(err.to_string().contains(field), "{what}: message does not name {field}: {err}");
        }
    }

    /// Validation forms products and sums of user numbers (three probe intervals, the
    /// classes' rates): at their type's maximum they are refused at their field, stating
    /// the maximum, and nothing overflows.
    #[test]
    fn the_largest_numbers_are_refused_at_their_field_without_overflow() {
        let mut file: ConfigFile = toml::from_str(GOOD).unwrap();
        file.probe.interval_ms = u64::MAX;
        let errs = validate_on(&file, &[0, 1].into_iter().collect()).unwrap_err();
        // Only the interval: the window's floor is not formed from an invalid interval.
        assert_eq!(errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["probe.interval_ms"], "{errs:?}");
        assert!(errs[0].reason.contains("10 to 60000 ms"), "{}", errs[0].reason);

        file.ranking.interval_ms = u64::MAX;
        file.ranking.window_ms = u64::MAX;
        file.ranking.evidence_ms = u64::MAX;
        file.failover.announce_count = u32::MAX;
        file.failover.announce_interval_ms = u64::MAX;
        file.failover.failback_hold_down_ms = u64::MAX;
        let errs = validate_on(&file, &[0, 1].into_iter().collect()).unwrap_err();
        for (field, max) in [
            ("probe.interval_ms", "60000"),
            ("ranking.interval_ms", "600000"),
            ("ranking.window_ms", "3600000"),
            ("ranking.evidence_ms", "3600000"),
            ("failover.announce_count", "50"),
            ("failover.announce_interval_ms", "60000"),
            ("failover.failback_hold_down_ms", "86400000"),
        ] {
            let e = errs.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("no error at {field}: {errs:?}"));
            assert!(e.reason.contains(max), "{field} does not state its maximum {max}: {}", e.reason);
        }
    }

    /// `validate` counts what the file puts in the dataplane (`capacity::check`): here one
    /// probe path more than there are probe slots, which the prober would silently skip.
    #[test]
    fn a_file_beyond_a_dataplane_capacity_is_refused_naming_the_limit() {
        let targets = |n: u32| (0..n).map(|i| format!("\"198.19.{}.{}\"", i >> 8, i & 0xff)).collect::<Vec<_>>().join(", ");
        let file = |n| format!("[[nic]]\nname = \"eth0\"\n[[vip]]\naddress = \"198.18.0.10\"\ntargets = [{}]\n", targets(n));
        Config::parse(&file(4096), "at the limit").unwrap();
        let err = Config::parse(&file(4097), "over").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].field, "vip[*].targets");
        assert!(err.to_string().contains("4097 probe paths") && err.to_string().contains("at most 4096"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_field_written_at_their_line() {
        let text = "[[nic]]\nname = \"a0\"\n[[vip]]\naddress = \"198.18.0.1\"\n[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"b\"\n\
                    port = 2\n[[service.instance]]\nvip = \"198.18.0.1\"\nport = 3\n[[service.instance]]\nvip = \"198.18.0.1\"\n\
                    port = 18446744073709551616\n";
        let err = Config::parse(text, "t").unwrap_err();
        assert_eq!(err.errors[0].field, "service[1].instance[1].port", "{err}");
        assert_eq!(field_at_line("[probe]\n interval_ms = 1\n", 2).as_deref(), Some("probe.interval_ms"));
        assert_eq!(field_at_line("[probe]\n", 1), None);
    }

    #[test]
    fn conflicting_mappings_are_rejected() {
        let text = format!(
            "{GOOD}
[[service]]
name = \"web2\"
port = 80
[[service.instance]]
vip = \"198.18.0.10\"
port = 9000
"
        );
        let err = Config::parse(&text, "dup").unwrap_err();
        assert!(err.to_string().contains("already the designated endpoint of service `web`"), "{err}");

        let text = format!(
            "{GOOD}
[[service]]
name = \"ssh\"
port = 8081
[[service.instance]]
vip = \"198.18.0.10\"
port = 2222
"
        );
        let err = Config::parse(&text, "overlap").unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = GOOD.replacen("port = 8081", "port = 0", 1).replacen("address = \"198.18.0.10\"", "address = \"0.0.0.0\"", 1);
        let err = Config::parse(&text, "many").unwrap_err();
        assert!(err.errors.len() >= 2, "{err}");
    }

    #[test]
    fn the_example_configs_are_valid() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}
