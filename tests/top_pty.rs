//! `havip top` in an 80x24 pseudo-terminal against the lab: it shows a row per VIP with its
//! NIC and measured RTT, the moves with their reasons once a failure is injected, quits on
//! `q` with status 0 and gives the terminal back (main screen, cursor shown).

use std::{
    fs::File,
    io::{Read, Write},
    num::NonZeroU16,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const PIN: &str = "/sys/fs/bpf/havip-lab";
const RUN: &str = "/run/havip-lab";
/// The lab's VIPs (see havip-user/src/lab.rs).
const VIPS: [&str; 4] = ["198.18.20.10", "2001:db8:20::10", "198.18.20.11", "2001:db8:20::11"];
const ROWS: u16 = 24;
const COLS: u16 = 80;

/// Ends a child however the test ends: SIGTERM first (the lab removes everything it made
/// then), SIGKILL if it does not exit within `grace`.
struct Kill {
    child: Option<Child>,
    grace: Duration,
}

impl Drop for Kill {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + self.grace;
        while Instant::now() < end {
            if matches!(c.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A pseudo-terminal of the given size: (master, slave).
fn openpty(rows: u16, cols: u16) -> (File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // Only the slave goes to havip top.
    assert_eq!(unsafe { libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC) }, 0);
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lab_is_serving() -> bool {
    havip_user::kernel::pins::PinLayout::new(PIN).exists()
        && havip_user::node::state::State::load(Path::new(RUN)).ok().flatten().is_some_and(|s| s.last_apply.is_some_and(|a| a.ok))
}

/// The screen line that is the table row of `vip`.
fn row<'a>(screen: &'a str, vip: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.split_whitespace().next() == Some(vip))
}

#[test]
fn top_shows_the_labs_vips_and_moves_in_a_pty() {
    havip_tests::require_root();
    let log = std::env::temp_dir().join(format!("havip-top-pty-lab-{}.log", std::process::id()));
    let lab_log = File::create(&log).unwrap();
    let mut lab = Kill {
        child: Some(
            Command::new(havip_tests::bin("havip"))
                .args(["lab", "--duration", "60", "--every", "1", "--fail-every", "4"])
                .stdin(Stdio::null())
                .stdout(lab_log.try_clone().unwrap())
                .stderr(lab_log)
                .spawn()
                .unwrap(),
        ),
        grace: Duration::from_secs(20),
    };
    let lab_output = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !lab_is_serving() {
        if let Some(status) = lab.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the lab exited ({status}) before serving:\n{}", lab_output());
        }
        assert!(Instant::now() < deadline, "the lab did not come up within 40 s:\n{}", lab_output());
        std::thread::sleep(Duration::from_millis(100));
    }

    let (master, slave) = openpty(ROWS, COLS);
    let mut cmd = Command::new(havip_tests::bin("havip"));
    cmd.args(["--pin-path", PIN, "--run-dir", RUN, "top"])
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // A session of its own with the pty as its controlling terminal, as a login has.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut top = Kill { child: Some(cmd.spawn().unwrap()), grace: Duration::from_secs(2) };
    drop(cmd); // closes the parent's copies of the slave: reads end when top exits

    let parser = Arc::new(Mutex::new(vt100::Parser::new(NonZeroU16::new(ROWS).unwrap(), NonZeroU16::new(COLS).unwrap(), 0)));
    let reader = {
        let (parser, mut master) = (parser.clone(), master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // EIO once the last slave fd is closed.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser.lock().unwrap().process(&buf[..n]);
            }
        })
    };
    // Every row, blank ones too: line i is row i.
    let screen = || {
        let p = parser.lock().unwrap();
        p.screen().rows(0, p.screen().size().1.get()).collect::<Vec<_>>().join("\n")
    };

    // Let it run a few seconds, until every VIP has a row with a measured RTT and a move
    // caused by the injected failure is listed.
    let started = Instant::now();
    let shown = loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = screen();
        let rows_ready = VIPS.iter().all(|v| row(&s, v).is_some_and(|r| r.split_whitespace().nth(3).is_some_and(|p50| p50.parse::<f64>().is_ok())));
        if started.elapsed() > Duration::from_secs(4) && rows_ready && s.contains("link_down") {
            break s;
        }
        if let Some(status) = top.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("havip top exited ({status}) on its own; screen:\n{s}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            break s;
        }
    };
    let ran_for = started.elapsed();

    // A resize (the kernel signals it): the screen is laid out again for the new size.
    let (big_rows, big_cols) = (30u16, 100u16);
    {
        let mut p = parser.lock().unwrap();
        p.set_size(NonZeroU16::new(big_rows).unwrap(), NonZeroU16::new(big_cols).unwrap());
        let ws = libc::winsize { ws_row: big_rows, ws_col: big_cols, ws_xpixel: 0, ws_ypixel: 0 };
        assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0, "TIOCSWINSZ");
    }
    let resized_at = Instant::now();
    let resized = loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = screen();
        let lines: Vec<&str> = s.lines().collect();
        let laid_out = lines.len() == big_rows as usize
            && lines[big_rows as usize - 1].contains("q quit")
            && lines[big_rows as usize - 7].contains("Recent moves")
            && lines[0].chars().count() == big_cols as usize
            && lines[0].ends_with('─');
        if laid_out || resized_at.elapsed() > Duration::from_secs(5) {
            break laid_out.then_some(()).ok_or(s);
        }
    };

    master.try_clone().unwrap().write_all(b"q").unwrap();
    let quit_at = Instant::now();
    let status = loop {
        if let Some(status) = top.child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(quit_at.elapsed() < Duration::from_secs(3), "havip top did not quit within 3 s of `q`; screen:\n{}", screen());
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let (alternate, cursor_hidden) = {
        let p = parser.lock().unwrap();
        (p.screen().alternate_screen(), p.screen().hide_cursor())
    };
    drop(lab);

    let context = format!("after {ran_for:?}, the screen was:\n{shown}\nlab output: {}", log.display());
    assert!(status.success(), "havip top exited with {status}; {context}");
    if let Err(s) = resized {
        panic!("not laid out again for {big_cols}x{big_rows} after a resize; the screen was:\n{s}");
    }
    assert!(!alternate && !cursor_hidden, "the terminal was not restored (alternate screen {alternate}, cursor hidden {cursor_hidden})");
    let lines: Vec<&str> = shown.lines().collect();
    assert!(lines.first().is_some_and(|l| l.contains("havip top") && l.contains("4 VIP(s)") && l.contains("havipd ")), "title: {context}");
    assert!(lines.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["VIP", "NIC", "SCORE", "P50ms", "P99ms", "RTT~", "LOSS%", "IN/s", "OUT/s", "CLASS"]), "header: {context}");
    for vip in VIPS {
        let r = row(&shown, vip).unwrap_or_else(|| panic!("no row for {vip}; {context}"));
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert!(matches!(cols[1].trim_end_matches('*'), "a0" | "b0"), "{vip} is not on a lab NIC: {r:?}; {context}");
        assert!(cols[3].parse::<f64>().is_ok() && cols[4].parse::<f64>().is_ok(), "{vip} has no measured RTT: {r:?}; {context}");
    }
    // At least one VIP is ranked (a number): the others may be mid-move.
    assert!(VIPS.iter().any(|v| row(&shown, v).unwrap().split_whitespace().nth(2).unwrap().parse::<f64>().is_ok()), "no score; {context}");
    let moves = lines.iter().position(|l| l.contains("Recent moves")).unwrap_or_else(|| panic!("no moves pane; {context}"));
    assert_eq!(moves, (ROWS - 7) as usize, "the moves pane is not at the bottom; {context}");
    let failover = lines[moves + 1..].iter().find(|l| l.contains("link_down")).unwrap_or_else(|| panic!("no move with reason link_down; {context}"));
    let f: Vec<&str> = failover.split_whitespace().collect();
    assert!(
        f.len() == 6 && f[0].len() == 8 && f[0].matches(':').count() == 2 && VIPS.contains(&f[1]) && f[3] == "->" && f[2] != f[4],
        "a move line is `HH:MM:SS VIP FROM -> TO REASON`: {failover:?}; {context}"
    );
    assert!(lines.last().is_some_and(|l| l.contains("q quit") && l.contains("sort: VIP")), "footer; {context}");
    let _ = std::fs::remove_file(&log);
}
