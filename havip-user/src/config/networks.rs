//! `[[cluster.network]]`: the address spaces a cluster's managing node generates VIPs from
//! (issue 13). Each network is a prefix with ranges; each range says how addresses are
//! picked from it, which are never handed out, and whether an address may be handed out
//! again after its release. Addresses are keyed by (network, address), so two networks
//! may hold the same address (tenants' private spaces overlap).
//!
//! ```toml
//! [[cluster.network]]
//! name = "prod"
//! prefix = "198.18.200.0/24"
//! [[cluster.network.range]]
//! first = "198.18.200.10"
//! last = "198.18.200.99"
//! method = "hash"          # sequential (default), random, or hash of the application id
//! exclude = ["198.18.200.50"]
//! reassign = false         # do-not-reassign: a released address is never handed out again
//! ```
//!
//! This module checks the rules and gives them address arithmetic; which address to hand
//! out is `cluster::vipgen`'s decision.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

use super::FieldError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// 1 to 63 of `[A-Za-z0-9._-]`: requests name the network they want a VIP from.
    pub name: String,
    /// The network, `address/length` with no host bits set.
    pub prefix: String,
    #[serde(default)]
    pub range: Vec<RangeSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RangeSection {
    pub first: IpAddr,
    pub last: IpAddr,
    #[serde(default)]
    pub method: Method,
    /// Addresses of the range never handed out (gateways, addresses in use elsewhere).
    #[serde(default)]
    pub exclude: Vec<IpAddr>,
    /// May an address be handed out again after its release? `false` is the
    /// do-not-reassign flag for the whole range (a single allocation may also carry it).
    #[serde(default = "yes")]
    pub reassign: bool,
}

fn yes() -> bool {
    true
}

/// How a range picks the next address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The lowest free address.
    #[default]
    Sequential,
    /// A free address at random.
    Random,
    /// Starting from a hash of the application id, so an application asking again gets
    /// the address it had whenever that one is free.
    Hash,
}

/// A validated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub prefix: Prefix,
    /// In the order given: the first with a free address serves a request.
    pub ranges: Vec<Range>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn contains(&self, a: IpAddr) -> bool {
        if a.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let bits = bits_of(a);
        let shift = bits - self.len as u32;
        shift >= 128 || (to_u128(a) >> shift) == (to_u128(self.addr) >> shift)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A validated range: `first..=last` of one family, minus `exclude`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: IpAddr,
    pub last: IpAddr,
    pub method: Method,
    pub exclude: BTreeSet<IpAddr>,
    pub reassign: bool,
}

impl Range {
    /// Addresses from `first` to `last` (exclusions included).
    pub fn size(&self) -> u128 {
        to_u128(self.last) - to_u128(self.first) + 1
    }
    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.first.is_ipv4() && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(a))
    }
    /// The `i`-th address (`i < size()`).
    pub fn nth(&self, i: u128) -> IpAddr {
        from_u128(to_u128(self.first) + i, self.first.is_ipv4())
    }
    /// Where `a` sits in the range (`a` in the range).
    pub fn index_of(&self, a: IpAddr) -> u128 {
        to_u128(a) - to_u128(self.first)
    }
}

fn bits_of(a: IpAddr) -> u32 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

