//! Live handover in the lab: a second copy of the binary takes a running
//! switch over while traffic flows; a new binary that fails leaves the
//! old one forwarding with its state.
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

mod lab;

use std::process::{Command, Stdio};
use std::time::Duration;

use lab::{assert_blackout_bounded, ping_counts, plain, sh, try_sh, Lab, ECHO, PINGER};

struct Switch {
    sock: std::path::PathBuf,
    a: String,
    b: String,
}

/// A and B on tap ports; B in a security group admitting ICMP and the
/// iperf3 port (so the connections through it are tracked state).
fn start(lab: &mut Lab) -> Switch {
    let (ta, tb) = (lab.name("ta"), lab.name("tb"));
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [[port]]\nname = \"{ta}\"\ntype = \"tap\"\n[[port]]\nname = \"{tb}\"\ntype = \"tap\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[security_group]]\nname = \"srv\"\n\
         [[security_group.rule]]\ndirection = \"ingress\"\nprotocol = \"icmp\"\n\
         [[security_group.rule]]\ndirection = \"ingress\"\nprotocol = \"tcp\"\nports = 5201\n\
         [[security_group.rule]]\ndirection = \"egress\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{ta}\"\nmac = \"02:00:00:00:00:0a\"\nips = [\"10.0.0.10\"]\nnetwork = 100\n\
         [[vm]]\nname = \"b\"\nport = \"{tb}\"\nmac = \"02:00:00:00:00:0b\"\nips = [\"10.0.0.11\"]\nnetwork = 100\n\
         security_groups = [\"srv\"]\n",
        sock = lab.socket("sw").display(),
    );
    let sock = lab.vswitch("sw", &cfg);
    let a = lab.netns("va");
    let b = lab.netns("vb");
    lab.attach_vm(&ta, &a, "02:00:00:00:00:0a", "10.0.0.10/24");
    lab.attach_vm(&tb, &b, "02:00:00:00:00:0b", "10.0.0.11/24");
    Switch { sock, a, b }
}

/// What a ping flood saw.
struct Pings {
    sent: u64,
    got: u64,
    /// Sequence numbers never answered (one burst if the handover lost
    /// them; scattered ones would be congestion).
    lost: Vec<u64>,
}

impl Pings {
    fn from_output(out: &str) -> Pings {
        let (sent, got) = ping_counts(out);
        let answered: std::collections::BTreeSet<u64> = out
            .lines()
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|r| r.split(' ').next()?.parse().ok())
            .collect();
        let lost = (1..=sent).filter(|s| !answered.contains(s)).collect();
        Pings { sent, got, lost }
    }

    /// At most `n` lost; else the failure says which and where the
    /// frames might have gone (`context`).
    fn assert_lost_at_most(&self, n: u64, context: &str) {
        let lost = self.sent - self.got;
        assert!(
            lost <= n,
            "{lost} of {} pings lost (seqs {:?})\n{context}",
            self.sent,
            self.lost
        );
    }
}

/// Every link's counters in namespace `ns` (where dropped frames show).
fn links(ns: &str) -> String {
    try_sh(&["ip", "netns", "exec", ns, "ip", "-s", "link"]).1
}

/// Two pings from namespace `ns` to B: (all answered, output).
fn ping_b(ns: &str) -> (bool, String) {
    try_sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "10.0.0.11",
    ])
}

/// A ping flood (2 000 pings, 2 ms apart) and a 5 s iperf3 TCP stream from
/// namespace `from` to `ip` (an iperf3 server started in `to`).
struct Traffic {
    ping: std::process::Child,
    iperf: std::process::Child,
}

