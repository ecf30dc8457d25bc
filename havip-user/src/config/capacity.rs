//! The dataplane's capacities, and the one check of a configuration against them.
//!
//! The kernel maps are sized when the programs load (`havip_common::maps`). A write past a
//! hash map's size fails with E2BIG, and one past an array's end fails too, in the middle
//! of an apply, with some writes done. So everything a configuration puts in a map is
//! counted here, before anything is applied, by:
//! - config validation: the file, with every pool VIP counted as held (with its configured
//!   class), because the API may hand out any of them at any time;
//! - the pool, before it grants a request: the configuration the grant would put in force
//!   (`node::pool::overlay`), which adds a mapping and may add targets and a class;
//! - reload and start, for the file together with what applications hold.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use havip_common::{
    maps::{CLASS_STATS_MAX, NICS_MAX, PORT_CLASSES_MAX, PROBE_SLOTS_MAX, REMAPS_MAX, VIPS_MAX},
    CLASSES_MAX, CPUMAP_MAX,
};

use crate::config::{Config, Vip};

/// One capacity of the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    /// `HAVIP_NICS`, and the `HAVIP_NIC_STATS` slots it hands out.
    Nics,
    /// `HAVIP_VIPS`, and `HAVIP_BINDINGS` / `HAVIP_VIP_STATS`, indexed by VIP id.
    Vips,
    /// `HAVIP_REMAP_IN` and `HAVIP_REMAP_OUT`: one entry each per mapping.
    Mappings,
    /// `HAVIP_PORT_CLASSES`: one entry per `[[vip.port_class]]`.
    PortClasses,
    /// `HAVIP_CLASS_STATS`: one entry per (VIP, class) a VIP's traffic can be counted in.
    ClassCounters,
    /// `HAVIP_PROBE_SLOTS`: one slot per (candidate NIC, target) path.
    ProbePaths,
    /// `HAVIP_CLASSES`: ids 1 to 63 (0 is "no class").
    Classes,
    /// `HAVIP_CPUMAP`: CPU queues are indexed by CPU id.
    CpuId,
}

impl Limit {
    /// The most the dataplane holds; for [`Limit::CpuId`], the number of CPU ids (0 to max - 1).
    pub const fn max(self) -> usize {
        (match self {
            Limit::Nics => NICS_MAX,
            Limit::Vips => VIPS_MAX,
            Limit::Mappings => REMAPS_MAX,
            Limit::PortClasses => PORT_CLASSES_MAX,
            Limit::ClassCounters => CLASS_STATS_MAX,
            Limit::ProbePaths => PROBE_SLOTS_MAX,
            Limit::Classes => CLASSES_MAX - 1,
            Limit::CpuId => CPUMAP_MAX,
        }) as usize
    }

    /// What is counted, in the plural.
    pub const fn noun(self) -> &'static str {
        match self {
            Limit::Nics => "NICs",
            Limit::Vips => "VIPs (pool VIPs included)",
            Limit::Mappings => "mappings (VIP, protocol, designated port)",
            Limit::PortClasses => "port classes over all VIPs",
            Limit::ClassCounters => "(VIP, class) counters (each VIP's class and its port classes' classes)",
            Limit::ProbePaths => "probe paths ((candidate NIC, target) pairs over all VIPs)",
            Limit::Classes => "classes",
            Limit::CpuId => "CPU ids",
        }
    }

    /// What to change in the file to fit.
    const fn hint(self) -> &'static str {
        match self {
            Limit::Nics => "remove some [[nic]]",
            Limit::Vips => "remove some [[vip]]",
            Limit::Mappings => "remove instances, protocols or services",
            Limit::PortClasses => "remove some [[vip.port_class]]",
            Limit::ClassCounters => "give fewer VIPs or ports a class",
            Limit::ProbePaths => "give VIPs fewer targets or fewer candidate NICs",
            Limit::Classes => "remove some [class.NAME]",
            Limit::CpuId => "steer the class to lower CPUs",
        }
    }
}

/// A capacity a configuration exceeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub limit: Limit,
    /// The field path the count comes from (`vip[*].targets`: all VIPs' targets).
    pub field: String,
    /// How many the configuration needs; for [`Limit::CpuId`], the CPU id.
    pub count: usize,
}

