//! havipd's life on a node: invalid configurations are refused whole before anything is
//! applied; reload applies only the difference without detaching; a crash or restart does
//! not interrupt traffic; `havip down` removes everything.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use havip_tests::{
    topology::{spawn_in, Topology, VIP1_V4, VIP1_V6, VIP2_V4},
    traffic::{echo_instance, Stream},
};
use havip_user::kernel::pins::PinLayout;

fn vip_block(vips: &[&str]) -> String {
    vips.iter().map(|v| format!("[[vip]]\naddress = \"{v}\"\n")).collect()
}

fn service(name: &str, port: u16, instances: &[(&str, u16)]) -> String {
    let mut s = format!("[[service]]\nname = \"{name}\"\nport = {port}\n");
    for (vip, p) in instances {
        s += &format!("[[service.instance]]\nvip = \"{vip}\"\nport = {p}\n");
    }
    s
}

/// Connects to vip:80 from the client namespace and returns the instance's name.
fn who_answers(t: &Topology, vip: &str) -> Result<String, String> {
    let addr = SocketAddr::new(vip.parse::<IpAddr>().unwrap(), 80);
    spawn_in(&t.cli, move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
    .join()
    .unwrap()
}

/// `n` distinct peer addresses, as a TOML array's items.
fn targets(n: u32) -> String {
    (0..n).map(|i| format!("\"198.19.{}.{}\"", i >> 8, i & 0xff)).collect::<Vec<_>>().join(", ")
}

fn havipd(args: &[&str]) -> std::process::Output {
    Command::new(havip_tests::bin("havipd")).args(args).output().unwrap()
}

#[test]
fn invalid_configurations_are_refused_before_anything_is_applied() {
    let mut t = Topology::new();
    let good = vip_block(&[VIP1_V4]) + &service("web", 80, &[(VIP1_V4, 8081)]);
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown field", good.replace("port = 8081", "prot = 8081"), "service[0].instance[0]"),
        ("bad address", good.replace(VIP1_V4, "198.18.100.300"), "vip[0].address"),
        ("instance on an unknown VIP", good.replace(&format!("vip = \"{VIP1_V4}\""), "vip = \"198.18.100.77\""), "service[0].instance[0].vip"),
        ("port out of range", good.replace("port = 80\n", "port = 99999\n"), "service[0].port"),
        ("NIC missing on this node", good.clone() + "[[nic]]\nname = \"eth9\"\n", "nic[1].name"),
        ("unknown class", good.replace(&format!("address = \"{VIP1_V4}\""), &format!("address = \"{VIP1_V4}\"\nclass = \"gold\"")), "vip[0].class"),
        ("CPU that does not exist", good.clone() + "[class.gold]\ncpus = [4096]\n", "class.gold.cpus[0]"),
        ("rate of zero", good.clone() + "[class.gold]\nrate = \"0kbit\"\n", "class.gold.rate"),
        ("ceiling below the rate", good.clone() + "[class.gold]\nrate = \"10mbit\"\nceil = \"1mbit\"\n", "class.gold.ceil"),
        // Three probe intervals of this overflow u64.
        ("probe interval beyond any sense", good.clone() + "[probe]\ninterval_ms = 9223372036854775807\n", "probe.interval_ms"),
        // One NIC and 4097 targets: one probe path more than the kernel has probe slots.
        (
            "more probe paths than probe slots",
            good.replace(&format!("address = \"{VIP1_V4}\""), &format!("address = \"{VIP1_V4}\"\ntargets = [{}]", targets(4097))),
            "vip[*].targets",
        ),
    ];
    for (what, body, field) in cases {
        t.write_config(&body);
        // --check-config gives the same verdict without a node (first: a daemon that
        // accepted the file would not return).
        let out = havipd(&["--check-config", "--config", t.config_path.to_str().unwrap()]);
        if field != "nic[1].name" {
            assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(field), "{what}: --check-config");
        }
        let out = havipd(&[
            "--netns", &t.srv.name, "--config", t.config_path.to_str().unwrap(),
            "--pin-path", t.pin_root.to_str().unwrap(), "--run-dir", t.run_dir.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: havipd accepted it");
        assert!(err.contains(field), "{what}: error does not name `{field}`:\n{err}");
        assert!(err.contains("nothing was applied"), "{what}: error does not say nothing was applied:\n{err}");
        assert!(!t.pin_root.exists(), "{what}: pins were created");
        assert!(!t.ingress_attached(), "{what}: an ingress program was attached");
        assert!(!t.server_lo_addresses().contains("198.18.100"), "{what}: an address was installed");
    }
    // And the good one is accepted.
    t.write_config(&good);
    t.start_daemon();
    assert!(t.ingress_attached());
}

#[test]
fn reload_applies_the_difference_without_detaching_and_refuses_bad_files() {
    let mut t = Topology::new();
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"A\n", stop.clone());
    echo_instance(&t.srv, 8082, b"B\n", stop.clone());
    t.write_config(&(vip_block(&[VIP1_V4]) + &service("web", 80, &[(VIP1_V4, 8081)])));
    t.start_daemon();
    assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A");
    assert!(who_answers(&t, VIP2_V4).is_err(), "VIP2 is not configured yet");
    let links = t.links();
    let vip1_packets = t.vip_stats(VIP1_V4)["rx"]["packets"].as_u64().unwrap();

    // Add a VIP and an instance.
    t.write_config(&(vip_block(&[VIP1_V4, VIP2_V4]) + &service("web", 80, &[(VIP1_V4, 8081), (VIP2_V4, 8082)])));
    let out = t.havip(&["reload"]);
    assert!(out.status.success(), "reload failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 VIP(s) added"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(who_answers(&t, VIP2_V4).unwrap(), "B");
    assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A");
    assert_eq!(t.links(), links, "reload must not detach or replace the programs");
    assert!(t.vip_stats(VIP1_V4)["rx"]["packets"].as_u64().unwrap() > vip1_packets, "VIP1 counters were reset");

    // A bad file is refused whole: nothing changes.
    let before = t.stats();
    std::fs::write(&t.config_path, "[[vip]]\naddress = \"not an address\"\n").unwrap();
    let out = t.havip(&["reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vip[0].address"), "{}", String::from_utf8_lossy(&out.stderr));
    // The daemon refuses it too (a SIGHUP behind the CLI's back).
    let pid = havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap().pid.unwrap();
    let gen = havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap().generation;
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = loop {
        let s = havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap();
        if s.generation > gen {
            break s;
        }
        assert!(Instant::now() < deadline, "havipd did not handle SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = state.last_apply.unwrap();
    assert!(!status.ok && status.message.contains("vip[0].address"), "{status:?}");
    assert_eq!(t.stats()["vips"].as_array().unwrap().len(), before["vips"].as_array().unwrap().len());
    assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A");
    assert_eq!(who_answers(&t, VIP2_V4).unwrap(), "B");

    // Remove VIP1: its mapping and its address go, VIP2 is untouched.
    t.write_config(&(vip_block(&[VIP2_V4]) + &service("web", 80, &[(VIP2_V4, 8082)])));
    let out = t.havip(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!t.server_lo_addresses().contains(VIP1_V4), "VIP1's address is still installed");
    assert!(who_answers(&t, VIP1_V4).is_err());
    assert_eq!(who_answers(&t, VIP2_V4).unwrap(), "B");
    assert_eq!(t.links(), links);
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn traffic_flows_through_controller_crash_and_restart() {
    let mut t = Topology::new();
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"A\n", stop.clone());
    t.write_config(&(vip_block(&[VIP1_V4, VIP1_V6]) + &service("web", 80, &[(VIP1_V4, 8081), (VIP1_V6, 8081)])));
    t.start_daemon();
    let links = t.links();

    // Long-lived streams, every chunk echoed back and checked.
    let streams: Vec<Stream> = [VIP1_V4, VIP1_V6].into_iter().map(|vip| Stream::start(&t.cli, vip, true)).collect();
    let progress = |what: &str| {
        for s in &streams {
            s.progress(what);
        }
    };
    progress("before the crash");
    t.stop_daemon(libc::SIGKILL);
    progress("while havipd is dead");
    // New connections work too, and stats read while no controller runs.
    assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A");
    assert!(t.vip_stats(VIP1_V4)["rx"]["remapped"].as_u64().unwrap() > 0);
    let counted = t.vip_stats(VIP1_V4)["rx"]["packets"].as_u64().unwrap();
    t.start_daemon();
    progress("after the restart");
    t.stop_daemon(libc::SIGTERM);
    progress("after an orderly stop");
    t.start_daemon();
    progress("after the second restart");

    let now = t.links();
    for ((old_link, old_prog), (new_link, new_prog)) in links.iter().zip(&now) {
        assert_eq!(old_link, new_link, "the pinned link was replaced instead of adopted");
        assert_ne!(old_prog, new_prog, "the restarted controller did not swap in its programs");
    }
    assert!(t.vip_stats(VIP1_V4)["rx"]["packets"].as_u64().unwrap() > counted, "counters were reset by the restart");
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        let sent = s.finish();
        assert!(sent > 100 * 4096, "stream moved only {sent} bytes");
    }
    assert_eq!(t.checksum_errors(), 0);
}

#[test]
fn down_removes_everything_havip_installed() {
    let mut t = Topology::new();
    t.write_config(&(vip_block(&[VIP1_V4, VIP1_V6]) + &service("web", 80, &[(VIP1_V4, 8081)])));
    t.start_daemon();
    let links: Vec<u32> = t.links().into_iter().map(|(l, _)| l).collect();
    assert!(t.server_lo_addresses().contains(VIP1_V4) && t.server_lo_addresses().contains(VIP1_V6));
    let out = t.havip(&["down"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped havipd"));
    assert!(!t.pin_root.exists(), "pins left behind");
    assert!(!t.ingress_attached(), "an ingress program is still attached");
    let live: Vec<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    for id in links {
        assert!(!live.contains(&id), "link {id} still exists after down");
    }
    let lo = t.server_lo_addresses();
    assert!(!lo.contains(VIP1_V4) && !lo.contains(VIP1_V6), "VIP addresses left: {lo}");
    assert!(havip_user::node::state::State::load(&t.run_dir).unwrap().is_none(), "state file left");
    // The CLI now says clearly that nothing is there.
    let out = t.havip(&["stats"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("start havipd first"));
}

/// What `stop, alter, start` leaves: each check below must read the same before and after a
/// refused start. Ids tell a map or program that was replaced from one that was kept.
#[derive(Debug, PartialEq)]
struct PinnedState {
    links: Vec<(u32, u32)>,
    /// (file, map id) of every pinned map, and (file, program id) of every pinned program.
    maps: Vec<(String, u32)>,
    progs: Vec<(String, u32)>,
    layout_version: Option<u32>,
    cpumap_id: u32,
    bindings: Vec<havip_common::Binding>,
    vips: Vec<(havip_common::VipKey, havip_common::VipInfo)>,
    nics: Vec<(u32, havip_common::NicInfo)>,
    lo: String,
    state: (Option<u32>, u64),
}

fn pinned_state(t: &Topology) -> PinnedState {
    use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
    use havip_common::maps as m;
    let pins = PinLayout::new(&t.pin_root);
    let ids = |dir: std::path::PathBuf, id: &dyn Fn(&std::path::Path) -> u32| {
        let mut v: Vec<(String, u32)> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), id(&p))).collect();
        v.sort();
        v
    };
    let open = |name: &str| Map::from_map_data(MapData::from_pin(pins.map(name)).unwrap()).unwrap();
    // As the test left it: maybe removed.
    let layout_version = pins.map(m::LAYOUT).exists().then(|| Array::<_, u32>::try_from(open(m::LAYOUT)).unwrap().get(&0, 0).unwrap());
    let cpumap_id: Array<_, u32> = open(m::CPUMAP_ID).try_into().unwrap();
    let bindings: Array<_, havip_common::BindingCell> = open(m::BINDINGS).try_into().unwrap();
    let vips: HashMap<_, havip_common::VipKey, havip_common::VipInfo> = open(m::VIPS).try_into().unwrap();
    let state = havip_user::node::state::State::load(&t.run_dir).unwrap().unwrap();
    PinnedState {
        links: t.links(),
        maps: ids(pins.maps_dir(), &|p| MapInfo::from_pin(p).unwrap().id()),
        progs: ids(pins.progs_dir(), &|p| aya::programs::ProgramInfo::from_pin(p).unwrap().id()),
        layout_version,
        cpumap_id: cpumap_id.get(&0, 0).unwrap(),
        bindings: (0..8).map(|i| bindings.get(&i, 0).unwrap().current()).collect(),
        vips: vips.iter().map(Result::unwrap).collect(),
        nics: HashMap::<_, u32, havip_common::NicInfo>::try_from(open(m::NICS)).unwrap().iter().map(Result::unwrap).collect(),
        lo: t.server_lo_addresses(),
        state: (state.pid, state.generation),
    }
}

/// Runs havipd until it exits. One still running after 10 s has accepted what it was
/// given: it is stopped and its log returned as the error, so that a havipd which wrongly
/// starts fails the test instead of hanging it.
fn havipd_until_exit(args: &[&str]) -> Result<std::process::Output, String> {
    let mut child = Command::new(havip_tests::bin("havipd")).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let out = child.wait_with_output().unwrap();
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output().unwrap())
}

/// A new map shaped like `like` but with `max_entries`, through BPF_MAP_CREATE: a pin
/// made by a havip whose map had another capacity.
fn map_with_capacity(like: &aya::maps::MapInfo, max_entries: u32) -> aya::maps::MapData {
    use std::os::fd::{FromRawFd, OwnedFd};
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = CreateAttr {
        map_type: like.map_type().unwrap() as u32,
        key_size: like.key_size(),
        value_size: like.value_size(),
        max_entries,
        map_flags: like.map_flags(),
    };
    const BPF_MAP_CREATE: libc::c_long = 0;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &attr as *const CreateAttr, std::mem::size_of::<CreateAttr>() as u32) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    aya::maps::MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap()
}

