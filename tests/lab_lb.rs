//! Load-balanced services on real switches: a client VM's connections to
//! a VIP spread over backend VMs by weight, follow changes of the backend
//! set (removal resets, addition, drain), never hairpin to the client
//! itself, and reach a backend on another hypervisor across VXLAN. The
//! backends run a small TCP server that answers with its name.
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

mod lab;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{apply, sh, try_sh, wait_until, wire, Lab, Vm};
use serde_json::{json, Value};

/// Answers each connection with its name, and again after every message.
const NAMED: &str = r#"
import socket, sys, threading
ip, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(512)
def serve(c):
    try:
        c.sendall(name)
        while c.recv(100):
            c.sendall(name)
    except Exception:
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `once VIP PORT FIRST N`: N connections one after another, from source
/// ports FIRST.., each reading the name; prints {"names": {...}, "failed":
/// n, "order": [the name of each, in order]}.
/// `hold VIP PORT FIRST N DIR`: N connections held open; writes DIR/ready
/// once they all answered, waits for DIR/go (≤ 60 s), then sends on each
/// and prints [[sport, name before, name after or the error]].
const CLIENT: &str = r#"
import json, os, socket, sys, time
mode, vip, port, first, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def conn(sport):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(3)
    s.bind(("", sport))
    s.connect((vip, port))
    return s, s.makefile("rb")
if mode in ("once", "list"):
    names, failed, order = {}, 0, []
    for i in range(n):
        try:
            s, f = conn(first + i)
            name = f.readline().decode().strip()
            s.close()
            names[name] = names.get(name, 0) + 1
            order.append(name)
        except Exception as e:
            failed += 1
            order.append("failed")
    print(json.dumps({"names": names, "failed": failed, "order": order}))
else:
    d = sys.argv[6]
    held = []
    for i in range(n):
        s, f = conn(first + i)
        held.append((first + i, s, f, f.readline().decode().strip()))
    open(os.path.join(d, "ready"), "w").close()
    t = time.time()
    while not os.path.exists(os.path.join(d, "go")) and time.time() - t < 60:
        time.sleep(0.05)
    out = []
    for sport, s, f, before in held:
        try:
            s.sendall(b"x")
            after = f.readline().decode().strip() or "closed"
        except ConnectionResetError:
            after = "reset"
        except Exception as e:
            after = type(e).__name__
        out.append([sport, before, after])
    print(json.dumps(out))
"#;

const CLIENT_VM: Vm = Vm {
    name: "c",
    mac: "02:00:00:00:00:0c",
    ip: "10.0.0.10",
    network: 100,
};
const BACKENDS: [Vm; 3] = [
    Vm {
        name: "b1",
        mac: "02:00:00:00:00:b1",
        ip: "10.0.0.21",
        network: 100,
    },
    Vm {
        name: "b2",
        mac: "02:00:00:00:00:b2",
        ip: "10.0.0.22",
        network: 100,
    },
    Vm {
        name: "b3",
        mac: "02:00:00:00:00:b3",
        ip: "10.0.0.23",
        network: 100,
    },
];
const VIP: &str = "10.0.0.100";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn script(lab: &Lab, name: &str, text: &str) -> String {
    let p = lab.dir.join(name);
    std::fs::write(&p, text).expect("writing a script");
    p.display().to_string()
}

/// The named server on `ip`:8080 in `ns`, listening when this returns.
fn serve(lab: &Lab, ns: &str, ip: &str, name: &str) -> Kill {
    let s = script(lab, "named.py", NAMED);
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", &s, ip, "8080", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    wait_until(
        &format!("a server on {ip}:8080"),
        Duration::from_secs(10),
        || {
            try_sh(&["ip", "netns", "exec", ns, "ss", "-ltn"])
                .1
                .contains(&format!("{ip}:8080"))
        },
    );
    Kill(child)
}

/// The named servers in every backend of a [`switch`] (`nss`: client
/// first).
fn serve_all(lab: &Lab, nss: &[String]) -> Vec<Kill> {
    BACKENDS
        .iter()
        .zip(&nss[1..])
        .map(|(b, ns)| serve(lab, ns, b.ip, b.name))
        .collect()
}

/// `n` connections to the VIP from `ns`, source ports `first`..: the
/// names that answered, and how many failed.
fn once(lab: &Lab, ns: &str, first: u16, n: u16) -> (HashMap<String, u64>, u64) {
    let v = connections(lab, ns, first, n);
    let names = v["names"]
        .as_object()
        .expect("names")
        .iter()
        .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
        .collect();
    (names, v["failed"].as_u64().unwrap_or(u64::MAX))
}

