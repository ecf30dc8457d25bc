//! `havip top`: a live terminal view of a node. One row per VIP (its NIC, the ranking cost
//! of that NIC, the RTT and loss of its paths, a trend of the RTT, packets per second each
//! way, its class) over a pane of the latest moves and their reasons. Reads the pinned maps
//! and the run directory like `havip stats`, so it works whether or not havipd runs; fits
//! an 80x24 terminal (over SSH too) and follows resizes.
//!
//! Columns, for the VIP's bound NIC (its paths to the VIP's targets, mean over targets):
//! - `SCORE`: the ranking cost havipd gives that NIC, computed with [`crate::node::rank::rank`]
//!   from the same windowed samples (`[ranking]` weights, window and combine of the
//!   configuration havipd runs): `weight_latency*rtt_ms + weight_loss*loss_pct +
//!   weight_hops*hops`, combined over targets. Lower is better; `-` until two refreshes
//!   have measured every path (or without targets or configuration), `unrch` when none of
//!   its targets answers.
//! - `P50ms`/`P99ms`: the probe RTT histogram's quantiles; `RTT~`: the trend of the moving
//!   average RTT over the last refreshes (bar height relative to the highest shown).
//! - `LOSS%`: probes without a reply over the ranking window (what the ranking sees;
//!   since the start until there are two refreshes).
//! - `IN/s`/`OUT/s`: packets per second to and from the VIP since the previous refresh.
//!
//! Keys: `q`, Esc or Ctrl-C quit; `s` cycles the sort column; `r` reverses it; arrows,
//! PgUp/PgDn, Home/End scroll the VIPs.
//!
//! Drawing is a pure function of a [`View`] (see [`draw`]); [`Model`] turns successive
//! snapshots into rows.

use std::{
    collections::{BTreeMap, VecDeque},
    io::IsTerminal,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
    Frame,
};

use crate::{
    config::Config,
    kernel::pins::PinLayout,
    node::events::Move,
    node::rank,
    node::state::State,
    observe::stats::{PathStats, Snapshot},
};

#[derive(Debug, Clone, Args)]
pub struct TopOptions {
    /// Milliseconds between refreshes.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub every: u64,
}

/// Refreshes kept for the RTT trend (one character each).
pub const SPARK_LEN: usize = 8;
/// Height of the moves pane, its title line included.
const EVENTS_HEIGHT: u16 = 6;
/// Moves read from the run directory (more than the pane shows: it can be taller).
const EVENTS_READ: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Vip,
    Nic,
    Rtt,
    Loss,
    In,
    Out,
}

impl SortKey {
    pub const ALL: [SortKey; 6] = [SortKey::Vip, SortKey::Nic, SortKey::Rtt, SortKey::Loss, SortKey::In, SortKey::Out];

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn name(self) -> &'static str {
        match self {
            SortKey::Vip => "VIP",
            SortKey::Nic => "NIC",
            SortKey::Rtt => "RTT",
            SortKey::Loss => "loss",
            SortKey::In => "in/s",
            SortKey::Out => "out/s",
        }
    }

    /// The table column it sorts by.
    fn column(self) -> usize {
        match self {
            SortKey::Vip => 0,
            SortKey::Nic => 1,
            SortKey::Rtt => 3,
            SortKey::Loss => 6,
            SortKey::In => 7,
            SortKey::Out => 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sort {
    pub key: SortKey,
    /// Descending instead of ascending (rows without a value stay last either way).
    pub reverse: bool,
}

/// The bound NIC's standing in the ranking.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Score {
    /// Not measured yet, no targets, or no configuration to rank with.
    #[default]
    None,
    /// Probes go out and none of its targets answers.
    Unreachable,
    Cost(f64),
}

/// One VIP as shown.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VipRow {
    pub vip: Option<IpAddr>,
    /// "-" when unbound.
    pub nic: String,
    /// Pinned by the operator (`havip bind`).
    pub pinned: bool,
    pub score: Score,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    /// The bound paths' moving-average RTT (the newest, also the last of `trend`).
    pub rtt_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    /// Moving-average RTT of the bound paths at each of the last refreshes, oldest first.
    pub trend: Vec<Option<f64>>,
    pub in_pps: Option<f64>,
    pub out_pps: Option<f64>,
    pub class: Option<String>,
}

/// A path's probe counters at each refresh: (when, sent, received).
type Window = VecDeque<(Instant, u64, u64)>;

