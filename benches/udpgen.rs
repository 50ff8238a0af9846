//! UDP load generator for the end-to-end benchmarks:
//! `udpgen DST_IP SECONDS FLOWS [PPS [SOCKETS]]`, or
//! `udpgen --raw IFACE SRC_MAC DST_MAC SRC_IP DST_IP SECONDS FLOWS PPS [SPORTS]`.
//!
//! Sends 64-byte frames (18-byte UDP payload) with sendmmsg in batches of
//! up to 64, spreading them over FLOWS destination ports (one flow each),
//! and prints `sent=<n> lag=<n>`. With SOCKETS > 1 it sends from that many
//! sockets (source ports), one per batch in turn, so up to about
//! FLOWS × SOCKETS distinct 5-tuples: a miss storm that does not run out
//! of new flows. PPS 0 is unpaced. Socket i sends from port 40000 + i, so
//! a warm-up run and the measured runs after it are the same flows.
//!
//! `--raw` writes prebuilt 64-byte Ethernet/IPv4/UDP frames (FLOWS
//! destination ports from 10 000, from SPORTS source ports from 40 000,
//! default 1: FLOWS × SPORTS distinct flows) straight into the
//! device IFACE (AF_PACKET, qdisc bypassed, `rawsend.rs`): no route,
//! neighbour or socket work on the sending side, so one generator core
//! offers more than the paths under test forward.
//!
//! Without PPS it sends as fast as the sending stack allows (closed loop:
//! the offered load then depends on the path under test). With PPS it is
//! paced: a batch leaves only when the clock says that many frames are
//! due, so every path is offered the same load. `lag` is how many due
//! frames the generator itself could not send by the end (it fell
//! behind); a benchmark must not count a generator that lagged as the
//! switch's loss.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;

#[path = "pace.rs"]
mod pace;
#[path = "rawsend.rs"]
mod rawsend;

const B: usize = 64;

/// `--raw IFACE SRC_MAC DST_MAC SRC_IP DST_IP SECONDS FLOWS PPS [SPORTS]`
fn raw_mode(a: &[String]) {
    let usage =
        "usage: udpgen --raw IFACE SRC_MAC DST_MAC SRC_IP DST_IP SECONDS FLOWS PPS [SPORTS]";
    let mac = |s: &String| -> [u8; 6] {
        let v: Vec<u8> = s
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).expect(usage))
            .collect();
        v.try_into().expect(usage)
    };
    let iface = a.get(2).expect(usage);
    let (src_mac, dst_mac) = (mac(a.get(3).expect(usage)), mac(a.get(4).expect(usage)));
    let src_ip: Ipv4Addr = a.get(5).and_then(|s| s.parse().ok()).expect(usage);
    let dst_ip: Ipv4Addr = a.get(6).and_then(|s| s.parse().ok()).expect(usage);
    let secs: f64 = a.get(7).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = a.get(8).and_then(|s| s.parse().ok()).expect(usage);
    let pps: f64 = a.get(9).and_then(|s| s.parse().ok()).expect(usage);
    let sports: u16 = a.get(10).map_or(1, |s| s.parse().expect(usage));
    // Destination ports vary fastest: consecutive frames are new flows.
    let frames: Vec<Vec<u8>> = (0..sports.clamp(1, 1000))
        .flat_map(|sp| (0..flows.max(1)).map(move |dp| (40_000 + sp, 10_000u16.wrapping_add(dp))))
        .map(|(src_port, dst_port)| {
            let flow = fastpath::synth::UdpFlow {
                src_mac,
                dst_mac,
                src_ip,
                dst_ip,
                src_port,
                dst_port,
            };
            fastpath::synth::udp_frame(&flow, 64)
        })
        .collect();
    let sock = rawsend::RawSocket::open(iface);
    let mut pacer = pace::Pacer::new(secs, Some(pps));
    let sent = sock.send_paced(&frames, &mut pacer);
    println!("sent={sent} lag={}", pacer.lag(sent));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--raw") {
        return raw_mode(&args);
    }
    let usage = "usage: udpgen DST_IP SECONDS FLOWS [PPS [SOCKETS]]";
    let dst: Ipv4Addr = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let flows: u16 = args.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let pps: Option<f64> = args
        .get(4)
        .map(|s| s.parse::<f64>().expect(usage))
        .filter(|&r| r > 0.0);
    let nsocks: usize = args.get(5).map_or(1, |s| s.parse().expect(usage));
    let socks: Vec<UdpSocket> = (0..nsocks.clamp(1, 1000))
        .map(|i| {
            let port = 40_000 + u16::try_from(i).expect("at most 1000 sockets");
            UdpSocket::bind(("0.0.0.0", port)).expect("bind")
        })
        .collect();
    let mut turn = 0usize;
    let payload = [0x5au8; 18];
    let mut addrs: Vec<libc::sockaddr_in> = (0..flows.max(1))
        .map(|i| libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
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
    let namelen = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>())
        .expect("sockaddr_in fits");
    let mut pacer = pace::Pacer::new(secs, pps);
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut msgs: Vec<libc::mmsghdr> = (0..B)
        // SAFETY: mmsghdr is a C struct of integers and raw pointers, for
        // which all-zero is a valid (empty) value.
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    while !pacer.done() {
        let n = pacer.due(sent, B);
        if n == 0 {
            continue;
        }
        for m in msgs.iter_mut().take(n) {
            m.msg_hdr.msg_name = (&mut addrs[next] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = namelen;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            next = (next + 1) % addrs.len();
        }
        let count = libc::c_uint::try_from(n).expect("at most 64");
        let fd = socks[turn].as_raw_fd();
        turn = (turn + 1) % socks.len();
        // SAFETY: `msgs` holds B ≥ n headers whose name and iovec pointers
        // refer to `addrs` and `iov`, alive and unchanged during the call.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), count, 0) };
        if let Ok(r) = u64::try_from(r) {
            sent += r;
        }
        pacer.sent();
    }
    println!("sent={sent} lag={}", pacer.lag(sent));
}
