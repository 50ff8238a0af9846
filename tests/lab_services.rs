//! The coprocessor's stateful services on a real switch: security groups
//! with connection tracking (changed at run time), SNAT to an external
//! network, floating IPs. VMs and the external network are namespaces
//! with real kernel stacks; the servers and clients are small Python
//! programs (python3 is on every machine the suite runs on).
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

mod lab;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{sh, try_sh, wait_until, Lab, ECHO, PINGER};

/// An HTTP server answering every GET with the client's "ip:port".
/// (A plain TCPServer: HTTPServer looks up its own name in DNS first.)
const WHOAMI: &str = r#"
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("%s:%d\n" % self.client_address).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// GET http://IP:PORT/ (optionally from source port SPORT), print the
/// body; exit 1 on any failure within the timeout.
const GET: &str = r#"
import socket, sys
ip, port, sport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(timeout)
if sport:
    s.bind(("", sport))
try:
    s.connect((ip, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
except Exception as e:
    print("failed:", e)
    sys.exit(1)
print(data.split(b"\r\n\r\n", 1)[-1].decode().strip())
"#;

struct Vm<'a> {
    name: &'a str,
    mac: &'a str,
    ip: &'a str,
    extra: &'a str,
}

const A: Vm = Vm {
    name: "a",
    mac: "02:00:00:00:00:0a",
    ip: "10.0.0.10",
    extra: "security_groups = [\"client\"]",
};
const B: Vm = Vm {
    name: "b",
    mac: "02:00:00:00:00:0b",
    ip: "10.0.0.11",
    extra: "security_groups = [\"web\"]\nfloating_ip = \"203.0.113.50\"",
};
const C: Vm = Vm {
    name: "c",
    mac: "02:00:00:00:00:0c",
    ip: "10.0.1.12",
    extra: "",
};

const GROUPS: &str = r#"
[[security_group]]
name = "client"
[[security_group.rule]]
direction = "egress"

[[security_group]]
name = "web"
[[security_group.rule]]
direction = "ingress"
protocol = "tcp"
ports = 8080
[[security_group.rule]]
direction = "egress"
"#;

struct Switch {
    sock: std::path::PathBuf,
    ns: Vec<String>,
    ext: String,
}

/// VMs A (client), B (web, floating IP), C (unfiltered, other subnet);
/// an external namespace on the switch's external port at 203.0.113.1.
fn start(lab: &mut Lab) -> Switch {
    start_with(lab, "")
}

/// [`start`] with `extra` config (sections) appended.
fn start_with(lab: &mut Lab, extra: &str) -> Switch {
    let ext_tap = lab.name("tx");
    let idle = if extra.is_empty() { 30 } else { 1 };
    let mut c = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\nidle_timeout_s = {idle}\ncontrol_socket = \"{}\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\nsnat = true\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\
         [[network.subnet]]\ncidr = \"10.0.1.0/24\"\ngateway = \"10.0.1.1\"\n\n\
         [[port]]\nname = \"{ext_tap}\"\ntype = \"tap\"\n\n\
         [external]\nport = \"{ext_tap}\"\ncidr = \"203.0.113.0/24\"\nsnat = [\"203.0.113.10\"]\n\
         snat_ports = \"40000-40100\"\n{GROUPS}\n",
        lab.socket("sw").display()
    );
    for v in [&A, &B, &C] {
        let tap = lab.name(&format!("t{}", v.name));
        c += &format!("[[port]]\nname = \"{tap}\"\ntype = \"tap\"\n\n");
        c += &format!(
            "[[vm]]\nname = \"{}\"\nport = \"{tap}\"\nmac = \"{}\"\nips = [\"{}\"]\nnetwork = 100\n{}\n\n",
            v.name, v.mac, v.ip, v.extra
        );
    }
    c += extra;
    let sock = lab.vswitch("sw", &c);
    let mut ns = Vec::new();
    for v in [&A, &B, &C] {
        let n = lab.netns(&format!("v{}", v.name));
        lab.attach_vm(
            &lab.name(&format!("t{}", v.name)),
            &n,
            v.mac,
            &format!("{}/24", v.ip),
        );
        let gw = if v.ip.starts_with("10.0.1.") {
            "10.0.1.1"
        } else {
            "10.0.0.1"
        };
        sh(&["ip", "-n", &n, "route", "add", "default", "via", gw]);
        ns.push(n);
    }
    let ext = lab.netns("ext");
    lab.attach_vm(&ext_tap, &ext, "02:ee:00:00:00:01", "203.0.113.1/24");
    Switch { sock, ns, ext }
}

fn script(lab: &Lab, name: &str, text: &str) -> String {
    let p = lab.dir.join(name);
    std::fs::write(&p, text).expect("writing a script");
    p.display().to_string()
}