/// The client's report of `n` connections from `ns` (see [`CLIENT`]).
fn connections(lab: &Lab, ns: &str, first: u16, n: u16) -> Value {
    let s = script(lab, "client.py", CLIENT);
    let (ok, out) = try_sh(&[
        "timeout",
        "120",
        "ip",
        "netns",
        "exec",
        ns,
        "python3",
        &s,
        "once",
        VIP,
        "80",
        &first.to_string(),
        &n.to_string(),
    ]);
    assert!(ok, "client: {out}");
    serde_json::from_str(out.trim()).expect("client output")
}

/// Connections held open from `ns` while `change` runs: what each
/// answered before and after it.
fn held_across(
    lab_dir: &std::path::Path,
    ns: &str,
    first: u16,
    n: u16,
    change: impl FnOnce(),
) -> Vec<(u64, String, String)> {
    let s = lab_dir.join("client.py").display().to_string();
    std::fs::write(&s, CLIENT).expect("writing the client");
    let dir = lab_dir.join(format!("hold{first}"));
    std::fs::create_dir_all(&dir).expect("hold directory");
    let child = Command::new("timeout")
        .args([
            "120", "ip", "netns", "exec", ns, "python3", &s, "hold", VIP, "80",
        ])
        .args([first.to_string(), n.to_string()])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let t = Instant::now();
    while !dir.join("ready").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the held connections did not open: {:?}",
            child.wait_with_output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    change();
    std::fs::write(dir.join("go"), "").expect("go");
    let out = child.wait_with_output().expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "client output {text:?}: {e}; {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v.as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r[0].as_u64().unwrap_or(0),
                r[1].as_str().unwrap_or("").to_string(),
                r[2].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn service(weights: [u32; 3], present: [bool; 3]) -> Value {
    let backends: Vec<Value> = BACKENDS
        .iter()
        .zip(weights)
        .zip(present)
        .filter(|(_, p)| *p)
        .map(|((b, w), _)| json!({"ip": b.ip, "port": 8080, "weight": w}))
        .collect();
    json!({"name": "web", "network": 100, "vip": VIP, "protocol": "tcp", "port": 80,
        "backends": backends})
}

fn change(sock: &std::path::Path, svc: Value) {
    apply(sock, json!([{"op": "change-service", "service": svc}])).expect("change-service");
}

/// A switch with the client and the three backends, and service `web`
/// (VIP:80 over the backends' port 8080, weights 1:2:1) with `extra`
/// fields; the socket and the VMs' namespaces (client first).
fn switch(lab: &mut Lab, extra: &str) -> (std::path::PathBuf, Vec<String>) {
    switch_named(lab, "sw", "", "", extra)
}

/// [`switch`] serving its metrics on `127.0.0.1:port`.
fn switch_with_metrics(lab: &mut Lab, port: u16) -> (std::path::PathBuf, Vec<String>) {
    let metrics = format!("metrics = \"127.0.0.1:{port}\"\n");
    switch_named(lab, "sw", "", &metrics, "")
}

/// [`switch`] as switch `name` with `switch_extra` in its `[switch]`
/// section; its links' and namespaces' names with `tag` when it is a
/// second switch beside the first.
fn switch_named(
    lab: &mut Lab,
    name: &str,
    tag: &str,
    switch_extra: &str,
    extra: &str,
) -> (std::path::PathBuf, Vec<String>) {
    let tagged: Vec<String> = std::iter::once(CLIENT_VM.name)
        .chain(BACKENDS.iter().map(|b| b.name))
        .map(|n| format!("{n}{tag}"))
        .collect();
    let vms: Vec<Vm> = std::iter::once(&CLIENT_VM)
        .chain(&BACKENDS)
        .zip(&tagged)
        .map(|(v, n)| Vm {
            name: n.as_str(),
            mac: v.mac,
            ip: v.ip,
            network: v.network,
        })
        .collect();
    let cfg = lab::one_host_config(lab, name, &vms)
        .replace(
            "flow_capacity = 4096\n",
            &format!("flow_capacity = 65536\n{switch_extra}"),
        )
        + &format!(
            "[[service]]\nname = \"web\"\nnetwork = 100\nvip = \"{VIP}\"\nprotocol = \"tcp\"\nport = 80\n\
             backends = [{{ ip = \"10.0.0.21\", port = 8080, weight = 1 }},\n\
                         {{ ip = \"10.0.0.22\", port = 8080, weight = 2 }},\n\
                         {{ ip = \"10.0.0.23\", port = 8080, weight = 1 }}]\n{extra}\n"
        );
    lab::one_host_from(lab, name, &cfg, &vms)
}

#[test]
fn a_vip_spreads_connections_by_weight_and_follows_changes_of_its_backends() {
    let mut lab = Lab::new();
    let (sock, nss) = switch_with_metrics(&mut lab, 19_468);
    let client = nss[0].clone();
    let _servers = serve_all(&lab, &nss);

    // 300 connections, weights 1:2:1. The pick is a hash of each
    // connection's 5-tuple, so each backend's count is binomial around its
    // share (σ ≈ 7.5 for 75 of 300, 8.7 for 150): ±30 is about 3.5σ.
    let (names, failed) = once(&lab, &client, 20_000, 300);
    assert_eq!(failed, 0, "{names:?}\n{}", lab.log("sw"));
    eprintln!("300 connections, weights 1:2:1: {names:?}");
    for (b, want) in [("b1", 75), ("b2", 150), ("b3", 75)] {
        let got = names.get(b).copied().unwrap_or(0);
        assert!(
            got.abs_diff(want) <= 30,
            "{b}: {got} of 300 connections, expected {want} ± 30: {names:?}"
        );
    }
    let v = lab.ctl(&sock, "services").expect("ctl services");
    let svc = &v["services"][0];
    assert_eq!(svc["picked"], 300, "{v}");
    for (b, share) in svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .zip([25.0, 50.0, 25.0])
    {
        let got = b["share_pct"].as_f64().unwrap_or(0.0);
        assert!((got - share).abs() < 1.0, "table share {got} for {b}");
        assert_eq!(b["state"], "up");
    }

    // b3 removed at run time: its connections are reset (at the client's
    // next segment), the others keep their backends.
    let held = held_across(&lab.dir.clone(), &client, 30_000, 40, || {
        change(&sock, service([1, 2, 1], [true, true, false]))
    });
    let on_b3 = held.iter().filter(|(_, before, _)| before == "b3").count();
    assert!(on_b3 > 0, "{held:?}");
    for (sport, before, after) in &held {
        if before == "b3" {
            assert_eq!(after, "reset", "{sport} was on the removed backend");
        } else {
            assert_eq!(after, before, "{sport} lost its backend");
        }
    }
    let (names, failed) = once(&lab, &client, 21_000, 60);
    assert_eq!(failed, 0);
    assert!(!names.contains_key("b3"), "{names:?}");

    // Added back: new connections reach it.
    change(&sock, service([1, 2, 1], [true, true, true]));
    let (names, failed) = once(&lab, &client, 22_000, 100);
    assert_eq!(failed, 0);
    assert!(names.get("b3").copied().unwrap_or(0) > 0, "{names:?}");

    // b2 drained (weight 0): its connections keep working, new ones go
    // elsewhere.
    let mut new_names = HashMap::new();
    let held = held_across(&lab.dir.clone(), &client, 31_000, 40, || {
        change(&sock, service([1, 0, 1], [true, true, true]));
        let (names, failed) = once(&lab, &client, 23_000, 100);
        assert_eq!(failed, 0);
        new_names = names;
    });
    assert!(!new_names.contains_key("b2"), "{new_names:?}");
    assert!(held.iter().any(|(_, b, _)| b == "b2"), "{held:?}");
    for (sport, before, after) in &held {
        assert_eq!(after, before, "{sport}: a drain ends nothing");
    }
    let v = lab.ctl(&sock, "services").expect("ctl services");
    assert_eq!(v["services"][0]["backends"][1]["state"], "drained", "{v}");
    let text = lab::metrics(19_468);
    for line in [
        "vswitch_service_picked_total{service=\"web\"} ",
        "vswitch_service_backend_taking{service=\"web\",backend=\"10.0.0.22:8080\"} 0",
        "vswitch_service_backend_taking{service=\"web\",backend=\"10.0.0.21:8080\"} 1",
        "vswitch_service_resets_total{service=\"web\"} ",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }

    // Hairpin: a backend connecting to its own VIP reaches another one.
    let (names, failed) = once(&lab, &nss[1], 24_000, 40);
    assert_eq!(failed, 0, "{}", lab.log("sw"));
    assert!(!names.contains_key("b1"), "b1 reached itself: {names:?}");

    // A VIP answers ping, and `ctl trace` shows the pick.
    sh(&[
        "ip", "netns", "exec", &client, "ping", "-c", "1", "-W", "2", VIP,
    ]);
    let port = lab.name("tc");
    let trace = lab::ctl_args(
        &sock,
        &[
            "trace",
            "--port",
            &port,
            "--src",
            "10.0.0.10",
            "--dst",
            VIP,
            "--proto",
            "tcp",
            "--sport",
            "40000",
            "--dport",
            "80",
        ],
    )
    .expect("trace");
    let text = trace.to_string();
    assert!(
        text.contains("10.0.0.2"),
        "the trace names no backend: {text}"
    );
}

#[test]
fn a_vip_reaches_a_backend_on_another_hypervisor() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (vm1, vm2) = (lab.netns("m1"), lab.netns("m2"));
    let (u1, u2) = wire(&lab, &hv1, "192.168.61.1", &hv2, "192.168.61.2");
    let b = lab::VM_B;
    let hosts = lab::two_hosts(
        &mut lab,
        (&hv1, &hv2),
        (&vm1, &vm2),
        (&u1, &u2),
        ("192.168.61.1", "192.168.61.2"),
    );
    lab::warm_underlay(&hv1, "192.168.61.2");
    let _server = serve(&lab, &vm2, b.2, "remote-b");
    // The service is added through the change API.
    let svc = json!({"name": "web", "network": 100, "vip": VIP, "protocol": "tcp", "port": 80,
        "backends": [{"ip": b.2, "port": 8080}]});
    apply(&hosts.s1, json!([{"op": "add-service", "service": svc}])).expect("add-service");
    let (names, failed) = once(&lab, &vm1, 25_000, 20);
    assert_eq!(
        (failed, names.get("remote-b").copied()),
        (0, Some(20)),
        "{names:?}\nsw1:\n{}\nsw2:\n{}",
        lab.log("sw1"),
        lab.log("sw2")
    );
    let e = apply(&hosts.s1, json!([{"op": "add-service", "service": svc}]))
        .expect_err("the same service twice");
    assert!(e.contains("service web"), "{e}");
}

