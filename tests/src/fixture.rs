//! The programs loaded against their own maps (no NIC attached), for BPF_PROG_RUN:
//! a packet goes in, the test checks the action, the bytes that come out and the counters.

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use havip_common::{maps as m, Direction, Outcome, VipCounters, VipKey};
use havip_user::{
    config::Config,
    kernel::dataplane::{remove_all_pins, Dataplane, Maps},
    kernel::pins::PinLayout,
    kernel::plan::Desired,
};

/// Two VIPs (one per family), each reaching an instance on :8081 as :80 over TCP and UDP.
pub const TWO_VIPS: &str = r#"
[[nic]]
name = "eth0"
[[vip]]
address = "198.18.100.1"
[[vip]]
address = "2001:db8:100::1"
[[service]]
name = "web"
port = 80
protocols = ["tcp", "udp"]
[[service.instance]]
vip = "198.18.100.1"
port = 8081
[[service.instance]]
vip = "2001:db8:100::1"
port = 8081
"#;

pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;

pub struct Fixture {
    pub dp: Dataplane,
    /// The same pinned maps, opened directly: fixtures set up and read map state that the
    /// controller only changes through the dataplane's verbs.
    pub maps: Maps,
    pins: PinLayout,
    /// Which ingress program `ingress` runs.
    hook: Hook,
}

/// The hook an ingress test runs on: the XDP program, or the TC ingress program (whose
/// actions `Fixture` translates to the XDP ones they stand for, so one test checks both:
/// TC_ACT_OK is XDP_PASS, TC_ACT_SHOT XDP_DROP, and TC_ACT_REDIRECT, which the TC ingress
/// program returns only to send a reply back out of its NIC, XDP_TX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// Runs an ingress test on each hook, saying which one on the way (a failure names it).
pub fn on_each_hook(test: impl Fn(Hook)) {
    for hook in [Hook::Xdp, Hook::Tc] {
        eprintln!("-- on the {hook:?} ingress hook");
        test(hook);
    }
}

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;

/// Output of one program run.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub out: Vec<u8>,
    pub duration_ns: u128,
}

impl Fixture {
    /// Loads the programs under a fresh pin root and applies `config` to the maps.
    pub fn new(config: &str) -> Self {
        Self::new_with(config, true)
    }

    /// With passive TCP measurement switched on or off (a load-time constant).
    pub fn new_with(config: &str, passive_tcp: bool) -> Self {
        crate::require_root();
        let root = format!("/sys/fs/bpf/{}", crate::unique("havip-fx"));
        let pins = PinLayout::new(&root);
        // A load the verifier refuses still leaves maps pinned: remove them before failing.
        let fail = |what: &str, e: anyhow::Error| -> ! {
            let _ = remove_all_pins(&pins);
            panic!("{what}: {e:#}")
        };
        let mut dp = Dataplane::open_with(root.as_ref(), passive_tcp).unwrap_or_else(|e| fail("loading the programs", e));
        let cfg = Config::parse(config, "fixture").unwrap_or_else(|e| fail("the fixture's config", e.into()));
        dp.apply_desired(&Desired::from_config(&cfg)).unwrap_or_else(|e| fail("applying the fixture's config", e));
        let maps = Maps::open(&pins).unwrap_or_else(|e| fail("opening the pinned maps", e));
        Self { dp, maps, pins, hook: Hook::Xdp }
    }

