//! A real guest on a vhost-user port: Debian's kernel and a busybox
//! userland built into an initramfs here, booted by QEMU (software
//! emulation) with its memory in a shared memfd and its virtio-net device
//! served by vswitch over vhost-user (two queue pairs, two vCPUs). The
//! guest takes its address by DHCP from the switch, pings a VM on a tap
//! port of the same hypervisor and one on another hypervisor (across
//! VXLAN), and takes a TCP stream; the switch is upgraded live under a
//! ping flood and a stream (its vhost-user connection handed over), and a
//! new binary that dies after the pause leaves the guest with the old one;
//! QEMU is killed mid-stream (the switch keeps forwarding for the others)
//! and started again (the guest is reachable again). In client mode the
//! switch connects to QEMU, and a killed and restarted switch finds the
//! running guest again.
//!
//! Needs qemu-system-x86, linux-image-amd64 and busybox-static
//! (scripts/deps installs them). Run serially.

mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{assert_blackout_bounded, plain, sh, try_sh, wait_until, Lab};

const GUEST_MAC: &str = "02:00:00:00:00:20";
const GUEST_IP: &str = "10.0.0.20";
const TAP_IP: &str = "10.0.0.11";
/// VM b, on the other hypervisor (across VXLAN).
const REMOTE_IP: &str = "10.0.0.12";

/// Modules the guest needs for virtio-net, in load order (Debian builds
/// them as modules).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The newest kernel image in /boot with its modules directory.
fn kernel() -> (PathBuf, PathBuf) {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .expect("/boot")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = PathBuf::from("/lib/modules").join(&version);
            modules.is_dir().then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("a kernel in /boot with its modules (scripts/deps installs linux-image-amd64)")
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if p.file_name().and_then(|f| f.to_str()) == Some(&format!("{name}.ko")) {
            return Some(p);
        }
    }
    None
}

/// The guest's init: modules, DHCP on eth0 (busybox udhcpc, with a script
/// that applies the lease), a marker on the console, then a TCP sink
/// that reports what it received.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /lib/modules/$m.ko; done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -s /dhcp.sh -q -t 20 -T 1 -n || echo "GUEST DHCP FAILED"
echo "GUEST ADDR $(ip -4 -o addr show eth0 | awk '{print $4}') MTU $(cat /sys/class/net/eth0/mtu)"
echo "GUEST QUEUES $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ping -c 3 -W 2 10.0.0.11 >/dev/null && echo "GUEST PING OK" || echo "GUEST PING FAILED"
ping -c 3 -W 2 10.0.0.12 >/dev/null && echo "GUEST REMOTE OK" || echo "GUEST REMOTE FAILED"
while true; do
  n=$(nc -l -p 5001 | wc -c)
  echo "GUEST GOT $n BYTES"
done
"#;

const DHCP_SCRIPT: &str = r#"#!/bin/busybox sh
case "$1" in
  bound|renew)
    ip addr flush dev $interface
    ip addr add $ip/$mask dev $interface
    [ -n "$mtu" ] && ip link set $interface mtu $mtu
    [ -n "$router" ] && ip route add default via $router
    ;;
esac
"#;