impl Traffic {
    fn start(from: &str, to: &str, ip: &str) -> Traffic {
        sh(&[
            "ip", "netns", "exec", to, "iperf3", "-s", "-1", "-D", "-p", "5201",
        ]);
        lab::wait_until("iperf3 server", Duration::from_secs(5), || {
            try_sh(&["ip", "netns", "exec", to, "ss", "-ltn"])
                .1
                .contains(":5201")
        });
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", from])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting traffic")
        };
        // Paced well below what a debug build forwards, so congestion
        // (a full tap queue drops pings too) is not counted as the
        // handover's loss.
        let iperf = spawn(&[
            "iperf3", "-c", ip, "-p", "5201", "-t", "5", "-b", "100M", "-J",
        ]);
        let ping = spawn(&["ping", "-i", "0.002", "-c", "2000", "-W", "1", ip]);
        Traffic { ping, iperf }
    }

    /// Wait for both; the TCP stream must have survived.
    fn finish(self, log: &str) -> Pings {
        let ping = self.ping.wait_with_output().expect("ping");
        let pings = Pings::from_output(&String::from_utf8_lossy(&ping.stdout));
        let iperf = self.iperf.wait_with_output().expect("iperf3");
        let v: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap_or_default();
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(
            bps > 1e6,
            "the TCP stream did not survive the handover: {}\n{log}",
            String::from_utf8_lossy(&iperf.stdout),
        );
        pings
    }
}

/// A copy of the binary, as an upgrade would bring.
fn second_binary(lab: &Lab) -> std::path::PathBuf {
    let p = lab.dir.join("vswitch-new");
    std::fs::copy(env!("CARGO_BIN_EXE_vswitch"), &p).expect("copying the binary");
    p
}

#[test]
fn a_new_binary_takes_over_while_ping_floods_and_tcp_streams() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let (ok, out) = ping_b(&sw.a);
    assert!(ok, "{out}\n{}", lab.log("sw"));
    let traffic = Traffic::start(&sw.a, &sw.b, "10.0.0.11");
    std::thread::sleep(Duration::from_millis(1500));
    let new = second_binary(&lab);
    lab.takeover(&new, "sw");
    lab.assert_handed_over(0, "sw");
    let pings = traffic.finish(&lab.log("sw-new"));
    let st = lab
        .ctl(&sw.sock, "stats")
        .expect("the new binary answers on the same socket");
    let h = &st["last_handover"];
    eprintln!("handover: {h}; pings lost {:?}", pings.lost);
    assert_blackout_bounded(h, &st);
    assert!(
        h["connections"].as_u64() >= Some(2),
        "tracked connections carried: {h}"
    );
    pings.assert_lost_at_most(5, &format!("{st}\n{}", links(&sw.a)));
    // The new binary forwards, with its state: B's group still admits
    // ICMP, and the topology is the old one.
    let (ok, out) = ping_b(&sw.a);
    assert!(ok, "after the handover: {out}\n{}", lab.log("sw-new"));
    // And a second upgrade in a row (back to the first binary).
    lab.takeover(std::path::Path::new(env!("CARGO_BIN_EXE_vswitch")), "sw");
    lab.assert_handed_over(1, "sw");
    let (ok, out) = ping_b(&sw.a);
    assert!(ok, "after the second handover: {out}");
}

