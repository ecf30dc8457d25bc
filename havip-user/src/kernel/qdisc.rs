//! Egress shaping classes: an HTB root qdisc per NIC, managed through rtnetlink.
//!
//! The TC egress program sets `skb->priority = skb_priority(minor)`, and HTB looks
//! `skb->priority` up among its class ids before consulting any filter, so the classes need
//! no tc filters: a packet lands in the leaf its priority names, and unclassified traffic in
//! the default leaf.
//!
//! The tree is always two levels: one root class (`ROOT_MINOR`, rate = ceil = the NIC's
//! rate) that every leaf borrows from, and the leaves. rtnetlink has no HTB options and no
//! class requests, so the messages are built here from the layouts in
//! `include/uapi/linux/pkt_sched.h`.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use netlink_packet_route::{
    link::LinkAttribute,
    tc::{TcAttribute, TcHandle, TcMessage, TcOption, TcStats2},
    RouteNetlinkMessage,
};
use netlink_packet_utils::nla::{DefaultNla, Nla, NlasIterator};
use rtnetlink::Handle;

use crate::config::rate::format_rate;

/// The handle major of havip's root qdisc ("HV"); it is how havip recognises its own qdisc.
pub const HTB_MAJOR: u16 = 0x4856;

/// skb->priority that selects class `minor` of havip's HTB.
pub const fn skb_priority(minor: u16) -> u32 {
    (HTB_MAJOR as u32) << 16 | minor as u32
}

/// The root class all leaves borrow from: without a common parent, an idle leaf's share
/// could not be lent to the busy ones.
pub const ROOT_MINOR: u16 = 1;

/// A leaf class. Rates are in bits per second, as in the config and tc; the kernel keeps
/// bytes per second, so a rate that is not a multiple of 8 is rounded down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbClass {
    pub minor: u16,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    /// 0 is served first, 7 last; spare bandwidth goes to lower numbers first.
    pub prio: u8,
}

/// What a NIC's egress should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbSpec {
    /// The root class's rate and ceil: the most the NIC may send in total.
    pub rate_bps: u64,
    /// The leaf that takes traffic no class claims (skb->priority not one of ours).
    pub default_minor: u16,
    /// The leaves, children of `ROOT_MINOR`; includes the default.
    pub classes: Vec<HtbClass>,
}

/// The root egress qdisc of a NIC, as far as havip cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootQdisc {
    /// Handle 0: one the kernel made itself (noqueue, pfifo_fast, mq, ...): nobody chose it,
    /// so havip may put its own in its place.
    KernelDefault,
    /// An htb with handle `HTB_MAJOR:`.
    Havip,
    /// Someone else's: havip replaces it only when told to.
    Foreign { kind: String, handle: u32 },
}

/// A leaf class as the kernel reports it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassState {
    pub minor: u16,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub prio: u8,
    /// Sent bytes (L2, as HTB counts them), sent packets and drops since the class was created.
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
}

// include/uapi/linux/pkt_sched.h
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
/// `version` in tc_htb_glob: the major of HTB_VER (0x30011) in sch_htb.c.
const TC_HTB_PROTOVER: u32 = 3;
/// Only used by the kernel when a leaf has no explicit quantum, which ours always have.
const HTB_RATE2QUANTUM: u32 = 10;
const TC_HTB_NUMPRIO: u8 = 8;
/// Ethernet (not "unaware"): the kernel computes transmit times itself and wants no rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// psched ticks are 2^PSCHED_SHIFT ns.
const PSCHED_SHIFT: u32 = 6;
/// include/uapi/linux/gen_stats.h: a 64-bit packet count, sent when the u32 in
/// TCA_STATS_BASIC has wrapped.
const TCA_STATS_PKT64: u16 = 8;

/// sizeof(struct tc_htb_opt).
const TC_HTB_OPT_LEN: usize = 44;

