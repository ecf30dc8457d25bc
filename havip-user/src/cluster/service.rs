//! The cluster service: heartbeats, confirmations, takeovers and givebacks, and the kernel
//! fence of every cluster VIP. It runs on a thread of its own (with its own runtime) so the
//! event loop's work (reloads, ranking rounds, API calls) never delays a heartbeat; a
//! stalled or dead havipd stops heartbeating and stops extending its fences, which is what
//! its peers and the kernel then act on.
//!
//! One task owns all state; etcd reads and writes run in helper tasks and report back, so a
//! slow or unreachable etcd never holds up heartbeats or acknowledgement-based extensions.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use havip_common::{Fence, VipKey};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::status::{Counters, PathStatus, PeerStatus, Status, VipStatus};
use super::{
    decide::{self, Action, Local},
    manager::{self, ManagerStatus},
    peers::Peers,
    placement::NodeReport,
    pools::GrantedVip,
    record::{self, NodeMark, VipRecord},
    requests::LedgerView,
    store::{Marks, ReadCache, Records, Snapshot, Store},
    timing::{self, Timing},
    wire::{Format, Heartbeat},
};
use crate::{
    config::{cluster::Cluster, ranking::Settings},
    kernel::{
        announce::Announcer,
        clock,
        dataplane::{FenceView, Maps},
        pins::PinLayout,
    },
};

/// A cluster VIP as the configuration gives it: address, candidate nodes, and whether
/// their order is the managing node's placement (a granted VIP: the ledger's node first),
/// which the owner then follows (see `decide`).
pub type ClusterVips = Vec<(IpAddr, Vec<String>, bool)>;

/// The running service.
pub struct Handle {
    status: Arc<Mutex<Status>>,
    /// The granted VIPs of the ledger (see `manager::follow_ledger`).
    grants: watch::Receiver<Vec<GrantedVip>>,
    /// The ledger and the nodes' reports as last read (requests place by them).
    view: watch::Receiver<Arc<LedgerView>>,
    /// This node's report for placement.
    report: watch::Sender<NodeReport>,
    manager: Arc<Mutex<ManagerStatus>>,
    vips: watch::Sender<ClusterVips>,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Where the service publishes its status (every 100 ms), for the metrics exporter.
    pub fn status_source(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// The ledger and the nodes' reports as the last read showed them.
    pub fn view(&self) -> Arc<LedgerView> {
        self.view.borrow().clone()
    }

    /// This node's report for placement (published when it changes, at most every second).
    pub fn set_report(&self, r: NodeReport) {
        self.report.send_if_modified(|old| {
            let changed = *old != r;
            *old = r;
            changed
        });
    }

    /// Counts a request granted through this node, by how.
    pub fn count_grant(&self, how: &str) {
        if let Ok(mut m) = self.manager.lock() {
            *m.grants.entry(how.to_string()).or_insert(0) += 1;
        }
    }

    /// The granted VIPs, changed whenever the ledger's set changes.
    pub fn grants(&self) -> watch::Receiver<Vec<GrantedVip>> {
        self.grants.clone()
    }

    /// A reload changed the VIPs.
    pub fn set_vips(&self, vips: ClusterVips) {
        let _ = self.vips.send(vips);
    }

    /// Planned restart: asks peers for the restart grace, extends the fences of the VIPs
    /// they granted it for, and stops. Waits at most about half a second.
    pub async fn stop_for_restart(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Starts the service on its own thread. `store` was checked at start (it answered).
pub fn start(cluster: Cluster, vips: ClusterVips, nics: Vec<String>, pins: PinLayout, announce: (u32, Duration), ranking: Settings) -> anyhow::Result<Handle> {
    let status = Arc::new(Mutex::new(Status { node: cluster.node.clone(), etcd_endpoints: cluster.etcd_endpoints.clone(), ..Default::default() }));
    let (vips_tx, vips_rx) = watch::channel(vips);
    let (grants_tx, grants_rx) = watch::channel(Vec::new());
    let (view_tx, view_rx) = watch::channel(Arc::new(LedgerView::default()));
    let (report_tx, report_rx) = watch::channel(NodeReport { node: cluster.node.clone(), healthy: true, ..Default::default() });
    let manager_status = Arc::new(Mutex::new(ManagerStatus::default()));
    let links = manager::Links { grants: grants_tx, view: view_tx, report: report_rx, ranking };
    let ms = manager_status.clone();
    let (stop_tx, stop_rx) = oneshot::channel();
    let maps = Maps::open(&pins).context("opening the maps for the cluster fences")?;
    let fences = FenceView::open(&pins).context("opening the fence maps for announcements")?;
    let recv = bind_receiver(cluster.heartbeat_port)?;
    let st = status.clone();
    let thread = std::thread::Builder::new().name("havip-cluster".into()).spawn(move || {
        raise_priority(cluster.thread_nice);
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the cluster service runtime");
                return;
            }
        };
        rt.block_on(async move {
            let store = match Store::connect(&cluster).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cluster service: etcd lost right after start; serving nothing until havipd restarts");
                    return;
                }
            };
            let svc = Service::new(cluster, nics, maps, fences, recv, st, announce, ms);
            svc.run(store, vips_rx, stop_rx, links).await;
        });
    })?;
    Ok(Handle {
        status,
        grants: grants_rx,
        view: view_rx,
        report: report_tx,
        manager: manager_status,
        vips: vips_tx,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Sets the cluster thread's nice value (`cluster.thread_nice`, default -10). Heartbeats
/// are due every few milliseconds, and a node whose heartbeats stall for the suspicion
/// time is taken over from although alive. Under CPU contention an ordinary thread can
/// wait tens of milliseconds for a core (measured: rounds up to 35 ms late with the
/// 300-request test beside the timing tests, 13 ms at -10); at -10 its weight is about
/// nine times an ordinary thread's, yet it cannot starve the machine as a real-time class
/// could.
fn raise_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: plain syscalls about the calling thread; no memory is passed.
    let (tid, rc) = unsafe {
        let tid = libc::gettid();
        (tid, libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice))
    };
    if rc == 0 {
        info!(tid, nice, "cluster thread priority set (cluster.thread_nice) so heartbeats go out on time under CPU contention");
    } else {
        warn!(
            tid,
            nice,
            error = %std::io::Error::last_os_error(),
            "cannot set the cluster thread's priority (cluster.thread_nice needs CAP_SYS_NICE below 0); heartbeats may go out late on a busy node"
        );
    }
}

