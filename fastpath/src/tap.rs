//! Tap VM ports: a tap device opened through /dev/net/tun.
//!
//! The kernel side of the device is the VM's NIC (in tests it is moved into
//! a network namespace whose stack plays the guest); vswitch holds the
//! file descriptor, the wire side. The fd is non-blocking and the device is
//! opened multi-queue, so each fast-path thread can hold its own queue.
//! A tap costs one `read` or `write` per frame by the kernel's design; the
//! poll loop drains up to a batch per visit.
//!
//! Offloads: the device is opened with `IFF_VNET_HDR` and told
//! (`TUNSETOFFLOAD`) that this side takes partial checksums and TCP (and,
//! where the kernel has it, UDP) segmentation, so the guest's stack hands
//! over 64 KiB super-frames with a virtio-net header before each — one
//! syscall per super-frame instead of per 1,500 bytes — and takes them
//! back the same way. A queue opened by an older binary without the
//! header (a live upgrade) keeps working without offloads.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::offload::VNET_HDR_LEN;

/// `TUNSETIFF` from <linux/if_tun.h>: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

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
    /// Frames carry a virtio-net header (offloads on).
    vnet: bool,
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
            flags: IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR,
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
        let mut tap = Tap {
            file,
            name: name.into(),
            vnet: false,
        };
        tap.vnet = tap.enable_offloads().is_ok();
        Ok(tap)
    }

    /// The kernel's flags for this queue's device (`TUNGETIFF`).
    fn flags(&self) -> io::Result<libc::c_short> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` to the pointer; `req`
        // is one, alive and exclusively borrowed for the call.
        let r = unsafe { libc::ioctl(self.fd(), TUNGETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(req.flags)
    }

    /// Header size 12 (`virtio_net_hdr_v1`) and the offloads this side
    /// takes; UDP segmentation only where the kernel has it (6.2+).
    /// An error if the device was not opened with `IFF_VNET_HDR`.
    fn enable_offloads(&mut self) -> io::Result<()> {
        if self.flags()? & IFF_VNET_HDR == 0 {
            return Err(io::Error::other("no virtio-net header on this queue"));
        }
        let sz = libc::c_int::try_from(VNET_HDR_LEN).map_err(io::Error::other)?;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer, which
        // points at `sz`, alive for the call.
        if unsafe { libc::ioctl(self.fd(), TUNSETVNETHDRSZ, &sz as *const libc::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        for f in [tcp | TUN_F_USO4 | TUN_F_USO6, tcp] {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, libc::c_ulong::from(f)) } == 0 {
                return Ok(());
            }
        }
        Err(io::Error::last_os_error())
    }

    /// Frames carry a virtio-net header: offloads are on.
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    /// A tap whose queue another process opened and passed on (live
    /// handover): `fd` is an open, non-blocking /dev/net/tun queue
    /// attached to `name`.
    /// Offloads stay as the queue was opened: a queue without the header
    /// (from a binary before offloads) goes on without them; one with it
    /// keeps the header size and offloads the device was given (they are
    /// the device's), so only its flags are asked — one call per tap in
    /// the handover's blackout.
    pub fn from_fd(fd: std::os::fd::OwnedFd, name: &str) -> Tap {
        let mut tap = Tap {
            file: File::from(fd),
            name: name.into(),
            vnet: false,
        };
        tap.vnet = tap.flags().is_ok_and(|f| f & IFF_VNET_HDR != 0);
        tap
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

    /// Read one frame with its virtio-net header (offloads on) into `hdr`,
    /// then `head`, then `tail` (one `readv`: a super-frame longer than
    /// `head` goes on in `tail`); the frame's length without the header,
    /// `Ok(None)` when nothing is waiting.
    #[inline]
    pub fn recv_vnet(
        &mut self,
        hdr: &mut [u8; VNET_HDR_LEN],
        head: &mut [u8],
        tail: &mut [u8],
    ) -> io::Result<Option<usize>> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: tail.as_mut_ptr().cast(),
                iov_len: tail.len(),
            },
        ];
        // SAFETY: three iovecs over buffers exclusively borrowed for the
        // call; the kernel writes at most each one's length into it.
        let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), 3) };
        match usize::try_from(n) {
            Ok(n) if n >= VNET_HDR_LEN => Ok(Some(n - VNET_HDR_LEN)),
            Ok(_) => Err(io::Error::other("tap read shorter than its header")),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Write one frame after its virtio-net header (one `writev`); as
    /// [`Tap::send`].
    #[inline]
    pub fn send_vnet(&mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<bool> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: two iovecs over live buffers; writev only reads them.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), 2) };
        if n >= 0 {
            return Ok(true);
        }
        Self::send_error(io::Error::last_os_error())
    }

    fn send_error(e: io::Error) -> io::Result<bool> {
        match e {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // EIO: the interface is down (e.g. not configured yet in the guest).
            e if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            e => Err(e),
        }
    }

    /// Write one frame (with its header in front, on a queue that has
    /// one); `Ok(false)` if the device cannot take it now (its queue is
    /// full, or the guest side is down).
    #[inline]
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self.file.write(frame) {
            // A tap takes a frame whole or not at all.
            Ok(n) => Ok(n == frame.len()),
            Err(e) => Self::send_error(e),
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
