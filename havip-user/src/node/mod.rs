//! The node controller (havipd). The dataplane lives in pinned kernel objects, so this
//! process may stop, crash or restart at any time without interrupting traffic: on start
//! it adopts what is pinned and applies the difference.
//!
//! Decisions are pure functions, each in its own module and tested without a kernel:
//! - `binder`: which NIC one VIP belongs on, from link states and its preference order;
//! - `rank`: a VIP's preference order from measured path quality;
//! - `placer`: the moves for every VIP (binder + rank + pins);
//! - `pool`: which pool VIP an application's request gets.
//!
//! The parts that carry them out:
//! - `reconciler`: brings the kernel to a configuration, stage by stage, and says exactly
//!   what it applied when a stage fails;
//! - `prober`: probe slots, sockets and history, producing samples;
//! - `mover`: a move as one map write, a log line, an event and announcements;
//! - `links`: link events (failover) and the NIC table they keep current;
//! - `pool_service` and `operator`: the API's calls;
//! - `event_loop`: one task that serves link events before anything else.

pub mod binder;
pub mod events;
pub mod health;
pub mod nics;
pub mod path_watch;
pub mod placer;
pub mod pool;
pub mod prober;
pub mod rank;
pub mod reconciler;
pub mod state;

mod cluster_grants;
mod event_loop;
mod explain;
mod links;
mod lock;
mod mover;
mod operator;
mod pool_service;
mod quality;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

pub use event_loop::{run, StartExporter};

use crate::{
    config::Config,
    kernel::{dataplane::Dataplane, netlink::Netlink},
    node::{binder::LinkState, health::DaemonMetrics, mover::Mover, nics::NicTable, prober::Prober, quality::Quality, state::State},
};

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub config: PathBuf,
    pub pin_root: PathBuf,
    pub run_dir: PathBuf,
    pub netns: Option<String>,
}

/// Everything the controller knows. Owned by the event loop's one task; each concern's
/// methods live in the module named for it.
struct Node {
    opts: DaemonOptions,
    nl: Netlink,
    dp: Dataplane,
    state: State,
    /// The configuration in force: the file's plus the held pool VIPs (`pool::overlay`).
    cfg: Config,
    /// The file's configuration alone.
    file_cfg: Config,
    /// The attached NICs as the binder and the maps know them.
    nics: NicTable,
    links: BTreeMap<String, LinkState>,
    prober: Prober,
    /// The latest quality ranking of each VIP with targets.
    quality: BTreeMap<IpAddr, Quality>,
    mover: Mover,
    /// Cluster mode's service (heartbeats, ownership, fences); `None` standalone.
    cluster: Option<crate::cluster::service::Handle>,
    /// Cluster mode: the connection API calls use for the spare pools' ledger.
    ledger: Option<crate::cluster::requests::LedgerClient>,
    /// Ledger records this node's requests wrote, until its view of the ledger shows them.
    written: crate::cluster::requests::Written,
    /// The granted VIPs last applied (`None`: none yet, or the last apply failed).
    applied_grants: Option<Vec<crate::cluster::pools::GrantedVip>>,
    /// Bytes through the VIPs this node served at the last placement report, and when.
    traffic_prev: Option<(std::time::Instant, u64)>,
    /// Controller health for the metrics endpoint (rebinds, applies).
    metrics: Arc<DaemonMetrics>,
}

impl Node {
    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.opts.run_dir)
    }

    /// The NIC that owns VIP `vip` now, by name (`None`: unbound, not a VIP, or bound to
    /// an ifindex havipd no longer knows).
    fn nic_of(&self, vip: IpAddr) -> Option<String> {
        let id = self.dp.vip_id(vip)?;
        let b = self.dp.binding_of(id).ok()?;
        self.nics.name_of(b.ifindex).map(str::to_string)
    }
}