fn bind_receiver(port: u16) -> anyhow::Result<tokio::net::UdpSocket> {
    // Dual-stack: peers may be given by IPv4 or IPv6 addresses.
    let sock = std::net::UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))
        .or_else(|_| std::net::UdpSocket::bind(SocketAddr::from(([0u8; 4], port))))
        .with_context(|| format!("binding the heartbeat port {port} (cluster.heartbeat_port): is another havipd running here?"))?;
    sock.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(sock)?)
}

/// A send socket bound to one NIC, so each path is tried whatever routing prefers.
struct PathSocket {
    nic: String,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

fn bound_to(nic: &str, any: SocketAddr) -> Option<UdpSocket> {
    let s = UdpSocket::bind(any).ok()?;
    let name = nic.as_bytes();
    // SAFETY: a valid fd and a byte buffer of the given length.
    let r = unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, name.as_ptr().cast(), name.len() as u32) };
    if r != 0 {
        return None;
    }
    s.set_nonblocking(true).ok()?;
    Some(s)
}

impl PathSocket {
    fn open(nic: &str) -> Self {
        PathSocket { nic: nic.to_string(), v4: bound_to(nic, SocketAddr::from(([0u8; 4], 0))), v6: bound_to(nic, SocketAddr::from(([0u16; 8], 0))) }
    }
}

enum StoreEvent {
    Read { sent_at: Duration, latency: Duration, result: anyhow::Result<Snapshot> },
    Wrote { vip: IpAddr, kind: WriteKind, written: VipRecord, done_at: Duration, latency: Duration, result: anyhow::Result<Option<u64>> },
    Marked { latency: Duration, result: anyhow::Result<()> },
}

/// What this node knows of a peer's sign of life in etcd.
#[derive(Debug, Clone, Copy)]
struct Life {
    revision: u64,
    /// Send time of the first read that showed this revision.
    seen_at: Duration,
    every: Duration,
}

/// How long a node rewrites its sign of life every `suspect_after / 2` after it first
/// misses a peer, before it slows to [`MARK_SLOW`]: a peer that is merely dead costs one
/// etcd write a second, not fifty.
const MARK_FAST_FOR: Duration = Duration::from_secs(10);
const MARK_SLOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
enum WriteKind {
    Claim { from: Option<String>, reason: &'static str },
    Handover { to: String },
}

struct Service {
    c: Cluster,
    t: Timing,
    peers: Peers,
    maps: Maps,
    recv: tokio::net::UdpSocket,
    paths: Vec<PathSocket>,
    announcer: Option<Arc<Announcer>>,
    announce: (u32, Duration),
    status: Arc<Mutex<Status>>,
    /// What the managing-node task reports (copied into `status` on each publish).
    manager: Arc<Mutex<ManagerStatus>>,
    started_at: Duration,
    vips: ClusterVips,
    records: Records,
    /// Send time of the read `records` came from.
    records_at: Option<Duration>,
    read_latency: Option<Duration>,
    local: BTreeMap<IpAddr, Local>,
    /// Until when etcd confirmed each served VIP.
    confirmed_until: BTreeMap<IpAddr, Duration>,
    /// When this node began serving each VIP at its current epoch (see `decide`'s giveback).
    serving_since: BTreeMap<IpAddr, Duration>,
    /// What the kernel fence holds (serve-until, epoch).
    written: BTreeMap<IpAddr, (Duration, u64)>,
    ids: BTreeMap<IpAddr, u32>,
    pending_writes: BTreeSet<IpAddr>,
    /// The newest store revision this node knows of (its own writes included): a read
    /// that saw an older one was overtaken in flight and is dropped.
    known_revision: u64,
    restarting: bool,
    counters: Counters,
    /// Peers' signs of life, and whether one read has been taken in (marks present at the
    /// first read are old news, not evidence of life).
    life: BTreeMap<String, Life>,
    marks_read: bool,
    /// Since when some peer's heartbeats are missing (sign of life being written meanwhile).
    doubt_since: Option<Duration>,
    mark_every: watch::Sender<Option<Duration>>,
    /// When a write of each VIP last failed: it may have committed, so reads sent before
    /// then confirm nothing (a giver whose handover timed out must not serve on a read
    /// taken before the handover committed).
    unsure_since: BTreeMap<IpAddr, Duration>,
    /// Owners whose takeover is held back (logged once per episode).
    held: BTreeSet<String>,
    fences: Arc<FenceView>,
    announcing: BTreeMap<IpAddr, tokio::task::JoinHandle<()>>,
}

impl Service {
    fn new(
        c: Cluster,
        nics: Vec<String>,
        maps: Maps,
        fences: FenceView,
        recv: tokio::net::UdpSocket,
        status: Arc<Mutex<Status>>,
        announce: (u32, Duration),
        manager: Arc<Mutex<ManagerStatus>>,
    ) -> Self {
        let t = Timing::new(&c);
        let incarnation = clock::now().as_nanos() as u64 ^ ((std::process::id() as u64) << 40);
        let peers = Peers::new(&c.node, incarnation, c.peers.iter().map(|p| p.name.clone()), t);
        let paths = nics.iter().map(|n| PathSocket::open(n)).collect();
        Service {
            t,
            peers,
            maps,
            recv,
            paths,
            announcer: Announcer::new().map(Arc::new).map_err(|e| warn!(error = %format!("{e:#}"), "cannot announce takeovers")).ok(),
            announce,
            status,
            manager,
            started_at: clock::now(),
            vips: Vec::new(),
            records: Records::new(),
            records_at: None,
            read_latency: None,
            local: BTreeMap::new(),
            confirmed_until: BTreeMap::new(),
            serving_since: BTreeMap::new(),
            written: BTreeMap::new(),
            ids: BTreeMap::new(),
            pending_writes: BTreeSet::new(),
            known_revision: 0,
            life: BTreeMap::new(),
            marks_read: false,
            doubt_since: None,
            mark_every: watch::channel(None).0,
            held: BTreeSet::new(),
            unsure_since: BTreeMap::new(),
            fences: Arc::new(fences),
            announcing: BTreeMap::new(),
            restarting: false,
            counters: Counters::default(),
            c,
        }
    }

