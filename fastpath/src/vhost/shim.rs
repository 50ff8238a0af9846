//! A filter between the VMM and `vhost`'s request handler.
//!
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

const HDR: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, a reply, the sender wants a reply.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Largest payload a request carries (a memory table of 8 regions is
/// 8 + 8 × 32 bytes; config space up to 256).
const MAX_PAYLOAD: usize = 4096;
/// Most descriptors a request carries (a memory table's).
const MAX_FDS: usize = 32;

/// Pass messages between `vmm` and `backend` until either side closes.
pub fn pump(vmm: UnixStream, backend: UnixStream) -> io::Result<()> {
    let (vmm2, backend2) = (vmm.try_clone()?, backend.try_clone()?);
    // Replies flow back unchanged (this device sends no descriptors).
    let back = std::thread::Builder::new()
        .name("vhost-shim".into())
        .spawn(move || {
            let (mut from, mut to) = (backend2, vmm2);
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
        })?;
    let r = forward_requests(&vmm, &backend);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = vmm.shutdown(std::net::Shutdown::Both);
    let _ = back.join();
    r
}

fn forward_requests(vmm: &UnixStream, backend: &UnixStream) -> io::Result<()> {
    let mut features_set = false;
    // Early SET_VRING_ENABLE payloads (queue index, enable), last per queue.
    let mut early: Vec<[u8; 8]> = Vec::new();
    let mut hdr = [0u8; HDR];
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let fds = recv_header(vmm, &mut hdr)?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "vhost-user request {request} with a {size}-byte payload"
            )));
        }
        (&*vmm).read_exact(&mut payload[..size])?;
        if request == SET_VRING_ENABLE && !features_set && size == 8 {
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
        if request == SET_FEATURES && !features_set {
            features_set = true;
            // The remembered enables, now that the handler takes them (no
            // reply asked: the VMM had its answer).
            for state in early.drain(..) {
                let mut m = [0u8; HDR + 8];
                m[..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                m[4..8].copy_from_slice(&VERSION.to_le_bytes());
                m[8..12].copy_from_slice(&8u32.to_le_bytes());
                m[12..].copy_from_slice(&state);
                (&*backend).write_all(&m)?;
            }
        }
        // `fds` close here: the backend holds its own copies now.
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
        let (mut vmm, vmm_side) = UnixStream::pair().unwrap();
        let (backend_side, mut backend) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || pump(vmm_side, backend_side));
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
        assert!(t.join().unwrap().is_err());
    }
}