/// Across hypervisors: the switch taken over has an AF_XDP uplink (its
/// socket, rings, frame pool and XDP program's link are handed over).
#[test]
fn the_uplink_is_handed_over_while_traffic_crosses_hypervisors() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    let (u1, u2) = lab::wire(&lab, &hv1, "192.168.61.1", &hv2, "192.168.61.2");
    let a = ("a", "02:00:00:00:00:0a", "10.0.0.10");
    let b = ("b", "02:00:00:00:00:0b", "10.0.0.11");
    let c1 = lab::config(
        &lab,
        "sw1",
        &u1,
        "192.168.61.1",
        a,
        (b.2, b.1, "192.168.61.2"),
    );
    let c2 = lab::config(
        &lab,
        "sw2",
        &u2,
        "192.168.61.2",
        b,
        (a.2, a.1, "192.168.61.1"),
    );
    let s1 = lab.vswitch_in(Some(&hv1), "sw1", &c1);
    lab.vswitch_in(Some(&hv2), "sw2", &c2);
    let (ta, tb) = (lab.name("ta"), lab.name("tb"));
    lab.attach_vm_from(Some(&hv1), &ta, &vm1, a.1, "10.0.0.10/24");
    lab.attach_vm_from(Some(&hv2), &tb, &vm2, b.1, "10.0.0.11/24");
    lab::vm_mtu(&vm1, &ta);
    lab::vm_mtu(&vm2, &tb);
    let (ok, out) = ping_b(&vm1);
    assert!(ok, "{out}\n{}", lab.log("sw1"));
    let traffic = Traffic::start(&vm1, &vm2, b.2);
    std::thread::sleep(Duration::from_millis(1500));
    // An IPv6 frame, which the switch drops (counted by reason).
    try_sh(&[
        "ip",
        "netns",
        "exec",
        &vm1,
        "ping",
        "-6",
        "-c",
        "1",
        "-W",
        "1",
        &format!("ff02::1%{ta}"),
    ]);
    let before = lab.ctl(&s1, "stats").expect("stats");
    let new = second_binary(&lab);
    lab.takeover_in(&hv1, &new, "sw1");
    lab.assert_handed_over(0, "sw1");
    let pings = traffic.finish(&lab.log("sw1-new"));
    let st = lab.ctl(&s1, "stats").expect("the new binary answers");
    eprintln!(
        "uplink handover: {}; pings lost {:?}",
        st["last_handover"], pings.lost
    );
    assert_blackout_bounded(&st["last_handover"], &st);
    pings.assert_lost_at_most(5, &format!("{st}\n{}\n{}", links(&vm1), links(&hv1)));
    // The uplink works in the new binary: its socket receives (the XDP
    // program outlived the old process through its handed-over link).
    let (ok, out) = ping_b(&vm1);
    assert!(ok, "after the handover: {out}\n{}", lab.log("sw1-new"));
    // Counters carry over: the ports', and drops by reason.
    let after = lab.ctl(&s1, "stats").expect("stats");
    let up = &after["ports"][1];
    assert!(
        up["rx_packets"].as_u64() > before["ports"][1]["rx_packets"].as_u64(),
        "{up}"
    );
    let drops = before["drops"].as_object().expect("drops");
    assert!(
        !drops.is_empty(),
        "some drop to carry (IPv6 from the VMs): {before}"
    );
    for (reason, n) in drops {
        assert!(
            after["drops"][reason].as_u64() >= n.as_u64(),
            "drops {reason}: {n} before, {} after",
            after["drops"][reason]
        );
    }
    // Upgrading again passes on what was inherited.
    lab.takeover_in(
        &hv1,
        std::path::Path::new(env!("CARGO_BIN_EXE_vswitch")),
        "sw1",
    );
    lab.assert_handed_over(2, "sw1");
    let (ok, out) = ping_b(&vm1);
    assert!(
        ok,
        "after the second handover: {out}\n{}",
        lab.log("sw1-new")
    );
}

