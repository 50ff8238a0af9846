//! Two hypervisors: vswitch processes in their own namespaces, uplinks
//! joined by a veth "physical network", VMs behind tap ports; and a Linux
//! kernel VXLAN device as a foreign hypervisor. Run serially.

mod lab;

use std::process::{Command, Stdio};
use std::time::Duration;

use lab::{config, iperf, sh, thread_cores, try_sh, vm_mtu, wait_until, wire, Lab};

fn ping(ns: &str, ip: &str, count: &str) -> (bool, String) {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", count, "-i", "0.1", "-W", "1", ip,
    ])
}

#[test]
fn two_hypervisors_carry_ping_and_tcp_over_vxlan() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    let (u1, u2) = wire(&lab, &hv1, "192.168.60.1", &hv2, "192.168.60.2");
    let b = lab::VM_B;
    let lab::TwoHosts { s1, s2, ta, .. } = lab::two_hosts(
        &mut lab,
        (&hv1, &hv2),
        (&vm1, &vm2),
        (&u1, &u2),
        ("192.168.60.1", "192.168.60.2"),
    );
    let (ok, out) = ping(&vm1, b.2, "3");
    assert!(
        ok,
        "ping across hypervisors failed:\n{out}\nsw1:\n{}\nsw2:\n{}",
        lab.log("sw1"),
        lab.log("sw2")
    );
    let bps = iperf(&vm2, &vm1, b.2, "5201");
    assert!(bps > 1e6, "TCP across VXLAN: only {bps} bit/s");
    eprintln!("iperf3 TCP across hypervisors: {:.2} Gbit/s", bps / 1e9);
    // Path MTU discovery: a VM with a 1500-byte MTU sending a full-size
    // packet with DF learns the overlay's MTU from the gateway.
    sh(&["ip", "-n", &vm1, "link", "set", &ta, "mtu", "1500"]);
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &vm1, "ping", "-M", "do", "-s", "1472", "-c", "2", "-i", "0.2",
        "-W", "1", b.2,
    ]);
    assert!(
        !ok && out.contains("mtu = 1450"),
        "no fragmentation-needed with the overlay MTU:\n{out}"
    );
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &vm1, "ping", "-M", "do", "-s", "1422", "-c", "2", "-i", "0.2",
        "-W", "1", b.2,
    ]);
    assert!(ok, "a 1450-byte packet must fit:\n{out}");
    // Hoverboard's export: the remote VM is a top talker of sw1.
    let top = lab.ctl(&s1, "top-talkers").expect("top-talkers");
    assert!(
        top["talkers"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["bytes"].as_u64() > Some(0) && t["vni"] == 100)),
        "{top}"
    );
    let flows = lab.ctl(&s1, "flows").expect("flows");
    let flows = flows["flows"].as_array().expect("flow list");
    assert!(
        flows.iter().any(|f| f["encap"] == true),
        "no encap flow on sw1"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["decap"] == true && f["ingress"] == "vni 100"),
        "no decap flow on sw1"
    );
    // The uplink carried it, in both directions.
    let st = lab.ctl(&s2, "stats").expect("stats");
    let up = &st["ports"][1];
    assert!(
        up["rx_packets"].as_u64().unwrap() > 100 && up["tx_packets"].as_u64().unwrap() > 100,
        "{st}"
    );
}

/// The foreign hypervisor in `ns`: a kernel VXLAN device on `dev` (at
/// `local`, its peer at `remote`) holding the remote VM's address
/// (10.0.0.11) and MAC (02:00:00:00:00:0b).
fn kernel_vtep(ns: &str, dev: &str, local: &str, remote: &str) {
    sh(&[
        "ip", "-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "100", "dstport", "4789",
        "local", local, "remote", remote, "dev", dev,
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "link",
        "set",
        "vx0",
        "address",
        "02:00:00:00:00:0b",
        "mtu",
        "1450",
    ]);
    sh(&["ip", "-n", ns, "addr", "add", "10.0.0.11/24", "dev", "vx0"]);
    sh(&["ip", "-n", ns, "link", "set", "vx0", "up"]);
}