/// The HTB parameters of one class, in the kernel's units (bytes per second, psched ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HtbParams {
    rate: u64,
    ceil: u64,
    buffer: u32,
    cbuffer: u32,
    quantum: u32,
    prio: u32,
}

impl HtbParams {
    /// What havip asks for: tc's defaults, made explicit so that the kernel never has to
    /// guess (and never warns about r2q).
    fn new(rate_bps: u64, ceil_bps: u64, prio: u8) -> Self {
        let (rate, ceil) = (rate_bps / 8, ceil_bps / 8);
        Self {
            rate,
            ceil,
            buffer: burst_ticks(rate),
            cbuffer: burst_ticks(ceil),
            // A quantum below the MTU would make a class wait a round per packet; above
            // 200 kB it starves its siblings for too long.
            quantum: (rate / 10).clamp(1600, 200_000) as u32,
            prio: u32::from(prio),
        }
    }

    /// struct tc_htb_opt. Rates that do not fit go in RATE64/CEIL64 with the u32 at !0
    /// (the kernel rejects a zero rate before it looks at the 64-bit one).
    fn tc_htb_opt(&self) -> [u8; TC_HTB_OPT_LEN] {
        let mut b = [0u8; TC_HTB_OPT_LEN];
        b[0..12].copy_from_slice(&tc_ratespec(self.rate));
        b[12..24].copy_from_slice(&tc_ratespec(self.ceil));
        b[24..28].copy_from_slice(&self.buffer.to_ne_bytes());
        b[28..32].copy_from_slice(&self.cbuffer.to_ne_bytes());
        b[32..36].copy_from_slice(&self.quantum.to_ne_bytes());
        // 36..40 level: the kernel's to decide.
        b[40..44].copy_from_slice(&self.prio.to_ne_bytes());
        b
    }

    fn options(&self) -> Vec<TcOption> {
        let mut opts = vec![TcOption::Other(DefaultNla::new(TCA_HTB_PARMS, self.tc_htb_opt().to_vec()))];
        if self.rate > u64::from(u32::MAX) {
            opts.push(TcOption::Other(DefaultNla::new(TCA_HTB_RATE64, self.rate.to_ne_bytes().to_vec())));
        }
        if self.ceil > u64::from(u32::MAX) {
            opts.push(TcOption::Other(DefaultNla::new(TCA_HTB_CEIL64, self.ceil.to_ne_bytes().to_vec())));
        }
        opts
    }

    /// Parses a class's TCA_OPTIONS payload; also returns its level (0 = leaf).
    fn parse(options: &[u8]) -> Option<(Self, u32)> {
        let (mut opt, mut rate64, mut ceil64) = (None, None, None);
        for nla in NlasIterator::new(options) {
            let nla = nla.ok()?;
            let v = nla.value();
            match nla.kind() {
                TCA_HTB_PARMS if v.len() >= TC_HTB_OPT_LEN => opt = Some(v[..TC_HTB_OPT_LEN].to_vec()),
                TCA_HTB_RATE64 if v.len() >= 8 => rate64 = Some(u64_at(v, 0)),
                TCA_HTB_CEIL64 if v.len() >= 8 => ceil64 = Some(u64_at(v, 0)),
                _ => {}
            }
        }
        let b = opt?;
        let params = Self {
            rate: rate64.unwrap_or(u64::from(u32_at(&b, 8))),
            ceil: ceil64.unwrap_or(u64::from(u32_at(&b, 20))),
            buffer: u32_at(&b, 24),
            cbuffer: u32_at(&b, 28),
            quantum: u32_at(&b, 32),
            prio: u32_at(&b, 40),
        };
        Some((params, u32_at(&b, 36)))
    }

    /// Whether the kernel's class already is what we want. Quantum and prio only count for
    /// leaves: the kernel ignores them on inner classes and reports stale values there.
    fn satisfies(&self, wanted: &Self, level: u32) -> bool {
        let rates = self.rate == wanted.rate && self.ceil == wanted.ceil && self.buffer == wanted.buffer && self.cbuffer == wanted.cbuffer;
        rates && (level > 0 || (self.quantum == wanted.quantum && self.prio == wanted.prio))
    }
}

