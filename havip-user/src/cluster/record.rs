//! A VIP's ownership record in etcd: `<key_prefix>/vips/<address>` -> JSON [`VipRecord`].
//! Written only by transactions that compare the key's mod revision (or its absence), so
//! two writers can never both win; the revision a write creates is the owner's *epoch*,
//! which the owner confirms before every extension of its fence.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRecord {
    /// The node that serves the VIP.
    pub owner: String,
    /// Candidate nodes, most preferred first, as the record's creator configured them: every
    /// node ranks successors by this one list.
    pub candidates: Vec<String>,
    /// Written by the previous owner after it stopped answering (a planned move): the new
    /// owner starts at once instead of waiting out the old owner's lease.
    #[serde(default)]
    pub handover: bool,
    /// The previous owner, if any.
    #[serde(default)]
    pub from: Option<String>,
    /// Why the record last changed (`initial`, `owner-silent`, `giveback`, ...).
    pub reason: String,
    /// Wall-clock time of the change, ms since the epoch: for operators only.
    pub at_unix_ms: u64,
}

/// A node's sign of life in etcd, `<key_prefix>/nodes/<name>`: rewritten every `every_ms`
/// while the node misses heartbeats of some peer. A peer that cannot hear it sees the key
/// change and knows it is alive (cut from its peers, not dead), so it does not take its
/// VIPs over: the two sides of a split in the heartbeat network do not fight over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMark {
    pub node: String,
    pub incarnation: u64,
    /// The next rewrite comes within this many ms.
    pub every_ms: u64,
    /// Bumped by every rewrite, so the value differs each time.
    pub count: u64,
}

/// The key of a node's sign of life.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}/nodes/{node}")
}

/// The node a key names, if it is a sign-of-life key under `prefix`.
pub fn node_of<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    let k = std::str::from_utf8(key).ok()?;
    k.strip_prefix(prefix)?.strip_prefix("/nodes/").filter(|n| !n.is_empty())
}

/// The key of a VIP's record.
pub fn key(prefix: &str, vip: IpAddr) -> String {
    format!("{prefix}/vips/{vip}")
}

/// The prefix all VIP records share (for one range read and one watch).
pub fn vips_prefix(prefix: &str) -> String {
    format!("{prefix}/vips/")
}

/// The VIP a key names, if it is a record key under `prefix`.
pub fn vip_of(prefix: &str, key: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(key).ok()?.strip_prefix(&vips_prefix(prefix))?.parse().ok()
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for vip in ["198.18.130.1", "2001:db8::1"] {
            let ip: IpAddr = vip.parse().unwrap();
            assert_eq!(vip_of("/havip", key("/havip", ip).as_bytes()), Some(ip));
        }
        assert_eq!(vip_of("/havip", b"/havip/nodes/a"), None);
        assert_eq!(node_of("/havip", node_key("/havip", "n1").as_bytes()), Some("n1"));
        assert_eq!(node_of("/havip", key("/havip", "198.18.130.1".parse().unwrap()).as_bytes()), None);
        assert_eq!(node_of("/havip", b"/havipx/nodes/n1"), None);
        assert_eq!(vip_of("/havip", b"/other/vips/198.18.130.1"), None);
    }
}
