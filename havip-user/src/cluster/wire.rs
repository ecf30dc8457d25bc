//! The heartbeat datagram: sent by havipd itself (a stalled controller falls silent) to
//! every peer address from every NIC, every heartbeat interval. JSON: small, versioned by
//! field names, readable in a capture.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The largest datagram havip sends; VIPs beyond what fits are left out of `serves` (they
/// then get no acknowledgement-based extension, which is safe: see `peers`).
pub const MAX_DATAGRAM: usize = 60_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    /// Random per havipd start: acknowledgements of an earlier run's sequence numbers are
    /// not mistaken for this run's.
    pub incarnation: u64,
    /// Per sender, increasing; the same on every path of one round.
    pub seq: u64,
    /// The sender's NIC this copy left from.
    pub path: String,
    /// The sender is stopping for a planned restart: hold off for the restart grace.
    #[serde(default)]
    pub restarting: bool,
    /// VIPs the sender serves, with their epochs.
    pub serves: Vec<(IpAddr, u64)>,
    /// Peers the sender hears, with how long ago it last did (ms): lets a node tell "the
    /// owner is dead" from "I cannot hear the owner" (one-way loss).
    pub hears: Vec<(String, u32)>,
    pub acks: Vec<Ack>,
}

/// "I received your heartbeat `seq` (of `incarnation`) `delay_us` before sending this, and
/// promise not to start serving any VIP you listed in it for `promise_ms` after receiving
/// it, and I serve none of them" (the sender's own `serves` says which it does serve).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub node: String,
    pub incarnation: u64,
    pub seq: u64,
    pub delay_us: u32,
    pub promise_ms: u32,
}

impl Heartbeat {
    /// Encodes, dropping served VIPs from the end until the datagram fits.
    pub fn encode(&mut self) -> Vec<u8> {
        loop {
            let bytes = serde_json::to_vec(self).expect("a heartbeat always serializes");
            if bytes.len() <= MAX_DATAGRAM || self.serves.is_empty() {
                return bytes;
            }
            let keep = self.serves.len() * MAX_DATAGRAM / bytes.len();
            self.serves.truncate(keep.min(self.serves.len() - 1));
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Heartbeat> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fits() {
        let mut hb = Heartbeat {
            node: "n1".into(),
            incarnation: 7,
            seq: 42,
            path: "eth0".into(),
            restarting: false,
            serves: (0..20_000u32).map(|i| (IpAddr::from((0xc612_0000u32 + i).to_be_bytes()), i as u64)).collect(),
            hears: vec![("n2".into(), 3)],
            acks: vec![Ack { node: "n2".into(), incarnation: 9, seq: 5, delay_us: 100, promise_ms: 40 }],
        };
        let bytes = hb.encode();
        assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
        assert!(hb.serves.len() < 20_000 && hb.serves.len() > 1000, "{}", hb.serves.len());
        assert_eq!(Heartbeat::decode(&bytes), Some(hb));
        assert_eq!(Heartbeat::decode(b"{not json"), None);
    }
}
