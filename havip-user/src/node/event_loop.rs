//! havipd's one task. It starts the node (validate, lock the pins, adopt or load the
//! dataplane, apply) and then serves, in this order of priority (a `biased` select, so a
//! burst of lower-priority work never delays a link event by more than the one item
//! already running):
//! 1. link events: failover;
//! 2. SIGTERM/SIGINT: stop, leaving the dataplane running;
//! 3. a 100 ms tick: failback after the hold-down;
//! 4. SIGHUP: reload;
//! 5. probe and ranking ticks;
//! 6. API calls.
//!
//! A link watcher that ends (its netlink stream closed or failed) is subscribed again and
//! every link state read afresh; if that fails, havipd exits non-zero so its supervisor
//! restarts it. It never goes on without failover.

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Answer, ApiError, Call, Reply},
    cluster,
    config::{capacity, Config},
    kernel::{
        dataplane::Dataplane,
        netlink::{self, LinkInfo, Netlink},
        netns,
        pins::{ensure_bpffs, PinLayout},
    },
    node::{
        health::DaemonMetrics,
        links::LinkFollowUp,
        lock::lock_pin_root,
        mover::Mover,
        nics::NicTable,
        pool,
        pool_service::held_that_fit,
        prober::Prober,
        reconciler::{resolve, Scope},
        state::{ApplyStatus, State},
        DaemonOptions, Node,
    },
};

