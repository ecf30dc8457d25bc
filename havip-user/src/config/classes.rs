//! Application classes (the per-category addresses of the seed design): traffic of one
//! class never queues behind another's. Each class has its own CPU queues on ingress (the
//! XDP program redirects into a cpumap) and its own HTB class on egress (the TC program
//! sets skb->priority, which HTB classifies by).
//!
//! A VIP has a default class and (protocol, port) entries may override it. On a NIC
//! failure, the class of the VIP's default class decides:
//! - `merge` (the seed's conditional forwarding): the VIP fails over to any surviving
//!   candidate, sharing it with other classes;
//! - `isolate` (unconditional): the VIP never moves onto a NIC that is the home (first
//!   candidate) of a VIP of another class; with its own NICs down it stays unreachable.
//!
//! Both revert when the NIC returns, through the binder's normal failback. `isolate` is
//! applied here, once, by removing the other classes' NICs from the VIP's candidates, so
//! the binder and the quality ranking need to know nothing about classes.

use std::collections::{BTreeMap, BTreeSet};

use havip_common::CLASS_CPUS_MAX;
use serde::{Deserialize, Serialize};

use crate::config::{
    rate::{format_rate, parse_rate},
    ConfigFile, Protocol, Vip,
};

/// `[class.NAME]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSection {
    /// CPUs whose queues process the class's ingress (a flow stays on one). Leave out to
    /// process it where it arrives.
    #[serde(default)]
    pub cpus: Option<Vec<u32>>,
    /// Frames each of those CPU queues holds before the kernel drops (1-16384). A CPU's
    /// queue is shared by the classes on it, so they must agree.
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
    /// Egress rate guaranteed to the class on each NIC (tc units: "20mbit"). Leave out for
    /// no egress class.
    #[serde(default)]
    pub rate: Option<String>,
    /// What it may borrow up to when others are idle (default: the rate).
    #[serde(default)]
    pub ceil: Option<String>,
    /// HTB priority, 0 (served first) to 7.
    #[serde(default)]
    pub priority: u8,
    /// `merge` or `isolate`: see the module documentation.
    #[serde(default)]
    pub on_nic_failure: NicFailure,
}

fn default_queue_size() -> u32 {
    2048
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NicFailure {
    #[default]
    Merge,
    Isolate,
}

/// `[[vip.port_class]]`: a port of the VIP with a class of its own.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortClassSection {
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// The designated port (as clients address it).
    pub port: u16,
    pub class: String,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// A class's egress HTB settings, bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub priority: u8,
}

/// A validated class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub name: String,
    pub cpus: Vec<u32>,
    pub queue_size: u32,
    pub egress: Option<Egress>,
    pub on_nic_failure: NicFailure,
}

/// A NIC's egress shaping settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicEgress {
    pub rate_bps: u64,
    pub replace_qdisc: bool,
}

/// Every class, by name, and each NIC's egress settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classes {
    pub classes: BTreeMap<String, Class>,
    pub nics: BTreeMap<String, NicEgress>,
}

impl Classes {
    /// Whether any class has an egress rate, so NICs get havip's HTB.
    pub fn needs_htb(&self) -> bool {
        self.classes.values().any(|c| c.egress.is_some())
    }

    /// Whether any class has CPU queues (which only an XDP hook can feed).
    pub fn cpu_queues(&self) -> bool {
        self.classes.values().any(|c| !c.cpus.is_empty())
    }
}

pub const DEFAULT_EGRESS_RATE_BPS: u64 = 10_000_000_000;

/// The highest rate havip shapes to: 10 Tbit/s, above any NIC's, and low enough that the
/// rates of every class add up without overflowing.
pub const MAX_RATE_BPS: u64 = 10_000_000_000_000;

/// `parse_rate`, refusing rates above [`MAX_RATE_BPS`].
fn parse_bounded_rate(s: &str) -> Result<u64, String> {
    match parse_rate(s)? {
        r if r > MAX_RATE_BPS => Err(format!("{s:?} is more than {}, the highest rate havip shapes to", format_rate(MAX_RATE_BPS))),
        r => Ok(r),
    }
}

