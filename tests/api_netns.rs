//! The application API with a real havipd: pool VIPs requested, served (real TCP through
//! the remap to an unmodified application), listed and released over HTTP on the control
//! socket; bad requests and conflicts refused with a clear 4xx and nothing changed; 100
//! concurrent requests never share an exclusive VIP; allocations survive a restart. Its
//! security: the socket never exists with a wider mode than 0660 (even under umask 000), a
//! token file others may read is refused before anything is applied, TCP needs the bearer
//! token, and a non-loopback TCP address is served with a warning. A request past a map's capacity
//! is refused (409) naming the limit, with nothing changed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use havip_tests::{
    topology::{spawn_in, Topology},
    traffic::echo_instance,
};
use havip_user::{
    api::{client::call, socket_path},
    kernel::netns::Netns,
    node::state::State,
};
use serde_json::{json, Value};

/// `n` pool VIPs 198.18.100.10.. on eth0 (routed to the server by the router).
fn pool(n: u8, reserve: usize) -> String {
    let mut s = format!("[pool]\nreserve = {reserve}\n");
    for i in 0..n {
        s += &format!("[[vip]]\naddress = \"198.18.100.{}\"\npool = true\n", 10 + i);
    }
    s
}

fn start(body: &str) -> Topology {
    let mut t = Topology::new();
    t.write_config(body);
    t.start_daemon();
    t
}

fn request(t: &Topology, body: Value) -> (u16, Value) {
    call(&t.run_dir, "POST", "/v1/vips", Some(body)).unwrap()
}

fn list(t: &Topology) -> Value {
    let (status, v) = call(&t.run_dir, "GET", "/v1/vips", None).unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// Does vip:port answer a TCP echo from the client?
fn echoes(t: &Topology, vip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{vip}:{port}").parse().unwrap();
    spawn_in(&t.cli, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    })
    .join()
    .unwrap()
}

#[test]
fn a_requested_vip_serves_the_unmodified_application_until_released() {
    let t = start(&pool(3, 0));
    // The application listens on its own port and is never touched.
    echo_instance(&t.srv, 9000, b"", Arc::new(AtomicBool::new(false)));
    let (status, v) = request(&t, json!({ "app": "shop", "service_port": 80, "instance_port": 9000, "targets": ["198.18.2.2"] }));
    assert_eq!(status, 201, "{v}");
    let vip = v["vip"].as_str().unwrap().to_string();
    assert_eq!(v["nic"], "eth0");
    assert!(v["why"].as_str().unwrap().contains("pool VIP"), "{v}");
    assert!(echoes(&t, &vip, 80), "clients do not reach the application at {vip}:80");
    assert!(t.server_lo_addresses().contains(&vip));
    let l = list(&t);
    assert_eq!(l["held"][0]["allocation"]["app"], "shop");
    assert_eq!(l["free"].as_array().unwrap().len(), 2);

    // The CLI speaks the same API.
    let out = t.havip(&["vip", "list"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("shop"), "{out:?}");

    // Release: the address and every map entry go; the application is unreachable there.
    let (status, v) = call(&t.run_dir, "DELETE", "/v1/vips/shop", None).unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(!t.server_lo_addresses().contains(&vip), "the address stayed");
    let stats = t.stats();
    assert!(stats["vips"].as_array().unwrap().iter().all(|x| x["vip"] != vip.as_str()), "the VIP stayed in the maps: {stats}");
    assert!(!echoes(&t, &vip, 80));
    assert_eq!(list(&t)["free"].as_array().unwrap().len(), 3);
    let (status, _) = call(&t.run_dir, "DELETE", "/v1/vips/shop", None).unwrap();
    assert_eq!(status, 404, "releasing twice");
}

#[test]
fn bad_requests_and_conflicts_get_a_clear_4xx_and_change_nothing() {
    let t = start(&(pool(2, 1) + "[class.gold]\n"));
    let ok = json!({ "app": "a", "service_port": 80, "instance_port": 9000 });
    assert_eq!(request(&t, ok.clone()).0, 201);
    let before = list(&t);
    let stats_before = t.stats()["vips"].as_array().unwrap().len();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({ "app": "b", "service_port": 80, "instance_port": 9000, "colour": "red" }), 400, "colour"),
        (json!({ "app": "b", "service_port": 80, "instance_port": 9000, "targets": ["198.18.2.300"] }), 400, "targets[0]"),
        (json!({ "app": "b", "service_port": 80, "instance_port": 9000, "targets": ["224.0.0.1"] }), 400, "targets[0]"),
        (json!({ "app": "b", "service_port": 0, "instance_port": 9000 }), 400, "service_port"),
        (json!({ "app": "b", "service_port": 80, "instance_port": 80 }), 400, "instance_port"),
        (json!({ "app": "b c", "service_port": 80, "instance_port": 9000 }), 400, "app"),
        (json!({ "app": "b", "service_port": 80, "instance_port": 9000, "class": "silver" }), 400, "class"),
        (json!({ "service_port": 80, "instance_port": 9000 }), 400, "app"),
        // The same app and port again.
        (ok.clone(), 409, "already holds"),
        // One free VIP left and a reserve of 1.
        (json!({ "app": "b", "service_port": 80, "instance_port": 9000 }), 409, "reserve"),
    ];
    for (body, status, needle) in cases {
        let (got, v) = request(&t, body.clone());
        assert_eq!(got, status, "{body}: {v}");
        let err = v["error"].as_str().unwrap_or_default();
        assert!(err.contains(needle), "{body}: the error does not name `{needle}`: {err}");
    }
    let (got, v) = call(&t.run_dir, "POST", "/v1/vips", None).unwrap();
    assert_eq!(got, 400, "empty body: {v}");
    assert_eq!(list(&t), before, "a refused request changed the pool");
    assert_eq!(t.stats()["vips"].as_array().unwrap().len(), stats_before);
    let out = t.havip(&["vip", "request", "--app", "b", "--service-port", "80", "--instance-port", "9000"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("409"), "{out:?}");
}

