//! UDP load generator for benches/e2e: `udpgen DST_IP SECONDS FLOWS`.
//! Sends 64-byte frames (18-byte UDP payload) with sendmmsg in batches of
//! 64, spreading them over FLOWS destination ports (one flow each), as
//! fast as the sending stack allows, and prints `sent=<n>`.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: udpgen DST_IP SECONDS FLOWS";
    let dst: Ipv4Addr = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = args.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let fd = sock.as_raw_fd();
    const B: usize = 64;
    let payload = [0x5au8; 18];
    let mut addrs: Vec<libc::sockaddr_in> = (0..flows)
        .map(|i| libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
            sin_port: (10_000 + i).to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut msgs: Vec<libc::mmsghdr> = (0..B)
        // SAFETY: mmsghdr is a C struct of integers and raw pointers, for
        // which all-zero is a valid (empty) value.
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    while Instant::now() < deadline {
        for m in msgs.iter_mut() {
            m.msg_hdr.msg_name = (&mut addrs[next] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen =
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16);
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            next = (next + 1) % addrs.len();
        }
        // SAFETY: `msgs` holds B headers whose name and iovec pointers refer
        // to `addrs` and `iov`, alive and unchanged during the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), 64, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    println!("sent={sent}");
}