#[test]
fn kernel_vxlan_interop_wire_format_host_access_and_neighbor_changes() {
    let mut lab = Lab::new();
    let (hv, hk, vm) = (lab.netns("h1"), lab.netns("hk"), lab.netns("m1"));
    let (u1, uk) = wire(&lab, &hv, "192.168.61.1", &hk, "192.168.61.2");
    kernel_vtep(&hk, &uk, "192.168.61.2", "192.168.61.1");
    let a = ("a", "02:00:00:00:00:0a", "10.0.0.10");
    let cfg = config(
        &lab,
        "sw",
        &u1,
        "192.168.61.1",
        a,
        ("10.0.0.11", "02:00:00:00:00:0b", "192.168.61.2"),
    );
    let sock = lab.vswitch_in(Some(&hv), "sw", &cfg);
    let ta = lab.name("ta");
    lab.attach_vm_from(Some(&hv), &ta, &vm, a.1, "10.0.0.10/24");
    vm_mtu(&vm, &ta);

    // Capture the underlay on the kernel side while traffic flows both ways.
    let pcap = lab.dir.join("wire.txt");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &hk, "tcpdump", "-l", "-nn", "-vv", "-e", "-c", "8", "-i", &uk, "udp",
            "port", "4789",
        ])
        .stdout(std::fs::File::create(&pcap).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump (scripts/test installs it)");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = ping(&vm, "10.0.0.11", "3");
    assert!(ok, "VM → kernel VTEP failed:\n{out}\n{}", lab.log("sw"));
    let (ok, out) = ping(&hk, "10.0.0.10", "3");
    assert!(ok, "kernel VTEP → VM failed:\n{out}\n{}", lab.log("sw"));
    wait_until(
        "tcpdump to capture 8 packets",
        Duration::from_secs(10),
        || matches!(dump.try_wait(), Ok(Some(_))),
    );
    let _ = dump.kill();
    let wire = std::fs::read_to_string(&pcap).unwrap();
    // tcpdump -vv -e prints the outer Ethernet/IPv4 header on one line and
    // the UDP/VXLAN decode on the next; check the packets *we* sent.
    let lines: Vec<&str> = wire.lines().collect();
    let ours: Vec<(&str, &str)> = lines
        .windows(2)
        .filter(|w| w[1].contains("192.168.61.1.") && w[1].contains("> 192.168.61.2.4789:"))
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(!ours.is_empty(), "no VXLAN from our VTEP captured:\n{wire}");
    for (ip, udp) in &ours {
        assert!(
            ip.contains("flags [DF]") && ip.contains("proto UDP (17)"),
            "outer IPv4 header: {ip}"
        );
        assert!(!ip.contains("bad cksum"), "bad outer IPv4 checksum: {ip}");
        assert!(
            udp.contains("VXLAN, flags [I] (0x08), vni 100"),
            "VXLAN header: {udp}\n{wire}"
        );
    }

    // TCP both ways with the kernel's VXLAN: our software segments (the
    // VM's TSO super-frames cut for the uplink) checked by the kernel's
    // stack, and the kernel's segments merged toward our VM (`iperf`
    // asserts neither stack counted a checksum error).
    // A real wire carries complete checksums; a veth carries the kernel
    // peer's partial ones (its VXLAN leaves the inner TCP checksum to the
    // "NIC"), which an AF_XDP socket cannot see as such: the peer's
    // underlay link completes them, as a NIC would.
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &hk, "ethtool", "-K", &uk, "tx", "off",
    ]);
    assert!(ok, "ethtool: {out}");
    let bps = iperf(&hk, &vm, "10.0.0.11", "5302");
    assert!(bps > 1e6, "TCP VM → kernel VXLAN: {bps} bit/s");
    let bps = iperf(&vm, &hk, "10.0.0.10", "5303");
    assert!(bps > 1e6, "TCP kernel VXLAN → VM: {bps} bit/s");
    let st = lab.ctl(&sock, "stats").expect("stats");
    assert!(st["ports"][1]["tx_segments"].as_u64() > Some(100), "{st}");

    // The host keeps its underlay: ping and a TCP connection to it.
    let (ok, out) = ping(&hk, "192.168.61.1", "2");
    assert!(
        ok,
        "host underlay address unreachable while vswitch runs:\n{out}"
    );
    let bps = iperf(&hv, &hk, "192.168.61.1", "5301");
    assert!(bps > 1e6, "TCP to the host: {bps} bit/s");

    // The remote VTEP's MAC changes: the kernel re-resolves it, vswitch
    // follows, traffic flows again.
    sh(&[
        "ip",
        "-n",
        &hk,
        "link",
        "set",
        &uk,
        "address",
        "02:00:00:00:99:99",
    ]);
    sh(&["ip", "-n", &hv, "neigh", "flush", "dev", &u1]);
    wait_until(
        "traffic to follow the new MAC",
        Duration::from_secs(15),
        || ping(&vm, "10.0.0.11", "1").0,
    );
    let log = lab.log("sw");
    assert!(
        log.contains("02:00:00:00:99:99"),
        "vswitch did not learn the new next hop:\n{log}"
    );
    assert!(lab.ctl(&sock, "stats").is_some());
}