#[test]
fn a_hundred_concurrent_requests_never_share_an_exclusive_vip() {
    let t = Arc::new(start(&pool(20, 0)));
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let run_dir = t.run_dir.clone();
            std::thread::spawn(move || {
                call(&run_dir, "POST", "/v1/vips", Some(json!({ "app": format!("app{i}"), "service_port": 80, "instance_port": 9000 }))).unwrap()
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let granted: Vec<String> = results.iter().filter(|(s, _)| *s == 201).map(|(_, v)| v["vip"].as_str().unwrap().to_string()).collect();
    let refused = results.iter().filter(|(s, v)| *s == 409 && v["error"].as_str().unwrap().contains("exhausted")).count();
    assert_eq!(granted.len(), 20, "every pool VIP is granted once");
    assert_eq!(refused, 80, "the rest are refused with the reason: {:?}", results.iter().find(|(s, _)| *s != 201));
    let distinct: std::collections::BTreeSet<&String> = granted.iter().collect();
    assert_eq!(distinct.len(), 20, "an exclusive VIP was handed out twice");
    assert_eq!(list(&t)["held"].as_array().unwrap().len(), 20);
}

#[test]
fn allocations_survive_a_controller_crash_and_restart() {
    let mut t = start(&pool(3, 0));
    echo_instance(&t.srv, 9000, b"", Arc::new(AtomicBool::new(false)));
    let (status, v) = request(&t, json!({ "app": "shop", "exclusive": false, "service_port": 80, "instance_port": 9000 }));
    assert_eq!(status, 201, "{v}");
    let vip = v["vip"].as_str().unwrap().to_string();
    let before = list(&t);
    t.stop_daemon(libc::SIGKILL);
    assert!(echoes(&t, &vip, 80), "traffic stopped with the controller");
    t.start_daemon();
    assert_eq!(list(&t)["held"], before["held"], "allocations lost on restart");
    assert!(echoes(&t, &vip, 80));
    // A second shared request joins the same VIP on other ports (its own instance port:
    // one instance port on a VIP maps back to one service port).
    echo_instance(&t.srv, 9001, b"", Arc::new(AtomicBool::new(false)));
    let (status, v) = request(&t, json!({ "app": "blog", "exclusive": false, "service_port": 81, "instance_port": 9001 }));
    assert_eq!((status, v["vip"].as_str()), (201, Some(vip.as_str())), "{v}");
    let (status, _) = call(&t.run_dir, "DELETE", &format!("/v1/vips/shop?vip={vip}"), None).unwrap();
    assert_eq!(status, 200);
    assert!(t.server_lo_addresses().contains(&vip), "still held by blog");
    assert!(echoes(&t, &vip, 81) && !echoes(&t, &vip, 80));
}

/// `GET /v1/vips` over TCP to `addr` from namespace `ns`, with `Authorization: Bearer
/// <auth>` if given: the raw response.
fn get_tcp(ns: &Netns, addr: &'static str, auth: Option<&'static str>) -> String {
    spawn_in(ns, move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let auth = auth.map(|a| format!("Authorization: Bearer {a}\r\n")).unwrap_or_default();
        write!(s, "GET /v1/vips HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap()
}

/// The token file `s3cret-token` with `mode`, in the run directory (removed with it).
fn token_file(t: &Topology, mode: u32) -> PathBuf {
    let p = t.run_dir.join("api.token");
    std::fs::write(&p, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn api_tcp(listen: &str, token: &Path) -> String {
    format!("[api]\nlisten = \"{listen}\"\ntoken_file = \"{}\"\n", token.display())
}

#[test]
fn the_socket_is_group_accessible_and_tcp_needs_the_bearer_token() {
    let mut t = Topology::new();
    let token = token_file(&t, 0o600);
    // `daemon` (gid 1) is a group every Debian-like system has.
    t.write_config(&format!("{}socket_group = \"daemon\"\n{}", api_tcp("127.0.0.1:7946", &token), pool(1, 0)));
    t.start_daemon();
    let meta = std::fs::metadata(socket_path(&t.run_dir)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 1, "the socket is not the configured group's");
    let get = |auth| get_tcp(&t.srv, "127.0.0.1:7946", auth);
    assert!(get(None).starts_with("HTTP/1.1 401"), "{}", get(None));
    assert!(get(Some("wrong")).starts_with("HTTP/1.1 401"));
    assert!(get(Some("s3cret-toke")).starts_with("HTTP/1.1 401"), "a prefix of the token was accepted");
    let ok = get(Some("s3cret-token"));
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("198.18.100.10"), "{ok}");
    assert!(!t.daemon_log().contains("not a loopback"), "a loopback address was warned about:\n{}", t.daemon_log());
}

/// Events on the entries of one directory, from inotify: (name, mask), in order.
struct DirEvents(i32);

impl DirEvents {
    fn watch(dir: &Path) -> Self {
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB) };
        assert!(wd >= 0, "inotify_add_watch {}: {}", dir.display(), std::io::Error::last_os_error());
        DirEvents(fd)
    }

    /// Every event queued so far.
    fn drain(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            // struct inotify_event: wd, mask, cookie, len (4 bytes each), then len bytes of
            // NUL-padded name.
            let mut at = 0;
            while at < n as usize {
                let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
                let (mask, len) = (word(4), word(12) as usize);
                assert_eq!(mask & libc::IN_Q_OVERFLOW, 0, "inotify queue overflow: events lost");
                let name = String::from_utf8_lossy(&buf[at + 16..at + 16 + len]).trim_end_matches('\0').to_string();
                out.push((name, mask));
                at += 16 + len;
            }
        }
    }
}

impl Drop for DirEvents {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn the_socket_never_exists_with_a_wider_mode_even_under_umask_000() {
    let mut t = Topology::new();
    t.write_config(&format!("[api]\nsocket_group = \"daemon\"\n{}", pool(1, 0)));
    let events = DirEvents::watch(&t.run_dir);
    // bind(2) under umask 000 creates the socket file with mode 0777.
    t.start_daemon_with(|cmd| {
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            })
        };
    });
    let pid = State::load(&t.run_dir).unwrap().unwrap().pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Umask:\t0000"), "havipd does not run under umask 000:\n{status}");
    let sock = socket_path(&t.run_dir);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "{}", sock.display());
    assert_eq!(meta.gid(), 1, "the socket is not the configured group's");
    // What happened at its path: it appeared (created or moved in) and its mode and owner
    // never changed after (no IN_ATTRIB), so from its first moment it had the mode and
    // group checked above. Bind-then-chmod shows as IN_CREATE followed by IN_ATTRIB: a
    // window in which any local user may connect.
    let seen: Vec<u32> = events.drain().into_iter().filter(|(name, _)| name == "control.sock").map(|(_, mask)| mask).collect();
    assert!(seen.first().is_some_and(|m| m & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0), "control.sock never appeared: {seen:x?}");
    assert!(
        seen.iter().all(|m| m & libc::IN_ATTRIB == 0),
        "control.sock's mode or owner was changed after it appeared (IN_ATTRIB = {:x}): {seen:x?}",
        libc::IN_ATTRIB
    );
    // Nothing is left of the staging, and the socket serves.
    let left: Vec<_> = std::fs::read_dir(&t.run_dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains(".new")).collect();
    assert!(left.is_empty(), "left in the run directory: {left:?}");
    assert_eq!(list(&t)["free"].as_array().unwrap().len(), 1);
}

