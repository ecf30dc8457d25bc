//! Is the pinned dataplane one this build's programs can use? A restarted havipd adopts
//! the maps a previous one pinned, and aya reuses a pinned map of the same name whatever
//! its shape, so programs of another layout would read the old bytes as their own types.
//! Before anything is loaded (and before the CLI reads a map), the pins are checked:
//!
//! - the layout version pinned in `HAVIP_LAYOUT` must be this build's
//!   [`m::LAYOUT_VERSION`]; maps pinned without it come from before versioning;
//! - every map the eBPF object defines that is already pinned must have the object's
//!   type, key size, value size and capacity (this catches a forgotten version bump,
//!   except for a change of meaning at the same size, which only the version can).
//!
//! No pins at all is a fresh dataplane: nothing to check, and havipd writes the version
//! once the loader has created the maps.

use std::{collections::BTreeMap, fmt, path::Path};

use anyhow::Context;
use aya::maps::{Array, Map, MapData, MapInfo};
use havip_common::maps as m;

use crate::kernel::pins::{PinLayout, DEFAULT_PIN_ROOT};

/// What the kernel knows of a map's layout (`bpf_map_info`), and all the programs assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapShape {
    fn of(info: &MapInfo) -> anyhow::Result<Self> {
        Ok(Self { map_type: info.map_type()? as u32, key_size: info.key_size(), value_size: info.value_size(), max_entries: info.max_entries() })
    }
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, key {} B, value {} B, {} entries", type_name(self.map_type), self.key_size, self.value_size, self.max_entries)
    }
}

/// `BPF_MAP_TYPE_*` names of the types havip uses (others by number).
fn type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        10 => "lru_percpu_hash".into(),
        16 => "cpumap".into(),
        other => format!("map type {other}"),
    }
}

const BPF_MAP_TYPE_DEVMAP: u32 = 14;
const BPF_MAP_TYPE_CPUMAP: u32 = 16;
const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;

/// The pinned version, as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinnedVersion {
    /// `HAVIP_LAYOUT` is not pinned.
    Absent,
    Value(u32),
    /// Pinned but not a readable `u32` array (its shape, reported separately, says why).
    Unreadable(String),
}

/// One reason the pins cannot be adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Maps are pinned without a version: made by a havipd from before layout versioning.
    Unversioned {
        pinned_maps: usize,
    },
    Version {
        pinned: u32,
        expected: u32,
    },
    VersionUnreadable(String),
    Shape {
        map: String,
        pinned: MapShape,
        expected: MapShape,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Unversioned { pinned_maps } => write!(
                f,
                "{pinned_maps} map(s) are pinned but {} is not: they were made by a havipd from before layout versioning (this build expects layout version {})",
                m::LAYOUT,
                m::LAYOUT_VERSION
            ),
            // Version 0 is what the map holds between its creation and havipd's first write.
            Mismatch::Version { pinned: 0, expected } => write!(
                f,
                "{}: pinned layout version 0 (never written: the havipd that created the pins stopped before finishing), this build expects {expected}",
                m::LAYOUT
            ),
            Mismatch::Version { pinned, expected } => write!(f, "{}: pinned layout version {pinned}, this build expects {expected}", m::LAYOUT),
            Mismatch::VersionUnreadable(e) => write!(f, "{}: the pinned layout version cannot be read: {e}", m::LAYOUT),
            Mismatch::Shape { map, pinned, expected } => write!(f, "map {map}: pinned {pinned}; this build expects {expected}"),
        }
    }
}

/// Why the pins cannot be adopted (pure: the table tests cover it).
///
/// `expected`: every pinned-by-name map of the object. `pinned`: those of them found under
/// the pin root, as the kernel describes them. Maps the object does not define are not
/// compared: they are never opened.
pub fn mismatches(expected: &BTreeMap<String, MapShape>, pinned: &BTreeMap<String, MapShape>, version: &PinnedVersion) -> Vec<Mismatch> {
    if pinned.is_empty() {
        // Fresh pins; an unreadable or absent version here means nothing is pinned at all.
        return Vec::new();
    }
    let mut out = Vec::new();
    match version {
        PinnedVersion::Absent => out.push(Mismatch::Unversioned { pinned_maps: pinned.len() }),
        PinnedVersion::Value(v) if *v != m::LAYOUT_VERSION => out.push(Mismatch::Version { pinned: *v, expected: m::LAYOUT_VERSION }),
        PinnedVersion::Value(_) => {}
        PinnedVersion::Unreadable(e) => out.push(Mismatch::VersionUnreadable(e.clone())),
    }
    for (name, p) in pinned {
        if let Some(e) = expected.get(name) {
            if e != p {
                out.push(Mismatch::Shape { map: name.clone(), pinned: *p, expected: *e });
            }
        }
    }
    out
}

