//! Test-only fault injection. When havipd runs with `HAVIP_FAULTS=<file>`, each fault
//! point named in that file (one name per line) fails once: the point removes its line
//! when it fires. Tests use it to fail a reconcile stage or end the link watcher at a
//! moment they choose, then check what havipd did about it. Without the variable every
//! point is a no-op that reads nothing.

use std::path::PathBuf;

fn fault_file() -> Option<PathBuf> {
    std::env::var_os("HAVIP_FAULTS").map(PathBuf::from)
}

/// Whether fault `name` is armed; disarms it if so.
pub fn take(name: &str) -> bool {
    let Some(path) = fault_file() else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return false;
    };
    let mut hit = false;
    let rest: Vec<&str> = text
        .lines()
        .filter(|l| {
            let this = !hit && l.trim() == name;
            hit |= this;
            !this
        })
        .collect();
    if hit {
        let _ = std::fs::write(&path, rest.join("\n"));
        tracing::warn!(fault = name, "injected fault (HAVIP_FAULTS)");
    }
    hit
}

/// `Err` if fault `name` is armed (and disarms it).
pub fn check(name: &str) -> anyhow::Result<()> {
    if take(name) {
        anyhow::bail!("injected fault `{name}`");
    }
    Ok(())
}
