//! BPF_PROG_RUN fixtures: each packet goes through the real programs in the kernel; the
//! tests check the action, every output byte and the counters. Checksums of rewritten
//! packets are verified by etherparse, independently of havip's own checksum code.

use std::net::IpAddr;

use havip_common::{Direction, Outcome};
use havip_tests::{
    fixture::{on_each_hook, Fixture, Hook, TC_ACT_OK, TWO_VIPS, XDP_PASS},
    packets::{
        arp_request, build, fix_ipv4_header_checksum, icmp_echo, icmp_echo_with, icmpv6_checksum, inspect, l3_offset,
        neighbor_solicitation, CLIENT_MAC, L4,
    },
};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_RUN presents packets as received on (XDP) or sent by (TC) the test's loopback.
const TEST_IFINDEX: u32 = 1;
const OWNER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];

fn ip6(s: &str) -> std::net::Ipv6Addr {
    s.parse().unwrap()
}


const CLIENT4: &str = "198.18.2.2";
const CLIENT6: &str = "2001:db8:2::2";
const VIP4: &str = "198.18.100.1";
const VIP6: &str = "2001:db8:100::1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Every (family, protocol, vlan) combination of a client packet to VIP:80.
fn cases() -> Vec<(&'static str, L4, Option<u16>)> {
    let mut v = Vec::new();
    for fam in ["v4", "v6"] {
        for l4 in [L4::Tcp, L4::Udp] {
            for vlan in [None, Some(100)] {
                v.push((fam, l4, vlan));
            }
        }
    }
    v
}

fn addrs(fam: &str) -> (IpAddr, IpAddr) {
    if fam == "v4" { (ip(CLIENT4), ip(VIP4)) } else { (ip(CLIENT6), ip(VIP6)) }
}

/// Bytes that differ between two equal-length frames.
fn diff(a: &[u8], b: &[u8]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    (0..a.len()).filter(|&i| a[i] != b[i]).collect()
}

#[test]
fn ingress_rewrites_a_mapped_port_and_the_checksum_verifies() {
    on_each_hook(ingress_rewrites_a_mapped_port_and_the_checksum_verifies_on)
}

fn ingress_rewrites_a_mapped_port_and_the_checksum_verifies_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    for (fam, l4, vlan) in cases() {
        let (client, vip) = addrs(fam);
        let input = build(l4, client, 40000, vip, 80, vlan, b"hello havip");
        assert!(inspect(&input).checksum_ok);
        let before = fx.vip(&vip.to_string());
        let r = fx.ingress(&input);
        let what = format!("{fam} {l4:?} vlan={vlan:?}");
        assert_eq!(r.action, XDP_PASS, "{what}");
        let view = inspect(&r.out);
        assert_eq!((view.sport, view.dport), (40000, 8081), "{what}: destination port rewritten");
        assert!(view.checksum_ok, "{what}: checksum does not verify after the rewrite");
        // Only the port and checksum bytes changed; addresses never change.
        let l4_off = l3_offset(vlan.is_some()) + if fam == "v4" { 20 } else { 40 };
        let csum_off = l4_off + if l4 == L4::Tcp { 16 } else { 6 };
        let changed = diff(&input, &r.out);
        assert!(changed.iter().all(|&i| i == l4_off + 2 || i == l4_off + 3 || i == csum_off || i == csum_off + 1),
            "{what}: unexpected bytes changed: {changed:?}");
        let after = fx.vip(&vip.to_string());
        assert_eq!(after.rx.packets - before.rx.packets, 1, "{what}");
        assert_eq!(after.rx.remapped - before.rx.remapped, 1, "{what}");
        assert_eq!(after.rx.bytes - before.rx.bytes, input.len() as u64, "{what}");
        let (tcp, udp) = (after.rx.tcp - before.rx.tcp, after.rx.udp - before.rx.udp);
        assert_eq!((tcp, udp), if l4 == L4::Tcp { (1, 0) } else { (0, 1) }, "{what}");
    }
}

#[test]
fn egress_maps_the_instance_port_back_and_the_checksum_verifies() {
    let mut fx = Fixture::new(TWO_VIPS);
    for (fam, l4, vlan) in cases() {
        let (client, vip) = addrs(fam);
        let input = build(l4, vip, 8081, client, 40000, vlan, b"reply from instance");
        let before = fx.vip(&vip.to_string());
        let r = fx.egress(&input);
        let what = format!("{fam} {l4:?} vlan={vlan:?}");
        assert_eq!(r.action, TC_ACT_OK, "{what}");
        let view = inspect(&r.out);
        assert_eq!((view.sport, view.dport), (80, 40000), "{what}: source port mapped back");
        assert!(view.checksum_ok, "{what}: checksum does not verify after the rewrite");
        let after = fx.vip(&vip.to_string());
        assert_eq!(after.tx.packets - before.tx.packets, 1, "{what}");
        assert_eq!(after.tx.remapped - before.tx.remapped, 1, "{what}");
        assert_eq!(after.tx.bytes - before.tx.bytes, input.len() as u64, "{what}");
    }
}

/// Generic XDP runs after GRO and sees merged TCP packets up to 64 KiB. BPF_PROG_RUN hands
/// a frame over a page to the program as a multi-buffer frame (headers in the linear part,
/// the rest in fragments): its IP length covers the fragments, and the programs must take
/// it as the valid packet it is, never as malformed.
/// XDP only: BPF_PROG_RUN takes no skb over a page. The TC hook's large packets are tested
/// with real GSO traffic in `large_frames_netns`.
#[test]
fn tcp_packets_of_60_kib_are_remapped_and_the_checksum_verifies() {
    tcp_packets_of_60_kib_are_remapped_and_the_checksum_verifies_on(Hook::Xdp)
}

fn tcp_packets_of_60_kib_are_remapped_and_the_checksum_verifies_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    for fam in ["v4", "v6"] {
        let (client, vip) = addrs(fam);
        let payload = havip_tests::topology::pattern(60 * 1024, 11);
        let input = build(L4::Tcp, client, 40000, vip, 80, None, &payload);
        assert!(input.len() > 60 * 1024 && inspect(&input).checksum_ok);
        let before = fx.vip(&vip.to_string());
        let outcomes_before: Vec<u64> = Outcome::ALL.iter().map(|&o| fx.outcome(Direction::Ingress, o)).collect();
        let r = fx.ingress(&input);
        assert_eq!(r.action, XDP_PASS, "{fam}");
        assert_eq!(r.out.len(), input.len(), "{fam}: frame length changed");
        let view = inspect(&r.out);
        assert_eq!((view.sport, view.dport), (40000, 8081), "{fam}: a {} byte frame was not remapped", input.len());
        assert!(view.checksum_ok, "{fam}: checksum does not verify after the rewrite");
        let l4_off = 14 + if fam == "v4" { 20 } else { 40 };
        let changed = diff(&input, &r.out);
        assert!(changed.iter().all(|&i| i == l4_off + 2 || i == l4_off + 3 || i == l4_off + 16 || i == l4_off + 17),
            "{fam}: unexpected bytes changed: {changed:?}");
        // Counted as remapped, with its real size, and as nothing else (not malformed).
        let counted: Vec<(Outcome, u64)> = Outcome::ALL
            .iter()
            .zip(&outcomes_before)
            .map(|(&o, b)| (o, fx.outcome(Direction::Ingress, o) - b))
            .filter(|&(_, n)| n != 0)
            .collect();
        assert_eq!(counted, vec![(Outcome::VipRemapped, 1)], "{fam}: outcomes counted");
        let after = fx.vip(&vip.to_string());
        assert_eq!(after.rx.remapped - before.rx.remapped, 1, "{fam}");
        assert_eq!(after.rx.tcp - before.rx.tcp, 1, "{fam}");
        assert_eq!(after.rx.bytes - before.rx.bytes, input.len() as u64, "{fam}: bytes counted");
    }
}

#[test]
fn udp_over_ipv4_without_checksum_stays_without_checksum() {
    on_each_hook(udp_over_ipv4_without_checksum_stays_without_checksum_on)
}

fn udp_over_ipv4_without_checksum_stays_without_checksum_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let mut input = build(L4::Udp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"no checksum");
    input[14 + 20 + 6] = 0;
    input[14 + 20 + 7] = 0;
    let r = fx.ingress(&input);
    let v = inspect(&r.out);
    assert_eq!((v.dport, v.checksum), (8081, 0));
    let mut reply = build(L4::Udp, ip(VIP4), 8081, ip(CLIENT4), 40000, None, b"no checksum");
    reply[14 + 20 + 6] = 0;
    reply[14 + 20 + 7] = 0;
    let r = fx.egress(&reply);
    let v = inspect(&r.out);
    assert_eq!((v.sport, v.checksum), (80, 0));
}

