//! One hypervisor: VMs (network namespaces) behind tap ports of one
//! vswitch. Real kernel stacks, real ping and iperf3.
//!
//! Run serially (`--test-threads=1`, as scripts/test does): each test
//! starts a switch in adaptive poll mode, and 2 cores are shared.

mod lab;

use std::time::Duration;

use lab::{
    allowed_cores, iperf, one_host, one_host_config, one_host_from, sh, thread_cores, try_sh,
    wait_until, Lab, Vm,
};

fn ping(ns: &str, ip: &str, count: &str) -> (bool, String) {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", count, "-i", "0.05", "-W", "1", ip,
    ])
}

fn stat(lab: &Lab, sock: &std::path::Path, path: &[&str]) -> u64 {
    let v = lab.ctl(sock, "stats").expect("stats");
    let mut cur = &v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("no counter {path:?} in {v}"))
}

fn port_tx(lab: &Lab, sock: &std::path::Path, port: usize) -> u64 {
    let v = lab.ctl(sock, "stats").expect("stats");
    v["ports"][port]["tx_packets"]
        .as_u64()
        .expect("port counters")
}

const A: Vm = Vm {
    name: "a",
    mac: "02:00:00:00:00:0a",
    ip: "10.0.0.10",
    network: 100,
};
const B: Vm = Vm {
    name: "b",
    mac: "02:00:00:00:00:0b",
    ip: "10.0.0.11",
    network: 100,
};

#[test]
fn two_vms_ping_and_carry_tcp() {
    let mut lab = Lab::new();
    let (sock, ns) = one_host(&mut lab, &[A, B]);
    let (ok, out) = ping(&ns[0], B.ip, "3");
    assert!(ok, "ping a → b failed:\n{out}\n{}", lab.log("sw"));
    // iperf3: a bounded TCP run from a to b.
    let bps = iperf(&ns[1], &ns[0], B.ip, "5201");
    assert!(bps > 1e6, "TCP through the switch: only {bps} bit/s");
    eprintln!("iperf3 TCP a → b: {:.2} Gbit/s", bps / 1e9);
    let flows = lab.ctl(&sock, "flows").expect("flows");
    assert!(
        flows["flows"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["proto"] == 6)),
        "no TCP flow in {flows}"
    );
}

#[test]
fn established_flows_stay_in_the_fast_path() {
    let mut lab = Lab::new();
    let (sock, ns) = one_host(&mut lab, &[A, B]);
    assert!(ping(&ns[0], B.ip, "2").0, "warm-up ping failed");
    let misses = stat(&lab, &sock, &["pipeline", "misses"]);
    let punted = stat(&lab, &sock, &["punted", "miss"]);
    let hits = stat(&lab, &sock, &["pipeline", "hits"]);
    // Same ICMP identifier and addresses: the flows already installed.
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &ns[0], "ping", "-c", "2", "-i", "0.05", "-W", "1", B.ip,
    ]);
    assert!(ok, "{out}");
    // A ping session uses a new identifier, so it is one new flow per
    // direction; send 30 packets in one session and check the misses
    // grow by at most those two while hits grow by all of them.
    let (ok, out) = ping(&ns[0], B.ip, "30");
    assert!(ok, "{out}");
    let new_misses = stat(&lab, &sock, &["pipeline", "misses"]) - misses;
    let new_hits = stat(&lab, &sock, &["pipeline", "hits"]) - hits;
    assert!(new_misses <= 4, "{new_misses} misses for two ping sessions");
    assert!(
        new_hits >= 60,
        "only {new_hits} fast-path hits for 32 echo round trips"
    );
    assert!(stat(&lab, &sock, &["punted", "miss"]) - punted <= 4);
    // Every miss went through the coprocessor and back: measured.
    let v = lab.ctl(&sock, "stats").expect("stats");
    let fp = &v["first_packet"];
    assert!(fp["count"].as_u64().unwrap() >= 2, "{v}");
    let (p50, p99, max) = (
        fp["p50_us"].as_f64().unwrap(),
        fp["p99_us"].as_f64().unwrap(),
        fp["max_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{fp}");
    eprintln!(
        "first-packet latency through the coprocessor: p50 {p50} µs, p99 {p99} µs, max {max} µs, {} of {} under 100 µs",
        fp["under_100us"], fp["count"]
    );
}

