//! The recent VIP moves, for `havip top` and the metrics: havipd appends one JSON line per
//! move to `<run dir>/events.jsonl` and keeps the newest `KEEP`.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Lines kept in the file (it is rewritten when it holds twice as many).
pub const KEEP: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Move {
    /// Wall-clock time of the move, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub vip: IpAddr,
    /// The NIC it left (`None`: it had none).
    pub from: Option<String>,
    pub to: String,
    /// `binder::Reason` as text: initial, link_down, not_candidate, failback, operator, quality.
    pub reason: String,
    /// The VIP's move count after this one.
    pub moves: u64,
}

pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("events.jsonl")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Appends a move; trims the file to the newest `KEEP` once it holds `2 * KEEP`.
pub fn record(run_dir: &Path, m: &Move) -> std::io::Result<()> {
    let p = path(run_dir);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p)?;
    writeln!(f, "{}", serde_json::to_string(m).map_err(std::io::Error::other)?)?;
    drop(f);
    let text = std::fs::read_to_string(&p)?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() >= 2 * KEEP {
        let tmp = p.with_extension("jsonl.tmp");
        std::fs::write(&tmp, lines[lines.len() - KEEP..].join("\n") + "\n")?;
        std::fs::rename(tmp, &p)?;
    }
    Ok(())
}

/// The newest `n` moves, oldest first (none if there is no file yet).
pub fn recent(run_dir: &Path, n: usize) -> Vec<Move> {
    let text = std::fs::read_to_string(path(run_dir)).unwrap_or_default();
    let all: Vec<Move> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    all[all.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_moves() {
        let dir = std::env::temp_dir().join(format!("havip-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..(2 * KEEP + 10) as u64 {
            let m = Move { at_ms: i, vip: "198.18.0.1".parse().unwrap(), from: None, to: "a0".into(), reason: "initial".into(), moves: i };
            record(&dir, &m).unwrap();
        }
        let r = recent(&dir, 3);
        assert_eq!(r.iter().map(|m| m.moves).collect::<Vec<_>>(), [2 * KEEP as u64 + 7, 2 * KEEP as u64 + 8, 2 * KEEP as u64 + 9]);
        assert!(std::fs::read_to_string(path(&dir)).unwrap().lines().count() < 2 * KEEP);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