    async fn run(
        mut self,
        store: Store,
        mut vips_rx: watch::Receiver<ClusterVips>,
        mut stop_rx: oneshot::Receiver<oneshot::Sender<()>>,
        links: manager::Links,
    ) {
        self.set_vips(vips_rx.borrow_and_update().clone());
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let (write_tx, write_rx) = mpsc::unbounded_channel();
        tokio::spawn(reader(store.clone(), self.t.confirm_every, ev_tx.clone()));
        manager::start_thread(self.c.clone(), self.manager.clone(), self.paths.iter().map(|p| p.nic.clone()).collect(), links);
        let mark = NodeMark { node: self.c.node.clone(), incarnation: self.peers.incarnation, every_ms: 0, count: 0 };
        tokio::spawn(marker(store.clone(), mark, self.mark_every.subscribe(), ev_tx.clone()));
        tokio::spawn(writer(store, write_rx, ev_tx));
        let mut hb = tokio::time::interval(self.t.heartbeat_every);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut status_tick = tokio::time::interval(Duration::from_millis(100));
        let mut buf = vec![0u8; 65536];
        info!(
            node = %self.c.node,
            peers = self.c.peers.len(),
            vips = self.vips.len(),
            heartbeat_ms = self.t.heartbeat_every.as_millis() as u64,
            suspect_after_ms = self.t.suspect_after.as_millis() as u64,
            lease_ms = self.t.lease.as_millis() as u64,
            takeover_wait_us = self.t.takeover_wait.as_micros() as u64,
            "cluster service started"
        );
        loop {
            tokio::select! {
                biased;
                r = self.recv.recv_from(&mut buf) => {
                    if let Ok((n, _from)) = r {
                        self.on_datagram(&buf[..n]);
                    }
                }
                due = hb.tick() => {
                    self.note_lateness(due.elapsed());
                    self.send_heartbeats();
                    self.evaluate(&write_tx);
                }
                Some(ev) = ev_rx.recv() => {
                    self.on_store(ev);
                    self.evaluate(&write_tx);
                }
                Ok(()) = vips_rx.changed() => {
                    let v = vips_rx.borrow_and_update().clone();
                    self.set_vips(v);
                }
                done = &mut stop_rx => {
                    self.planned_stop().await;
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                _ = status_tick.tick() => self.publish(),
            }
        }
    }

    fn set_vips(&mut self, vips: ClusterVips) {
        let keep: BTreeSet<IpAddr> = vips.iter().map(|(v, _, _)| *v).collect();
        self.local.retain(|v, _| keep.contains(v));
        for (v, _, _) in &vips {
            self.local.entry(*v).or_insert(Local::Idle);
        }
        self.ids.clear();
        self.vips = vips;
        // Adopt what the kernel holds (a planned restart left the fences extended): the
        // fence stays as it is until this run confirms or stops the VIP.
        for (v, _, _) in self.vips.clone() {
            if let Some(id) = self.id_of(v) {
                if let Ok(f) = self.maps.fences.get(&id, 0) {
                    if f.serve_until_ns != 0 {
                        self.written.insert(v, (clock::from_kernel(Duration::from_nanos(f.serve_until_ns)), f.epoch));
                    }
                }
            }
        }
    }

    fn id_of(&mut self, vip: IpAddr) -> Option<u32> {
        if let Some(id) = self.ids.get(&vip) {
            return Some(*id);
        }
        let info = self.maps.vips.get(&VipKey::from(vip), 0).ok()?;
        self.ids.insert(vip, info.id);
        Some(info.id)
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
        let Some((hb, _format)) = Heartbeat::decode(bytes) else { return };
        let now = clock::now();
        if !self.peers.on_heartbeat(&hb, now) {
            return;
        }
        self.counters.heartbeats_received += 1;
        // A peer serving a VIP at a newer epoch than ours: we lost it; stop at once.
        for (vip, epoch) in &hb.serves {
            if let Some(Local::Serving { epoch: mine }) = self.local.get(vip).copied() {
                if *epoch > mine {
                    info!(%vip, peer = %hb.node, peer_epoch = epoch, our_epoch = mine, "ownership: stopped, a peer serves the VIP at a newer epoch");
                    self.stop(*vip);
                }
            }
        }
    }

    fn serves(&self) -> Vec<(IpAddr, u64)> {
        self.local
            .iter()
            .filter_map(|(v, l)| match l {
                Local::Serving { epoch } => Some((*v, *epoch)),
                _ => None,
            })
            .collect()
    }

    /// Peers not acknowledged this round: those whose VIPs this node is taking over.
    fn withheld(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (v, l) in &self.local {
            if let Local::Starting { .. } = l {
                if let Some(from) = self.records.get(v).and_then(|(r, _)| r.from.clone()) {
                    out.insert(from);
                }
                for (name, p) in &self.peers.peers {
                    if p.serves.contains_key(v) {
                        out.insert(name.clone());
                    }
                }
            }
        }
        out
    }

    /// Counts a heartbeat round that went out late, and says so (at 1, 2, 4, ... late
    /// rounds): a node whose heartbeats stall for the suspicion time is taken over from
    /// although it is alive, so the operator needs to know its thread was held up.
    fn note_lateness(&mut self, late: Duration) {
        let c = &mut self.counters;
        c.heartbeat_late_max_us = c.heartbeat_late_max_us.max(late.as_micros() as u64);
        if late >= self.t.suspect_after / 4 {
            self.peers.note_own_stall(clock::now());
            c.heartbeats_late += 1;
            if c.heartbeats_late.is_power_of_two() {
                warn!(
                    late_ms = late.as_millis() as u64,
                    late_rounds = c.heartbeats_late,
                    suspect_after_ms = self.t.suspect_after.as_millis() as u64,
                    "heartbeats went out late: the cluster thread did not get the CPU; at the suspicion time peers take this node's VIPs over (raise heartbeat_misses on a loaded node); this node suspects nobody until it has listened again for half that"
                );
            }
        }
    }

    /// Counts a confirmation read that took longer than its period, and says so (at 1, 2,
    /// 4, ... of them): fences are then extended by etcd less often than the design
    /// assumes, and a VIP whose owner is also cut from its peers stops being served.
    fn note_read_latency(&mut self, latency: Duration) {
        if latency <= self.t.confirm_every {
            return;
        }
        let c = &mut self.counters;
        c.etcd_reads_slow += 1;
        if c.etcd_reads_slow.is_power_of_two() {
            warn!(
                latency_ms = latency.as_millis() as u64,
                period_ms = self.t.confirm_every.as_millis() as u64,
                slow_reads = c.etcd_reads_slow,
                reads = c.confirmations,
                "etcd answered a confirmation read after its period: fences hold by the peers' acknowledgements meanwhile; etcd is overloaded, far or stalled (see the README's etcd cost table; raise lease_ms to read less often)"
            );
        }
    }

    fn send_heartbeats(&mut self) {
        let now = clock::now();
        let withhold = self.withheld();
        let mut hb = self.peers.next_heartbeat(now, self.serves(), self.restarting, &withhold);
        let port = self.c.heartbeat_port;
        let formats: Vec<Format> = self.c.peers.iter().map(|peer| self.peers.format_for(&peer.name)).collect();
        let json_needed = formats.contains(&Format::Json);
        for p in &mut self.paths {
            if p.v4.is_none() && p.v6.is_none() {
                *p = PathSocket::open(&p.nic.clone());
            }
            hb.path = p.nic.clone();
            // JSON first: it fits fewer VIPs, and encoding drops what does not fit, so the
            // binary copies then list the same VIPs as the JSON ones.
            let json = json_needed.then(|| hb.encode(Format::Json));
            let binary = formats.contains(&Format::Binary).then(|| hb.encode(Format::Binary));
            for (peer, format) in self.c.peers.iter().zip(&formats) {
                let Some(bytes) = (if *format == Format::Json { json.as_ref() } else { binary.as_ref() }) else { continue };
                for addr in &peer.addresses {
                    let sock = if addr.is_ipv4() { p.v4.as_ref() } else { p.v6.as_ref() };
                    if let Some(s) = sock {
                        // Unreachable paths fail here (no route on that NIC): expected.
                        if s.send_to(bytes, SocketAddr::new(*addr, port)).is_ok() {
                            self.counters.heartbeats_sent += 1;
                        }
                    }
                }
            }
        }
        // What every copy carried: acknowledgements of this round promise only that.
        self.peers.listed(hb.seq, &hb.serves);
    }

    fn on_store(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Read { sent_at, latency, result } => {
                self.counters.etcd_reads += 1;
                self.counters.etcd_read_us_total += latency.as_micros() as u64;
                self.on_read(sent_at, latency, result);
            }
            StoreEvent::Marked { latency, result } => {
                self.counters.etcd_writes += 1;
                self.counters.etcd_write_us_total += latency.as_micros() as u64;
                match result {
                    Ok(()) => self.counters.marks_written += 1,
                    Err(_) => self.counters.etcd_write_failures += 1,
                }
            }
            StoreEvent::Wrote { vip, kind, written, done_at, latency, result } => {
                self.pending_writes.remove(&vip);
                self.counters.etcd_writes += 1;
                self.counters.etcd_write_us_total += latency.as_micros() as u64;
                self.counters.etcd_write_failures += result.is_err() as u64;
                match (&kind, result) {
                    (WriteKind::Claim { from, reason }, Ok(Some(epoch))) => {
                        *self.counters.claims.entry(reason.to_string()).or_default() += 1;
                        // Our own write, as the next read will show it: no second claim meanwhile.
                        self.records.insert(vip, (written.clone(), epoch));
                        self.known_revision = self.known_revision.max(epoch);
                        match from {
                            // Nobody served it: start as soon as a read confirms it.
                            None => info!(%vip, epoch, reason, "ownership: claimed"),
                            Some(from) => {
                                let not_before = (done_at + self.t.takeover_wait).max(self.peers.start_not_before(vip));
                                self.local.insert(vip, Local::Starting { epoch, not_before });
                                info!(%vip, epoch, %from, reason, wait_us = not_before.saturating_sub(done_at).as_micros() as u64, "ownership: won; silent until the old owner's lease has run out");
                            }
                        }
                    }
                    (WriteKind::Claim { reason, .. }, Ok(None)) => {
                        self.counters.claims_lost += 1;
                        info!(%vip, reason, "ownership: claim lost to another writer");
                    }
                    (WriteKind::Handover { to }, Ok(Some(epoch))) => {
                        self.records.insert(vip, (written.clone(), epoch));
                        self.known_revision = self.known_revision.max(epoch);
                        *self.counters.claims.entry("giveback".into()).or_default() += 1;
                        info!(%vip, epoch, %to, "ownership: handed over");
                    }
                    (WriteKind::Handover { to }, Ok(None)) => info!(%vip, %to, "ownership: handover lost to another writer"),
                    (_, Err(e)) => {
                        // The write may still have committed: only a read sent after now
                        // tells, so none sent before confirms anything for this VIP.
                        self.unsure_since.insert(vip, done_at);
                        warn!(%vip, kind = ?kind, error = %format!("{e:#}"), "ownership: write failed (it may have committed: waiting for a newer read)");
                    }
                }
            }
        }
    }

