//! `havip stats`: per-VIP counters read straight from the pinned maps.

use std::time::Duration;

use anyhow::bail;

use crate::{
    cli::Locations,
    kernel::pins::PinLayout,
    node::state::State,
    observe::stats::{render_table, Snapshot},
};

pub fn run(pins: &PinLayout, loc: &Locations, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    if !pins.exists() {
        bail!("no havip dataplane pinned at {}; start havipd first (or pass --pin-path)", pins.root.display());
    }
    let Some(every) = watch else {
        let snap = Snapshot::read(pins, State::load(&loc.run_dir).ok().flatten().as_ref())?;
        if json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            print!("{}", render_table(&snap, None));
        }
        return Ok(());
    };
    let mut prev: Option<Snapshot> = None;
    loop {
        let snap = Snapshot::read(pins, State::load(&loc.run_dir).ok().flatten().as_ref())?;
        if json {
            println!("{}", serde_json::to_string(&snap)?);
        } else {
            // Clear the screen and home the cursor: a refreshing view, not a scroll.
            print!("\x1b[2J\x1b[H{}", render_table(&snap, prev.as_ref()));
            println!("(every {every}s; rates since the last refresh; Ctrl-C to stop)");
        }
        prev = Some(snap);
        std::thread::sleep(Duration::from_secs_f64(every.max(0.1)));
    }
}