/// The shape of every map `object` pins by name, as the loader will create it.
pub fn expected_shapes(object: &[u8]) -> anyhow::Result<BTreeMap<String, MapShape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the embedded eBPF object")?;
    let mut out = BTreeMap::new();
    for (name, map) in &obj.maps {
        if map.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let map_type = map.map_type();
        // aya's loader sizes cpumap and devmap values by what the kernel supports: 8 bytes
        // (queue size or ifindex, and a program) on every kernel havip runs on (>= 6.6).
        // Its other adjustment (perf event arrays and ring buffers) concerns no havip map.
        let value_size = match map_type {
            BPF_MAP_TYPE_CPUMAP | BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_DEVMAP_HASH => 8,
            _ => map.value_size(),
        };
        out.insert(name.clone(), MapShape { map_type, key_size: map.key_size(), value_size, max_entries: map.max_entries() });
    }
    Ok(out)
}

/// The pinned maps among `names`, as the kernel describes them.
fn pinned_shapes<'a>(pins: &PinLayout, names: impl Iterator<Item = &'a String>) -> anyhow::Result<BTreeMap<String, MapShape>> {
    let mut out = BTreeMap::new();
    for name in names {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).with_context(|| format!("cannot open pinned map {}", path.display()))?;
        out.insert(name.clone(), MapShape::of(&info).with_context(|| format!("reading the type of {}", path.display()))?);
    }
    Ok(out)
}

fn pinned_version(pins: &PinLayout) -> PinnedVersion {
    let path = pins.map(m::LAYOUT);
    if !path.exists() {
        return PinnedVersion::Absent;
    }
    let read = || -> anyhow::Result<u32> {
        let map: Array<MapData, u32> = Map::from_map_data(MapData::from_pin(&path)?)?.try_into()?;
        Ok(map.get(&0, 0)?)
    };
    match read() {
        Ok(v) => PinnedVersion::Value(v),
        Err(e) => PinnedVersion::Unreadable(format!("{e:#}")),
    }
}

/// Refuses pins that programs with the maps `expected` (see [`expected_shapes`]) cannot
/// use, naming every mismatch and what to do. Only reads: call it before loading anything.
pub fn check(pins: &PinLayout, expected: &BTreeMap<String, MapShape>) -> anyhow::Result<()> {
    let pinned = pinned_shapes(pins, expected.keys())?;
    let found = mismatches(expected, &pinned, &pinned_version(pins));
    if found.is_empty() {
        return Ok(());
    }
    anyhow::bail!("{}", refusal(&pins.root, &found))
}

