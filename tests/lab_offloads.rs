//! Checksum and segmentation offloads with real stacks: TSO super-frames
//! from tap VMs pass whole between taps, are cut into MSS-sized VXLAN
//! segments with valid checksums on the underlay (looked at on the wire),
//! merged again toward the receiving VM, and keep their checksums right
//! through NAT. Every iperf3 run also checks that neither stack counted
//! a checksum error (`lab::iperf`). Run serially.

mod lab;

use std::process::{Command, Stdio};
use std::time::Duration;

use lab::{iperf, sh, try_sh, wait_until, Lab};

fn ping(ns: &str, ip: &str) -> (bool, String) {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.1", "-W", "1", ip,
    ])
}

/// Port `i`'s counter `name` from `ctl stats`.
fn port_counter(lab: &Lab, sock: &std::path::Path, i: usize, name: &str) -> u64 {
    let st = lab.ctl(sock, "stats").expect("stats");
    st["ports"][i][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} on port {i}: {st}"))
}

#[test]
fn super_frames_pass_whole_from_tap_to_tap() {
    let mut lab = Lab::new();
    let vm = |name, mac, ip| lab::Vm {
        name,
        mac,
        ip,
        network: 100,
    };
    let (a, b) = (lab::VM_A, lab::VM_B);
    let (sock, ns) = lab::one_host(&mut lab, &[vm(a.0, a.1, a.2), vm(b.0, b.1, b.2)]);
    let (na, nb) = (&ns[0], &ns[1]);
    let ta = lab.name("ta");
    let (ok, out) = ping(na, b.2);
    assert!(ok, "ping a → b:\n{out}\n{}", lab.log("sw"));
    let bps = iperf(nb, na, b.2, "5201");
    assert!(bps > 1e6, "TCP a → b: {bps} bit/s");
    // The guest's stack handed over super-frames (TSO on the tap), and
    // they left whole: no 1,500-byte frames in between.
    let rx = port_counter(&lab, &sock, 0, "rx_bytes") / port_counter(&lab, &sock, 0, "rx_packets");
    let tx = port_counter(&lab, &sock, 1, "tx_bytes") / port_counter(&lab, &sock, 1, "tx_packets");
    assert!(
        rx > 4000,
        "a's frames average {rx} bytes: no TSO from the tap"
    );
    assert!(
        tx > 4000,
        "b's frames average {tx} bytes: super-frames were cut"
    );
    assert_eq!(port_counter(&lab, &sock, 1, "tx_segments"), 0);

    // A binary from before tap offloads asking to take over (its request
    // does not say it reads virtio-net headers) is refused, naming why.
    let answer = raw_request(&sock, r#"{"cmd":"handover-prepare","protocol":1}"#);
    assert!(
        answer.contains("predates tap offloads") && answer.contains(&ta),
        "{answer}"
    );
    let answer = raw_request(
        &sock,
        r#"{"cmd":"handover-prepare","protocol":1,"tap_vnet_hdr":true}"#,
    );
    assert!(answer.contains("epoch_mono_ns"), "{answer}");
}

/// One control request as raw JSON, the answer's line.
fn raw_request(sock: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

/// The frames of a pcap file (classic format, Ethernet).
fn pcap_frames(path: &std::path::Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).expect("pcap");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 16;
        if at + incl > b.len() {
            break;
        }
        frames.push(b[at..at + incl].to_vec());
        at += incl;
    }
    frames
}

/// The ones'-complement checksum of the TCP segment in the IPv4 packet at
/// `ip` of `f`, including its field: 0xffff when it is right.
fn tcp_sum(f: &[u8], ip: usize) -> u16 {
    let ihl = usize::from(f[ip] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    let mut s: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&f[ip + 12..ip + 20]);
    add(&[0, 6]);
    add(&u16::try_from(tot - ihl).unwrap().to_be_bytes());
    add(&f[ip + ihl..ip + tot]);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).unwrap()
}