/// Pins of another layout (another layout version, a map of another capacity, maps from
/// before versioning) make havipd refuse to start and `havip stats` refuse to read, naming
/// the mismatch and `havip down`, with nothing changed and traffic still served by the
/// running programs. Put back as they were, the pins are adopted again.
#[test]
fn pins_of_another_layout_are_refused_with_nothing_changed() {
    use aya::maps::{Array, Map, MapData, MapInfo};
    use havip_common::maps as m;
    let mut t = Topology::new();
    let stop = Arc::new(AtomicBool::new(false));
    echo_instance(&t.srv, 8081, b"A\n", stop.clone());
    t.write_config(&(vip_block(&[VIP1_V4]) + &service("web", 80, &[(VIP1_V4, 8081)])));
    t.start_daemon();
    t.stop_daemon(libc::SIGTERM);
    let pins = PinLayout::new(&t.pin_root);
    let links = t.links();
    let path = |name: &str| pins.map(name);
    let set_version = |v: u32| {
        let mut a: Array<_, u32> = Map::from_map_data(MapData::from_pin(path(m::LAYOUT)).unwrap()).unwrap().try_into().unwrap();
        a.set(0, v, 0).unwrap();
    };
    let refused = |what: &str, names: &[&str]| {
        let before = pinned_state(&t);
        let out = havipd_until_exit(&[
            "--netns", &t.srv.name, "--config", t.config_path.to_str().unwrap(),
            "--pin-path", t.pin_root.to_str().unwrap(), "--run-dir", t.run_dir.to_str().unwrap(),
        ])
        .unwrap_or_else(|log| panic!("{what}: havipd started on them:\n{log}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: havipd exited 0:\n{err}");
        for name in names.iter().chain(&["nothing was changed", "Run `havip down` to remove the old dataplane (this interrupts traffic), then start havipd again"]) {
            assert!(err.contains(name), "{what}: the error does not say `{name}`:\n{err}");
        }
        assert_eq!(pinned_state(&t), before, "{what}: the refused havipd changed the dataplane");
        // The CLI refuses to read them too, with the same advice.
        let out = t.havip(&["stats"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && names.iter().all(|n| err.contains(n)) && err.contains("havip down"), "{what}: havip stats:\n{err}");
        assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A", "{what}: traffic stopped");
    };

    // Another version (a layout change of the same size: only the version tells).
    set_version(m::LAYOUT_VERSION + 1);
    refused("another version", &[&format!("HAVIP_LAYOUT: pinned layout version {}, this build expects {}", m::LAYOUT_VERSION + 1, m::LAYOUT_VERSION)]);
    set_version(m::LAYOUT_VERSION);

    // A map of another capacity, pinned in the original's place (which this test keeps open).
    let original = MapData::from_pin(path(m::NICS)).unwrap();
    let info = MapInfo::from_pin(path(m::NICS)).unwrap();
    let other = map_with_capacity(&info, m::NICS_MAX * 2);
    std::fs::remove_file(path(m::NICS)).unwrap();
    other.pin(path(m::NICS)).unwrap();
    let shape = |n: u32| format!("hash, key 4 B, value {} B, {n} entries", info.value_size());
    let pinned_vs_expected = format!("map HAVIP_NICS: pinned {}; this build expects {}", shape(m::NICS_MAX * 2), shape(m::NICS_MAX));
    refused("a map of another capacity", &[&pinned_vs_expected]);
    assert_eq!(MapInfo::from_pin(path(m::NICS)).unwrap().id(), other.info().unwrap().id(), "the altered pin was replaced");
    std::fs::remove_file(path(m::NICS)).unwrap();
    original.pin(path(m::NICS)).unwrap();

    // Maps pinned by a havipd from before layout versioning (no HAVIP_LAYOUT).
    let layout = MapData::from_pin(path(m::LAYOUT)).unwrap();
    std::fs::remove_file(path(m::LAYOUT)).unwrap();
    refused("maps from before versioning", &["are pinned but HAVIP_LAYOUT is not"]);
    assert!(!path(m::LAYOUT).exists(), "a refused havipd created HAVIP_LAYOUT");
    layout.pin(path(m::LAYOUT)).unwrap();

    // As they were: adopted, links kept, programs swapped.
    t.start_daemon();
    for ((old_link, old_prog), (new_link, new_prog)) in links.iter().zip(&t.links()) {
        assert_eq!(old_link, new_link, "the pinned link was replaced instead of adopted");
        assert_ne!(old_prog, new_prog, "the restarted controller did not swap in its programs");
    }
    assert_eq!(who_answers(&t, VIP1_V4).unwrap(), "A");
    stop.store(true, Ordering::Relaxed);
}

/// What `cargo xtask run` shows: the lab serves every VIP, fails a NIC over, keeps its
/// long-lived connection, and leaves nothing behind.
#[test]
fn the_lab_runs_fails_over_and_cleans_up() {
    havip_tests::require_root();
    let out = Command::new(havip_tests::bin("havip"))
        .args(["lab", "--duration", "9", "--every", "1.5", "--fail-every", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lab failed: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("lost carrier (failure injected)"), "no failure was injected:\n{text}");
    // The last round: every VIP answered on port 80 by its own instance.
    let last = text.rsplit("──").next().unwrap();
    for (vip, instance) in [("198.18.20.10:80", "A"), ("[2001:db8:20::10]:80", "A"), ("198.18.20.11:80", "B"), ("[2001:db8:20::11]:80", "B")] {
        let line = last.lines().find(|l| l.contains(vip)).unwrap_or_else(|| panic!("{vip} missing:\n{last}"));
        assert!(line.contains(&format!("instance {instance} ")), "{line}");
    }
    assert!(last.contains("1 move(s)") || last.contains("2 move(s)"), "no VIP moved:\n{last}");
    let conn = last.lines().find(|l| l.starts_with("long-lived connection")).unwrap();
    assert!(conn.ends_with(" 0 errors") && !conn.contains(": 0 KiB"), "{conn}");
    assert!(text.contains("[lab] clean"));
    let ns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ns.stdout).contains("havip-lab"), "lab namespaces left");
    assert!(!std::path::Path::new("/sys/fs/bpf/havip-lab").exists(), "lab pins left");
}