#[test]
fn threads_run_on_the_cores_they_are_given() {
    let mut lab = Lab::new();
    // The cores this test may use (2 on the machines the suite runs on).
    let allowed = allowed_cores();
    let (first, last) = (allowed[0], *allowed.last().unwrap());
    // Given by hand: the fast path on the first core, the coprocessors
    // on the last (the other way round from the default).
    let cfg = one_host_config(&lab, "sw", &[A]).replacen(
        "[switch]\n",
        &format!("[switch]\nfastpath_cores = [{first}]\ncoprocessor_cores = [{last}]\ncoprocessor_threads = 2\n"),
        1,
    );
    let sock = lab.vswitch("sw", &cfg);
    let v = lab.ctl(&sock, "stats").expect("stats");
    let pid = v["pid"].as_u64().unwrap();
    assert_eq!(thread_cores(pid, "fastpath-0"), vec![first.to_string()]);
    assert_eq!(
        thread_cores(pid, "coproc-0"),
        vec![last.to_string()],
        "{:?}",
        thread_cores(pid, "coproc-1")
    );
    assert_eq!(thread_cores(pid, "coproc-1"), vec![last.to_string()]);
    let threads = v["threads"].as_array().expect("threads in stats");
    assert_eq!(threads[0]["name"], "fastpath-0");
    assert_eq!(threads[0]["cores"], first.to_string());
    assert_eq!(threads[0]["cpu"], first, "{v}");
    assert_eq!(threads[0]["queues"], serde_json::json!([lab.name("ta")]));
    assert_eq!(threads[2]["name"], "coproc-1");
    assert!(threads[0]["busy_pct"].as_f64().is_some());
    drop(lab);

    // The default: the fast path alone on the last core, the rest off it.
    let mut lab = Lab::new();
    let sock = lab.vswitch("sw", &one_host_config(&lab, "sw", &[A]));
    let pid = lab.ctl(&sock, "stats").expect("stats")["pid"]
        .as_u64()
        .unwrap();
    if allowed.len() >= 2 {
        let rest = if allowed.len() == 2 {
            first.to_string()
        } else {
            format!("{first}-{}", allowed[allowed.len() - 2])
        };
        assert_eq!(thread_cores(pid, "fastpath-0"), vec![last.to_string()]);
        assert_eq!(thread_cores(pid, "coproc-0"), vec![rest.clone()]);
        // The main (control) thread and the unnamed ones it started.
        let others = thread_cores(pid, "vswitch");
        assert!(
            !others.is_empty() && others.iter().all(|c| *c == rest),
            "{others:?}"
        );
    }

    // A core the process may not use is refused, naming the field.
    let bad = one_host_config(&lab, "bad", &[]).replacen(
        "[switch]\n",
        "[switch]\nfastpath_cores = [4095]\n",
        1,
    );
    let path = lab.dir.join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("switch: field `fastpath_cores`: core 4095 is not one this process may use"),
        "{err}"
    );
}

#[test]
fn tenants_with_the_same_subnet_are_isolated() {
    let mut lab = Lab::new();
    // c is in network 200 with b's address.
    let c = Vm {
        name: "c",
        mac: "02:00:00:00:00:0c",
        ip: "10.0.0.11",
        network: 200,
    };
    let d = Vm {
        name: "d",
        mac: "02:00:00:00:00:0d",
        ip: "10.0.0.10",
        network: 200,
    };
    let (sock, ns) = one_host(&mut lab, &[A, B, c, d]);
    assert!(ping(&ns[0], B.ip, "3").0, "a → b within network 100");
    assert!(ping(&ns[3], "10.0.0.11", "3").0, "d → c within network 200");
    // Nothing of network 100 reached network 200's ports or back: each
    // port sent exactly what its own network's pings produced.
    let tx_b = port_tx(&lab, &sock, 1);
    let tx_c = port_tx(&lab, &sock, 2);
    assert!(ping(&ns[0], B.ip, "5").0);
    assert_eq!(
        port_tx(&lab, &sock, 2),
        tx_c,
        "network 200's c saw network 100's traffic"
    );
    assert!(port_tx(&lab, &sock, 1) >= tx_b + 5);
}