/// Runs havipd with `args` (plus this node's pin and run directories) and waits for it to
/// exit; one that keeps running (it started instead of refusing) is killed and fails the
/// test.
fn havipd(t: &Topology, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(havip_tests::bin("havipd"))
        .args(args)
        .args(["--pin-path", t.pin_root.to_str().unwrap(), "--run-dir", t.run_dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("havipd {args:?} did not exit: it runs instead of refusing:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_token_file_others_may_read_or_write_is_refused_before_anything_is_applied() {
    let mut t = Topology::new();
    let token = token_file(&t, 0o600);
    t.write_config(&(api_tcp("127.0.0.1:7946", &token) + &pool(1, 0)));
    let config = t.config_path.to_str().unwrap().to_string();
    let fix = format!("chmod 600 {}", token.display());
    for mode in [0o644, 0o640, 0o620, 0o604, 0o602] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = havipd(&t, &["--netns", &t.srv.name, "--config", &config]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mode {mode:o}: havipd started");
        for needle in ["api.token_file", &format!("{mode:04o}"), &fix, "nothing was applied"] {
            assert!(err.contains(needle), "mode {mode:o}: the refusal does not say `{needle}`:\n{err}");
        }
        assert!(!t.pin_root.exists(), "mode {mode:o}: pins were created");
        assert!(!t.ingress_attached(), "mode {mode:o}: an ingress program was attached");
        assert!(!t.server_lo_addresses().contains("198.18.100"), "mode {mode:o}: an address was installed");
        assert!(!socket_path(&t.run_dir).exists(), "mode {mode:o}: the API socket was created");
        // --check-config gives the same verdict.
        let out = havipd(&t, &["--check-config", &config]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("api.token_file") && err.contains(&fix), "mode {mode:o}: --check-config:\n{err}");
    }
    // Private again: havipd starts and TCP serves with the token.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    t.start_daemon();
    assert!(get_tcp(&t.srv, "127.0.0.1:7946", Some("s3cret-token")).starts_with("HTTP/1.1 200"));
    // A reload with the file opened up again is refused, naming the field; nothing changes.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = t.havip(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("api.token_file") && err.contains(&fix), "havip reload:\n{err}");
    let pid = State::load(&t.run_dir).unwrap().unwrap().pid.unwrap();
    let before = State::load(&t.run_dir).unwrap().unwrap().last_apply.unwrap().generation;
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let verdict = loop {
        let a = State::load(&t.run_dir).unwrap().unwrap().last_apply.unwrap();
        if a.generation > before {
            break a;
        }
        assert!(Instant::now() < deadline, "no verdict on the reload");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!verdict.ok && verdict.message.contains("api.token_file") && verdict.message.contains("nothing was applied"), "{verdict:?}");
    assert!(get_tcp(&t.srv, "127.0.0.1:7946", Some("s3cret-token")).starts_with("HTTP/1.1 200"), "the API stopped serving");
}

#[test]
fn a_non_loopback_listen_address_is_served_with_a_warning() {
    let mut t = Topology::new();
    let token = token_file(&t, 0o600);
    // The server's own address on eth0: reachable from the client through the router.
    t.write_config(&(api_tcp("198.18.1.2:7946", &token) + &pool(1, 0)));
    t.start_daemon();
    let log = t.daemon_log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("not a loopback")).collect();
    assert_eq!(warnings.len(), 1, "one warning expected:\n{log}");
    for needle in ["WARN", "api.listen", "198.18.1.2:7946", "clear text", "127.0.0.1"] {
        assert!(warnings[0].contains(needle), "the warning does not say `{needle}`: {}", warnings[0]);
    }
    assert!(get_tcp(&t.cli, "198.18.1.2:7946", None).starts_with("HTTP/1.1 401"));
    assert!(get_tcp(&t.cli, "198.18.1.2:7946", Some("s3cret-token")).starts_with("HTTP/1.1 200"));
}

/// Mappings in the kernel's remap table, as `havip stats` reads them.
fn mappings_in_kernel(t: &Topology) -> usize {
    t.stats()["vips"].as_array().unwrap().iter().map(|v| v["mappings"].as_array().map_or(0, Vec::len)).sum()
}

/// `n` mappings on the configured VIP 198.18.100.9 (designated ports 1-8192 to instance
/// ports 10001-18192, TCP, then UDP from the first), and two pool VIPs.
fn with_mappings(n: u32) -> String {
    let mut body = String::from("[[vip]]\naddress = \"198.18.100.9\"\n");
    for p in 1..=n.div_ceil(2) {
        let protocols = if p + 8192 <= n { r#"["tcp", "udp"]"# } else { r#"["tcp"]"# };
        body +=
            &format!("[[service]]\nname = \"s{p}\"\nport = {p}\nprotocols = {protocols}\ninstance = [{{ vip = \"198.18.100.9\", port = {} }}]\n", 10000 + p);
    }
    body + &pool(2, 0)
}

#[test]
fn a_request_past_the_mapping_capacity_gets_409_naming_the_limit_and_changes_nothing() {
    // The remap tables hold 16384 mappings. The file configures 16383, so one grant fits
    // exactly and the next would not.
    let mut t = start(&with_mappings(16383));
    assert_eq!(mappings_in_kernel(&t), 16383);

    // The 16384th mapping: granted, and it serves (the kernel's table really holds it).
    echo_instance(&t.srv, 9000, b"", Arc::new(AtomicBool::new(false)));
    let (status, v) = request(&t, json!({ "app": "shop", "service_port": 80, "instance_port": 9000 }));
    assert_eq!(status, 201, "{v}");
    let vip = v["vip"].as_str().unwrap().to_string();
    assert!(echoes(&t, &vip, 80), "the mapping at the limit does not serve");
    assert_eq!(mappings_in_kernel(&t), 16384);

    // One more would not fit: refused up front, naming the limit, and nothing changes.
    let before = list(&t);
    let addresses = t.server_lo_addresses();
    let (status, v) = request(&t, json!({ "app": "blog", "service_port": 80, "instance_port": 9001 }));
    assert_eq!(status, 409, "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("16385 mappings") && err.contains("at most 16384") && err.contains("release"), "{err}");
    assert_eq!(list(&t), before, "a refused request changed the pool");
    assert_eq!(t.server_lo_addresses(), addresses, "a refused request changed the addresses");
    assert_eq!(mappings_in_kernel(&t), 16384, "a refused request changed the maps");
    assert!(echoes(&t, &vip, 80));

    // A file that fits alone but not with what `shop` holds: the reload is refused naming
    // the limit, and `shop` keeps its VIP.
    t.write_config(&with_mappings(16384));
    let out = t.havip(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("16385 mappings") && err.contains("at most 16384"), "{out:?}");
    assert_eq!(list(&t), before, "a refused reload changed the pool");
    assert_eq!(mappings_in_kernel(&t), 16384);
    assert!(echoes(&t, &vip, 80));

    // Nor does havipd start with that file: refused before anything is applied, while the
    // pinned dataplane keeps serving `shop`.
    t.stop_daemon(libc::SIGTERM);
    let out = t.havipd_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("16385 mappings") && err.contains("nothing was applied"), "{err}");
    assert_eq!(mappings_in_kernel(&t), 16384);
    assert!(echoes(&t, &vip, 80));
    // With the file it had, it starts and `shop` still holds its VIP.
    t.write_config(&with_mappings(16383));
    t.start_daemon();
    assert_eq!(list(&t)["held"], before["held"]);
}