    /// The same fixture with `ingress` running the program of `hook`.
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = hook;
        self
    }

    /// Where this fixture's maps are pinned.
    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    fn run(&mut self, prog: &str, input: &[u8], repeat: u32) -> Run {
        self.try_run(prog, input, repeat).unwrap_or_else(|e| panic!("BPF_PROG_RUN of {prog} on {} bytes failed: {e}", input.len()))
    }

    /// Like `run`, but returns the kernel's refusal (BPF_PROG_RUN rejects some inputs, e.g.
    /// skbs too short for the headers their EtherType announces).
    pub fn try_run(&mut self, prog: &str, input: &[u8], repeat: u32) -> Result<Run, aya::programs::ProgramError> {
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        if prog == m::PROG_INGRESS && self.hook == Hook::Tc {
            return self.run_tc_ingress(input, repeat);
        }
        // `PROG_INGRESS` / `PROG_EGRESS` name whichever variant this fixture loaded.
        let prog = if prog == m::PROG_INGRESS { self.dp.ingress } else { prog };
        let r = if prog == m::PROG_EGRESS { self.dp.tc().unwrap().test_run(opts) } else { self.dp.xdp(prog).unwrap().test_run(opts) }?;
        out.truncate(r.data_size_out as usize);
        Ok(Run { action: r.return_value, out, duration_ns: r.duration.as_nanos() })
    }

    /// The TC ingress program on `input`, as if received on the test's loopback (ifindex
    /// 1, set in the partial `__sk_buff` BPF_PROG_RUN takes: `ingress_ifindex` at offset
    /// 36, `ifindex` at 40), its action translated (see [`Hook`]).
    fn run_tc_ingress(&mut self, input: &[u8], repeat: u32) -> Result<Run, aya::programs::ProgramError> {
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&1u32.to_ne_bytes());
        ctx[40..44].copy_from_slice(&1u32.to_ne_bytes());
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let r = self.dp.tc_ingress().unwrap().test_run(opts)?;
        out.truncate(r.data_size_out as usize);
        let action = match r.return_value {
            TC_ACT_OK => XDP_PASS,
            TC_ACT_SHOT => XDP_DROP,
            TC_ACT_REDIRECT => XDP_TX,
            other => panic!("the TC ingress program returned {other}, which it never should"),
        };
        Ok(Run { action, out, duration_ns: r.duration.as_nanos() })
    }

    /// TC egress of a packet carrying skb mark `mark` (BPF_PROG_RUN takes a partial
    /// `__sk_buff` as context: `len` and `pkt_type` zero, `mark` at offset 8).
    pub fn egress_marked(&mut self, input: &[u8], mark: u32) -> Run {
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let r = self.dp.tc().unwrap().test_run(opts).expect("BPF_PROG_RUN with a context");
        out.truncate(r.data_size_out as usize);
        Run { action: r.return_value, out, duration_ns: r.duration.as_nanos() }
    }

    /// TC egress returning also the skb priority the program left (BPF_PROG_RUN copies the
    /// whole `__sk_buff` back; `priority` is at offset 32).
    pub fn egress_priority(&mut self, input: &[u8]) -> (Run, u32) {
        const SK_BUFF_SIZE: usize = 192;
        let ctx = [0u8; SK_BUFF_SIZE];
        let mut ctx_out = [0u8; SK_BUFF_SIZE];
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.ctx_out = Some(&mut ctx_out);
        let r = self.dp.tc().unwrap().test_run(opts).expect("BPF_PROG_RUN with a context");
        out.truncate(r.data_size_out as usize);
        let prio = u32::from_ne_bytes(ctx_out[32..36].try_into().unwrap());
        (Run { action: r.return_value, out, duration_ns: r.duration.as_nanos() }, prio)
    }

    pub fn ingress(&mut self, input: &[u8]) -> Run {
        self.run(m::PROG_INGRESS, input, 1)
    }

    pub fn egress(&mut self, input: &[u8]) -> Run {
        self.run(m::PROG_EGRESS, input, 1)
    }

    /// Runs `prog` `repeat` times on `input`; the kernel reports the mean ns per run.
    pub fn time(&mut self, prog: &str, input: &[u8], repeat: u32) -> Run {
        self.run(prog, input, repeat)
    }

    /// Like `time`, also returning the CPU time this thread spent in the whole call divided
    /// by `repeat`: the kernel's mean is whole nanoseconds, this one keeps the fraction.
    /// CPU time, not wall time: time the thread spends preempted by others is not counted
    /// (the kernel's own timer leaves it out too). The call's fixed cost, a few
    /// microseconds, is a few thousandths of a nanosecond over 10^6 runs.
    pub fn timed(&mut self, prog: &str, input: &[u8], repeat: u32) -> (Run, f64) {
        let t0 = thread_cpu_ns();
        let r = self.run(prog, input, repeat);
        (r, (thread_cpu_ns() - t0) as f64 / repeat as f64)
    }

    pub fn outcome(&self, dir: Direction, o: Outcome) -> u64 {
        self.maps.outcome_totals().unwrap()[o.index(dir) as usize]
    }

    /// Binds a VIP to `ifindex` with `mac` (BPF_PROG_RUN runs XDP as if received on the
    /// test's loopback, ifindex 1; TC as if sent by it).
    pub fn bind(&mut self, ip: &str, ifindex: u32, mac: [u8; 6]) {
        let key = VipKey::from(ip.parse::<IpAddr>().unwrap());
        let info = self.maps.vips.get(&key, 0).expect("not a VIP");
        let b = havip_common::Binding { ifindex, nic_index: 0, mac, ..Default::default() };
        self.maps.set_binding(info.id, b).unwrap();
    }

    /// The fast-path slot `idx` as the programs see it now.
    pub fn slot(&self, idx: u32) -> havip_common::VipSlot {
        self.maps.slot(idx).unwrap()
    }

    /// Writes fast-path slot `idx` as havipd does.
    pub fn write_slot(maps: &mut Maps, idx: u32, slot: havip_common::VipSlot) {
        maps.set_slot(idx, slot).unwrap();
    }

    /// A VIP's counters in class `class`, summed over CPUs.
    pub fn class_counters(&self, ip: &str, class: &str) -> havip_common::ClassCounters {
        let key = VipKey::from(ip.parse::<IpAddr>().unwrap());
        let info = self.maps.vips.get(&key, 0).expect("not a VIP");
        let class = self.maps.class_ids().unwrap()[class];
        let mut t = havip_common::ClassCounters::default();
        let index = self.maps.class_stats_index.get(&havip_common::ClassStatsKey { vip_id: info.id, class }, 0).expect("no counters for this (VIP, class)");
        for c in self.maps.class_stats.get(&index, 0).unwrap().iter() {
            t.add(c);
        }
        t
    }

    pub fn vip(&self, ip: &str) -> VipCounters {
        let key = VipKey::from(ip.parse::<IpAddr>().unwrap());
        let info = self.maps.vips.get(&key, 0).expect("not a VIP");
        self.maps.vip_counters(info.id).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = remove_all_pins(&self.pins);
    }
}

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