/// Start a Python server in `ns`; wait until it listens on `port`.
fn serve(lab: &Lab, ns: &str, file: &str, text: &str, ip: &str, port: &str) -> Child {
    let s = script(lab, file, text);
    let err = lab.dir.join(format!("{file}.err"));
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", &s, ip, port])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("python3");
    let t = Instant::now();
    while !try_sh(&["ip", "netns", "exec", ns, "ss", "-ltn"])
        .1
        .contains(&format!("{ip}:{port}"))
    {
        if t.elapsed() > Duration::from_secs(10) || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            panic!(
                "no server on {ip}:{port} in {ns}: {}\nsockets: {}\naddresses: {}",
                std::fs::read_to_string(&err).unwrap_or_default(),
                try_sh(&["ip", "netns", "exec", ns, "ss", "-ltnp"]).1,
                try_sh(&["ip", "-n", ns, "addr"]).1,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// GET from `ns`; Some(body) or None if it failed within `timeout_s`.
fn get(lab: &Lab, ns: &str, ip: &str, port: &str, sport: &str, timeout_s: &str) -> Option<String> {
    let s = script(lab, "get.py", GET);
    let (ok, out) = try_sh(&[
        "timeout", "20", "ip", "netns", "exec", ns, "python3", &s, ip, port, sport, timeout_s,
    ]);
    ok.then(|| out.trim().to_string())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn security_groups_allow_deny_and_let_replies_back() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let (a, b, c) = (&sw.ns[0], &sw.ns[1], &sw.ns[2]);
    let _web = Kill(serve(&lab, b, "whoami.py", WHOAMI, B.ip, "8080"));
    let _ssh = Kill(serve(&lab, b, "whoami2.py", WHOAMI, B.ip, "2222"));
    // The allowed port connects, from a filtered and an unfiltered VM.
    let body = get(&lab, a, B.ip, "8080", "0", "3")
        .unwrap_or_else(|| panic!("a → b:8080 (allowed) failed\n{}", lab.log("sw")));
    assert!(body.starts_with(A.ip), "{body}");
    assert!(get(&lab, c, B.ip, "8080", "0", "3").is_some(), "c → b:8080");
    // A port with no ingress rule does not.
    assert_eq!(
        get(&lab, a, B.ip, "2222", "0", "2"),
        None,
        "b:2222 is not allowed"
    );
    // Replies come back to a VM whose groups admit nothing inbound.
    let _c_srv = Kill(serve(&lab, c, "whoami3.py", WHOAMI, C.ip, "9000"));
    assert!(
        get(&lab, a, C.ip, "9000", "0", "3").is_some(),
        "a's outbound connection got no replies"
    );
    // ...but a new connection into it is refused.
    let _a_srv = Kill(serve(&lab, a, "whoami4.py", WHOAMI, A.ip, "9000"));
    assert_eq!(
        get(&lab, c, A.ip, "9000", "0", "2"),
        None,
        "c → a is not allowed"
    );
    let ct = lab.ctl(&sw.sock, "conntrack").expect("conntrack");
    assert!(
        ct["connections"]
            .as_array()
            .is_some_and(|v| v.iter().any(|c| c["rule"] == "web#0")),
        "no connection admitted by web#0 in {ct}"
    );
    let st = lab.ctl(&sw.sock, "stats").expect("stats");
    assert!(
        st["conntrack"]["created"].as_u64().unwrap_or(0) >= 3,
        "{st}"
    );
}

#[test]
fn a_rule_removed_at_run_time_cuts_an_established_connection() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let (a, b) = (&sw.ns[0], &sw.ns[1]);
    let _echo = Kill(serve(&lab, b, "echo.py", ECHO, B.ip, "8080"));
    let p = script(&lab, "pinger.py", PINGER);
    let mut pinger = Kill(
        Command::new("ip")
            .args(["netns", "exec", a, "python3", "-u", &p, B.ip, "8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        pinger.0.stdout.take().expect("stdout"),
    ));
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    // Established and echoing.
    for _ in 0..5 {
        let l = next();
        assert!(
            l.starts_with("ok"),
            "before the change: {l:?}\n{}",
            lab.log("sw")
        );
    }
    // Remove the ingress rule: only egress stays.
    let out = sh(&[
        env!("CARGO_BIN_EXE_vswitch"),
        "ctl",
        "--socket",
        sw.sock.to_str().expect("path"),
        "security-group-set",
        "web",
        "--rule",
        "direction=egress",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("2 flows removed"), "{said}");
    let t = Instant::now();
    loop {
        let l = next();
        if l.starts_with("cut") {
            break;
        }
        assert!(
            l.starts_with("ok") && t.elapsed() < Duration::from_secs(3),
            "the connection was not cut: {l:?} after {:?}",
            t.elapsed()
        );
    }
    let groups = lab.ctl(&sw.sock, "security-groups").expect("groups");
    assert_eq!(
        groups["groups"][1]["rules"].as_array().map(Vec::len),
        Some(1)
    );
    // Bad requests change nothing and say what is wrong.
    let (ok, out) = try_sh(&[
        env!("CARGO_BIN_EXE_vswitch"),
        "ctl",
        "--socket",
        sw.sock.to_str().expect("path"),
        "security-group-set",
        "web",
        "--rule",
        "direction=sideways",
    ]);
    assert!(!ok && out.contains("rules[0]"), "{out}");
    let groups = lab.ctl(&sw.sock, "security-groups").expect("groups");
    assert_eq!(
        groups["groups"][1]["rules"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn snat_and_floating_ips_reach_and_are_reached_from_outside() {
    let mut lab = Lab::new();
    let sw = start(&mut lab);
    let (a, b, c) = (&sw.ns[0], &sw.ns[1], &sw.ns[2]);
    let _srv = Kill(serve(
        &lab,
        &sw.ext,
        "whoami.py",
        WHOAMI,
        "203.0.113.1",
        "8000",
    ));
    // SNAT: the server sees the switch's external address. The first SYN
    // waits for ARP to resolve the server; TCP retries it.
    let body = get(&lab, a, "203.0.113.1", "8000", "0", "5")
        .unwrap_or_else(|| panic!("a → external server failed\n{}", lab.log("sw")));
    assert!(body.starts_with("203.0.113.10:"), "server saw {body}");
    // ctl trace of a new connection out: routed, tracked, SNATed.
    let out = sh(&[
        env!("CARGO_BIN_EXE_vswitch"),
        "ctl",
        "--json",
        "--socket",
        sw.sock.to_str().expect("path"),
        "trace",
        "--port",
        &lab.name("ta"),
        "--src",
        A.ip,
        "--dst",
        "203.0.113.1",
        "--proto",
        "tcp",
        "--sport",
        "45678",
        "--dport",
        "8000",
    ]);
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("trace JSON");
    assert!(
        t["steps"]
            .to_string()
            .contains("out to the external network (NAT)"),
        "{t}"
    );
    assert!(
        t["verdict"]
            .as_str()
            .unwrap_or("")
            .contains("snat 203.0.113.10:"),
        "{t}"
    );
    // Two VMs with the same source port get different external ports.
    let from_a = get(&lab, a, "203.0.113.1", "8000", "34567", "5").expect("a");
    let from_c = get(&lab, c, "203.0.113.1", "8000", "34567", "5").expect("c");
    assert!(from_a.starts_with("203.0.113.10:") && from_c.starts_with("203.0.113.10:"));
    assert_ne!(from_a, from_c, "two VMs collided on one external port");
    for seen in [&from_a, &from_c] {
        let port: u16 = seen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        assert!(
            (40000..=40100).contains(&port),
            "{seen} outside the SNAT range"
        );
    }
    // A floating IP takes connections in (B's web group admits 8080)...
    let _web = Kill(serve(&lab, b, "whoami2.py", WHOAMI, B.ip, "8080"));
    let body = get(&lab, &sw.ext, "203.0.113.50", "8080", "0", "5")
        .unwrap_or_else(|| panic!("external → floating IP failed\n{}", lab.log("sw")));
    assert!(body.starts_with("203.0.113.1:"), "b saw {body}");
    // ...and B's own connections leave from it.
    let body = get(&lab, b, "203.0.113.1", "8000", "0", "5").expect("b → external");
    assert!(body.starts_with("203.0.113.50:"), "server saw {body}");
    // Unsolicited traffic to the SNAT address gets nothing.
    assert_eq!(get(&lab, &sw.ext, "203.0.113.10", "8000", "0", "2"), None);
    let nat = lab.ctl(&sw.sock, "nat").expect("nat");
    let vms = nat["vms"].as_array().expect("vms");
    assert!(
        vms.iter()
            .any(|v| v["vm"] == "a" && v["nat_ports"].as_u64() >= Some(1)),
        "{nat}"
    );
}

#[test]
fn finished_connections_expire_and_give_their_nat_ports_back() {
    let mut lab = Lab::new();
    // Short timeouts: flows idle out of the fast path after 1 s, closed
    // TCP connections end 2 s after their last packet.
    let sw = start_with(
        &mut lab,
        "\n[conntrack]\ntcp_closed_s = 2\ntcp_closing_s = 2\n",
    );
    let a = &sw.ns[0];
    let _srv = Kill(serve(
        &lab,
        &sw.ext,
        "whoami.py",
        WHOAMI,
        "203.0.113.1",
        "8000",
    ));
    for _ in 0..3 {
        get(&lab, a, "203.0.113.1", "8000", "0", "5")
            .unwrap_or_else(|| panic!("a → external server failed\n{}", lab.log("sw")));
    }
    let held = |lab: &Lab| {
        let nat = lab.ctl(&sw.sock, "nat").expect("nat");
        let ct = lab.ctl(&sw.sock, "conntrack").expect("conntrack");
        (
            nat["ports_in_use"].as_u64().unwrap_or(99),
            ct["total"].as_u64().unwrap_or(99),
        )
    };
    let (ports, conns) = held(&lab);
    assert!(
        ports >= 1 && conns >= 3,
        "after three requests: {ports} ports, {conns} connections"
    );
    wait_until(
        "closed connections to expire and free their NAT ports",
        Duration::from_secs(20),
        || held(&lab) == (0, 0),
    );
    let st = lab.ctl(&sw.sock, "stats").expect("stats");
    assert!(st["conntrack"]["expired"].as_u64() >= Some(3), "{st}");
    assert_eq!(st["flows"]["active"].as_u64(), Some(0), "{st}");
}
