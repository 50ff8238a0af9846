//! The fleet: real switches programmed only through etcd by their agents
//! (`vswitch-agent`), etcd members started by the test in a namespace of
//! their own, the agents in another (so the link between them can be cut).
//! Networks and VMs are created as etcd records; the VMs get DHCP leases
//! and ping across VXLAN; a VM moves; etcd dies and returns; a compacted
//! history forces a resync of only the difference; bad records are
//! reported; a three-member cluster loses its leader; Hoverboard promotes
//! a hot pair past the gateway and demotes it when idle.
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use lab::{sh, try_sh, wait_until, Lab};
use serde_json::{json, Value};

const P: &str = "/vswitch/v1";

/// The agent binary, built once (it is another package of the workspace).
fn agent_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vswitch-agent"])
            .status()
            .expect("cargo");
        assert!(ok.success(), "building vswitch-agent");
    });
    Path::new(env!("CARGO_BIN_EXE_vswitch")).with_file_name("vswitch-agent")
}

/// etcd members in namespace `ns`, reachable from the agents' namespace at
/// 10.99.0.1 (member i's client port 2379 + 10000·i).
struct Etcd {
    ns: String,
    dir: PathBuf,
    members: Vec<Option<Child>>,
    size: usize,
}

impl Etcd {
    fn port(i: usize) -> u16 {
        2379 + 10_000 * u16::try_from(i).unwrap()
    }

