//! Real traffic for the namespace tests: an echo service instance and a long-lived,
//! checked TCP stream.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use havip_user::kernel::netns::Netns;

use crate::topology::{pattern, spawn_in};

/// A TCP service instance in `ns` on `port` (dual-stack): each accepted connection goes to
/// `serve` on a thread of its own. Stops accepting when `stop` is set.
pub fn tcp_instance(ns: &Netns, port: u16, stop: Arc<AtomicBool>, serve: impl Fn(TcpStream) + Clone + Send + 'static) {
    spawn_in(ns, move || {
        let l = TcpListener::bind(SocketAddr::from(([0u16; 8], port))).unwrap();
        l.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let serve = serve.clone();
                    std::thread::spawn(move || serve(s));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
}

/// An echo instance (never port 80): sends `greeting` to each client, then echoes.
pub fn echo_instance(ns: &Netns, port: u16, greeting: &'static [u8], stop: Arc<AtomicBool>) {
    tcp_instance(ns, port, stop, move |mut s| {
        assert_eq!(s.local_addr().unwrap().port(), port);
        if s.write_all(greeting).is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// A long-lived TCP stream from `ns` to vip:80: 4 KiB every 2 ms, each chunk echoed and
/// checked, so a reset, a loss or a corruption ends it with an error.
pub struct Stream {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

impl Stream {
    /// Starts it and waits for it to move; `greeting_line` skips the instance's first line.
    pub fn start(ns: &Netns, vip: &str, greeting_line: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let addr = SocketAddr::new(vip.parse().unwrap(), 80);
        let (s2, e2) = (stop.clone(), echoed.clone());
        let handle = spawn_in(ns, move || -> Result<u64, String> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            assert_eq!(s.peer_addr().unwrap().port(), 80, "the client must only ever see port 80");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            if greeting_line {
                r.read_line(&mut String::new()).map_err(|e| e.to_string())?;
            }
            let (mut sent, mut i) = (0u64, 0u32);
            while !s2.load(Ordering::Relaxed) {
                let chunk = pattern(4096, i);
                w.write_all(&chunk).map_err(|e| format!("{addr}: write after {sent} bytes: {e}"))?;
                let mut back = vec![0u8; chunk.len()];
                r.read_exact(&mut back).map_err(|e| format!("{addr}: read after {sent} bytes: {e}"))?;
                if back != chunk {
                    return Err(format!("{addr}: data corrupted after {sent} bytes"));
                }
                sent += chunk.len() as u64;
                e2.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(sent)
        });
        let s = Self { stop, echoed, handle };
        s.progress("at start");
        s
    }

    /// Asserts the stream moves forward (64 KiB within 5 s).
    pub fn progress(&self, what: &str) {
        let before = self.echoed.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.echoed.load(Ordering::Relaxed) < before + 64 * 1024 {
            assert!(Instant::now() < deadline && !self.handle.is_finished(), "stream stalled {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it; panics if it broke. Returns the bytes it moved.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap().unwrap_or_else(|e| panic!("the stream broke: {e}"))
    }
}