/// Class names label stats and metrics, and are stored in the kernel's `ClassInfo`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 15 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a valid class name: use 1-15 of a-z, 0-9, '_' and '-'"))
    }
}

/// The CPUs this machine has online (`/sys/devices/system/cpu/online`, e.g. "0-3,6").
pub fn online_cpus() -> BTreeSet<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut out = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|n| n.parse::<u32>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => {
                out.insert(a);
            }
            (Some(Ok(a)), Some(Ok(b))) => out.extend(a..=b),
            _ => {}
        }
    }
    if out.is_empty() {
        let n = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        out.extend(0..n);
    }
    out
}

/// Validates `[class.*]`, the VIPs' classes and the NICs' egress settings; fills each VIP's
/// classes and applies `isolate` to its candidates. Problems go to `err`.
pub fn validate(file: &ConfigFile, vips: &mut [Vip], online: &BTreeSet<u32>, err: &mut impl FnMut(String, String)) -> Classes {
    let mut out = Classes::default();
    // A CPU's queue is one queue: the classes sharing it must agree on its size.
    let mut queue_sizes: BTreeMap<u32, (u32, &str)> = BTreeMap::new();
    for (name, c) in &file.class {
        let at = |f: &str| format!("class.{name}.{f}");
        if let Err(r) = check_name(name) {
            err(format!("class.{name}"), r);
        }
        if !(1..=16384).contains(&c.queue_size) {
            err(at("queue_size"), format!("{} is out of range; a CPU queue holds 1 to 16384 frames", c.queue_size));
        }
        let cpus = c.cpus.clone().unwrap_or_default();
        if c.cpus.as_ref().is_some_and(|v| v.is_empty()) {
            err(at("cpus"), "is empty; list CPUs (e.g. [2, 3]) or leave it out to process the class where it arrives".into());
        }
        if cpus.len() > CLASS_CPUS_MAX {
            err(at("cpus"), format!("{} CPUs listed, at most {CLASS_CPUS_MAX} per class", cpus.len()));
        }
        let mut seen = BTreeSet::new();
        for (j, &cpu) in cpus.iter().enumerate() {
            if !online.contains(&cpu) {
                let have: Vec<String> = online.iter().map(u32::to_string).collect();
                err(format!("class.{name}.cpus[{j}]"), format!("CPU {cpu} does not exist or is offline; this machine has CPUs {}", have.join(", ")));
            } else if !seen.insert(cpu) {
                err(format!("class.{name}.cpus[{j}]"), format!("CPU {cpu} is listed twice"));
            } else if let Some((size, other)) = queue_sizes.insert(cpu, (c.queue_size, name)) {
                if size != c.queue_size {
                    err(at("queue_size"), format!("{} differs from class `{other}`'s {size}, which shares CPU {cpu}'s queue; make them equal", c.queue_size));
                }
            }
        }
        let egress = match (&c.rate, &c.ceil) {
            (None, None) => None,
            (None, Some(_)) => {
                err(at("ceil"), "is set without a rate; give the class a rate too".into());
                None
            }
            (Some(rate), ceil) => {
                let rate = match parse_bounded_rate(rate) {
                    Ok(0) => {
                        err(at("rate"), "is zero; a class needs a rate above zero (leave it out for no egress class)".into());
                        None
                    }
                    Ok(r) => Some(r),
                    Err(e) => {
                        err(at("rate"), e);
                        None
                    }
                };
                let ceil = match ceil.as_deref().map(parse_bounded_rate) {
                    None => rate,
                    Some(Ok(c)) => Some(c),
                    Some(Err(e)) => {
                        err(at("ceil"), e);
                        None
                    }
                };
                match (rate, ceil) {
                    (Some(r), Some(top)) if top < r => {
                        err(at("ceil"), format!("{} is below the rate {}; the ceiling must be at least the rate", format_rate(top), format_rate(r)));
                        None
                    }
                    (Some(r), Some(top)) => Some(Egress { rate_bps: r, ceil_bps: top, priority: c.priority.min(7) }),
                    _ => None,
                }
            }
        };
        if c.priority > 7 {
            err(at("priority"), format!("{} is out of range; HTB priorities are 0 (served first) to 7", c.priority));
        }
        out.classes.insert(name.clone(), Class { name: name.clone(), cpus, queue_size: c.queue_size, egress, on_nic_failure: c.on_nic_failure });
    }

    // NIC egress: the HTB root each classed NIC gets. Rates are bounded, so the sum of 63
    // cannot overflow; it is formed checked all the same (`None`: more than any NIC has).
    let sum_rates: Option<u64> = out.classes.values().filter_map(|c| c.egress).try_fold(0u64, |sum, e| sum.checked_add(e.rate_bps));
    for (i, nic) in file.nic.iter().enumerate() {
        let rate = match nic.egress_rate.as_deref().map(parse_bounded_rate) {
            None => DEFAULT_EGRESS_RATE_BPS,
            Some(Ok(0)) => {
                err(format!("nic[{i}].egress_rate"), "is zero; give the NIC's usable egress rate (or leave it out)".into());
                continue;
            }
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                err(format!("nic[{i}].egress_rate"), e);
                continue;
            }
        };
        if sum_rates.is_none_or(|sum| sum > rate) {
            let sum = sum_rates.map_or_else(|| "beyond any rate".to_string(), format_rate);
            err(
                format!("nic[{i}].egress_rate"),
                format!("{} is below the sum of the classes' rates ({sum}); lower the rates or raise egress_rate", format_rate(rate)),
            );
        }
        for c in out.classes.values() {
            if let Some(e) = c.egress {
                if e.ceil_bps > rate {
                    err(
                        format!("class.{}.ceil", c.name),
                        format!(
                            "{} is above NIC `{}`'s egress_rate {}; a class cannot borrow more than the NIC has",
                            format_rate(e.ceil_bps),
                            nic.name,
                            format_rate(rate)
                        ),
                    );
                }
            }
        }
        out.nics.insert(nic.name.clone(), NicEgress { rate_bps: rate, replace_qdisc: nic.replace_qdisc });
    }

    // VIPs: their classes, then `isolate`.
    for (i, (section, vip)) in file.vip.iter().zip(vips.iter_mut()).enumerate() {
        if let Some(c) = &section.class {
            if !out.classes.contains_key(c) {
                err(format!("vip[{i}].class"), unknown_class(c, &out));
            }
        }
        for (j, pc) in section.port_class.iter().enumerate() {
            let at = |f: &str| format!("vip[{i}].port_class[{j}].{f}");
            if pc.port == 0 {
                err(at("port"), "0 is not a port; give the designated port clients address".into());
            }
            if !out.classes.contains_key(&pc.class) {
                err(at("class"), unknown_class(&pc.class, &out));
            }
            if vip.port_classes.insert((pc.protocol, pc.port), pc.class.clone()).is_some() {
                err(at("port"), format!("{} port {} already has a class", pc.protocol, pc.port));
            }
        }
    }
    apply_isolation(vips, &out);
    out
}

