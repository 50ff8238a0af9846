//! `vswitch upgrade`: start a new binary that takes the running switch
//! over (`take`), and report how it went.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::command::Command;

/// `vswitch upgrade`: start `binary` with `run --takeover --config
/// config`, detached (its own session; stdout/stderr to `log`), and wait
/// until it serves the control socket with a handover report, or fails.
pub fn upgrade(
    binary: &Path,
    config: &Path,
    log: Option<&Path>,
    fastpath_threads: Option<usize>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let cfg = crate::config::Config::load(config)?;
    let sock = cfg.switch.control_socket.clone();
    let log = match log {
        Some(l) => l.to_path_buf(),
        None => config.with_extension("upgrade.log"),
    };
    // `-`: the new binary logs where this command does (under systemd, the
    // journal: `ExecReload`).
    let inherit = log == Path::new("-");
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["run", "--takeover", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null());
    if let Some(n) = fastpath_threads {
        cmd.arg("--fastpath-threads").arg(n.to_string());
    }
    if !inherit {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out);
    }
    // SAFETY: setsid(2) is async-signal-safe and only detaches the child
    // from our session, so it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "the new binary exited ({status}) before taking over; the running switch carries on. Its log:\n{}",
                text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(v) = crate::ctl::request(&sock, &Command::Stats) {
            if v["pid"].as_u64() == Some(u64::from(pid)) && !v["last_handover"].is_null() {
                let h = &v["last_handover"];
                println!(
                    "upgraded to {} (pid {pid}): blackout {:.0} µs, {} flows and {} connections carried, snapshot {} bytes; log {}",
                    binary.display(),
                    h["blackout_us"].as_f64().unwrap_or(0.0),
                    h["flows"],
                    h["connections"],
                    h["snapshot_bytes"],
                    log.display()
                );
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the new binary (pid {pid}) did not take over within 30 s; see {}",
        log.display()
    )
}