/// Run a DHCP client in `ns` on `dev` with a script that records what it
/// was told; returns the recorded lines.
fn dhcp_client(lab: &Lab, ns: &str, dev: &str, client: &str) -> String {
    let out = lab.dir.join(format!("{client}.out"));
    let script = lab.dir.join(format!("{client}.sh"));
    let body = match client {
        "udhcpc" => "echo \"$1 ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu hostname=$hostname lease=$lease\"",
        _ => "echo \"$reason ip=$new_ip_address subnet=$new_subnet_mask router=$new_routers dns=$new_domain_name_servers mtu=$new_interface_mtu hostname=$new_host_name\"",
    };
    std::fs::write(&script, format!("#!/bin/sh\n{body} >> {}\n", out.display())).unwrap();
    sh(&["chmod", "+x", script.to_str().unwrap()]);
    let (ok, log) = match client {
        "udhcpc" => lab::udhcpc(ns, dev, script.to_str().unwrap(), &["-O", "mtu"], 30),
        _ => {
            let lf = lab.dir.join("dhclient.leases");
            let pf = lab.dir.join("dhclient.pid");
            let r = try_sh(&[
                "timeout",
                "30",
                "ip",
                "netns",
                "exec",
                ns,
                "dhclient",
                "-1",
                "-v",
                "-sf",
                script.to_str().unwrap(),
                "-lf",
                lf.to_str().unwrap(),
                "-pf",
                pf.to_str().unwrap(),
                dev,
            ]);
            let _ = try_sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "dhclient",
                "-x",
                "-pf",
                pf.to_str().unwrap(),
            ]);
            r
        }
    };
    assert!(
        ok,
        "{client} failed (scripts/deps installs busybox and isc-dhcp-client):\n{log}"
    );
    std::fs::read_to_string(&out).unwrap_or_default()
}