fn unknown_class(name: &str, classes: &Classes) -> String {
    let known: Vec<&str> = classes.classes.keys().map(String::as_str).collect();
    if known.is_empty() {
        format!("class `{name}` is not defined; add a [class.{name}] section")
    } else {
        format!("class `{name}` is not defined (defined: {}); add a [class.{name}] section or fix the name", known.join(", "))
    }
}

/// Removes from each `isolate` VIP's candidates the NICs that are home to VIPs of other
/// classes (or of none). A VIP's own first NIC always stays.
fn apply_isolation(vips: &mut [Vip], classes: &Classes) {
    let homes: Vec<(String, Option<String>)> = vips.iter().filter_map(|v| v.nics.first().map(|n| (n.clone(), v.class.clone()))).collect();
    for vip in vips.iter_mut() {
        let Some(class) = vip.class.as_ref().and_then(|c| classes.classes.get(c)) else {
            continue;
        };
        if class.on_nic_failure != NicFailure::Isolate {
            continue;
        }
        let first = vip.nics.first().cloned();
        let others = |n: &String| homes.iter().any(|(home, c)| home == n && c.as_deref() != Some(class.name.as_str()));
        let (keep, drop): (Vec<String>, Vec<String>) = vip.nics.iter().cloned().partition(|n| Some(n) == first.as_ref() || !others(n));
        vip.nics = keep;
        vip.isolated_from = drop;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;

    /// Two NICs, a latency VIP at home on a0 and a bulk VIP at home on b0.
    pub(crate) const CLASSED: &str = r#"
[[nic]]
name = "a0"
egress_rate = "100mbit"
[[nic]]
name = "b0"

[class.latency]
cpus = [0]
rate = "10mbit"
ceil = "100mbit"
priority = 0
on_nic_failure = "isolate"

[class.bulk]
cpus = [1]
rate = "20mbit"
ceil = "50mbit"
priority = 7

[[vip]]
address = "198.18.0.10"
nics = ["a0", "b0"]
class = "latency"
[[vip.port_class]]
protocol = "udp"
port = 5001
class = "bulk"

[[vip]]
address = "198.18.0.11"
nics = ["b0", "a0"]
class = "bulk"
"#;

    pub(crate) fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        // Validation against a fixed two-CPU machine, whatever runs the test.
        let file: ConfigFile = toml::from_str(text).unwrap();
        crate::config::validate_on(&file, &[0, 1].into_iter().collect()).map_err(|errors| crate::config::ConfigError { source_name: "test".into(), errors })
    }

    #[test]
    fn classes_parse_with_their_queues_rates_and_policies() {
        let c = parse(CLASSED).unwrap();
        let lat = &c.classes.classes["latency"];
        assert_eq!(lat.cpus, [0]);
        assert_eq!(lat.queue_size, 2048);
        assert_eq!(lat.egress, Some(Egress { rate_bps: 10_000_000, ceil_bps: 100_000_000, priority: 0 }));
        assert_eq!(c.classes.nics["a0"].rate_bps, 100_000_000);
        assert_eq!(c.classes.nics["b0"].rate_bps, DEFAULT_EGRESS_RATE_BPS);
        assert_eq!(c.vips[0].port_classes[&(Protocol::Udp, 5001)], "bulk");
    }

    #[test]
    fn isolate_keeps_a_vip_off_other_classes_home_nics_and_merge_does_not() {
        let c = parse(CLASSED).unwrap();
        // latency isolates: b0 is bulk's home.
        assert_eq!(c.vips[0].nics, ["a0"]);
        assert_eq!(c.vips[0].isolated_from, ["b0"]);
        // bulk merges: it may fail over onto latency's a0.
        assert_eq!(c.vips[1].nics, ["b0", "a0"]);
        assert!(c.vips[1].isolated_from.is_empty());
    }

    #[test]
    fn bad_class_input_is_rejected_with_the_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("unknown VIP class", "a0\"]\nclass = \"bulk\"", "a0\"]\nclass = \"bluk\"", "vip[1].class"),
            ("unknown port class", "class = \"bulk\"\n\n[[vip]]", "class = \"nope\"\n\n[[vip]]", "vip[0].port_class[0].class"),
            ("CPU that does not exist", "cpus = [1]", "cpus = [7]", "class.bulk.cpus[0]"),
            ("empty CPU list", "cpus = [1]", "cpus = []", "class.bulk.cpus"),
            ("rate of zero", "rate = \"20mbit\"", "rate = \"0mbit\"", "class.bulk.rate"),
            ("ceiling below rate", "ceil = \"50mbit\"", "ceil = \"5mbit\"", "class.bulk.ceil"),
            ("rate in bytes", "rate = \"20mbit\"", "rate = \"20mbps\"", "class.bulk.rate"),
            ("priority out of range", "priority = 7", "priority = 9", "class.bulk.priority"),
            ("policy typo", "on_nic_failure = \"isolate\"", "on_nic_failure = \"island\"", "class.latency.on_nic_failure"),
            ("class typo field", "priority = 0", "prio = 0", "class.latency"),
            ("classes above the NIC", "egress_rate = \"100mbit\"", "egress_rate = \"25mbit\"", "nic[0].egress_rate"),
            ("ceiling above the NIC", "egress_rate = \"100mbit\"", "egress_rate = \"40mbit\"", "class.latency.ceil"),
            ("zero NIC rate", "egress_rate = \"100mbit\"", "egress_rate = \"0bit\"", "nic[0].egress_rate"),
            ("queue size zero", "cpus = [1]", "cpus = [1]\nqueue_size = 0", "class.bulk.queue_size"),
            ("shared CPU, other queue size", "cpus = [1]", "cpus = [0]\nqueue_size = 64", "class.latency.queue_size"),
            ("bad class name", "[class.bulk]", "[class.Bulk]", "class.Bulk"),
            ("TC hook with CPU queues", "[[nic]]\nname = \"a0\"", "[node]\nxdp_mode = \"tc\"\n[[nic]]\nname = \"a0\"", "node.xdp_mode"),
            ("rate above the maximum", "rate = \"20mbit\"", "rate = \"10001gbit\"", "class.bulk.rate"),
            ("ceiling above the maximum", "ceil = \"50mbit\"", "ceil = \"18446744073gbit\"", "class.bulk.ceil"),
            ("NIC rate above the maximum", "egress_rate = \"100mbit\"", "egress_rate = \"10000.001gbit\"", "nic[0].egress_rate"),
            // Two rates whose sum overflows u64 (each below u64::MAX): checked, not wrapped.
            (
                "rates summing past u64",
                "egress_rate = \"100mbit\"",
                "egress_rate = \"10000gbit\"\n[class.huge1]\nrate = \"9300000000gbit\"\n[class.huge2]\nrate = \"9300000000gbit\"",
                "class.huge1.rate",
            ),
        ];
        for (what, from, to, field) in cases {
            assert!(CLASSED.contains(from), "{what}: fixture does not contain {from:?}");
            let text = CLASSED.replacen(from, to, 1);
            let err = match toml::from_str::<ConfigFile>(&text) {
                // Type errors surface in the strict parse, with their path.
                Err(_) => Config::parse(&text, "case").expect_err(what),
                Ok(_) => parse(&text).expect_err(what),
            };
            assert!(err.errors.iter().any(|e| e.field.starts_with(field)), "{what}: expected an error at {field}, got {err}");
        }
    }

    #[test]
    fn the_tc_hook_is_accepted_where_no_class_has_cpu_queues() {
        let text = format!("[node]\nxdp_mode = \"tc\"\n{}", CLASSED.replace("cpus = [0]\n", "").replace("cpus = [1]\n", ""));
        let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.classes.cpu_queues());
        assert!(parse(CLASSED).unwrap().classes.cpu_queues());
    }

    #[test]
    fn cpus_beyond_the_cpu_queue_map_are_refused_even_when_online() {
        // A machine with more CPUs online than the cpumap has entries.
        let file: ConfigFile = toml::from_str(&CLASSED.replacen("cpus = [1]", "cpus = [255, 256]", 1)).unwrap();
        let errs = crate::config::validate_on(&file, &(0..300).collect()).unwrap_err();
        assert_eq!(errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["class.bulk.cpus[1]"], "{errs:?}");
        assert!(errs[0].reason.contains("CPU 256") && errs[0].reason.contains("0 to 255"), "{}", errs[0].reason);
    }
}
