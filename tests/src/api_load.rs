//! API load: applications requesting and releasing pool VIPs at a steady rate over
//! havipd's control socket, each on its own keep-alive connection, with plain HTTP/1.1
//! written by hand (the point is load on havipd, not on a client library). Every answer
//! is checked: a request must get 201, a release 200; anything else is counted apart, so
//! a load that silently did nothing is visible.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Serialize;

/// `n` pool VIPs 198.18.20.{first}.. on NICs a0 and b0 (config text).
pub fn pool_config(first: u8, n: u8) -> String {
    let mut s = String::new();
    for i in 0..n {
        s += &format!("[[vip]]\naddress = \"198.18.20.{}\"\nnics = [\"a0\", \"b0\"]\npool = true\n", first + i);
    }
    s
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered 201 (a VIP granted, bound and remapped).
    pub granted: u64,
    /// Releases answered 200.
    pub released: u64,
    /// Any other answer, or a broken connection.
    pub failed: u64,
    pub seconds: f64,
}

impl LoadReport {
    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        (self.granted + self.released) as f64 / self.seconds.max(1e-9)
    }
}

pub struct ApiLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    counts: Arc<[AtomicU64; 3]>,
    started: Instant,
}

/// One HTTP/1.1 call on a kept-alive connection: (status, body).
fn call(conn: &mut BufReader<UnixStream>, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: havipd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    conn.get_mut().write_all(req.as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        conn.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf)?;
    Ok((status, String::from_utf8_lossy(&buf).into_owned()))
}

impl ApiLoad {
    /// Starts `apps` applications that together make `calls_per_sec` calls per second
    /// (each one a request, then its release, and again) on the socket of the havipd
    /// whose run directory is `run_dir`.
    pub fn start(run_dir: &Path, apps: usize, calls_per_sec: f64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let sock: PathBuf = havip_user::api::socket_path(run_dir);
        let every = Duration::from_secs_f64(apps as f64 / calls_per_sec);
        let workers = (0..apps)
            .map(|i| {
                let (stop, counts, sock) = (stop.clone(), counts.clone(), sock.clone());
                std::thread::spawn(move || {
                    let mut conn = BufReader::new(UnixStream::connect(&sock).expect("connecting to havipd's socket"));
                    let app = format!("load{i}");
                    let request = format!("{{\"app\":\"{app}\",\"service_port\":80,\"instance_port\":{}}}", 9000 + i);
                    let mut next = Instant::now();
                    let mut holding = false;
                    while !stop.load(Ordering::Relaxed) {
                        let r = if holding { call(&mut conn, "DELETE", &format!("/v1/vips/{app}"), "") } else { call(&mut conn, "POST", "/v1/vips", &request) };
                        match (holding, r) {
                            (false, Ok((201, _))) => {
                                counts[0].fetch_add(1, Ordering::Relaxed);
                                holding = true;
                            }
                            (true, Ok((200, _))) => {
                                counts[1].fetch_add(1, Ordering::Relaxed);
                                holding = false;
                            }
                            (_, Ok(_)) => {
                                counts[2].fetch_add(1, Ordering::Relaxed);
                            }
                            (_, Err(_)) => {
                                counts[2].fetch_add(1, Ordering::Relaxed);
                                // A broken connection: open a new one.
                                match UnixStream::connect(&sock) {
                                    Ok(s) => conn = BufReader::new(s),
                                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                                }
                            }
                        }
                        next += every;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                    if holding {
                        let _ = call(&mut conn, "DELETE", &format!("/v1/vips/{app}"), "");
                    }
                })
            })
            .collect();
        Self { stop, workers, counts, started: Instant::now() }
    }

    /// The counts so far.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            granted: self.counts[0].load(Ordering::Relaxed),
            released: self.counts[1].load(Ordering::Relaxed),
            failed: self.counts[2].load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Stops the applications (each releases what it holds) and returns the counts.
    pub fn finish(self) -> LoadReport {
        let r = self.report();
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.join();
        }
        r
    }
}