#[test]
fn dhcp_clients_get_their_binding_with_the_overlay_mtu_and_renew() {
    let mut lab = Lab::new();
    let (hv, peer, vm) = (lab.netns("h1"), lab.netns("hp"), lab.netns("m1"));
    let (u1, _) = wire(&lab, &hv, "192.168.62.1", &peer, "192.168.62.2");
    let a = ("a", "02:00:00:00:00:0a", "10.0.0.10");
    let cfg = config(
        &lab,
        "sw",
        &u1,
        "192.168.62.1",
        a,
        ("10.0.0.11", "02:00:00:00:00:0b", "192.168.62.2"),
    )
    .replace(
        "gateway_mac = \"02:00:00:00:00:fe\"",
        "gateway_mac = \"02:00:00:00:00:fe\"\ndns = [\"10.0.0.53\"]\nlease_s = 120",
    )
    .replace(
        "network = 100\n\n[[remote]]",
        "network = 100\nhostname = \"vm-a\"\n\n[[remote]]",
    );
    lab.vswitch_in(Some(&hv), "sw", &cfg);
    let ta = lab.name("ta");
    // The VM's NIC comes up without an address: DHCP gives it one.
    sh(&["ip", "-n", &hv, "link", "set", &ta, "netns", &vm]);
    sh(&["ip", "-n", &vm, "link", "set", &ta, "address", a.1, "up"]);
    let want =
        "ip=10.0.0.10 subnet=255.255.255.0 router=10.0.0.1 dns=10.0.0.53 mtu=1450 hostname=vm-a";

    let got = dhcp_client(&lab, &vm, &ta, "udhcpc");
    assert!(
        got.lines()
            .any(|l| l.starts_with("bound ") && l.contains(want) && l.contains("lease=120")),
        "udhcpc:\n{got}"
    );
    let got = dhcp_client(&lab, &vm, &ta, "dhclient");
    assert!(
        got.lines()
            .any(|l| l.starts_with("BOUND ") && l.contains(want)),
        "dhclient:\n{got}"
    );

    // Renewal: a configured client renews by unicast (udhcpc on SIGUSR1).
    sh(&["ip", "-n", &vm, "addr", "add", "10.0.0.10/24", "dev", &ta]);
    let script = lab.dir.join("udhcpc.sh");
    let mut renew = std::process::Command::new("ip")
        .args([
            "netns", "exec", &vm, "busybox", "udhcpc", "-i", &ta, "-f", "-t", "5", "-T", "2", "-O",
            "mtu", "-s",
        ])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("udhcpc");
    let out = lab.dir.join("udhcpc.out");
    let bound = |n: usize| {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("bound "))
            .count()
            >= n
    };
    wait_until("udhcpc to bind", Duration::from_secs(15), || bound(2));
    // SAFETY: kill(2) on the udhcpc we spawned and still hold.
    unsafe { libc::kill(renew.id() as libc::pid_t, libc::SIGUSR1) };
    wait_until("udhcpc to renew", Duration::from_secs(15), || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("renew ") && l.contains(want))
    });
    let _ = renew.kill();
    let _ = renew.wait();
}

/// Another subnet of the network on the second hypervisor, and security
/// groups: `extra` is added to both configs' network, `b_extra` to the VM
/// on hv2, `a_remote` to hv2's view of A.
fn routed_config(c: String, b_extra: &str, a_remote_extra: &str) -> String {
    let c = c.replace(
        "gateway = \"10.0.0.1\"\n",
        "gateway = \"10.0.0.1\"\n[[network.subnet]]\ncidr = \"10.0.1.0/24\"\ngateway = \"10.0.1.1\"\n",
    );
    let c = c.replace(
        "network = 100\n\n[[remote]]",
        &format!("network = 100\n{b_extra}\n\n[[remote]]"),
    );
    format!("{c}{a_remote_extra}\n")
}

