//! Passing open file descriptors between processes over a Unix stream
//! socket (SCM_RIGHTS): how tap devices and the control listener move to
//! the next binary without closing. The receiver gets new descriptors for
//! the same open files; the sender keeps its own until it exits, so a
//! failed handover loses nothing.

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries: the kernel's limit
/// (`SCM_MAX_FD`). A tap port takes one, a vhost-user port with a guest
/// about ten.
pub const MAX_FDS: usize = 253;

/// Send `data` (at least one byte) with `fds` attached.
pub fn send(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd passing needs 1+ bytes of data and at most 64 descriptors",
        ));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap_or(u32::MAX)) } as usize;
    let mut cmsg = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one
        // header carrying `fd_bytes` of data (CMSG_SPACE above), so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for the fds.
        unsafe {
            let h = libc::CMSG_FIRSTHDR(&msg);
            (*h).cmsg_level = libc::SOL_SOCKET;
            (*h).cmsg_type = libc::SCM_RIGHTS;
            (*h).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(u32::MAX)) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(h), fd_bytes);
        }
    }
    // SAFETY: msg points at live buffers (iov over `data`, the control
    // buffer) for the duration of the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(n).unwrap_or(0) != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
    }
    Ok(())
}

/// Receive up to `buf.len()` bytes and the descriptors attached to them.
/// Returns the byte count and the descriptors (owned: closed on drop).
pub fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let space = {
        let b = u32::try_from(MAX_FDS * std::mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(b) as usize }
    };
    let mut cmsg = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: plain data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live, writable buffers of the sizes it states;
    // MSG_CMSG_CLOEXEC keeps received fds out of children we spawn.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // The kernel filled msg_control with msg_controllen bytes of control
    // messages; SCM_RIGHTS data is an array of ints, each a new descriptor.
    // SAFETY: CMSG_* walk only within that length; each fd is ours to own.
    unsafe {
        let mut h = libc::CMSG_FIRSTHDR(&msg);
        while !h.is_null() {
            if (*h).cmsg_level == libc::SOL_SOCKET && (*h).cmsg_type == libc::SCM_RIGHTS {
                let len = (*h).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(h).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            h = libc::CMSG_NXTHDR(&msg, h);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut off (more than 64 sent)",
        ));
    }
    Ok((usize::try_from(n).unwrap_or(0), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn descriptors_arrive_open_and_usable() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = std::fs::File::from(tempfile_fd());
        f.write_all(b"handed over").unwrap();
        send(&a, b"fds", &[f.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"fds");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "handed over", "the same open file");
        // Data without descriptors, and bad calls.
        send(&a, b"x", &[]).unwrap();
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        assert!(send(&a, b"", &[]).is_err());
        assert!(send(&a, b"x", &[0; MAX_FDS + 1]).is_err());
        // As many as the kernel takes in one message.
        send(&a, b"m", &[g.as_raw_fd(); MAX_FDS]).unwrap();
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, MAX_FDS));
    }

    /// An unnamed temporary file.
    fn tempfile_fd() -> OwnedFd {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("fdpass-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.into()
    }
}