/// The error text for `found` (not empty): every mismatch, and what to do.
pub fn refusal(root: &Path, found: &[Mismatch]) -> String {
    let mut s = format!(
        "the dataplane pinned at {} has another layout than this build of havip (layout version {}) uses; nothing was changed:\n",
        root.display(),
        m::LAYOUT_VERSION
    );
    for f in found {
        s += &format!("  - {f}\n");
    }
    s += "Run `havip down` to remove the old dataplane (this interrupts traffic), then start havipd again";
    if root != Path::new(DEFAULT_PIN_ROOT) {
        s += &format!(" (both with --pin-path {})", root.display());
    }
    s.push('.');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = 1;
    const ARRAY: u32 = 2;

    fn shape(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> MapShape {
        MapShape { map_type, key_size, value_size, max_entries }
    }

    fn maps(list: &[(&str, MapShape)]) -> BTreeMap<String, MapShape> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn mismatches_table() {
        let vips = shape(HASH, 16, 8, 4096);
        let layout = shape(ARRAY, 4, 4, 1);
        let expected = maps(&[("HAVIP_VIPS", vips), ("HAVIP_LAYOUT", layout)]);
        let ok = PinnedVersion::Value(m::LAYOUT_VERSION);
        let other = m::LAYOUT_VERSION + 1;
        let shape_of = |map: &str, pinned: MapShape, expected: MapShape| Mismatch::Shape { map: map.into(), pinned, expected };
        // (what, pinned maps, pinned version, the mismatches reported)
        type Case = (&'static str, BTreeMap<String, MapShape>, PinnedVersion, Vec<Mismatch>);
        let cases: Vec<Case> = vec![
            ("fresh: nothing pinned", maps(&[]), PinnedVersion::Absent, vec![]),
            ("same layout", expected.clone(), ok.clone(), vec![]),
            ("some maps not pinned yet (the loader creates them)", maps(&[("HAVIP_LAYOUT", layout)]), ok.clone(), vec![]),
            ("another version", expected.clone(), PinnedVersion::Value(other), vec![Mismatch::Version { pinned: other, expected: m::LAYOUT_VERSION }]),
            ("version never written", expected.clone(), PinnedVersion::Value(0), vec![Mismatch::Version { pinned: 0, expected: m::LAYOUT_VERSION }]),
            ("maps from before versioning", maps(&[("HAVIP_VIPS", vips)]), PinnedVersion::Absent, vec![Mismatch::Unversioned { pinned_maps: 1 }]),
            (
                "other capacity",
                maps(&[("HAVIP_VIPS", shape(HASH, 16, 8, 8192)), ("HAVIP_LAYOUT", layout)]),
                ok.clone(),
                vec![shape_of("HAVIP_VIPS", shape(HASH, 16, 8, 8192), vips)],
            ),
            ("other key size", maps(&[("HAVIP_VIPS", shape(HASH, 20, 8, 4096))]), ok.clone(), vec![shape_of("HAVIP_VIPS", shape(HASH, 20, 8, 4096), vips)]),
            ("other value size", maps(&[("HAVIP_VIPS", shape(HASH, 16, 12, 4096))]), ok.clone(), vec![shape_of("HAVIP_VIPS", shape(HASH, 16, 12, 4096), vips)]),
            ("other type", maps(&[("HAVIP_VIPS", shape(9, 16, 8, 4096))]), ok.clone(), vec![shape_of("HAVIP_VIPS", shape(9, 16, 8, 4096), vips)]),
            (
                "version map of another shape: both reported",
                maps(&[("HAVIP_LAYOUT", shape(ARRAY, 4, 8, 1))]),
                PinnedVersion::Unreadable("value size".into()),
                vec![Mismatch::VersionUnreadable("value size".into()), shape_of("HAVIP_LAYOUT", shape(ARRAY, 4, 8, 1), layout)],
            ),
            (
                "every mismatch at once, in map order",
                maps(&[("HAVIP_VIPS", shape(HASH, 16, 8, 1)), ("HAVIP_LAYOUT", shape(ARRAY, 4, 4, 2))]),
                PinnedVersion::Value(other),
                vec![
                    Mismatch::Version { pinned: other, expected: m::LAYOUT_VERSION },
                    shape_of("HAVIP_LAYOUT", shape(ARRAY, 4, 4, 2), layout),
                    shape_of("HAVIP_VIPS", shape(HASH, 16, 8, 1), vips),
                ],
            ),
        ];
        for (what, pinned, version, want) in cases {
            assert_eq!(mismatches(&expected, &pinned, &version), want, "{what}");
        }
    }

    #[test]
    fn a_pinned_map_the_object_does_not_define_is_not_compared() {
        let expected = maps(&[("HAVIP_VIPS", shape(HASH, 16, 8, 4096))]);
        // `pinned` only ever holds the object's names, but the function must not depend on it.
        let pinned = maps(&[("HAVIP_VIPS", shape(HASH, 16, 8, 4096)), ("HAVIP_GONE", shape(ARRAY, 4, 4, 1))]);
        assert_eq!(mismatches(&expected, &pinned, &PinnedVersion::Value(m::LAYOUT_VERSION)), vec![]);
    }

    #[test]
    fn the_refusal_names_each_mismatch_and_what_to_do() {
        let found = [
            Mismatch::Version { pinned: 7, expected: m::LAYOUT_VERSION },
            Mismatch::Shape { map: "HAVIP_NICS".into(), pinned: shape(HASH, 4, 32, 128), expected: shape(HASH, 4, 32, 64) },
        ];
        let text = refusal(Path::new(DEFAULT_PIN_ROOT), &found);
        assert!(text.contains("HAVIP_LAYOUT: pinned layout version 7, this build expects"), "{text}");
        assert!(
            text.contains("map HAVIP_NICS: pinned hash, key 4 B, value 32 B, 128 entries; this build expects hash, key 4 B, value 32 B, 64 entries"),
            "{text}"
        );
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(text.ends_with("Run `havip down` to remove the old dataplane (this interrupts traffic), then start havipd again."), "{text}");
        let text = refusal(Path::new("/sys/fs/bpf/other"), &found);
        assert!(text.ends_with("(both with --pin-path /sys/fs/bpf/other)."), "{text}");
    }

    /// The object this build embeds pins every map `havip_common::maps` names, the version
    /// map included, with the capacities named there.
    #[test]
    fn the_embedded_object_defines_every_map_with_its_capacity() {
        let Ok(object) = crate::kernel::dataplane::ebpf_object() else {
            panic!("no eBPF object embedded: build with `cargo xtask build`");
        };
        let shapes = expected_shapes(object).unwrap();
        for name in m::ALL {
            assert!(shapes.contains_key(name), "{name} is not a pinned map of the object");
        }
        assert_eq!(shapes[m::LAYOUT], shape(ARRAY, 4, 4, m::LAYOUT_LEN));
        assert_eq!(shapes[m::VIPS].max_entries, m::VIPS_MAX);
        assert_eq!(shapes[m::CPUMAP].value_size, 8);
    }
}
