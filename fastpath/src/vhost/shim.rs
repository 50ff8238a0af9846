//! The pump between the VMM and `vhost`'s request handler: every request
//! passes through here (noted in the connection's [`Record`], so the set-up
//! can be replayed into another handler), and the pumping can stop between
//! two requests without touching the VMM's socket (a live handover).
//!
//! It also mends one incompatibility.
//! QEMU's virtio-net (7.2 and later, seen with 7.2 and 10.0) enables the
//! queues with `VHOST_USER_SET_VRING_ENABLE` when the device is reset —
//! before the guest's driver has negotiated anything, so before
//! `VHOST_USER_SET_FEATURES` acks `VHOST_USER_F_PROTOCOL_FEATURES`. The
//! `vhost` crate's handler refuses any `SET_VRING_ENABLE` until that bit
//! is acked and drops the connection, and QEMU gives up on the device;
//! offering no protocol features instead makes QEMU fail to start the
//! device at all (and it never sends the enable again: virtio-net relies
//! on the early one). So each connection goes through this filter:
//! messages pass unchanged (with their descriptors) in both directions,
//! except a `SET_VRING_ENABLE` that arrives before `SET_FEATURES`: it is
//! answered here (if the VMM asked for an answer), remembered, and passed
//! on right after `SET_FEATURES` — when the handler takes it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::record::{req, Record, HDR, MAX_PAYLOAD, NEED_REPLY, REPLY, VERSION};

/// Most descriptors a request carries (a memory table's).
const MAX_FDS: usize = 32;

/// How a connection's pumping ended.
#[derive(Debug)]
pub enum Pumped {
    /// The VMM hung up (`Ok`), or either side broke the protocol.
    Ended(io::Result<()>),
    /// `stop` became readable: the pumping stopped between two requests,
    /// the handler has answered all it was given, and the VMM's
    /// connection is untouched (to be handed on).
    Detached,
}

/// Pass messages between `vmm` and `backend` (noting in `record` what the
/// handler was told) until either side closes or `stop` (an eventfd)
/// becomes readable.
pub fn pump(vmm: &UnixStream, backend: UnixStream, stop: RawFd, record: &mut Record) -> Pumped {
    let mut run = || -> io::Result<Pumped> {
        let gone = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let gone_w = gone.try_clone()?;
        let (mut to, mut from) = (vmm.try_clone()?, backend.try_clone()?);
        // Replies flow back unchanged (this device sends no descriptors).
        let back = std::thread::Builder::new()
            .name("vhost-shim".into())
            .spawn(move || {
                let _ = io::copy(&mut from, &mut to);
                let _ = gone_w.write(1);
            })?;
        let r = forward_requests(vmm, &backend, [stop, gone.as_raw_fd()], record);
        let detached = matches!(r, Ok(true));
        if detached {
            // The handler finishes what it was given, answers, and ends.
            let _ = backend.shutdown(std::net::Shutdown::Write);
        } else {
            let _ = backend.shutdown(std::net::Shutdown::Both);
            let _ = vmm.shutdown(std::net::Shutdown::Both);
        }
        let _ = back.join();
        r.map(|d| {
            if d {
                Pumped::Detached
            } else {
                Pumped::Ended(Ok(()))
            }
        })
    };
    run().unwrap_or_else(|e| Pumped::Ended(Err(e)))
}

