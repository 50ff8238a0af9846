//! Programming a running switch through its control socket: every kind
//! of object added, changed and removed with `vswitch ctl apply`, checked
//! with real traffic; bad requests refused with the state unchanged;
//! `ctl trace`; Prometheus metrics; the socket closed to non-root users.
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

mod lab;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use lab::{apply, ctl_args as ctl, sh, try_sh, Lab};
use serde_json::{json, Value};

/// Raw bytes on the socket; the one-line answer.
fn raw(sock: &Path, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.write_all(b"\n");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("answer");
    serde_json::from_str(&line).expect("JSON answer")
}

fn ping(ns: &str, ip: &str) -> bool {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-W", "1", ip,
    ])
    .0
}

struct Switch {
    sock: std::path::PathBuf,
    ns_a: String,
    ns_b: String,
    spare: String,
}

/// A (10.0.0.10) and B (10.0.0.11) on network 100; a spare tap port with
/// no VM yet; metrics on a loopback port.
fn start(lab: &mut Lab, metrics_port: u16) -> Switch {
    let (ta, tb, spare) = (lab.name("ta"), lab.name("tb"), lab.name("tc"));
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{sock}\"\n\
         metrics = \"127.0.0.1:{metrics_port}\"\n\n\
         [[port]]\nname = \"{ta}\"\ntype = \"tap\"\n[[port]]\nname = \"{tb}\"\ntype = \"tap\"\n\
         [[port]]\nname = \"{spare}\"\ntype = \"tap\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{ta}\"\nmac = \"02:00:00:00:00:0a\"\nips = [\"10.0.0.10\"]\nnetwork = 100\n\
         [[vm]]\nname = \"b\"\nport = \"{tb}\"\nmac = \"02:00:00:00:00:0b\"\nips = [\"10.0.0.11\"]\nnetwork = 100\n",
        sock = lab.socket("sw").display(),
    );
    let sock = lab.vswitch("sw", &cfg);
    let ns_a = lab.netns("va");
    let ns_b = lab.netns("vb");
    lab.attach_vm(&ta, &ns_a, "02:00:00:00:00:0a", "10.0.0.10/24");
    lab.attach_vm(&tb, &ns_b, "02:00:00:00:00:0b", "10.0.0.11/24");
    sh(&[
        "ip", "-n", &ns_a, "route", "add", "default", "via", "10.0.0.1",
    ]);
    Switch {
        sock,
        ns_a,
        ns_b,
        spare,
    }
}

fn version(sock: &Path) -> u64 {
    ctl(sock, &["topology"]).expect("topology")["version"]
        .as_u64()
        .expect("version")
}

