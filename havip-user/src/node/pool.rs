//! The node's pool of VIPs that applications (or their orchestrators) request through the
//! API: which VIP a request gets, and the configuration that results. Pure functions; the
//! daemon applies the result in one step and keeps the allocations in its state file.
//!
//! - A request gets the best-ranked usable pool VIP for its targets (the same quality
//!   ranking that places VIPs on NICs), bound and remapped at once.
//! - An exclusive VIP is never given to two applications. A shared request may join a VIP
//!   other shared requests hold, if its ports do not collide there.
//! - Taking a free VIP must leave at least `[pool] reserve` free ones; otherwise, or with
//!   none usable, the request is refused with the reason (409) and nothing changes.
//! - A grant must fit the dataplane's maps (`config::capacity`, the check a file passes):
//!   a VIP whose grant would not fit is passed over, and with none left the request is
//!   refused (409) naming the limit, so an apply never runs out of map space half-way.
//! - The application is never modified: it keeps listening on its instance port, and
//!   clients reach it as VIP:service_port.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    api::{ApiError, VipRequest},
    config::{
        capacity::{self, Exceeded, Limit},
        Config, Protocol, Remap, Vip,
    },
};

/// One granted request, kept in the state file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Allocation {
    pub app: String,
    pub vip: IpAddr,
    pub exclusive: bool,
    pub protocol: Protocol,
    pub service_port: u16,
    pub instance_port: u16,
    pub targets: Vec<IpAddr>,
    pub class: Option<String>,
    /// When it was granted, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The allocation granting `r` on `vip` makes.
pub fn allocation(r: &VipRequest, vip: IpAddr, at_ms: u64) -> Allocation {
    Allocation {
        app: r.app.clone(),
        vip,
        exclusive: r.exclusive,
        protocol: r.protocol,
        service_port: r.service_port,
        instance_port: r.instance_port,
        targets: r.targets.clone(),
        class: r.class.clone(),
        at_ms,
    }
}

/// The capacities granting `r` on `vip` would exceed (empty: it fits): the configuration
/// it would put in force, checked as a file is.
pub fn exceeded_by(cfg: &Config, held: &[Allocation], r: &VipRequest, vip: IpAddr) -> Vec<Exceeded> {
    let mut with = held.to_vec();
    with.push(allocation(r, vip, 0));
    capacity::check(&overlay(cfg, &with))
}

/// Says which capacity the file together with the allocations exceeds, and what to do.
pub fn over_capacity(e: &Exceeded, what: &str) -> String {
    format!(
        "{what} would need {} {}, the dataplane holds at most {} (field `{}` of the file plus what applications hold); \
         release VIPs applications hold (havip vip release) or lower the file's use",
        e.count,
        e.limit.noun(),
        e.limit.max(),
        e.field
    )
}

/// The checks that need no pool state.
pub fn check(cfg: &Config, r: &VipRequest, held: &[Allocation]) -> Result<(), ApiError> {
    let ok_app = !r.app.is_empty() && r.app.len() <= 64 && r.app.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if !ok_app {
        return Err(ApiError::bad("app", format!("`{}` is not an application id: use 1-64 of A-Z a-z 0-9 . _ - :", r.app)));
    }
    if cfg.cluster.is_none() {
        for (given, field) in [(r.network.is_some(), "network"), (r.pinned, "pinned"), (r.do_not_reassign, "do_not_reassign")] {
            if given {
                return Err(ApiError::bad(field, "is for cluster mode; this node runs standalone: leave it out"));
            }
        }
    }
    if r.service_port == 0 {
        return Err(ApiError::bad("service_port", "0 is not a port; give the port clients address (1-65535)"));
    }
    if r.instance_port == 0 {
        return Err(ApiError::bad("instance_port", "0 is not a port; give the port the application listens on"));
    }
    if r.instance_port == r.service_port {
        return Err(ApiError::bad("instance_port", "equals service_port; nothing to remap (the application needs its own port)"));
    }
    if r.targets.len() > 16 {
        return Err(ApiError::bad("targets", format!("{} targets given, at most 16", r.targets.len())));
    }
    for (i, t) in r.targets.iter().enumerate() {
        if t.is_unspecified() || t.is_multicast() || t.is_loopback() {
            return Err(ApiError::bad(&format!("targets[{i}]"), format!("{t} cannot be probed; give a unicast address of a peer")));
        }
    }
    if let Some(c) = &r.class {
        if !cfg.classes.classes.contains_key(c) {
            let known: Vec<&str> = cfg.classes.classes.keys().map(String::as_str).collect();
            return Err(ApiError::bad(
                "class",
                format!("class `{c}` is not defined on this node (defined: {})", if known.is_empty() { "none".into() } else { known.join(", ") }),
            ));
        }
    }
    if let Some(a) = held.iter().find(|a| a.app == r.app && a.protocol == r.protocol && a.service_port == r.service_port) {
        return Err(ApiError::Conflict(format!("`{}` already holds {}:{} ({}); release it first", r.app, a.vip, a.service_port, a.protocol)));
    }
    Ok(())
}