    fn endpoints(&self) -> String {
        (0..self.size)
            .map(|i| format!("http://10.99.0.1:{}", Etcd::port(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start(lab: &Lab, ns: &str, size: usize) -> Etcd {
        let mut e = Etcd {
            ns: ns.to_string(),
            dir: lab.dir.join("etcd"),
            members: (0..size).map(|_| None).collect(),
            size,
        };
        for i in 0..size {
            e.start_member(i);
        }
        e.wait_healthy();
        e
    }

    fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = (0..self.size)
            .map(|j| format!("m{j}=http://127.0.0.1:{}", Etcd::port(j) + 1))
            .collect();
        let (client, peer) = (Etcd::port(i), Etcd::port(i) + 1);
        let log = std::fs::File::create(self.dir.with_extension(format!("{i}.log"))).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "etcd",
                "--name",
                &format!("m{i}"),
            ])
            .arg("--data-dir")
            .arg(self.dir.join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://10.99.0.1:{client},http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://10.99.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (scripts/deps installs etcd-server)");
        self.members[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_healthy(&self) {
        wait_until("etcd healthy", Duration::from_secs(20), || {
            self.try_ctl(&["endpoint", "health", "--cluster"]).0
        });
    }

    /// The live members' local endpoints.
    fn local(&self) -> String {
        (0..self.size)
            .filter(|i| self.members[*i].is_some())
            .map(|i| format!("http://127.0.0.1:{}", Etcd::port(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcdctl against the live members.
    fn try_ctl(&self, args: &[&str]) -> (bool, String) {
        let ep = self.local();
        let mut v = vec![
            "ip",
            "netns",
            "exec",
            &self.ns,
            "etcdctl",
            "--endpoints",
            &ep,
        ];
        v.extend_from_slice(args);
        try_sh(&v)
    }

    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_ctl(args);
        assert!(ok, "etcdctl {args:?}: {out}");
        out
    }

    /// Put; returns the store's revision after it.
    fn put(&self, key: &str, value: &Value) -> i64 {
        let out = self.ctl(&["put", key, &value.to_string(), "-w", "json"]);
        serde_json::from_str::<Value>(&out).unwrap()["header"]["revision"]
            .as_i64()
            .unwrap()
    }

    fn del(&self, key: &str) -> i64 {
        let out = self.ctl(&["del", key, "-w", "json"]);
        serde_json::from_str::<Value>(&out).unwrap()["header"]["revision"]
            .as_i64()
            .unwrap()
    }

    fn get(&self, key: &str) -> Option<Value> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        serde_json::from_str(out.trim()).ok()
    }

    /// The member leading the cluster.
    fn leader(&self) -> usize {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        let rows = v.as_array().unwrap();
        let leader = rows[0]["Status"]["leader"].as_u64().unwrap();
        let ep = rows
            .iter()
            .find(|r| r["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .expect("the leader among the members")["Endpoint"]
            .as_str()
            .unwrap()
            .to_string();
        (0..self.size)
            .find(|i| ep.ends_with(&format!(":{}", Etcd::port(*i))))
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.size {
            self.kill(i);
        }
    }
}

/// The control plane: etcd's namespace and the agents' one, linked.
struct Control {
    etcd_ns: String,
    agent_ns: String,
    link: String,
    agents: Vec<Child>,
}

impl Control {
    fn new(lab: &mut Lab) -> Control {
        let (e, a) = (lab.netns("fe"), lab.netns("fa"));
        let (le, _) = lab::wire(lab, &e, "10.99.0.1", &a, "10.99.0.2");
        Control {
            etcd_ns: e,
            agent_ns: a,
            link: le,
            agents: Vec::new(),
        }
    }

    /// Start `vswitch-agent ARGS` in the agents' namespace, logging to
    /// `<log>.log`; its index (for `stop`).
    fn spawn(&mut self, lab: &Lab, log: &str, args: &[&str]) -> usize {
        let log = std::fs::File::create(lab.dir.join(format!("{log}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.agent_ns])
            .arg(agent_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting vswitch-agent");
        self.agents.push(child);
        self.agents.len() - 1
    }

    /// Start the agent of `host`, programming the switch at `sock`.
    fn agent(&mut self, lab: &Lab, etcd: &Etcd, host: &str, sock: &Path) -> usize {
        let (ep, sock) = (etcd.endpoints(), sock.display().to_string());
        self.spawn(
            lab,
            &format!("agent-{host}"),
            &[
                "--etcd",
                &ep,
                "run",
                "--host",
                host,
                "--socket",
                &sock,
                "--talkers-interval-ms",
                "500",
                "--lease-ttl-s",
                "3",
            ],
        )
    }

    fn controller(&mut self, lab: &Lab, etcd: &Etcd, name: &str) -> usize {
        let ep = etcd.endpoints();
        self.spawn(
            lab,
            &format!("controller-{name}"),
            &[
                "--etcd",
                &ep,
                "controller",
                "--name",
                name,
                "--idle-ms",
                "3000",
                "--interval-ms",
                "500",
                "--lease-ttl-s",
                "2",
            ],
        )
    }

    fn stop(&mut self, i: usize) {
        let _ = self.agents[i].kill();
        let _ = self.agents[i].wait();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A switch with an uplink and `taps` tap ports, nothing else: the rest
/// comes from etcd.
fn bare_config(lab: &Lab, name: &str, uplink: &str, vtep: &str, taps: &[&str]) -> String {
    let mut c = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{}\"\n\n[uplink]\ninterface = \"{uplink}\"\nvtep = \"{vtep}\"\n",
        lab.socket(name).display()
    );
    for t in taps {
        c += &format!("\n[[port]]\nname = \"{t}\"\ntype = \"tap\"\n");
    }
    c
}

/// The rows of list `field` of `v` (none if it is not a list).
fn rows<'a>(v: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    v[field].as_array().into_iter().flatten()
}

/// The status `host`'s agent wrote.
fn status(etcd: &Etcd, host: &str) -> Value {
    etcd.get(&format!("{P}/status/{host}"))
        .unwrap_or(Value::Null)
}

/// Wait until `host`'s agent applied `rev` (its status says so).
fn wait_applied(etcd: &Etcd, lab: &Lab, host: &str, rev: i64, limit: Duration) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if status(etcd, host)["applied_revision"].as_i64() >= Some(rev) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{host} did not apply revision {rev} within {limit:?}: {}\nagent log:\n{}",
        status(etcd, host),
        std::fs::read_to_string(lab.dir.join(format!("agent-{host}.log"))).unwrap_or_default()
    );
}

/// A DHCP client that configures the interface (address, default route).
fn dhcp(lab: &Lab, ns: &str, dev: &str) -> String {
    let script = lab.dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nbusybox ifconfig $interface $ip netmask $subnet\nip route replace default via $router\necho bound $ip\n",
    )
    .unwrap();
    sh(&["chmod", "+x", script.to_str().unwrap()]);
    let (ok, out) = lab::udhcpc(ns, dev, script.to_str().unwrap(), &[], 30);
    assert!(ok, "udhcpc in {ns}: {out}");
    out
}

fn ping(ns: &str, ip: &str, count: &str) -> (bool, String) {
    try_sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", count, "-i", "0.2", "-W", "1", ip,
    ])
}

/// Move tap `tap` of namespace `from` into VM namespace `vm` with `mac`,
/// up, no address (DHCP gives it).
fn plug(from: &str, tap: &str, vm: &str, mac: &str) {
    wait_until(&format!("tap {tap}"), Duration::from_secs(5), || {
        try_sh(&["ip", "-n", from, "link", "show", tap]).0
    });
    sh(&["ip", "-n", from, "link", "set", tap, "netns", vm]);
    sh(&["ip", "-n", vm, "link", "set", tap, "address", mac]);
    sh(&["ip", "-n", vm, "link", "set", tap, "up"]);
}

fn network(gateway_vtep: Option<&str>) -> Value {
    let mut n = json!({"gateway_mac": "02:00:00:00:00:fe", "dns": ["10.0.0.53"],
                       "subnet": [{"cidr": "10.0.1.0/24", "gateway": "10.0.1.1"},
                                  {"cidr": "10.0.2.0/24", "gateway": "10.0.2.1"}]});
    if let Some(g) = gateway_vtep {
        n["gateway_vtep"] = json!(g);
    }
    n
}

/// Two hypervisors on one underlay segment (bridged in `hub`, which the
/// Hoverboard test's gateway also uses), a switch each.
struct Fleet {
    hv: [String; 2],
    hub: String,
    socks: [PathBuf; 2],
    taps: [[String; 2]; 2],
    configs: [String; 2],
}

fn two_hypervisors(lab: &mut Lab) -> Fleet {
    let (h1, h2, hub) = (lab.netns("f1"), lab.netns("f2"), lab.netns("fh"));
    sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
    sh(&[
        "ip",
        "-n",
        &hub,
        "addr",
        "add",
        "192.168.77.254/24",
        "dev",
        "br0",
    ]);
    sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    let mut ups = Vec::new();
    for (i, h) in [&h1, &h2].iter().enumerate() {
        let (up, port) = (lab.name(&format!("u{i}")), lab.name(&format!("p{i}")));
        sh(&[
            "ip", "link", "add", &up, "netns", h, "type", "veth", "peer", "name", &port, "netns",
            &hub,
        ]);
        sh(&[
            "ip", "-n", &hub, "link", "set", &port, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            h,
            "addr",
            "add",
            &format!("192.168.77.{}/24", i + 1),
            "dev",
            &up,
        ]);
        sh(&["ip", "-n", h, "link", "set", &up, "up"]);
        ups.push(up);
    }
    let taps = [
        [lab.name("ta"), lab.name("tc")],
        [lab.name("tb"), lab.name("td")],
    ];
    let c1 = bare_config(
        lab,
        "fsw1",
        &ups[0],
        "192.168.77.1",
        &[&taps[0][0], &taps[0][1]],
    );
    let c2 = bare_config(
        lab,
        "fsw2",
        &ups[1],
        "192.168.77.2",
        &[&taps[1][0], &taps[1][1]],
    );
    let s1 = lab.vswitch_in(Some(&h1), "fsw1", &c1);
    let s2 = lab.vswitch_in(Some(&h2), "fsw2", &c2);
    Fleet {
        hv: [h1, h2],
        hub,
        socks: [s1, s2],
        taps,
        configs: [c1, c2],
    }
}

fn vm_record(port: &str, mac: &str, ip: &str) -> Value {
    json!({"port": port, "mac": mac, "ips": [ip], "network": 100})
}

fn endpoint(mac: &str, vtep: &str) -> Value {
    json!({"mac": mac, "vtep": vtep})
}

/// Network 100 (`net`), VM a on hv1 and VM b on hv2, written to etcd;
/// the hosts' agents started; the VMs plugged in and given their
/// addresses by DHCP. Returns the VMs' namespaces.
fn two_vms(
    lab: &mut Lab,
    etcd: &Etcd,
    ctl: &mut Control,
    f: &Fleet,
    net: Value,
) -> (String, String) {
    let (vm_a, vm_b) = (lab.netns("va"), lab.netns("vb"));
    etcd.put(&format!("{P}/networks/100"), &net);
    etcd.put(
        &format!("{P}/hosts/hv1/vms/a"),
        &vm_record(&f.taps[0][0], A.0, A.1),
    );
    etcd.put(
        &format!("{P}/endpoints/100/{}", A.1),
        &endpoint(A.0, "192.168.77.1"),
    );
    etcd.put(
        &format!("{P}/hosts/hv2/vms/b"),
        &vm_record(&f.taps[1][0], B.0, B.1),
    );
    let rev = etcd.put(
        &format!("{P}/endpoints/100/{}", B.1),
        &endpoint(B.0, "192.168.77.2"),
    );
    ctl.agent(lab, etcd, "hv1", &f.socks[0]);
    ctl.agent(lab, etcd, "hv2", &f.socks[1]);
    wait_applied(etcd, lab, "hv1", rev, Duration::from_secs(10));
    wait_applied(etcd, lab, "hv2", rev, Duration::from_secs(10));
    plug(&f.hv[0], &f.taps[0][0], &vm_a, A.0);
    plug(&f.hv[1], &f.taps[1][0], &vm_b, B.0);
    let got = dhcp(lab, &vm_a, &f.taps[0][0]);
    assert!(got.contains(A.1), "{got}");
    let got = dhcp(lab, &vm_b, &f.taps[1][0]);
    assert!(got.contains(B.1), "{got}");
    (vm_a, vm_b)
}

const A: (&str, &str) = ("02:00:00:00:01:0a", "10.0.1.10");
const B: (&str, &str) = ("02:00:00:00:01:0b", "10.0.1.11");

#[test]
fn a_fleet_programmed_from_etcd_survives_moves_outages_and_compaction() {
    let mut lab = Lab::new();
    let f = two_hypervisors(&mut lab);
    let mut ctl = Control::new(&mut lab);
    let etcd = Etcd::start(&lab, &ctl.etcd_ns, 1);
    // Everything from etcd: the network, two VMs, their endpoints.
    let (vm_a, vm_b) = two_vms(&mut lab, &etcd, &mut ctl, &f, network(None));
    lab::warm_underlay(&f.hv[0], "192.168.77.2");
    let (ok, out) = ping(&vm_a, B.1, "3");
    assert!(ok, "a → b across VXLAN, programmed from etcd only:\n{out}");
    let s = status(&etcd, "hv1");
    assert_eq!(s["errors_total"], 0, "{s}");
    assert_eq!(s["switch"], "up", "{s}");

    // A move: b goes to hv1 (its second tap); its endpoint's VTEP changes.
    // A ping from a follows it within a second.
    etcd.del(&format!("{P}/hosts/hv2/vms/b"));
    etcd.put(
        &format!("{P}/hosts/hv1/vms/b"),
        &vm_record(&f.taps[0][1], B.0, B.1),
    );
    let moved = Instant::now();
    let rev = etcd.put(
        &format!("{P}/endpoints/100/{}", B.1),
        &endpoint(B.0, "192.168.77.1"),
    );
    sh(&["ip", "-n", &vm_b, "link", "del", &f.taps[1][0]]);
    plug(&f.hv[0], &f.taps[0][1], &vm_b, B.0);
    sh(&[
        "ip",
        "-n",
        &vm_b,
        "addr",
        "add",
        &format!("{}/24", B.1),
        "dev",
        &f.taps[0][1],
    ]);
    sh(&[
        "ip", "-n", &vm_b, "route", "replace", "default", "via", "10.0.1.1",
    ]);
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(1));
    wait_applied(&etcd, &lab, "hv2", rev, Duration::from_secs(1));
    eprintln!("move applied on both hosts in {:?}", moved.elapsed());
    let (ok, out) = ping(&vm_a, B.1, "3");
    assert!(ok, "a → b after b moved next to it:\n{out}");
    let topo = lab.ctl(&f.socks[1], "topology").unwrap();
    assert!(
        rows(&topo, "remotes").any(|r| r["ip"] == B.1 && r["vtep"] == "192.168.77.1"),
        "hv2 must reach b at hv1 now: {topo}"
    );
    assert!(topo["vms"].as_array().unwrap().is_empty(), "{topo}");

    // The network changes (a DNS server more): applied in place.
    let mut net = network(None);
    net["dns"] = json!(["10.0.0.53", "10.0.0.54"]);
    let rev = etcd.put(&format!("{P}/networks/100"), &net);
    for (h, sock) in [("hv1", &f.socks[0]), ("hv2", &f.socks[1])] {
        wait_applied(&etcd, &lab, h, rev, Duration::from_secs(5));
        let topo = lab.ctl(sock, "topology").unwrap();
        assert_eq!(
            topo["networks"][0]["dns"],
            json!(["10.0.0.53", "10.0.0.54"]),
            "{topo}"
        );
    }

    // A security group from etcd: b in "web" (TCP 80 only) no longer
    // answers a's pings; the group's rules changed to let ICMP in, it
    // does; b out of the group and the group removed, in one change.
    let web = |rules: Value| json!({"rule": rules});
    let tcp80 = json!({"direction": "ingress", "protocol": "tcp", "ports": 80});
    let icmp = json!({"direction": "ingress", "protocol": "icmp"});
    etcd.put(&format!("{P}/security-groups/web"), &web(json!([tcp80])));
    let mut b_web = vm_record(&f.taps[0][1], B.0, B.1);
    b_web["security_groups"] = json!(["web"]);
    let rev = etcd.put(&format!("{P}/hosts/hv1/vms/b"), &b_web);
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(5));
    let (ok, out) = ping(&vm_a, B.1, "2");
    assert!(!ok, "b's group admits no ICMP:\n{out}");
    let rev = etcd.put(
        &format!("{P}/security-groups/web"),
        &web(json!([tcp80, icmp])),
    );
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(5));
    let (ok, out) = ping(&vm_a, B.1, "2");
    assert!(ok, "the group's new rules admit ICMP:\n{out}");
    etcd.put(
        &format!("{P}/hosts/hv1/vms/b"),
        &vm_record(&f.taps[0][1], B.0, B.1),
    );
    let rev = etcd.del(&format!("{P}/security-groups/web"));
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(5));
    assert_eq!(status(&etcd, "hv1")["errors_total"], 0);
    let groups = lab.ctl(&f.socks[0], "security-groups").unwrap();
    assert_eq!(groups["groups"], json!([]), "{groups}");

    // A record that does not parse and one the switch refuses: reported
    // with their keys; the change beside them applied.
    etcd.put(&format!("{P}/hosts/hv1/vms/junk"), &json!("not an object"));
    etcd.put(
        &format!("{P}/hosts/hv1/vms/c"),
        &vm_record("no-such-port", "02:00:00:00:01:0c", "10.0.1.12"),
    );
    let rev = etcd.put(
        &format!("{P}/endpoints/100/10.0.1.99"),
        &endpoint("02:00:00:00:01:99", "192.168.77.2"),
    );
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(5));
    let s = status(&etcd, "hv1");
    let errors = s["errors"].as_array().unwrap();
    assert_eq!(s["errors_total"], 2, "{s}");
    assert!(
        errors
            .iter()
            .any(|e| e["key"] == format!("{P}/hosts/hv1/vms/junk")),
        "{s}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e["key"] == format!("{P}/hosts/hv1/vms/c")
                && e["error"].as_str().unwrap().contains("no-such-port")),
        "the switch's own error: {s}"
    );
    // What an operator reads.
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &ctl.agent_ns,
        agent_bin().to_str().unwrap(),
        "--etcd",
        &etcd.endpoints(),
        "status",
        "--host",
        "hv1",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("errors     2") && table.contains(&format!("{P}/hosts/hv1/vms/junk: ")),
        "{table}"
    );
    let topo = lab.ctl(&f.socks[0], "topology").unwrap();
    assert!(
        rows(&topo, "remotes").any(|r| r["ip"] == "10.0.1.99"),
        "{topo}"
    );
    etcd.del(&format!("{P}/hosts/hv1/vms/junk"));
    let rev = etcd.del(&format!("{P}/hosts/hv1/vms/c"));
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(5));
    assert_eq!(status(&etcd, "hv1")["errors_total"], 0);

    // etcd dies: forwarding goes on; it returns: the agents catch up.
    let mut etcd = etcd;
    etcd.kill(0);
    let (ok, out) = ping(&vm_a, B.1, "3");
    assert!(ok, "forwarding without etcd:\n{out}");
    std::thread::sleep(Duration::from_secs(2));
    etcd.start_member(0);
    etcd.wait_healthy();
    let rev = etcd.put(
        &format!("{P}/endpoints/100/10.0.1.98"),
        &endpoint("02:00:00:00:01:98", "192.168.77.2"),
    );
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(15));
    assert!(status(&etcd, "hv1")["sessions"].as_u64() >= Some(2));

    // A compacted history: hv1's agent is cut off from etcd while records
    // change and the history is compacted; back, it cannot resume its
    // watch, lists again and applies only the difference.
    let before = status(&etcd, "hv1")["counters"]["resync_keys"]
        .as_u64()
        .unwrap();
    sh(&["ip", "-n", &ctl.etcd_ns, "link", "set", &ctl.link, "down"]);
    for i in 0..5 {
        etcd.put(
            &format!("{P}/endpoints/100/10.0.1.{}", 50 + i),
            &endpoint("02:00:00:00:01:50", "192.168.77.2"),
        );
    }
    etcd.del(&format!("{P}/endpoints/100/10.0.1.99"));
    let rev = etcd.put(
        &format!("{P}/endpoints/100/10.0.1.98"),
        &endpoint("02:00:00:00:01:97", "192.168.77.2"),
    );
    etcd.ctl(&["compact", &rev.to_string()]);
    // (Long enough for the agent's keepalive to give the connection up.)
    std::thread::sleep(Duration::from_secs(6));
    sh(&["ip", "-n", &ctl.etcd_ns, "link", "set", &ctl.link, "up"]);
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(20));
    let s = status(&etcd, "hv1");
    assert!(
        s["compactions"].as_u64() >= Some(1),
        "no compaction seen: {s}"
    );
    let after = s["counters"]["resync_keys"].as_u64().unwrap();
    assert_eq!(after - before, 7, "only the 7 changed records: {s}");
    let topo = lab.ctl(&f.socks[0], "topology").unwrap();
    let remotes = topo["remotes"].as_array().unwrap();
    assert!(remotes.iter().any(|r| r["ip"] == "10.0.1.54"), "{topo}");
    assert!(!remotes.iter().any(|r| r["ip"] == "10.0.1.99"), "{topo}");
    assert!(
        remotes
            .iter()
            .any(|r| r["ip"] == "10.0.1.98" && r["mac"] == "02:00:00:00:01:97"),
        "{topo}"
    );

    // A live upgrade of hv1's switch: another process, the same state.
    // The agent notices, compares with what it holds, and sends nothing.
    let before = status(&etcd, "hv1")["counters"].clone();
    lab.takeover_in(&f.hv[0], Path::new(env!("CARGO_BIN_EXE_vswitch")), "fsw1");
    lab.assert_handed_over(0, "fsw1");
    wait_until(
        "the agent's resync after the upgrade",
        Duration::from_secs(10),
        || status(&etcd, "hv1")["counters"]["resyncs"].as_u64() > before["resyncs"].as_u64(),
    );
    let after = status(&etcd, "hv1")["counters"].clone();
    assert_eq!(
        after["resync_keys"], before["resync_keys"],
        "nothing differed: {after}"
    );
    assert_eq!(after["ops"], before["ops"], "nothing sent: {after}");
    let (ok, out) = ping(&vm_a, B.1, "2");
    assert!(ok, "after the live upgrade:\n{out}");

    // The switch restarts from its config (ports, no networks, no VMs):
    // its agent sees a new process and puts everything back.
    let pid = lab.ctl(&f.socks[0], "stats").unwrap()["pid"]
        .as_u64()
        .unwrap();
    sh(&["kill", &pid.to_string()]);
    wait_until("the old switch gone", Duration::from_secs(10), || {
        lab.ctl(&f.socks[0], "stats").is_none()
    });
    lab.vswitch_in(Some(&f.hv[0]), "fsw1", &f.configs[0]);
    wait_until("hv1 programmed again", Duration::from_secs(10), || {
        lab.ctl(&f.socks[0], "topology").is_some_and(|t| {
            t["vms"].as_array().is_some_and(|v| v.len() == 2)
                && t["remotes"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["ip"] == "10.0.1.54"))
        })
    });
    for (vm, tap, (mac, ip)) in [(&vm_a, &f.taps[0][0], A), (&vm_b, &f.taps[0][1], B)] {
        plug(&f.hv[0], tap, vm, mac);
        sh(&[
            "ip",
            "-n",
            vm,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            tap,
        ]);
        sh(&[
            "ip", "-n", vm, "route", "replace", "default", "via", "10.0.1.1",
        ]);
    }
    let (ok, out) = ping(&vm_a, B.1, "2");
    assert!(ok, "after the switch restarted:\n{out}");
}

