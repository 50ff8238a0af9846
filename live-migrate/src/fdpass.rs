//! Passing open file descriptors between processes over a Unix stream
//! socket (SCM_RIGHTS): how tap devices and the control listener move to
//! the next binary without closing. The receiver gets new descriptors for
//! the same open files; the sender keeps its own until it exits, so a
//! failed handover loses nothing.
//!
//! One message carries at most [`MAX_FDS`]; [`send_many`] and
//! [`recv_many`] carry any number up to [`MAX_TOTAL_FDS`] (a switch with
//! 300 ports hands over more than a thousand): the descriptors beyond the
//! last message's go first, in messages whose 8 data bytes are [`MORE`],
//! which no length a handover sends can be. A sender of one message is
//! read the same way, so both sides talk with a binary that only knew one.

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries: the kernel's limit
/// (`SCM_MAX_FD`). A tap port takes one, a vhost-user port with a guest
/// about ten.
pub const MAX_FDS: usize = 253;

/// The data of a message that only carries descriptors, more of them
/// following.
pub const MORE: [u8; 8] = [0xff; 8];

/// Most descriptors [`recv_many`] takes in all (a peer cannot make this
/// process hold unbounded descriptors).
pub const MAX_TOTAL_FDS: usize = 16 * 1024;

/// Send `data` (at least one byte) with `fds` attached.
pub fn send(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd passing needs 1+ bytes of data and at most 253 descriptors",
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
    // Negative: failed (errno says why).
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n != data.len() {
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
    // Negative: failed (errno says why).
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
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
            "descriptors were cut off (more than 253 in one message)",
        ));
    }
    Ok((n, fds))
}

/// Send 8 bytes of `data` with any number of `fds` (see the module doc):
/// all but the last [`MAX_FDS`] in messages of their own first.
pub fn send_many(sock: &UnixStream, data: &[u8; 8], fds: &[RawFd]) -> io::Result<()> {
    if data == &MORE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the data is the continuation marker",
        ));
    }
    if fds.len() > MAX_TOTAL_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors, more than {MAX_TOTAL_FDS}", fds.len()),
        ));
    }
    let last = fds.len().saturating_sub(1) / MAX_FDS * MAX_FDS;
    for chunk in fds[..last].chunks(MAX_FDS) {
        send(sock, &MORE, chunk)?;
    }
    send(sock, data, &fds[last..])
}

/// Receive what [`send_many`] (or one [`send`] of 8 bytes) sent: the 8
/// data bytes (fewer only at the end of the stream: the count is
/// returned) and every descriptor, in order.
pub fn recv_many(sock: &UnixStream, data: &mut [u8; 8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut all = Vec::new();
    loop {
        let (mut n, fds) = recv(sock, data)?;
        all.extend(fds);
        if all.len() > MAX_TOTAL_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_TOTAL_FDS} descriptors"),
            ));
        }
        if n > 0 && n < data.len() {
            // The rest of the 8 bytes (a stream may split them).
            std::io::Read::read_exact(&mut &*sock, &mut data[n..])?;
            n = data.len();
        }
        if n == data.len() && *data == MORE {
            continue;
        }
        return Ok((n, all));
    }
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

    #[test]
    fn any_number_of_descriptors_arrives_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        // 400: more than one message takes, and with their copies within
        // the usual limit of 1 024 open files.
        let files: Vec<std::fs::File> = (0..400)
            .map(|_| {
                // SAFETY: memfd_create takes a NUL-terminated name; the
                // result is checked, then owned by the File.
                let fd = unsafe { libc::memfd_create(c"fdpass".as_ptr(), 0) };
                assert!(fd >= 0);
                // SAFETY: a fresh descriptor nothing else owns.
                unsafe { std::fs::File::from_raw_fd(fd) }
            })
            .collect();
        for (i, mut f) in files.iter().enumerate() {
            write!(f, "{i}").unwrap();
        }
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        // The reader runs meanwhile: 400 descriptors may not fit the
        // socket's buffer of in-flight messages at once.
        let reader = std::thread::spawn(move || {
            let mut data = [0u8; 8];
            let (n, fds) = recv_many(&b, &mut data).unwrap();
            (n, data, fds)
        });
        send_many(&a, &42u64.to_le_bytes(), &raw).unwrap();
        let (n, data, fds) = reader.join().unwrap();
        assert_eq!((n, u64::from_le_bytes(data)), (8, 42));
        assert_eq!(fds.len(), 400);
        for (i, fd) in fds.into_iter().enumerate() {
            let mut g = std::fs::File::from(fd);
            g.rewind().unwrap();
            let mut s = String::new();
            g.read_to_string(&mut s).unwrap();
            assert_eq!(s, i.to_string(), "descriptor {i} in its place");
        }
        // One message, as a binary that knew no more sends it, reads the same.
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &7u64.to_le_bytes(), &raw[..3]).unwrap();
        let mut data = [0u8; 8];
        let (n, fds) = recv_many(&b, &mut data).unwrap();
        assert_eq!((n, u64::from_le_bytes(data), fds.len()), (8, 7, 3));
        // A count that ends on a message boundary, and none at all.
        for count in [MAX_FDS, 2 * MAX_FDS, 0] {
            let (a, b) = UnixStream::pair().unwrap();
            let r = std::thread::spawn(move || {
                let mut data = [0u8; 8];
                recv_many(&b, &mut data).unwrap().1.len()
            });
            send_many(&a, &1u64.to_le_bytes(), &raw[..count.min(raw.len())]).unwrap();
            assert_eq!(r.join().unwrap(), count.min(raw.len()));
        }
        assert!(
            send_many(&a, &MORE, &raw[..1]).is_err(),
            "the marker is not data"
        );
    }
}
