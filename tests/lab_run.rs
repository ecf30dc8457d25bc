//! The cluster lab that `cargo xtask run` starts (`src/bin/havip-cluster-lab.rs`), run as
//! a newcomer runs it: three nodes, three etcd members, failures injected live. It must
//! show the failovers, report no moment of two owners, and leave nothing behind: not at
//! its end, and not when the process that started it dies.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
    thread::sleep,
    time::{Duration, Instant},
};

/// The two tests each start a whole lab: one at a time.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn lab_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_havip-cluster-lab"));
    // The lab finds havipd where the tests do.
    c.env("HAVIP_BIN_DIR", havip_tests::bin("havipd").parent().unwrap());
    c
}

/// What a lab of process `pid` leaves if it does not clean up: its namespaces, run
/// directory and etcd data (all named after `c<pid>x`).
fn leftovers(pid: u32) -> Vec<String> {
    let id = format!("c{}x", pid % 100_000);
    let mut left: Vec<String> = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
        .lines()
        .filter(|l| l.contains(&format!("hv-{id}")))
        .map(|l| format!("namespace {l}"))
        .collect();
    for dir in ["/run/havip-test", "/dev/shm"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&id) || name.starts_with(&format!("havip-test-{id}")) {
                left.push(format!("{dir}/{name}"));
            }
        }
    }
    let procs =
        String::from_utf8_lossy(&Command::new("pgrep").args(["-af", &format!("havip-test-{id}|/run/havip-test/{id}")]).output().unwrap().stdout).to_string();
    left.extend(procs.lines().map(|l| format!("process {l}")));
    left
}

fn wait_clean(pid: u32, within: Duration) {
    let t = Instant::now();
    while !leftovers(pid).is_empty() {
        assert!(t.elapsed() < within, "the lab of process {pid} left behind: {:#?}", leftovers(pid));
        sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_lab_fails_over_reports_no_two_owners_and_cleans_up() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    // Failures at 5 s (the owner of the first VIP crashes) and 10 s (the owner of the
    // second loses its cables), each undone 2.5 s later.
    let out = lab_command().args(["--duration", "14", "--fail-every", "5", "--hold-down-ms", "1000"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the lab failed ({}):\n{text}", out.status);
    for want in [
        "[lab] application `shop` asked n1 for a VIP",
        "[lab] application `blog` asked n2 for a VIP",
        "FAILURE: n1 crashed: havipd SIGKILLed and its cables pulled",
        "cut off the network: both cables out",
        "n1 back: cables in, havipd started",
        "<- failover",
        "moments two nodes answered for one VIP: none",
        "[lab] clean",
    ] {
        assert!(text.contains(want), "the lab's output lacks `{want}`:\n{text}");
    }
    // Every VIP was answered to the end: each final-report row has answers.
    let report = text.split("[lab] stopping: final report").nth(1).expect("no final report");
    let rows: Vec<&str> = report.lines().filter(|l| l.starts_with("198.18.") || l.starts_with("2001:db8:")).collect();
    assert_eq!(rows.len(), 6, "four configured VIPs and two granted ones in the report:\n{report}");
    for row in rows {
        let answered: u64 = row.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(answered > 1000, "a VIP was hardly answered: {row}");
    }
    wait_clean(out_pid(&text), Duration::from_secs(5));
}

/// The lab's pid, from the run directory it prints (`/run/havip-test/c<pid>x0/...`).
fn out_pid(text: &str) -> u32 {
    let dir = text.split("/run/havip-test/c").nth(1).expect("no run directory in the output");
    dir.split('x').next().and_then(|p| p.parse().ok()).expect("no pid in the run directory")
}

#[test]
fn the_lab_cleans_up_when_the_process_that_started_it_is_killed() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    // A parent as `cargo xtask run` is: it starts the lab and waits; then it is SIGKILLed.
    let bin_dir = havip_tests::bin("havipd").parent().unwrap().to_string_lossy().to_string();
    let lab = env!("CARGO_BIN_EXE_havip-cluster-lab");
    let mut parent = Command::new("sh")
        .args(["-c", &format!("HAVIP_BIN_DIR={bin_dir} {lab} --fail-every 0 & echo $!; wait")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Everything the lab prints, read on a thread so it never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut stdout = parent.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).to_string()).is_err() {
                break;
            }
        }
    });
    // The lab's pid first (from the shell), then its rounds once every node serves.
    let mut seen = String::new();
    let t = Instant::now();
    while !seen.contains("── ") {
        assert!(t.elapsed() < Duration::from_secs(60), "the lab never printed a round:\n{seen}");
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(chunk) => seen += &chunk,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("the lab's output ended early ({e}):\n{seen}"),
        }
    }
    let pid: u32 = seen.lines().next().and_then(|l| l.trim().parse().ok()).expect("the lab's pid");
    assert!(!leftovers(pid).is_empty(), "the lab of process {pid} runs but nothing of it is seen: the check below would prove nothing");
    parent.kill().unwrap();
    parent.wait().unwrap();
    wait_clean(pid, Duration::from_secs(20));
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(5), "the lab (process {pid}) still runs after cleaning up");
        sleep(Duration::from_millis(100));
    }
    // Its output ends with the lab: read to the end.
    let rest: String = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok()).collect();
    assert!((seen + &rest).contains("[lab] clean"), "the lab did not say it cleaned up");
}