#[test]
fn udp_over_ipv6_with_a_zero_checksum_keeps_it_zero() {
    on_each_hook(udp_over_ipv6_with_a_zero_checksum_keeps_it_zero_on)
}

/// On TC the port is rewritten and the zero kept: there a zero may be the partial sum of a
/// packet whose checksum is left to offload (a veth peer's), which is valid and must reach
/// its instance; a packet whose checksum really is zero is dropped by the stack either way.
fn udp_over_ipv6_with_a_zero_checksum_keeps_it_zero_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let mut input = build(L4::Udp, ip(CLIENT6), 40000, ip(VIP6), 80, None, b"bad");
    input[14 + 40 + 6] = 0;
    input[14 + 40 + 7] = 0;
    let r = fx.ingress(&input);
    match hook {
        Hook::Xdp => assert_eq!(r.out, input),
        Hook::Tc => {
            let mut want = input.clone();
            want[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&8081u16.to_be_bytes());
            assert_eq!(r.out, want, "port rewritten, checksum still zero");
        }
    }
}

#[test]
fn packets_havip_does_not_own_pass_byte_for_byte() {
    on_each_hook(packets_havip_does_not_own_pass_byte_for_byte_on)
}

fn packets_havip_does_not_own_pass_byte_for_byte_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let untouched: Vec<(&str, Vec<u8>, Outcome)> = vec![
        ("unmapped port v4", build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 443, None, b"x"), Outcome::VipPassed),
        ("unmapped port v6", build(L4::Udp, ip(CLIENT6), 40000, ip(VIP6), 53, None, b"x"), Outcome::VipPassed),
        ("instance port addressed directly", build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 8081, None, b"x"), Outcome::VipPassed),
        ("non-VIP destination v4", build(L4::Tcp, ip(CLIENT4), 40000, ip("198.18.100.9"), 80, None, b"x"), Outcome::NotVip),
        ("non-VIP destination v6", build(L4::Udp, ip(CLIENT6), 40000, ip("2001:db8:100::9"), 80, Some(7), b"x"), Outcome::NotVip),
        ("ARP for another address", arp_request([198, 18, 2, 2], [198, 18, 100, 9]), Outcome::NotIp),
        ("NS for another address", neighbor_solicitation(ip6(CLIENT6), ip6("2001:db8:100::9"), true), Outcome::NotVip),
        ("ICMP echo to the VIP", icmp_echo(ip(CLIENT4), ip(VIP4)), Outcome::VipPassed),
        ("ICMPv6 echo to the VIP", icmp_echo(ip(CLIENT6), ip(VIP6)), Outcome::VipPassed),
    ];
    for (what, input, outcome) in untouched {
        let before = fx.outcome(Direction::Ingress, outcome);
        let r = fx.ingress(&input);
        assert_eq!(r.action, XDP_PASS, "{what}");
        assert_eq!(r.out, input, "{what}: packet changed");
        let all: Vec<_> = Outcome::ALL.iter().map(|o| (o.name(), fx.outcome(Direction::Ingress, *o))).collect();
        assert_eq!(fx.outcome(Direction::Ingress, outcome) - before, 1, "{what}: not counted as {outcome:?}: {all:?}");
    }
    let icmp = fx.vip(VIP4);
    assert_eq!(icmp.rx.icmp, 1);
    assert_eq!(icmp.rx.remapped, 0);
}

#[test]
fn every_truncation_of_a_valid_packet_passes_untouched() {
    on_each_hook(every_truncation_of_a_valid_packet_passes_untouched_on)
}

fn every_truncation_of_a_valid_packet_passes_untouched_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let (mut egress_runs, mut egress_refused) = (0, 0);
    for (fam, l4, vlan) in cases() {
        let (client, vip) = addrs(fam);
        let full = build(l4, client, 40000, vip, 80, vlan, b"0123456789abcdef");
        // BPF_PROG_RUN refuses XDP input shorter than an Ethernet header.
        for len in 14..full.len() {
            let input = &full[..len];
            let ip_end = l3_offset(vlan.is_some()) + if fam == "v4" { 20 } else { 40 };
            let r = match fx.try_run(havip_common::maps::PROG_INGRESS, input, 1) {
                Ok(r) => r,
                // Skbs (the TC hook) shorter than their IP header are refused by the kernel,
                // as on egress below.
                Err(e) => {
                    assert!(hook == Hook::Tc && len < ip_end, "ingress {fam} {l4:?} vlan={vlan:?} len={len} refused: {e}");
                    continue;
                }
            };
            assert_eq!(r.action, XDP_PASS, "{fam} {l4:?} vlan={vlan:?} len={len}");
            assert_eq!(r.out, input, "{fam} {l4:?} vlan={vlan:?} truncated to {len} bytes was rewritten");
            match fx.try_run(havip_common::maps::PROG_EGRESS, input, 1) {
                Ok(r) => {
                    egress_runs += 1;
                    assert_eq!(r.out, input, "egress {fam} {l4:?} vlan={vlan:?} truncated to {len} bytes was rewritten");
                }
                // The kernel itself refuses skbs shorter than the IP header their EtherType
                // announces; that and nothing else may be refused.
                Err(e) => {
                    assert!(len < ip_end, "egress {fam} {l4:?} vlan={vlan:?} len={len} refused: {e}");
                    egress_refused += 1;
                }
            }
        }
    }
    assert!(egress_runs > 2 * egress_refused, "egress: only {egress_runs} runs, {egress_refused} refused");
    assert_eq!(fx.vip(VIP4).rx.remapped + fx.vip(VIP6).rx.remapped, 0);
    assert!(fx.outcome(Direction::Ingress, Outcome::Malformed) > 0);
}

#[test]
fn malformed_headers_pass_untouched_and_are_counted() {
    on_each_hook(malformed_headers_pass_untouched_and_are_counted_on)
}

fn malformed_headers_pass_untouched_and_are_counted_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let v4 = |l4| build(l4, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"payload!");
    let v6 = |l4| build(l4, ip(CLIENT6), 40000, ip(VIP6), 80, None, b"payload!");
    let l3 = 14;
    let mut cases: Vec<(&str, Vec<u8>, Outcome)> = Vec::new();
    let edit4 = |mut p: Vec<u8>, f: &dyn Fn(&mut Vec<u8>)| {
        f(&mut p);
        fix_ipv4_header_checksum(&mut p, l3);
        p
    };
    cases.push(("IHL 4 (below minimum)", edit4(v4(L4::Tcp), &|p| p[l3] = 0x44), Outcome::Malformed));
    cases.push(("IHL 15 (options beyond the packet)", edit4(v4(L4::Tcp), &|p| p[l3] = 0x4f), Outcome::Malformed));
    cases.push(("IP version 5", edit4(v4(L4::Udp), &|p| p[l3] = 0x55), Outcome::Malformed));
    cases.push(("total length beyond the frame", edit4(v4(L4::Tcp), &|p| p[l3 + 2..l3 + 4].copy_from_slice(&1500u16.to_be_bytes())), Outcome::Malformed));
    cases.push(("total length below the header", edit4(v4(L4::Udp), &|p| p[l3 + 2..l3 + 4].copy_from_slice(&12u16.to_be_bytes())), Outcome::Malformed));
    cases.push(("TCP data offset below 5", edit4(v4(L4::Tcp), &|p| p[l3 + 20 + 12] = 0x40), Outcome::Malformed));
    cases.push(("TCP data offset beyond the segment", edit4(v4(L4::Tcp), &|p| p[l3 + 20 + 12] = 0xf0), Outcome::Malformed));
    cases.push(("UDP length below 8", edit4(v4(L4::Udp), &|p| p[l3 + 20 + 4..l3 + 20 + 6].copy_from_slice(&4u16.to_be_bytes())), Outcome::Malformed));
    cases.push(("UDP length beyond the datagram", edit4(v4(L4::Udp), &|p| p[l3 + 20 + 4..l3 + 20 + 6].copy_from_slice(&900u16.to_be_bytes())), Outcome::Malformed));
    cases.push(("IPv4 first fragment (MF)", edit4(v4(L4::Udp), &|p| p[l3 + 6] = 0x20), Outcome::Fragment));
    cases.push(("IPv4 later fragment (offset)", edit4(v4(L4::Udp), &|p| p[l3 + 7] = 0x10), Outcome::Fragment));
    let mut p = v6(L4::Udp);
    p[l3 + 4..l3 + 6].copy_from_slice(&2000u16.to_be_bytes());
    cases.push(("IPv6 payload length beyond the frame", p, Outcome::Malformed));
    let mut p = v6(L4::Tcp);
    p[l3 + 6] = 0; // next header: hop-by-hop options
    cases.push(("IPv6 with an extension header", p, Outcome::Ipv6ExtHeader));
    let mut p = v4(L4::Tcp);
    p.splice(12..12, [0x81, 0x00, 0x00, 0x05, 0x81, 0x00, 0x00, 0x06]);
    cases.push(("two VLAN tags", p, Outcome::UnsupportedL2));

    for (what, input, outcome) in cases {
        let before = fx.outcome(Direction::Ingress, outcome);
        let r = fx.ingress(&input);
        assert_eq!(r.action, XDP_PASS, "{what}");
        assert_eq!(r.out, input, "{what}: a malformed packet was changed");
        assert_eq!(fx.outcome(Direction::Ingress, outcome) - before, 1, "{what}: not counted as {outcome:?}");
        let before = fx.outcome(Direction::Egress, outcome);
        let r = fx.egress(&input);
        assert_eq!(r.out, input, "{what}: egress changed a malformed packet");
        assert_eq!(fx.outcome(Direction::Egress, outcome) - before, 1, "{what}: egress did not count {outcome:?}");
    }
    assert_eq!(fx.vip(VIP4).rx.remapped + fx.vip(VIP6).rx.remapped, 0);
}