pub fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| format!("`{s}` is not address/length, e.g. \"198.18.200.0/24\""))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("`{addr}` is not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| format!("`{len}` is not a prefix length"))?;
    let bits = bits_of(addr);
    if len as u32 > bits || len == 0 {
        return Err(format!("length {len} is out of range; use 1 to {bits}"));
    }
    let host_mask = if bits - len as u32 >= 128 { u128::MAX } else { (1u128 << (bits - len as u32)) - 1 };
    if to_u128(addr) & host_mask != 0 {
        let net = from_u128(to_u128(addr) & !host_mask, addr.is_ipv4());
        return Err(format!("`{s}` has host bits set; did you mean \"{net}/{len}\"?"));
    }
    Ok(Prefix { addr, len })
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("`{name}` must be 1 to 63 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// Validates every network; errors name the field (`cluster.network[i].range[j].first`).
/// The networks come back only if all of them are valid.
pub fn validate(sections: &[NetworkSection], errs: &mut Vec<FieldError>) -> Vec<Network> {
    let before = errs.len();
    let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });
    let mut names = BTreeMap::new();
    let mut out = Vec::new();
    for (i, n) in sections.iter().enumerate() {
        let at = format!("cluster.network[{i}]");
        if let Err(r) = check_name(&n.name) {
            err(format!("{at}.name"), r);
        } else if let Some(j) = names.insert(n.name.as_str(), i) {
            err(format!("{at}.name"), format!("`{}` is also the name of cluster.network[{j}]", n.name));
        }
        let prefix = match parse_prefix(&n.prefix) {
            Ok(p) => p,
            Err(r) => {
                err(format!("{at}.prefix"), r);
                continue;
            }
        };
        if n.range.is_empty() {
            err(format!("{at}.range"), "is empty; give at least one [[cluster.network.range]] with first and last".into());
        }
        let mut ranges: Vec<Range> = Vec::new();
        for (j, r) in n.range.iter().enumerate() {
            let at = format!("{at}.range[{j}]");
            let mut ok = true;
            for (field, a) in [("first", r.first), ("last", r.last)] {
                if !prefix.contains(a) {
                    err(format!("{at}.{field}"), format!("{a} is outside network `{}` ({prefix})", n.name));
                    ok = false;
                }
            }
            if !ok {
                continue;
            }
            if to_u128(r.first) > to_u128(r.last) {
                err(at.clone(), format!("is empty: first ({}) comes after last ({})", r.first, r.last));
                continue;
            }
            let range = Range { first: r.first, last: r.last, method: r.method, exclude: r.exclude.iter().copied().collect(), reassign: r.reassign };
            for (k, x) in r.exclude.iter().enumerate() {
                if !range.contains(*x) {
                    err(format!("{at}.exclude[{k}]"), format!("{x} is not in the range {}-{}", r.first, r.last));
                    ok = false;
                }
            }
            if ok && range.exclude.len() as u128 >= range.size() {
                err(at.clone(), format!("is empty: every address of {}-{} is excluded", r.first, r.last));
            }
            if let Some((k, other)) = ranges.iter().enumerate().find(|(_, o)| o.contains(range.first) || o.contains(range.last) || range.contains(o.first)) {
                err(
                    at.clone(),
                    format!("overlaps range[{k}] ({}-{}) of network `{}`; ranges of one network must not share addresses", other.first, other.last, n.name),
                );
            }
            // Kept even when invalid, so that later ranges are checked against it too.
            ranges.push(range);
        }
        out.push(Network { name: n.name.clone(), prefix, ranges });
    }
    if errs.len() > before {
        return Vec::new();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[network]]
name = "prod"
prefix = "198.18.200.0/24"
[[network.range]]
first = "198.18.200.10"
last = "198.18.200.19"
exclude = ["198.18.200.15"]
[[network.range]]
first = "198.18.200.100"
last = "198.18.200.199"
method = "hash"
reassign = false
[[network]]
name = "v6"
prefix = "2001:db8:200::/64"
[[network.range]]
first = "2001:db8:200::1"
last = "2001:db8:200::ffff:ffff"
method = "random"
"#;

    #[derive(Deserialize)]
    struct File {
        network: Vec<NetworkSection>,
    }

    fn check(text: &str) -> Result<Vec<Network>, Vec<FieldError>> {
        let f: File = toml::from_str(text).map_err(|e| vec![FieldError { field: "parse".into(), reason: e.to_string() }])?;
        let mut errs = Vec::new();
        let n = validate(&f.network, &mut errs);
        if errs.is_empty() {
            Ok(n)
        } else {
            Err(errs)
        }
    }

    #[test]
    fn good_rules_give_networks_with_their_ranges() {
        let n = check(GOOD).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].ranges[0].size(), 10);
        assert_eq!(n[0].ranges[1].method, Method::Hash);
        assert!(!n[0].ranges[1].reassign && n[0].ranges[0].reassign);
        assert_eq!(n[1].ranges[0].size(), 0xffff_ffff);
        assert_eq!(n[1].ranges[0].nth(2).to_string(), "2001:db8:200::3");
        assert!(n[1].prefix.contains("2001:db8:200::abcd".parse().unwrap()) && !n[1].prefix.contains("2001:db8:201::1".parse().unwrap()));
    }

    /// Bad rules are refused whole, each with the field it is about.
    #[test]
    fn bad_rules_are_refused_with_the_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("overlapping ranges in one network", "first = \"198.18.200.100\"", "first = \"198.18.200.19\"", "cluster.network[0].range[1]"),
            ("range outside its network", "last = \"198.18.200.199\"", "last = \"198.18.201.5\"", "cluster.network[0].range[1].last"),
            ("empty range: first after last", "first = \"198.18.200.100\"", "first = \"198.18.200.200\"", "cluster.network[0].range[1]"),
            (
                "empty range: all excluded",
                "exclude = [\"198.18.200.15\"]",
                "exclude = [\"198.18.200.10\", \"198.18.200.11\", \"198.18.200.12\", \"198.18.200.13\", \"198.18.200.14\", \"198.18.200.15\", \"198.18.200.16\", \"198.18.200.17\", \"198.18.200.18\", \"198.18.200.19\"]",
                "cluster.network[0].range[0]",
            ),
            ("exclusion outside its range", "exclude = [\"198.18.200.15\"]", "exclude = [\"198.18.200.25\"]", "cluster.network[0].range[0].exclude[0]"),
            ("duplicate network name", "name = \"v6\"", "name = \"prod\"", "cluster.network[1].name"),
            ("host bits set", "prefix = \"198.18.200.0/24\"", "prefix = \"198.18.200.1/24\"", "cluster.network[0].prefix"),
            ("no length", "prefix = \"198.18.200.0/24\"", "prefix = \"198.18.200.0\"", "cluster.network[0].prefix"),
            ("other family than the network", "first = \"2001:db8:200::1\"", "first = \"198.18.200.1\"", "cluster.network[1].range[0].first"),
            ("no ranges", "[[network.range]]\nfirst = \"2001:db8:200::1\"\nlast = \"2001:db8:200::ffff:ffff\"\nmethod = \"random\"\n", "", "cluster.network[1].range"),
        ];
        for (what, from, to, field) in cases {
            assert!(GOOD.contains(from), "{what}: fixture lacks {from:?}");
            let errs = check(&GOOD.replacen(from, to, 1)).expect_err(what);
            assert!(errs.iter().any(|e| e.field == *field), "{what}: expected an error at {field}, got {errs:?}");
        }
        // An unknown method is a parse error naming it.
        assert!(check(&GOOD.replace("method = \"hash\"", "method = \"roundrobin\"")).is_err());
    }

    /// Through the whole config: a bad rule refuses the file, naming the field.
    #[test]
    fn a_config_with_a_bad_rule_is_refused_whole() {
        let base = "[[nic]]\nname = \"eth0\"\n[cluster]\nnode = \"n1\"\netcd_endpoints = [\"http://198.18.30.200:2379\"]\n\
                    [[cluster.network]]\nname = \"prod\"\nprefix = \"198.18.200.0/24\"\n\
                    [[cluster.network.range]]\nfirst = \"198.18.200.10\"\nlast = \"198.18.200.19\"\n";
        let cfg = crate::config::Config::parse(base, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.cluster.unwrap().networks[0].ranges[0].size(), 10);
        let err = crate::config::Config::parse(&base.replace("198.18.200.19", "198.18.201.19"), "t").expect_err("range outside its network");
        assert!(err.errors.iter().any(|e| e.field == "cluster.network[0].range[0].last"), "{err}");
        // Spare pools name a network and sane water marks.
        let spares = |net: &str, low: u32, high: u32| format!("{base}[cluster.spares]\nnetwork = \"{net}\"\nlow = {low}\nhigh = {high}\n");
        let cfg = crate::config::Config::parse(&spares("prod", 2, 4), "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.cluster.unwrap().spares.unwrap().high, 4);
        for (text, field) in
            [(spares("nope", 2, 4), "cluster.spares.network"), (spares("prod", 5, 4), "cluster.spares"), (spares("prod", 0, 0), "cluster.spares")]
        {
            let err = crate::config::Config::parse(&text, "t").expect_err(field);
            assert!(err.errors.iter().any(|e| e.field == field), "{field}: {err}");
        }
    }

    #[test]
    fn two_networks_may_hold_the_same_addresses() {
        let text = GOOD
            .replace("name = \"v6\"\nprefix = \"2001:db8:200::/64\"", "name = \"tenant-b\"\nprefix = \"198.18.200.0/24\"")
            .replace("first = \"2001:db8:200::1\"\nlast = \"2001:db8:200::ffff:ffff\"", "first = \"198.18.200.10\"\nlast = \"198.18.200.19\"");
        let n = check(&text).unwrap();
        assert_eq!(n[0].ranges[0].first, n[1].ranges[0].first);
    }
}
