//! Cluster mode: VIPs survive the loss of a node. etcd holds who owns each VIP (one record
//! per VIP, changed only by revision-compared transactions); peers detect a dead owner by
//! heartbeats within tens of milliseconds; the kernel enforces ownership with a serve-until
//! time per VIP (see `havip_common::fence`) that the owner extends only on a fresh
//! confirmation, so two nodes never answer for one VIP, even when a controller is dead or
//! paused while its programs keep running.
//!
//! - `timing`: the bound (lease, clock-rate error, the successor's wait), pure.
//! - `peers`: liveness, suspicion and the promises heartbeats carry, pure.
//! - `decide`: who should own each VIP, pure.
//! - `record`, `wire`: the etcd record and the heartbeat datagram.
//! - `store`: etcd; `service`: the thread that runs it all; `status`: what it shows;
//!   `clock`: CLOCK_BOOTTIME.
//! - `manager`: the managing node's election and leadership-guarded writes; `follower`:
//!   every node's part (following the ledger, checking its spares, its placement report);
//!   `ledger_io`: their etcd calls.
//! - `pools`: the ledger's records; which spare VIPs the manager adds for which node, pure.
//! - `placement`: which node a request's VIP goes to, pure; `rebalance`: which VIPs the
//!   manager moves in a round, pure; `requests`: granting, forwarding, releasing in etcd.
//! - `vipgen`: which address of a network to hand out next (the managing node's VIP
//!   generation by rule, issue 13), pure.

pub mod decide;
pub mod follower;
pub mod ledger_io;
pub mod manager;
pub mod peers;
pub mod placement;
pub mod pools;
pub mod rebalance;
pub mod record;
pub mod requests;
pub mod service;
pub mod status;
pub mod store;
pub mod timing;
pub mod vipgen;
pub mod wire;
