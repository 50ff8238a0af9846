//! Running under systemd (`Type=notify`, see `packaging/vswitch.service`):
//! the service is ready once every port is open and the fast path polls;
//! after a live upgrade the new process is the service's main one, which
//! the old one says before it exits, so systemd goes on tracking the switch
//! and never sees it die. Outside systemd (no `NOTIFY_SOCKET`) nothing
//! happens. Logs go to the journal with their fields when systemd
//! connected stderr to it (`JOURNAL_STREAM`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use sd_notify::NotifyState;

/// Tell systemd the switch forwards.
pub fn ready() {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Ready, NotifyState::Status("forwarding")],
    );
}

/// Tell systemd the switch is process `pid` now.
pub fn main_pid(pid: u32) {
    let _ = sd_notify::notify(false, &[NotifyState::MainPid(pid)]);
}

/// The process at the other end of `s`.
pub fn peer_pid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: SO_PEERCRED writes one ucred into `cred`, whose size `len`
    // says; the socket is open for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    u32::try_from(cred.pid).ok().filter(|&p| p > 0)
}

/// Whether stderr is the journal (systemd sets `JOURNAL_STREAM` to its
/// device and inode).
pub fn logs_to_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    want == format!("{}:{}", meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_pid(&a), Some(std::process::id()));
    }
}