#[test]
fn a_new_binary_that_fails_leaves_the_old_one_forwarding() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let sock = sw.sock.to_str().expect("path").to_string();
    let (ok, out) = ping_b(&sw.a);
    assert!(ok, "{out}");
    // Each connection by id and tuple (pings add new ones; none may go).
    let conns = |lab: &Lab| -> std::collections::BTreeSet<String> {
        let v = lab.ctl(&sw.sock, "conntrack").expect("conntrack");
        v["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .map(|c| format!("{} {} {}", c["id"], c["original"], c["rule"]))
            .collect()
    };
    let before = conns(&lab);
    assert!(!before.is_empty(), "B's ICMP is tracked state");
    // Fake new binaries: each asks for the handover and fails at a
    // different point. `ready` makes the old one pause.
    let ask = "import os,signal,socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{\"cmd\": \"handover\"}\\n'); s.recv(100); ";
    for (what, rest, paused) in [
        ("exits during the pre-copy", "", false),
        ("hangs in the pre-copy", "time.sleep(5)", false),
        (
            "is killed once the old one paused",
            "s.sendall(b'ready\\n'); s.recv(8); os.kill(os.getpid(), signal.SIGKILL)",
            true,
        ),
        (
            "trickles its ready line (each byte within a read timeout)",
            "[(s.sendall(bytes([c])), time.sleep(1.5)) for c in b'ready\\n']; time.sleep(1)",
            false,
        ),
        (
            "hangs once the old one paused, then confirms too late",
            "s.sendall(b'ready\\n'); time.sleep(11); s.setblocking(False)\n\
             try:\n    while s.recv(65536): pass\nexcept Exception: pass\n\
             s.setblocking(True); s.settimeout(2)\n\
             try: s.sendall(b'confirm\\n'); print('answer', s.recv(16))\n\
             except Exception as e: print('no answer', e)",
            true,
        ),
    ] {
        let script = format!("{ask}{rest}");
        let (_, out) = try_sh(&["timeout", "20", "python3", "-c", &script, &sock]);
        assert!(
            !out.contains("answer b'ack"),
            "a new binary that {what} was acknowledged: {out}"
        );
        let (ok, ping) = ping_b(&sw.a);
        let text = plain(&lab.log("sw"));
        assert!(ok, "after a new binary that {what}: {out}\n{ping}\n{text}");
        let line = text
            .lines()
            .rfind(|l| l.contains("handover failed; resuming"))
            .unwrap_or_else(|| panic!("no failed handover logged for one that {what}:\n{text}"));
        assert!(line.contains(&format!("paused={paused}")), "{what}: {line}");
        let after = conns(&lab);
        assert!(
            before.is_subset(&after),
            "the tracked state is intact after one that {what}: {before:?} then {after:?}"
        );
    }
    // A new binary speaking a protocol this one does not is refused
    // before anything is held or paused, saying which versions differ.
    for cmd in ["handover", "handover-prepare"] {
        let script = format!(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]); \
             s.sendall(b'{{\"cmd\": \"{cmd}\", \"protocol\": 2}}\\n'); print(s.recv(1000).decode())"
        );
        let (_, out) = try_sh(&["timeout", "10", "python3", "-c", &script, &sock]);
        assert!(
            out.contains("error") && out.contains("protocol 2, this binary speaks [1]"),
            "{cmd} of protocol 2: {out}"
        );
        let (ok, ping) = ping_b(&sw.a);
        assert!(ok, "after a {cmd} of protocol 2: {ping}");
    }
    assert!(before.is_subset(&conns(&lab)));
}

#[test]
fn a_nated_connection_and_a_dhcp_lease_survive_the_upgrade() {
    let mut lab = Lab::new();
    let (ta, tx) = (lab.name("ta"), lab.name("tx"));
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [[port]]\nname = \"{ta}\"\ntype = \"tap\"\n[[port]]\nname = \"{tx}\"\ntype = \"tap\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\nsnat = true\nlease_s = 120\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [external]\nport = \"{tx}\"\ncidr = \"203.0.113.0/24\"\nsnat = [\"203.0.113.10\"]\n\n\
         [[vm]]\nname = \"a\"\nport = \"{ta}\"\nmac = \"02:00:00:00:00:0a\"\nips = [\"10.0.0.10\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
    );
    let sock = lab.vswitch("sw", &cfg);
    let a = lab.netns("va");
    let ext = lab.netns("ex");
    // A gets its address by DHCP; the external side is a plain host.
    lab.attach_vm(&ta, &a, "02:00:00:00:00:0a", "169.254.9.9/32");
    sh(&["ip", "-n", &a, "addr", "flush", "dev", &ta]);
    let dhcp = |lab: &Lab| lab::udhcpc(&a, &ta, "/bin/true", &[], 20).1 + &lab.log("sw");
    let got = dhcp(&lab);
    assert!(got.contains("lease of 10.0.0.10"), "{got}");
    let leases = lab.ctl(&sock, "leases").expect("leases");
    assert!(
        leases.to_string().contains("10.0.0.10"),
        "no lease before the upgrade: {got}"
    );
    sh(&["ip", "-n", &a, "addr", "add", "10.0.0.10/24", "dev", &ta]);
    sh(&[
        "ip", "-n", &a, "route", "replace", "default", "via", "10.0.0.1",
    ]);
    lab.attach_vm(&tx, &ext, "02:ee:00:00:00:01", "203.0.113.1/24");
    let echo = lab.dir.join("echo.py");
    std::fs::write(&echo, ECHO).unwrap();
    // (Killed with the namespace when the lab is cleaned up.)
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &ext, "python3"])
        .arg(&echo)
        .args(["203.0.113.1", "7000"])
        .spawn()
        .expect("echo server");
    lab::wait_until("the echo server", Duration::from_secs(5), || {
        try_sh(&["ip", "netns", "exec", &ext, "ss", "-ltn"])
            .1
            .contains(":7000")
    });
    let pinger = lab.dir.join("pinger.py");
    std::fs::write(&pinger, PINGER).unwrap();
    let mut client = Command::new("ip")
        .args(["netns", "exec", &a, "python3", "-u"])
        .arg(&pinger)
        .args(["203.0.113.1", "7000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("pinger");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        client.stdout.take().expect("stdout"),
    ));
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    for _ in 0..5 {
        let l = next();
        assert!(
            l.starts_with("ok"),
            "before the upgrade: {l:?}\n{}",
            lab.log("sw")
        );
    }
    let nat_before = lab.ctl(&sock, "conntrack").expect("conntrack");
    let new = second_binary(&lab);
    lab.takeover(&new, "sw");
    lab.assert_handed_over(0, "sw");
    // The NATed connection keeps echoing through the new binary.
    for _ in 0..10 {
        let l = next();
        assert!(
            l.starts_with("ok"),
            "after the upgrade: {l:?}\n{}",
            lab.log("sw-new")
        );
    }
    let _ = client.kill();
    let _ = client.wait();
    let nat_after = lab.ctl(&sock, "conntrack").expect("conntrack");
    assert_eq!(
        nat_before["connections"][0]["nat"], nat_after["connections"][0]["nat"],
        "the same NAT binding"
    );
    // The lease is still there, and renewing it gets the same address.
    let leases = lab.ctl(&sock, "leases").expect("leases");
    assert!(leases.to_string().contains("10.0.0.10"), "{leases}");
    let got = dhcp(&lab);
    assert!(
        got.contains("lease of 10.0.0.10"),
        "renewal after the upgrade: {got}"
    );
    let _ = srv.kill();
    let _ = srv.wait();
}

