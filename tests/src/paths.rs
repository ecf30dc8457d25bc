//! Two paths from a server to a target, each through an impairment relay:
//!
//! ```text
//!  server a0 198.18.40.1 ── relay A ── tA 198.18.40.2 ┐
//!                                                      target: 198.18.50.1 on lo
//!  server b0 198.18.41.1 ── relay B ── tB 198.18.41.2 ┘
//! ```

use std::time::Duration;

use havip_user::kernel::netns::{veth_pair, Netns};

use crate::{
    relay::{Impairment, Relay},
    topology::Topology,
};

pub const TARGET: &str = "198.18.50.1";
/// Routed to the target namespace, which has no such address: it never answers.
pub const SILENT: &str = "198.18.50.99";
pub const VIP: &str = "198.18.60.1";

pub struct Lab {
    pub t: Topology,
    pub a: Relay,
    pub b: Relay,
    _relay_ns: [Netns; 2],
}

pub const CLEAN: Impairment = Impairment { delay: Duration::ZERO, jitter: Duration::ZERO, loss: 0.0, probe_bursts: None };

pub fn delay(ms: u64) -> Impairment {
    Impairment { delay: Duration::from_millis(ms), ..CLEAN }
}

/// The topology with both relays clean, and havipd configured (`extra`: more sections).
pub fn lab(targets: &[&str], extra: &str) -> Lab {
    let t = Topology::bare();
    let mk = |n: &str| {
        let ns = Netns::create(&format!("{}-{n}", t.srv.name)).unwrap();
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]).unwrap();
        ns
    };
    let (ra, rb) = (mk("ra"), mk("rb"));
    veth_pair(&t.srv, "a0", &ra, "r0").unwrap();
    veth_pair(&ra, "r1", &t.cli, "tA").unwrap();
    veth_pair(&t.srv, "b0", &rb, "r0").unwrap();
    veth_pair(&rb, "r1", &t.cli, "tB").unwrap();
    for (ns, args) in [
        (&t.srv, ["addr", "add", "198.18.40.1/24", "dev", "a0"].as_slice()),
        (&t.srv, &["addr", "add", "198.18.41.1/24", "dev", "b0"]),
        (&t.srv, &["route", "add", "198.18.50.0/24", "via", "198.18.40.2", "dev", "a0", "metric", "10"]),
        (&t.srv, &["route", "add", "198.18.50.0/24", "via", "198.18.41.2", "dev", "b0", "metric", "20"]),
        (&t.cli, &["addr", "add", "198.18.40.2/24", "dev", "tA"]),
        (&t.cli, &["addr", "add", "198.18.41.2/24", "dev", "tB"]),
        (&t.cli, &["addr", "add", &format!("{TARGET}/32"), "dev", "lo"]),
    ] {
        ns.ip(args).unwrap();
    }
    // The relays forward frames as they are: the path NICs must hand them what a real
    // NIC puts on the wire, wire-sized frames with complete checksums, not TSO/GSO
    // super-frames with checksums left to offload.
    for (ns, dev) in [(&t.srv, "a0"), (&t.srv, "b0"), (&t.cli, "tA"), (&t.cli, "tB")] {
        ns.exec(&["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off"]).unwrap();
    }
    let targets = targets.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    t.write_config_raw(&format!(
        "{extra}\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n[[vip]]\naddress = \"{VIP}\"\nnics = [\"a0\", \"b0\"]\ntargets = [{targets}]\n"
    ));
    let a = Relay::start(&ra, "r0", "r1", CLEAN, CLEAN);
    let b = Relay::start(&rb, "r0", "r1", CLEAN, CLEAN);
    Lab { t, a, b, _relay_ns: [ra, rb] }
}
