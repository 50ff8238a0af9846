//! Raw frames into a device, paced, for the benchmark generators: an
//! AF_PACKET socket bound to the device with the qdisc bypassed, prebuilt
//! frames sent 64 per sendmmsg. Cheaper per frame than a UDP socket (no
//! route, neighbour or socket accounting on the sending side), so the
//! generator's core offers more than the paths under test forward.
//! Included with `#[path]` beside `pace.rs`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::pace::Pacer;

/// An AF_PACKET socket bound to one device.
pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    pub fn open(iface: &str) -> RawSocket {
        let name = std::ffi::CString::new(iface).expect("interface name");
        // SAFETY: `name` is a NUL-terminated string alive for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex != 0, "no interface {iface}");
        let all = u16::try_from(libc::ETH_P_ALL)
            .expect("ETH_P_ALL fits")
            .to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before filling.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
        sll.sll_protocol = all;
        sll.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits");
        let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("fits");
        // SAFETY: `sll` is a valid sockaddr_ll of `len` bytes.
        let r = unsafe { libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), len) };
        assert!(
            r == 0,
            "bind to {iface}: {}",
            std::io::Error::last_os_error()
        );
        let one: libc::c_int = 1;
        // SAFETY: the option value is a c_int of the size given.
        let r = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        assert!(
            r == 0,
            "PACKET_QDISC_BYPASS: {}",
            std::io::Error::last_os_error()
        );
        RawSocket { fd }
    }

    /// Send `frames` round robin, paced by `pacer`, until it is done;
    /// returns the frames offered. A frame the device refuses (its queue
    /// full: the path is behind) was offered all the same and is lost.
    pub fn send_paced(&self, frames: &[Vec<u8>], pacer: &mut Pacer) -> u64 {
        const B: usize = 64;
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..B)
            // SAFETY: mmsghdr is a C struct of integers and raw pointers,
            // for which all-zero is a valid (empty) value.
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let (mut sent, mut next) = (0u64, 0usize);
        while !pacer.done() {
            let n = pacer.due(sent, B);
            if n == 0 {
                continue;
            }
            for m in msgs.iter_mut().take(n) {
                m.msg_hdr.msg_iov = &mut iovs[next];
                m.msg_hdr.msg_iovlen = 1;
                next = (next + 1) % iovs.len();
            }
            let count = libc::c_uint::try_from(n).expect("at most 64");
            // SAFETY: `msgs` holds B ≥ n headers whose iovecs point into
            // `frames`, alive and unchanged during the call.
            let _ = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), count, 0) };
            sent += n as u64;
            pacer.sent();
        }
        sent
    }
}