/// Period of the probe-by-probe watch: a lost probe is noticed at most this late.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// Starts the metrics exporter: given where to listen (`None`: disabled) and the health
/// counters the node keeps. The node does not know the exporter (it sits in a layer above
/// it); the binary plugs it in.
pub type StartExporter = Box<dyn FnOnce(Option<std::net::SocketAddr>, Arc<DaemonMetrics>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send>;

/// Runs havipd until SIGTERM/SIGINT. Returns an error (nothing applied) if the initial
/// configuration is invalid or cannot be applied.
pub fn run(opts: DaemonOptions, exporter: StartExporter) -> anyhow::Result<()> {
    if let Some(ns) = &opts.netns {
        // Before any other thread exists: the runtime's threads inherit it.
        netns::enter(ns)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(opts, exporter))
}

/// Subscribes to link events, retrying briefly: a node without them has no failover.
async fn subscribe_links() -> anyhow::Result<mpsc::UnboundedReceiver<(LinkInfo, bool)>> {
    let mut last = None;
    for attempt in 0..5 {
        match netlink::watch_links() {
            Ok(rx) => return Ok(rx),
            Err(e) => {
                warn!(attempt, error = %format!("{e:#}"), "cannot subscribe to link events; retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(last.expect("at least one attempt")).context("subscribing to link events failed; exiting so the supervisor restarts havipd")
}

async fn serve(opts: DaemonOptions, exporter: StartExporter) -> anyhow::Result<()> {
    // Validate before touching anything, the files the config names too (a token file that
    // others may read is refused here, naming `api.token_file`).
    let cfg = Config::load_for_apply(&opts.config)?;
    // The API token is read now, not where the TCP listener starts after the apply: a file
    // that cannot be used must change nothing. (Re-read on restart only; a reload keeps it.)
    let api_token = match (cfg.api.listen, &cfg.api.token_file) {
        (Some(_), Some(f)) => Some(api::server::read_token(f)?),
        _ => None,
    };
    // Cluster mode: etcd must answer before anything is applied (a clear error, not a hang).
    if let Some(c) = &cfg.cluster {
        cluster::store::Store::connect(c).await?;
    }
    let nl = Netlink::new()?;
    // Subscribe to link events before reading link states, so no change falls in between.
    let mut link_events = subscribe_links().await?;
    let res = resolve(&cfg, &nl, Scope::Full).await?;
    // Pool VIPs applications held before a restart are held again: the file must fit the
    // maps together with them, checked before anything is applied (as a reload is). An
    // application's VIP is not dropped to make room for a file that grew.
    let mut state = State::load(&opts.run_dir)?.unwrap_or_default();
    let (kept, dropped) = held_that_fit(&cfg, &state.allocations);
    if let Some(e) = capacity::check(&pool::overlay(&cfg, &kept)).first() {
        let why = pool::over_capacity(e, "the file with the VIPs applications hold");
        anyhow::bail!("{}: {why}; nothing was applied. To release them, start with the previous file first", opts.config.display());
    }
    // One controller per dataplane, whatever its run directory: the lock comes before
    // anything is written.
    ensure_bpffs(&opts.pin_root)?;
    let created_pin_root = !opts.pin_root.exists();
    std::fs::create_dir_all(&opts.pin_root).with_context(|| format!("creating {}", opts.pin_root.display()))?;
    let _lock = lock_pin_root(&opts.pin_root)?;
    // Pins this build cannot use are refused before anything starts (the check reads only).
    Dataplane::check_pins(&PinLayout::new(&opts.pin_root))?;
    // Before anything is applied: a metrics address already taken changes nothing.
    let metrics = DaemonMetrics::new();
    if let Err(e) = exporter(cfg.metrics, metrics.clone()).await {
        if created_pin_root {
            let _ = std::fs::remove_dir(&opts.pin_root);
        }
        return Err(e);
    }

    let adopting = PinLayout::new(&opts.pin_root).exists();
    let mut dp = Dataplane::open_with(&opts.pin_root, cfg.passive_tcp)?;
    dp.pin_programs()?;
    if let Err(e) = dp.attach_queue_drops() {
        warn!(error = format!("{e:#}"), "CPU-queue drops will not be counted");
    }
    if let Some(pid) = state.live_pid() {
        if pid != std::process::id() {
            anyhow::bail!("another havipd (pid {pid}) is running with run directory {}; stop it first", opts.run_dir.display());
        }
    }
    state.pid = Some(std::process::id());
    state.config_path = Some(std::fs::canonicalize(&opts.config).unwrap_or(opts.config.clone()));
    state.netns = opts.netns.clone();
    std::fs::create_dir_all(&opts.run_dir)?;
    for a in &dropped {
        warn!(app = %a.app, vip = %a.vip, "released: its pool VIP or class is no longer configured");
    }
    state.allocations = kept;
    let file_cfg = cfg;
    let cfg = pool::overlay(&file_cfg, &state.allocations);
    let mut node = Node {
        mover: Mover::new(&opts.run_dir),
        cluster: None,
        ledger: None,
        traffic_prev: None,
        written: Default::default(),
        applied_grants: None,
        opts,
        nl,
        dp,
        state,
        cfg: cfg.clone(),
        file_cfg,
        nics: NicTable::default(),
        links: BTreeMap::new(),
        prober: Prober::default(),
        quality: BTreeMap::new(),
        metrics,
    };
    if adopting {
        info!(pins = %node.opts.pin_root.display(), "adopting the pinned dataplane");
    }
    node.state.generation += 1;
    let generation = node.state.generation;
    let summary = node.apply(&cfg, &res, Scope::Full).await.context("applying the configuration")?;
    node.state.last_apply = Some(ApplyStatus::now(generation, true, summary.clone()));
    node.metrics.applied(true, generation);

    if let Some(c) = cfg.cluster.clone() {
        let announce = (cfg.failover.announce_count, cfg.failover.announce_interval);
        let handle = cluster::service::start(
            c,
            cluster_vips(&cfg, &Default::default()),
            cfg.nics.clone(),
            PinLayout::new(&node.opts.pin_root),
            announce,
            cfg.ranking.clone(),
        )?;
        node.metrics.set_cluster(handle.status_source());
        node.cluster = Some(handle);
    }
    let sock = api::socket_path(&node.opts.run_dir);
    let (tx, mut rx) = mpsc::channel(256);
    api::server::serve_unix(&sock, node.file_cfg.api.socket_group.as_deref(), tx.clone())?;
    if let (Some(addr), Some(token)) = (node.file_cfg.api.listen, api_token) {
        api::server::serve_tcp(addr, token, tx.clone()).await?;
        info!(%addr, "API also on TCP (bearer token)");
    }
    node.save()?;
    info!(config = %node.opts.config.display(), vips = cfg.vips.len(), mappings = cfg.remaps.len(), %summary, "havipd ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rank_every = node.cfg.ranking.interval;
    let mut rank_tick = tokio::time::interval(rank_every);
    rank_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The probe-by-probe watch: sends what is due and checks what is overdue. Its period
    // bounds how late a lost probe is noticed.
    let mut watch_tick = tokio::time::interval(WATCH_EVERY);
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Cluster mode: the granted VIPs of the spare pools' ledger (never changes standalone).
    let (_no_grants, idle) = tokio::sync::watch::channel(Vec::new());
    let mut grants = node.cluster.as_ref().map_or(idle, |c| c.grants());
    loop {
        tokio::select! {
            biased;
            event = link_events.recv() => {
                let follow_up = match event {
                    Some((link, deleted)) => node.on_link(link, deleted),
                    None => {
                        error!("the link watcher ended; subscribing again and reading every link state");
                        link_events = subscribe_links().await?;
                        node.resync_links().await
                    }
                };
                if follow_up == LinkFollowUp::Reattach {
                    node.reattach().await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if node.failback_pending() {
                    node.place_all(None);
                }
                // Own ledger writes not yet seen in a read: keep what is served in step.
                if !node.written.is_empty() {
                    node.reconcile_grants().await;
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading");
                node.reload().await;
                if node.cfg.ranking.interval != rank_every {
                    rank_every = node.cfg.ranking.interval;
                    rank_tick = tokio::time::interval(rank_every);
                }
            }
            _ = watch_tick.tick() => node.watch_round(),
            Ok(()) = grants.changed() => {
                grants.borrow_and_update();
                node.reconcile_grants().await;
            }
            _ = rank_tick.tick() => node.rank_round(),
            Some((call, reply)) = rx.recv() => {
                let r = node.on_api(call).await;
                let _ = reply.send(r);
            }
        }
    }
    // The dataplane stays: pinned programs keep serving traffic until `havip down`. A
    // cluster node asks its peers to hold off while it restarts.
    if let Some(c) = node.cluster.take() {
        c.stop_for_restart().await;
    }
    node.state.pid = None;
    let _ = std::fs::remove_file(&sock);
    if let Err(e) = node.save() {
        warn!(error = %e, "cannot write the state file");
    }
    info!("havipd stopped; the dataplane keeps running (havip down removes it)");
    Ok(())
}

impl Node {
    /// A failback can only become due within the hold-down after a link change: the tick
    /// runs the placer only then.
    fn failback_pending(&self) -> bool {
        let hold = self.cfg.failover.failback_hold_down + Duration::from_millis(500);
        self.links.values().any(|l| l.since.elapsed() <= hold)
    }

    /// One API call, decided here on the node's task so calls never race each other.
    async fn on_api(&mut self, call: Call) -> Reply {
        match call {
            Call::Request(r) if self.file_cfg.cluster.is_some() => self.cluster_request(r).await,
            Call::Request(r) => self.pool_request(r).await,
            Call::Release { app, vip } if self.file_cfg.cluster.is_some() => self.cluster_release(&app, vip).await,
            Call::Release { app, vip } => self.pool_release(&app, vip).await,
            Call::List if self.file_cfg.cluster.is_some() => self.cluster_list(),
            Call::List => self.pool_list(),
            Call::Bind { vip, nic } => self.operator_bind(vip, nic),
            Call::Unbind { vip } => self.operator_unbind(vip),
            Call::Explain { vip } => self.explain(vip),
            Call::Rerank => self.rerank(),
            Call::ClusterStatus => match &self.cluster {
                Some(c) => Ok(Answer::json(c.status())),
                None => Err(ApiError::NotFound("this node runs standalone (no [cluster] section)".into())),
            },
        }
    }

    /// Reconciles the configuration in force again, after a NIC came back as a new device.
    async fn reattach(&mut self) {
        let cfg = self.cfg.clone();
        let r = match resolve(&cfg, &self.nl, Scope::Full).await {
            Ok(res) => self.apply(&cfg, &res, Scope::Full).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        match r {
            Ok(summary) => info!(%summary, "re-attached"),
            Err(e) => {
                error!(error = %e, "re-attaching failed; the NIC stays out of use until a reload")
            }
        }
    }

    /// SIGHUP: applies the file again. If a stage fails, what was applied is reported and
    /// the previous configuration is applied again (and that result reported too).
    async fn reload(&mut self) {
        self.state.generation += 1;
        let generation = self.state.generation;
        let previous = self.cfg.clone();
        let file = match Config::load_for_apply(&self.opts.config) {
            Ok(f) => f,
            Err(e) => return self.finish_reload(generation, false, format!("{e:#}; nothing was applied")),
        };
        if file.passive_tcp != self.cfg.passive_tcp {
            warn!(passive_tcp = file.passive_tcp, "passive.tcp changes when the programs load: restart havipd to apply it");
        }
        if file.metrics != self.cfg.metrics {
            warn!(listen = ?file.metrics, "metrics.listen changes when havipd starts: restart havipd to apply it");
        }
        // Joining, leaving or reshaping the cluster changes every VIP's fencing and the
        // service's sockets and timing: only a restart does that cleanly.
        if file.cluster != self.cfg.cluster {
            return self.finish_reload(generation, false, "the [cluster] section changed; restart havipd to apply it (nothing was applied)".into());
        }
        let (kept, dropped) = held_that_fit(&file, &self.state.allocations);
        let cfg = pool::overlay(&file, &kept);
        // The file fits on its own (validated); with what applications hold it may not. An
        // application's VIP is not dropped to make room: the reload is refused.
        if let Some(e) = capacity::check(&cfg).first() {
            let why = pool::over_capacity(e, "the file with the VIPs applications hold");
            return self.finish_reload(generation, false, format!("{}: {why}; nothing was applied", self.opts.config.display()));
        }
        let res = match resolve(&cfg, &self.nl, Scope::Full).await {
            Ok(r) => r,
            Err(e) => return self.finish_reload(generation, false, format!("{e:#}")),
        };
        match self.apply(&cfg, &res, Scope::Full).await {
            Ok(summary) => {
                for a in &dropped {
                    warn!(app = %a.app, vip = %a.vip, "released: its pool VIP or class is no longer configured");
                }
                self.state.allocations = kept;
                self.file_cfg = file;
                // NICs or targets may have changed: rank now, not at the next round.
                self.rank_round();
                // Test-only: holds the verdict back while the state file already shows the
                // new generation (saved by the apply's last stage), the window in which
                // `havip reload` once read the previous reload's verdict.
                if crate::faults::take("reload:slow_verdict") {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // The cluster's granted VIPs are not in the file: serve them again (which
                // hands the cluster service the file's VIPs too).
                let grants = self.desired_grants();
                if grants.is_empty() {
                    if let Some(c) = &self.cluster {
                        c.set_vips(cluster_vips(&self.cfg, &Default::default()));
                    }
                    self.applied_grants = Some(Vec::new());
                } else {
                    self.applied_grants = None;
                    self.reconcile_grants().await;
                }
                self.finish_reload(generation, true, summary);
            }
            Err(failed) => {
                error!(stage = %failed.stage, applied = %failed.applied.join("; "), error = %format!("{:#}", failed.source), "reload failed; restoring the previous configuration");
                let restored = match resolve(&previous, &self.nl, Scope::Full).await {
                    Ok(res) => self.apply(&previous, &res, Scope::Full).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("{e:#}")),
                };
                let message = match restored {
                    Ok(summary) => format!("{failed}; the previous configuration was restored ({summary})"),
                    Err(e) => format!("{failed}; restoring the previous configuration failed too: {e}; the running state is as applied so far"),
                };
                self.finish_reload(generation, false, message);
            }
        }
    }

    /// Records a reload's verdict under its generation: `havip reload` waits for a verdict
    /// of a generation newer than the one it saw, so it never prints an older one.
    fn finish_reload(&mut self, generation: u64, ok: bool, message: String) {
        if ok {
            info!(summary = %message, generation, "reload applied");
        } else {
            error!(error = %message, generation, "reload rejected");
        }
        self.metrics.applied(ok, generation);
        self.state.last_apply = Some(ApplyStatus::now(generation, ok, message));
        if let Err(e) = self.save() {
            error!(error = %e, "cannot write the state file");
        }
    }
}

/// The cluster VIPs of a configuration with their candidate nodes.
/// The cluster VIPs of `cfg`; those in `placed` are granted VIPs ordered by the ledger.
pub(super) fn cluster_vips(cfg: &Config, placed: &std::collections::BTreeSet<std::net::IpAddr>) -> cluster::service::ClusterVips {
    cfg.vips.iter().map(|v| (v.address, v.nodes.clone(), placed.contains(&v.address))).collect()
}