#[test]
fn spoofed_sources_get_nothing_through() {
    let mut lab = Lab::new();
    let (sock, ns) = one_host(&mut lab, &[A, B]);
    assert!(ping(&ns[0], B.ip, "1").0, "baseline");
    let tap_a = lab.name("ta");
    // Spoofed IP: a claims 10.0.0.12.
    sh(&["ip", "-n", &ns[0], "addr", "flush", "dev", &tap_a]);
    sh(&[
        "ip",
        "-n",
        &ns[0],
        "addr",
        "add",
        "10.0.0.12/24",
        "dev",
        &tap_a,
    ]);
    sh(&[
        "ip", "-n", &ns[0], "neigh", "replace", B.ip, "lladdr", B.mac, "dev", &tap_a,
    ]);
    let before = port_tx(&lab, &sock, 1);
    assert!(!ping(&ns[0], B.ip, "3").0, "a spoofed IP got through");
    assert_eq!(
        port_tx(&lab, &sock, 1),
        before,
        "b received spoofed packets"
    );
    // Spoofed MAC with the right IP.
    sh(&["ip", "-n", &ns[0], "addr", "flush", "dev", &tap_a]);
    sh(&[
        "ip",
        "-n",
        &ns[0],
        "link",
        "set",
        &tap_a,
        "address",
        "02:00:00:00:00:66",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns[0],
        "addr",
        "add",
        &format!("{}/24", A.ip),
        "dev",
        &tap_a,
    ]);
    sh(&[
        "ip", "-n", &ns[0], "neigh", "replace", B.ip, "lladdr", B.mac, "dev", &tap_a,
    ]);
    assert!(!ping(&ns[0], B.ip, "3").0, "a spoofed MAC got through");
    assert_eq!(
        port_tx(&lab, &sock, 1),
        before,
        "b received spoofed packets"
    );
}

#[test]
fn sigterm_stops_cleanly_and_the_taps_can_be_reused() {
    let mut lab = Lab::new();
    let cfg = one_host_config(&lab, "sw", &[A]);
    let sock = lab.vswitch("sw", &cfg);
    let tap = lab.name("ta");
    assert!(try_sh(&["ip", "link", "show", &tap]).0);
    let pid = lab.last_child().id();
    // SAFETY: kill(2) on the vswitch we spawned and still hold.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let status = {
        let c = lab.last_child();
        let mut st = None;
        wait_until("vswitch to exit", Duration::from_secs(5), || {
            st = c.try_wait().ok().flatten();
            st.is_some()
        });
        st.expect("exited")
    };
    assert!(status.success(), "exit status {status}: {}", lab.log("sw"));
    assert!(!sock.exists(), "control socket left behind");
    assert!(!try_sh(&["ip", "link", "show", &tap]).0, "tap left behind");
    // The same config starts again.
    let sock = lab.vswitch("sw", &cfg);
    assert!(lab.ctl(&sock, "stats").is_some());
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    // No root needed: `check` touches no device.
    let dir = std::env::temp_dir().join(format!("vswitch-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[port]]\nname = \"x\"\ntype = \"tap\"\n[[vm]]\nname = \"a\"\nport = \"y\"\nmac = \"02:00:00:00:00:01\"\nips = [\"10.0.0.2\"]\nnetwork = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vm[0] (a): field `port`: \"y\" is not a configured port"),
        "{err}"
    );
}

/// A switch "sw" with VM a on tap `tap` and VM b on the af-xdp port
/// `ours` (a veth end); `switch` is added to its `[switch]` section.
fn tap_and_af_xdp_config(lab: &Lab, tap: &str, ours: &str, switch: &str) -> String {
    format!(
        "[switch]\npoll = \"adaptive\"\n{switch}flow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [[port]]\nname = \"{tap}\"\ntype = \"tap\"\n[[port]]\nname = \"{ours}\"\ntype = \"af-xdp\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n[[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{tap}\"\nmac = \"{amac}\"\nips = [\"{aip}\"]\nnetwork = 100\n\
         [[vm]]\nname = \"b\"\nport = \"{ours}\"\nmac = \"{bmac}\"\nips = [\"{bip}\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
        amac = A.mac,
        aip = A.ip,
        bmac = B.mac,
        bip = B.ip,
    )
}