/// Turns successive snapshots into rows: rates, windowed samples for the ranking, RTT
/// trends.
#[derive(Debug, Default)]
pub struct Model {
    prev: Option<Snapshot>,
    /// Probe counters per path over the ranking window: (when, sent, received), as havipd
    /// keeps them.
    windows: BTreeMap<(String, IpAddr), Window>,
    trends: BTreeMap<IpAddr, VecDeque<Option<f64>>>,
    rows: Vec<VipRow>,
}

fn mean(it: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = it.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Model {
    /// Takes a new snapshot; `cfg` is the configuration havipd runs (for the ranking).
    pub fn update(&mut self, snap: Snapshot, cfg: Option<&Config>) {
        let now = snap.taken.unwrap_or_else(Instant::now);
        let settings = cfg.map(|c| c.ranking).unwrap_or_default();
        let samples = self.samples(&snap.paths, now, settings.window, cfg.map(|c| c.probe_interval));
        let secs = self.prev.as_ref().and_then(|p| Some(now.checked_duration_since(p.taken?)?.as_secs_f64())).filter(|s| *s > 0.0);
        let mut rows = Vec::new();
        for v in &snap.vips {
            let bound: Vec<&PathStats> = v.paths.iter().filter(|p| p.nic == v.nic).collect();
            let rtt_ms = mean(bound.iter().map(|p| p.rtt_ewma_ms));
            let trend = self.trends.entry(v.vip).or_default();
            trend.push_back(rtt_ms);
            while trend.len() > SPARK_LEN {
                trend.pop_front();
            }
            let windowed = mean(bound.iter().map(|p| samples.get(&(p.nic.clone(), p.target)).filter(|s| s.sent > 0).and_then(|s| s.loss_pct)));
            let old = self.prev.as_ref().and_then(|p| p.vip(v.vip));
            let rate = |now: u64, before: Option<u64>| Some(now.saturating_sub(before?) as f64 / secs?);
            let score = cfg.and_then(|c| c.vips.iter().find(|x| x.address == v.vip)).filter(|x| !x.targets.is_empty()).map_or(Score::None, |x| {
                let (ranked, _) = rank::rank(&x.nics, &x.targets, &samples, &settings);
                match ranked.iter().find(|s| s.nic == v.nic) {
                    Some(s) => match s.cost {
                        Some(c) => Score::Cost(c),
                        None if s.paths.iter().all(|p| p.score != rank::PathScore::Unknown) => Score::Unreachable,
                        None => Score::None,
                    },
                    None => Score::None,
                }
            });
            rows.push(VipRow {
                vip: Some(v.vip),
                nic: v.nic.clone(),
                pinned: v.pinned.is_some(),
                score,
                rtt_p50_ms: mean(bound.iter().map(|p| p.rtt_p50_ms)),
                rtt_p99_ms: mean(bound.iter().map(|p| p.rtt_p99_ms)),
                rtt_ms,
                loss_pct: windowed.or_else(|| mean(bound.iter().map(|p| p.loss_pct))),
                trend: trend.iter().copied().collect(),
                in_pps: rate(v.rx.packets, old.map(|o| o.rx.packets)),
                out_pps: rate(v.tx.packets, old.map(|o| o.tx.packets)),
                class: v.class.clone(),
            });
        }
        self.trends.retain(|ip, _| snap.vips.iter().any(|v| v.vip == *ip));
        self.rows = rows;
        self.prev = Some(snap);
    }

    /// Windowed samples of every probed path, computed as havipd's ranking does.
    fn samples(&mut self, paths: &[PathStats], now: Instant, window: Duration, probe_interval: Option<Duration>) -> BTreeMap<(String, IpAddr), rank::Sample> {
        let mut out = BTreeMap::new();
        for p in paths {
            let key = (p.nic.clone(), p.target);
            let h = self.windows.entry(key.clone()).or_default();
            h.push_back((now, p.sent, p.received));
            // Keep one entry older than the window as its base.
            while h.len() > 2 && now.duration_since(h[1].0) > window {
                h.pop_front();
            }
            let (base, last) = (h[0], h[h.len() - 1]);
            let sent = last.1.saturating_sub(base.1);
            let replies = last.2.saturating_sub(base.2).min(sent);
            // Probes sent within the last RTT cannot have been answered yet.
            let in_flight = match (p.rtt_ewma_ms, probe_interval) {
                (Some(r), Some(i)) if !i.is_zero() => (r / i.as_secs_f64() / 1000.0).ceil() as u64,
                _ => 0,
            };
            let lost = (sent - replies).saturating_sub(in_flight);
            let loss_pct = (sent > 0).then(|| 100.0 * lost as f64 / sent as f64);
            out.insert(key, rank::Sample { rtt_ms: p.rtt_ewma_ms, loss_pct, hops: p.hops, sent, replies, ..Default::default() });
        }
        self.windows.retain(|k, _| paths.iter().any(|p| p.nic == k.0 && p.target == k.1));
        out
    }

    /// The rows of the last snapshot, sorted.
    pub fn rows(&self, sort: Sort) -> Vec<VipRow> {
        let mut rows = self.rows.clone();
        sort_rows(&mut rows, sort);
        rows
    }

    pub fn has_snapshot(&self) -> bool {
        self.prev.is_some()
    }
}

/// Sorts by the key (ties by VIP); rows without a value come last in both directions.
pub fn sort_rows(rows: &mut [VipRow], sort: Sort) {
    fn num(a: Option<f64>, b: Option<f64>, rev: bool) -> std::cmp::Ordering {
        match (a, b) {
            (Some(x), Some(y)) if rev => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    }
    let rev = sort.reverse;
    let flip = |o: std::cmp::Ordering| if rev { o.reverse() } else { o };
    rows.sort_by(|a, b| {
        let vip = |r: &VipRow| r.vip.map(|v| (v.is_ipv6(), v));
        let primary = match sort.key {
            SortKey::Vip => flip(vip(a).cmp(&vip(b))),
            SortKey::Nic => flip(a.nic.cmp(&b.nic)),
            SortKey::Rtt => num(a.rtt_p50_ms, b.rtt_p50_ms, rev).then(num(a.rtt_ms, b.rtt_ms, rev)),
            SortKey::Loss => num(a.loss_pct, b.loss_pct, rev),
            SortKey::In => num(a.in_pps, b.in_pps, rev),
            SortKey::Out => num(a.out_pps, b.out_pps, rev),
        };
        primary.then_with(|| vip(a).cmp(&vip(b)))
    });
}

/// Everything one screen shows.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Sorted.
    pub rows: Vec<VipRow>,
    pub sort: Sort,
    /// Oldest first, as [`crate::node::events::recent`] returns them.
    pub events: Vec<Move>,
    pub every: Duration,
    /// Wall clock of the last refresh, ms since the epoch.
    pub updated_ms: Option<u64>,
    /// havipd's pid, if it runs.
    pub daemon: Option<u32>,
    /// Why the last refresh failed, if it did.
    pub error: Option<String>,
    /// Rows scrolled off the top.
    pub scroll: usize,
    /// False until a snapshot has been read.
    pub loaded: bool,
}

/// Local wall-clock time, HH:MM:SS.
pub fn clock(at_ms: u64) -> String {
    let t = (at_ms / 1000) as libc::time_t;
    // SAFETY: localtime_r only writes the tm it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return "--:--:--".into();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Milliseconds (and costs) in at most 5 characters.
fn ms(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v < 0.9995 => format!("{v:.3}"),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) if v < 99_999.5 => format!("{v:.0}"),
        Some(v) => format!("{:.0}k", v / 1e3),
    }
}

