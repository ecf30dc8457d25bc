//! `havip down`: stop havipd if it runs, then remove everything havip installed — links
//! (which detaches the programs), pinned programs and maps, VIP addresses, the state file.

use std::{path::Path, time::Duration};

use anyhow::Context;

use crate::{kernel::dataplane::remove_all_pins, kernel::netlink::Netlink, kernel::netns, kernel::pins::PinLayout, node::state::State};

#[derive(Debug, Default)]
pub struct DownReport {
    pub stopped_pid: Option<u32>,
    pub removed_addresses: usize,
    pub removed_pins: bool,
}

/// Must run before any other thread exists when the node runs in a namespace (it enters
/// the namespace recorded in the state file to remove addresses).
pub fn down(pin_root: &Path, run_dir: &Path) -> anyhow::Result<DownReport> {
    let mut report = DownReport::default();
    let state = State::load(run_dir)?;
    if let Some(pid) = state.as_ref().and_then(State::live_pid) {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        report.stopped_pid = Some(pid);
    }
    let pins = PinLayout::new(pin_root);
    if pin_root.exists() {
        remove_all_pins(&pins)?;
        report.removed_pins = true;
    }
    if let Some(state) = &state {
        if !state.addresses.is_empty() || !state.sysctls.is_empty() || !state.nics.is_empty() {
            let addresses = state.addresses.clone();
            let sysctls = state.sysctls.clone();
            let nics = state.nics.clone();
            let ns = state.netns.clone();
            report.removed_addresses = addresses.len();
            // Address removal is netns-bound: do it on a thread inside the namespace.
            let work = move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let nl = Netlink::new()?;
                    for a in &addresses {
                        if let Some(l) = nl.link(&a.interface).await? {
                            nl.del_address(l.index, a.address).await?;
                        }
                    }
                    // havip's egress classes (only its own root qdisc; others stay).
                    for nic in &nics {
                        if let Some(l) = nl.link(nic).await? {
                            crate::kernel::qdisc::remove(nl.handle(), l.index).await?;
                        }
                    }
                    // Settings havipd changed go back (the NIC may be gone: fine).
                    for (path, old) in &sysctls {
                        let _ = std::fs::write(path, old);
                    }
                    anyhow::Ok(())
                })
            };
            match ns {
                // If the namespace is gone, its addresses went with it.
                Some(ns) => {
                    if let Ok(r) = netns::in_netns(&ns, work) {
                        r?
                    }
                }
                None => work()?,
            }
        }
        std::fs::remove_file(crate::node::state::state_path(run_dir)).context("removing the state file")?;
        let _ = std::fs::remove_file(crate::node::events::path(run_dir));
        let _ = std::fs::remove_dir(run_dir);
    }
    Ok(report)
}

/// `havip down`: prints what was removed.
pub fn run(loc: &crate::cli::Locations) -> anyhow::Result<()> {
    let r = down(&loc.pin_path, &loc.run_dir)?;
    if let Some(pid) = r.stopped_pid {
        println!("stopped havipd (pid {pid})");
    }
    println!(
        "removed {} VIP address(es){}",
        r.removed_addresses,
        if r.removed_pins { format!(", and all pins under {}", loc.pin_path.display()) } else { String::new() }
    );
    Ok(())
}