#[test]
fn af_xdp_vm_ports_on_veth_reach_tap_vms() {
    let mut lab = Lab::new();
    // VM b is behind a veth pair: its end in its namespace, ours served
    // by AF_XDP.
    let nb = lab.netns("vb");
    let (ours, theirs) = (lab.name("xs"), lab.name("xv"));
    lab::veth_vm(
        None,
        &ours,
        &theirs,
        &nb,
        B.mac,
        &format!("{}/24", B.ip),
        None,
    );
    let tap = lab.name("ta");
    let sock = lab.vswitch("sw", &tap_and_af_xdp_config(&lab, &tap, &ours, ""));
    let na = lab.netns("va");
    lab.attach_vm(&tap, &na, A.mac, &format!("{}/24", A.ip));
    let (ok, out) = ping(&na, B.ip, "3");
    assert!(ok, "tap VM → AF_XDP VM failed:\n{out}\n{}", lab.log("sw"));
    let (ok, out) = ping(&nb, A.ip, "3");
    assert!(ok, "AF_XDP VM → tap VM failed:\n{out}");
    let bps = iperf(&na, &nb, A.ip, "5201");
    assert!(bps > 1e6, "TCP from the AF_XDP VM: {bps} bit/s");
    // And to it: the tap VM's super-frames cut, and their checksums
    // completed, for the AF_XDP port (which carries no offload metadata);
    // `iperf` asserts the AF_XDP VM's stack counted no checksum error.
    let bps = iperf(&nb, &na, B.ip, "5202");
    assert!(bps > 1e6, "TCP to the AF_XDP VM: {bps} bit/s");
    let st = lab.ctl(&sock, "stats").expect("stats");
    assert!(st["ports"][1]["tx_segments"].as_u64() > Some(100), "{st}");
    let st = lab.ctl(&sock, "stats").expect("stats");
    let rx = st["ports"][1]["rx_packets"].as_u64().unwrap();
    assert!(rx > 100, "AF_XDP port counters: {st}");
    // A live upgrade carries the AF_XDP port (socket, rings, frame pool,
    // the veth's XDP program) and its counters.
    lab.takeover(std::path::Path::new(env!("CARGO_BIN_EXE_vswitch")), "sw");
    lab.assert_handed_over(0, "sw");
    let (ok, out) = ping(&nb, A.ip, "3");
    assert!(
        ok,
        "AF_XDP VM after the upgrade:\n{out}\n{}",
        lab.log("sw-new")
    );
    let st = lab.ctl(&sock, "stats").expect("stats");
    assert!(
        st["ports"][1]["rx_packets"].as_u64().unwrap() > rx,
        "counters carried and counting: {st}"
    );
}