#[test]
fn a_backend_whose_server_stops_leaves_the_table_and_returns_when_it_answers() {
    let mut lab = Lab::new();
    let health =
        "health = { protocol = \"tcp\", interval_ms = 300, timeout_ms = 200, rise = 2, fall = 2 }";
    let (sock, nss) = switch(&mut lab, health);
    let client = nss[0].clone();
    let mut servers: Vec<Option<Kill>> = BACKENDS
        .iter()
        .zip(&nss[1..])
        .map(|(b, ns)| Some(serve(&lab, ns, b.ip, b.name)))
        .collect();
    let state = |lab: &Lab| -> Value {
        lab.ctl(&sock, "services").expect("ctl services")["services"][0]["backends"][2].clone()
    };
    wait_until("b3 probed and up", Duration::from_secs(5), || {
        let b = state(&lab);
        b["probes"].as_u64().unwrap_or(0) >= 2 && b["state"] == "up"
    });
    // b3's server stops: its stack refuses the probes; within two checks
    // (fall = 2, every 300 ms) it is down and takes no new connections.
    servers[2] = None;
    let t = Instant::now();
    wait_until("b3 down", Duration::from_secs(3), || {
        state(&lab)["state"] == "down"
    });
    eprintln!(
        "b3 down {} ms after its server stopped",
        t.elapsed().as_millis()
    );
    let (names, failed) = once(&lab, &client, 26_000, 100);
    assert_eq!(failed, 0, "{names:?}");
    assert!(!names.contains_key("b3"), "{names:?}");
    // Back: it answers twice (rise = 2) and takes connections again.
    servers[2] = Some(serve(&lab, &nss[3], BACKENDS[2].ip, BACKENDS[2].name));
    wait_until("b3 up again", Duration::from_secs(3), || {
        state(&lab)["state"] == "up"
    });
    let (names, failed) = once(&lab, &client, 27_000, 100);
    assert_eq!(failed, 0);
    assert!(names.get("b3").copied().unwrap_or(0) > 0, "{names:?}");
    let b = state(&lab);
    assert!(b["probe_failures"].as_u64().unwrap_or(0) >= 2, "{b}");
}