/// The ports (designated and instance) allocations use on `vip` for `proto`.
fn used_ports(held: &[Allocation], vip: IpAddr, proto: Protocol) -> BTreeSet<u16> {
    held.iter().filter(|a| a.vip == vip && a.protocol == proto).flat_map(|a| [a.service_port, a.instance_port]).collect()
}

/// How many candidates a request's capacity check tries before it is refused.
const MAX_CAPACITY_TRIES: usize = 8;

/// The pool VIP for `r`. `cost` ranks a VIP for the request's targets: `Some((cost, nic))`
/// of its best candidate NIC, `None` while unmeasured.
pub fn choose(cfg: &Config, held: &[Allocation], r: &VipRequest, cost: impl Fn(&Vip) -> Option<(f64, String)>) -> Result<(IpAddr, String), ApiError> {
    if cfg.pool.is_empty() {
        return Err(ApiError::Conflict("this node has no pool VIPs (`[[vip]] pool = true`)".into()));
    }
    let free: Vec<&Vip> = cfg.pool.iter().filter(|v| !held.iter().any(|a| a.vip == v.address)).collect();
    let shared: Vec<&Vip> = if r.exclusive {
        Vec::new()
    } else {
        cfg.pool
            .iter()
            .filter(|v| {
                let on: Vec<&Allocation> = held.iter().filter(|a| a.vip == v.address).collect();
                !on.is_empty() && on.iter().all(|a| !a.exclusive) && {
                    let used = used_ports(held, v.address, r.protocol);
                    !used.contains(&r.service_port) && !used.contains(&r.instance_port)
                }
            })
            .collect()
    };
    let at_reserve = free.len() <= cfg.pool_reserve;
    let mut candidates: Vec<(&Vip, bool)> = shared.iter().map(|v| (*v, true)).collect();
    if !at_reserve {
        candidates.extend(free.iter().map(|v| (*v, false)));
    }
    if candidates.is_empty() {
        let holders: BTreeSet<&str> = held.iter().map(|a| a.app.as_str()).collect();
        return Err(ApiError::Conflict(if free.is_empty() {
            format!(
                "the pool is exhausted: all {} pool VIP(s) are held{} (by {})",
                cfg.pool.len(),
                if r.exclusive { "" } else { ", none shareable for these ports" },
                holders.into_iter().collect::<Vec<_>>().join(", ")
            )
        } else {
            format!("the pool is at its reserve: {} free pool VIP(s), reserve {} (`[pool] reserve`)", free.len(), cfg.pool_reserve)
        }));
    }
    // Best first: measured before unmeasured, then cost, then a VIP already shared (it
    // uses up nothing), then configured order.
    struct Ranked<'a> {
        vip: &'a Vip,
        shared: bool,
        cost: Option<(f64, String)>,
        order: usize,
    }
    let mut ranked: Vec<Ranked> = candidates
        .into_iter()
        .map(|(vip, shared)| Ranked { vip, shared, cost: cost(vip), order: cfg.pool.iter().position(|p| p.address == vip.address).unwrap_or(usize::MAX) })
        .collect();
    ranked.sort_by(|a, b| {
        let c = |x: &Ranked| x.cost.as_ref().map_or(0.0, |c| c.0);
        a.cost.is_none().cmp(&b.cost.is_none()).then_with(|| c(a).total_cmp(&c(b))).then_with(|| (!a.shared, a.order).cmp(&(!b.shared, b.order)))
    });
    // The best-ranked candidate whose grant fits. A mapping is added whichever VIP is
    // chosen (and VIPs and port classes are counted for the whole pool already), so when
    // any other limit is hit no candidate would fit; probe paths (its NICs) and class
    // counters (its class) depend on the VIP, so the next one may. Each try checks the
    // whole configuration (about 9 ms at full maps, release build) on the event loop that
    // also fails VIPs over, hence the bound on tries.
    let mut refused: Option<Vec<Exceeded>> = None;
    let mut skipped = 0;
    let mut chosen = None;
    for (i, c) in ranked.iter().enumerate().take(MAX_CAPACITY_TRIES) {
        let exceeded = exceeded_by(cfg, held, r, c.vip.address);
        if exceeded.is_empty() {
            chosen = Some(i);
            break;
        }
        skipped += 1;
        let every_vip = exceeded.iter().any(|e| !matches!(e.limit, Limit::ProbePaths | Limit::ClassCounters));
        refused.get_or_insert(exceeded);
        if every_vip {
            break;
        }
    }
    let Some(chosen) = chosen else {
        let first = &refused.expect("a candidate was refused")[0];
        let tried = if skipped < ranked.len() { format!(" (the {skipped} best-ranked VIPs were tried)") } else { String::new() };
        return Err(ApiError::Conflict(format!("{}{tried}", over_capacity(first, "granting it"))));
    };
    let best = &ranked[chosen];
    let kind = if best.shared { "shared" } else { "free" };
    let why = match &best.cost {
        Some((cost, nic)) => {
            let next = ranked.get(chosen + 1).map(|n| match &n.cost {
                Some((cost, nic)) => format!("; next: {} at cost {cost:.2} via {nic}", n.vip.address),
                None => format!("; next: {} (unmeasured)", n.vip.address),
            });
            format!("best-ranked {kind} pool VIP for the targets: cost {cost:.2} via {nic}{}", next.unwrap_or_default())
        }
        None if r.targets.is_empty() => format!("first {kind} pool VIP in configured order (no targets given to rank by)"),
        None => format!("first {kind} pool VIP in configured order (no path measurements for these targets yet)"),
    };
    let why = match &refused {
        Some(e) => format!("{why}; {skipped} better-ranked VIP(s) passed over: granting them would exceed the dataplane's {}", e[0].limit.noun()),
        None => why,
    };
    Ok((best.vip.address, why))
}