impl Exceeded {
    /// The reason, worded for a configuration file.
    pub fn reason(&self) -> String {
        let max = self.limit.max();
        match self.limit {
            Limit::CpuId => format!("CPU {} is beyond the dataplane's CPU queue map, which holds CPUs 0 to {}; {}", self.count, max - 1, self.limit.hint()),
            l => format!("{} {} configured, the dataplane holds at most {max}; {}", self.count, l.noun(), l.hint()),
        }
    }
}

/// Every VIP the configuration can put in the dataplane, once each: the `vips` (where a
/// held pool VIP appears with what its holders added) first, then the pool VIPs not among
/// them.
fn dataplane_vips(cfg: &Config) -> impl Iterator<Item = &Vip> {
    let in_vips: HashSet<IpAddr> = cfg.vips.iter().map(|v| v.address).collect();
    cfg.vips.iter().chain(cfg.pool.iter().filter(move |v| !in_vips.contains(&v.address)))
}

/// Checks `cfg` against every capacity of the dataplane; returns each one it exceeds.
/// Pure; about a millisecond for a configuration that fills every map (release build).
pub fn check(cfg: &Config) -> Vec<Exceeded> {
    let mut out = Vec::new();
    let mut over = |limit: Limit, field: String, count: usize| {
        if count > limit.max() {
            out.push(Exceeded { limit, field, count });
        }
    };
    over(Limit::Nics, "nic".into(), cfg.nics.len());

    let mut vips = 0;
    let mut port_classes = 0;
    let mut class_counters = 0;
    for v in dataplane_vips(cfg) {
        vips += 1;
        port_classes += v.port_classes.len();
        // The kernel keeps one counter entry per distinct class a VIP's packets can take.
        let classes: BTreeSet<&str> = v.class.iter().chain(v.port_classes.values()).map(String::as_str).collect();
        class_counters += classes.len();
    }
    over(Limit::Vips, "vip".into(), vips);
    over(Limit::Mappings, "service".into(), cfg.remaps.len());
    over(Limit::PortClasses, "vip[*].port_class".into(), port_classes);
    over(Limit::ClassCounters, "vip[*].class".into(), class_counters);

    // Paths as the prober wants them: a path shared by several VIPs takes one slot, and a
    // held pool VIP's configured targets are a subset of its overlay's.
    let paths: BTreeSet<(&str, IpAddr)> =
        cfg.vips.iter().chain(&cfg.pool).flat_map(|v| v.nics.iter().flat_map(move |n| v.targets.iter().map(move |t| (n.as_str(), *t)))).collect();
    over(Limit::ProbePaths, "vip[*].targets".into(), paths.len());

    over(Limit::Classes, "class".into(), cfg.classes.classes.len());
    for (name, class) in &cfg.classes.classes {
        for (j, &cpu) in class.cpus.iter().enumerate() {
            if cpu as usize >= Limit::CpuId.max() {
                out.push(Exceeded { limit: Limit::CpuId, field: format!("class.{name}.cpus[{j}]"), count: cpu as usize });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{classes::Class, classes::NicFailure, Protocol, Remap};

    fn base() -> Config {
        Config::parse("[[nic]]\nname = \"a0\"\n", "base").unwrap()
    }

    fn vip(i: usize) -> Vip {
        Vip {
            nodes: Vec::new(),
            address: IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
            nics: vec!["a0".into()],
            targets: vec![],
            class: None,
            port_classes: BTreeMap::new(),
            isolated_from: vec![],
        }
    }

    fn class(name: &str, cpus: Vec<u32>) -> (String, Class) {
        (name.to_string(), Class { name: name.into(), cpus, queue_size: 64, egress: None, on_nic_failure: NicFailure::Merge })
    }

    /// A configuration that needs exactly `n` of `limit` and is well within every other.
    fn needing(limit: Limit, n: usize) -> Config {
        let mut c = base();
        match limit {
            Limit::Nics => c.nics = (0..n).map(|i| format!("n{i}")).collect(),
            Limit::Vips => {
                // Pool VIPs count as held: half of them are pool VIPs.
                c.vips = (0..n / 2).map(vip).collect();
                c.pool = (n / 2..n).map(vip).collect();
            }
            Limit::Mappings => {
                c.vips = (0..4).map(vip).collect();
                c.remaps = (0..n)
                    .map(|i| Remap {
                        vip: vip(i % 4).address,
                        protocol: Protocol::Tcp,
                        designated_port: (i / 4) as u16 + 1,
                        instance_port: 60000,
                        service: "s".into(),
                    })
                    .collect();
            }
            Limit::PortClasses => {
                c.classes.classes.extend([class("c", vec![])]);
                c.vips = (0..n.div_ceil(1000)).map(vip).collect();
                for i in 0..n {
                    c.vips[i / 1000].port_classes.insert((Protocol::Udp, (i % 1000) as u16 + 1), "c".into());
                }
            }
            Limit::ClassCounters => {
                // 4 classes on each of 4096 VIPs is 16384; one more port class of a fifth
                // class on the first VIP is one more counter.
                c.classes.classes.extend((0..5).map(|k| class(&format!("c{k}"), vec![])));
                let count = n.div_ceil(4).min(4096);
                c.vips = (0..count).map(vip).collect();
                for i in 0..n {
                    let v = &mut c.vips[i % count];
                    match v.class {
                        None => v.class = Some("c0".into()),
                        Some(_) => {
                            let k = v.port_classes.len() + 1;
                            v.port_classes.insert((Protocol::Tcp, k as u16), format!("c{k}"));
                        }
                    }
                }
                // The same class on another port adds no counter.
                c.vips[0].port_classes.insert((Protocol::Udp, 1), "c0".into());
            }
            Limit::ProbePaths => {
                c.nics = vec!["a0".into(), "b0".into()];
                let target = |i: usize| IpAddr::from([198, 19, (i >> 8) as u8, i as u8]);
                let mut v = vip(0);
                v.nics = c.nics.clone();
                v.targets = (0..n / 2).map(target).collect();
                // Another VIP probing the same paths adds none; an odd one out adds one.
                let mut same = v.clone();
                same.address = vip(1).address;
                c.vips = vec![v, same];
                if n % 2 == 1 {
                    let mut odd = vip(2);
                    odd.targets = vec![target(n)];
                    c.pool.push(odd);
                }
            }
            Limit::Classes => c.classes.classes.extend((0..n).map(|k| class(&format!("c{k}"), vec![]))),
            Limit::CpuId => c.classes.classes.extend([class("low", vec![0, 1]), class("high", vec![n as u32 - 1])]),
        }
        c
    }

    /// The table: each limit at its maximum is accepted, one more is refused at its field.
    #[test]
    fn every_limit_holds_its_maximum_and_refuses_one_more() {
        let table: &[(Limit, usize, &str)] = &[
            (Limit::Nics, 64, "nic"),
            (Limit::Vips, 16384, "vip"),
            (Limit::Mappings, 16384, "service"),
            (Limit::PortClasses, 16384, "vip[*].port_class"),
            (Limit::ClassCounters, 16384, "vip[*].class"),
            (Limit::ProbePaths, 4096, "vip[*].targets"),
            (Limit::Classes, 63, "class"),
            (Limit::CpuId, 256, "class.high.cpus[0]"),
        ];
        for &(limit, max, field) in table {
            assert_eq!(limit.max(), max, "{limit:?}: the table disagrees with havip_common");
            let at = check(&needing(limit, max));
            assert!(at.is_empty(), "{limit:?} at {max}: refused: {at:?}");
            let over = check(&needing(limit, max + 1));
            assert_eq!(over.len(), 1, "{limit:?} at {}: {over:?}", max + 1);
            let e = &over[0];
            assert_eq!((e.limit, e.field.as_str()), (limit, field));
            let reason = e.reason();
            if limit == Limit::CpuId {
                assert!(reason.starts_with("CPU 256 is beyond") && reason.contains("0 to 255"), "{reason}");
            } else {
                assert!(reason.starts_with(&format!("{} ", max + 1)) && reason.contains(&format!("at most {max}")), "{limit:?}: {reason}");
            }
        }
    }

    #[test]
    fn a_held_pool_vip_counts_once_with_what_its_holders_added() {
        let mut c = needing(Limit::Vips, 16384);
        c.classes.classes.extend([class("gold", vec![])]);
        // As `pool::overlay` puts a held pool VIP in force: in `vips` too, with a class.
        let mut held = c.pool[0].clone();
        held.class = Some("gold".into());
        c.vips.push(held);
        assert!(check(&c).is_empty(), "{:?}", check(&c));
        c.vips.push(vip(20000));
        assert_eq!(check(&c).iter().map(|e| (e.limit, e.count)).collect::<Vec<_>>(), [(Limit::Vips, 16385)]);
    }
}