    fn on_read(&mut self, sent_at: Duration, latency: Duration, result: anyhow::Result<Snapshot>) {
        match result {
            Ok(Snapshot { revision, records, marks }) => {
                // Sent before one of our own writes committed: it shows a past this node
                // already left (a won record as still the old owner's).
                if revision < self.known_revision {
                    return;
                }
                self.known_revision = revision;
                self.counters.confirmations += 1;
                self.read_latency = Some(latency);
                self.note_read_latency(latency);
                for (v, l) in &self.local {
                    if let (Local::Serving { epoch }, Some((r, e))) = (l, records.get(v)) {
                        if r.owner == self.c.node && e == epoch {
                            self.confirmed_until.insert(*v, sent_at + self.t.lease);
                        }
                    }
                }
                self.records = records;
                self.records_at = Some(sent_at);
                self.take_marks(marks, sent_at);
            }
            Err(e) => {
                self.counters.confirmation_failures += 1;
                if self.counters.confirmation_failures.is_power_of_two() {
                    warn!(error = %format!("{e:#}"), failures = self.counters.confirmation_failures, "etcd read failed; serving on peer acknowledgements");
                }
            }
        }
    }

    /// Notes which peers' signs of life changed since the last read.
    fn take_marks(&mut self, marks: Marks, sent_at: Duration) {
        for (node, (revision, every)) in marks {
            if node == self.c.node {
                continue;
            }
            let changed = self.life.get(&node).is_none_or(|l| l.revision != revision);
            if changed {
                // At the first read, a mark is whatever a peer wrote once: no evidence.
                let seen_at = if self.marks_read { sent_at } else { Duration::ZERO };
                self.life.insert(node, Life { revision, seen_at, every });
            }
        }
        self.marks_read = true;
    }