/// Wait until one of `fds` is readable (a negative one is ignored) or
/// `timeout_ms` passes (-1: no limit); which are.
pub(super) fn readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `polled` is a live array of N pollfds.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(polled.map(|p| p.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Forward requests; true if `wake[0]` stopped it, an error if the VMM
/// hung up, `wake[1]` (the handler ended) fired, or a request is bad.
fn forward_requests(
    vmm: &UnixStream,
    backend: &UnixStream,
    wake: [RawFd; 2],
    record: &mut Record,
) -> io::Result<bool> {
    let mut features_set = false;
    // Early SET_VRING_ENABLE payloads (queue index, enable), last per queue.
    let mut early: Vec<[u8; 8]> = Vec::new();
    let mut hdr = [0u8; HDR];
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let [_, stopped, gone] = readable([vmm.as_raw_fd(), wake[0], wake[1]], -1)?;
        if stopped {
            return Ok(true);
        }
        if gone {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the request handler ended the connection",
            ));
        }
        let fds = recv_header(vmm, &mut hdr)?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "vhost-user request {request} with a {size}-byte payload"
            )));
        }
        (&*vmm).read_exact(&mut payload[..size])?;
        if request == req::SET_VRING_ENABLE && !features_set && size == 8 {
            let mut state = [0u8; 8];
            state.copy_from_slice(&payload[..8]);
            early.retain(|e| e[..4] != state[..4]);
            early.push(state);
            if flags & NEED_REPLY != 0 {
                let mut reply = [0u8; HDR + 8];
                reply[..4].copy_from_slice(&request.to_le_bytes());
                reply[4..8].copy_from_slice(&(VERSION | REPLY).to_le_bytes());
                reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                (&*vmm).write_all(&reply)?;
            }
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut msg = Vec::with_capacity(HDR + size);
        msg.extend_from_slice(&hdr);
        msg.extend_from_slice(&payload[..size]);
        if raw.is_empty() {
            (&*backend).write_all(&msg)?;
        } else {
            let n = backend
                .send_with_fds(&[&msg[..]], &raw)
                .map_err(|e| io::Error::other(e.to_string()))?;
            if n != msg.len() {
                (&*backend).write_all(&msg[n..])?;
            }
        }
        record.note(request, &payload[..size], &fds)?;
        if request == req::SET_FEATURES && !features_set {
            features_set = true;
            // The remembered enables, now that the handler takes them (no
            // reply asked: the VMM had its answer).
            for state in early.drain(..) {
                let mut m = [0u8; HDR + 8];
                m[..4].copy_from_slice(&req::SET_VRING_ENABLE.to_le_bytes());
                m[4..8].copy_from_slice(&VERSION.to_le_bytes());
                m[8..12].copy_from_slice(&8u32.to_le_bytes());
                m[12..].copy_from_slice(&state);
                (&*backend).write_all(&m)?;
                record.note(req::SET_VRING_ENABLE, &state, &[])?;
            }
        }
        // `fds` close here: the backend and the record hold their own
        // copies now.
    }
}