#[test]
fn ipv4_options_are_skipped_by_header_length() {
    on_each_hook(ipv4_options_are_skipped_by_header_length_on)
}

fn ipv4_options_are_skipped_by_header_length_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let mut p = build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"opts");
    // Insert 4 bytes of options (NOP NOP NOP EOL), IHL 6, total length + 4.
    p.splice(14 + 20..14 + 20, [1, 1, 1, 0]);
    p[14] = 0x46;
    let tot = u16::from_be_bytes([p[16], p[17]]) + 4;
    p[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_header_checksum(&mut p, 14);
    let r = fx.ingress(&p);
    let v = inspect(&r.out);
    assert_eq!(v.dport, 8081);
    assert!(v.checksum_ok);
}

#[test]
fn frames_with_ethernet_padding_are_remapped() {
    on_each_hook(frames_with_ethernet_padding_are_remapped_on)
}

fn frames_with_ethernet_padding_are_remapped_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let mut p = build(L4::Udp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"x");
    p.resize(60, 0); // minimum Ethernet frame: IP total length is shorter than the frame
    let r = fx.ingress(&p);
    assert_eq!(inspect(&r.out).dport, 8081);
    assert!(inspect(&r.out).checksum_ok);
}

/// Two VIPs hashing to the same fast-path slot, and one VIP with more mappings than fit
/// inline: the programs fall back to the tables and remap exactly the same.
#[test]
fn shared_slots_and_overflowing_mappings_take_the_table_path() {
    on_each_hook(shared_slots_and_overflowing_mappings_take_the_table_path_on)
}

fn shared_slots_and_overflowing_mappings_take_the_table_path_on(hook: Hook) {
    use havip_common::{vip_slot, VipKey};
    let mut seen = std::collections::HashMap::new();
    let (x, y) = (0..65536u32)
        .find_map(|i| {
            let a = format!("198.18.{}.{}", i >> 8, i & 0xff);
            let k = VipKey::from(ip(&a));
            seen.insert(vip_slot(&k), a.clone()).map(|b| (b, a))
        })
        .unwrap();
    let mut cfg = format!("[[nic]]\nname = \"eth0\"\n[[vip]]\naddress = \"{x}\"\n[[vip]]\naddress = \"{y}\"\n[[vip]]\naddress = \"{VIP6}\"\n");
    for port in 0..6u16 {
        cfg += &format!("[[service]]\nname = \"s{port}\"\nport = {}\nprotocols = [\"tcp\", \"udp\"]\n", 80 + port);
        for vip in [&x, &y] {
            cfg += &format!("[[service.instance]]\nvip = \"{vip}\"\nport = {}\n", 9000 + port);
        }
        cfg += &format!("[[service.instance]]\nvip = \"{VIP6}\"\nport = {}\n", 9000 + port);
    }
    let mut fx = Fixture::new(&cfg).with_hook(hook);
    for vip in [x.as_str(), y.as_str(), VIP6] {
        let client = if vip.contains(':') { CLIENT6 } else { CLIENT4 };
        for port in 0..6u16 {
            for l4 in [L4::Tcp, L4::Udp] {
                let input = build(l4, ip(client), 40000, ip(vip), 80 + port, None, b"x");
                let v = inspect(&fx.ingress(&input).out);
                assert_eq!(v.dport, 9000 + port, "{vip} {l4:?} :{}", 80 + port);
                assert!(v.checksum_ok);
                let reply = build(l4, ip(vip), 9000 + port, ip(client), 40000, None, b"y");
                let v = inspect(&fx.egress(&reply).out);
                assert_eq!(v.sport, 80 + port, "egress {vip} {l4:?} :{}", 9000 + port);
                assert!(v.checksum_ok);
            }
        }
        // A port mapped for nobody is still left alone.
        let input = build(L4::Tcp, ip(client), 40000, ip(vip), 7777, None, b"x");
        assert_eq!(fx.ingress(&input).out, input);
        assert_eq!(fx.vip(vip).rx.remapped, 12, "{vip}");
    }
}

#[test]
fn arp_for_a_vip_is_answered_by_its_owner_only() {
    on_each_hook(arp_for_a_vip_is_answered_by_its_owner_only_on)
}

fn arp_for_a_vip_is_answered_by_its_owner_only_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let req = arp_request([198, 18, 2, 2], [198, 18, 100, 1]);
    // Owned by another NIC: dropped, counted.
    fx.bind(VIP4, 9999, OWNER_MAC);
    let r = fx.ingress(&req);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.vip(VIP4).wire.neigh_dropped, 1);
    // Owned by this NIC: answered in place from the owner's MAC.
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    let r = fx.ingress(&req);
    assert_eq!(r.action, XDP_TX);
    let o = &r.out;
    assert_eq!(o.len(), req.len());
    assert_eq!(&o[0..6], &CLIENT_MAC, "to the asker");
    assert_eq!(&o[6..12], &OWNER_MAC, "from the owner");
    assert_eq!(&o[12..14], &[0x08, 0x06]);
    assert_eq!(&o[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&o[22..28], &OWNER_MAC, "sender MAC: the owner");
    assert_eq!(&o[28..32], &[198, 18, 100, 1], "sender IP: the VIP");
    assert_eq!(&o[32..38], &CLIENT_MAC, "target MAC: the asker");
    assert_eq!(&o[38..42], &[198, 18, 2, 2], "target IP: the asker");
    assert_eq!(fx.vip(VIP4).wire.arp_replies, 1);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::ArpReplied), 1);
    // ARP replies and requests for other addresses go to the kernel.
    let mut reply = req.clone();
    reply[21] = 2;
    assert_eq!(fx.ingress(&reply).out, reply);
}

#[test]
fn neighbour_solicitations_for_a_vip_get_one_correct_advertisement() {
    on_each_hook(neighbour_solicitations_for_a_vip_get_one_correct_advertisement_on)
}