#[test]
fn changes_keep_flowing_when_the_etcd_leader_dies() {
    let mut lab = Lab::new();
    let f = two_hypervisors(&mut lab);
    let mut ctl = Control::new(&mut lab);
    let mut etcd = Etcd::start(&lab, &ctl.etcd_ns, 3);
    etcd.put(&format!("{P}/networks/100"), &network(None));
    let rev = etcd.put(
        &format!("{P}/endpoints/100/10.0.1.40"),
        &endpoint("02:00:00:00:01:40", "192.168.77.9"),
    );
    ctl.agent(&lab, &etcd, "hv1", &f.socks[0]);
    ctl.agent(&lab, &etcd, "hv2", &f.socks[1]);
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(10));
    wait_applied(&etcd, &lab, "hv2", rev, Duration::from_secs(10));
    let leader = etcd.leader();
    etcd.kill(leader);
    let t = Instant::now();
    // A change through a survivor (etcdctl retries until a new leader).
    let (mut rev, mut accepted) = (0, 0);
    for i in 0..20 {
        let v = endpoint("02:00:00:00:01:41", "192.168.77.9");
        let key = format!("{P}/endpoints/100/10.0.1.{}", 41 + i);
        let (ok, out) = etcd.try_ctl(&["put", &key, &v.to_string(), "-w", "json"]);
        if ok {
            rev = serde_json::from_str::<Value>(&out).unwrap()["header"]["revision"]
                .as_i64()
                .unwrap();
            accepted += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rev > 0, "no change accepted after the leader died");
    wait_applied(&etcd, &lab, "hv1", rev, Duration::from_secs(15));
    wait_applied(&etcd, &lab, "hv2", rev, Duration::from_secs(15));
    eprintln!(
        "leader m{leader} killed; {accepted} changes applied on both hosts {:?} later",
        t.elapsed()
    );
    for s in &f.socks {
        let topo = lab.ctl(s, "topology").unwrap();
        assert_eq!(topo["remotes_total"], 1 + accepted, "{topo}");
    }
}