/// Read one message header, with the descriptors that came with it.
fn recv_header(s: &UnixStream, hdr: &mut [u8; HDR]) -> io::Result<Vec<OwnedFd>> {
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR,
    }];
    // SAFETY: the iovec points at `hdr`, which is exclusively borrowed and
    // may take any bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    let fds = raw[..nfds]
        .iter()
        // SAFETY: the first `nfds` entries are descriptors the kernel just
        // gave this process; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the VMM hung up",
        ));
    }
    if n < HDR {
        (&*s).read_exact(&mut hdr[n..])?;
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use req::{SET_FEATURES, SET_VRING_ENABLE};

    /// Pump on a thread: (the test's VMM end, the test's handler end, the
    /// stop eventfd, the pump's outcome with its record and VMM side).
    #[allow(clippy::type_complexity)]
    fn start() -> (
        UnixStream,
        UnixStream,
        vmm_sys_util::eventfd::EventFd,
        std::thread::JoinHandle<(Pumped, Record, UnixStream)>,
    ) {
        let (vmm, vmm_side) = UnixStream::pair().unwrap();
        let (backend_side, backend) = UnixStream::pair().unwrap();
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fd = stop.as_raw_fd();
        let t = std::thread::spawn(move || {
            let mut record = Record::default();
            let p = pump(&vmm_side, backend_side, fd, &mut record);
            (p, record, vmm_side)
        });
        (vmm, backend, stop, t)
    }

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn read_msg(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; HDR];
        s.read_exact(&mut h).unwrap();
        let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut p = vec![0u8; w(8) as usize];
        s.read_exact(&mut p).unwrap();
        (w(0), w(4), p)
    }

    #[test]
    fn an_early_ring_enable_is_answered_and_replayed_after_set_features() {
        let (mut vmm, mut backend, _stop, t) = start();
        let enable = |q: u32, on: u32| [q.to_le_bytes(), on.to_le_bytes()].concat();
        // Before SET_FEATURES: held back; the one asking for a reply gets one.
        vmm.write_all(&msg(SET_VRING_ENABLE, VERSION | NEED_REPLY, &enable(0, 1)))
            .unwrap();
        let (r, f, p) = read_msg(&mut vmm);
        assert_eq!((r, f, p), (SET_VRING_ENABLE, VERSION | REPLY, vec![0; 8]));
        vmm.write_all(&msg(SET_VRING_ENABLE, VERSION, &enable(1, 0)))
            .unwrap();
        vmm.write_all(&msg(SET_VRING_ENABLE, VERSION, &enable(1, 1)))
            .unwrap();
        // Other requests pass as they are.
        vmm.write_all(&msg(1, VERSION, &[])).unwrap();
        assert_eq!(read_msg(&mut backend), (1, VERSION, vec![]));
        vmm.write_all(&msg(SET_FEATURES, VERSION, &[7; 8])).unwrap();
        assert_eq!(read_msg(&mut backend), (SET_FEATURES, VERSION, vec![7; 8]));
        // The enables follow, the last per queue.
        assert_eq!(
            read_msg(&mut backend),
            (SET_VRING_ENABLE, VERSION, enable(0, 1))
        );
        assert_eq!(
            read_msg(&mut backend),
            (SET_VRING_ENABLE, VERSION, enable(1, 1))
        );
        // After SET_FEATURES an enable goes straight through.
        vmm.write_all(&msg(SET_VRING_ENABLE, VERSION, &enable(0, 0)))
            .unwrap();
        assert_eq!(
            read_msg(&mut backend),
            (SET_VRING_ENABLE, VERSION, enable(0, 0))
        );
        // Replies flow back.
        backend
            .write_all(&msg(1, VERSION | REPLY, &[9; 8]))
            .unwrap();
        assert_eq!(read_msg(&mut vmm), (1, VERSION | REPLY, vec![9; 8]));
        // An oversize payload ends the connection.
        vmm.write_all(&msg(5, VERSION, &vec![0; MAX_PAYLOAD + 1]))
            .unwrap();
        let (p, _, _) = t.join().unwrap();
        assert!(matches!(p, Pumped::Ended(Err(_))), "{p:?}");
    }

    #[test]
    fn a_detached_connection_stays_open_and_its_requests_are_recorded() {
        let (mut vmm, mut backend, stop, t) = start();
        vmm.write_all(&msg(SET_FEATURES, VERSION, &[3; 8])).unwrap();
        assert_eq!(read_msg(&mut backend), (SET_FEATURES, VERSION, vec![3; 8]));
        stop.write(1).unwrap();
        // The handler's side is closed for writing (the handler ends)...
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(backend);
        let (p, record, mut vmm_side) = t.join().unwrap();
        assert!(matches!(p, Pumped::Detached), "{p:?}");
        // ... the VMM's is not.
        vmm.write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        vmm_side.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still here");
        let m: Vec<_> = record
            .messages()
            .map(|m| (m.request, m.payload.clone()))
            .collect();
        assert_eq!(m, vec![(SET_FEATURES, vec![3; 8])]);
    }

    #[test]
    fn a_handler_that_ends_ends_the_connection() {
        let (mut vmm, backend, _stop, t) = start();
        drop(backend);
        let (p, _, _) = t.join().unwrap();
        assert!(matches!(p, Pumped::Ended(Err(_))), "{p:?}");
        // The VMM sees the end.
        let mut rest = Vec::new();
        vmm.read_to_end(&mut rest).unwrap();
    }
}
