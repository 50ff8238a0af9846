//! A wakeup channel into a sleeping fast-path thread: an eventfd the
//! adaptive poll loop sleeps on alongside its ports. Written only while
//! the thread sleeps (it says so first, then looks for work once more), so
//! a busy thread costs its producers no system call at all.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};

#[derive(Debug)]
pub struct Wake {
    file: File,
    sleeping: AtomicBool,
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
        Ok(Wake {
            file,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wake the thread if it sleeps (or is about to): call after making
    /// the work visible (queue push, channel send).
    pub fn notify(&self) {
        // Pairs with the fence in `going_to_sleep`: either this sees the
        // flag, or the sleeper's last look sees the work.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            // Only fails if the counter would overflow, i.e. it is
            // already set.
            let _ = (&self.file).write(&1u64.to_ne_bytes());
        }
    }

    /// The thread is about to sleep: after this, look for work once more
    /// before sleeping, and call [`Wake::awake`] after.
    pub fn going_to_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The thread is awake again (producers stop writing).
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
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
    fn notify_wakes_a_poll_only_of_a_sleeper() {
        let w = Wake::new().unwrap();
        let mut fds = vec![libc::pollfd {
            fd: w.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // Awake: no write, nothing to read.
        w.notify();
        wait_readable(&mut fds, 0);
        assert_eq!(fds[0].revents & libc::POLLIN, 0);
        w.going_to_sleep();
        w.notify();
        wait_readable(&mut fds, 1000);
        assert_ne!(fds[0].revents & libc::POLLIN, 0);
        w.drain();
        wait_readable(&mut fds, 0);
        assert_eq!(fds[0].revents & libc::POLLIN, 0);
    }
}