#[test]
fn a_tso_stream_crosses_hypervisors_as_mss_segments_and_is_merged_again() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    // The underlay goes through a bridge in a namespace of its own, where
    // it can be captured (on the hypervisors' own links XDP takes frames
    // before any capture sees them).
    let mid = lab.netns("md");
    let (u1, u2, m1, m2) = (
        lab.name("u1"),
        lab.name("u2"),
        lab.name("w1"),
        lab.name("w2"),
    );
    for (u, hv, m, ip) in [
        (&u1, &hv1, &m1, "192.168.62.1/24"),
        (&u2, &hv2, &m2, "192.168.62.2/24"),
    ] {
        sh(&[
            "ip", "link", "add", u, "netns", hv, "type", "veth", "peer", "name", m, "netns", &mid,
        ]);
        sh(&["ip", "-n", hv, "addr", "add", ip, "dev", u]);
        sh(&["ip", "-n", hv, "link", "set", u, "up"]);
    }
    sh(&["ip", "-n", &mid, "link", "add", "br0", "type", "bridge"]);
    for m in [&m1, &m2] {
        sh(&["ip", "-n", &mid, "link", "set", m, "master", "br0", "up"]);
    }
    sh(&["ip", "-n", &mid, "link", "set", "br0", "up"]);
    let b = lab::VM_B;
    let lab::TwoHosts { s1, s2, ta, tb } = lab::two_hosts(
        &mut lab,
        (&hv1, &hv2),
        (&vm1, &vm2),
        (&u1, &u2),
        ("192.168.62.1", "192.168.62.2"),
    );
    // The first pings wait for the underlay's neighbours.
    lab::warm_underlay(&hv1, "192.168.62.2");
    let (ok, out) = ping(&vm1, b.2);
    assert!(
        ok,
        "ping across:\n{out}\n{}\n{}",
        lab.log("sw1"),
        lab.log("sw2")
    );
    // Capture the underlay as the first hypervisor sends it.
    let pcap = lab.dir.join("underlay.pcap");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &mid, "tcpdump", "-i", &m1, "-s", "0", "-c", "400", "-U", "-w",
        ])
        .arg(&pcap)
        .args(["udp", "dst", "port", "4789"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump (scripts/deps installs it)");
    wait_until("tcpdump to start", Duration::from_secs(5), || {
        std::fs::metadata(&pcap).is_ok()
    });
    let bps = iperf(&vm2, &vm1, b.2, "5201");
    assert!(bps > 1e6, "TCP across VXLAN: {bps} bit/s");
    wait_until("tcpdump to finish", Duration::from_secs(10), || {
        matches!(dump.try_wait(), Ok(Some(_)))
    });
    let _ = dump.kill();
    let frames = pcap_frames(&pcap);
    assert!(
        frames.len() >= 100,
        "only {} VXLAN frames captured",
        frames.len()
    );
    let mut full = 0;
    for f in &frames {
        // Outer Ethernet + IPv4 + UDP + VXLAN = 50 bytes, then the inner frame.
        assert!(
            f.len() <= 14 + 1500,
            "a {}-byte frame on a 1500-byte underlay",
            f.len()
        );
        let inner_ip = 50 + 14;
        if f.len() < inner_ip + 40 || f[inner_ip + 9] != 6 {
            continue;
        }
        assert_eq!(
            tcp_sum(f, inner_ip),
            0xffff,
            "a bad inner TCP checksum on the wire"
        );
        let tot = usize::from(u16::from_be_bytes([f[inner_ip + 2], f[inner_ip + 3]]));
        if tot == 1450 {
            full += 1;
        }
    }
    assert!(
        full > 50,
        "only {full} MSS-sized segments among {}",
        frames.len()
    );
    // Cut by sw1 for its uplink, merged by sw2 for the tap.
    assert!(port_counter(&lab, &s1, 1, "tx_segments") > 100);
    assert!(port_counter(&lab, &s2, 0, "tx_coalesced") > 100);

    // VMs that think the path takes 1,500 bytes: their super-frames'
    // segments do not fit the overlay (1,450), the switch answers
    // "fragmentation needed" with the overlay's MTU, the senders' stacks
    // cut smaller segments, and the stream goes on.
    sh(&["ip", "-n", &vm1, "link", "set", &ta, "mtu", "1500"]);
    sh(&["ip", "-n", &vm2, "link", "set", &tb, "mtu", "1500"]);
    let bps = iperf(&vm2, &vm1, b.2, "5202");
    assert!(bps > 1e6, "TCP with path MTU discovery: {bps} bit/s");
    let st = lab.ctl(&s1, "stats").expect("stats");
    assert!(
        st["punted"]["too_big"].as_u64() > Some(0),
        "no frag-needed: {st}"
    );
    let pmtu = sh(&["ip", "-n", &vm1, "route", "get", b.2]);
    assert!(
        String::from_utf8_lossy(&pmtu.stdout).contains("mtu 1450"),
        "the VM learned the overlay's MTU: {}",
        String::from_utf8_lossy(&pmtu.stdout)
    );
}

#[test]
fn a_nated_stream_s_checksums_hold_where_a_router_completes_them() {
    let mut lab = Lab::new();
    let (tv, tx) = (lab.name("tv"), lab.name("tx"));
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\nsnat = true\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[port]]\nname = \"{tx}\"\ntype = \"tap\"\n[[port]]\nname = \"{tv}\"\ntype = \"tap\"\n\n\
         [external]\nport = \"{tx}\"\ncidr = \"203.0.113.0/24\"\ngateway = \"203.0.113.1\"\nsnat = [\"203.0.113.10\"]\n\n\
         [[vm]]\nname = \"a\"\nport = \"{tv}\"\nmac = \"02:00:00:00:00:0a\"\nips = [\"10.0.0.10\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
    );
    lab.vswitch("sw", &cfg);
    let vm = lab.netns("va");
    lab.attach_vm(&tv, &vm, "02:00:00:00:00:0a", "10.0.0.10/24");
    sh(&[
        "ip", "-n", &vm, "route", "add", "default", "via", "10.0.0.1",
    ]);
    // The external network's router, and a host behind it. The router's
    // link to the host completes checksums in software (tx off), from the
    // partial checksums the switch passed on after NAT.
    let (ext, far) = (lab.netns("ex"), lab.netns("fa"));
    lab.attach_vm(&tx, &ext, "02:ee:00:00:00:01", "203.0.113.1/24");
    let (re, fh) = (lab.name("re"), lab.name("fh"));
    sh(&[
        "ip", "link", "add", &re, "netns", &ext, "type", "veth", "peer", "name", &fh, "netns", &far,
    ]);
    sh(&[
        "ip",
        "-n",
        &ext,
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        &re,
    ]);
    sh(&[
        "ip",
        "-n",
        &far,
        "addr",
        "add",
        "198.51.100.2/24",
        "dev",
        &fh,
    ]);
    sh(&["ip", "-n", &ext, "link", "set", &re, "up"]);
    sh(&["ip", "-n", &far, "link", "set", &fh, "up"]);
    sh(&[
        "ip",
        "-n",
        &far,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &ext,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &ext, "ethtool", "-K", &re, "tx", "off",
    ]);
    assert!(ok, "ethtool (scripts/deps installs it): {out}");
    let (ok, out) = ping(&vm, "198.51.100.2");
    assert!(ok, "VM → host behind the router:\n{out}\n{}", lab.log("sw"));
    let bps = iperf(&far, &vm, "198.51.100.2", "5201");
    assert!(bps > 1e6, "NATed TCP: {bps} bit/s");
}

