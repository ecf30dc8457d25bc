//! An impaired wire: the kernel has no netem here, so a relay namespace forwards frames
//! between two of its interfaces in userspace (AF_PACKET), each direction with its own
//! delay and loss.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
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
}

pub struct Relay {
    stop: Arc<AtomicBool>,
    /// (a -> b, b -> a), changeable while the relay runs.
    now: Arc<Mutex<(Impairment, Impairment)>>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Forwards `a` -> `b` with `a_to_b` and `b` -> `a` with `b_to_a` inside `ns`, whose
    /// own stack must stay quiet on them (no addresses, IPv6 off).
    pub fn start(ns: &Netns, a: &str, b: &str, a_to_b: Impairment, b_to_a: Impairment) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let now = Arc::new(Mutex::new((a_to_b, b_to_a)));
        let mut threads = Vec::new();
        for (from, to, forward, seed) in [(a, b, true, 0x9e37_79b9u32), (b, a, false, 0x85eb_ca6bu32)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (stop_r, from_s, now_r) = (stop.clone(), from.to_string(), now.clone());
            threads.push(spawn_in(ns, move || {
                let link = RawLink::open(&from_s);
                let mut x = seed;
                let mut rand = move || {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as f64 / u32::MAX as f64
                };
                while !stop_r.load(Ordering::Relaxed) {
                    let Some(frame) = link.recv_incoming(Duration::from_millis(50)) else { continue };
                    let imp = {
                        let n = now_r.lock().unwrap();
                        if forward { n.0 } else { n.1 }
                    };
                    if rand() < imp.loss {
                        continue;
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
        Self { stop, now, threads }
    }

    /// Changes the impairments from the next frame on.
    pub fn set(&self, a_to_b: Impairment, b_to_a: Impairment) {
        *self.now.lock().unwrap() = (a_to_b, b_to_a);
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
