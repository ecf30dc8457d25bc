//! The CPU a node spends on heartbeats, by encoding: every node decodes a heartbeat from
//! every peer on every path every interval, so at 32 nodes, 2 paths and 5 ms that is
//! 12,400 decodes a second, each listing the sender's served VIPs and its view of the 31
//! other nodes (hears and acknowledgements). JSON is the baseline (what every version
//! reads); binary is measured against it in the same run, on the same heartbeats.

use std::{hint::black_box, net::IpAddr, time::Instant};

use havip_user::cluster::wire::{Ack, Format, Heartbeat, BINARY_LAYOUT};
use serde::Serialize;

use crate::cluster_bench::GapStats;

/// Nodes of the simulated cluster (as in the planning bench).
pub const NODES: usize = 32;
/// Heartbeat interval (the default) and paths per node.
const INTERVAL_MS: f64 = 5.0;
const PATHS: usize = 2;
/// Decodes (or encodes) timed together in one trial, to rise well above the clock's grain.
const PER_TRIAL: usize = 200;

#[derive(Debug, Serialize)]
pub struct Case {
    pub serves: usize,
    pub json_bytes: usize,
    pub binary_bytes: usize,
    /// Per heartbeat, in microseconds (the `_ms` fields of [`GapStats`] hold µs here).
    pub json_decode_us: GapStats,
    pub binary_decode_us: GapStats,
    pub json_encode_us: GapStats,
    pub binary_encode_us: GapStats,
    /// binary / JSON, p50 and p99, for decoding.
    pub decode_ratio: (f64, f64),
    /// Share of one core that decoding every peer's heartbeats takes at [`NODES`] nodes (p50).
    pub json_core_share: f64,
    pub binary_core_share: f64,
}

#[derive(Debug, Serialize)]
pub struct Heartbeats {
    pub nodes: usize,
    pub decodes_per_second: f64,
    pub trials: usize,
    pub cases: Vec<Case>,
}

/// A heartbeat of node 17 of a 32-node cluster serving `serves` VIPs.
fn heartbeat(serves: usize) -> Heartbeat {
    let peers = (0..NODES).filter(|i| *i != 17).map(|i| format!("node-{i}"));
    Heartbeat {
        node: "node-17".into(),
        incarnation: 0x1234_5678_9abc,
        seq: 1_234_567,
        path: "eth0".into(),
        restarting: false,
        serves: (0..serves as u32).map(|i| (IpAddr::from((0xc612_0000u32 + i).to_be_bytes()), 4_000_000 + i as u64)).collect(),
        hears: peers.clone().map(|n| (n, 3)).collect(),
        acks: peers.map(|node| Ack { node, incarnation: 0x9abc_def0, seq: 7_654_321, delay_us: 180, promise_ms: 40 }).collect(),
        binary_layout: BINARY_LAYOUT,
    }
}

/// Times [`PER_TRIAL`] decodes of `bytes`; checks each took the named path and gave back `want`.
fn time_decodes(bytes: &[u8], format: Format, want: &Heartbeat, decoded: &mut usize) -> f64 {
    let t = Instant::now();
    for _ in 0..PER_TRIAL {
        let (hb, f) = black_box(Heartbeat::decode(black_box(bytes))).expect("a heartbeat decodes");
        assert_eq!(f, format, "decoded as the other format");
        // Decoded in full: the last served VIP and the last acknowledgement came back.
        if hb.serves.last() == want.serves.last() && hb.acks.last() == want.acks.last() {
            *decoded += 1;
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / PER_TRIAL as f64;
    assert_eq!(Heartbeat::decode(bytes).map(|(hb, _)| hb).as_ref(), Some(want), "the decoded heartbeat differs");
    us
}

fn time_encodes(hb: &Heartbeat, format: Format) -> f64 {
    let mut h = hb.clone();
    let t = Instant::now();
    for _ in 0..PER_TRIAL {
        black_box(h.encode(black_box(format)));
    }
    t.elapsed().as_secs_f64() * 1e6 / PER_TRIAL as f64
}

pub fn run(trials: usize) -> Heartbeats {
    let decodes_per_second = (NODES - 1) as f64 * PATHS as f64 * 1000.0 / INTERVAL_MS;
    let mut cases = Vec::new();
    for serves in [1, 10_000 / NODES, 2000] {
        let mut hb = heartbeat(serves);
        let (json, binary) = (hb.encode(Format::Json), hb.encode(Format::Binary));
        assert_eq!(hb.serves.len(), serves, "the heartbeat was truncated to fit a datagram");
        let mut s: [Vec<f64>; 4] = Default::default();
        let (mut json_decoded, mut binary_decoded) = (0, 0);
        // Alternate the two, trial by trial: both see the same machine.
        for _ in 0..trials {
            s[0].push(time_decodes(&json, Format::Json, &hb, &mut json_decoded));
            s[1].push(time_decodes(&binary, Format::Binary, &hb, &mut binary_decoded));
            s[2].push(time_encodes(&hb, Format::Json));
            s[3].push(time_encodes(&hb, Format::Binary));
        }
        assert_eq!((json_decoded, binary_decoded), (trials * PER_TRIAL, trials * PER_TRIAL), "not every decode took its path");
        let [jd, bd, je, be] = s.map(GapStats::of);
        let decode_ratio = bd.ratios_to(&jd);
        cases.push(Case {
            serves,
            json_bytes: json.len(),
            binary_bytes: binary.len(),
            json_core_share: jd.p50_ms * 1e-6 * decodes_per_second,
            binary_core_share: bd.p50_ms * 1e-6 * decodes_per_second,
            json_decode_us: jd,
            binary_decode_us: bd,
            json_encode_us: je,
            binary_encode_us: be,
            decode_ratio,
        });
    }
    Heartbeats { nodes: NODES, decodes_per_second, trials, cases }
}