/// A rate in at most 5 characters.
fn rate(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v < 9.95 => format!("{v:.1}"),
        Some(v) if v < 999.5 => format!("{v:.0}"),
        Some(v) if v < 9_950.0 => format!("{:.1}k", v / 1e3),
        Some(v) if v < 999_500.0 => format!("{:.0}k", v / 1e3),
        Some(v) if v < 9_950_000.0 => format!("{:.1}M", v / 1e6),
        Some(v) if v < 999_500_000.0 => format!("{:.0}M", v / 1e6),
        Some(v) => format!("{:.1}G", v / 1e9),
    }
}

fn loss(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v < 9.95 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// Unicode bars, newest on the right, heights relative to the highest value shown; a gap
/// where nothing was measured.
pub fn sparkline(values: &[Option<f64>], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let values = &values[values.len().saturating_sub(width)..];
    let max = values.iter().flatten().copied().fold(0.0f64, f64::max);
    let mut s = " ".repeat(width - values.len());
    for v in values {
        s.push(match v {
            None => ' ',
            Some(_) if max <= 0.0 => BARS[0],
            Some(v) => BARS[((v.max(0.0) / max * 7.0).round() as usize).min(7)],
        });
    }
    s
}

/// Truncates to `width` characters, marking the cut.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        s.chars().take(width.saturating_sub(1)).chain(['…']).collect()
    }
}

