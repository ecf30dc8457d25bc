//! VIP generation by rule (issue 13): which address of a network to hand out next, and
//! what becomes of an address when it is released. Pure: the managing node keeps the
//! [`Ledger`] in etcd and calls these; the tests run without it.
//!
//! - A network's ranges are tried in order; the first with a free address serves.
//! - Free: in the range, not excluded, not allocated, not retired (released under
//!   do-not-reassign), and not seen answered for on the wire (`taken`: the owning node's
//!   ARP probe or duplicate address detection found someone else using it).
//! - `sequential` takes the lowest free address; `random` starts at a random one and takes
//!   the next free; `hash` starts at a hash of the application id, so an application that
//!   asks again gets its old address back whenever it is free.
//! - The scan visits at most one address more than the range has unavailable ones, so a
//!   /64 costs what a /24 does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::config::networks::{Method, Network, Range};

/// An address as the cluster keys it: (network name, address). Two networks may hold the
/// same address.
pub type AddrKey = (String, IpAddr);

/// One handed-out address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub app: String,
    /// Never hand this address out again once released, whatever its range says.
    pub do_not_reassign: bool,
}

/// What the cluster knows about its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub allocated: BTreeMap<AddrKey, Allocation>,
    /// Released under do-not-reassign: never handed out again.
    pub retired: BTreeSet<AddrKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenError {
    /// Every range of the network is used up.
    Exhausted { network: String },
}

impl std::fmt::Display for GenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenError::Exhausted { network } => write!(f, "network `{network}` has no free address left; add a range or release VIPs"),
        }
    }
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Free to be handed out again.
    Returned,
    /// Retired for good (do-not-reassign).
    Retired,
    /// It was not allocated.
    Unknown,
}

/// FNV-1a, 64 bits, then the murmur3 finalizer (FNV alone spreads similar ids such as
/// `app1`, `app2` poorly over the low bits a small range uses). Stable across nodes,
/// builds and restarts (the standard library's hasher is not), so every manager computes
/// the same start for an application.
fn app_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn unavailable(net: &str, r: &Range, a: IpAddr, ledger: &Ledger, taken: &BTreeSet<IpAddr>) -> bool {
    let key = (net.to_string(), a);
    r.exclude.contains(&a) || taken.contains(&a) || ledger.allocated.contains_key(&key) || ledger.retired.contains(&key)
}

/// The address to hand out to `app` from `net`. `random` is the caller's random number
/// (used by `random` ranges only), so that the choice is a pure function.
pub fn choose(net: &Network, ledger: &Ledger, app: &str, taken: &BTreeSet<IpAddr>, random: u64) -> Result<IpAddr, GenError> {
    for r in &net.ranges {
        let size = r.size();
        let start = match r.method {
            Method::Sequential => 0,
            Method::Random => random as u128 % size,
            Method::Hash => app_hash(app) as u128 % size,
        };
        // Addresses of this range that cannot be handed out: the scan needs at most one
        // step more than there are of them.
        let blocked = r.exclude.len()
            + taken.iter().filter(|a| r.contains(**a)).count()
            + ledger.allocated.keys().chain(ledger.retired.iter()).filter(|(n, a)| *n == net.name && r.contains(*a)).count();
        let steps = size.min(blocked as u128 + 1);
        for i in 0..steps {
            let a = r.nth((start + i) % size);
            if !unavailable(&net.name, r, a, ledger, taken) {
                return Ok(a);
            }
        }
    }
    Err(GenError::Exhausted { network: net.name.clone() })
}

/// Records `addr` of `net` as handed out to `app`.
pub fn allocate(ledger: &mut Ledger, net: &Network, addr: IpAddr, app: &str, do_not_reassign: bool) {
    ledger.allocated.insert((net.name.clone(), addr), Allocation { app: app.to_string(), do_not_reassign });
}