/// An initramfs (newc cpio, gzip) with busybox, the modules and the init.
fn initramfs(dir: &Path) -> PathBuf {
    let (_, modules) = kernel();
    let root = dir.join("guestroot");
    for d in ["bin", "proc", "sys", "dev", "lib/modules"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox (scripts/deps installs busybox-static)");
    for m in MODULES {
        let f = find_module(&modules, m)
            .unwrap_or_else(|| panic!("module {m} in {}", modules.display()));
        std::fs::copy(f, root.join(format!("lib/modules/{m}.ko"))).unwrap();
    }
    std::fs::write(root.join("modules"), MODULES.join(" ")).unwrap();
    for (name, text) in [("init", INIT), ("dhcp.sh", DHCP_SCRIPT)] {
        let p = root.join(name);
        std::fs::write(&p, text).unwrap();
        sh(&["chmod", "+x", p.to_str().unwrap()]);
    }
    let out = dir.join("guest.cpio.gz");
    let script = format!(
        "cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        root.display(),
        out.display()
    );
    sh(&["sh", "-c", &script]);
    out
}

/// QEMU with the guest's memory shared (memfd) and its NIC on `sock`
/// (QEMU listening on it if `server`, else connecting) with `pairs` queue
/// pairs (and as many vCPUs, so the guest uses them all); its console
/// goes to `console`.
fn qemu(initrd: &Path, sock: &Path, console: &Path, server: bool, pairs: u32) -> Child {
    let (vmlinuz, _) = kernel();
    Command::new("qemu-system-x86_64")
        .args(["-m", "256", "-display", "none", "-no-reboot"])
        .args(["-smp", &pairs.to_string(), "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={}{}",
            sock.display(),
            if server { ",server=on,wait=off" } else { "" }
        ))
        .args([
            "-netdev",
            &format!("vhost-user,id=n0,chardev=c0,queues={pairs}"),
        ])
        // vectors=0 (INTx, no MSI-X): QEMU 7.2 (Debian 12) crashes in
        // vhost_net_start setting MSI-X vector notifiers under TCG.
        .args([
            "-device",
            &format!(
                "virtio-net-pci,netdev=n0,mac={GUEST_MAC},vectors=0,mq={}",
                if pairs > 1 { "on" } else { "off" }
            ),
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/deps installs qemu-system-x86)")
}

/// Wait (bounded) until the console shows `marker`; its text.
fn console_shows(console: &Path, marker: &str, limit: Duration) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(
            t.elapsed() < limit,
            "the guest console never showed {marker:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The vhost-user port's counters from `ctl stats`.
fn vu0_stats(lab: &Lab, ctl: &Path) -> serde_json::Value {
    let st = lab.ctl(ctl, "stats").expect("the switch answers");
    st["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "vu0"))
        .cloned()
        .unwrap_or_default()
}

/// VM b on tap `tb` of the other hypervisor `hv2`; its namespace.
fn vm_b(lab: &mut Lab, hv2: &str, tb: &str) -> String {
    let b = lab.netns("vb");
    let addr = format!("{REMOTE_IP}/24");
    lab.attach_vm_from(Some(hv2), tb, &b, "02:00:00:00:00:0b", &addr);
    lab::vm_mtu(&b, tb);
    b
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qemu_guest_on_vhost_user_gets_dhcp_pings_streams_and_survives_a_qemu_restart() {
    let mut lab = Lab::new();
    // Two hypervisors: this one (the guest and tap VM a) and another with
    // tap VM b, joined by a veth underlay; VXLAN between them.
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    // (Two queues on the underlay too: one per fast-path thread.)
    let (u1, u2) = lab::wire_queues(&lab, (&hv1, "192.168.63.1"), (&hv2, "192.168.63.2"), 2);
    let ta = lab.name("ta");
    let sock = lab.dir.join("guest.sock");
    // Two fast-path threads, one per queue pair of the guest's.
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nfastpath_threads = 2\nflow_capacity = 4096\ncontrol_socket = \"{ctl}\"\n\n\
         [uplink]\ninterface = \"{u1}\"\nvtep = \"192.168.63.1\"\n\n\
         [[port]]\nname = \"{ta}\"\ntype = \"tap\"\n\
         [[port]]\nname = \"vu0\"\ntype = \"vhost-user\"\nsocket = \"{sock}\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[vm]]\nname = \"a\"\nport = \"{ta}\"\nmac = \"02:00:00:00:00:0a\"\nips = [\"{TAP_IP}\"]\nnetwork = 100\n\
         [[vm]]\nname = \"guest\"\nport = \"vu0\"\nmac = \"{GUEST_MAC}\"\nips = [\"{GUEST_IP}\"]\nnetwork = 100\n\
         [[remote]]\nnetwork = 100\nip = \"{REMOTE_IP}\"\nmac = \"02:00:00:00:00:0b\"\nvtep = \"192.168.63.2\"\n",
        ctl = lab.socket("sw").display(),
        sock = sock.display(),
    );
    let ctl = lab.vswitch_in(Some(&hv1), "sw", &cfg);
    // The other hypervisor: VM b, which knows a and the guest as remote.
    let tb = lab.name("tb");
    let remote = |ip: &str, mac: &str| {
        format!(
            "[[remote]]\nnetwork = 100\nip = \"{ip}\"\nmac = \"{mac}\"\nvtep = \"192.168.63.1\"\n"
        )
    };
    let cfg2 = lab::config(
        &lab,
        "sw2",
        &u2,
        "192.168.63.2",
        ("b", "02:00:00:00:00:0b", REMOTE_IP),
        (TAP_IP, "02:00:00:00:00:0a", "192.168.63.1"),
    ) + &remote(GUEST_IP, GUEST_MAC);
    lab.vswitch_in(Some(&hv2), "sw2", &cfg2);
    let b = vm_b(&mut lab, &hv2, &tb);
    let a = lab.netns("va");
    lab.attach_vm_from(
        Some(&hv1),
        &ta,
        &a,
        "02:00:00:00:00:0a",
        &format!("{TAP_IP}/24"),
    );
    lab::vm_mtu(&a, &ta);
    wait_until("the vhost-user socket", Duration::from_secs(5), || {
        sock.exists()
    });
    let initrd = initramfs(&lab.dir);

    let console = lab.dir.join("console-1.txt");
    let vm = Qemu(qemu(&initrd, &sock, &console, false, 2));
    let text = console_shows(&console, "GUEST REMOTE", Duration::from_secs(120));
    assert!(
        text.contains(&format!("GUEST ADDR {GUEST_IP}/24 MTU 1450")),
        "the guest's DHCP binding (address, and the overlay's MTU):\n{text}\nswitch: {}\n{}",
        lab.ctl(&ctl, "stats").unwrap_or_default(),
        lab.log("sw")
    );
    assert!(text.contains("GUEST PING OK"), "guest → tap VM:\n{text}");
    assert!(
        text.contains("GUEST QUEUES rx-0 rx-1 tx-0 tx-1"),
        "the guest runs two queue pairs:\n{text}"
    );
    assert!(
        text.contains("GUEST REMOTE OK"),
        "guest → VM on the other hypervisor:\n{text}\n{}",
        lab.log("sw")
    );
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &b, "ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP,
    ]);
    assert!(ok, "remote VM → guest across VXLAN:\n{out}");
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &a, "ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP,
    ]);
    assert!(ok, "tap VM → guest:\n{out}\n{}", lab.log("sw"));

    // A TCP stream from the tap VM into the guest.
    let send = format!(
        "import socket; s = socket.create_connection(('{GUEST_IP}', 5001), timeout=20); \
         s.sendall(b'v' * 2_000_000); s.close()"
    );
    let (ok, out) = try_sh(&["ip", "netns", "exec", &a, "python3", "-c", &send]);
    assert!(ok, "TCP into the guest: {out}");
    console_shows(&console, "GUEST GOT 2000000 BYTES", Duration::from_secs(60));
    // The guest negotiated TSO and checksum offload (GUEST_TSO4,
    // GUEST_CSUM): the tap VM's super-frames reached it whole, not cut
    // into 1,500-byte frames.
    let st = lab.ctl(&ctl, "stats").expect("stats");
    let vu = &st["ports"][1];
    let avg = vu["tx_bytes"].as_u64().unwrap_or(0) / vu["tx_packets"].as_u64().unwrap_or(1).max(1);
    assert!(
        avg > 3000 && vu["tx_segments"] == 0,
        "frames to the guest average {avg} bytes: offloads not used ({vu})"
    );

    // A live upgrade while a ping flood and a TCP stream reach the guest:
    // the new binary takes the vhost-user connection over (the guest's
    // memory, its rings where the old one left them, the kick and call
    // eventfds); QEMU and the guest notice nothing.
    let pings = Command::new("ip")
        .args([
            "netns", "exec", &a, "ping", "-i", "0.01", "-c", "300", "-W", "1", GUEST_IP,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping");
    let stream = Command::new("ip")
        .args(["netns", "exec", &a, "python3", "-c"])
        .arg(format!(
            "import socket, time\n\
             s = socket.create_connection(('{GUEST_IP}', 5001), timeout=20)\n\
             for _ in range(30):\n    s.sendall(b'u' * 100_000); time.sleep(0.1)\n\
             s.close()\n"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stream");
    std::thread::sleep(Duration::from_millis(1200));
    lab.takeover_in(&hv1, Path::new(env!("CARGO_BIN_EXE_vswitch")), "sw");
    lab.assert_handed_over(0, "sw");
    let out = stream.wait_with_output().expect("stream");
    assert!(
        out.status.success(),
        "the TCP stream into the guest broke in the handover: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.log("sw-new")
    );
    console_shows(&console, "GUEST GOT 3000000 BYTES", Duration::from_secs(60));
    let out = pings.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_string();
    let n: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let st = lab.ctl(&ctl, "stats").expect("the new binary answers");
    eprintln!(
        "vhost-user handover: {}; pings: {summary}",
        st["last_handover"]
    );
    assert_blackout_bounded(&st["last_handover"], &st);
    assert!(
        n.len() >= 2 && n[0] - n[1] <= 5,
        "pings to the guest lost in the handover: {summary}\n{}",
        lab.log("sw-new")
    );
    // The new binary knows the port by name (for `apply`, `port-remove`).
    let again = Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .args(["ctl", "--socket"])
        .arg(&ctl)
        .args([
            "port-add",
            "vu0",
            "--type",
            "vhost-user",
            "--mac",
            GUEST_MAC,
        ])
        .args([
            "--socket",
            lab.dir.join("other.sock").to_str().expect("path"),
        ])
        .output()
        .expect("ctl");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && said.contains("already exists"),
        "the handed-over port vu0 is unknown by name: {said}"
    );
    // A new binary that dies after the old one paused (and gave its
    // vhost-user connection out): the old one takes the connection back
    // and the guest goes on.
    let fake = "import os,signal,socket,sys; s=socket.socket(socket.AF_UNIX); \
                s.connect(sys.argv[1]); s.sendall(b'{\"cmd\": \"handover\", \"fastpath_threads\": 2}\\n'); s.recv(100); \
                s.sendall(b'ready\\n'); s.recv(8); os.kill(os.getpid(), signal.SIGKILL)";
    let (_, out) = try_sh(&[
        "timeout",
        "20",
        "python3",
        "-c",
        fake,
        ctl.to_str().expect("path"),
    ]);
    // (The old one notices when the fake's end of the socket closes.)
    let resumed = |text: &str| {
        text.lines()
            .any(|l| l.contains("handover failed; resuming") && l.contains("paused=true"))
    };
    let t = Instant::now();
    while !resumed(&plain(&lab.log("sw-new"))) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = plain(&lab.log("sw-new"));
    assert!(
        resumed(&text),
        "no failed handover after the pause: {out}\n{text}"
    );
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &a, "ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP,
    ]);
    assert!(ok, "the guest after a failed handover:\n{out}\n{text}");

    // Kill QEMU in the middle of a stream: the switch goes on for the
    // other port (the tap VM still reaches its gateway and the switch
    // answers), and counts what could not reach the guest.
    let stream = Command::new("ip")
        .args(["netns", "exec", &a, "python3", "-c"])
        .arg(format!(
            "import socket, time\n\
             s = socket.create_connection(('{GUEST_IP}', 5001), timeout=5)\n\
             t = time.time()\n\
             try:\n    while time.time() - t < 4: s.sendall(b'w' * 65536)\n\
             except OSError: pass\n"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stream");
    std::thread::sleep(Duration::from_millis(800));
    drop(vm);
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &a, "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.0.0.1",
    ]);
    assert!(
        ok,
        "the switch stopped serving the tap port when QEMU died:\n{out}\n{}",
        lab.log("sw-new")
    );
    let _ = stream.wait_with_output();
    let port = vu0_stats(&lab, &ctl);
    assert!(port["rx_packets"].as_u64() > Some(100), "{port}");
    // With QEMU gone, what the tap VM still sends the guest is counted.
    let (_, _) = try_sh(&[
        "ip", "netns", "exec", &a, "ping", "-c", "2", "-i", "0.2", "-W", "1", GUEST_IP,
    ]);
    let port = vu0_stats(&lab, &ctl);
    assert!(port["guest"]["not_ready"].as_u64() > Some(0), "{port}");
    let vu = &lab.ctl(&ctl, "stats").expect("stats")["vhost_user"][0];
    assert!(
        vu["guest_connected"] == false && vu["connections_ended"].as_u64() >= Some(1),
        "the port's status after QEMU died: {vu}"
    );

    // QEMU again (a restarted VM): connectivity comes back.
    let console = lab.dir.join("console-2.txt");
    let _vm = Qemu(qemu(&initrd, &sock, &console, false, 2));
    let text = console_shows(&console, "GUEST PING", Duration::from_secs(120));
    assert!(text.contains("GUEST PING OK"), "after the restart:\n{text}");
    let (ok, out) = try_sh(&[
        "ip", "netns", "exec", &a, "ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP,
    ]);
    assert!(ok, "tap VM → restarted guest:\n{out}");
}

/// Client mode: QEMU listens on the socket and the switch connects; the
/// switch is killed and started again (a crash and a restart, not a
/// handover): it connects again and the running guest is reachable
/// again, without a reboot.
#[test]
fn a_switch_in_client_mode_finds_its_running_guest_again_after_a_restart() {
    let mut lab = Lab::new();
    let (hv1, hv2) = (lab.netns("h1"), lab.netns("h2"));
    let (u1, u2) = lab::wire(&lab, &hv1, "192.168.64.1", &hv2, "192.168.64.2");
    let sock = lab.dir.join("guest.sock");
    // VM b on the other hypervisor, which knows the guest as remote.
    let cfg2 = lab::config(
        &lab,
        "sw2",
        &u2,
        "192.168.64.2",
        ("b", "02:00:00:00:00:0b", REMOTE_IP),
        (GUEST_IP, GUEST_MAC, "192.168.64.1"),
    );
    lab.vswitch_in(Some(&hv2), "sw2", &cfg2);
    let tb = lab.name("tb");
    let b = vm_b(&mut lab, &hv2, &tb);
    let initrd = initramfs(&lab.dir);
    let console = lab.dir.join("console.txt");
    let _vm = Qemu(qemu(&initrd, &sock, &console, true, 1));
    wait_until("QEMU's vhost-user socket", Duration::from_secs(20), || {
        sock.exists()
    });
    let cfg = format!(
        "[switch]\npoll = \"adaptive\"\nflow_capacity = 4096\ncontrol_socket = \"{ctl}\"\n\n\
         [uplink]\ninterface = \"{u1}\"\nvtep = \"192.168.64.1\"\n\n\
         [[port]]\nname = \"vu0\"\ntype = \"vhost-user\"\nsocket = \"{sock}\"\nmode = \"client\"\n\n\
         [[network]]\nvni = 100\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[network.subnet]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\n\
         [[vm]]\nname = \"guest\"\nport = \"vu0\"\nmac = \"{GUEST_MAC}\"\nips = [\"{GUEST_IP}\"]\nnetwork = 100\n\
         [[remote]]\nnetwork = 100\nip = \"{REMOTE_IP}\"\nmac = \"02:00:00:00:00:0b\"\nvtep = \"192.168.64.2\"\n",
        ctl = lab.socket("sw").display(),
        sock = sock.display(),
    );
    lab.vswitch_in(Some(&hv1), "sw", &cfg);
    let text = console_shows(&console, "GUEST REMOTE", Duration::from_secs(120));
    assert!(
        text.contains("GUEST REMOTE OK"),
        "guest → VM on the other hypervisor, the switch connecting to QEMU:\n{text}\n{}",
        lab.log("sw")
    );
    let ping = || {
        try_sh(&[
            "ip", "netns", "exec", &b, "ping", "-c", "1", "-W", "1", GUEST_IP,
        ])
    };
    assert!(ping().0, "remote VM → guest:\n{}", lab.log("sw"));
    let st = lab.ctl(&lab.socket("sw"), "stats").expect("stats");
    let vu = &st["vhost_user"][0];
    assert!(
        vu["guest_connected"] == true && vu["mode"] == "client",
        "the port's status: {vu}"
    );
    // The switch dies (no handover, no goodbye): the guest is cut off.
    let sw = lab.last_child();
    sw.kill().expect("killing the switch");
    let _ = sw.wait();
    assert!(!ping().0, "the guest answered with its switch dead");
    // A new switch process on the same config connects to QEMU again.
    lab.vswitch_in(Some(&hv1), "sw", &cfg);
    wait_until("the guest to answer again", Duration::from_secs(30), || {
        ping().0
    });
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.matches("GUEST ADDR").count() == 1,
        "the guest rebooted:\n{text}"
    );
}