fn neighbour_solicitations_for_a_vip_get_one_correct_advertisement_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    fx.bind(VIP6, TEST_IFINDEX, OWNER_MAC);
    for (what, src, slla) in [("with SLLA", CLIENT6, true), ("without SLLA", CLIENT6, false), ("DAD probe", "::", false)] {
        let ns = neighbor_solicitation(ip6(src), ip6(VIP6), slla);
        let r = fx.ingress(&ns);
        assert_eq!(r.action, XDP_TX, "{what}");
        let o = &r.out;
        assert_eq!(o.len(), 14 + 40 + 32, "{what}: NA with one option");
        let dad = src == "::";
        assert_eq!(&o[0..6], if dad { &[0x33, 0x33, 0, 0, 0, 1][..] } else { &CLIENT_MAC[..] }, "{what}: eth dst");
        assert_eq!(&o[6..12], &OWNER_MAC, "{what}: eth src");
        assert_eq!(u16::from_be_bytes([o[18], o[19]]), 32, "{what}: payload length");
        assert_eq!((o[20], o[21]), (58, 255), "{what}: ICMPv6, hop limit 255");
        assert_eq!(&o[22..38], &ip6(VIP6).octets(), "{what}: from the VIP");
        let dst: std::net::Ipv6Addr = if dad { ip6("ff02::1") } else { ip6(CLIENT6) };
        assert_eq!(&o[38..54], &dst.octets(), "{what}: to the asker");
        let icmp = &o[54..];
        assert_eq!(icmp[0], 136, "{what}: a neighbour advertisement");
        assert_eq!(icmp[4], if dad { 0x20 } else { 0x60 }, "{what}: flags (S only when solicited by a unicast address)");
        assert_eq!(&icmp[8..24], &ip6(VIP6).octets(), "{what}: target");
        assert_eq!(&icmp[24..32], &[2, 1, OWNER_MAC[0], OWNER_MAC[1], OWNER_MAC[2], OWNER_MAC[3], OWNER_MAC[4], OWNER_MAC[5]]);
        let src: [u8; 16] = o[22..38].try_into().unwrap();
        let dst: [u8; 16] = o[38..54].try_into().unwrap();
        assert_eq!(icmpv6_checksum(&src, &dst, icmp), 0, "{what}: ICMPv6 checksum does not verify");
    }
    assert_eq!(fx.vip(VIP6).wire.nd_replies, 3);
    // Another NIC owns it: dropped.
    fx.bind(VIP6, 9999, OWNER_MAC);
    let ns = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
    assert_eq!(fx.ingress(&ns).action, XDP_DROP);
    assert_eq!(fx.vip(VIP6).wire.neigh_dropped, 1);
    // Invalid solicitations (RFC 4861 7.1.1) are discarded, counted by reason, never
    // answered: a hop limit below 255 (it came through a router), a checksum that fails.
    fx.bind(VIP6, TEST_IFINDEX, OWNER_MAC);
    let good = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
    let mut hop_254 = good.clone();
    hop_254[21] = 254;
    let mut bad_sum = good.clone();
    bad_sum[54 + 2] ^= 0x01;
    for (what, input, outcome, n) in [("hop limit 254", &hop_254, Outcome::NdHopLimit, 1), ("bad checksum", &bad_sum, Outcome::NdBadChecksum, 2)] {
        let (answered, dropped) = (fx.vip(VIP6).wire.nd_replies, fx.vip(VIP6).rx.dropped);
        let r = fx.ingress(input);
        assert_eq!((r.action, &r.out), (XDP_DROP, input), "{what}: dropped as it came");
        assert_eq!(fx.outcome(Direction::Ingress, outcome), 1, "{what}: counted as {outcome:?}");
        assert_eq!(fx.vip(VIP6).rx.dropped, dropped + 1, "{what}: counted as the VIP's drop");
        assert_eq!(fx.vip(VIP6).wire.nd_replies, answered, "{what}: not answered");
        assert_eq!(fx.outcome(Direction::Ingress, Outcome::NdHopLimit) + fx.outcome(Direction::Ingress, Outcome::NdBadChecksum), n);
    }
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::Malformed), 0, "neither is malformed");
    // The same solicitation, valid, is still answered.
    assert_eq!(fx.ingress(&good).action, XDP_TX);
}

/// A neighbour solicitation of `len` ICMPv6 bytes (the 24-byte message, its source
/// link-layer address option, then filler) with a correct checksum.
fn solicitation_of_len(len: usize) -> Vec<u8> {
    let mut f = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
    f.truncate(54 + 24.min(len));
    f.extend((f.len() - 54..len).map(|i| (i * 7 + 3) as u8));
    f[54 + 2..54 + 4].fill(0);
    f[18..20].copy_from_slice(&(len as u16).to_be_bytes());
    let (src, dst): ([u8; 16], [u8; 16]) = (f[22..38].try_into().unwrap(), f[38..54].try_into().unwrap());
    let c = icmpv6_checksum(&src, &dst, &f[54..]);
    f[54 + 2..54 + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// The checksum walk covers every byte of solicitations of any length up to its bound (8-byte
/// words, then tails of 4, 2 and 1): each is answered when its checksum verifies and
/// dropped when a byte is changed, the last one included.
/// Longer ones are not verified, so not answered: passed untouched, counted malformed.
#[test]
fn the_solicitation_checksum_covers_every_byte_of_any_length() {
    on_each_hook(the_solicitation_checksum_covers_every_byte_of_any_length_on)
}

fn the_solicitation_checksum_covers_every_byte_of_any_length_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    fx.bind(VIP6, TEST_IFINDEX, OWNER_MAC);
    let mut bad = 0;
    for len in 24..=192 {
        let ns = solicitation_of_len(len);
        assert_eq!(fx.ingress(&ns).action, XDP_TX, "{len} bytes, checksum correct");
        // The checksum and reserved fields, then (past the fixed part and its target) the
        // middle and the last byte of the options.
        let mut at = vec![2, 4];
        if len > 24 {
            at.extend([24 + (len - 24) / 2, len - 1]);
        }
        for at in at {
            let mut b = ns.clone();
            b[54 + at] ^= 0x10;
            let r = fx.ingress(&b);
            assert_eq!((r.action, r.out == b), (XDP_DROP, true), "{len} bytes, byte {at} changed");
            bad += 1;
        }
    }
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::NdBadChecksum), bad);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::NdReplied), 192 - 24 + 1);
    for len in [193, 200] {
        let ns = solicitation_of_len(len);
        let r = fx.ingress(&ns);
        assert_eq!((r.action, r.out == ns), (XDP_PASS, true), "{len} bytes: beyond the walk");
    }
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::Malformed), 2);
}

#[test]
fn vip_traffic_on_a_non_owning_nic_is_accepted_and_counted_misdirected() {
    on_each_hook(vip_traffic_on_a_non_owning_nic_is_accepted_and_counted_misdirected_on)
}

fn vip_traffic_on_a_non_owning_nic_is_accepted_and_counted_misdirected_on(hook: Hook) {
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    fx.bind(VIP4, 9999, OWNER_MAC);
    let input = build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"late");
    let r = fx.ingress(&input);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(inspect(&r.out).dport, 8081, "still remapped");
    assert_eq!(fx.vip(VIP4).wire.misdirected, 1);
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    fx.ingress(&input);
    assert_eq!(fx.vip(VIP4).wire.misdirected, 1, "on the owner it is not misdirected");
}