/// Releases `addr` of `net`: back to the free addresses, or retired for good when its
/// range or its allocation says do-not-reassign.
pub fn release(ledger: &mut Ledger, net: &Network, addr: IpAddr) -> Released {
    let key = (net.name.clone(), addr);
    let Some(a) = ledger.allocated.remove(&key) else { return Released::Unknown };
    let range_keeps = net.ranges.iter().find(|r| r.contains(addr)).is_some_and(|r| !r.reassign);
    if a.do_not_reassign || range_keeps {
        ledger.retired.insert(key);
        Released::Retired
    } else {
        Released::Returned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::networks::Prefix;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn range(first: &str, last: &str, method: Method, exclude: &[&str], reassign: bool) -> Range {
        Range { first: ip(first), last: ip(last), method, exclude: exclude.iter().map(|s| ip(s)).collect(), reassign }
    }

    fn net(name: &str, prefix: &str, ranges: Vec<Range>) -> Network {
        let (a, l) = prefix.split_once('/').unwrap();
        Network { name: name.into(), prefix: Prefix { addr: ip(a), len: l.parse().unwrap() }, ranges }
    }

    /// Hands out `n` addresses to apps "a0".."an" and returns them.
    fn hand_out(n: usize, nw: &Network, l: &mut Ledger, taken: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
        (0..n)
            .map(|i| {
                let a = choose(nw, l, &format!("a{i}"), taken, i as u64 * 7919).unwrap();
                allocate(l, nw, a, &format!("a{i}"), false);
                a
            })
            .collect()
    }

    #[test]
    fn sequential_takes_the_lowest_free_address_skipping_excluded_and_taken_ones() {
        let nw = net(
            "p",
            "198.18.200.0/24",
            vec![
                range("198.18.200.10", "198.18.200.13", Method::Sequential, &["198.18.200.11"], true),
                range("198.18.200.20", "198.18.200.21", Method::Sequential, &[], true),
            ],
        );
        let taken = BTreeSet::from([ip("198.18.200.12")]);
        let mut l = Ledger::default();
        let got = hand_out(4, &nw, &mut l, &taken);
        // .11 excluded, .12 answered on the wire: the first range gives .10 and .13, then
        // the second range serves.
        assert_eq!(got, ["198.18.200.10", "198.18.200.13", "198.18.200.20", "198.18.200.21"].map(ip));
        assert_eq!(choose(&nw, &l, "late", &taken, 0), Err(GenError::Exhausted { network: "p".into() }));
        // A released address is the lowest free one again.
        assert_eq!(release(&mut l, &nw, ip("198.18.200.13")), Released::Returned);
        assert_eq!(choose(&nw, &l, "late", &taken, 0), Ok(ip("198.18.200.13")));
    }

    #[test]
    fn hash_gives_an_application_its_address_back_and_spreads_others() {
        let nw = net("p", "198.18.0.0/16", vec![range("198.18.1.0", "198.18.1.255", Method::Hash, &[], true)]);
        let mut l = Ledger::default();
        let none = BTreeSet::new();
        let first = choose(&nw, &l, "billing", &none, 0).unwrap();
        allocate(&mut l, &nw, first, "billing", false);
        release(&mut l, &nw, first);
        assert_eq!(choose(&nw, &l, "billing", &none, 12345).unwrap(), first, "the same application, the same address");
        // Its address taken by someone else meanwhile: the next free one.
        allocate(&mut l, &nw, first, "other", false);
        let second = choose(&nw, &l, "billing", &none, 0).unwrap();
        assert_ne!(second, first);
        // Different applications start at different places.
        let spread: BTreeSet<IpAddr> = (0..50).map(|i| choose(&nw, &Ledger::default(), &format!("app{i}"), &none, 0).unwrap()).collect();
        // 50 ids into 256 addresses: about 45.6 distinct expected from a uniform hash.
        assert!(spread.len() >= 42, "50 applications hashed to only {} addresses", spread.len());
        assert_eq!(app_hash("billing"), app_hash("billing"));
    }

    #[test]
    fn random_stays_in_its_range_and_never_repeats_an_allocated_address() {
        let nw = net("p", "2001:db8:200::/64", vec![range("2001:db8:200::1", "2001:db8:200::ffff:ffff:ffff", Method::Random, &[], true)]);
        let mut l = Ledger::default();
        let got = hand_out(200, &nw, &mut l, &BTreeSet::new());
        assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), 200);
        assert!(got.iter().all(|a| nw.ranges[0].contains(*a)));
        // A forced collision (the same random number every time) still finds a free one.
        let mut l2 = Ledger::default();
        for i in 0..20 {
            let a = choose(&nw, &l2, "x", &BTreeSet::new(), 42).unwrap();
            assert!(!l2.allocated.contains_key(&("p".to_string(), a)), "round {i} reused {a}");
            allocate(&mut l2, &nw, a, "x", false);
        }
    }

    #[test]
    fn a_do_not_reassign_address_is_never_handed_out_again() {
        let nw = net(
            "p",
            "198.18.200.0/24",
            vec![
                range("198.18.200.10", "198.18.200.11", Method::Sequential, &[], false),
                range("198.18.200.20", "198.18.200.21", Method::Sequential, &[], true),
            ],
        );
        let mut l = Ledger::default();
        let none = BTreeSet::new();
        // By range: .10 released from a do-not-reassign range is retired.
        let a = choose(&nw, &l, "a", &none, 0).unwrap();
        allocate(&mut l, &nw, a, "a", false);
        assert_eq!(release(&mut l, &nw, a), Released::Retired);
        assert_eq!(choose(&nw, &l, "a", &none, 0), Ok(ip("198.18.200.11")));
        // By allocation: .20 comes from a reassigning range, but this allocation says no.
        let mut l = Ledger { retired: l.retired, ..Default::default() };
        allocate(&mut l, &nw, ip("198.18.200.11"), "b", false);
        let c = choose(&nw, &l, "c", &none, 0).unwrap();
        assert_eq!(c, ip("198.18.200.20"));
        allocate(&mut l, &nw, c, "c", true);
        assert_eq!(release(&mut l, &nw, c), Released::Retired);
        for i in 0..3 {
            let next = choose(&nw, &l, &format!("d{i}"), &none, 0);
            assert!(next != Ok(ip("198.18.200.10")) && next != Ok(ip("198.18.200.20")), "a retired address came back: {next:?}");
            if let Ok(a) = next {
                allocate(&mut l, &nw, a, "d", false);
            }
        }
        assert_eq!(release(&mut l, &nw, ip("198.18.200.99")), Released::Unknown);
    }

    #[test]
    fn overlapping_networks_keep_their_allocations_apart() {
        let a = net("tenant-a", "198.18.200.0/24", vec![range("198.18.200.10", "198.18.200.10", Method::Sequential, &[], true)]);
        let b = net("tenant-b", "198.18.200.0/24", vec![range("198.18.200.10", "198.18.200.10", Method::Sequential, &[], true)]);
        let mut l = Ledger::default();
        let none = BTreeSet::new();
        let x = choose(&a, &l, "app", &none, 0).unwrap();
        allocate(&mut l, &a, x, "app", false);
        // The same address in the other network is still free; in its own, it is not.
        assert_eq!(choose(&b, &l, "app", &none, 0), Ok(x));
        assert!(choose(&a, &l, "app", &none, 0).is_err());
        allocate(&mut l, &b, x, "app", false);
        assert_eq!(l.allocated.len(), 2);
        release(&mut l, &a, x);
        assert!(l.allocated.contains_key(&("tenant-b".to_string(), x)), "releasing in one network freed it in the other");
    }
}