#[test]
fn every_object_kind_changes_at_run_time_and_traffic_follows() {
    let mut lab = Lab::new();
    let sw = start(&mut lab, 19464);
    assert!(ping(&sw.ns_a, "10.0.0.11"), "{}", lab.log("sw"));
    // A new subnet for the network, and a VM in it on the spare port.
    let net = json!({"vni": 100, "gateway_mac": "02:00:00:00:00:fe", "subnet": [
        {"cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}, {"cidr": "10.0.5.0/24", "gateway": "10.0.5.1"}]});
    let vm_c = json!({"name": "c", "port": sw.spare, "mac": "02:00:00:00:00:0c",
                      "ips": ["10.0.5.12"], "network": 100});
    let r = apply(
        &sw.sock,
        json!([{"op": "change-network", "network": net}, {"op": "add-vm", "vm": vm_c}]),
    )
    .expect("change-network + add-vm");
    assert_eq!(r["ops"], 2);
    let ns_c = lab.netns("vc");
    lab.attach_vm(&sw.spare, &ns_c, "02:00:00:00:00:0c", "10.0.5.12/24");
    sh(&[
        "ip", "-n", &ns_c, "route", "add", "default", "via", "10.0.5.1",
    ]);
    assert!(
        ping(&sw.ns_a, "10.0.5.12"),
        "a → c (routed to the new subnet)\n{}",
        lab.log("sw")
    );
    // A security group, then C joins it: pings in are denied.
    let r = apply(
        &sw.sock,
        json!([
            {"op": "add-security-group", "security_group": {"name": "quiet", "rule": [{"direction": "egress"}]}},
            {"op": "change-vm", "vm": {"name": "c", "port": sw.spare, "mac": "02:00:00:00:00:0c",
                                       "ips": ["10.0.5.12"], "network": 100, "security_groups": ["quiet"]}}
        ]),
    )
    .expect("add group + change vm");
    assert_eq!(r["ops"], 2);
    assert!(!ping(&sw.ns_a, "10.0.5.12"), "c's group admits no ping");
    // Rules changed: ICMP admitted.
    apply(
        &sw.sock,
        json!([{"op": "set-rules", "name": "quiet", "rules": [
            {"direction": "egress"}, {"direction": "ingress", "protocol": "icmp"}]}]),
    )
    .expect("set-rules");
    assert!(ping(&sw.ns_a, "10.0.5.12"), "icmp admitted now");
    // Remote endpoints in bulk, then removed.
    let remotes: Vec<Value> = (0..500)
        .map(|i| json!({"network": 100, "ip": format!("10.0.0.{}", 100 + i % 100), "mac": "02:00:00:00:01:01", "vtep": format!("192.168.7.{}", i % 100)}))
        .take(100)
        .collect();
    apply(&sw.sock, json!([{"op": "set-remotes", "remotes": remotes}])).expect("set-remotes");
    assert_eq!(ctl(&sw.sock, &["topology"]).unwrap()["remotes_total"], 100);
    let keys: Vec<Value> = (0..100)
        .map(|i| json!({"network": 100, "ip": format!("10.0.0.{}", 100 + i)}))
        .collect();
    apply(&sw.sock, json!([{"op": "remove-remotes", "remotes": keys}])).expect("remove-remotes");
    assert_eq!(ctl(&sw.sock, &["topology"]).unwrap()["remotes_total"], 0);
    // C removed: its flows go, and so does the traffic.
    apply(
        &sw.sock,
        json!([{"op": "remove-vm", "name": "c"}, {"op": "remove-security-group", "name": "quiet"}]),
    )
    .expect("remove-vm");
    assert!(!ping(&sw.ns_a, "10.0.5.12"), "c is gone");
    let flows = ctl(&sw.sock, &["flows", "--ip", "10.0.5.12"]).unwrap();
    assert!(
        flows["flows"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["output"] != "port 2")),
        "a flow still outputs to c's port: {flows}"
    );
    // A network of its own, added and removed.
    let net2 = json!({"vni": 300, "gateway_mac": "02:00:00:00:03:fe", "subnet": [{"cidr": "10.3.0.0/24", "gateway": "10.3.0.1"}]});
    apply(&sw.sock, json!([{"op": "add-network", "network": net2}])).expect("add-network");
    apply(&sw.sock, json!([{"op": "remove-network", "vni": 300}])).expect("remove-network");
    // A and B were never disturbed.
    assert!(ping(&sw.ns_b, "10.0.0.10"));
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let mut lab = Lab::new();
    let sw = start(&mut lab, 19465);
    let v0 = version(&sw.sock);
    let topo0 = ctl(&sw.sock, &["topology"]).unwrap();
    let spare = sw.spare.clone();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": spare, "mac": "02:00:00:00:00:99", "ips": ["10.0.0.99"], "network": 100, "colour": "red"}}]),
            "unknown field `colour`",
        ),
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": spare, "mac": "02:00:00:00:00:99", "ips": "10.0.0.99", "network": 100}}]),
            "ops[0]",
        ),
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": spare, "mac": "02:00:00:00:00:0a", "ips": ["10.0.0.99"], "network": 100}}]),
            "already the MAC of vm a",
        ),
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": spare, "mac": "02:00:00:00:00:99", "ips": ["10.0.0.99"], "network": 100, "security_groups": ["nope"]}}]),
            "no group named nope",
        ),
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": "tap-nowhere", "mac": "02:00:00:00:00:99", "ips": ["10.0.0.99"], "network": 100}}]),
            "is not a configured port",
        ),
        (
            json!([{"op": "change-network", "network": {"vni": 100, "gateway_mac": "02:00:00:00:00:fe", "subnet": [
            {"cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}, {"cidr": "10.0.0.128/25", "gateway": "10.0.0.129"}]}}]),
            "overlap",
        ),
        // A good operation, then a bad one: neither applies.
        (
            json!([{"op": "add-vm", "vm": {"name": "x", "port": spare, "mac": "02:00:00:00:00:99", "ips": ["10.0.0.99"], "network": 100}},
                {"op": "remove-vm", "name": "nobody"}]),
            "operation 1: vm nobody: not found",
        ),
        (json!([{"op": "explode"}]), "unknown variant `explode`"),
    ];
    for (ops, expect) in cases {
        let e = apply(&sw.sock, ops.clone()).expect_err("a bad request was accepted");
        assert!(e.contains(expect), "{ops}\n→ {e}");
    }
    // Garbage, oversized and malformed requests on the socket itself.
    let e = raw(&sw.sock, &[0xff, 0xfe, 0x00, 0x12]);
    assert!(
        e["error"].as_str().unwrap_or("").contains("not JSON") || e["error"].is_string(),
        "{e}"
    );
    let e = raw(&sw.sock, br#"{"cmd": 7}"#);
    assert!(e["error"].as_str().unwrap_or("").contains("`cmd`"), "{e}");
    let big = vec![b' '; 65 << 20];
    let e = raw(&sw.sock, &big);
    assert!(
        e["error"].as_str().unwrap_or("").contains("larger than"),
        "{e}"
    );
    // Nothing changed, and the switch still forwards.
    assert_eq!(version(&sw.sock), v0);
    assert_eq!(ctl(&sw.sock, &["topology"]).unwrap(), topo0);
    assert!(ping(&sw.ns_a, "10.0.0.11"));
}

#[test]
fn the_socket_refuses_other_users() {
    let mut lab = Lab::new();
    let sw = start(&mut lab, 19466);
    // The lab directory must be traversable for the check to be about
    // the socket's own permissions.
    sh(&["chmod", "755", lab.dir.to_str().expect("path")]);
    let (ok, out) = try_sh(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        env!("CARGO_BIN_EXE_vswitch"),
        "ctl",
        "--socket",
        sw.sock.to_str().expect("path"),
        "stats",
    ]);
    assert!(!ok, "nobody reached the control socket:\n{out}");
    assert!(out.contains("ermission denied"), "{out}");
    // Root still can.
    assert!(ctl(&sw.sock, &["stats"]).is_ok());
}

/// `ctl trace` of a packet from A (its tap port) to B.
fn trace_a_to_b(sock: &Path, lab: &Lab, proto: &str, sport: &str, dport: &str) -> Value {
    let port = lab.name("ta");
    ctl(
        sock,
        &[
            "trace",
            "--port",
            &port,
            "--src",
            "10.0.0.10",
            "--dst",
            "10.0.0.11",
            "--proto",
            proto,
            "--sport",
            sport,
            "--dport",
            dport,
        ],
    )
    .expect("trace")
}

#[test]
fn trace_explains_hits_denials_and_metrics_are_served() {
    let mut lab = Lab::new();
    let sw = start(&mut lab, 19467);
    // A hit: a real datagram installs the flow the trace then finds.
    sh(&[
        "ip",
        "netns",
        "exec",
        &sw.ns_a,
        "python3",
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.bind(('10.0.0.10', 40000)); s.sendto(b'x', ('10.0.0.11', 80))",
    ]);
    let trace_udp = || trace_a_to_b(&sw.sock, &lab, "udp", "40000", "80");
    // (The datagram leaves once the VM's ARP is answered.)
    lab::wait_until("the datagram's flow", Duration::from_secs(5), || {
        trace_udp()["steps"].to_string().contains("hit")
    });
    let t = trace_udp();
    let steps = t["steps"].to_string();
    assert!(steps.contains("hit"), "{t}");
    assert!(
        t["verdict"]
            .as_str()
            .unwrap_or("")
            .contains("output port 1"),
        "{t}"
    );
    // A miss denied by a security group.
    apply(
        &sw.sock,
        json!([
            {"op": "add-security-group", "security_group": {"name": "web", "rule": [
                {"direction": "ingress", "protocol": "tcp", "ports": 80}, {"direction": "egress"}]}},
            {"op": "change-vm", "vm": {"name": "b", "port": lab.name("tb"), "mac": "02:00:00:00:00:0b",
                                       "ips": ["10.0.0.11"], "network": 100, "security_groups": ["web"]}}
        ]),
    )
    .expect("group");
    let t = trace_a_to_b(&sw.sock, &lab, "tcp", "40000", "22");
    assert!(
        t["steps"].to_string().contains("denied (default deny)"),
        "{t}"
    );
    assert_eq!(t["verdict"], "drop (acl_denied)", "{t}");
    let t = trace_a_to_b(&sw.sock, &lab, "tcp", "40000", "80");
    assert!(t["steps"].to_string().contains("admitted by web#0"), "{t}");
    assert!(
        t["verdict"].as_str().unwrap_or("").contains("tracked"),
        "{t}"
    );
    // The trace changed nothing: no connection was made.
    assert_eq!(ctl(&sw.sock, &["conntrack"]).unwrap()["total"], 0);
    // Metrics.
    let text = lab::metrics(19_467);
    for family in [
        "vswitch_port_rx_packets_total{port=",
        "vswitch_punts_total{reason=\"miss\"}",
        "vswitch_flows ",
        "vswitch_coprocessor_backlog ",
        "vswitch_coprocessor_replies_total{kind=\"arp\"}",
        "vswitch_conntrack_connections ",
        "# TYPE vswitch_drops_total counter",
    ] {
        assert!(text.contains(family), "no {family} in\n{text}");
    }
    // A scraper that trickles its request a byte at a time holds only the
    // metrics thread: the control socket answers at once meanwhile, and the
    // trickler is cut off at the metrics deadline.
    let trickler = std::thread::spawn(|| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect("127.0.0.1:19467").expect("connect");
        let t = std::time::Instant::now();
        for b in b"GET /metrics HTTP/1.0" {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let t = std::time::Instant::now();
        ctl(&sw.sock, &["stats"]).expect("stats while a scraper trickles");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "the control socket waited {:?} behind a slow metrics client",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let held = trickler.join().expect("trickler");
    assert!(
        held < Duration::from_secs(3),
        "the trickler was held {held:?}, not cut off"
    );
    // And the next scrape is served.
    let out = sh(&[
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:19467/metrics', timeout=5).read().decode())",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("vswitch_flows "));
}

#[test]
fn ports_are_added_and_removed_at_run_time() {
    let mut lab = Lab::new();
    let sw = start(&mut lab, 19468);
    let td = lab.name("td");
    let r = ctl(&sw.sock, &["port-add", &td]).expect("port-add");
    assert_eq!(r["id"], 3, "the next id after the configured ports");
    apply(
        &sw.sock,
        json!([{"op": "add-vm", "vm": {"name": "d", "port": td, "mac": "02:00:00:00:00:0d",
                                       "ips": ["10.0.0.13"], "network": 100}}]),
    )
    .expect("add-vm on the new port");
    let ns_d = lab.netns("vd");
    lab.attach_vm(&td, &ns_d, "02:00:00:00:00:0d", "10.0.0.13/24");
    assert!(
        ping(&sw.ns_a, "10.0.0.13"),
        "a → d on a port added at run time\n{}",
        lab.log("sw")
    );
    let e = ctl(&sw.sock, &["port-remove", &td]).expect_err("removed under a VM");
    assert!(e.contains("vm d is attached"), "{e}");
    let e = ctl(&sw.sock, &["port-add", &td]).expect_err("added twice");
    assert!(e.contains("already exists"), "{e}");
    apply(&sw.sock, json!([{"op": "remove-vm", "name": "d"}])).expect("remove-vm");
    ctl(&sw.sock, &["port-remove", &td]).expect("port-remove");
    assert!(!ping(&sw.ns_a, "10.0.0.13"));
    let st = ctl(&sw.sock, &["stats"]).unwrap();
    assert!(st["ports"].as_array().is_some_and(|p| p.len() == 4), "{st}");
    // The rest of the switch carries on.
    assert!(ping(&sw.ns_a, "10.0.0.11"));

    // A vhost-user port: its socket appears, and goes with the port.
    let vu = lab.dir.join("vu.sock");
    let vu_s = vu.to_str().expect("path");
    let add_vu = |extra: &[&str]| {
        let mut args = vec!["port-add", "vu1", "--type", "vhost-user"];
        args.extend_from_slice(extra);
        ctl(&sw.sock, &args)
    };
    let e = add_vu(&["--mac", "02:00:00:00:00:1e"]).expect_err("no socket");
    assert!(e.contains("field `socket`"), "{e}");
    let e = add_vu(&["--socket", vu_s]).expect_err("no mac");
    assert!(e.contains("field `mac`"), "{e}");
    let e = add_vu(&[
        "--socket",
        vu_s,
        "--mac",
        "02:00:00:00:00:1e",
        "--mode",
        "both",
    ])
    .expect_err("bad mode");
    assert!(e.contains("field `mode`"), "{e}");
    let e = ctl(&sw.sock, &["port-add", "tx1", "--mac", "02:00:00:00:00:1e"])
        .expect_err("a tap with a MAC");
    assert!(e.contains("field `mac`: only vhost-user ports"), "{e}");
    // A socket path naming a file that is not a socket: refused, and the
    // file is left as it was.
    let precious = lab.dir.join("precious.txt");
    std::fs::write(&precious, b"keep me").expect("write");
    let e = add_vu(&[
        "--socket",
        precious.to_str().expect("path"),
        "--mac",
        "02:00:00:00:00:1e",
    ])
    .expect_err("not a socket");
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&precious).expect("still there"), b"keep me");
    let r = add_vu(&["--socket", vu_s, "--mac", "02:00:00:00:00:1e"]).expect("vhost-user port-add");
    assert_eq!(r["id"], 4);
    assert!(vu.exists(), "the port listens on its socket");
    std::os::unix::net::UnixStream::connect(&vu).expect("a VMM can connect");
    let e = ctl(
        &sw.sock,
        &[
            "port-add",
            "vu2",
            "--type",
            "vhost-user",
            "--socket",
            vu_s,
            "--mac",
            "02:00:00:00:00:1f",
        ],
    )
    .expect_err("the same socket twice");
    assert!(e.contains("field `socket`"), "{e}");
    ctl(&sw.sock, &["port-remove", "vu1"]).expect("port-remove vu1");
    assert!(!vu.exists(), "the socket went with the port");
    // Client mode towards a VMM that is not there: it keeps trying, and
    // says why it cannot connect.
    let gone = lab.dir.join("no-vmm.sock");
    add_vu(&[
        "--socket",
        gone.to_str().expect("path"),
        "--mac",
        "02:00:00:00:00:1e",
        "--mode",
        "client",
    ])
    .expect("a client-mode port");
    lab::wait_until(
        "the failed connect reported",
        Duration::from_secs(5),
        || {
            let st = ctl(&sw.sock, &["stats"]).unwrap_or_default();
            st["vhost_user"].as_array().into_iter().flatten().any(|p| {
                p["name"] == "vu1"
                    && p["mode"] == "client"
                    && p["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("connecting to"))
            })
        },
    );
}