#[test]
fn routed_across_hypervisors_with_remote_group_rules() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    let (u1, u2) = wire(&lab, &hv1, "192.168.61.1", &hv2, "192.168.61.2");
    let a = ("a", "02:00:00:00:00:0a", "10.0.0.10");
    let b = ("b", "02:00:00:00:00:0b", "10.0.1.11");
    let groups = "\n[[security_group]]\nname = \"client\"\n[[security_group.rule]]\ndirection = \"egress\"\n\
                  [[security_group]]\nname = \"web\"\n[[security_group.rule]]\ndirection = \"ingress\"\n\
                  remote_group = \"client\"\n[[security_group.rule]]\ndirection = \"egress\"\n";
    // hv1: A is a client; hv2: B is web, admitting anything from clients
    // (A is one, as hv2's remote endpoint).
    let c1 = routed_config(
        config(
            &lab,
            "sw1",
            &u1,
            "192.168.61.1",
            a,
            (b.2, b.1, "192.168.61.2"),
        ),
        "security_groups = [\"client\"]",
        groups,
    );
    let c2 = routed_config(
        config(
            &lab,
            "sw2",
            &u2,
            "192.168.61.2",
            b,
            (a.2, a.1, "192.168.61.1"),
        ),
        "security_groups = [\"web\"]",
        &format!("security_groups = [\"client\"]\n{groups}"),
    );
    let s1 = lab.vswitch_in(Some(&hv1), "sw1", &c1);
    lab.vswitch_in(Some(&hv2), "sw2", &c2);
    let (ta, tb) = (lab.name("ta"), lab.name("tb"));
    lab.attach_vm_from(Some(&hv1), &ta, &vm1, a.1, "10.0.0.10/24");
    lab.attach_vm_from(Some(&hv2), &tb, &vm2, b.1, "10.0.1.11/24");
    vm_mtu(&vm1, &ta);
    vm_mtu(&vm2, &tb);
    sh(&[
        "ip", "-n", &vm1, "route", "add", "default", "via", "10.0.0.1",
    ]);
    sh(&[
        "ip", "-n", &vm2, "route", "add", "default", "via", "10.0.1.1",
    ]);
    // Routed on the sending host, admitted on the receiving one by the
    // remote-group rule; the replies come back as the connection's.
    let (ok, out) = ping(&vm1, b.2, "3");
    assert!(
        ok,
        "routed ping across hypervisors failed:\n{out}\nsw1:\n{}\nsw2:\n{}",
        lab.log("sw1"),
        lab.log("sw2")
    );
    assert!(out.contains("ttl=63"), "not routed:\n{out}");
    let bps = iperf(&vm2, &vm1, b.2, "5201");
    assert!(bps > 1e6, "routed TCP across VXLAN: only {bps} bit/s");
    // B may not open connections to A (A's group admits nothing in).
    let (ok, _) = ping(&vm2, a.2, "2");
    assert!(!ok, "a connection into a client was admitted");
    let ct = lab.ctl(&s1, "conntrack").expect("conntrack");
    assert!(ct["total"].as_u64() >= Some(1), "{ct}");
}

/// `iperf3 -P streams` from `client_ns` to a one-shot server on `ip`:`port`
/// in `server_ns` (`reverse`: the server sends); the bits per second
/// received. Many connections, so many flows for RSS to spread.
fn iperf_parallel(
    server_ns: &str,
    client_ns: &str,
    ip: &str,
    port: &str,
    streams: &str,
    reverse: bool,
) -> f64 {
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-D", "-p", port,
    ]);
    assert!(ok, "iperf3 server: {out}");
    wait_until("iperf3 server", Duration::from_secs(5), || {
        try_sh(&["ip", "netns", "exec", server_ns, "ss", "-ltn"])
            .1
            .contains(&format!(":{port}"))
    });
    let mut args = vec![
        "timeout", "30", "ip", "netns", "exec", client_ns, "iperf3", "-c", ip, "-p", port, "-t",
        "1", "-P", streams, "-J",
    ];
    if reverse {
        args.push("-R");
    }
    let out = sh(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 result")
}

