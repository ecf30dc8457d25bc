//! Where havip keeps its kernel objects on bpffs, and mounting bpffs when it is missing.

use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/havip";

/// The layout under the pin root: `maps/<MAP>`, `progs/<program>`, `links/<nic>/<hook>`.
///
/// bpffs refuses any name containing a dot (reserved by the kernel), but interface names
/// may hold one (`eth0.100`); they can never hold a colon, so dots are pinned as colons.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    /// Ingress on TC instead of XDP (see `kernel::ingress_hook`).
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress];

    pub fn suffix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }
    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }
    /// Links not tied to a NIC (the queue-drop tracepoint).
    pub fn host_links_dir(&self) -> PathBuf {
        self.root.join("host-links")
    }
    pub fn host_link(&self, name: &str) -> PathBuf {
        self.host_links_dir().join(name)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn nic_dir(&self, nic: &str) -> PathBuf {
        self.links_dir().join(nic.replace('.', ":"))
    }
    pub fn link(&self, nic: &str, hook: Hook) -> PathBuf {
        self.nic_dir(nic).join(hook.suffix())
    }
    /// NIC names that have pinned links.
    pub fn pinned_nics(&self) -> Vec<String> {
        let mut nics: Vec<String> = std::fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some(e.file_name().into_string().ok()?.replace(':', ".")))
            .collect();
        nics.sort();
        nics.dedup();
        nics
    }
    pub fn exists(&self) -> bool {
        self.map(havip_common::maps::VIPS).exists()
    }
}

/// Is a bpf filesystem mounted at (or above) `path`?
pub fn bpffs_mounted_at(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && mnt.is_some_and(|m| path.starts_with(m))
    })
}

/// Mounts bpffs at /sys/fs/bpf unless `pin_root` already lies on a bpf filesystem.
/// Returns true if it mounted.
pub fn ensure_bpffs(pin_root: &Path) -> anyhow::Result<bool> {
    if bpffs_mounted_at(pin_root) {
        return Ok(false);
    }
    let target = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(target) {
        anyhow::bail!("{} is not on a bpf filesystem; mount one there (mount -t bpf bpf DIR) or use a pin path under /sys/fs/bpf", pin_root.display());
    }
    std::fs::create_dir_all(target).ok();
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let rc = unsafe { libc::mount(c("bpf").as_ptr(), c("/sys/fs/bpf").as_ptr(), c("bpf").as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("mounting bpffs at /sys/fs/bpf failed: {e} (havip needs root or CAP_SYS_ADMIN)");
    }
    Ok(true)
}
