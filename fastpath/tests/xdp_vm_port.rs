//! The XDP program of af-xdp VM ports (`redirect_all`) on a real veth:
//! a frame on a queue with no AF_XDP socket bound is dropped, never handed
//! to the host's own stack (a container's traffic must not reach the host
//! before the switch binds, or on a queue the switch does not serve).
//! Needs root (as CI has); without it the test fails saying so.

use std::os::fd::AsRawFd;
use std::process::Command;

use fastpath::xdp::XdpProgram;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Does the host's end (10.99.0.1) answer a ping from namespace `vm`?
fn ping_host(vm: &str) -> bool {
    sh(&[
        "ip",
        "netns",
        "exec",
        vm,
        "ping",
        "-c",
        "2",
        "-W",
        "1",
        "10.99.0.1",
    ])
}

/// Both namespaces go, also when the test fails.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            sh(&["ip", "netns", "del", n]);
        }
    }
}

#[test]
fn a_vm_port_frame_without_a_socket_is_dropped_not_passed_to_the_host() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root (network namespaces, veth, XDP); CI runs it as root"
    );
    let id = std::process::id();
    let (host, vm) = (format!("vsxh{id}"), format!("vsxv{id}"));
    let _guard = Netns(vec![host.clone(), vm.clone()]);
    let (hv, vv) = (format!("xh{id}"), format!("xv{id}"));
    for n in [&host, &vm] {
        assert!(sh(&["ip", "netns", "add", n]));
    }
    assert!(sh(&[
        "ip", "-n", &host, "link", "add", &hv, "type", "veth", "peer", "name", &vv, "netns", &vm
    ]));
    assert!(sh(&[
        "ip",
        "-n",
        &host,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        &hv
    ]));
    assert!(sh(&[
        "ip",
        "-n",
        &vm,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        &vv
    ]));
    assert!(sh(&["ip", "-n", &host, "link", "set", &hv, "up"]));
    assert!(sh(&["ip", "-n", &vm, "link", "set", &vv, "up"]));
    let ping = || ping_host(&vm);
    assert!(ping(), "without the program the host's stack answers");
    // The program goes on the host's end, from a thread inside its namespace.
    let (hv2, host2, vm2) = (hv.clone(), host.clone(), vm.clone());
    let answered = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{host2}")).expect("netns");
        // SAFETY: setns moves only this thread into the namespace `ns` is
        // an open descriptor of.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let prog = XdpProgram::attach_all(&hv2).expect("attaching redirect_all");
        let answered = ping_host(&vm2);
        drop(prog);
        answered
    })
    .join()
    .expect("the XDP thread");
    assert!(
        !answered,
        "frames with no socket to go to reached the host's stack"
    );
    assert!(ping(), "detached, the host answers again");
}