    /// `node` rewrote its sign of life recently: its next rewrite is not overdue by more
    /// than one more interval and the suspicion time (writes and reads slow down under
    /// load; a dead node that was rewriting costs that much longer to take over from).
    fn alive_in_etcd(&self, node: &str, now: Duration) -> bool {
        self.life.get(node).is_some_and(|l| l.seen_at != Duration::ZERO && now < l.seen_at + 2 * l.every + self.t.suspect_after)
    }

    /// Writes the sign of life while some peer has been silent for a quarter of the
    /// suspicion time: early enough that a peer who cannot hear this node reads it before
    /// it would suspect this node.
    fn update_mark(&mut self, now: Duration) {
        let doubt = self.t.suspect_after / 4;
        let missing = self.peers.peers.iter().any(|(_, p)| p.last_heard.is_none_or(|t| now.saturating_sub(t) >= doubt) && p.restart_hold_until <= now);
        let every = if missing {
            let since = *self.doubt_since.get_or_insert(now);
            Some(if now.saturating_sub(since) < MARK_FAST_FOR { self.t.suspect_after / 2 } else { MARK_SLOW })
        } else {
            self.doubt_since = None;
            None
        };
        self.mark_every.send_if_modified(|cur| {
            let changed = *cur != every;
            *cur = every;
            changed
        });
    }