/// Runs `f` in a fresh network namespace holding a veth pair (`own0`, `own1`), given
/// `own0`'s ifindex: a NIC that exists, for steering to find (BPF_PROG_RUN runs as if on
/// the namespace's loopback), and that the test can delete.
fn in_netns_with_a_nic(f: impl FnOnce(&havip_user::kernel::netns::Netns, u32) + Send + 'static) {
    use havip_user::kernel::netns::{in_netns, Netns};
    let ns = Netns::create(&havip_tests::unique("hv-fx")).unwrap();
    ns.ip(&["link", "add", "own0", "type", "veth", "peer", "name", "own1"]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", "own0"]).unwrap()).unwrap();
    let ifindex = links[0]["ifindex"].as_u64().unwrap() as u32;
    assert_ne!(ifindex, TEST_IFINDEX);
    let name = ns.name.clone();
    in_netns(&name, move || f(&ns, ifindex)).unwrap();
}

/// A VIP packet leaving by a NIC that does not own the VIP is handed to the owner's NIC,
/// untouched. If that NIC no longer exists (deleted while the binding still names it, until
/// havipd moves the VIP), the packet is dropped and counted, `steer_failed` and the VIP's
/// `tx.dropped`, one for one: the kernel would drop the redirect after the program,
/// uncounted.
#[test]
fn egress_from_a_vip_on_the_wrong_nic_is_redirected_to_its_owner_untouched() {
    in_netns_with_a_nic(|ns, owner| {
        let mut fx = Fixture::new(TWO_VIPS);
        let reply = build(L4::Tcp, ip(VIP4), 8081, ip(CLIENT4), 40000, None, b"reply");
        fx.bind(VIP4, owner, OWNER_MAC);
        let r = fx.egress(&reply);
        assert_eq!(r.action, TC_ACT_REDIRECT, "handed to the owner");
        assert_eq!(r.out, reply, "the owner's pass remaps it, not this one");
        let c = fx.vip(VIP4);
        assert_eq!((c.wire.steered, c.tx.packets, c.tx.dropped), (1, 0, 0));
        assert_eq!(fx.outcome(Direction::Egress, Outcome::Steered), 1);

        // The owner's NIC is deleted; the binding still names it.
        ns.ip(&["link", "del", "own0"]).unwrap();
        for _ in 0..5 {
            let r = fx.egress(&reply);
            assert_eq!((r.action, &r.out), (TC_ACT_SHOT, &reply), "dropped as it came");
        }
        let c = fx.vip(VIP4);
        assert_eq!((c.wire.steered, c.tx.packets, c.tx.dropped), (1, 0, 5));
        assert_eq!(fx.outcome(Direction::Egress, Outcome::SteerFailed), 5);
        assert_eq!(fx.outcome(Direction::Egress, Outcome::Steered), 1);

        fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
        let r = fx.egress(&reply);
        assert_eq!(r.action, TC_ACT_OK);
        assert_eq!(inspect(&r.out).sport, 80);
        assert_eq!((fx.vip(VIP4).tx.packets, fx.vip(VIP4).tx.dropped), (1, 5));
    });
}

/// Every way a program drops a packet, each counted once under its reason (an outcome for
/// which `is_drop` holds), and no packet that was not dropped counted under one: for each
/// run, exactly one outcome grows, and it is a drop reason exactly when the action drops.
/// Every drop reason is reached.
#[test]
fn every_drop_is_counted_under_its_reason() {
    use havip_common::{Fence, PROBE_ID_BASE, PROBE_MARK};
    in_netns_with_a_nic(|ns, other_nic| {
        let cfg = format!("{TWO_VIPS}\n[cluster]\nnode = \"n1\"\netcd_endpoints = [\"http://198.18.30.200:2379\"]\n");
        let mut seen = std::collections::BTreeSet::new();
        let mut check = |fx: &mut Fixture, what: &str, egress: bool, input: &[u8], mark: Option<u32>| {
            let dir = if egress { Direction::Egress } else { Direction::Ingress };
            let before: Vec<u64> = Outcome::ALL.iter().map(|&o| fx.outcome(dir, o)).collect();
            let r = match (egress, mark) {
                (true, Some(m)) => fx.egress_marked(input, m),
                (true, None) => fx.egress(input),
                (false, _) => fx.ingress(input),
            };
            let grew: Vec<Outcome> = Outcome::ALL.iter().zip(&before).filter(|(&o, &b)| fx.outcome(dir, o) != b).map(|(&o, _)| o).collect();
            assert_eq!(grew.len(), 1, "{what}: outcomes counted {grew:?}");
            let dropped = r.action == if egress { TC_ACT_SHOT } else { XDP_DROP };
            assert_eq!(dropped, grew[0].is_drop(), "{what}: action {} counted {:?}", r.action, grew[0]);
            seen.insert(grew[0].name());
        };
        let mut fx = Fixture::new(&cfg);
        let ids = [fx.dp.vip_id(ip(VIP4)).unwrap(), fx.dp.vip_id(ip(VIP6)).unwrap()];
        let arp = arp_request([198, 18, 2, 2], [198, 18, 100, 1]);
        let ns_good = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
        let reply = build(L4::Tcp, ip(VIP4), 8081, ip(CLIENT4), 40000, None, b"reply");
        // Fenced (never confirmed): ARP and NS dropped, the VIP's packets too.
        check(&mut fx, "fenced ARP", false, &arp, None);
        check(&mut fx, "fenced NS", false, &ns_good, None);
        check(&mut fx, "fenced egress", true, &reply, None);
        for id in ids {
            fx.maps.fences.set(id, Fence { serve_until_ns: u64::MAX, epoch: 1 }, 0).unwrap();
        }
        // Owned by another NIC.
        fx.bind(VIP4, other_nic, OWNER_MAC);
        fx.bind(VIP6, other_nic, OWNER_MAC);
        check(&mut fx, "ARP on another NIC", false, &arp, None);
        check(&mut fx, "NS on another NIC", false, &ns_good, None);
        check(&mut fx, "steered", true, &reply, None);
        check(&mut fx, "misdirected", false, &build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"x"), None);
        let mut hop = ns_good.clone();
        hop[21] = 1;
        check(&mut fx, "NS hop limit 1", false, &hop, None);
        let mut bad = ns_good.clone();
        bad[54 + 3] ^= 0x80;
        check(&mut fx, "NS bad checksum", false, &bad, None);
        // Owned here.
        fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
        fx.bind(VIP6, TEST_IFINDEX, OWNER_MAC);
        check(&mut fx, "ARP answered", false, &arp, None);
        check(&mut fx, "NS answered", false, &ns_good, None);
        check(&mut fx, "remapped", true, &reply, None);
        check(&mut fx, "unmapped", true, &build(L4::Udp, ip(VIP6), 5353, ip(CLIENT6), 40000, None, b"x"), None);
        // Probes: the reply is consumed.
        fx.maps.set_probe_slot(3, Some((TEST_IFINDEX, ip("198.18.50.1"))), (havip_common::PROBE_KIND_ICMP, None)).unwrap();
        let probe = icmp_echo_with(ip("198.18.40.1"), ip("198.18.50.1"), false, PROBE_ID_BASE | 3, 1, 64);
        check(&mut fx, "probe", true, &probe, Some(PROBE_MARK));
        check(&mut fx, "probe reply", false, &icmp_echo_with(ip("198.18.50.1"), ip("198.18.40.1"), true, PROBE_ID_BASE | 3, 1, 60), None);
        // The owner's NIC deleted.
        fx.bind(VIP4, other_nic, OWNER_MAC);
        ns.ip(&["link", "del", "own0"]).unwrap();
        check(&mut fx, "steered to a deleted NIC", true, &reply, None);
        check(&mut fx, "not a VIP", false, &build(L4::Tcp, ip(CLIENT4), 40000, ip("198.18.100.9"), 80, None, b"x"), None);

        let reasons: Vec<&str> = Outcome::ALL.iter().filter(|o| o.is_drop()).map(|o| o.name()).collect();
        for r in &reasons {
            assert!(seen.contains(r), "drop reason {r} never reached: {seen:?}");
        }
    });
}

/// Probes: timestamped when they leave (TC, marked by havipd's socket), measured and
/// consumed when the reply from the probed target arrives (XDP).
#[test]
fn probe_replies_are_measured_in_the_kernel_and_consumed() {
    on_each_hook(probe_replies_are_measured_in_the_kernel_and_consumed_on)
}

fn probe_replies_are_measured_in_the_kernel_and_consumed_on(hook: Hook) {
    use havip_common::{PROBE_ID_BASE, PROBE_MARK};
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    for (nic_addr, target) in [("198.18.40.1", "198.18.50.1"), ("2001:db8:40::1", "2001:db8:50::1")] {
        let slot = if target.contains(':') { 7 } else { 3 };
        fx.maps.set_probe_slot(slot, Some((TEST_IFINDEX, ip(target))), (havip_common::PROBE_KIND_ICMP, None)).unwrap();
        let id = PROBE_ID_BASE | slot as u16;
        let request = icmp_echo_with(ip(nic_addr), ip(target), false, id, 1, 64);
        // Without havipd's mark it is somebody else's ping: not timestamped.
        assert_eq!(fx.egress(&request).out, request);
        let r = fx.egress_marked(&request, PROBE_MARK);
        assert_eq!((r.action, r.out == request), (TC_ACT_OK, true), "{target}: probes leave untouched");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let reply = icmp_echo_with(ip(target), ip(nic_addr), true, id, 1, 62);
        // A reply from anyone but the probed target is not ours: it passes.
        let spoofed = icmp_echo_with(ip(if target.contains(':') { "2001:db8:50::9" } else { "198.18.50.9" }), ip(nic_addr), true, id, 1, 62);
        assert_eq!(fx.ingress(&spoofed).action, XDP_PASS);
        let r = fx.ingress(&reply);
        assert_eq!(r.action, XDP_DROP, "{target}: the probe reply is consumed");
        let st = fx.maps.probe_stats.get(&slot, 0).unwrap();
        assert_eq!((st.sent, st.received, st.last_ttl), (1, 1, 62), "{target}");
        assert!(st.last_rtt_ns >= 5_000_000 && st.last_rtt_ns < 1_000_000_000, "{target}: rtt {} ns", st.last_rtt_ns);
        assert_eq!(st.rtt_ewma_ns, st.last_rtt_ns, "first sample");
        assert_eq!(st.rtt_hist.iter().sum::<u64>(), 1);
        // The same reply again (a duplicate) is consumed but not measured twice.
        assert_eq!(fx.ingress(&reply).action, XDP_DROP);
        assert_eq!(fx.maps.probe_stats.get(&slot, 0).unwrap().received, 1);
        // Echo replies that are not probes (other identifiers) go to the kernel.
        let other = icmp_echo_with(ip(target), ip(nic_addr), true, 0x1234, 1, 62);
        assert_eq!(fx.ingress(&other).out, other);
    }
    assert_eq!(fx.outcome(Direction::Egress, Outcome::ProbeSent), 2);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::ProbeReply), 4);
}

