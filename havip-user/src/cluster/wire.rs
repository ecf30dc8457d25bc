//! The heartbeat datagram: sent by havipd itself (a stalled controller falls silent) to
//! every peer address from every NIC, every heartbeat interval.
//!
//! Two encodings of the same [`Heartbeat`]. JSON (a datagram starting with `{`) is what
//! every version reads, versioned by field names. Binary ([`BINARY_MAGIC`], then postcard)
//! costs a quarter of the CPU to decode and a third of the bytes. A node decodes every
//! heartbeat, 2 paths x every peer, every 5 ms: at 32 nodes serving 312 VIPs each, JSON
//! costs about 29% of a core (`cargo xtask bench --only heartbeats`). Every heartbeat says
//! which binary layout its sender reads (`binary_layout`, 0 for none; versions that predate
//! it send no such field); a node sends binary only to peers that read its own layout, so
//! a rolling upgrade, also to a later layout, keeps every pair of nodes understanding each
//! other.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The largest datagram havip sends; VIPs beyond what fits are left out of `serves` (they
/// then get no acknowledgement-based extension, which is safe: see `peers`).
pub const MAX_DATAGRAM: usize = 60_000;

/// The binary layout this version writes and reads. postcard is not self-describing: a
/// changed `Heartbeat` is a new layout, sent only to peers that say they read it.
pub const BINARY_LAYOUT: u8 = 1;

/// The first bytes of a binary heartbeat (never the start of a JSON one); the last is the
/// layout.
pub const BINARY_MAGIC: [u8; 4] = [b'H', b'V', b'B', BINARY_LAYOUT];

/// How a heartbeat is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Binary,
}

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
    /// The binary layout the sender decodes (0: JSON only); peers whose own layout it is
    /// may send it [`Format::Binary`].
    #[serde(default)]
    pub binary_layout: u8,
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
    pub fn encode(&mut self, format: Format) -> Vec<u8> {
        loop {
            let bytes = match format {
                Format::Json => serde_json::to_vec(self).expect("a heartbeat always serializes"),
                Format::Binary => postcard::to_extend(self, BINARY_MAGIC.to_vec()).expect("a heartbeat always serializes"),
            };
            if bytes.len() <= MAX_DATAGRAM || self.serves.is_empty() {
                return bytes;
            }
            let keep = self.serves.len() * MAX_DATAGRAM / bytes.len();
            self.serves.truncate(keep.min(self.serves.len() - 1));
        }
    }

    /// Decodes either encoding, saying which it was; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<(Heartbeat, Format)> {
        match bytes.strip_prefix(&BINARY_MAGIC) {
            Some(rest) => postcard::from_bytes(rest).ok().map(|hb| (hb, Format::Binary)),
            None => serde_json::from_slice(bytes).ok().map(|hb| (hb, Format::Json)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fits() {
        for format in [Format::Json, Format::Binary] {
            let mut hb = big();
            let bytes = hb.encode(format);
            assert!(bytes.len() <= MAX_DATAGRAM, "{format:?}: {}", bytes.len());
            assert!(hb.serves.len() < 20_000 && hb.serves.len() > 1000, "{format:?}: {}", hb.serves.len());
            assert_eq!(Heartbeat::decode(&bytes), Some((hb, format)));
        }
        assert_eq!(Heartbeat::decode(b"{not json"), None);
        assert_eq!(Heartbeat::decode(b"HVB\x01\xff\xff"), None, "a truncated binary heartbeat");
        assert_eq!(Heartbeat::decode(b"HVB\x02"), None, "an unknown binary layout");
    }

    /// The binary encoding carries more VIPs in a datagram, and a JSON heartbeat of a
    /// version before `binary_layout` decodes as a sender that reads only JSON.
    #[test]
    fn binary_is_smaller_and_old_json_reads_as_json_only() {
        let (mut j, mut b) = (big(), big());
        j.encode(Format::Json);
        b.encode(Format::Binary);
        assert!(b.serves.len() > 2 * j.serves.len(), "binary {} VIPs, JSON {}", b.serves.len(), j.serves.len());
        let old = br#"{"node":"n2","incarnation":1,"seq":3,"path":"eth0","serves":[],"hears":[],"acks":[]}"#;
        let (hb, format) = Heartbeat::decode(old).expect("an old heartbeat decodes");
        assert_eq!((hb.binary_layout, format), (0, Format::Json));
    }

    fn big() -> Heartbeat {
        Heartbeat {
            node: "n1".into(),
            incarnation: 7,
            seq: 42,
            path: "eth0".into(),
            restarting: false,
            serves: (0..20_000u32).map(|i| (IpAddr::from((0xc612_0000u32 + i).to_be_bytes()), i as u64)).collect(),
            hears: vec![("n2".into(), 3)],
            acks: vec![Ack { node: "n2".into(), incarnation: 9, seq: 5, delay_us: 100, promise_ms: 40 }],
            binary_layout: BINARY_LAYOUT,
        }
    }
}