/// The configuration in force: the file's, plus each held pool VIP with its mappings, the
/// union of its holders' targets and the first holder's class (else its configured one).
pub fn overlay(cfg: &Config, held: &[Allocation]) -> Config {
    let mut out = cfg.clone();
    for v in &cfg.pool {
        let on: Vec<&Allocation> = held.iter().filter(|a| a.vip == v.address).collect();
        if on.is_empty() {
            continue;
        }
        let mut vip = v.clone();
        for a in &on {
            for t in &a.targets {
                if !vip.targets.contains(t) {
                    vip.targets.push(*t);
                }
            }
            out.remaps.push(Remap::for_app(v.address, a.protocol, a.service_port, a.instance_port, &a.app));
        }
        if let Some(c) = on.iter().find_map(|a| a.class.clone()) {
            vip.class = Some(c);
        }
        out.vips.push(vip);
    }
    out.remaps.sort();
    out
}

/// Allocations that still fit `cfg` (after a reload): their VIP is still in the pool, and
/// their class still exists.
pub fn still_valid(cfg: &Config, a: &Allocation) -> bool {
    cfg.pool.iter().any(|v| v.address == a.vip) && a.class.as_ref().is_none_or(|c| cfg.classes.classes.contains_key(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = r#"
[pool]
reserve = 1
[[nic]]
name = "a0"
[[nic]]
name = "b0"
[[vip]]
address = "198.18.0.1"
[[vip]]
address = "198.18.0.11"
pool = true
[[vip]]
address = "198.18.0.12"
pool = true
nics = ["b0"]
[[vip]]
address = "198.18.0.13"
pool = true
[class.gold]
"#;

    fn cfg() -> Config {
        Config::parse(POOL, "test").unwrap()
    }

    fn req(app: &str, exclusive: bool, port: u16) -> VipRequest {
        VipRequest {
            app: app.into(),
            exclusive,
            targets: vec![],
            class: None,
            protocol: Protocol::Tcp,
            service_port: port,
            instance_port: port + 8000,
            network: None,
            pinned: false,
            do_not_reassign: false,
        }
    }

    fn grant(c: &Config, held: &mut Vec<Allocation>, r: &VipRequest, cost: impl Fn(&Vip) -> Option<(f64, String)>) -> Result<IpAddr, ApiError> {
        check(c, r, held)?;
        let (vip, _) = choose(c, held, r, cost)?;
        held.push(allocation(r, vip, 0));
        Ok(vip)
    }

    #[test]
    fn pool_vips_are_apart_from_configured_ones() {
        let c = cfg();
        assert_eq!(c.vips.len(), 1);
        assert_eq!(c.pool.iter().map(|v| v.address.to_string()).collect::<Vec<_>>(), ["198.18.0.11", "198.18.0.12", "198.18.0.13"]);
    }

    #[test]
    fn the_best_ranked_free_vip_is_chosen_and_the_reserve_is_kept() {
        let c = cfg();
        let mut held = Vec::new();
        // .12 (via b0) is the cheapest for the targets.
        let cost = |v: &Vip| Some(if v.address.to_string() == "198.18.0.12" { (1.0, "b0".into()) } else { (5.0, "a0".into()) });
        assert_eq!(grant(&c, &mut held, &req("web", true, 80), cost).unwrap().to_string(), "198.18.0.12");
        // Unmeasured: configured order.
        assert_eq!(grant(&c, &mut held, &req("db", true, 5432), |_| None).unwrap().to_string(), "198.18.0.11");
        // One free VIP left, reserve 1: refused, nothing held.
        let e = grant(&c, &mut held, &req("cache", true, 6379), |_| None).unwrap_err();
        assert!(matches!(&e, ApiError::Conflict(m) if m.contains("reserve")), "{e:?}");
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn exclusive_vips_are_never_shared_and_shared_ones_pack_without_port_clashes() {
        let c = cfg();
        let mut held = Vec::new();
        let a = grant(&c, &mut held, &req("a", false, 80), |_| None).unwrap();
        // Another shared request joins `a`'s VIP rather than using up a free one.
        assert_eq!(grant(&c, &mut held, &req("b", false, 443), |_| None).unwrap(), a);
        // Same port on that VIP: it gets another one.
        let c2 = grant(&c, &mut held, &req("c", false, 80), |_| None).unwrap();
        assert_ne!(c2, a);
        // An exclusive request never lands on a held VIP: only one free left = reserve.
        assert!(matches!(grant(&c, &mut held, &req("x", true, 22), |_| None), Err(ApiError::Conflict(_))));
        // And nobody joins an exclusive holder.
        let mut held2 = Vec::new();
        let x = grant(&c, &mut held2, &req("x", true, 22), |_| None).unwrap();
        let s = grant(&c, &mut held2, &req("s", false, 80), |_| None).unwrap();
        assert_ne!(x, s);
    }

    #[test]
    fn bad_requests_name_their_field() {
        let c = cfg();
        let cases: Vec<(VipRequest, &str)> = vec![
            (VipRequest { app: "".into(), ..req("a", true, 80) }, "app"),
            (VipRequest { app: "a b".into(), ..req("a", true, 80) }, "app"),
            (VipRequest { service_port: 0, ..req("a", true, 80) }, "service_port"),
            (VipRequest { instance_port: 80, ..req("a", true, 80) }, "instance_port"),
            (VipRequest { targets: vec!["224.0.0.1".parse().unwrap()], ..req("a", true, 80) }, "targets[0]"),
            (VipRequest { class: Some("silver".into()), ..req("a", true, 80) }, "class"),
            (VipRequest { network: Some("prod".into()), ..req("a", true, 80) }, "network"),
            (VipRequest { pinned: true, ..req("a", true, 80) }, "pinned"),
        ];
        for (r, field) in cases {
            match check(&c, &r, &[]) {
                Err(ApiError::Bad { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_overlay_adds_held_vips_with_their_mappings_targets_and_class() {
        let c = cfg();
        let mut held = Vec::new();
        let mut r = req("web", true, 80);
        r.targets = vec!["198.18.9.9".parse().unwrap()];
        r.class = Some("gold".into());
        let vip = grant(&c, &mut held, &r, |_| None).unwrap();
        let o = overlay(&c, &held);
        let v = o.vips.iter().find(|v| v.address == vip).unwrap();
        assert_eq!(v.targets, r.targets);
        assert_eq!(v.class.as_deref(), Some("gold"));
        assert!(o.remaps.iter().any(|m| m.vip == vip && m.designated_port == 80 && m.instance_port == 8080));
        assert_eq!(o.vips.len(), 2, "only the held pool VIP joins");
        assert_eq!(overlay(&c, &[]), c);
    }

    /// `n` configured mappings on the configured VIP (only their number matters here).
    fn with_mappings(mut c: Config, n: usize) -> Config {
        let vip = c.vips[0].address;
        c.remaps.extend((0..n).map(|i| Remap { vip, protocol: Protocol::Udp, designated_port: i as u16 + 1, instance_port: 1, service: "s".into() }));
        c
    }

    #[test]
    fn a_grant_past_the_mapping_capacity_is_refused_naming_it_and_nothing_is_held() {
        let c = with_mappings(cfg(), 16384 - 2);
        let mut held = Vec::new();
        // Two more mappings fit exactly.
        grant(&c, &mut held, &req("a", false, 80), |_| None).unwrap();
        grant(&c, &mut held, &req("b", false, 443), |_| None).unwrap();
        let e = grant(&c, &mut held, &req("c", false, 22), |_| None).unwrap_err();
        let ApiError::Conflict(m) = &e else { panic!("{e:?}") };
        assert!(m.contains("16385 mappings") && m.contains("at most 16384") && m.contains("field `service`"), "{m}");
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn a_vip_whose_grant_would_not_fit_is_passed_over_for_one_that_does() {
        // 2047 targets from a0 and b0, and one from .12's only NIC b0: 4095 probe paths.
        let mut c = cfg();
        let target = |i: u32| IpAddr::from([198, 19, (i >> 8) as u8, i as u8]);
        c.vips[0].targets = (0..2047).map(target).collect();
        c.pool[1].targets = vec![target(5000)];
        assert!(capacity::check(&c).is_empty());
        let cost = |v: &Vip| Some(if v.address.to_string() == "198.18.0.11" { (1.0, "a0".into()) } else { (5.0, "b0".into()) });
        let mut r = req("web", true, 80);
        r.targets = vec![target(6000)];
        // .11, the best, would probe the new target from two NICs (4097); .12 from one.
        let (vip, why) = choose(&c, &[], &r, cost).unwrap();
        assert_eq!(vip.to_string(), "198.18.0.12", "{why}");
        assert!(why.contains("1 better-ranked VIP(s) passed over") && why.contains("probe paths"), "{why}");
        // Two new targets fit nowhere.
        r.targets.push(target(6001));
        let e = choose(&c, &[], &r, cost).unwrap_err();
        assert!(matches!(&e, ApiError::Conflict(m) if m.contains("4099 probe paths") && m.contains("at most 4096")), "{e:?}");

        // With the paths full, no VIP fits; only the best few are tried (each try checks
        // the whole configuration on the event loop).
        c.pool[1].targets.push(target(7000));
        for i in 0..7 {
            let mut v = c.pool[0].clone();
            v.address = IpAddr::from([198, 18, 1, i]);
            c.pool.push(v);
        }
        r.targets.truncate(1);
        assert!(capacity::check(&c).is_empty(), "4096 paths fit");
        let e = choose(&c, &[], &r, cost).unwrap_err();
        assert!(matches!(&e, ApiError::Conflict(m) if m.contains("probe paths") && m.ends_with("(the 8 best-ranked VIPs were tried)")), "{e:?}");
    }

    #[test]
    fn the_api_listens_on_loopback_unless_told_otherwise() {
        let with = |listen: &str| Config::parse(&format!("[api]\nlisten = \"{listen}\"\ntoken_file = \"/t\"\n{POOL}"), "t");
        assert_eq!(with("7946").unwrap().api.listen, Some("127.0.0.1:7946".parse().unwrap()));
        assert_eq!(with("[::1]:7946").unwrap().api.listen, Some("[::1]:7946".parse().unwrap()));
        let e = with("localhost:x").unwrap_err();
        assert!(e.errors.iter().any(|f| f.field == "api.listen"), "{e}");
        let e = Config::parse(&format!("[api]\nlisten = \"7946\"\n{POOL}"), "t").unwrap_err();
        assert!(e.errors.iter().any(|f| f.field == "api.token_file"), "{e}");
    }
}
