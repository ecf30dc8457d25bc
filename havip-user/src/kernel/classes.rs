//! The kernel's side of application classes: stable class ids, the `ClassInfo` each class
//! is written as, and the HTB tree a NIC gets. The classes themselves are configuration
//! (`config::classes`); this module only translates them.

use std::collections::{BTreeMap, BTreeSet};

use havip_common::{ClassInfo, CLASSES_MAX};

use crate::{
    config::classes::{Class, Classes, Egress, DEFAULT_EGRESS_RATE_BPS},
    kernel::qdisc::{skb_priority, HtbClass, HtbSpec},
};

/// HTB class of traffic in no class (non-VIP traffic, ARP, probes, classless VIPs).
pub const UNCLASSIFIED_MINOR: u16 = 0xfff0;
/// What unclassified traffic is guaranteed at least, of the NIC's rate.
const UNCLASSIFIED_MIN_SHARE: u64 = 100;

/// A class's HTB minor: fixed by its id, so reloads that keep a class keep its queue.
pub const fn class_minor(id: u32) -> u16 {
    0x10 + id as u16
}

/// Class ids: kept for classes that exist in `current` (id -> name), new ones take the
/// lowest free id (1..CLASSES_MAX; 0 is "no class").
pub fn assign_ids(classes: &Classes, current: &BTreeMap<u32, String>) -> BTreeMap<String, u32> {
    let mut ids = BTreeMap::new();
    for (id, name) in current {
        if classes.classes.contains_key(name) {
            ids.insert(name.clone(), *id);
        }
    }
    let used: BTreeSet<u32> = ids.values().copied().collect();
    let mut free = (1..CLASSES_MAX).filter(|i| !used.contains(i));
    for name in classes.classes.keys() {
        if !ids.contains_key(name) {
            ids.insert(name.clone(), free.next().expect("class count is validated below CLASSES_MAX"));
        }
    }
    ids
}

/// The kernel's view of a class.
pub fn class_info(class: &Class, id: u32) -> ClassInfo {
    let mut info = ClassInfo { ncpus: class.cpus.len() as u32, name: havip_common::names::padded(&class.name), ..Default::default() };
    info.cpus[..class.cpus.len()].copy_from_slice(&class.cpus);
    if class.egress.is_some() {
        info.skb_priority = skb_priority(class_minor(id));
    }
    info
}

/// The HTB havip keeps on `nic`, or `None` when no class has an egress rate.
pub fn htb_spec(classes: &Classes, ids: &BTreeMap<String, u32>, nic: &str) -> Option<HtbSpec> {
    let egress: Vec<(u32, Egress)> = classes.classes.values().filter_map(|c| Some((*ids.get(&c.name)?, c.egress?))).collect();
    if egress.is_empty() {
        return None;
    }
    let root = classes.nics.get(nic).map_or(DEFAULT_EGRESS_RATE_BPS, |n| n.rate_bps);
    let guaranteed: u64 = egress.iter().map(|(_, e)| e.rate_bps).sum();
    let mut leaves: Vec<HtbClass> =
        egress.iter().map(|(id, e)| HtbClass { minor: class_minor(*id), rate_bps: e.rate_bps, ceil_bps: e.ceil_bps, prio: e.priority }).collect();
    // Unclassified traffic gets what the classes leave, at least 1% of the NIC, served last.
    let rest = root.saturating_sub(guaranteed).max(root / UNCLASSIFIED_MIN_SHARE).max(8_000);
    leaves.push(HtbClass { minor: UNCLASSIFIED_MINOR, rate_bps: rest, ceil_bps: root, prio: 7 });
    Some(HtbSpec { rate_bps: root, default_minor: UNCLASSIFIED_MINOR, classes: leaves })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::classes::tests::{parse, CLASSED};

    #[test]
    fn ids_are_kept_across_reloads_and_new_classes_take_free_ones() {
        let c = parse(CLASSED).unwrap();
        let first = assign_ids(&c.classes, &BTreeMap::new());
        assert_eq!(first["bulk"], 1);
        assert_eq!(first["latency"], 2);
        // `bulk` is renamed `backup`: `latency` keeps 2, the new class takes 1 only after
        // `bulk`'s is free, which it is (it is gone from the config).
        let text = CLASSED.replace("[class.bulk]", "[class.backup]").replace("class = \"bulk\"", "class = \"backup\"");
        let c2 = parse(&text).unwrap();
        let current: BTreeMap<u32, String> = first.iter().map(|(n, i)| (*i, n.clone())).collect();
        let second = assign_ids(&c2.classes, &current);
        assert_eq!(second["latency"], 2);
        assert_eq!(second["backup"], 1);
    }

    #[test]
    fn each_nic_gets_the_classes_and_an_unclassified_class_served_last() {
        let c = parse(CLASSED).unwrap();
        let ids = assign_ids(&c.classes, &BTreeMap::new());
        let spec = htb_spec(&c.classes, &ids, "a0").unwrap();
        assert_eq!(spec.rate_bps, 100_000_000);
        assert_eq!(spec.default_minor, UNCLASSIFIED_MINOR);
        let lat = spec.classes.iter().find(|k| k.minor == class_minor(ids["latency"])).unwrap();
        assert_eq!((lat.rate_bps, lat.ceil_bps, lat.prio), (10_000_000, 100_000_000, 0));
        let rest = spec.classes.iter().find(|k| k.minor == UNCLASSIFIED_MINOR).unwrap();
        assert_eq!((rest.rate_bps, rest.ceil_bps, rest.prio), (70_000_000, 100_000_000, 7));
        // The kernel's view carries the HTB class as skb priority and the CPU queue.
        let info = class_info(&c.classes.classes["latency"], ids["latency"]);
        assert_eq!(info.skb_priority, skb_priority(class_minor(ids["latency"])));
        assert_eq!((info.ncpus, info.cpus[0]), (1, 0));
        assert_eq!(info.name(), "latency");
        // Without egress rates there is no HTB.
        let text = CLASSED.replace("rate = \"10mbit\"\nceil = \"100mbit\"", "").replace("rate = \"20mbit\"\nceil = \"50mbit\"", "");
        let c3 = parse(&text).unwrap();
        assert!(htb_spec(&c3.classes, &ids, "a0").is_none());
    }
}
