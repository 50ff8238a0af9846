//! The Debian package as an operator meets it (`benches/package` does the
//! work and prints what it found): it builds, lintian finds no error, its
//! systemd unit verifies, an upgrade through its maintainer script hands a
//! running switch over under a ping flood with nothing lost, a broken
//! build's upgrade leaves the running switch forwarding and says so, and
//! the running switch holds only its capabilities with its fast path
//! under a seccomp filter, and what it tells systemd (ready; the new main
//! process after the upgrade) arrives on a notify socket. The script makes its own namespaces and scratch
//! root and removes them, even on failure; every wait in it is bounded.
//!
//! Run serially (`--test-threads=1`, as scripts/test does).

use std::collections::HashMap;
use std::process::Command;

#[test]
fn the_package_builds_verifies_and_upgrades_a_running_switch_live() {
    let out = Command::new("timeout")
        .args([
            "600",
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches/package"),
        ])
        .output()
        .expect("running benches/package");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "benches/package failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let got: HashMap<&str, &str> = last
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let want = [
        ("deb_built", "1"),
        ("lintian_errors", "0"),
        ("unit_verified", "1"),
        ("upgrade_lost", "0"),
        ("upgrade_handed_over", "1"),
        ("failed_upgrade_forwarding", "1"),
        // CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK, CAP_PERFMON, CAP_BPF.
        ("cap_eff", "000000c000007000"),
        ("seccomp", "2"),
        // systemd's notify socket, played: ready once forwarding; the old
        // process names the new one before it exits.
        ("ready_notified", "1"),
        ("mainpid_notified", "1"),
    ];
    for (k, v) in want {
        assert_eq!(got.get(k), Some(&v), "{k} in {last:?}\n{stderr}");
    }
}