    fn evaluate(&mut self, write_tx: &mpsc::UnboundedSender<(IpAddr, Option<u64>, VipRecord, WriteKind)>) {
        let now = clock::now();
        let settled = now.saturating_sub(self.started_at) >= self.t.suspect_after + self.t.heartbeat_every;
        let settings = decide::Settings { giveback_hold_down: self.c.giveback_hold_down, settled: settled && !self.restarting, view_sent_at: self.records_at };
        self.update_mark(now);
        for (vip, configured, placed) in self.vips.clone() {
            let local = self.local.get(&vip).copied().unwrap_or(Local::Idle);
            // A won VIP whose wait is over: serve on the latest confirmation.
            if let Local::Starting { epoch, not_before } = local {
                if now >= not_before && self.confirms(vip, epoch, now) {
                    self.local.insert(vip, Local::Serving { epoch });
                    self.confirmed_until.insert(vip, self.records_at.unwrap_or_default() + self.t.lease);
                    let handover = self.records.get(&vip).is_some_and(|(r, _)| r.handover);
                    self.begin_serving(vip, epoch, if handover { "handover" } else { "takeover" });
                }
            }
            let owned_record = self.records.get(&vip).cloned();
            let record = owned_record.as_ref().map(|(r, e)| (r, *e));
            let owner_alive_in_etcd = record.is_some_and(|(r, _)| self.alive_in_etcd(&r.owner, now));
            if let Some((r, _)) = record {
                self.note_held(vip, &r.owner, owner_alive_in_etcd, now);
            }
            let serving_for = self.serving_since.get(&vip).map_or(Duration::ZERO, |t| now.saturating_sub(*t));
            let inputs = decide::Inputs { vip, configured: &configured, placed, record, local, owner_alive_in_etcd, serving_for };
            let action = if self.pending_writes.contains(&vip) { None } else { decide::decide(&inputs, &self.peers, now, &settings) };
            match action {
                None => {}
                Some(Action::Claim { expected, from, reason }) => {
                    let candidates = record.map_or(configured.clone(), |(r, _)| r.candidates.clone());
                    let rec = VipRecord {
                        owner: self.c.node.clone(),
                        candidates,
                        handover: false,
                        from: from.clone(),
                        reason: reason.into(),
                        at_unix_ms: record::now_unix_ms(),
                    };
                    info!(
                        %vip,
                        reason,
                        owner = from.as_deref().unwrap_or("-"),
                        owner_heard_ms_ago = from.as_deref().and_then(|f| self.peers.peers.get(f)).and_then(|p| p.last_heard).map(|t| now.saturating_sub(t).as_millis() as u64),
                        expected_epoch = expected,
                        "ownership: claiming"
                    );
                    self.pending_writes.insert(vip);
                    let _ = write_tx.send((vip, expected, rec, WriteKind::Claim { from, reason }));
                }
                Some(Action::Handover { epoch, to }) => {
                    // Planned: stop answering first, then hand the record over; the receiver
                    // starts at once on its next read.
                    info!(%vip, epoch, %to, alive_for_ms = self.peers.alive_for(&to, now).as_millis() as u64, hold_down_ms = self.c.giveback_hold_down.as_millis() as u64, "ownership: giving back to the preferred node");
                    self.stop(vip);
                    let (r, _) = record.expect("a handover has a record");
                    let rec = VipRecord {
                        owner: to.clone(),
                        // A placed VIP's order is the ledger's (the managing node moved it).
                        candidates: if placed { configured.clone() } else { r.candidates.clone() },
                        handover: true,
                        from: Some(self.c.node.clone()),
                        reason: "giveback".into(),
                        at_unix_ms: record::now_unix_ms(),
                    };
                    self.pending_writes.insert(vip);
                    let _ = write_tx.send((vip, Some(epoch), rec, WriteKind::Handover { to }));
                }
                Some(Action::Start { epoch, wait: true }) => {
                    let not_before = (now + self.t.takeover_wait).max(self.peers.start_not_before(vip));
                    self.local.insert(vip, Local::Starting { epoch, not_before });
                    info!(%vip, epoch, wait_us = not_before.saturating_sub(now).as_micros() as u64, "ownership: the record names this node as a takeover's winner; silent until the old owner's lease has run out");
                }
                Some(Action::Start { epoch, wait: false }) if local == Local::Idle && record.is_some_and(|(r, _)| r.handover) => {
                    // The giver closed its fence before its write committed; its last
                    // replies may still be on their way to the wire.
                    self.local.insert(vip, Local::Starting { epoch, not_before: now + timing::IN_FLIGHT });
                }
                Some(Action::Start { epoch, wait: false }) => {
                    if self.confirms(vip, epoch, now) {
                        self.local.insert(vip, Local::Serving { epoch });
                        self.confirmed_until.insert(vip, self.records_at.unwrap_or_default() + self.t.lease);
                        let why = record.map_or("record", |(r, _)| if r.handover { "handover" } else { "record names this node" });
                        self.begin_serving(vip, epoch, why);
                    }
                }
                Some(Action::Stop { owner }) => {
                    info!(%vip, %owner, "ownership: stopped, the record names another node");
                    self.stop(vip);
                }
            }
            if let Some((closed, by_acks)) = self.refresh_fence(vip, &configured, now) {
                // The fence ran out (etcd and the peers unreachable for a while) and is open
                // again: the link may have learned another MAC meanwhile, or missed the
                // first announcements.
                info!(
                    %vip,
                    closed_ms = closed.as_millis() as u64,
                    reopened_by = if by_acks { "acknowledgements" } else { "etcd" },
                    last_read_sent_ms_ago = self.records_at.map(|t| now.saturating_sub(t).as_millis() as u64),
                    last_read_latency_ms = self.read_latency.map(|l| l.as_millis() as u64),
                    "ownership: serving again after the fence lapsed; announcing"
                );
                self.announce(vip);
            }
        }
    }

    /// Logs (once per episode) that a silent owner keeps its VIP because it is alive in etcd.
    fn note_held(&mut self, vip: IpAddr, owner: &str, alive_in_etcd: bool, now: Duration) {
        let holding = owner != self.c.node && alive_in_etcd && self.peers.suspected(owner, now);
        if holding && self.held.insert(owner.to_string()) {
            self.counters.takeovers_held += 1;
            let heard = self.peers.peers.get(owner).and_then(|p| p.last_heard).map(|t| now.saturating_sub(t).as_millis() as u64);
            let mark = self.life.get(owner).map(|l| now.saturating_sub(l.seen_at).as_millis() as u64);
            info!(%vip, %owner, owner_heard_ms_ago = heard, mark_seen_ms_ago = mark, "ownership: owner silent on every heartbeat path but alive in etcd; not taking over");
        } else if !holding && self.held.remove(owner) {
            info!(%vip, %owner, "ownership: owner heard again or its sign of life stopped; takeovers decided as usual");
        }
    }

