//! A wakeup channel into a sleeping fast-path thread: an eventfd the
//! adaptive poll loop sleeps on alongside its ports. One write per wakeup,
//! never per packet.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

#[derive(Debug)]
pub struct Wake {
    file: File,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns; the
        // File takes ownership and closes it on drop.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Wake { file })
    }

    /// Wake the thread sleeping on this fd (harmless if it is awake).
    pub fn notify(&self) {
        // Only fails if the counter would overflow, i.e. it is already set.
        let _ = (&self.file).write(&1u64.to_ne_bytes());
    }

    /// Consume pending wakeups.
    pub fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.file).read(&mut b);
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sleep until one of `fds` is readable or `timeout_ms` passes.
pub fn wait_readable(fds: &mut [libc::pollfd], timeout_ms: i32) {
    for p in fds.iter_mut() {
        p.revents = 0;
    }
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a live, exclusively borrowed array of `n` pollfd
    // structs, which poll(2) reads and whose `revents` it writes.
    unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_wakes_a_poll() {
        let w = Wake::new().unwrap();
        let mut fds = vec![libc::pollfd {
            fd: w.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        w.notify();
        wait_readable(&mut fds, 1000);
        assert_ne!(fds[0].revents & libc::POLLIN, 0);
        w.drain();
        wait_readable(&mut fds, 0);
        assert_eq!(fds[0].revents & libc::POLLIN, 0);
    }
}