#[test]
fn the_distributed_router_routes_answers_ping_and_ttl_expiry() {
    let mut lab = Lab::new();
    let (ta, te) = (lab.name("ta"), lab.name("te"));
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n\
         [[port]]\nname = \"{ta}\"\ntype = \"tap\"\n[[port]]\nname = \"{te}\"\ntype = \"tap\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\
         [[network.subnet]]\ncidr = \"10.0.1.0/24\"\ngateway = \"10.0.1.1\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{ta}\"\nmac = \"{amac}\"\nips = [\"10.0.0.10\"]\nnetwork = 100\n\
         [[vm]]\nname = \"e\"\nport = \"{te}\"\nmac = \"02:00:00:00:00:0e\"\nips = [\"10.0.1.10\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
        amac = A.mac,
    );
    lab.vswitch("sw", &cfg);
    let (na, ne) = (lab.netns("va"), lab.netns("ve"));
    lab.attach_vm(&ta, &na, A.mac, "10.0.0.10/24");
    lab.attach_vm(&te, &ne, "02:00:00:00:00:0e", "10.0.1.10/24");
    sh(&[
        "ip", "-n", &na, "route", "add", "default", "via", "10.0.0.1",
    ]);
    sh(&[
        "ip", "-n", &ne, "route", "add", "default", "via", "10.0.1.1",
    ]);
    // Across subnets: routed on this host, one hop each way.
    let (ok, out) = ping(&na, "10.0.1.10", "3");
    assert!(
        ok,
        "routing 10.0.0.10 → 10.0.1.10 failed:\n{out}\n{}",
        lab.log("sw")
    );
    assert!(
        out.contains("ttl=63"),
        "the reply was not routed (TTL not decremented):\n{out}"
    );
    // The gateways answer ping, in both subnets.
    for gw in ["10.0.0.1", "10.0.1.1"] {
        let (ok, out) = ping(&na, gw, "2");
        assert!(ok, "gateway {gw} did not answer:\n{out}");
    }
    // TTL 1 across the router: "time to live exceeded" from the gateway.
    let (_, out) = try_sh(&[
        "ip",
        "netns",
        "exec",
        &na,
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "-t",
        "1",
        "10.0.1.10",
    ]);
    assert!(
        out.contains("From 10.0.0.1") && out.contains("Time to live exceeded"),
        "{out}"
    );
    // traceroute (UDP probes) shows the router as the first hop, then
    // the destination (its port-unreachable answer ends the trace).
    let out = sh(&[
        "timeout",
        "30",
        "ip",
        "netns",
        "exec",
        &na,
        "traceroute",
        "-n",
        "-q",
        "1",
        "-w",
        "1",
        "-m",
        "4",
        "10.0.1.10",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let hops: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(hops, ["10.0.0.1", "10.0.1.10"], "traceroute:\n{text}");
}

#[test]
fn idle_af_xdp_vm_ports_hold_only_their_share_of_the_frame_pool() {
    // Four af-xdp VM ports whose VMs send nothing: each keeps its fill
    // share on the kernel's fill ring, not a whole ring's worth (four of
    // those once held the pool and starved everything else).
    let mut lab = Lab::new();
    let nb = lab.netns("vb");
    let mut ports = String::new();
    for i in 0..4 {
        let (ours, theirs) = (lab.name(&format!("xs{i}")), lab.name(&format!("xv{i}")));
        sh(&[
            "ip", "link", "add", &ours, "type", "veth", "peer", "name", &theirs, "netns", &nb,
        ]);
        sh(&["ip", "link", "set", &ours, "up"]);
        sh(&["ip", "-n", &nb, "link", "set", &theirs, "up"]);
        ports += &format!("[[port]]\nname = \"{ours}\"\ntype = \"af-xdp\"\n");
    }
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\n{ports}",
        sock = lab.socket("sw").display(),
    );
    let sock = lab.vswitch("sw", &cfg);
    let st = lab.ctl(&sock, "stats").expect("stats");
    let pool = &st["frame_pool"];
    let (free, chunks) = (
        pool["free"].as_u64().expect("free"),
        pool["chunks"].as_u64().expect("chunks"),
    );
    let share = fastpath::dataplane::VM_FILL_SHARE as u64;
    assert!(
        chunks - free <= 4 * share,
        "four idle af-xdp ports hold {} of {chunks} frames (share {share} each): {st}",
        chunks - free
    );
    assert!(free >= 8192, "the uplink's part stays free: {st}");
    for p in st["ports"].as_array().expect("ports") {
        assert_eq!(p["af_xdp"]["fill_short"], 0, "{p}");
    }
}

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name's closing parenthesis: fields 3 onwards;
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn a_tap_deleted_under_the_switch_is_retired_not_spun_on() {
    let mut lab = Lab::new();
    let (sock, ns) = one_host(&mut lab, &[A, B]);
    let (ok, out) = ping(&ns[0], B.ip, "2");
    assert!(ok, "{out}");
    let pid = stat(&lab, &sock, &["pid"]);
    // B's device goes away under the switch (its namespace's admin
    // deleted it); the switch's descriptor now reports an error forever.
    sh(&["ip", "-n", &ns[1], "link", "del", &lab.name("tb")]);
    wait_until("the port to be retired", Duration::from_secs(5), || {
        lab.log("sw").contains("no longer polled")
    });
    // Idle (adaptive mode): it sleeps again instead of waking at once.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 60,
        "the switch used {used} ticks of CPU in 2 s with a deleted tap (spinning?)"
    );
    let v = lab.ctl(&sock, "stats").expect("stats");
    assert!(v["ports"][1]["rx_errors"].as_u64() >= Some(1), "{v}");
    // The other port still works.
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &ns[0], "ping", "-c", "2", "-W", "1", "10.0.0.1",
    ]);
    assert!(ok, "the gateway through the surviving port: {out}");
}