/// Each fast-path thread's entry of `ctl stats`' threads.
fn fast_threads(lab: &Lab, sock: &std::path::Path) -> Vec<serde_json::Value> {
    let v = lab.ctl(sock, "stats").expect("stats");
    v["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .filter(|t| t["role"] == "fast path")
        .cloned()
        .collect()
}

fn per_thread(lab: &Lab, sock: &std::path::Path, field: &str) -> Vec<u64> {
    fast_threads(lab, sock)
        .iter()
        .map(|t| {
            t[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {t}"))
        })
        .collect()
}

/// Upgrade the switch on `sock` (in `hv`, the `old`-th one started) to
/// this binary with `args`, while `vm` ping-floods the remote VM; at most
/// 5 pings may be lost. The new binary's handover report.
fn upgrade_under_ping_flood(
    lab: &mut Lab,
    hv: &str,
    vm: &str,
    sock: &std::path::Path,
    old: usize,
    args: &[&str],
) -> serde_json::Value {
    let flood = std::process::Command::new("ip")
        .args([
            "netns", "exec", vm, "ping", "-i", "0.002", "-c", "1500", "-W", "1",
        ])
        .arg("10.0.0.11")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(1000));
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_vswitch"));
    lab.takeover_in_with(hv, binary, "sw", args);
    lab.assert_handed_over(old, "sw");
    let out = flood.wait_with_output().expect("ping");
    let (sent, got) = lab::ping_counts(&String::from_utf8_lossy(&out.stdout));
    let st = lab.ctl(sock, "stats").expect("the new binary answers");
    let h = st["last_handover"].clone();
    assert!(
        sent - got <= 5,
        "{} of {sent} pings lost across the handover ({args:?}): {h}\n{}",
        sent - got,
        lab.log("sw-new")
    );
    h
}

#[test]
fn two_fast_path_threads_share_a_two_queue_uplink_and_a_multi_queue_tap() {
    let mut lab = Lab::new();
    let (hv, hk, vm) = (lab.netns("h1"), lab.netns("hk"), lab.netns("m1"));
    // The underlay: a veth with two queues each way (see `wire_queues`).
    let (u1, uk) = lab::wire_queues(&lab, (&hv, "192.168.63.1"), (&hk, "192.168.63.2"), 2);
    kernel_vtep(&hk, &uk, "192.168.63.2", "192.168.63.1");
    // (A veth carries the kernel VXLAN's partial inner checksums: its link
    // completes them, as a NIC would; see the interop test.)
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &hk, "ethtool", "-K", &uk, "tx", "off",
    ]);
    assert!(ok, "ethtool: {out}");
    let cores = lab::allowed_cores();
    let (first, last) = (cores[0], *cores.last().unwrap());
    let a = ("a", "02:00:00:00:00:0a", "10.0.0.10");
    let cfg = config(
        &lab,
        "sw",
        &u1,
        "192.168.63.1",
        a,
        ("10.0.0.11", "02:00:00:00:00:0b", "192.168.63.2"),
    )
    .replacen(
        "[switch]\n",
        &format!(
            "[switch]\nfastpath_threads = 2\nfastpath_cores = [{first}, {last}]\nidle_timeout_s = 4\n"
        ),
        1,
    )
    .replacen(
        "network = 100\n\n[[remote]]",
        "network = 100\nsecurity_groups = [\"g\"]\n\n[[security_group]]\nname = \"g\"\n\
         [[security_group.rule]]\ndirection = \"egress\"\n\
         [[security_group.rule]]\ndirection = \"ingress\"\nprotocol = \"tcp\"\n\n[[remote]]",
        1,
    );
    let sock = lab.vswitch_in(Some(&hv), "sw", &cfg);
    let ta = lab.name("ta");
    lab.attach_vm_from(Some(&hv), &ta, &vm, a.1, "10.0.0.10/24");
    vm_mtu(&vm, &ta);

    // Each thread on its own core, polling its queue of the tap and the uplink.
    let v = lab.ctl(&sock, "stats").expect("stats");
    let pid = v["pid"].as_u64().unwrap();
    assert_eq!(thread_cores(pid, "fastpath-0"), vec![first.to_string()]);
    assert_eq!(thread_cores(pid, "fastpath-1"), vec![last.to_string()]);
    let threads = fast_threads(&lab, &sock);
    assert_eq!(threads.len(), 2, "{v}");
    for (i, t) in threads.iter().enumerate() {
        assert_eq!(t["name"], format!("fastpath-{i}"));
        assert_eq!(t["queue"], i);
        assert_eq!(t["queues"], serde_json::json!([ta, u1]), "{t}");
    }

    // Many connections both ways: the kernel spreads them over the queues,
    // so both threads forward, and the replies come back.
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5311", "16", false);
    assert!(bps > 1e6, "TCP VM → remote over two threads: {bps} bit/s");
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5312", "16", true);
    assert!(bps > 1e6, "TCP remote → VM over two threads: {bps} bit/s");
    let rx = per_thread(&lab, &sock, "rx_packets");
    let flows = per_thread(&lab, &sock, "flows");
    assert!(
        rx.iter().all(|&n| n > 100) && flows.iter().all(|&n| n > 0),
        "both threads forward: rx {rx:?}, flows {flows:?}\n{:?}",
        fast_threads(&lab, &sock)
    );
    // `ctl flows` says whose table holds each flow: both threads'.
    let flows = lab::ctl_args(&sock, &["flows"]).expect("flows");
    let holders: std::collections::BTreeSet<u64> = flows["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .filter_map(|f| f["thread"].as_u64())
        .collect();
    assert_eq!(holders, [0, 1].into(), "{flows}");
    let st = lab.ctl(&sock, "stats").expect("stats");
    let rx_total = st["pipeline"]["rx_packets"].as_u64().unwrap_or(0);
    assert!(
        rx_total >= rx.iter().sum::<u64>(),
        "the switch's totals sum the threads': {rx_total} < {rx:?}"
    );

    // A rule change reaches both threads' tables: TCP no longer admitted,
    // every connection's flows go from both.
    lab::apply(
        &sock,
        serde_json::json!([{"op": "set-rules", "name": "g", "rules": [
            {"direction": "egress", "protocol": "icmp"}]}]),
    )
    .expect("set-rules");
    wait_until(
        "the revoked connections' flows to leave both threads",
        Duration::from_secs(5),
        || per_thread(&lab, &sock, "flows").iter().all(|&n| n == 0),
    );

    // Admitted again: new flows on both, then idle, expired on both.
    lab::apply(
        &sock,
        serde_json::json!([{"op": "set-rules", "name": "g", "rules": [
            {"direction": "egress"}, {"direction": "ingress", "protocol": "tcp"}]}]),
    )
    .expect("set-rules");
    let expired = per_thread(&lab, &sock, "flows_expired");
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5313", "16", true);
    assert!(bps > 1e6, "TCP after the rules came back: {bps} bit/s");
    assert!(
        per_thread(&lab, &sock, "flows").iter().all(|&n| n > 0),
        "{:?}",
        fast_threads(&lab, &sock)
    );
    wait_until(
        "idle flows to expire on both threads",
        Duration::from_secs(20),
        || {
            let now = per_thread(&lab, &sock, "flows_expired");
            per_thread(&lab, &sock, "flows").iter().all(|&n| n == 0)
                && now.iter().zip(&expired).all(|(n, e)| n > e)
        },
    );

    // A live upgrade under a ping flood: each thread's queues, pool and
    // flows go to the new binary's thread of the same index.
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5314", "16", false);
    assert!(bps > 1e6, "TCP once more: {bps} bit/s");
    let before = per_thread(&lab, &sock, "flows");
    assert!(before.iter().all(|&n| n > 0), "{before:?}");
    let h = upgrade_under_ping_flood(&mut lab, &hv, &vm, &sock, 0, &[]);
    assert_eq!(h["fastpath_threads"], 2, "{h}");
    assert!(
        h["flows"].as_u64() >= Some(before.iter().sum::<u64>()),
        "every thread's flows carried: {h} (before {before:?})"
    );
    let rx = per_thread(&lab, &sock, "rx_packets");
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5315", "16", false);
    assert!(bps > 1e6, "TCP after the upgrade: {bps} bit/s");
    let after = per_thread(&lab, &sock, "rx_packets");
    assert!(
        after.iter().zip(&rx).all(|(a, b)| a > b),
        "both of the new binary's threads forward: {rx:?} then {after:?}"
    );

    // Down to one thread, and back to two, under ping floods. The peer
    // first sends on one queue (as an operator lowers a NIC's queue count
    // before the switch stops serving the second); the flows of the
    // thread that goes move to the one left.
    let ethtool_tx = |n: &str| {
        let (ok, out) = try_sh(&["ip", "netns", "exec", &hk, "ethtool", "-L", &uk, "tx", n]);
        assert!(ok, "ethtool -L: {out}");
    };
    ethtool_tx("1");
    let flows_before: u64 = per_thread(&lab, &sock, "flows").iter().sum();
    let h = upgrade_under_ping_flood(&mut lab, &hv, &vm, &sock, 1, &["--fastpath-threads", "1"]);
    assert_eq!(
        (
            h["fastpath_threads"].as_u64(),
            h["fastpath_threads_before"].as_u64()
        ),
        (Some(1), Some(2)),
        "{h}"
    );
    // (Flows idle 4 s expire meanwhile: fewer than before, never none.)
    assert!(h["flows"].as_u64() > Some(0), "{h} (before {flows_before})");
    assert_eq!(fast_threads(&lab, &sock).len(), 1);
    assert!(
        per_thread(&lab, &sock, "flows")[0] > 0,
        "the flows are on the thread left: {:?}",
        fast_threads(&lab, &sock)
    );
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5316", "8", false);
    assert!(bps > 1e6, "TCP on one thread: {bps} bit/s");
    let h = upgrade_under_ping_flood(&mut lab, &hv, &vm, &sock, 2, &["--fastpath-threads", "2"]);
    assert_eq!(
        (
            h["fastpath_threads"].as_u64(),
            h["fastpath_threads_before"].as_u64()
        ),
        (Some(2), Some(1)),
        "{h}"
    );
    ethtool_tx("2");
    let rx = per_thread(&lab, &sock, "rx_packets");
    let bps = iperf_parallel(&hk, &vm, "10.0.0.11", "5317", "16", false);
    assert!(bps > 1e6, "TCP on two threads again: {bps} bit/s");
    let after = per_thread(&lab, &sock, "rx_packets");
    assert!(
        after.len() == 2 && after.iter().zip(&rx).all(|(a, b)| a > b),
        "the thread the upgrade added forwards on its own queues: {rx:?} then {after:?}"
    );

    // The VM removed: its flows leave both threads.
    assert!(per_thread(&lab, &sock, "flows").iter().all(|&n| n > 0));
    lab::apply(&sock, serde_json::json!([{"op": "remove-vm", "name": "a"}])).expect("remove-vm");
    wait_until(
        "the removed VM's flows to leave both threads",
        Duration::from_secs(5),
        || per_thread(&lab, &sock, "flows").iter().all(|&n| n == 0),
    );
    // A port added at run time gets a queue on each thread.
    let tc = lab.name("tc");
    lab::ctl_args(&sock, &["port-add", &tc]).expect("port-add");
    for t in fast_threads(&lab, &sock) {
        assert_eq!(t["queues"], serde_json::json!([ta, u1, tc]), "{t}");
    }
    let (ok, out) = try_sh(&["ip", "-n", &hv, "-d", "link", "show", &tc]);
    assert!(ok && out.contains("multi_queue"), "{out}");
    // A binary of one thread (or another count) is refused, saying why,
    // before anything is held.
    let script = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); \
                  s.connect(sys.argv[1]); s.sendall(b'{\"cmd\": \"handover\", \"protocol\": 1}\\n'); \
                  print(s.recv(1000).decode())";
    let (_, out) = try_sh(&[
        "timeout",
        "10",
        "python3",
        "-c",
        script,
        sock.to_str().unwrap(),
    ]);
    assert!(
        out.contains("error") && out.contains("the new binary predates several fast-path threads"),
        "{out}"
    );
}
