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

/// The event log as havipd writes it: appends are one `write` each; the file is read and
/// rewritten only when it has grown to `2 * KEEP` lines, to keep the newest `KEEP`.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    /// Lines in the file now (counted once at open, then kept).
    lines: usize,
}

impl EventLog {
    pub fn open(run_dir: &Path) -> Self {
        let path = path(run_dir);
        let lines = std::fs::read_to_string(&path).map(|t| t.lines().count()).unwrap_or(0);
        Self { path, lines }
    }

    /// Appends a move; trims the file to the newest `KEEP` once it holds `2 * KEEP`.
    pub fn append(&mut self, m: &Move) -> std::io::Result<()> {
        let mut line = serde_json::to_string(m).map_err(std::io::Error::other)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(line.as_bytes())?;
        drop(f);
        self.lines += 1;
        if self.lines >= 2 * KEEP {
            let text = std::fs::read_to_string(&self.path)?;
            let lines: Vec<&str> = text.lines().collect();
            let keep = &lines[lines.len().saturating_sub(KEEP)..];
            let tmp = self.path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, keep.join("\n") + "\n")?;
            std::fs::rename(tmp, &self.path)?;
            self.lines = keep.len();
        }
        Ok(())
    }
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
        let mut log = EventLog::open(&dir);
        for i in 0..(2 * KEEP + 10) as u64 {
            let m = Move { at_ms: i, vip: "198.18.0.1".parse().unwrap(), from: None, to: "a0".into(), reason: "initial".into(), moves: i };
            log.append(&m).unwrap();
            // Only appends between trims: the file never shrinks below KEEP once full.
            if i as usize >= KEEP {
                assert!(log.lines >= KEEP && log.lines < 2 * KEEP, "{} lines after {} appends", log.lines, i + 1);
            }
        }
        // A reopened log counts what is there and keeps appending.
        let mut again = EventLog::open(&dir);
        assert_eq!(again.lines, log.lines);
        let last = Move { at_ms: 0, vip: "198.18.0.1".parse().unwrap(), from: None, to: "b0".into(), reason: "failback".into(), moves: 9999 };
        again.append(&last).unwrap();
        assert_eq!(recent(&dir, 1), vec![last]);
        let r = recent(&dir, 4);
        assert_eq!(r.iter().map(|m| m.moves).collect::<Vec<_>>(), [2 * KEEP as u64 + 7, 2 * KEEP as u64 + 8, 2 * KEEP as u64 + 9, 9999]);
        assert!(std::fs::read_to_string(path(&dir)).unwrap().lines().count() < 2 * KEEP);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
