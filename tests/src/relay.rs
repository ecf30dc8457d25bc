//! An impaired wire: the kernel has no netem here, so a relay namespace forwards frames
//! between two of its interfaces in userspace (AF_PACKET), each direction with its own
//! delay and loss.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use havip_user::kernel::netns::Netns;

use crate::{topology::spawn_in, wire::RawLink};

#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter).
    pub jitter: Duration,
    /// Fraction of frames dropped, 0.0..1.0.
    pub loss: f64,
    /// Bursts of lost probes: runs of consecutive ICMP echo requests dropped.
    pub probe_bursts: Option<ProbeBursts>,
}

/// Runs of 1 to `max_len` consecutive ICMP echo requests (havip's probes) dropped, one
/// run every `gap_min` to `gap_max` (uniform).
#[derive(Debug, Clone, Copy)]
pub struct ProbeBursts {
    pub max_len: u32,
    pub gap_min: Duration,
    pub gap_max: Duration,
}

/// The ICMP type of an IPv4 ICMP frame (no VLAN), if it is one.
fn icmp_type(frame: &[u8]) -> Option<u8> {
    (frame.len() > 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 1).then(|| frame.get(14 + usize::from(frame[14] & 0x0f) * 4).copied()).flatten()
}

/// An ICMP echo request in an Ethernet frame (IPv4, no VLAN).
fn is_echo_request(frame: &[u8]) -> bool {
    icmp_type(frame) == Some(8)
}

/// A probe exchange (echo request or reply).
fn is_echo(frame: &[u8]) -> bool {
    matches!(icmp_type(frame), Some(8 | 0))
}

/// No random loss of a probe exchange, in either direction, this close to a burst: a run
/// of lost probes is then never longer than the burst's `max_len` (random loss next to a
/// burst of 3 made a run of 4, which havip rightly calls a dark path).
const BURST_GUARD: Duration = Duration::from_millis(100);

pub struct Relay {
    stop: Arc<AtomicBool>,
    /// Probe bursts dropped so far (both directions).
    bursts: Arc<AtomicU64>,
    /// (a -> b, b -> a), changeable while the relay runs.
    now: Arc<Mutex<(Impairment, Impairment)>>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Forwards `a` -> `b` with `a_to_b` and `b` -> `a` with `b_to_a` inside `ns`, whose
    /// own stack must stay quiet on them (no addresses, IPv6 off).
    pub fn start(ns: &Netns, a: &str, b: &str, a_to_b: Impairment, b_to_a: Impairment) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bursts = Arc::new(AtomicU64::new(0));
        let now = Arc::new(Mutex::new((a_to_b, b_to_a)));
        // (end of the last burst, start of the next), in either direction.
        let near: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
        let mut threads = Vec::new();
        for (from, to, forward, seed) in [(a, b, true, 0x9e37_79b9u32), (b, a, false, 0x85eb_ca6bu32)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (stop_r, from_s, now_r, bursts_r, near_r) = (stop.clone(), from.to_string(), now.clone(), bursts.clone(), near.clone());
            threads.push(spawn_in(ns, move || {
                let link = RawLink::open(&from_s);
                let mut x = seed;
                let mut rand = move || {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as f64 / u32::MAX as f64
                };
                // The burst being dropped (probes left), and when the next one starts.
                let (mut dropping, mut next_burst) = (0u32, None::<Instant>);
                while !stop_r.load(Ordering::Relaxed) {
                    let Some(frame) = link.recv_incoming(Duration::from_millis(50)) else { continue };
                    let imp = {
                        let n = now_r.lock().unwrap();
                        if forward {
                            n.0
                        } else {
                            n.1
                        }
                    };
                    if let Some(b) = imp.probe_bursts.filter(|_| is_echo_request(&frame)) {
                        let gap = |r: f64| b.gap_min + (b.gap_max.saturating_sub(b.gap_min)).mul_f64(r);
                        let start = *next_burst.get_or_insert_with(|| Instant::now() + gap(rand()));
                        near_r.lock().unwrap().1 = Some(start);
                        if dropping == 0 && Instant::now() >= start {
                            dropping = 1 + ((rand() * b.max_len as f64) as u32).min(b.max_len - 1);
                            bursts_r.fetch_add(1, Ordering::Relaxed);
                        }
                        if dropping > 0 {
                            dropping -= 1;
                            if dropping == 0 {
                                next_burst = Some(Instant::now() + gap(rand()));
                                *near_r.lock().unwrap() = (Some(Instant::now()), next_burst);
                            }
                            continue;
                        }
                    }
                    if rand() < imp.loss {
                        let t = Instant::now();
                        let (last_end, next_start) = *near_r.lock().unwrap();
                        let guarded = is_echo(&frame)
                            && (last_end.is_some_and(|e| t < e + BURST_GUARD) || next_start.is_some_and(|n| t + BURST_GUARD >= n) || dropping > 0);
                        if !guarded {
                            continue;
                        }
                    }
                    let delay = imp.delay + imp.jitter.mul_f64(rand());
                    if tx.send((Instant::now() + delay, frame)).is_err() {
                        break;
                    }
                }
            }));
            let to_s = to.to_string();
            threads.push(spawn_in(ns, move || {
                let link = RawLink::open(&to_s);
                while let Ok((due, frame)) = rx.recv() {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    // A frame the far side cannot take is lost, as on a real wire.
                    let _ = link.try_send(&frame);
                }
            }));
        }
        Self { stop, bursts, now, threads }
    }

    /// Probe bursts dropped so far.
    pub fn bursts(&self) -> u64 {
        self.bursts.load(Ordering::Relaxed)
    }

    /// Changes the impairments from the next frame on.
    pub fn set(&self, a_to_b: Impairment, b_to_a: Impairment) {
        *self.now.lock().unwrap() = (a_to_b, b_to_a);
    }

    /// A handle that sets the impairments, usable after the borrow of the relay ends.
    pub fn set_handle(&self) -> impl Fn(Impairment, Impairment) + Send + 'static {
        let now = self.now.clone();
        move |a, b| *now.lock().unwrap() = (a, b)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Receivers notice within 50 ms; their senders end when the channel closes.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