    /// The latest read shows this node owning `vip` at `epoch`, recently enough to serve on.
    fn confirms(&self, vip: IpAddr, epoch: u64, now: Duration) -> bool {
        let after_failed_write = self.unsure_since.get(&vip).copied().unwrap_or_default();
        let fresh = self.records_at.is_some_and(|t| t + self.t.lease > now && t > after_failed_write);
        fresh && self.records.get(&vip).is_some_and(|(r, e)| r.owner == self.c.node && *e == epoch)
    }

    fn begin_serving(&mut self, vip: IpAddr, epoch: u64, why: &str) {
        self.counters.starts += 1;
        self.serving_since.insert(vip, clock::now());
        info!(%vip, epoch, why, "ownership: serving");
        let configured = self.vips.iter().find(|(v, _, _)| *v == vip).map(|(_, c, _)| c.clone()).unwrap_or_default();
        let _ = self.refresh_fence(vip, &configured, clock::now());
        self.announce(vip);
    }

    fn announce(&mut self, vip: IpAddr) {
        let Some(id) = self.id_of(vip) else { return };
        let Ok(b) = self.maps.bindings.get(&id, 0) else { return };
        let Some(a) = self.announcer.clone() else { return };
        let fences = self.fences.clone();
        if b.ifindex == 0 {
            warn!(%vip, "serving, but no NIC holds the VIP: nothing announced");
            return;
        }
        let (count, interval) = self.announce;
        // Each frame only while the kernel fence is open: announcements of a VIP this node
        // stopped serving would point the link at a node that drops its traffic.
        let task = tokio::spawn(async move {
            match a.announce(b.ifindex, b.mac, vip, count, interval, || fences.serving(vip)).await {
                Ok(sent) if sent < count => info!(%vip, sent, count, "announcements stopped: the VIP is no longer served here"),
                Ok(_) => {}
                Err(e) => warn!(%vip, error = %format!("{e:#}"), "announcement failed"),
            }
        });
        if let Some(old) = self.announcing.insert(vip, task) {
            old.abort();
        }
    }

    fn stop(&mut self, vip: IpAddr) {
        self.counters.stops += 1;
        self.local.insert(vip, Local::Idle);
        self.confirmed_until.remove(&vip);
        self.serving_since.remove(&vip);
        self.write_fence(vip, Duration::ZERO, 0);
        if let Some(t) = self.announcing.remove(&vip) {
            t.abort();
        }
    }

    /// Extends a served VIP's fence to what etcd confirmed or every candidate acknowledged.
    /// When this reopens a fence that had run out: how long it was closed, and whether
    /// acknowledgements reopened it (etcd did otherwise).
    fn refresh_fence(&mut self, vip: IpAddr, configured: &[String], now: Duration) -> Option<(Duration, bool)> {
        let Some(Local::Serving { epoch }) = self.local.get(&vip).copied() else { return None };
        let candidates = self.records.get(&vip).map_or(configured.to_vec(), |(r, _)| r.candidates.clone());
        let confirmed = self.confirmed_until.get(&vip).copied().unwrap_or_default();
        let acked = self.peers.acked_until(vip, &candidates).unwrap_or_default();
        let until = confirmed.max(acked);
        let (have, _) = self.written.get(&vip).copied().unwrap_or_default();
        // Rewriting costs a syscall: only when it gains an eighth of a lease (or is needed),
        // and never to a time already past (a late answer to a read sent long ago): that
        // opens nothing, and `have` must keep when the fence really closed.
        if until > have && until > now && (until - have >= self.t.lease / 8 || have <= now + self.t.lease / 2) {
            if acked > confirmed && acked > have {
                self.counters.acked_extensions += 1;
            }
            self.write_fence(vip, until, epoch);
            return (have != Duration::ZERO && have <= now && until > now).then(|| (now - have, acked > confirmed));
        }
        None
    }

    fn write_fence(&mut self, vip: IpAddr, until: Duration, epoch: u64) {
        let Some(id) = self.id_of(vip) else { return };
        let f = Fence { serve_until_ns: clock::to_kernel(until).as_nanos() as u64, epoch };
        match self.maps.fences.set(id, f, 0) {
            Ok(()) => {
                self.counters.fence_writes += 1;
                self.written.insert(vip, (until, epoch));
            }
            Err(e) => warn!(%vip, error = %e, "cannot write the VIP's fence"),
        }
    }