/// struct tc_ratespec.
fn tc_ratespec(rate_bytes: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    b[8..12].copy_from_slice(&u32::try_from(rate_bytes).unwrap_or(u32::MAX).to_ne_bytes());
    b
}

/// The bucket depth in psched ticks: a millisecond of traffic plus a full-size frame, what
/// tc uses with HZ=1000, so a class can send at its rate despite timer slack.
fn burst_ticks(rate_bytes: u64) -> u32 {
    let burst = rate_bytes / 1000 + 1600;
    let ticks = (u128::from(burst) * 1_000_000_000 / u128::from(rate_bytes.max(1))) >> PSCHED_SHIFT;
    u32::try_from(ticks).unwrap_or(u32::MAX)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0u8; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

/// The TCA_OPTIONS payload of a message whose kind netlink-packet-route does not know: it
/// keeps the whole attribute as one opaque NLA.
fn options_payload(msg: &TcMessage) -> Option<Vec<u8>> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) => Some(nla_value(nla)),
            _ => None,
        }),
        _ => None,
    })
}

fn kind(msg: &TcMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

const fn class_handle(minor: u16) -> TcHandle {
    TcHandle { major: HTB_MAJOR, minor }
}

/// tc's notation: `1:` for a qdisc, `1:10` for a class (hex).
fn tc_handle(h: u32) -> String {
    match (h >> 16, h & 0xffff) {
        (major, 0) => format!("{major:x}:"),
        (major, minor) => format!("{major:x}:{minor:x}"),
    }
}

/// Sends a request that is answered by an ACK, failing with the kernel's error.
async fn request(handle: &Handle, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut responses = handle.clone().request(req)?;
    while let Some(resp) = responses.next().await {
        if let NetlinkPayload::Error(e) = resp.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

/// The NIC's name for messages; the index if it cannot be had.
async fn nic_name(handle: &Handle, ifindex: u32) -> String {
    let mut links = handle.link().get().match_index(ifindex).execute();
    if let Ok(Some(msg)) = links.try_next().await {
        for attr in msg.attributes {
            if let LinkAttribute::IfName(name) = attr {
                return name;
            }
        }
    }
    format!("ifindex {ifindex}")
}

async fn root_qdisc_message(handle: &Handle, ifindex: u32) -> anyhow::Result<Option<TcMessage>> {
    let mut qdiscs = handle.clone().qdisc().get().index(ifindex as i32).execute();
    while let Some(msg) = qdiscs.try_next().await.with_context(|| format!("listing the qdiscs of ifindex {ifindex}"))? {
        // Older kernels dump every device's qdiscs whatever the index asked for.
        if msg.header.index == ifindex as i32 && msg.header.parent == TcHandle::ROOT {
            return Ok(Some(msg));
        }
    }
    // No root in the dump: the builtin noop qdisc of a device that is down.
    Ok(None)
}

fn classify_root(msg: Option<&TcMessage>) -> RootQdisc {
    let Some(msg) = msg else {
        return RootQdisc::KernelDefault;
    };
    let handle = u32::from(msg.header.handle);
    let kind = kind(msg).unwrap_or_default();
    if handle == 0 {
        RootQdisc::KernelDefault
    } else if kind == "htb" && msg.header.handle == class_handle(0) {
        RootQdisc::Havip
    } else {
        RootQdisc::Foreign { kind: kind.to_string(), handle }
    }
}

/// What holds the NIC's egress now: decides whether `apply` may put havip's HTB there and
/// whether `remove` has anything to remove.
pub async fn root_qdisc(handle: &Handle, ifindex: u32) -> anyhow::Result<RootQdisc> {
    Ok(classify_root(root_qdisc_message(handle, ifindex).await?.as_ref()))
}

/// The defcls of havip's qdisc, from TCA_HTB_INIT (struct tc_htb_glob: version, rate2quantum,
/// defcls, ...).
fn default_minor(qdisc: &TcMessage) -> Option<u16> {
    let options = options_payload(qdisc)?;
    NlasIterator::new(&options[..]).filter_map(Result::ok).find_map(|nla| {
        let v = nla.value();
        (nla.kind() == TCA_HTB_INIT && v.len() >= 12).then(|| u32_at(v, 8) as u16)
    })
}

fn validate(spec: &HtbSpec) -> anyhow::Result<()> {
    if spec.rate_bps < 8 {
        bail!("the NIC's rate must be at least 8bit (one byte per second)");
    }
    let mut seen = BTreeMap::new();
    for c in &spec.classes {
        let name = format!("class {}", c.minor);
        if c.minor == 0 || c.minor == ROOT_MINOR {
            bail!("{name}: minors 0 and {ROOT_MINOR} are taken by the qdisc and its root class");
        }
        if seen.insert(c.minor, ()).is_some() {
            bail!("{name} is given twice");
        }
        if c.rate_bps < 8 {
            bail!("{name}: the rate must be at least 8bit (one byte per second)");
        }
        if c.ceil_bps < c.rate_bps {
            bail!("{name}: ceil {} is below the rate {}", format_rate(c.ceil_bps), format_rate(c.rate_bps));
        }
        if c.prio >= TC_HTB_NUMPRIO {
            bail!("{name}: prio {} is out of range 0..=7", c.prio);
        }
    }
    if !seen.contains_key(&spec.default_minor) {
        bail!("the default class {} is not one of the classes", spec.default_minor);
    }
    Ok(())
}

async fn add_qdisc(handle: &Handle, ifindex: u32, default_minor: u16, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut glob = [0u8; 20];
    glob[0..4].copy_from_slice(&TC_HTB_PROTOVER.to_ne_bytes());
    glob[4..8].copy_from_slice(&HTB_RATE2QUANTUM.to_ne_bytes());
    glob[8..12].copy_from_slice(&u32::from(default_minor).to_ne_bytes());
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = class_handle(0);
    msg.header.parent = TcHandle::ROOT;
    msg.attributes.push(TcAttribute::Kind("htb".into()));
    msg.attributes.push(TcAttribute::Options(vec![TcOption::Other(DefaultNla::new(TCA_HTB_INIT, glob.to_vec()))]));
    request(handle, RouteNetlinkMessage::NewQueueDiscipline(msg), flags).await
}

async fn del_qdisc(handle: &Handle, ifindex: u32) -> Result<(), rtnetlink::Error> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = class_handle(0);
    msg.header.parent = TcHandle::ROOT;
    request(handle, RouteNetlinkMessage::DelQueueDiscipline(msg), 0).await
}

/// Adds (`create`) or changes in place a class of havip's HTB.
async fn put_class(handle: &Handle, ifindex: u32, minor: u16, parent: TcHandle, params: &HtbParams, create: bool) -> anyhow::Result<()> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = class_handle(minor);
    msg.header.parent = parent;
    msg.attributes.push(TcAttribute::Kind("htb".into()));
    msg.attributes.push(TcAttribute::Options(params.options()));
    let flags = if create { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
    let what = if create { "adding" } else { "changing" };
    request(handle, RouteNetlinkMessage::NewTrafficClass(msg), flags)
        .await
        .with_context(|| format!("{what} HTB class {} ({params:?})", tc_handle(skb_priority(minor))))
}

async fn del_class(handle: &Handle, ifindex: u32, minor: u16, parent: TcHandle) -> anyhow::Result<()> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = class_handle(minor);
    msg.header.parent = parent;
    request(handle, RouteNetlinkMessage::DelTrafficClass(msg), 0).await.with_context(|| format!("deleting HTB class {}", tc_handle(skb_priority(minor))))
}

/// A class of havip's HTB as dumped.
struct KernelClass {
    minor: u16,
    parent: TcHandle,
    params: HtbParams,
    level: u32,
    bytes: u64,
    packets: u64,
    drops: u64,
}

async fn dump_classes(handle: &Handle, ifindex: u32) -> anyhow::Result<Vec<KernelClass>> {
    let mut out = Vec::new();
    let mut msgs = handle.clone().traffic_class(ifindex as i32).get().execute();
    while let Some(msg) = msgs.try_next().await.with_context(|| format!("listing the classes of ifindex {ifindex}"))? {
        if msg.header.index != ifindex as i32 || msg.header.handle.major != HTB_MAJOR || kind(&msg) != Some("htb") {
            continue;
        }
        let Some((params, level)) = options_payload(&msg).and_then(|o| HtbParams::parse(&o)) else {
            continue;
        };
        let (mut bytes, mut packets, mut drops) = (0, 0, 0);
        for attr in &msg.attributes {
            let TcAttribute::Stats2(stats) = attr else {
                continue;
            };
            for s in stats {
                match s {
                    TcStats2::Basic(b) => (bytes, packets) = (b.bytes, packets.max(u64::from(b.packets))),
                    TcStats2::Queue(q) => drops = u64::from(q.drops),
                    TcStats2::Other(nla) if nla.kind() == TCA_STATS_PKT64 && nla.value_len() >= 8 => packets = u64_at(&nla_value(nla), 0),
                    _ => {}
                }
            }
        }
        let (minor, parent) = (msg.header.handle.minor, msg.header.parent);
        out.push(KernelClass { minor, parent, params, level, bytes, packets, drops });
    }
    out.sort_by_key(|c| c.minor);
    Ok(out)
}

/// The leaf classes of havip's HTB on the NIC as the kernel reports them (TCA_HTB_PARMS,
/// RATE64/CEIL64, TCA_STATS2), sorted by minor: what is in force, not what was asked for,
/// for `havip stats` and tests. Empty when havip's qdisc is not there.
pub async fn classes(handle: &Handle, ifindex: u32) -> anyhow::Result<Vec<ClassState>> {
    Ok(dump_classes(handle, ifindex)
        .await?
        .into_iter()
        .filter(|c| c.minor != ROOT_MINOR)
        .map(|c| ClassState {
            minor: c.minor,
            rate_bps: c.params.rate * 8,
            ceil_bps: c.params.ceil * 8,
            prio: c.params.prio as u8,
            bytes: c.bytes,
            packets: c.packets,
            drops: c.drops,
        })
        .collect())
}

/// Makes the NIC's egress match `spec`: creates the root HTB if the NIC has the kernel's
/// default root qdisc, replaces a foreign one only if `replace_foreign`, otherwise fails with
/// an error naming the NIC, the foreign qdisc and what to do about it.
///
/// Then adds, changes in place or deletes classes so the leaves are exactly `spec`'s. A
/// change is an in-place class change, never a delete and add: the class keeps its queue,
/// its tokens and its counters, and traffic in the other classes is not disturbed. A new
/// root rate is likewise an in-place change of the root class. Only a new `default_minor`
/// recreates the qdisc (and so every class, with fresh counters and an emptied queue),
/// because HTB cannot change its default class after creation. Applying the same spec
/// twice sends nothing the second time.
pub async fn apply(handle: &Handle, ifindex: u32, spec: &HtbSpec, replace_foreign: bool) -> anyhow::Result<()> {
    validate(spec)?;
    let root = root_qdisc_message(handle, ifindex).await?;
    match classify_root(root.as_ref()) {
        RootQdisc::KernelDefault => {
            if let Err(e) = add_qdisc(handle, ifindex, spec.default_minor, NLM_F_CREATE | NLM_F_EXCL).await {
                let nic = nic_name(handle, ifindex).await;
                return Err(e).with_context(|| format!("adding havip's HTB qdisc on {nic}"));
            }
        }
        RootQdisc::Foreign { kind, handle: h } => {
            let nic = nic_name(handle, ifindex).await;
            if !replace_foreign {
                bail!(
                    "NIC {nic} already has a root qdisc that havip did not create ({kind} {}): set \
                     `replace_qdisc = true` on the nic in the config to let havip replace it, or \
                     remove it with `tc qdisc del dev {nic} root`",
                    tc_handle(h)
                );
            }
            tracing::info!(nic, kind, handle = tc_handle(h), "replacing the foreign root qdisc with havip's HTB");
            add_qdisc(handle, ifindex, spec.default_minor, NLM_F_CREATE | NLM_F_REPLACE)
                .await
                .with_context(|| format!("replacing the {kind} root qdisc of {nic} with havip's HTB"))?;
        }
        RootQdisc::Havip => {
            let current = root.as_ref().and_then(default_minor);
            if current != Some(spec.default_minor) {
                let nic = nic_name(handle, ifindex).await;
                let to = spec.default_minor;
                tracing::info!(nic, from = ?current, to, "the default class changed: recreating the HTB qdisc");
                del_qdisc(handle, ifindex).await.with_context(|| format!("deleting havip's HTB qdisc on {nic}"))?;
                add_qdisc(handle, ifindex, spec.default_minor, NLM_F_CREATE | NLM_F_EXCL)
                    .await
                    .with_context(|| format!("recreating havip's HTB qdisc on {nic}"))?;
            }
        }
    }
    sync_classes(handle, ifindex, spec).await
}

async fn sync_classes(handle: &Handle, ifindex: u32, spec: &HtbSpec) -> anyhow::Result<()> {
    let existing = dump_classes(handle, ifindex).await?;
    let root_parent = class_handle(0);
    let leaf_parent = class_handle(ROOT_MINOR);

    let root = HtbParams::new(spec.rate_bps, spec.rate_bps, 0);
    match existing.iter().find(|c| c.minor == ROOT_MINOR) {
        None => put_class(handle, ifindex, ROOT_MINOR, root_parent, &root, true).await?,
        Some(c) if !c.params.satisfies(&root, c.level) => put_class(handle, ifindex, ROOT_MINOR, root_parent, &root, false).await?,
        Some(_) => {}
    }

    let wanted: BTreeMap<u16, HtbParams> = spec.classes.iter().map(|c| (c.minor, HtbParams::new(c.rate_bps, c.ceil_bps, c.prio))).collect();
    // Classes that are not ours to keep go first (leaves before anything hung below them),
    // so a minor that moved to another parent can be added again.
    let mut stale: Vec<&KernelClass> =
        existing.iter().filter(|c| c.minor != ROOT_MINOR && (!wanted.contains_key(&c.minor) || c.parent != leaf_parent)).collect();
    stale.sort_by_key(|c| c.level);
    for c in &stale {
        del_class(handle, ifindex, c.minor, c.parent).await?;
    }
    for (&minor, params) in &wanted {
        match existing.iter().find(|c| c.minor == minor && c.parent == leaf_parent) {
            None => put_class(handle, ifindex, minor, leaf_parent, params, true).await?,
            Some(c) if !c.params.satisfies(params, c.level) => put_class(handle, ifindex, minor, leaf_parent, params, false).await?,
            Some(_) => {}
        }
    }
    Ok(())
}

/// Deletes havip's root qdisc (the kernel restores its default); leaves any other alone.
/// Returns whether one was removed.
pub async fn remove(handle: &Handle, ifindex: u32) -> anyhow::Result<bool> {
    if root_qdisc(handle, ifindex).await? != RootQdisc::Havip {
        return Ok(false);
    }
    match del_qdisc(handle, ifindex).await {
        Ok(()) => Ok(true),
        // Gone in between (someone else deleted or replaced it): not ours to remove any more.
        Err(_) if root_qdisc(handle, ifindex).await? != RootQdisc::Havip => Ok(false),
        Err(e) => {
            let nic = nic_name(handle, ifindex).await;
            Err(e).with_context(|| format!("deleting havip's HTB qdisc on {nic}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_utils::Emitable;

    use super::*;

    #[test]
    fn tc_htb_opt_has_the_kernel_layout() {
        let p = HtbParams { rate: 2_500_000, ceil: 5_000_000, buffer: 11, cbuffer: 12, quantum: 1600, prio: 3 };
        let b = p.tc_htb_opt();
        assert_eq!(b.len(), 44);
        // struct tc_ratespec { u8 cell_log; u8 linklayer; u16 overhead; s16 cell_align; u16 mpu; u32 rate; }
        assert_eq!(&b[0..8], &[0, TC_LINKLAYER_ETHERNET, 0, 0, 0, 0, 0, 0]);
        assert_eq!(u32_at(&b, 8), 2_500_000);
        assert_eq!(b[13], TC_LINKLAYER_ETHERNET);
        assert_eq!(u32_at(&b, 20), 5_000_000);
        assert_eq!((u32_at(&b, 24), u32_at(&b, 28), u32_at(&b, 32)), (11, 12, 1600));
        assert_eq!((u32_at(&b, 36), u32_at(&b, 40)), (0, 3));
    }

    #[test]
    fn large_rates_go_in_64_bit_attributes() {
        let p = HtbParams::new(100_000_000_000, 100_000_000_000, 0);
        let b = p.tc_htb_opt();
        assert_eq!(u32_at(&b, 8), u32::MAX);
        assert_eq!(u32_at(&b, 20), u32::MAX);
        let opts = p.options();
        assert_eq!(opts.len(), 3);
        // What the kernel dumps back parses to the same parameters.
        let mut payload = vec![0u8; opts.as_slice().buffer_len()];
        opts.as_slice().emit(&mut payload);
        assert_eq!(HtbParams::parse(&payload), Some((p, 0)));
        assert_eq!(HtbParams::new(20_000_000, 20_000_000, 0).options().len(), 1);
    }

    #[test]
    fn buffer_is_a_millisecond_plus_a_frame_in_ticks() {
        // 20mbit = 2.5 MB/s: burst 2500 + 1600 bytes = 1.64 ms = 25625 ticks of 64 ns.
        let p = HtbParams::new(20_000_000, 20_000_000, 0);
        assert_eq!((p.rate, p.buffer, p.cbuffer), (2_500_000, 25_625, 25_625));
        assert_eq!(p.quantum, 200_000);
        assert_eq!(HtbParams::new(800_000, 800_000, 0).quantum, 10_000);
        assert_eq!(HtbParams::new(64_000, 64_000, 0).quantum, 1600);
        assert_eq!(burst_ticks(1), u32::MAX);
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let class = |minor, rate_bps, ceil_bps, prio| HtbClass { minor, rate_bps, ceil_bps, prio };
        let spec = |default_minor, classes| HtbSpec { rate_bps: 1_000_000_000, default_minor, classes };
        assert!(validate(&spec(10, vec![class(10, 1000, 1000, 0)])).is_ok());
        let cases = [
            (spec(11, vec![class(10, 1000, 1000, 0)]), "default class 11"),
            (spec(1, vec![class(1, 1000, 1000, 0)]), "minors 0 and 1"),
            (spec(10, vec![class(10, 1000, 1000, 0), class(10, 1000, 1000, 0)]), "twice"),
            (spec(10, vec![class(10, 0, 1000, 0)]), "at least 8bit"),
            (spec(10, vec![class(10, 2000, 1000, 0)]), "below the rate"),
            (spec(10, vec![class(10, 1000, 1000, 8)]), "prio 8"),
        ];
        for (s, want) in cases {
            let e = validate(&s).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn handles_print_like_tc() {
        assert_eq!(tc_handle(skb_priority(0)), "4856:");
        assert_eq!(tc_handle(skb_priority(0x10)), "4856:10");
        assert_eq!(skb_priority(0x10), 0x4856_0010);
    }
}
