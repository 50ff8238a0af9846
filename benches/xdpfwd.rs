//! The I/O ceiling for benches/e2e: a bare forwarder between a tap port
//! and an AF_XDP uplink that does no lookup at all. Frames from the tap get
//! one fixed VXLAN header (no classification, no flow table, no actions);
//! VXLAN from the uplink loses its outer 50 bytes and goes to the tap. It
//! uses vswitch's own tap, AF_XDP socket, frame pool and XDP program, so
//! the gap between it and vswitch is the cost of switching, not of I/O.
//!
//! `xdpfwd TAP UPLINK LOCAL_VTEP REMOTE_VTEP NEXT_HOP_MAC` (runs until killed)

use std::net::Ipv4Addr;

use fastpath::tap::Tap;
use fastpath::umem::FramePool;
use fastpath::wake::wait_readable;
use fastpath::xdp::XdpProgram;
use fastpath::xsk::{ifindex, XskConfig, XskSocket};
use fastpath::{Desc, FrameMem, BATCH};

fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    v.try_into().expect("MAC of 6 bytes")
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(
        a.len() == 6,
        "usage: xdpfwd TAP UPLINK LOCAL_VTEP REMOTE_VTEP NEXT_HOP_MAC"
    );
    let local: Ipv4Addr = a[3].parse().expect("LOCAL_VTEP");
    let remote: Ipv4Addr = a[4].parse().expect("REMOTE_VTEP");
    let own_mac = mac(
        std::fs::read_to_string(format!("/sys/class/net/{}/address", a[2]))
            .expect("uplink MAC")
            .trim(),
    );
    let mut tap = Tap::open(&a[1]).expect("tap");
    let mut pool = FramePool::new(8192, 2048, true).expect("pool");
    let mut xsk = XskSocket::open(
        ifindex(&a[2]).expect("uplink"),
        0,
        &pool,
        XskConfig::default(),
    )
    .expect("AF_XDP socket");
    let mut prog = XdpProgram::attach(&a[2], local, vxlan::UDP_PORT).expect("XDP");
    prog.register_socket(0, xsk.fd()).expect("XSKMAP");
    let t = vxlan::Template::new(&vxlan::TemplateSpec {
        src_mac: own_mac,
        dst_mac: mac(&a[5]),
        local_vtep: local,
        remote_vtep: remote,
        vni: 100,
        ttl: 64,
    })
    .expect("template");
    let mut fds = vec![
        libc::pollfd {
            fd: tap.fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: xsk.fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut out: Vec<Desc> = Vec::with_capacity(BATCH);
    let mut rx: Vec<Desc> = Vec::with_capacity(BATCH);
    let mut idle = 0u32;
    eprintln!("xdpfwd ready");
    loop {
        let mut work = 0;
        xsk.complete(&mut pool);
        xsk.refill(&mut pool, 4 * BATCH, usize::MAX);
        // tap → uplink
        out.clear();
        for _ in 0..BATCH {
            let Some(c) = pool.alloc() else { break };
            let at = c + 256;
            let Some((chunk, off)) = pool.chunk_mut(at) else {
                break;
            };
            match tap.recv(&mut chunk[off..]) {
                Ok(Some(n)) => {
                    if let Ok(s) =
                        vxlan::encap(chunk, off, n, t.bytes(), u64::from(chunk[off + 37]))
                    {
                        out.push(Desc::new(
                            c + s as u64,
                            u32::try_from(n + vxlan::OUTER_LEN).unwrap_or(0),
                        ));
                    } else {
                        pool.release(c);
                    }
                }
                _ => {
                    pool.release(c);
                    break;
                }
            }
        }
        work += out.len();
        let sent = xsk.send(&out);
        out[sent..].iter().for_each(|d| pool.release(d.addr));
        // uplink → tap
        rx.clear();
        xsk.recv(BATCH, |pieces, _| match pieces {
            [d] => rx.push(*d),
            _ => pieces.iter().for_each(|p| pool.release(p.addr)),
        });
        work += rx.len();
        for d in rx.drain(..) {
            if let Some((chunk, off)) = pool.chunk_mut(d.addr) {
                let end = off + d.len as usize;
                if let Some(inner) = chunk.get(off + vxlan::OUTER_LEN..end) {
                    let _ = tap.send(inner);
                }
            }
            pool.release(d.addr);
        }
        if work == 0 {
            idle += 1;
            if idle > 200 {
                wait_readable(&mut fds, 10);
                idle = 0;
            }
        } else {
            idle = 0;
        }
    }
}
