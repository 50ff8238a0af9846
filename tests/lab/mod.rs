//! The test lab: network namespaces as VMs, vswitch processes as
//! hypervisors. Every name is unique to the test run, every wait is
//! bounded, and everything made is removed on drop, also when a test fails.
//! Lab tests need root (as CI has); without it they fail saying so.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fail (never skip) when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "lab tests create network namespaces and tap devices: run them as root (CI does)"
    );
}

/// Run a command; panic with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command, returning whether it succeeded.
pub fn try_sh(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// busybox's DHCP client on `dev` in namespace `ns`: five discovers two
/// seconds apart, then it quits (within `limit_s` in all), running
/// `script` on its events; `options` asks for more (e.g. `["-O", "mtu"]`).
pub fn udhcpc(ns: &str, dev: &str, script: &str, options: &[&str], limit_s: u32) -> (bool, String) {
    let limit = limit_s.to_string();
    let mut args = vec![
        "timeout", &limit, "ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", dev, "-n", "-q",
        "-f", "-t", "5", "-T", "2",
    ];
    args.extend_from_slice(options);
    args.extend_from_slice(&["-s", script]);
    try_sh(&args)
}

/// `vswitch ctl --json --socket S ARGS...` → JSON, or the error text.
pub fn ctl_args(sock: &std::path::Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .args(["ctl", "--json", "--socket"])
        .arg(sock)
        .args(args)
        .output()
        .expect("vswitch ctl");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `vswitch ctl apply` with `ops` on standard input.
pub fn apply(sock: &std::path::Path, ops: serde_json::Value) -> Result<serde_json::Value, String> {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .args(["ctl", "--json", "--socket"])
        .arg(sock)
        .arg("apply")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vswitch ctl apply");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ops.to_string().as_bytes())
        .expect("writing ops");
    let out = child.wait_with_output().expect("ctl apply");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Poll `f` every 50 ms until it returns true or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Segments namespace `ns`'s stack refused for a bad TCP or UDP checksum
/// (`InCsumErrors` of /proc/net/snmp: what `netstat -s` shows).
pub fn csum_errors(ns: &str) -> u64 {
    let snmp = sh(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&snmp.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let mut total = 0;
    for pair in lines.windows(2) {
        let (names, values) = (pair[0], pair[1]);
        let proto = names.split(':').next().unwrap_or("");
        if !["Tcp", "Udp"].contains(&proto) || !values.starts_with(&format!("{proto}:")) {
            continue;
        }
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if let Some(i) = names.iter().position(|n| *n == "InCsumErrors") {
            total += values
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// A bounded iperf3 TCP run from `client_ns` to a one-shot server on
/// `ip`:`port` in `server_ns`; returns the received bits per second.
/// Neither side's stack may count a checksum error meanwhile (offloads:
/// partial checksums completed, segments cut and merged, all right).
pub fn iperf(server_ns: &str, client_ns: &str, ip: &str, port: &str) -> f64 {
    let errors = (csum_errors(server_ns), csum_errors(client_ns));
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-D", "-p", port,
    ]);
    assert!(
        ok,
        "iperf3 server (is iperf3 installed? scripts/deps installs it): {out}"
    );
    wait_until("iperf3 server", Duration::from_secs(5), || {
        try_sh(&["ip", "netns", "exec", server_ns, "ss", "-ltn"])
            .1
            .contains(&format!(":{port}"))
    });
    let out = sh(&[
        "timeout", "30", "ip", "netns", "exec", client_ns, "iperf3", "-c", ip, "-p", port, "-t",
        "2", "-J",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert_eq!(
        (csum_errors(server_ns), csum_errors(client_ns)),
        errors,
        "checksum errors counted by the receiving stacks during the stream"
    );
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 result")
}

/// Everything one test made.
pub struct Lab {
    pub tag: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    pub fn new() -> Lab {
        require_root();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("vswitch-lab-{tag}"));
        std::fs::create_dir_all(&dir).expect("lab directory");
        Lab {
            tag,
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A unique name (≤ 15 bytes, usable for links): `prefix` + run tag.
    pub fn name(&self, prefix: &str) -> String {
        let s = format!("{prefix}{}", self.tag);
        assert!(s.len() <= 15, "name {s} too long for an interface");
        s
    }

    /// A new network namespace with loopback up.
    pub fn netns(&mut self, prefix: &str) -> String {
        let ns = self.name(prefix);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Start vswitch with `config` (TOML text); wait until its control
    /// socket answers. Returns the socket path.
    pub fn vswitch(&mut self, name: &str, config: &str) -> PathBuf {
        self.vswitch_in(None, name, config)
    }

    /// [`Lab::vswitch`] inside network namespace `ns` (a "hypervisor").
    pub fn vswitch_in(&mut self, ns: Option<&str>, name: &str, config: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).expect("writing config");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vswitch")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_vswitch")),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting vswitch");
        self.children.push(child);
        let sock = self.socket(name);
        wait_until(
            "the vswitch control socket",
            Duration::from_secs(10),
            || self.ctl(&sock, "stats").is_some(),
        );
        sock
    }

    /// Start `binary run --config <name>.toml --takeover` (a new vswitch
    /// taking over a running one); its log is `<name>-new.log`.
    pub fn takeover(&mut self, binary: &std::path::Path, name: &str) -> u32 {
        self.spawn_takeover(Command::new(binary), name, &[])
    }

    /// [`Lab::takeover`] inside network namespace `ns`.
    pub fn takeover_in(&mut self, ns: &str, binary: &std::path::Path, name: &str) -> u32 {
        self.takeover_in_with(ns, binary, name, &[])
    }

    /// [`Lab::takeover_in`] with more arguments to `run`.
    pub fn takeover_in_with(
        &mut self,
        ns: &str,
        binary: &std::path::Path,
        name: &str,
        args: &[&str],
    ) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(binary);
        self.spawn_takeover(cmd, name, args)
    }

    fn spawn_takeover(&mut self, mut cmd: Command, name: &str, args: &[&str]) -> u32 {
        let path = self.dir.join(format!("{name}.toml"));
        let log =
            std::fs::File::create(self.dir.join(format!("{name}-new.log"))).expect("log file");
        let child = cmd
            .args(["run", "--takeover", "--config"])
            .arg(&path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the new vswitch");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Assert that the `old`-th vswitch started (the one running as
    /// `name`) handed over and exited within 15 s; the logs of both sides
    /// otherwise.
    pub fn assert_handed_over(&mut self, old: usize, name: &str) {
        let exited = self.exited(old, Duration::from_secs(15));
        assert!(
            exited,
            "the old binary did not hand over and exit\nold:\n{}\nnew:\n{}",
            self.log(name),
            self.log(&format!("{name}-new"))
        );
    }

    /// Has the `i`-th vswitch started exited (within `limit`)?
    pub fn exited(&mut self, i: usize, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if matches!(self.children[i].try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Ask a running vswitch; `None` if it does not answer.
    pub fn ctl(&self, sock: &std::path::Path, cmd: &str) -> Option<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_vswitch"))
            .args(["ctl", "--json", "--socket"])
            .arg(sock)
            .arg(cmd)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Move tap `tap` (created by vswitch) into `ns` as the VM's NIC with
    /// `mac` and `cidr_addr` (e.g. "10.0.0.10/24").
    pub fn attach_vm(&self, tap: &str, ns: &str, mac: &str, cidr_addr: &str) {
        self.attach_vm_from(None, tap, ns, mac, cidr_addr)
    }

    /// [`Lab::attach_vm`] for a tap created inside namespace `from`.
    pub fn attach_vm_from(
        &self,
        from: Option<&str>,
        tap: &str,
        ns: &str,
        mac: &str,
        cidr_addr: &str,
    ) {
        let ip_in = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec!["ip".into()];
            if let Some(f) = from {
                v.extend(["-n".into(), f.into()]);
            }
            v.extend(args.iter().map(|s| s.to_string()));
            v
        };
        let show = ip_in(&["link", "show", tap]);
        wait_until(&format!("tap {tap}"), Duration::from_secs(5), || {
            try_sh(&show.iter().map(String::as_str).collect::<Vec<_>>()).0
        });
        let mv = ip_in(&["link", "set", tap, "netns", ns]);
        sh(&mv.iter().map(String::as_str).collect::<Vec<_>>());
        sh(&["ip", "-n", ns, "link", "set", tap, "address", mac]);
        sh(&["ip", "-n", ns, "addr", "add", cidr_addr, "dev", tap]);
        sh(&["ip", "-n", ns, "link", "set", tap, "up"]);
    }

    /// The last vswitch started, for signalling.
    pub fn last_child(&mut self) -> &mut Child {
        self.children.last_mut().expect("a vswitch was started")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) with a pid we spawned and still own a handle
            // to (not yet reaped, so the pid cannot have been reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            // Stray server processes started inside the namespace die with it.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(p) = pid.parse::<libc::pid_t>() {
                            // SAFETY: kill(2) on a pid listed in our own test namespace.
                            unsafe { libc::kill(p, libc::SIGKILL) };
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A hypervisor's config (two-host labs): one VM on a tap, an uplink, one remote VM.
pub fn config(
    lab: &Lab,
    name: &str,
    uplink: &str,
    vtep: &str,
    vm: (&str, &str, &str),
    remote: (&str, &str, &str),
) -> String {
    format!(
        r#"[switch]
poll = "adaptive"
flow_capacity = 4096
control_socket = "{sock}"

[uplink]
interface = "{uplink}"
vtep = "{vtep}"

[[port]]
name = "{tap}"
type = "tap"

[[network]]
vni = 100
gateway_mac = "02:00:00:00:00:fe"
[[network.subnet]]
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"

[[vm]]
name = "{vmname}"
port = "{tap}"
mac = "{vmmac}"
ips = ["{vmip}"]
network = 100

[[remote]]
network = 100
ip = "{rip}"
mac = "{rmac}"
vtep = "{rvtep}"
"#,
        sock = lab.socket(name).display(),
        tap = lab.name(&format!("t{}", vm.0)),
        vmname = vm.0,
        vmmac = vm.1,
        vmip = vm.2,
        rip = remote.0,
        rmac = remote.1,
        rvtep = remote.2,
    )
}

/// A veth "physical network" between namespaces `a` and `b`, addressed
/// `a_ip`/24 and `b_ip`/24. Returns the interface names.
pub fn wire(lab: &Lab, a: &str, a_ip: &str, b: &str, b_ip: &str) -> (String, String) {
    wire_queues(lab, (a, a_ip), (b, b_ip), 1)
}

/// [`wire`] with `queues` queues each way on both ends. A veth's sender
/// picks its transmit queue by flow hash and the receiver takes the frame
/// on the receive queue of that number, as a NIC's RSS would.
pub fn wire_queues(lab: &Lab, a: (&str, &str), b: (&str, &str), queues: u32) -> (String, String) {
    let ((a, a_ip), (b, b_ip)) = (a, b);
    let (ia, ib) = (lab.name("ua"), lab.name("ub"));
    let q = queues.to_string();
    sh(&[
        "ip",
        "link",
        "add",
        &ia,
        "netns",
        a,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        &ib,
        "netns",
        b,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ]);
    sh(&[
        "ip",
        "-n",
        a,
        "addr",
        "add",
        &format!("{a_ip}/24"),
        "dev",
        &ia,
    ]);
    sh(&[
        "ip",
        "-n",
        b,
        "addr",
        "add",
        &format!("{b_ip}/24"),
        "dev",
        &ib,
    ]);
    sh(&["ip", "-n", a, "link", "set", &ia, "up"]);
    sh(&["ip", "-n", b, "link", "set", &ib, "up"]);
    (ia, ib)
}

/// A VM of the one-hypervisor labs: its tap is `t<name>`, its namespace
/// `v<name>`.
pub struct Vm<'a> {
    pub name: &'a str,
    pub mac: &'a str,
    pub ip: &'a str,
    pub network: u32,
}

/// A one-hypervisor switch `name` (adaptive, 4,096 flows) with a tap port
/// per VM of `vms` and their networks (10.0.0.0/24 each).
pub fn one_host_config(lab: &Lab, name: &str, vms: &[Vm]) -> String {
    let mut c = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{}\"\n\n",
        lab.socket(name).display()
    );
    let mut nets: Vec<u32> = vms.iter().map(|v| v.network).collect();
    nets.sort_unstable();
    nets.dedup();
    for n in nets {
        c += &format!(
            "[[network]]\nvni = {n}\ngateway_mac = \"02:00:00:00:00:fe\"\n[[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n"
        );
    }
    for v in vms {
        let tap = lab.name(&format!("t{}", v.name));
        c += &format!("[[port]]\nname = \"{tap}\"\ntype = \"tap\"\n\n");
        c += &format!(
            "[[vm]]\nname = \"{}\"\nport = \"{tap}\"\nmac = \"{}\"\nips = [\"{}\"]\nnetwork = {}\n\n",
            v.name, v.mac, v.ip, v.network
        );
    }
    c
}

/// Start a switch with `vms`, each in its own namespace; returns the
/// socket and the namespaces in order.
pub fn one_host(lab: &mut Lab, vms: &[Vm]) -> (std::path::PathBuf, Vec<String>) {
    let cfg = one_host_config(lab, "sw", vms);
    one_host_from(lab, "sw", &cfg, vms)
}

/// Start switch `name` with config `cfg` (its ports the taps of `vms`)
/// and put each VM in its own namespace; the socket and the namespaces.
pub fn one_host_from(
    lab: &mut Lab,
    name: &str,
    cfg: &str,
    vms: &[Vm],
) -> (std::path::PathBuf, Vec<String>) {
    let sock = lab.vswitch(name, cfg);
    let mut nss = Vec::new();
    for v in vms {
        let ns = lab.netns(&format!("v{}", v.name));
        lab.attach_vm(
            &lab.name(&format!("t{}", v.name)),
            &ns,
            v.mac,
            &format!("{}/24", v.ip),
        );
        nss.push(ns);
    }
    (sock, nss)
}

/// The Prometheus text a switch serves on `127.0.0.1:port`.
pub fn metrics(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let out = sh(&[
        "python3",
        "-c",
        &format!("import urllib.request; print(urllib.request.urlopen('{url}', timeout=5).read().decode())"),
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Resolve the underlay neighbour `peer` from hypervisor namespace `hv`
/// (one ping, its answer not required): a test's first overlay packets
/// then do not wait for ARP on the underlay.
pub fn warm_underlay(hv: &str, peer: &str) {
    let _ = try_sh(&[
        "ip", "netns", "exec", hv, "ping", "-c", "1", "-W", "2", peer,
    ]);
}

/// A VM behind a veth pair, for an af-xdp port: `ours` (in namespace
/// `from`, or the lab's own) and `theirs` in namespace `ns` with `mac`
/// and `cidr_addr`, both at `mtu` if given. The VM's end sends complete
/// checksums (`tx off`): AF_XDP carries no checksum-offload metadata
/// (README: AF_XDP VM ports).
pub fn veth_vm(
    from: Option<&str>,
    ours: &str,
    theirs: &str,
    ns: &str,
    mac: &str,
    cidr_addr: &str,
    mtu: Option<u16>,
) {
    let mut add: Vec<String> = vec!["ip".into()];
    if let Some(f) = from {
        add.extend(["-n".into(), f.into()]);
    }
    add.extend(["link", "add", ours].map(String::from));
    let mtu = mtu.map(|m| m.to_string());
    if let Some(m) = &mtu {
        add.extend(["mtu".into(), m.clone()]);
    }
    add.extend(["type", "veth", "peer", "name", theirs, "netns", ns].map(String::from));
    if let Some(m) = &mtu {
        add.extend(["mtu".into(), m.clone()]);
    }
    sh(&add.iter().map(String::as_str).collect::<Vec<_>>());
    match from {
        Some(f) => sh(&["ip", "-n", f, "link", "set", ours, "up"]),
        None => sh(&["ip", "link", "set", ours, "up"]),
    };
    sh(&["ip", "-n", ns, "link", "set", theirs, "address", mac]);
    sh(&["ip", "-n", ns, "addr", "add", cidr_addr, "dev", theirs]);
    sh(&["ip", "-n", ns, "link", "set", theirs, "up"]);
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", ns, "ethtool", "-K", theirs, "tx", "off",
    ]);
    assert!(ok, "ethtool (scripts/deps installs it): {out}");
}

/// VM a and VM b of the two-hypervisor labs: name, MAC, address.
pub const VM_A: (&str, &str, &str) = ("a", "02:00:00:00:00:0a", "10.0.0.10");
pub const VM_B: (&str, &str, &str) = ("b", "02:00:00:00:00:0b", "10.0.0.11");

/// What [`two_hosts`] started.
pub struct TwoHosts {
    /// The switches' control sockets.
    pub s1: PathBuf,
    pub s2: PathBuf,
    /// The VMs' taps (in `vm1` and `vm2`).
    pub ta: String,
    pub tb: String,
}

/// Two hypervisors, namespaces `hv.0` and `hv.1` with uplinks `up.0` and
/// `up.1` at `vtep.0` and `vtep.1`: a switch in each (`sw1`, `sw2`), VM a
/// on a tap of the first (in namespace `vm.0`), VM b on the second (in
/// `vm.1`), each the other's remote, both at the overlay's MTU.
pub fn two_hosts(
    lab: &mut Lab,
    hv: (&str, &str),
    vm: (&str, &str),
    up: (&str, &str),
    vtep: (&str, &str),
) -> TwoHosts {
    two_hosts_at(lab, hv, vm, up, vtep, 1500)
}

/// [`two_hosts`] with the underlay at `mtu` (`[uplink] mtu`; the VMs at
/// `mtu` − 50, what DHCP tells them). The links' own MTU is the caller's.
pub fn two_hosts_at(
    lab: &mut Lab,
    hv: (&str, &str),
    vm: (&str, &str),
    up: (&str, &str),
    vtep: (&str, &str),
    mtu: u16,
) -> TwoHosts {
    let (a, b) = (VM_A, VM_B);
    // `[uplink]` is the section before the first port.
    let with_mtu = |c: String| c.replacen("\n\n[[port]]", &format!("\nmtu = {mtu}\n\n[[port]]"), 1);
    let c1 = with_mtu(config(lab, "sw1", up.0, vtep.0, a, (b.2, b.1, vtep.1)));
    let c2 = with_mtu(config(lab, "sw2", up.1, vtep.1, b, (a.2, a.1, vtep.0)));
    let s1 = lab.vswitch_in(Some(hv.0), "sw1", &c1);
    let s2 = lab.vswitch_in(Some(hv.1), "sw2", &c2);
    let (ta, tb) = (lab.name("ta"), lab.name("tb"));
    lab.attach_vm_from(Some(hv.0), &ta, vm.0, a.1, &format!("{}/24", a.2));
    lab.attach_vm_from(Some(hv.1), &tb, vm.1, b.1, &format!("{}/24", b.2));
    let overlay = (mtu - 50).to_string();
    sh(&["ip", "-n", vm.0, "link", "set", &ta, "mtu", &overlay]);
    sh(&["ip", "-n", vm.1, "link", "set", &tb, "mtu", &overlay]);
    TwoHosts { s1, s2, ta, tb }
}

pub fn vm_mtu(ns: &str, tap: &str) {
    // What DHCP's interface-MTU option will tell VMs: room for VXLAN's 50 bytes.
    sh(&["ip", "-n", ns, "link", "set", tap, "mtu", "1450"]);
}

/// A TCP echo server.
pub const ECHO: &str = r#"
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen()
def serve(c):
    while True:
        d = c.recv(100)
        if not d:
            return
        c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// One long TCP connection that echoes a byte every 100 ms, printing
/// "ok N" per echo, until an echo takes more than 1 s (then "cut").
pub const PINGER: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.settimeout(1.0)
n = 0
while n < 600:
    try:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise Exception("closed")
    except Exception as e:
        print("cut", e, flush=True)
        sys.exit(0)
    n += 1
    print("ok", n, flush=True)
    time.sleep(0.1)
"#;

/// `text` without terminal colour codes.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A handover report (`last_handover` of `ctl stats`) whose blackout is
/// there and short: under 50 ms (measured here: well under 5 ms, also in
/// debug builds). `ctx` is shown on failure.
pub fn assert_blackout_bounded(h: &serde_json::Value, ctx: &dyn std::fmt::Display) {
    let us = h["blackout_us"]
        .as_f64()
        .unwrap_or_else(|| panic!("no blackout_us in the handover report: {ctx}"));
    assert!(
        (0.0..50_000.0).contains(&us),
        "handover blackout {us} µs, not under 50 ms: {ctx}"
    );
}

/// The cores a thread of `pid` named `name` may run on
/// (`Cpus_allowed_list`), one entry per such thread.
pub fn thread_cores(pid: u64, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            found.push(l["Cpus_allowed_list:".len()..].trim().to_string());
        }
    }
    found
}

/// The cores this process may use (2 on the machines the suite runs on).
pub fn allowed_cores() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap();
    let mut v = Vec::new();
    for part in l["Cpus_allowed_list:".len()..].trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        v.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap());
    }
    v
}

/// (transmitted, received) from ping's summary.
pub fn ping_counts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in:\n{out}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}