fn score_text(s: Score) -> String {
    match s {
        Score::None => "-".into(),
        Score::Unreachable => "unrch".into(),
        Score::Cost(c) => ms(Some(c)),
    }
}

fn right(s: String) -> Cell<'static> {
    Cell::new(Line::from(s).alignment(Alignment::Right))
}

/// Draws one screen: VIP table, moves pane, footer.
pub fn draw(f: &mut Frame, v: &View) {
    let area = f.area();
    let events_h = if area.height >= 12 { EVENTS_HEIGHT } else { area.height.saturating_sub(4).min(EVENTS_HEIGHT) };
    let [table_area, events_area, footer_area] = Layout::vertical([Constraint::Min(1), Constraint::Length(events_h), Constraint::Length(1)]).areas(area);
    draw_table(f, table_area, v);
    draw_events(f, events_area, v);
    draw_footer(f, footer_area, v);
}

fn draw_table(f: &mut Frame, area: Rect, v: &View) {
    let daemon = match v.daemon {
        Some(pid) => format!("havipd {pid}"),
        None => "havipd not running".into(),
    };
    // Header and title take two lines.
    let visible = area.height.saturating_sub(2) as usize;
    let scroll = v.scroll.min(v.rows.len().saturating_sub(visible.max(1)));
    let shown = if v.rows.len() > visible && visible > 0 {
        format!(" ({}-{} of {})", scroll + 1, (scroll + visible).min(v.rows.len()), v.rows.len())
    } else {
        String::new()
    };
    let title = format!(" havip top · {} VIP(s){shown} · {daemon} ", v.rows.len());
    let block = Block::new().borders(Borders::TOP).title(Span::styled(title, Style::new().add_modifier(Modifier::BOLD)));
    if let Some(e) = &v.error {
        let p = Paragraph::new(vec![
            Line::styled(format!("reading the dataplane failed: {e}"), Style::new().fg(Color::Red)),
            Line::from(format!("retrying every {:.1}s", v.every.as_secs_f64())),
        ])
        .wrap(ratatui::widgets::Wrap { trim: true })
        .block(block);
        f.render_widget(p, area);
        return;
    }
    if v.rows.is_empty() {
        let msg = if !v.loaded {
            "reading the pinned maps…".to_string()
        } else if v.daemon.is_some() {
            "no VIPs in the dataplane: havipd's configuration has none".to_string()
        } else {
            "no VIPs in the dataplane, and havipd is not running: start it with `havipd --config FILE`".to_string()
        };
        f.render_widget(Paragraph::new(msg).wrap(ratatui::widgets::Wrap { trim: true }).block(block), area);
        return;
    }
    let vip_w = v.rows.iter().filter_map(|r| r.vip).map(|ip| ip.to_string().len()).max().unwrap_or(3).clamp(7, 24);
    let nic_w = v.rows.iter().map(|r| r.nic.len() + r.pinned as usize).max().unwrap_or(3).clamp(3, 10);
    // Column widths; CLASS takes what is left (at least 5).
    let widths: [u16; 10] = [vip_w as u16, nic_w as u16, 5, 5, 5, SPARK_LEN as u16, 5, 5, 5, 5];
    let keep = kept_columns(&widths, area.width);
    let constraints: Vec<Constraint> =
        (0..10).filter(|i| keep[*i]).map(|i| if i == 9 { Constraint::Min(widths[i]) } else { Constraint::Length(widths[i]) }).collect();
    let names = ["VIP", "NIC", "SCORE", "P50ms", "P99ms", "RTT~", "LOSS%", "IN/s", "OUT/s", "CLASS"];
    let sorted = v.sort.key.column();
    let header = Row::new(names.iter().enumerate().filter(|(i, _)| keep[*i]).map(|(i, n)| {
        let style = if i == sorted { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
        let line = Line::from(*n).style(style);
        Cell::new(if (2..=8).contains(&i) && i != 5 { line.alignment(Alignment::Right) } else { line })
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = v.rows.iter().skip(scroll).map(|r| {
        let nic = format!("{}{}", r.nic, if r.pinned { "*" } else { "" });
        let nic_style = if r.nic == "-" { Style::new().fg(Color::Red) } else { Style::new() };
        let score_style = match r.score {
            Score::Unreachable => Style::new().fg(Color::Red),
            _ => Style::new(),
        };
        let loss_style = match r.loss_pct {
            Some(l) if l >= 50.0 => Style::new().fg(Color::Red),
            Some(l) if l > 0.0 => Style::new().fg(Color::Yellow),
            _ => Style::new(),
        };
        let cells = [
            Cell::new(fit(&r.vip.map(|ip| ip.to_string()).unwrap_or_default(), vip_w)),
            Cell::new(nic).style(nic_style),
            right(score_text(r.score)).style(score_style),
            right(ms(r.rtt_p50_ms)),
            right(ms(r.rtt_p99_ms)),
            Cell::new(sparkline(&r.trend, SPARK_LEN)).style(Style::new().fg(Color::Cyan)),
            right(loss(r.loss_pct)).style(loss_style),
            right(rate(r.in_pps)),
            right(rate(r.out_pps)),
            Cell::new(r.class.clone().unwrap_or_else(|| "-".into())),
        ];
        Row::new(cells.into_iter().enumerate().filter(|(i, _)| keep[*i]).map(|(_, c)| c))
    });
    f.render_widget(Table::new(rows, constraints).header(header).column_spacing(1).block(block), area);
}

/// Which columns fit `width` (one space between columns): narrower terminals lose CLASS,
/// then P99, the trend, SCORE, OUT/s, IN/s and LOSS, in that order.
fn kept_columns(widths: &[u16; 10], width: u16) -> [bool; 10] {
    const DROP_ORDER: [usize; 7] = [9, 4, 5, 2, 8, 7, 6];
    let mut keep = [true; 10];
    let need = |keep: &[bool; 10]| -> u16 {
        let cols: Vec<u16> = (0..10).filter(|i| keep[*i]).map(|i| widths[i]).collect();
        cols.iter().sum::<u16>() + cols.len().saturating_sub(1) as u16
    };
    for i in DROP_ORDER {
        if need(&keep) <= width {
            break;
        }
        keep[i] = false;
    }
    keep
}

fn draw_events(f: &mut Frame, area: Rect, v: &View) {
    if area.height == 0 {
        return;
    }
    let block = Block::new().borders(Borders::TOP).title(Span::styled(" Recent moves (newest first) ", Style::new().add_modifier(Modifier::BOLD)));
    let n = area.height.saturating_sub(1) as usize;
    let vip_w = v.events.iter().map(|e| e.vip.to_string().len()).max().unwrap_or(0).clamp(7, 24);
    let lines: Vec<Line> = if v.events.is_empty() {
        vec![Line::styled("no moves recorded yet", Style::new().add_modifier(Modifier::DIM))]
    } else {
        v.events
            .iter()
            .rev()
            .take(n)
            .map(|e| {
                let reason_style = match e.reason.as_str() {
                    "link_down" | "not_candidate" | "path_dark" => Style::new().fg(Color::Yellow),
                    "operator" => Style::new().fg(Color::Cyan),
                    _ => Style::new(),
                };
                Line::from(vec![
                    Span::raw(format!("{}  {:<vip_w$}  {} -> {}  ", clock(e.at_ms), fit(&e.vip.to_string(), vip_w), e.from.as_deref().unwrap_or("-"), e.to)),
                    Span::styled(e.reason.clone(), reason_style),
                ])
            })
            .collect()
    };
    f.render_widget(Paragraph::new(lines).block(block), area);
}

fn draw_footer(f: &mut Frame, area: Rect, v: &View) {
    let key = |k: &'static str| Span::styled(k, Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let updated = v.updated_ms.map(clock).unwrap_or_else(|| "--:--:--".into());
    let arrow = if v.sort.reverse { "▼" } else { "▲" };
    let full = Line::from(vec![
        key("q"),
        Span::raw(" quit  "),
        key("s"),
        Span::raw(format!(" sort: {} {arrow}  ", v.sort.key.name())),
        key("r"),
        Span::raw(" reverse  "),
        key("↑↓"),
        Span::raw(" scroll"),
        Span::raw(format!("  │ every {:.1}s, at {updated}", v.every.as_secs_f64())),
    ]);
    // Narrow terminals: the same, shorter.
    let line = if full.width() <= area.width as usize {
        full
    } else {
        Line::from(vec![
            key("q"),
            Span::raw(" quit "),
            key("s"),
            Span::raw(format!(" {}{arrow} ", v.sort.key.name())),
            key("r"),
            Span::raw(format!(" rev │ {updated}")),
        ])
    };
    f.render_widget(Paragraph::new(line), area);
}

/// The configuration havipd runs, reloaded when its path or generation changes.
#[derive(Default)]
struct ConfigCache {
    key: Option<(PathBuf, u64)>,
    cfg: Option<Config>,
}

impl ConfigCache {
    fn get(&mut self, state: Option<&State>) -> Option<&Config> {
        let Some((path, generation)) = state.and_then(|s| Some((s.config_path.clone()?, s.generation))) else {
            self.key = None;
            self.cfg = None;
            return None;
        };
        let key = Some((path.clone(), generation));
        if self.key != key {
            // A file edited into an invalid one keeps the last good one: havipd refuses it too.
            match Config::load(&path) {
                Ok(c) => self.cfg = Some(c),
                Err(_) if self.key.as_ref().is_some_and(|(p, _)| *p == path) => {}
                Err(_) => self.cfg = None,
            }
            self.key = key;
        }
        self.cfg.as_ref()
    }
}

/// Leaves raw mode and the alternate screen however `run` ends.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub fn run(pin_path: &Path, run_dir: &Path, opts: TopOptions) -> anyhow::Result<()> {
    let pins = PinLayout::new(pin_path);
    if !pins.exists() {
        bail!("no havip dataplane pinned at {}; start havipd first (or pass --pin-path)", pins.root.display());
    }
    if !std::io::stdout().is_terminal() {
        bail!("havip top needs a terminal; `havip stats --watch` prints plain text");
    }
    let every = Duration::from_millis(opts.every.max(100));
    // Ctrl-C arrives as a key in raw mode; these end it cleanly too (SIGHUP: the SSH
    // session went away).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }

    let mut model = Model::default();
    let mut configs = ConfigCache::default();
    let mut view = View { every, ..Default::default() };
    let mut refresh = |view: &mut View, model: &mut Model| {
        let state = State::load(run_dir).ok().flatten();
        match Snapshot::read(&pins, state.as_ref()) {
            Ok(snap) => {
                model.update(snap, configs.get(state.as_ref()));
                view.error = None;
            }
            Err(e) => view.error = Some(format!("{e:#}")),
        }
        view.loaded = model.has_snapshot();
        view.daemon = state.as_ref().and_then(State::live_pid);
        view.events = crate::node::events::recent(run_dir, EVENTS_READ);
        view.updated_ms = Some(crate::node::events::now_ms());
    };
    refresh(&mut view, &mut model);

    // Declared before the terminal so that it runs after the terminal's own drop (which
    // shows the cursor again). ratatui's init also restores the terminal on a panic.
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init()?;
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            refresh(&mut view, &mut model);
            next = Instant::now() + every;
        }
        view.rows = model.rows(view.sort);
        let page = terminal.size().map(|s| s.height.saturating_sub(EVENTS_HEIGHT + 3) as usize).unwrap_or(10).max(1);
        view.scroll = view.scroll.min(view.rows.len().saturating_sub(page));
        terminal.draw(|f| draw(f, &view))?;
        // Wake up at least every 250 ms to notice signals.
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
        if !event::poll(wait)? {
            continue;
        }
        match event::read()? {
            Event::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                KeyCode::Char('q') | KeyCode::Esc => break,
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
                KeyCode::Char('s') => view.sort = Sort { key: view.sort.key.next(), reverse: false },
                KeyCode::Char('r') => view.sort.reverse = !view.sort.reverse,
                KeyCode::Up | KeyCode::Char('k') => view.scroll = view.scroll.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => view.scroll += 1,
                KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(page),
                KeyCode::PageDown => view.scroll += page,
                KeyCode::Home => view.scroll = 0,
                KeyCode::End => view.scroll = usize::MAX,
                _ => {}
            },
            // The next draw adapts to the new size.
            _ => {}
        }
    }
    drop(terminal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::stats::VipStats;
    use ratatui::{backend::TestBackend, Terminal};

    fn path(nic: &str, target: &str, sent: u64, rtt_ms: f64) -> PathStats {
        PathStats {
            nic: nic.into(),
            target: target.parse().unwrap(),
            sent,
            received: sent,
            loss_pct: Some(0.0),
            rtt_ewma_ms: Some(rtt_ms),
            rtt_p50_ms: Some(rtt_ms),
            rtt_p99_ms: Some(rtt_ms * 2.0),
            hops: Some(1),
        }
    }

    fn vip(addr: &str, nic: &str, rx: u64, paths: Vec<PathStats>) -> VipStats {
        VipStats {
            vip: addr.parse().unwrap(),
            id: 1,
            nic: nic.into(),
            bound_for_secs: Some(5.0),
            moves: 1,
            pinned: None,
            mappings: vec![],
            rx: havip_common::DirCounters { packets: rx, ..Default::default() },
            tx: havip_common::DirCounters { packets: rx / 2, ..Default::default() },
            wire: Default::default(),
            paths,
            peers: vec![],
            class: None,
            classes: vec![],
        }
    }

    fn snapshot(at: Instant, n: u64) -> Snapshot {
        let paths = |t: &str| vec![path("a0", t, 10 * n, 2.0), path("b0", t, 10 * n, 0.5)];
        Snapshot {
            vips: vec![vip("198.18.20.10", "a0", 100 * n, paths("198.18.20.100")), vip("2001:db8:20::11", "b0", 1000 * n, paths("2001:db8:20::100"))],
            nics: vec![],
            paths: [paths("198.18.20.100"), paths("2001:db8:20::100")].concat(),
            classes: vec![],
            outcomes: BTreeMap::new(),
            taken: Some(at),
            bpf_calls: 0,
        }
    }

    fn config() -> Config {
        let text = "[node]\nvip_interface = \"lo\"\n[[nic]]\nname = \"a0\"\n[[nic]]\nname = \"b0\"\n\
            [[vip]]\naddress = \"198.18.20.10\"\nnics = [\"a0\", \"b0\"]\ntargets = [\"198.18.20.100\"]\n\
            [[vip]]\naddress = \"2001:db8:20::11\"\nnics = [\"a0\", \"b0\"]\ntargets = [\"2001:db8:20::100\"]\n";
        Config::parse(text, "test").unwrap()
    }

    fn screen(view: &View, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buf = t.backend().buffer();
        (0..h).map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>()).collect()
    }

    fn mv(vip: &str, from: &str, to: &str, reason: &str) -> Move {
        Move { at_ms: 1_700_000_000_000, vip: vip.parse().unwrap(), from: Some(from.into()), to: to.into(), reason: reason.into(), moves: 2 }
    }

    #[test]
    fn top_shows_rows_rates_score_and_moves_in_80x24() {
        let cfg = config();
        let t0 = Instant::now();
        let mut m = Model::default();
        m.update(snapshot(t0, 1), Some(&cfg));
        let first = m.rows(Sort::default());
        assert_eq!(first[0].score, Score::None, "one refresh measures nothing yet");
        assert_eq!(first[0].in_pps, None);
        m.update(snapshot(t0 + Duration::from_secs(1), 2), Some(&cfg));
        let rows = m.rows(Sort::default());
        // a0: 2 ms + 1 hop; b0: 0.5 ms + 1 hop (default weights 1, 2, 1).
        assert_eq!(rows[0].score, Score::Cost(3.0));
        assert_eq!(rows[1].score, Score::Cost(1.5));
        assert_eq!((rows[0].in_pps, rows[0].out_pps), (Some(100.0), Some(50.0)));
        assert_eq!(rows[0].trend, [Some(2.0), Some(2.0)]);
        let view = View {
            rows,
            events: vec![mv("198.18.20.10", "b0", "a0", "initial"), mv("198.18.20.10", "a0", "b0", "link_down")],
            every: Duration::from_secs(1),
            updated_ms: Some(1_700_000_000_000),
            daemon: Some(42),
            loaded: true,
            ..Default::default()
        };
        let s = screen(&view, 80, 24);
        let text = s.join("\n");
        assert!(s[0].contains("2 VIP(s)") && s[0].contains("havipd 42"), "{text}");
        assert!(s[1].contains("VIP") && s[1].trim_end().ends_with("CLASS"), "header cut: {text}");
        let row = s.iter().find(|l| l.contains("198.18.20.10 ")).unwrap_or_else(|| panic!("{text}"));
        for cell in ["a0", "3.00", "2.00", "4.00", "0.0", "100", "50", "██"] {
            assert!(row.contains(cell), "{cell:?} missing in {row:?}");
        }
        assert!(s.iter().any(|l| l.contains("2001:db8:20::11") && l.contains("b0") && l.contains("1.50") && l.contains("1.0k")), "{text}");
        // Moves: newest first, with their reasons.
        let moves = s.iter().position(|l| l.contains("Recent moves")).unwrap();
        assert_eq!(moves, 24 - 1 - EVENTS_HEIGHT as usize, "{text}");
        assert!(s[moves + 1].contains("198.18.20.10") && s[moves + 1].contains("a0 -> b0") && s[moves + 1].contains("link_down"), "{text}");
        assert!(s[moves + 2].contains("b0 -> a0  initial"), "{text}");
        assert!(s[23].contains("q quit") && s[23].contains("sort: VIP") && s[23].contains("every 1.0s"), "{text}");
        assert!(s[23].contains(&clock(1_700_000_000_000)), "{text}");
    }

    #[test]
    fn top_sorts_scrolls_and_says_when_there_is_nothing() {
        let cfg = config();
        let t0 = Instant::now();
        let mut m = Model::default();
        m.update(snapshot(t0, 1), Some(&cfg));
        m.update(snapshot(t0 + Duration::from_secs(1), 2), Some(&cfg));
        let order = |s: Sort| m.rows(s).iter().map(|r| r.vip.unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(order(Sort { key: SortKey::In, reverse: true }), ["2001:db8:20::11", "198.18.20.10"]);
        assert_eq!(order(Sort { key: SortKey::Rtt, reverse: false }), ["2001:db8:20::11", "198.18.20.10"]);
        assert_eq!(order(Sort { key: SortKey::Vip, reverse: true }), ["2001:db8:20::11", "198.18.20.10"]);
        let mut k = SortKey::Vip;
        for _ in 0..SortKey::ALL.len() {
            k = k.next();
        }
        assert_eq!(k, SortKey::Vip);
        // Values missing stay last either way.
        let mut rows = vec![VipRow { nic: "a".into(), ..Default::default() }, VipRow { in_pps: Some(1.0), ..Default::default() }];
        sort_rows(&mut rows, Sort { key: SortKey::In, reverse: true });
        assert_eq!(rows[0].in_pps, Some(1.0));
        sort_rows(&mut rows, Sort { key: SortKey::In, reverse: false });
        assert_eq!(rows[0].in_pps, Some(1.0));

        // Many VIPs: the table scrolls and says which rows it shows; nothing panics in a
        // tiny terminal either.
        let many: Vec<VipRow> = (0..40).map(|i| VipRow { vip: Some(IpAddr::from([198, 18, 0, i])), nic: "a0".into(), ..Default::default() }).collect();
        let view = View { rows: many, scroll: 5, loaded: true, ..Default::default() };
        let s = screen(&view, 80, 24);
        assert!(s[0].contains("(6-20 of 40)"), "{}", s.join("\n"));
        assert!(s[2].contains("198.18.0.5 "), "{}", s.join("\n"));
        // 60 columns: whole addresses, fewer columns, a shorter footer.
        let narrow = View { rows: m.rows(Sort::default()), loaded: true, ..Default::default() };
        let s = screen(&narrow, 60, 15);
        assert!(s[1].split_whitespace().eq(["VIP", "NIC", "SCORE", "P50ms", "RTT~", "LOSS%", "IN/s", "OUT/s"]), "{}", s.join("\n"));
        assert!(s[3].starts_with("2001:db8:20::11 b0") && s[14].contains("q quit") && s[14].contains("rev"), "{}", s.join("\n"));
        for (w, h) in [(20, 5), (80, 3), (1, 1)] {
            screen(&view, w, h);
        }
        let empty = View { loaded: true, ..Default::default() };
        let s = screen(&empty, 80, 24).join("\n");
        assert!(s.contains("no VIPs") && s.contains("havipd is not running") && s.contains("no moves recorded yet"), "{s}");
        let failed = View { loaded: true, error: Some("map gone".into()), ..Default::default() };
        assert!(screen(&failed, 80, 24).join("\n").contains("reading the dataplane failed: map gone"));
        assert_eq!(sparkline(&[Some(1.0), None, Some(4.0)], 5), "  ▃ █");
    }
}