/// Decisions of each coprocessor thread, from `ctl stats`.
fn decisions(lab: &Lab, sock: &std::path::Path) -> Vec<u64> {
    let v = lab.ctl(sock, "stats").expect("stats");
    v["threads"]
        .as_array()
        .expect("threads in stats")
        .iter()
        .filter(|t| t["role"] == "coprocessor")
        .map(|t| t["decisions"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn two_coprocessor_threads_share_the_decisions_of_many_new_connections() {
    let mut lab = Lab::new();
    let cfg = one_host_config(&lab, "sw", &[A, B]).replacen(
        "[switch]\n",
        "[switch]\ncoprocessor_threads = 2\n",
        1,
    );
    let (sock, ns) = one_host_from(&mut lab, "sw", &cfg, &[A, B]);
    assert!(ping(&ns[0], B.ip, "1").0, "a reaches b");
    // 300 UDP flows from a to b, each from a port of its own (one a
    // millisecond: within the port's punt budget).
    let send = format!(
        "import socket, time\nfor p in range(20000, 20300):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('{}', p))\n    s.sendto(b'x', ('{}', 9))\n    s.close()\n    time.sleep(0.001)\n",
        A.ip, B.ip
    );
    let (ok, out) = try_sh(&["ip", "netns", "exec", &ns[0], "python3", "-c", &send]);
    assert!(ok, "{out}");
    // Each thread decided some: those steered to it (300 flows over 16
    // shards, 8 per thread), or taken from the other's queue while that
    // one slept. The counts are published once a second.
    let mut d = Vec::new();
    wait_until("300 decisions", Duration::from_secs(10), || {
        d = decisions(&lab, &sock);
        d.iter().sum::<u64>() >= 300
    });
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d.iter().sum::<u64>() >= 300,
        "every new flow decided: {d:?}"
    );
    assert!(
        d.iter().all(|&n| n >= 30),
        "both threads took their share: {d:?}"
    );
    assert!(stat(&lab, &sock, &["punted", "miss"]) >= 300);
    eprintln!("decisions per coprocessor thread: {d:?}");
}

#[test]
fn an_af_xdp_vm_port_gets_a_socket_per_fast_path_thread() {
    let mut lab = Lab::new();
    // VM b behind a veth pair with two queues each way: our end gets an
    // AF_XDP socket on each, one per fast-path thread.
    let nb = lab.netns("vb");
    let (ours, theirs) = (lab.name("xs"), lab.name("xv"));
    let q = ["numtxqueues", "2", "numrxqueues", "2"];
    let mut add = vec!["ip", "link", "add", &ours];
    add.extend(q);
    add.extend(["type", "veth", "peer", "name", &theirs, "netns", &nb]);
    add.extend(q);
    sh(&add);
    sh(&["ip", "link", "set", &ours, "up"]);
    sh(&["ip", "-n", &nb, "link", "set", &theirs, "address", B.mac]);
    let cidr = format!("{}/24", B.ip);
    sh(&["ip", "-n", &nb, "addr", "add", &cidr, "dev", &theirs]);
    sh(&["ip", "-n", &nb, "link", "set", &theirs, "up"]);
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &nb, "ethtool", "-K", &theirs, "tx", "off",
    ]);
    assert!(ok, "ethtool: {out}");
    let tap = lab.name("ta");
    let cfg = tap_and_af_xdp_config(&lab, &tap, &ours, "fastpath_threads = 2\n");
    let sock = lab.vswitch("sw", &cfg);
    let na = lab.netns("va");
    lab.attach_vm(&tap, &na, A.mac, &format!("{}/24", A.ip));
    let (ok, out) = ping(&na, B.ip, "3");
    assert!(ok, "tap VM → AF_XDP VM failed:\n{out}\n{}", lab.log("sw"));
    // Many connections from the veth VM: its kernel spreads them over
    // both queues, so both threads take frames from the AF_XDP port.
    sh(&[
        "ip", "netns", "exec", &na, "iperf3", "-s", "-1", "-D", "-p", "5203",
    ]);
    wait_until("iperf3 server", Duration::from_secs(5), || {
        try_sh(&["ip", "netns", "exec", &na, "ss", "-ltn"])
            .1
            .contains(":5203")
    });
    let out = sh(&[
        "timeout", "30", "ip", "netns", "exec", &nb, "iperf3", "-c", A.ip, "-p", "5203", "-t", "1",
        "-P", "16", "-J",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    assert!(bps > Some(1e6), "TCP from the AF_XDP VM: {bps:?}");
    let st = lab.ctl(&sock, "stats").expect("stats");
    // Each thread's frames from its queue of the AF_XDP port (id 1).
    let rx: Vec<u64> = st["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .filter(|t| t["role"] == "fast path")
        .map(|t| t["queue_rx_packets"][1].as_u64().unwrap_or(0))
        .collect();
    assert!(
        rx.len() == 2 && rx.iter().all(|&n| n > 20),
        "both threads receive from the AF_XDP port: {rx:?}\n{st}"
    );
    assert!(st["ports"][1]["rx_packets"].as_u64() > Some(100), "{st}");
}