    /// SIGTERM: ask the peers for the restart grace (a few heartbeats marked restarting),
    /// then extend the fence of each served VIP whose candidates all granted it.
    async fn planned_stop(&mut self) {
        self.restarting = true;
        let served = self.serves();
        let deadline = clock::now() + Duration::from_millis(300);
        let mut buf = vec![0u8; 65536];
        let mut granted: BTreeMap<IpAddr, Duration> = BTreeMap::new();
        while clock::now() < deadline && granted.len() < served.len() {
            self.send_heartbeats();
            let until = tokio::time::sleep(self.t.heartbeat_every);
            tokio::pin!(until);
            loop {
                tokio::select! {
                    r = self.recv.recv_from(&mut buf) => if let Ok((n, _)) = r { self.on_datagram(&buf[..n]); },
                    _ = &mut until => break,
                }
            }
            for (vip, _) in &served {
                let candidates = self.records.get(vip).map(|(r, _)| r.candidates.clone()).unwrap_or_default();
                let others: Vec<String> = candidates.into_iter().filter(|c| *c != self.c.node).collect();
                let grant = if others.is_empty() {
                    Some(clock::now() + self.t.restart_grace)
                } else {
                    self.peers.restart_acked(&others).map(|(at, promise)| at + self.t.acked_for(promise))
                };
                if let Some(g) = grant {
                    granted.insert(*vip, g);
                }
            }
        }
        for (vip, epoch) in &served {
            match granted.get(vip) {
                Some(until) => {
                    self.write_fence(*vip, *until, *epoch);
                    info!(%vip, grace_ms = until.saturating_sub(clock::now()).as_millis() as u64, "planned restart: peers hold off; the VIP stays served");
                }
                None => warn!(%vip, "planned restart: not every candidate granted the restart grace; the VIP may move"),
            }
        }
    }

    fn publish(&mut self) {
        let now = clock::now();
        let manager = self.manager.lock().map(|m| m.clone()).unwrap_or_default();
        let mut st = self.status.lock().expect("status lock");
        st.manager = manager;
        st.etcd_last_ok_ms = self.records_at.map(|t| now.saturating_sub(t).as_millis() as u64);
        st.etcd_read_latency_us = self.read_latency.map(|d| d.as_micros() as u64);
        st.takeover_wait_ms = self.t.takeover_wait.as_secs_f64() * 1e3;
        st.lease_ms = self.t.lease.as_millis() as u64;
        st.peers = self
            .peers
            .peers
            .iter()
            .map(|(name, p)| PeerStatus {
                name: name.clone(),
                alive: self.peers.alive(name, now),
                suspected: self.peers.suspected(name, now),
                alive_in_etcd: self.alive_in_etcd(name, now),
                alive_for_ms: self.peers.alive_for(name, now).as_millis() as u64,
                rtt_us: p.rtt.map(|d| d.as_micros() as u64),
                heartbeat_format: if self.peers.format_for(name) == Format::Binary { "binary" } else { "json" }.into(),
                paths: p
                    .paths
                    .iter()
                    .map(|(path, s)| PathStatus {
                        path: path.clone(),
                        received: s.received,
                        lost: s.lost,
                        last_heard_ms: now.saturating_sub(s.last_heard).as_millis() as u64,
                    })
                    .collect(),
            })
            .collect();
        st.vips = self
            .vips
            .iter()
            .map(|(v, configured, _)| {
                let rec = self.records.get(v);
                let here = match self.local.get(v) {
                    // Serving as far as this node knows, but the kernel fence has run out
                    // (no confirmation, no acknowledgements): the node answers nothing.
                    Some(Local::Serving { .. }) if self.written.get(v).is_none_or(|(u, _)| *u <= now) => "lapsed",
                    Some(Local::Serving { .. }) => "serving",
                    Some(Local::Starting { .. }) => "starting",
                    _ => "idle",
                };
                VipStatus {
                    vip: *v,
                    owner: rec.map(|(r, _)| r.owner.clone()),
                    epoch: rec.map_or(0, |(_, e)| *e),
                    here: here.into(),
                    lease_left_ms: self.written.get(v).map_or(0, |(u, _)| u.saturating_sub(now).as_millis() as u64),
                    candidates: rec.map_or(configured.clone(), |(r, _)| r.candidates.clone()),
                }
            })
            .collect();
        st.counters = self.counters.clone();
    }
}

/// Reads every record every `every` (the confirmation): one request at a time, each
/// reporting when it was sent.
async fn reader(mut store: Store, every: Duration, tx: mpsc::UnboundedSender<StoreEvent>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut cache = ReadCache::default();
    loop {
        tick.tick().await;
        let sent_at = clock::now();
        let result = store.read_all(&mut cache).await;
        let latency = clock::now().saturating_sub(sent_at);
        if tx.send(StoreEvent::Read { sent_at, latency, result }).is_err() {
            return;
        }
    }
}

/// Rewrites this node's sign of life every `every` while the service asks for it.
async fn marker(mut store: Store, mut mark: NodeMark, mut every: watch::Receiver<Option<Duration>>, tx: mpsc::UnboundedSender<StoreEvent>) {
    loop {
        let current = *every.borrow_and_update();
        let Some(period) = current else {
            if every.changed().await.is_err() {
                return;
            }
            continue;
        };
        mark.every_ms = period.as_millis() as u64;
        mark.count += 1;
        let sent_at = clock::now();
        let result = store.touch(&mark).await;
        if tx.send(StoreEvent::Marked { latency: clock::now().saturating_sub(sent_at), result }).is_err() {
            return;
        }
        // The next rewrite when due, or at once when the interval changes.
        if let Ok(Err(_)) = tokio::time::timeout(period, every.changed()).await {
            return; // the service ended
        }
    }
}

async fn writer(mut store: Store, mut rx: mpsc::UnboundedReceiver<(IpAddr, Option<u64>, VipRecord, WriteKind)>, tx: mpsc::UnboundedSender<StoreEvent>) {
    while let Some((vip, expected, rec, kind)) = rx.recv().await {
        let sent_at = clock::now();
        let result = store.write(vip, expected, &rec).await;
        let done_at = clock::now();
        if tx.send(StoreEvent::Wrote { vip, kind, written: rec, done_at, latency: done_at.saturating_sub(sent_at), result }).is_err() {
            return;
        }
    }
}