/// Passive TCP RTT: a SYN-ACK or a data segment leaving a VIP starts a sample, the ACK
/// covering it ends it; a segment resending sampled bytes counts as a retransmission.
#[test]
fn tcp_round_trips_are_sampled_from_live_traffic() {
    use havip_common::{PeerKey, VipKey};
    use etherparse::PacketBuilder;
    let mut fx = Fixture::new(TWO_VIPS);
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    let vip_id = fx.maps.vips.get(&VipKey::from(ip(VIP4)), 0).unwrap().id;
    let key = PeerKey { peer: VipKey::from(ip(CLIENT4)), vip_id, nic_index: 0 };
    let seg = |from_vip: bool, seq: u32, ack: u32, syn: bool, payload: &[u8]| {
        let (src, dst, sp, dp) = if from_vip { (VIP4, CLIENT4, 8081, 40000) } else { (CLIENT4, VIP4, 40000, 80) };
        let b = PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_MAC).ipv4(
            match ip(src) { IpAddr::V4(a) => a.octets(), _ => unreachable!() },
            match ip(dst) { IpAddr::V4(a) => a.octets(), _ => unreachable!() },
            64,
        );
        let mut t = b.tcp(sp, dp, seq, 65535).ack(ack);
        if syn {
            t = t.syn();
        }
        let mut out = Vec::new();
        t.write(&mut out, payload).unwrap();
        out
    };
    // Handshake: SYN-ACK out (seq 1000), the client's ACK of 1001 in.
    fx.egress(&seg(true, 1000, 5001, true, b""));
    std::thread::sleep(std::time::Duration::from_millis(3));
    fx.ingress(&seg(false, 5001, 1001, false, b""));
    let st = fx.maps.peer_quality.get(&key, 0).expect("no sample from the handshake");
    assert_eq!(st.samples, 1);
    assert!(st.last_rtt_ns >= 3_000_000, "{st:?}");
    // Data: 100 bytes out at 1001, an ACK of 1050 does not cover it, 1101 does.
    fx.egress(&seg(true, 1001, 5001, false, &[7; 100]));
    fx.ingress(&seg(false, 5001, 1050, false, b""));
    assert_eq!(fx.maps.peer_quality.get(&key, 0).unwrap().samples, 1, "a partial ACK ends no sample");
    fx.ingress(&seg(false, 5001, 1101, false, b""));
    assert_eq!(fx.maps.peer_quality.get(&key, 0).unwrap().samples, 2);
    // Retransmission: 1101..1201 sampled, then sent again before any ACK.
    fx.egress(&seg(true, 1101, 5001, false, &[7; 100]));
    fx.egress(&seg(true, 1101, 5001, false, &[7; 100]));
    let st = fx.maps.peer_quality.get(&key, 0).unwrap();
    assert_eq!((st.samples, st.retransmits), (2, 1));
    // Karn: the ACK that follows is ambiguous and gives no sample.
    fx.ingress(&seg(false, 5001, 1201, false, b""));
    assert_eq!(fx.maps.peer_quality.get(&key, 0).unwrap().samples, 2);
}

/// havipd loads the variant without passive TCP measurement when `[passive] tcp = false`:
/// it remaps and steers the same, and samples nothing.
#[test]
fn the_variant_without_passive_measurement_remaps_the_same() {
    let mut fx = Fixture::new_with(TWO_VIPS, false);
    assert_eq!(fx.dp.ingress, havip_common::maps::PROG_INGRESS);
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    for (fam, l4, vlan) in cases() {
        let (client, vip) = addrs(fam);
        let r = fx.ingress(&build(l4, client, 40000, vip, 80, vlan, b"x"));
        let v = inspect(&r.out);
        assert_eq!(v.dport, 8081, "{fam} {l4:?}");
        assert!(v.checksum_ok);
        let r = fx.egress(&build(l4, vip, 8081, client, 40000, vlan, b"y"));
        assert_eq!(inspect(&r.out).sport, 80, "{fam} {l4:?}");
    }
    assert_eq!(fx.maps.peer_quality.iter().count(), 0, "nothing sampled");
}

/// TCP SYN probes: the SYN leaves from the slot's port (timestamped when marked), and the
/// SYN-ACK or RST from the probed target and port is measured and consumed.
#[test]
fn tcp_syn_probes_are_measured_and_their_answers_consumed() {
    on_each_hook(tcp_syn_probes_are_measured_and_their_answers_consumed_on)
}

fn tcp_syn_probes_are_measured_and_their_answers_consumed_on(hook: Hook) {
    use etherparse::PacketBuilder;
    use havip_common::{PROBE_MARK, PROBE_PORT_BASE};
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let (nic, target, slot) = ("198.18.40.1", "198.18.50.1", 5u32);
    fx.maps.set_probe_slot(slot, Some((TEST_IFINDEX, ip(target))), (havip_common::PROBE_KIND_TCP, Some(443))).unwrap();
    let seg = |src: &str, dst: &str, sport: u16, dport: u16, seq: u32, ack: Option<u32>, syn: bool, rst: bool| {
        let v4 = |a: &str| match ip(a) { IpAddr::V4(a) => a.octets(), _ => unreachable!() };
        let mut t = PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_MAC).ipv4(v4(src), v4(dst), 60).tcp(sport, dport, seq, 1024);
        if let Some(a) = ack {
            t = t.ack(a);
        }
        if syn {
            t = t.syn();
        }
        if rst {
            t = t.rst();
        }
        let mut out = Vec::new();
        t.write(&mut out, b"").unwrap();
        out
    };
    let port = PROBE_PORT_BASE + slot as u16;
    for (seq, rst) in [(100u32, false), (101, true)] {
        let syn = seg(nic, target, port, 443, seq, None, true, false);
        assert_eq!(fx.egress_marked(&syn, PROBE_MARK).out, syn, "probes leave untouched");
        std::thread::sleep(std::time::Duration::from_millis(2));
        // An answer from another port of the target is not the probe's.
        let wrong = seg(target, nic, 80, port, 9, Some(seq + 1), !rst, rst);
        assert_eq!(fx.ingress(&wrong).action, XDP_PASS);
        let answer = seg(target, nic, 443, port, 9, Some(seq + 1), !rst, rst);
        assert_eq!(fx.ingress(&answer).action, XDP_DROP, "the answer is consumed (rst={rst})");
    }
    let st = fx.maps.probe_stats.get(&slot, 0).unwrap();
    assert_eq!((st.sent, st.received), (2, 2));
    assert!(st.last_rtt_ns >= 2_000_000, "{st:?}");
    // A SYN without havipd's mark is somebody's connection: not timestamped.
    fx.egress(&seg(nic, target, port, 443, 102, None, true, false));
    assert_eq!(fx.maps.probe_stats.get(&slot, 0).unwrap().sent, 2);
}

/// UDP probes: the probe leaves from the slot's port with its sequence in the payload;
/// a UDP answer from the probed port, or the target's ICMP port unreachable quoting the
/// probe, is measured and consumed.
#[test]
fn udp_probes_are_answered_by_udp_or_by_port_unreachable() {
    on_each_hook(udp_probes_are_answered_by_udp_or_by_port_unreachable_on)
}

fn udp_probes_are_answered_by_udp_or_by_port_unreachable_on(hook: Hook) {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
    use havip_common::{PROBE_KIND_UDP, PROBE_MARK, PROBE_PORT_BASE};
    let mut fx = Fixture::new(TWO_VIPS).with_hook(hook);
    let (nic, target, slot) = ([198, 18, 40, 1], [198, 18, 50, 1], 9u32);
    fx.maps.set_probe_slot(slot, Some((TEST_IFINDEX, ip("198.18.50.1"))), (PROBE_KIND_UDP, Some(33434))).unwrap();
    let port = PROBE_PORT_BASE + slot as u16;
    let udp = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, seq: u32| {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend_from_slice(b"havip-pr");
        let mut out = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_MAC).ipv4(src, dst, 60).udp(sport, dport).write(&mut out, &payload).unwrap();
        out
    };
    // 1: a UDP answer from the probed port.
    let probe = udp(nic, target, port, 33434, 1);
    assert_eq!(fx.egress_marked(&probe, PROBE_MARK).out, probe);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(fx.ingress(&udp(target, nic, 53, port, 1)).action, XDP_PASS, "another port's datagram is not the answer");
    assert_eq!(fx.ingress(&udp(target, nic, 33434, port, 1)).action, XDP_DROP);
    // 2: the target's port unreachable, quoting the probe (IP header onwards).
    let probe = udp(nic, target, port, 33434, 2);
    fx.egress_marked(&probe, PROBE_MARK);
    std::thread::sleep(std::time::Duration::from_millis(2));
    let mut err = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_MAC)
        .ipv4(target, nic, 60)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
        .write(&mut err, &probe[14..])
        .unwrap();
    assert_eq!(fx.ingress(&err).action, XDP_DROP, "the port unreachable is the answer");
    let st = fx.maps.probe_stats.get(&slot, 0).unwrap();
    assert_eq!((st.sent, st.received), (2, 2), "{st:?}");
    assert!(st.last_rtt_ns >= 2_000_000);
    // A port unreachable quoting something else passes to the kernel.
    let other = udp(nic, target, 40000, 33434, 3);
    let mut err = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, CLIENT_MAC)
        .ipv4(target, nic, 60)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
        .write(&mut err, &other[14..])
        .unwrap();
    assert_eq!(fx.ingress(&err).out, err);
}

