//! What to write to the maps: the difference between the state a configuration asks for and
//! the state the (pinned) maps hold. Pure functions, so reload, restart adoption and their
//! edge cases are tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};

use havip_common::{
    maps::{CLASS_STATS_MAX, PORT_WORDS}, vip_slot, ClassInfo, ClassStatsKey, InlineRemap, PortClass, PortValue, RemapKey, VipInfo, VipKey, VipSlot, INLINE_REMAPS, SLOT_IN_OVERFLOW,
    SLOT_OUT_OVERFLOW, SLOT_OWNED, SLOT_SHARED, VIP_FENCED, VIP_PORT_CLASSES,
};

use crate::{
    config::classes::Classes,
    config::Config,
    kernel::classes::{assign_ids, class_info},
};

/// The dataplane state a configuration asks for (which NIC owns each VIP is the binder's
/// business, see `binder`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub vips: BTreeSet<VipKey>,
    /// (VIP, protocol, designated port) -> instance port, ports in host order.
    pub remaps: BTreeMap<(VipKey, u8, u16), u16>,
    pub classes: Classes,
    /// VIP -> its default class.
    pub vip_classes: BTreeMap<VipKey, String>,
    /// (VIP, protocol, designated port in host order) -> class.
    pub port_classes: BTreeMap<(VipKey, u8, u16), String>,
    /// Cluster mode: every VIP is fenced (`VIP_FENCED`), served only while its fence says so.
    pub fenced: bool,
}

impl Desired {
    pub fn from_config(cfg: &Config) -> Self {
        let vips = cfg.vips.iter().map(|v| VipKey::from(v.address)).collect();
        let remaps = cfg.remaps.iter().map(|r| ((VipKey::from(r.vip), r.protocol.number(), r.designated_port), r.instance_port)).collect();
        let vip_classes = cfg.vips.iter().filter_map(|v| Some((VipKey::from(v.address), v.class.clone()?))).collect();
        let port_classes =
            cfg.vips.iter().flat_map(|v| v.port_classes.iter().map(move |(&(p, port), c)| ((VipKey::from(v.address), p.number(), port), c.clone()))).collect();
        Self { vips, remaps, classes: cfg.classes.clone(), vip_classes, port_classes, fenced: cfg.cluster.is_some() }
    }
}

/// What the maps hold now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub remap_in: BTreeMap<RemapKey, PortValue>,
    pub remap_out: BTreeMap<RemapKey, PortValue>,
    /// All `PORT_BITMAP_LEN` words.
    pub port_bitmap: Vec<u64>,
    /// Non-empty slots of `VIP_SLOTS`.
    pub slots: BTreeMap<u32, VipSlot>,
    /// Non-empty entries of `CLASSES`.
    pub classes: BTreeMap<u32, ClassInfo>,
    pub port_classes: BTreeMap<RemapKey, PortClass>,
    /// (VIP id, class) -> its `CLASS_STATS` index (`CLASS_STATS_INDEX`).
    pub class_stats: BTreeMap<ClassStatsKey, u32>,
    /// CPU -> queue size of the cpumap entries that run this havipd's CPU-queue program
    /// (entries of an earlier program count as absent, so they are rewritten).
    pub cpumap: BTreeMap<u32, u32>,
}

impl Actual {
    /// Class id -> name, as the kernel holds them.
    pub fn class_names(&self) -> BTreeMap<u32, String> {
        self.classes.iter().map(|(id, info)| (*id, info.name().to_string())).collect()
    }
}