/// ping with `size` bytes of payload, don't fragment: one IP packet of
/// `size` + 28 bytes each way.
fn ping_whole(ns: &str, ip: &str, size: usize) -> (bool, String) {
    try_sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "ping",
        "-c",
        "3",
        "-i",
        "0.1",
        "-W",
        "1",
        "-M",
        "do",
        "-s",
        &size.to_string(),
        ip,
    ])
}

/// Port `i`'s average frame, tx or rx, in bytes.
fn average(lab: &Lab, sock: &std::path::Path, i: usize, dir: &str) -> u64 {
    let bytes = port_counter(lab, sock, i, &format!("{dir}_bytes"));
    bytes / port_counter(lab, sock, i, &format!("{dir}_packets")).max(1)
}

#[test]
fn a_jumbo_underlay_carries_9000_byte_packets_whole() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    let (u1, u2) = lab::wire(&lab, &hv1, "192.168.63.1", &hv2, "192.168.63.2");
    sh(&["ip", "-n", &hv1, "link", "set", &u1, "mtu", "9050"]);
    sh(&["ip", "-n", &hv2, "link", "set", &u2, "mtu", "9050"]);
    let (a, b) = (lab::VM_A, lab::VM_B);
    let lab::TwoHosts { s1, s2, .. } = lab::two_hosts_at(
        &mut lab,
        (&hv1, &hv2),
        (&vm1, &vm2),
        (&u1, &u2),
        ("192.168.63.1", "192.168.63.2"),
        9050,
    );
    lab::warm_underlay(&hv1, "192.168.63.2");
    // 9 000-byte IP packets, 9 064-byte frames on the underlay: each
    // arrives at the other switch's AF_XDP socket in six pieces and
    // leaves its own as a chain of five.
    let (ok, out) = ping_whole(&vm1, b.2, 8972);
    assert!(
        ok,
        "9 000-byte ping across:\n{out}\n{}\n{}",
        lab.ctl(&s1, "stats").expect("stats"),
        lab.ctl(&s2, "stats").expect("stats"),
    );
    assert!(
        average(&lab, &s1, 1, "tx") > 9000,
        "sw1's uplink sent jumbo frames"
    );
    assert!(
        average(&lab, &s2, 1, "rx") > 9000,
        "sw2's uplink received them whole"
    );
    // TCP at MSS 8 960: the tap VM's super-frames cut into jumbo
    // segments, merged again for the other VM; no checksum error on
    // either stack (`iperf`).
    let bps = iperf(&vm2, &vm1, b.2, "5201");
    assert!(bps > 1e6, "TCP over the jumbo underlay: {bps} bit/s");
    assert!(port_counter(&lab, &s1, 1, "tx_segments") > 100);
    assert!(average(&lab, &s1, 1, "tx") > 8000, "jumbo segments");
    assert!(port_counter(&lab, &s2, 0, "tx_coalesced") > 100);
    // One byte more than the overlay's MTU, from a VM that thinks its
    // link is larger: answered with "fragmentation needed" and the
    // overlay's MTU by the switch, which the VM's stack learns.
    let ta = lab.name("ta");
    sh(&["ip", "-n", &vm1, "link", "set", &ta, "mtu", "9100"]);
    let (ok, out) = ping_whole(&vm1, b.2, 8973);
    assert!(
        !ok,
        "a 9 001-byte packet crossed a 9 000-byte overlay: {out}"
    );
    let pmtu = sh(&["ip", "-n", &vm1, "route", "get", b.2]);
    assert!(
        String::from_utf8_lossy(&pmtu.stdout).contains("mtu 9000"),
        "the VM learned the overlay's MTU: {}\n{out}",
        String::from_utf8_lossy(&pmtu.stdout)
    );
    sh(&["ip", "-n", &vm1, "link", "set", &ta, "mtu", "9000"]);
    // A live upgrade keeps the sockets' multi-buffer binding: the new
    // binary sends and receives jumbo frames at once.
    lab.takeover_in(
        &hv2,
        std::path::Path::new(env!("CARGO_BIN_EXE_vswitch")),
        "sw2",
    );
    lab.assert_handed_over(1, "sw2");
    let (ok, out) = ping_whole(&vm2, a.2, 8972);
    assert!(
        ok,
        "9 000-byte ping after sw2's upgrade:\n{out}\n{}",
        lab.log("sw2-new")
    );
}