// Application classes ------------------------------------------------------------------

/// The two VIPs with classes: the IPv4 VIP in `latency` (its own CPU queue on CPU 0 and
/// an HTB class), UDP port 5001 of it in `bulk` (an HTB class only); the IPv6 VIP in none.
fn classed() -> String {
    TWO_VIPS.replace(
        "[[vip]]\naddress = \"198.18.100.1\"\n",
        "[[vip]]\naddress = \"198.18.100.1\"\nclass = \"latency\"\n[[vip.port_class]]\nprotocol = \"udp\"\nport = 5001\nclass = \"bulk\"\n",
    ) + "[class.latency]\ncpus = [0]\nrate = \"10mbit\"\n[class.bulk]\nrate = \"20mbit\"\n"
}

const XDP_REDIRECT: u32 = 4;

#[test]
fn a_classed_vip_goes_to_its_class_cpu_queue_remapped_and_counted() {
    let mut fx = Fixture::new(&classed());
    let frame = build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 80, None, b"hello");
    let r = fx.ingress(&frame);
    assert_eq!(r.action, XDP_REDIRECT, "to the cpumap");
    // BPF_PROG_RUN returns the frame with its XDP metadata: the class, for the program on
    // the queue's CPU.
    let id = fx.maps.class_ids().unwrap()["latency"];
    let (meta, out) = r.out.split_at(8);
    assert_eq!(meta[..4], havip_common::CLASS_META_MAGIC.to_ne_bytes());
    assert_eq!(meta[4..], id.to_ne_bytes());
    assert_eq!(inspect(out).dport, 8081, "remapped before it is queued");
    assert!(inspect(out).checksum_ok);
    let c = fx.class_counters(VIP4, "latency");
    assert_eq!((c.rx_packets, c.rx_bytes, c.rx_queued), (1, frame.len() as u64, 1));
    assert_eq!(fx.class_counters(VIP4, "bulk").rx_packets, 0);
    // Run again and again on the same frame (as the bench does), it still carries exactly
    // one ClassMeta, written each run: metadata does not pile up until the store is skipped.
    let r = fx.time(havip_common::maps::PROG_INGRESS, &out.to_vec(), 10);
    assert_eq!(r.out.len(), frame.len() + 8, "metadata piled up over repeated runs");
    assert_eq!(r.out[4..8], id.to_ne_bytes());
}

#[test]
fn a_port_class_overrides_the_vip_class_and_a_class_without_cpus_takes_the_normal_path() {
    let mut fx = Fixture::new(&classed());
    let frame = build(L4::Udp, ip(CLIENT4), 40000, ip(VIP4), 5001, None, b"bulk");
    let r = fx.ingress(&frame);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.out, frame, "untouched: 5001 is not remapped");
    let c = fx.class_counters(VIP4, "bulk");
    assert_eq!((c.rx_packets, c.rx_queued), (1, 0));
    assert_eq!(fx.class_counters(VIP4, "latency").rx_packets, 0);
    // TCP 5001 is not overridden: the VIP's class.
    let r = fx.ingress(&build(L4::Tcp, ip(CLIENT4), 40000, ip(VIP4), 5001, None, b"x"));
    assert_eq!(r.action, XDP_REDIRECT);
}

#[test]
fn a_vip_without_a_class_passes_as_before() {
    let mut fx = Fixture::new(&classed());
    let frame = build(L4::Tcp, ip(CLIENT6), 40000, ip(VIP6), 80, None, b"hello");
    let r = fx.ingress(&frame);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(inspect(&r.out).dport, 8081);
    let (r, prio) = fx.egress_priority(&build(L4::Tcp, ip(VIP6), 8081, ip(CLIENT6), 40000, None, b"reply"));
    assert_eq!((r.action, prio), (TC_ACT_OK, 0), "priority left alone");
}

#[test]
fn egress_puts_each_class_into_its_htb_class_by_skb_priority() {
    use havip_user::kernel::{classes::class_minor, qdisc::skb_priority};
    let mut fx = Fixture::new(&classed());
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    let ids = fx.maps.class_ids().unwrap();
    // A reply from the instance port: remapped back to :80, in the VIP's class.
    let (r, prio) = fx.egress_priority(&build(L4::Tcp, ip(VIP4), 8081, ip(CLIENT4), 40000, None, b"reply"));
    assert_eq!(r.action, TC_ACT_OK);
    assert_eq!(inspect(&r.out).sport, 80);
    assert_eq!(prio, skb_priority(class_minor(ids["latency"])));
    let (_, prio) = fx.egress_priority(&build(L4::Udp, ip(VIP4), 5001, ip(CLIENT4), 40000, None, b"bulk"));
    assert_eq!(prio, skb_priority(class_minor(ids["bulk"])));
    let c = fx.class_counters(VIP4, "latency");
    assert_eq!(c.tx_packets, 1);
    assert_eq!(fx.class_counters(VIP4, "bulk").tx_packets, 1);
}

/// CLOCK_BOOTTIME now, ns: the clock the programs compare fences with.
fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn a_cluster_vip_is_answered_and_sourced_only_before_its_fence() {
    on_each_hook(a_cluster_vip_is_answered_and_sourced_only_before_its_fence_on)
}

fn a_cluster_vip_is_answered_and_sourced_only_before_its_fence_on(hook: Hook) {
    let cfg = format!("{TWO_VIPS}\n[cluster]\nnode = \"n1\"\netcd_endpoints = [\"http://198.18.30.200:2379\"]\n");
    let mut fx = Fixture::new(&cfg).with_hook(hook);
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    fx.bind(VIP6, TEST_IFINDEX, OWNER_MAC);
    let id = fx.dp.vip_id(ip(VIP4)).unwrap();
    let id6 = fx.dp.vip_id(ip(VIP6)).unwrap();
    let arp = arp_request([198, 18, 2, 2], [198, 18, 100, 1]);
    let ns = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
    let reply = build(L4::Udp, ip(VIP4), 8081, ip(CLIENT4), 40000, None, b"as the VIP");
    const TC_ACT_SHOT: u32 = 2;
    let set = |fx: &mut Fixture, id: u32, until: u64| fx.maps.fences.set(id, havip_common::Fence { serve_until_ns: until, epoch: 5 }, 0).unwrap();

    // A fresh cluster VIP (fence zeroed when its id was assigned) serves nothing.
    assert_eq!(fx.ingress(&arp).action, XDP_DROP, "ARP before any confirmation");
    assert_eq!(fx.ingress(&ns).action, XDP_DROP, "NS before any confirmation");
    assert_eq!(fx.egress(&reply).action, TC_ACT_SHOT, "sourced from the VIP before any confirmation");
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::Fenced), 2);
    assert_eq!(fx.outcome(Direction::Egress, Outcome::Fenced), 1);
    assert_eq!(fx.vip(VIP4).tx.dropped, 1);
    assert_eq!(fx.vip(VIP4).wire.arp_replies, 0);

    // Confirmed for 10 s: answered and sourced as a standalone VIP is.
    set(&mut fx, id, boot_ns() + 10_000_000_000);
    set(&mut fx, id6, boot_ns() + 10_000_000_000);
    let r = fx.ingress(&arp);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(&r.out[22..28], &OWNER_MAC, "sender MAC: the owner");
    assert_eq!(fx.ingress(&ns).action, XDP_TX);
    assert_eq!(fx.egress(&reply).action, TC_ACT_OK);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::ArpReplied), 1);

    // The time passed (1 ms ago): silent again, with nobody writing anything.
    set(&mut fx, id, boot_ns() - 1_000_000);
    assert_eq!(fx.ingress(&arp).action, XDP_DROP);
    assert_eq!(fx.egress(&reply).action, TC_ACT_SHOT);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::Fenced), 3);
    assert_eq!(fx.outcome(Direction::Egress, Outcome::Fenced), 2);
    // The other VIP's fence is its own.
    assert_eq!(fx.ingress(&ns).action, XDP_TX);
}