#[test]
fn a_vip_on_the_external_network_is_balanced_to_this_hosts_backends() {
    let mut lab = Lab::new();
    let ext_tap = lab.name("tx");
    let extra = format!(
        "external_vip = \"203.0.113.80\"\n\n[[port]]\nname = \"{ext_tap}\"\ntype = \"tap\"\n\n\
         [external]\nport = \"{ext_tap}\"\ncidr = \"203.0.113.0/24\"\n"
    );
    let (sock, nss) = switch(&mut lab, &extra);
    let _servers = serve_all(&lab, &nss);
    let ext = lab.netns("ext");
    lab.attach_vm(&ext_tap, &ext, "02:ee:00:00:00:01", "203.0.113.1/24");
    // The backends answer the outside through their gateway.
    for ns in &nss[1..] {
        sh(&["ip", "-n", ns, "route", "add", "default", "via", "10.0.0.1"]);
    }
    // The client outside connects to the external VIP: the backends answer
    // (by weight), keeping the client's address.
    let s = script(&lab, "client.py", CLIENT);
    let (ok, out) = try_sh(&[
        "timeout",
        "60",
        "ip",
        "netns",
        "exec",
        &ext,
        "python3",
        &s,
        "once",
        "203.0.113.80",
        "80",
        "29000",
        "100",
    ]);
    assert!(ok, "{out}\n{}", lab.log("sw"));
    let v: Value = serde_json::from_str(out.trim()).expect("client output");
    assert_eq!(v["failed"], 0, "{v}\n{}", lab.log("sw"));
    let names = v["names"].as_object().expect("names");
    assert_eq!(names.len(), 3, "{v}");
    let svc = &lab.ctl(&sock, "services").expect("ctl services")["services"][0];
    assert_eq!(svc["external_vip"], "203.0.113.80", "{svc}");
    assert_eq!(svc["picked"], 100, "{svc}");
}