/// Map writes, in the order they must be applied so that no packet ever sees a VIP
/// without its mappings or a mapping pointing nowhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Counter slots of newly assigned VIP ids, zeroed before the VIP appears.
    pub zero_new_stats: Vec<u32>,
    /// CPU queues (cpu, size) created or resized before a class points at them.
    pub cpumap_sets: Vec<(u32, u32)>,
    /// (VIP, class) counters given their index, zeroed, before a VIP or port names it.
    pub class_stats_creates: Vec<(ClassStatsKey, u32)>,
    pub class_upserts: Vec<(u32, ClassInfo)>,
    pub port_class_upserts: Vec<(RemapKey, PortClass)>,
    /// Bitmap words set to the union of old and new bits, before mappings appear.
    pub bitmap_grow: Vec<(u32, u64)>,
    pub remap_in_upserts: Vec<(RemapKey, PortValue)>,
    pub remap_out_upserts: Vec<(RemapKey, PortValue)>,
    pub vip_upserts: Vec<(VipKey, VipInfo)>,
    /// Fast-path slots, written once the tables they summarise are in place.
    pub slot_writes: Vec<(u32, VipSlot)>,
    pub slot_clears: Vec<u32>,
    pub vip_deletes: Vec<VipKey>,
    pub remap_in_deletes: Vec<RemapKey>,
    pub remap_out_deletes: Vec<RemapKey>,
    /// Bitmap words set to exactly the new bits, after stale mappings are gone.
    pub bitmap_shrink: Vec<(u32, u64)>,
    pub port_class_deletes: Vec<RemapKey>,
    pub class_clears: Vec<u32>,
    pub class_stats_deletes: Vec<ClassStatsKey>,
    pub cpumap_deletes: Vec<u32>,
    /// Counter slots of freed VIP ids, zeroed last.
    pub zero_freed_stats: Vec<u32>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// A one-line summary for logs and the reload status.
    pub fn summary(&self) -> String {
        format!(
            "{} VIP(s) added or changed, {} removed; {} mapping(s) added or changed, {} removed; {} class(es) added or changed, {} removed",
            self.vip_upserts.len(),
            self.vip_deletes.len(),
            self.remap_in_upserts.len(),
            self.remap_in_deletes.len(),
            self.class_upserts.len(),
            self.class_clears.len()
        )
    }
}

fn set_bit(words: &mut [u64], base: u32, port: u16) {
    let i = (base + (port as u32 >> 6)) as usize;
    words[i] |= 1u64 << (port & 63);
}