/// Kills a process on drop (a detached vswitch the lab did not start).
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

#[test]
fn vswitch_upgrade_hands_over_or_says_why_not() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let cfg = lab.dir.join("sw.toml");
    let cfg = cfg.to_str().expect("path");
    let upgrade = |binary: &str| {
        try_sh(&[
            env!("CARGO_BIN_EXE_vswitch"),
            "upgrade",
            "--binary",
            binary,
            "--config",
            cfg,
        ])
    };
    // A binary that does not start: the running switch carries on.
    let (ok, out) = upgrade("/bin/false");
    assert!(!ok && out.contains("before taking over"), "{out}");
    assert!(ping_b(&sw.a).0);
    // A real one.
    let new = second_binary(&lab);
    let (ok, out) = upgrade(new.to_str().expect("path"));
    let pid = lab
        .ctl(&sw.sock, "stats")
        .and_then(|v| v["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok());
    let _guard = pid.map(KillPid);
    assert!(ok && out.contains("upgraded to"), "{out}");
    assert!(
        lab.exited(0, Duration::from_secs(15)),
        "the old binary did not exit"
    );
    assert!(ping_b(&sw.a).0, "after `vswitch upgrade`");
}

#[test]
fn a_switch_with_300_ports_is_handed_over() {
    // More descriptors than one message carries (the kernel's 253): they
    // go in as many as it takes.
    let mut lab = Lab::new();
    let mut cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{}\"\n\n",
        lab.socket("sw").display()
    );
    for i in 0..300 {
        cfg += &format!(
            "[[port]]\nname = \"{}\"\ntype = \"tap\"\n",
            lab.name(&format!("p{i}"))
        );
    }
    let sock = lab.vswitch("sw", &cfg);
    let new = second_binary(&lab);
    lab.takeover(&new, "sw");
    lab.assert_handed_over(0, "sw");
    let st = lab.ctl(&sock, "stats").expect("the new binary answers");
    assert_eq!(
        st["ports"].as_array().map(Vec::len),
        Some(300),
        "every port carried: {st}"
    );
    assert_blackout_bounded(&st["last_handover"], &st);
}