#[test]
fn services_and_their_connections_survive_a_live_upgrade() {
    let mut lab = Lab::new();
    let (sock, nss) = switch(&mut lab, "");
    let client = nss[0].clone();
    let _servers = serve_all(&lab, &nss);
    // Changed at run time (not in the config): b2 drained, a second
    // service on port 81.
    change(&sock, service([1, 0, 1], [true, true, true]));
    let mut other = service([1, 1, 1], [true, true, true]);
    other["name"] = json!("other");
    other["port"] = json!(81);
    apply(&sock, json!([{"op": "add-service", "service": other}])).expect("add-service");
    let new = lab.dir.join("vswitch-new");
    std::fs::copy(env!("CARGO_BIN_EXE_vswitch"), &new).expect("copying the binary");
    let held = held_across(&lab.dir.clone(), &client, 32_000, 30, || {
        lab.takeover(&new, "sw");
        lab.assert_handed_over(0, "sw");
    });
    for (sport, before, after) in &held {
        assert_eq!(after, before, "{sport} lost its backend in the upgrade");
    }
    let v = lab.ctl(&sock, "services").expect("ctl services");
    let names: Vec<&str> = v["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["other", "web"], "{v}");
    assert_eq!(v["services"][1]["backends"][1]["state"], "drained", "{v}");
    let (names, failed) = once(&lab, &client, 33_000, 60);
    assert_eq!(failed, 0, "{}", lab.log("sw-new"));
    assert!(!names.contains_key("b2"), "{names:?}");
}

#[test]
fn two_switches_with_the_same_backends_pick_the_same_backend_for_a_connection() {
    let mut lab = Lab::new();
    let (_, one) = switch_named(&mut lab, "sw", "", "", "");
    // The second lists the same backends in another order (one change
    // then puts them back at the same weights, in reverse).
    let (sock2, two) = switch_named(&mut lab, "sw2", "x", "", "");
    let mut rev = service([1, 2, 1], [true, true, true]);
    rev["backends"].as_array_mut().expect("backends").reverse();
    change(&sock2, rev);
    let _servers: Vec<Kill> = [&one, &two]
        .iter()
        .flat_map(|nss| BACKENDS.iter().zip(&nss[1..]))
        .map(|(b, ns)| serve(&lab, ns, b.ip, b.name))
        .collect();
    let a = connections(&lab, &one[0], 34_000, 60);
    let b = connections(&lab, &two[0], 34_000, 60);
    assert_eq!(a["failed"], 0, "{a}");
    assert_eq!(a["names"].as_object().map(|n| n.len()), Some(3), "{a}");
    assert_eq!(
        a["order"], b["order"],
        "the same 5-tuples went to other backends"
    );
}