/// Computes the writes that turn `actual` into `desired`. VIPs keep their ids (and so their
/// counters) across reloads and restarts; new VIPs take the lowest id no VIP holds now.
pub fn plan(desired: &Desired, actual: &Actual) -> Changes {
    let mut ch = Changes::default();

    // Classes first: VIPs refer to them by id.
    let class_ids = assign_ids(&desired.classes, &actual.class_names());
    let mut want_classes = BTreeMap::new();
    let mut want_cpumap = BTreeMap::new();
    for (name, class) in &desired.classes.classes {
        let id = class_ids[name];
        want_classes.insert(id, class_info(class, id));
        for &cpu in &class.cpus {
            want_cpumap.insert(cpu, class.queue_size);
        }
    }
    ch.cpumap_sets = want_cpumap.iter().filter(|(c, q)| actual.cpumap.get(c) != Some(q)).map(|(c, q)| (*c, *q)).collect();
    ch.cpumap_deletes = actual.cpumap.keys().filter(|c| !want_cpumap.contains_key(c)).copied().collect();
    ch.class_upserts = want_classes.iter().filter(|(i, v)| actual.classes.get(i) != Some(v)).map(|(i, v)| (*i, *v)).collect();
    ch.class_clears = actual.classes.keys().filter(|i| !want_classes.contains_key(i)).copied().collect();
    let class_of = |vip: &VipKey| desired.vip_classes.get(vip).map_or(0, |c| class_ids[c]);
    let has_port_classes: BTreeSet<VipKey> = desired.port_classes.keys().map(|(v, _, _)| *v).collect();

    // Ids: keep existing ones; allocate new ones outside every id in use now, so a removed
    // VIP's id (whose mappings are deleted later in this round) is not reused yet.
    let used: BTreeSet<u32> = actual.vips.values().map(|v| v.id).collect();
    let mut free_ids = (0u32..).filter(|id| !used.contains(id));
    let mut ids: BTreeMap<VipKey, u32> = BTreeMap::new();
    for key in &desired.vips {
        let id = match actual.vips.get(key) {
            Some(old) => old.id,
            None => {
                let id = free_ids.next().expect("ids are u32, VIP count is bounded");
                ch.zero_new_stats.push(id);
                id
            }
        };
        ids.insert(*key, id);
    }

    // (VIP, class) counters: every class a VIP's traffic can be counted in, each at a
    // `CLASS_STATS` index. A pair keeps its index (and counts) across reloads and
    // restarts; a new pair takes the lowest index no pair holds now, and only when there
    // is none left one a pair leaving in this round held (whose last packets might then
    // count for the new pair).
    let mut want_stats = BTreeSet::new();
    for key in &desired.vips {
        if class_of(key) != 0 {
            want_stats.insert(ClassStatsKey { vip_id: ids[key], class: class_of(key) });
        }
    }
    let port_class_ids: BTreeMap<RemapKey, ClassStatsKey> = desired
        .port_classes
        .iter()
        .filter_map(|(&(vip, proto, port), class)| {
            let (id, class) = (*ids.get(&vip)?, *class_ids.get(class)?);
            Some((RemapKey::new(id, proto, port.to_be()), ClassStatsKey { vip_id: id, class }))
        })
        .collect();
    want_stats.extend(port_class_ids.values().copied());
    let held: BTreeSet<u32> = actual.class_stats.values().copied().collect();
    let kept: BTreeSet<u32> = actual.class_stats.iter().filter(|(k, _)| want_stats.contains(k)).map(|(_, i)| *i).collect();
    let mut free_stats = (0..CLASS_STATS_MAX).filter(|i| !held.contains(i)).chain((0..CLASS_STATS_MAX).filter(|i| held.contains(i) && !kept.contains(i)));
    let mut stats_index: BTreeMap<ClassStatsKey, u32> = BTreeMap::new();
    for k in &want_stats {
        let i = match actual.class_stats.get(k) {
            Some(&i) => i,
            None => {
                // The capacity check at config load keeps pairs within CLASS_STATS_MAX.
                let i = free_stats.next().expect("more (VIP, class) pairs than CLASS_STATS_MAX passed the capacity check");
                ch.class_stats_creates.push((*k, i));
                i
            }
        };
        stats_index.insert(*k, i);
    }
    ch.class_stats_deletes = actual.class_stats.keys().filter(|k| !want_stats.contains(k)).copied().collect();

    let mut infos: BTreeMap<VipKey, VipInfo> = BTreeMap::new();
    for key in &desired.vips {
        let id = ids[key];
        let flags = if has_port_classes.contains(key) { VIP_PORT_CLASSES } else { 0 } | if desired.fenced { VIP_FENCED } else { 0 };
        let class = class_of(key);
        let class_stats = if class != 0 { stats_index[&ClassStatsKey { vip_id: id, class }] } else { 0 };
        let info = VipInfo { id, flags, class, class_stats };
        infos.insert(*key, info);
        if actual.vips.get(key) != Some(&info) {
            ch.vip_upserts.push((*key, info));
        }
    }
    for (key, old) in &actual.vips {
        if !desired.vips.contains(key) {
            ch.vip_deletes.push(*key);
            ch.zero_freed_stats.push(old.id);
        }
    }

    // Mappings in both directions, and the bitmap they imply.
    let mut want_in = BTreeMap::new();
    let mut want_out = BTreeMap::new();
    let mut bitmap = vec![0u64; actual.port_bitmap.len().max(2 * PORT_WORDS as usize)];
    for (&(vip, proto, designated), &instance) in &desired.remaps {
        let Some(&id) = ids.get(&vip) else { continue };
        want_in.insert(RemapKey::new(id, proto, designated.to_be()), PortValue { port_be: instance.to_be(), _pad: 0 });
        want_out.insert(RemapKey::new(id, proto, instance.to_be()), PortValue { port_be: designated.to_be(), _pad: 0 });
        set_bit(&mut bitmap, 0, designated);
        set_bit(&mut bitmap, PORT_WORDS, instance);
    }
    let diff = |want: &BTreeMap<RemapKey, PortValue>, have: &BTreeMap<RemapKey, PortValue>| {
        let upserts: Vec<_> = want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
        let deletes: Vec<_> = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
        (upserts, deletes)
    };
    (ch.remap_in_upserts, ch.remap_in_deletes) = diff(&want_in, &actual.remap_in);
    (ch.remap_out_upserts, ch.remap_out_deletes) = diff(&want_out, &actual.remap_out);

    // Fast-path slots: the lowest address among the VIPs hashing to a slot owns it.
    let mut groups: BTreeMap<u32, Vec<VipKey>> = BTreeMap::new();
    for key in &desired.vips {
        groups.entry(vip_slot(key)).or_default().push(*key);
    }
    let inline = |want: &BTreeMap<RemapKey, PortValue>, id: u32| -> ([InlineRemap; INLINE_REMAPS], bool) {
        let mut entries = [InlineRemap::default(); INLINE_REMAPS];
        let mine: Vec<_> = want.iter().filter(|(k, _)| k.vip_id == id).collect();
        for (e, (k, v)) in entries.iter_mut().zip(&mine) {
            *e = InlineRemap { from_be: k.port_be, to_be: v.port_be, proto: k.proto, _pad: [0; 3] };
        }
        (entries, mine.len() > INLINE_REMAPS)
    };
    let mut want_slots = BTreeMap::new();
    for (&idx, keys) in &groups {
        let owner = keys[0];
        let info = infos[&owner];
        let (remap_in, in_overflow) = inline(&want_in, info.id);
        let (remap_out, out_overflow) = inline(&want_out, info.id);
        let mut flags = SLOT_OWNED;
        if keys.len() > 1 {
            flags |= SLOT_SHARED;
        }
        if in_overflow {
            flags |= SLOT_IN_OVERFLOW;
        }
        if out_overflow {
            flags |= SLOT_OUT_OVERFLOW;
        }
        want_slots.insert(idx, VipSlot { key: owner, info, flags, _pad: 0, remap_in, remap_out });
    }
    ch.slot_writes = want_slots.iter().filter(|(i, v)| actual.slots.get(i) != Some(v)).map(|(i, v)| (*i, *v)).collect();
    ch.slot_clears = actual.slots.keys().filter(|i| !want_slots.contains_key(i)).copied().collect();

    // Ports with their own class, each with its (VIP, class) counters.
    let want_ports: BTreeMap<RemapKey, PortClass> = port_class_ids.iter().map(|(rk, k)| (*rk, PortClass { class: k.class, stats: stats_index[k] })).collect();
    ch.port_class_upserts = want_ports.iter().filter(|(k, v)| actual.port_classes.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    ch.port_class_deletes = actual.port_classes.keys().filter(|k| !want_ports.contains_key(k)).copied().collect();

    for (i, &new) in bitmap.iter().enumerate() {
        let old = actual.port_bitmap.get(i).copied().unwrap_or(0);
        if old | new != old {
            ch.bitmap_grow.push((i as u32, old | new));
        }
        if old | new != new {
            ch.bitmap_shrink.push((i as u32, new));
        }
    }
    ch
}

/// Applies `changes` to `actual` as the kernel maps end up once they are written: the
/// dataplane keeps its view of the maps current this way instead of reading them all back
/// before every plan, and tests check that planning again after applying yields nothing.
pub fn apply_to(actual: &mut Actual, ch: &Changes) {
    let words = actual.port_bitmap.len().max(2 * PORT_WORDS as usize);
    actual.port_bitmap.resize(words, 0);
    for &(i, w) in ch.bitmap_grow.iter().chain(&ch.bitmap_shrink) {
        actual.port_bitmap[i as usize] = w;
    }
    for (k, v) in &ch.remap_in_upserts {
        actual.remap_in.insert(*k, *v);
    }
    for (k, v) in &ch.remap_out_upserts {
        actual.remap_out.insert(*k, *v);
    }
    for (k, v) in &ch.vip_upserts {
        actual.vips.insert(*k, *v);
    }
    for (i, v) in &ch.slot_writes {
        actual.slots.insert(*i, *v);
    }
    for i in &ch.slot_clears {
        actual.slots.remove(i);
    }
    for k in &ch.vip_deletes {
        actual.vips.remove(k);
    }
    for k in &ch.remap_in_deletes {
        actual.remap_in.remove(k);
    }
    for k in &ch.remap_out_deletes {
        actual.remap_out.remove(k);
    }
    for &(c, q) in &ch.cpumap_sets {
        actual.cpumap.insert(c, q);
    }
    for c in &ch.cpumap_deletes {
        actual.cpumap.remove(c);
    }
    for (i, v) in &ch.class_upserts {
        actual.classes.insert(*i, *v);
    }
    for i in &ch.class_clears {
        actual.classes.remove(i);
    }
    for (k, v) in &ch.port_class_upserts {
        actual.port_classes.insert(*k, *v);
    }
    for k in &ch.port_class_deletes {
        actual.port_classes.remove(k);
    }
    actual.class_stats.extend(ch.class_stats_creates.iter().copied());
    for k in &ch.class_stats_deletes {
        actual.class_stats.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(s: &str) -> VipKey {
        VipKey::from(s.parse::<IpAddr>().unwrap())
    }

    fn desired(vips: &[&str], remaps: &[(&str, u16, u16)]) -> Desired {
        Desired { vips: vips.iter().map(|v| key(v)).collect(), remaps: remaps.iter().map(|&(v, d, i)| ((key(v), 6, d), i)).collect(), ..Default::default() }
    }

    fn converge(d: &Desired, actual: &mut Actual) -> Changes {
        let ch = plan(d, actual);
        apply_to(actual, &ch);
        assert!(plan(d, actual).is_empty(), "second plan is not empty: {:?}", plan(d, actual));
        ch
    }

    #[test]
    fn from_empty_installs_everything_then_nothing_more() {
        let mut a = Actual::default();
        let d = desired(&["198.18.0.1", "2001:db8::1"], &[("198.18.0.1", 80, 8081), ("2001:db8::1", 80, 8082)]);
        let ch = converge(&d, &mut a);
        assert_eq!(ch.vip_upserts.len(), 2);
        assert_eq!(ch.remap_in_upserts.len(), 2);
        assert_eq!(ch.remap_out_upserts.len(), 2);
        assert_eq!(ch.zero_new_stats, vec![0, 1]);
        // Port 80 in the ingress words, 8081 and 8082 in the egress words.
        assert_eq!(a.port_bitmap[(80 >> 6) as usize], 1 << (80 & 63));
        let w = (PORT_WORDS + (8081 >> 6)) as usize;
        assert_eq!(a.port_bitmap[w], (1 << (8081 & 63)) | (1 << (8082 & 63)));
    }

    #[test]
    fn reload_changes_only_the_difference_and_keeps_ids() {
        let mut a = Actual::default();
        converge(&desired(&["198.18.0.1", "198.18.0.2"], &[("198.18.0.1", 80, 8081), ("198.18.0.2", 80, 8082)]), &mut a);
        let id2 = a.vips[&key("198.18.0.2")].id;
        let ch = converge(&desired(&["198.18.0.2", "198.18.0.3"], &[("198.18.0.2", 80, 8083)]), &mut a);
        assert_eq!(ch.vip_deletes, vec![key("198.18.0.1")]);
        assert_eq!(ch.vip_upserts.len(), 1, "only the new VIP is written: {ch:?}");
        assert_eq!(a.vips[&key("198.18.0.2")].id, id2, "a kept VIP keeps its id");
        // The freed id 0 is not reused in the same round.
        assert_eq!(a.vips[&key("198.18.0.3")].id, 2);
        assert_eq!(ch.zero_freed_stats, vec![0]);
        assert_eq!(ch.remap_in_upserts.len(), 1);
        assert_eq!(ch.remap_in_deletes.len(), 1);
        assert_eq!(ch.remap_out_deletes.len(), 2, "8081 and 8082 reverse entries go");
        // Bits of 8081 and 8082 are gone, 8083 is set.
        let w = (PORT_WORDS + (8081 >> 6)) as usize;
        assert_eq!(a.port_bitmap[w], 1 << (8083 & 63));
    }

    #[test]
    fn empty_config_removes_everything() {
        let mut a = Actual::default();
        converge(&desired(&["198.18.0.1"], &[("198.18.0.1", 80, 8081)]), &mut a);
        converge(&Desired::default(), &mut a);
        assert!(a.vips.is_empty() && a.remap_in.is_empty() && a.remap_out.is_empty());
        assert!(a.port_bitmap.iter().all(|&w| w == 0));
    }

    #[test]
    fn bitmap_grows_before_and_shrinks_after() {
        let mut a = Actual::default();
        converge(&desired(&["198.18.0.1"], &[("198.18.0.1", 80, 8081)]), &mut a);
        let ch = plan(&desired(&["198.18.0.1"], &[("198.18.0.1", 81, 8081)]), &a);
        // Word of ports 64..127 holds 80 now and 81 after: grow to both, shrink to 81.
        assert_eq!(ch.bitmap_grow, vec![(1, (1 << 16) | (1 << 17))]);
        assert_eq!(ch.bitmap_shrink, vec![(1, 1 << 17)]);
    }

    /// Two addresses that hash to the same slot.
    fn colliding_pair() -> (String, String) {
        let mut seen = std::collections::HashMap::new();
        for i in 0..65536u32 {
            let a = format!("198.18.{}.{}", i >> 8, i & 0xff);
            if let Some(b) = seen.insert(vip_slot(&key(&a)), a.clone()) {
                return (b, a);
            }
        }
        unreachable!("16384 slots, 65536 addresses")
    }

    #[test]
    fn slots_hold_each_vip_and_its_first_mappings() {
        let mut a = Actual::default();
        converge(&desired(&["198.18.0.1"], &[("198.18.0.1", 80, 8081), ("198.18.0.1", 443, 8443)]), &mut a);
        let slot = a.slots[&vip_slot(&key("198.18.0.1"))];
        assert_eq!(slot.key, key("198.18.0.1"));
        assert_eq!(slot.flags, SLOT_OWNED);
        assert_eq!((slot.remap_in[0].proto, u16::from_be(slot.remap_in[0].from_be), u16::from_be(slot.remap_in[0].to_be)), (6, 80, 8081));
        assert_eq!(u16::from_be(slot.remap_out[1].from_be), 8443);
        assert_eq!(slot.remap_in[2].proto, 0, "unused entries are empty");
    }

    #[test]
    fn more_mappings_than_fit_inline_overflow_to_the_table() {
        let mut a = Actual::default();
        let remaps: Vec<(&str, u16, u16)> = (0..6).map(|i| ("198.18.0.1", 80 + i, 9000 + i)).collect();
        converge(&desired(&["198.18.0.1"], &remaps), &mut a);
        let slot = a.slots[&vip_slot(&key("198.18.0.1"))];
        assert_eq!(slot.flags, SLOT_OWNED | SLOT_IN_OVERFLOW | SLOT_OUT_OVERFLOW);
        assert_eq!(a.remap_in.len(), 6, "the table keeps every mapping");
    }

    #[test]
    fn vips_sharing_a_slot_mark_it_shared_and_ownership_passes_on() {
        let (x, y) = colliding_pair();
        let mut a = Actual::default();
        converge(&desired(&[&x, &y], &[]), &mut a);
        let idx = vip_slot(&key(&x));
        assert_eq!(a.slots.len(), 1);
        assert_eq!(a.slots[&idx].key, key(&x).min(key(&y)));
        assert_eq!(a.slots[&idx].flags, SLOT_OWNED | SLOT_SHARED);
        // Remove the owner: the other VIP takes the slot, no longer shared.
        let owner = if key(&x) < key(&y) { x.clone() } else { y.clone() };
        let other = if owner == x { y.clone() } else { x.clone() };
        converge(&desired(&[&other], &[]), &mut a);
        assert_eq!(a.slots[&idx].key, key(&other));
        assert_eq!(a.slots[&idx].flags, SLOT_OWNED);
        converge(&Desired::default(), &mut a);
        assert!(a.slots.is_empty());
    }

    #[test]
    fn classes_queues_and_counters_follow_the_config_and_reload_removes_them() {
        let cfg = |classes: &str, vip_extra: &str| {
            let text = format!("[[nic]]\nname = \"a0\"\n{classes}\n[[vip]]\naddress = \"198.18.0.1\"\n{vip_extra}");
            let file: crate::config::ConfigFile = toml::from_str(&text).unwrap();
            Desired::from_config(&crate::config::validate_on(&file, &[0, 1].into_iter().collect()).unwrap())
        };
        let classes = "[class.latency]\ncpus = [0]\nqueue_size = 64\n[class.bulk]\ncpus = [1]\nrate = \"10mbit\"\n";
        let mut a = Actual::default();
        let ch = converge(&cfg(classes, "class = \"latency\"\n[[vip.port_class]]\nport = 9000\nclass = \"bulk\""), &mut a);
        assert_eq!(ch.cpumap_sets, vec![(0, 64), (1, 2048)]);
        let names = a.class_names();
        assert_eq!(names.values().collect::<Vec<_>>(), ["bulk", "latency"]);
        let (bulk, latency) = (1, 2);
        let info = a.vips[&key("198.18.0.1")];
        assert_eq!((info.class, info.flags), (latency, VIP_PORT_CLASSES));
        assert_eq!(a.slots[&vip_slot(&key("198.18.0.1"))].info, info, "the fast path carries the class too");
        // Each (VIP, class) pair has its own counters, and the VIP and the port carry the
        // index of theirs.
        let stats: Vec<_> = a.class_stats.iter().map(|(k, i)| (k.vip_id, k.class, *i)).collect();
        assert_eq!(stats, [(info.id, bulk, 0), (info.id, latency, 1)]);
        assert_eq!(a.port_classes[&RemapKey::new(info.id, 6, 9000u16.to_be())], PortClass { class: bulk, stats: 0 });
        assert_eq!(info.class_stats, 1);
        assert_eq!(a.classes[&latency].skb_priority, 0, "no rate: no HTB class");
        assert_ne!(a.classes[&bulk].skb_priority, 0);

        // Reload without classes: everything class-related goes, after the VIP stops
        // pointing at it.
        let ch = converge(&cfg("", ""), &mut a);
        assert_eq!(ch.class_clears, vec![bulk, latency]);
        assert_eq!(ch.cpumap_deletes, vec![0, 1]);
        assert_eq!(a.vips[&key("198.18.0.1")].class, 0);
        assert!(a.classes.is_empty() && a.port_classes.is_empty() && a.class_stats.is_empty() && a.cpumap.is_empty());
    }

    /// A (VIP, class) pair keeps its counters' index across reloads; a new pair takes an
    /// index no pair holds, and one freed in the same round only when none is left.
    #[test]
    fn class_counter_indices_are_kept_and_new_pairs_take_unheld_ones() {
        let mut a = Actual::default();
        let cfg = |vips: &[(&str, &str)]| {
            let mut text = "[[nic]]\nname = \"a0\"\n[class.gold]\n[class.bronze]\n".to_string();
            for (vip, class) in vips {
                text += &format!("[[vip]]\naddress = \"{vip}\"\nclass = \"{class}\"\n");
            }
            let file: crate::config::ConfigFile = toml::from_str(&text).unwrap();
            Desired::from_config(&crate::config::validate_on(&file, &[0, 1].into_iter().collect()).unwrap())
        };
        converge(&cfg(&[("198.18.0.1", "gold"), ("198.18.0.2", "bronze")]), &mut a);
        let index_of = |a: &Actual, vip: &str| a.vips[&key(vip)].class_stats;
        let (one, two) = (index_of(&a, "198.18.0.1"), index_of(&a, "198.18.0.2"));
        assert_ne!(one, two);
        // .2 leaves, .3 arrives in the same round: .1 keeps its index, .3 does not take .2's.
        let ch = converge(&cfg(&[("198.18.0.1", "gold"), ("198.18.0.3", "gold")]), &mut a);
        assert_eq!(index_of(&a, "198.18.0.1"), one);
        let three = index_of(&a, "198.18.0.3");
        assert!(three != one && three != two, "a new pair took an index held this round");
        assert_eq!(ch.class_stats_creates.len(), 1, "only the new pair is created (and zeroed)");
        assert_eq!(ch.class_stats_deletes.len(), 1);
        // The next round may reuse .2's old index: it is free now.
        converge(&cfg(&[("198.18.0.1", "gold"), ("198.18.0.3", "gold"), ("198.18.0.4", "bronze")]), &mut a);
        assert_eq!(index_of(&a, "198.18.0.4"), two);
    }
}