#[test]
fn an_af_xdp_vm_port_carries_9000_byte_packets_in_pieces() {
    let mut lab = Lab::new();
    let (a, b) = (lab::VM_A, lab::VM_B);
    // One hypervisor with a jumbo underlay (so DHCP's MTU, and what the
    // switch expects of its VMs, is 9 000), VM a on a tap, VM b behind a
    // veth pair at 9 000 whose end here is served by AF_XDP.
    let (hv, far) = (lab.netns("h"), lab.netns("f"));
    let (up, other) = lab::wire(&lab, &hv, "192.168.64.1", &far, "192.168.64.2");
    sh(&["ip", "-n", &hv, "link", "set", &up, "mtu", "9050"]);
    sh(&["ip", "-n", &far, "link", "set", &other, "mtu", "9050"]);
    let nb = lab.netns("vb");
    let (ours, theirs) = (lab.name("xs"), lab.name("xv"));
    lab::veth_vm(
        Some(&hv),
        &ours,
        &theirs,
        &nb,
        b.1,
        &format!("{}/24", b.2),
        Some(9000),
    );
    let tap = lab.name("ta");
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [uplink]\ninterface = \"{up}\"\nvtep = \"192.168.64.1\"\nmtu = 9050\n\n\
         [[port]]\nname = \"{tap}\"\ntype = \"tap\"\n[[port]]\nname = \"{ours}\"\ntype = \"af-xdp\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n[[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{tap}\"\nmac = \"{amac}\"\nips = [\"{aip}\"]\nnetwork = 100\n\
         [[vm]]\nname = \"b\"\nport = \"{ours}\"\nmac = \"{bmac}\"\nips = [\"{bip}\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
        amac = a.1,
        aip = a.2,
        bmac = b.1,
        bip = b.2,
    );
    let sock = lab.vswitch_in(Some(&hv), "sw", &cfg);
    let na = lab.netns("va");
    lab.attach_vm_from(Some(&hv), &tap, &na, a.1, &format!("{}/24", a.2));
    sh(&["ip", "-n", &na, "link", "set", &tap, "mtu", "9000"]);
    // Each way 9 014-byte frames: five or six pieces on the AF_XDP rings.
    let (ok, out) = ping_whole(&na, b.2, 8972);
    assert!(
        ok,
        "9 000 bytes to the AF_XDP VM:\n{out}\n{}",
        lab.log("sw")
    );
    let (ok, out) = ping_whole(&nb, a.2, 8972);
    assert!(ok, "9 000 bytes from the AF_XDP VM:\n{out}");
    // Three requests and three replies each way, counted whole (besides
    // the few small frames ARP and IPv6 make).
    for dir in ["rx", "tx"] {
        let bytes = port_counter(&lab, &sock, 1, &format!("{dir}_bytes"));
        assert!(bytes >= 6 * 9014, "{dir}: {bytes} bytes");
    }
    // The tap VM's super-frames cut into 8 960-byte segments for the
    // AF_XDP port, each sent as a chain.
    let bps = iperf(&nb, &na, b.2, "5201");
    assert!(bps > 1e6, "TCP to the AF_XDP VM: {bps} bit/s");
    assert!(port_counter(&lab, &sock, 1, "tx_segments") > 100);
    assert!(average(&lab, &sock, 1, "tx") > 8000, "jumbo segments");
    // And from it (the average over this stream alone: the first one's
    // ACKs came from the AF_XDP VM too).
    let rx = |n: &str| port_counter(&lab, &sock, 1, n);
    let before = (rx("rx_bytes"), rx("rx_packets"));
    let bps = iperf(&na, &nb, a.2, "5202");
    assert!(bps > 1e6, "TCP from the AF_XDP VM: {bps} bit/s");
    let avg = (rx("rx_bytes") - before.0) / (rx("rx_packets") - before.1).max(1);
    assert!(avg > 8000, "jumbo frames received: {avg} bytes on average");
}