#[test]
fn a_standalone_vip_ignores_the_fence_map() {
    let mut fx = Fixture::new(TWO_VIPS);
    fx.bind(VIP4, TEST_IFINDEX, OWNER_MAC);
    // Zero fence, as every id starts: standalone VIPs are not flagged, so it does not apply.
    let id = fx.dp.vip_id(ip(VIP4)).unwrap();
    assert_eq!(fx.maps.fences.get(&id, 0).unwrap().serve_until_ns, 0);
    assert_eq!(fx.ingress(&arp_request([198, 18, 2, 2], [198, 18, 100, 1])).action, XDP_TX);
    assert_eq!(fx.outcome(Direction::Ingress, Outcome::Fenced), 0);
}

// Consistent reads of values havipd rewrites while packets read them -------------------

/// How a racing run ended: each output matched version A, version B, the tables (a reader
/// that found havipd publishing during each of its attempts falls back to them), or none
/// of them (a mix).
#[derive(Debug, Default)]
struct RaceTally {
    a: u64,
    b: u64,
    tables: u64,
    mixed: u64,
    first_mix: Option<String>,
}

impl RaceTally {
    fn check(&self, what: &str) {
        eprintln!("{what}: {self:?}");
        assert_eq!(self.mixed, 0, "{what}: {} of {} outputs mixed two versions, e.g. {:?}", self.mixed, self.a + self.b + self.mixed, self.first_mix);
        // Both versions must really have been seen, many times: otherwise the writer did not
        // race the reader and the test proves nothing.
        let total = self.a + self.b;
        assert!(self.a * 50 > total && self.b * 50 > total, "{what}: the writer did not race the reader: {self:?}");
    }
}

/// Pins the calling thread to CPU `cpu`; returns its previous CPU set.
fn pin_to_cpu(cpu: usize) -> libc::cpu_set_t {
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pinning to CPU {cpu}");
        old
    }
}

/// Runs `reader` `runs` times while another thread writes `version(false)`, `version(true)`,
/// ... through its own handle on the pinned maps, as fast as it can. The two threads are
/// pinned to two CPUs, so they always run at the same time (sharing one CPU, a reader
/// would only ever meet a write it was preempted in), and the reader starts once version A
/// is in place and the writer is running.
fn race(fx: &mut Fixture, runs: u32, write: impl Fn(&mut havip_user::kernel::dataplane::Maps, bool) + Send + 'static, mut reader: impl FnMut(&mut Fixture)) {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    assert!(std::thread::available_parallelism().unwrap().get() >= 2, "the race needs two CPUs");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut maps = havip_user::kernel::dataplane::Maps::open(fx.pins()).unwrap();
    write(&mut maps, false);
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || {
            pin_to_cpu(1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                write(&mut maps, n % 2 == 1);
                writes.store(n, Ordering::Relaxed);
            }
        })
    };
    let old = pin_to_cpu(0);
    while writes.load(Ordering::Relaxed) == 0 {
        std::hint::spin_loop();
    }
    for _ in 0..runs {
        reader(fx);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &old) };
    eprintln!("writer: {} writes during {runs} runs", writes.load(Ordering::Relaxed));
}

/// A binding flipped between two complete versions while ARP requests and neighbour
/// solicitations for its VIPs run through the program: version A (this NIC, MAC A) answers
/// from MAC A, version B (another NIC, MAC B) drops the request. An answer from MAC B, or
/// with two different MACs, mixed the ifindex of one version with the MAC of the other. (A
/// read that gives up acts as unbound and drops the request too, like B: a build that
/// answered from a marker MAC instead saw none give up in 3 runs of 400,000.)
#[test]
fn a_binding_rewritten_during_a_packet_is_seen_whole() {
    const MAC_A: [u8; 6] = [0x02, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa];
    const MAC_B: [u8; 6] = [0x02, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb];
    let mut fx = Fixture::new(TWO_VIPS);
    let ids = [fx.dp.vip_id(ip(VIP4)).unwrap(), fx.dp.vip_id(ip(VIP6)).unwrap()];
    let version = |b: bool| {
        if b {
            havip_common::Binding { ifindex: 9999, nic_index: 1, mac: MAC_B, bound_at_ns: 2, moves: 2, ..Default::default() }
        } else {
            havip_common::Binding { ifindex: TEST_IFINDEX, nic_index: 0, mac: MAC_A, bound_at_ns: 1, moves: 1, ..Default::default() }
        }
    };
    let arp = arp_request([198, 18, 2, 2], [198, 18, 100, 1]);
    let ns = neighbor_solicitation(ip6(CLIENT6), ip6(VIP6), true);
    let mut tally = RaceTally::default();
    let mut n = 0u32;
    let write = move |maps: &mut havip_user::kernel::dataplane::Maps, b: bool| {
        for id in ids {
            maps.set_binding(id, version(b)).unwrap();
        }
    };
    race(&mut fx, 400_000, write, |fx| {
        n += 1;
        let (input, macs): (&[u8], [std::ops::Range<usize>; 2]) = if n % 2 == 0 { (&arp, [6..12, 22..28]) } else { (&ns, [6..12, 80..86]) };
        let r = fx.ingress(input);
        let seen: Vec<&[u8]> = macs.iter().map(|m| r.out.get(m.clone()).unwrap_or(&[])).collect();
        match r.action {
            XDP_TX if seen.iter().all(|m| *m == MAC_A) => tally.a += 1,
            XDP_DROP if r.out == input => tally.b += 1,
            _ => {
                tally.mixed += 1;
                tally.first_mix.get_or_insert_with(|| format!("action {} MACs {seen:02x?}", r.action));
            }
        }
    });
    tally.check("binding");
}

/// A fast-path slot flipped between two complete versions while packets to its VIP run
/// through the program: version A (owned by the VIP, TCP 80 -> 8082) remaps to 8082,
/// version B (owned by another VIP of the same slot, TCP 80 -> 9091) leaves the packet
/// alone (not this VIP). A packet remapped to 9091 paired A's key with B's mappings. The
/// tables (the configuration: 80 -> 8081) answer a read that gave up.
#[test]
fn a_fast_path_slot_rewritten_during_a_packet_is_seen_whole() {
    use havip_common::{vip_slot, InlineRemap, VipInfo, VipKey, VipSlot, IPPROTO_TCP, SLOT_OWNED};
    let mut seen = std::collections::HashMap::new();
    let (x, y) = (0..65536u32)
        .find_map(|i| {
            let a = format!("198.18.{}.{}", i >> 8, i & 0xff);
            seen.insert(vip_slot(&VipKey::from(ip(&a))), a.clone()).map(|b| (b, a))
        })
        .unwrap();
    let cfg = format!(
        "[[nic]]\nname = \"eth0\"\n[[vip]]\naddress = \"{x}\"\n[[service]]\nname = \"web\"\nport = 80\n[[service.instance]]\nvip = \"{x}\"\nport = 8081\n"
    );
    let mut fx = Fixture::new(&cfg);
    let idx = vip_slot(&VipKey::from(ip(&x)));
    let remap = |from: u16, to: u16| InlineRemap { from_be: from.to_be(), to_be: to.to_be(), proto: IPPROTO_TCP, _pad: [0; 3] };
    let mut a = fx.slot(idx);
    assert_eq!((a.key, a.remap_in[0]), (VipKey::from(ip(&x)), remap(80, 8081)), "the configured slot");
    a.remap_in[0] = remap(80, 8082);
    let mut b =
        VipSlot { key: VipKey::from(ip(&y)), info: VipInfo { id: a.info.id + 1, flags: 0, class: 0, class_stats: 0 }, flags: SLOT_OWNED, ..Default::default() };
    b.remap_in[0] = remap(80, 9091);
    b.remap_out[0] = remap(9091, 80);
    let input = build(L4::Tcp, ip(CLIENT4), 40000, ip(&x), 80, None, b"race");
    let mut tally = RaceTally::default();
    race(
        &mut fx,
        400_000,
        move |maps, v| Fixture::write_slot(maps, idx, if v { b } else { a }),
        |fx| {
            let r = fx.ingress(&input);
            match (r.action, inspect(&r.out).dport) {
                (XDP_PASS, 8082) => tally.a += 1,
                (XDP_PASS, 80) if r.out == input => tally.b += 1,
                (XDP_PASS, 8081) => tally.tables += 1,
                (action, port) => {
                    tally.mixed += 1;
                    tally.first_mix.get_or_insert_with(|| format!("action {action}, destination port {port}"));
                }
            }
        },
    );
    tally.check("slot");
}
