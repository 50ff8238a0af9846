//! Tap VM ports: a tap device opened through /dev/net/tun.
//!
//! The kernel side of the device is the VM's NIC (in tests it is moved into
//! a network namespace whose stack plays the guest); vswitch holds the
//! file descriptor, the wire side. The fd is non-blocking and the device is
//! opened multi-queue, so each fast-path thread can hold its own queue.
//! A tap costs one `read` or `write` per frame by the kernel's design; the
//! poll loop drains up to a batch per visit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF` from <linux/if_tun.h>: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1 to 15 bytes without '/' or whitespace")]
    BadName(String),
    #[error("opening /dev/net/tun: {0}")]
    Open(io::Error),
    #[error("attaching tap {name}: {err}")]
    Attach { name: String, err: io::Error },
}

impl Tap {
    /// Create the tap device `name`, or attach a new queue to an existing
    /// one, in the caller's network namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= libc::IFNAMSIZ
            || name.contains(['/', ' ', '\t', '\n'])
        {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads a `struct ifreq` (name + flags, 40 bytes
        // with padding) from the pointer; `req` is such a struct, alive and
        // exclusively borrowed for the duration of the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// A tap whose queue another process opened and passed on (live
    /// handover): `fd` is an open, non-blocking /dev/net/tun queue
    /// attached to `name`.
    pub fn from_fd(fd: std::os::fd::OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Read one frame into `buf`; `Ok(None)` when nothing is waiting.
    #[inline]
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write one frame; `Ok(false)` if the device cannot take it now (its
    /// queue is full, or the guest side is down).
    #[inline]
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self.file.write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // EIO: the interface is down (e.g. not configured yet in the guest).
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "has space", "0123456789abcdef"] {
            assert!(matches!(Tap::open(n), Err(TapError::BadName(_))), "{n:?}");
        }
    }
}
