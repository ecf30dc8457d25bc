//! One havipd per dataplane: an exclusive `flock` on the pin root directory, held for the
//! life of the process (the kernel drops it when the process dies, however it dies). Two
//! controllers writing the same pinned maps would undo each other's bindings; run
//! directories may differ, the pin root cannot.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use anyhow::Context;

/// The held lock; dropping it (or exiting) releases it.
pub struct PinLock {
    _dir: File,
}

/// Takes the lock on `pin_root` (which must exist), or says which process holds it.
pub fn lock_pin_root(pin_root: &Path) -> anyhow::Result<PinLock> {
    let dir = File::open(pin_root).with_context(|| format!("opening {} to lock it", pin_root.display()))?;
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(PinLock { _dir: dir });
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err).with_context(|| format!("locking {}", pin_root.display()));
    }
    let holder = dir.metadata().ok().and_then(|m| holder_pid(m.dev(), m.ino()));
    match holder {
        Some(pid) => anyhow::bail!(
            "another havipd (pid {pid}) already runs the dataplane pinned at {}; stop it first, or give this one its own --pin-path",
            pin_root.display()
        ),
        None => anyhow::bail!(
            "another process holds the lock on {}: another havipd runs this dataplane; stop it first, or give this one its own --pin-path",
            pin_root.display()
        ),
    }
}

/// The pid holding a `flock` on the file with device `dev` and inode `ino`, from
/// /proc/locks (lines like `1: FLOCK  ADVISORY  WRITE 4242 00:1d:5 0 EOF`).
fn holder_pid(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    parse_holder(&text, major as u64, minor as u64, ino)
}

fn parse_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> FLOCK ..."; skip them.
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let mut id = f[5].split(':');
        let (Some(maj), Some(min), Some(inode)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        if hex(maj) == Some(major) && hex(min) == Some(minor) && inode.parse::<u64>().ok() == Some(ino) {
            return f[4].parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_one_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 111 00:1d:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1d:5 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 5353 00:1d:5 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 fd:01:5 0 EOF\n";
        assert_eq!(parse_holder(locks, 0, 0x1d, 5), Some(4242));
        assert_eq!(parse_holder(locks, 0xfd, 1, 5), Some(99));
        assert_eq!(parse_holder(locks, 0, 0x1d, 77), None, "a POSIX lock is not ours");
        assert_eq!(parse_holder(locks, 0, 0x1d, 6), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_our_pid() {
        let dir = std::env::temp_dir().join(format!("havip-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _held = lock_pin_root(&dir).unwrap();
        // flock locks belong to the open file description: a second open conflicts, even
        // in the same process.
        let err = lock_pin_root(&dir).err().expect("the second lock must be refused").to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(_held);
        assert!(lock_pin_root(&dir).is_ok(), "released with the first");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