/// Hoverboard: a network with a gateway VTEP (a Linux router on the
/// underlay that knows every endpoint); hosts know only their own VMs
/// until the controller promotes a hot pair.
#[test]
fn hoverboard_promotes_a_hot_pair_past_the_gateway_and_demotes_it_when_idle() {
    let mut lab = Lab::new();
    let f = two_hypervisors(&mut lab);
    let mut ctl = Control::new(&mut lab);
    let etcd = Etcd::start(&lab, &ctl.etcd_ns, 1);
    // The gateway: VXLAN 100 at 192.168.77.254 (the hub's bridge), with the
    // network's gateway MAC, forwarding to every endpoint it knows (static
    // neighbours). Hosts answer ARP for addresses they do not know with
    // the gateway's MAC.
    let h = &f.hub;
    sh(&[
        "ip",
        "-n",
        h,
        "link",
        "add",
        "vx100",
        "type",
        "vxlan",
        "id",
        "100",
        "local",
        "192.168.77.254",
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&[
        "ip",
        "-n",
        h,
        "link",
        "set",
        "vx100",
        "address",
        "02:00:00:00:00:fe",
        "mtu",
        "1450",
        "up",
    ]);
    sh(&[
        "ip",
        "-n",
        h,
        "addr",
        "add",
        "10.0.1.254/24",
        "dev",
        "vx100",
    ]);
    for (ip, mac, vtep) in [(A.1, A.0, "192.168.77.1"), (B.1, B.0, "192.168.77.2")] {
        sh(&[
            "ip",
            "-n",
            h,
            "neigh",
            "add",
            ip,
            "lladdr",
            mac,
            "dev",
            "vx100",
            "nud",
            "permanent",
        ]);
        sh(&[
            "bridge", "-n", h, "fdb", "append", mac, "dev", "vx100", "dst", vtep,
        ]);
    }
    for k in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.vx100.send_redirects=0",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.vx100.rp_filter=0",
    ] {
        sh(&["ip", "netns", "exec", h, "sysctl", "-qw", k]);
    }
    let (vm_a, _vm_b) = two_vms(
        &mut lab,
        &etcd,
        &mut ctl,
        &f,
        network(Some("192.168.77.254")),
    );
    for s in &f.socks {
        let topo = lab.ctl(s, "topology").unwrap();
        assert_eq!(
            topo["remotes_total"], 0,
            "nothing direct before Hoverboard: {topo}"
        );
    }
    lab::warm_underlay(&f.hv[0], "192.168.77.254");
    lab::warm_underlay(&f.hv[1], "192.168.77.254");
    let (ok, out) = ping(&vm_a, B.1, "3");
    assert!(ok, "a → b through the gateway VTEP:\n{out}");
    // Packets through the gateway: its VXLAN device's receive count.
    let gw_rx = || -> u64 {
        let out = sh(&["ip", "-n", h, "-j", "-s", "link", "show", "vx100"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    };
    // Two controllers; the first leads, and is killed: the second takes
    // over and promotes.
    let c1 = ctl.controller(&lab, &etcd, "c1");
    wait_until("c1 leading", Duration::from_secs(10), || {
        std::fs::read_to_string(lab.dir.join("controller-c1.log"))
            .unwrap_or_default()
            .contains("leading")
    });
    ctl.controller(&lab, &etcd, "c2");
    ctl.stop(c1);
    // a talks to b at ~800 kbit/s (threshold 20).
    let mut flood = Command::new("ip")
        .args([
            "netns", "exec", &vm_a, "ping", "-i", "0.01", "-s", "1000", "-w", "30", B.1,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let before = gw_rx();
    std::thread::sleep(Duration::from_secs(1));
    let through_gateway = gw_rx() - before;
    assert!(
        through_gateway > 50,
        "the flood goes through the gateway first: {through_gateway}"
    );
    wait_until("hv1's direct route to b", Duration::from_secs(15), || {
        etcd.get(&format!("{P}/direct/hv1/100/{}", B.1)).is_some()
            && lab
                .ctl(&f.socks[0], "topology")
                .is_some_and(|t| t["remotes_total"] == 1)
    });
    wait_until("hv2's direct route to a", Duration::from_secs(15), || {
        lab.ctl(&f.socks[1], "topology")
            .is_some_and(|t| t["remotes_total"] == 1)
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = gw_rx();
    std::thread::sleep(Duration::from_secs(1));
    let still = gw_rx() - before;
    assert!(
        still * 20 < through_gateway,
        "promoted: the pair's packets no longer cross the gateway ({still} vs {through_gateway} a second)"
    );
    let top = lab.ctl(&f.socks[0], "top-talkers").unwrap();
    assert!(
        rows(&top, "talkers").any(|t| t["dst"] == B.1 && t["via_gateway"] == false),
        "{top}"
    );
    // Idle: demoted, back to the gateway.
    let _ = flood.kill();
    let _ = flood.wait();
    wait_until("demotion on both hosts", Duration::from_secs(20), || {
        etcd.get(&format!("{P}/direct/hv1/100/{}", B.1)).is_none()
            && f.socks.iter().all(|s| {
                lab.ctl(s, "topology")
                    .is_some_and(|t| t["remotes_total"] == 0)
            })
    });
    let before = gw_rx();
    let (ok, out) = ping(&vm_a, B.1, "3");
    assert!(ok, "a → b through the gateway again:\n{out}");
    assert!(gw_rx() - before >= 3, "the gateway carries it again");
}
