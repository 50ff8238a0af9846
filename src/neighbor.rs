//! The next-hop MAC of each remote VTEP, from the kernel's routing and
//! neighbour tables over rtnetlink — never from the config, so the host's
//! own ARP keeps it right and a change of the peer's MAC is followed.
//!
//! For each VTEP: RTM_GETROUTE says whether it is on-link or behind a
//! gateway; RTM_GETNEIGH (a dump) gives the MAC of that next hop. A next
//! hop the kernel has not resolved is made to resolve with one ICMP echo
//! from the host stack (an ordinary ping of the VTEP or gateway).

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use flowtable::Mac;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tracing::{info, warn};

const NETLINK_ROUTE: libc::c_int = 0;
/// AF_INET (2) as the one-byte family field of netlink messages.
const AF_INET: u8 = 2;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
/// Neighbour states with a usable MAC: reachable, stale, delay, probe,
/// noarp, permanent.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// A netlink route socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterate the rtattrs in `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
        let ty = u16::from_ne_bytes([*b.get(2)?, *b.get(3)?]);
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0),
            )
        };
        Ok(Netlink { fd, seq: 1 })
    }

    /// Send `ty` with `flags` and `body`; collect the reply messages
    /// (type, payload) until DONE, an error, or a non-dump answer.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sends `msg.len()` bytes from a live buffer.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receives at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            // Negative: failed (errno says why).
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let mut b = buf.get(..n).unwrap_or(&[]);
            while b.len() >= 16 {
                let mlen = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let mty = u16::from_ne_bytes([b[4], b[5]]);
                if mlen < 16 || mlen > b.len() {
                    return Ok(out);
                }
                match mty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(out);
                    }
                    _ => out.push((mty, b[16..mlen].to_vec())),
                }
                b = b.get(align4(mlen)..).unwrap_or(&[]);
            }
            if flags & NLM_F_DUMP == 0 {
                return Ok(out);
            }
        }
    }

    /// The IPv4 neighbour table: address → MAC, for usable entries.
    pub fn neighbors(&mut self) -> io::Result<HashMap<Ipv4Addr, Mac>> {
        // struct ndmsg: family, pad, pad, ifindex, state, flags, type.
        let mut ndm = [0u8; 12];
        ndm[0] = AF_INET;
        let mut map = HashMap::new();
        for (ty, p) in self.request(RTM_GETNEIGH, NLM_F_DUMP, &ndm)? {
            if ty != RTM_NEWNEIGH || p.len() < 12 {
                continue;
            }
            let state = u16::from_ne_bytes([p[8], p[9]]);
            if state & NUD_VALID == 0 {
                continue;
            }
            let (mut dst, mut mac) = (None, None);
            for (t, v) in attrs(&p[12..]) {
                match (t, v.len()) {
                    (NDA_DST, 4) => dst = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                    (NDA_LLADDR, 6) => mac = Some([v[0], v[1], v[2], v[3], v[4], v[5]]),
                    _ => {}
                }
            }
            if let (Some(d), Some(m)) = (dst, mac) {
                map.insert(d, m);
            }
        }
        Ok(map)
    }

    /// The next hop towards `dst`: its gateway, or `dst` itself if on-link.
    pub fn next_hop(&mut self, dst: Ipv4Addr) -> io::Result<Ipv4Addr> {
        // struct rtmsg (12 bytes) + RTA_DST.
        let mut body = vec![0u8; 12];
        body[0] = AF_INET;
        body[1] = 32; // dst_len
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&RTA_DST.to_ne_bytes());
        body.extend_from_slice(&dst.octets());
        for (ty, p) in self.request(RTM_GETROUTE, 0, &body)? {
            if ty != RTM_NEWROUTE || p.len() < 12 {
                continue;
            }
            for (t, v) in attrs(&p[12..]) {
                if t == RTA_GATEWAY && v.len() == 4 {
                    return Ok(Ipv4Addr::new(v[0], v[1], v[2], v[3]));
                }
            }
        }
        Ok(dst)
    }
}

/// Make the kernel resolve `ip` by sending it one ICMP echo request.
pub fn provoke_resolution(ip: Ipv4Addr) {
    // SAFETY: plain socket(2); checked below, closed by OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Echo request, id 0x7653 ("vS"), seq 1, checksum precomputed.
    let mut pkt = [8u8, 0, 0, 0, 0x76, 0x53, 0, 1];
    let c = vxlan::checksum::checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::sa_family_t::from(AF_INET),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sends 8 bytes from `pkt` to a live sockaddr_in of its size.
    unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            libc::MSG_DONTWAIT,
            (&sa as *const libc::sockaddr_in).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(0),
        )
    };
}

/// Follow the kernel's next hop and its MAC for every remote VTEP; tell
/// the coprocessors, and have the fast path drop flows through a next hop
/// whose MAC changed.
pub fn follow(
    shared: &coprocessor::SharedLock,
    fast: &crate::fastpaths::FastPaths,
    stop: &AtomicBool,
) {
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            warn!("rtnetlink unavailable, remote VTEPs unreachable: {e}");
            return;
        }
    };
    let mut known: std::collections::HashMap<std::net::Ipv4Addr, flowtable::Mac> =
        Default::default();
    let mut last_provoke = std::time::Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let table = nl.neighbors().unwrap_or_default();
        let mut missing = Vec::new();
        // The VTEPs in use now (remote endpoints change at run time).
        let vteps = coprocessor::read(shared).topo.remote_vteps();
        known.retain(|v, _| vteps.binary_search(v).is_ok());
        for &vtep in &vteps {
            let hop = nl.next_hop(vtep).unwrap_or(vtep);
            let now = table.get(&hop).copied();
            let before = known.get(&vtep).copied();
            if now != before {
                match now {
                    Some(m) => {
                        known.insert(vtep, m);
                        info!(%vtep, next_hop = %hop, mac = %coprocessor::topology::mac_str(&m), "next hop resolved");
                    }
                    None => {
                        known.remove(&vtep);
                        warn!(%vtep, next_hop = %hop, "next hop lost");
                    }
                }
                let mut sh = coprocessor::lock(shared);
                let topo = Arc::make_mut(&mut sh.topo);
                match now {
                    Some(m) => topo.set_neighbor(vtep, m),
                    None => topo.remove_neighbor(vtep),
                }
                drop(sh);
                if let Some(old) = before {
                    fast.tell(|| fastpath::dataplane::Request::InvalidateNextHop(old));
                }
            }
            if now.is_none() {
                missing.push(hop);
            }
        }
        if !missing.is_empty() && last_provoke.elapsed() >= Duration::from_secs(1) {
            missing.iter().for_each(|h| provoke_resolution(*h));
            last_provoke = std::time::Instant::now();
        }
        thread::sleep(Duration::from_millis(if missing.is_empty() {
            500
        } else {
            100
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_parse_and_stop_at_garbage() {
        let mut b = Vec::new();
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&NDA_DST.to_ne_bytes());
        b.extend_from_slice(&[10, 0, 0, 1]);
        b.extend_from_slice(&10u16.to_ne_bytes());
        b.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
        b.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0, 0]);
        b.extend_from_slice(&[0xff, 0xff]); // truncated trailing attribute
        let v: Vec<_> = attrs(&b).collect();
        assert_eq!(
            v,
            vec![
                (NDA_DST, &[10u8, 0, 0, 1][..]),
                (NDA_LLADDR, &[2u8, 0, 0, 0, 0, 9][..])
            ]
        );
    }

    #[test]
    fn the_loopback_route_and_table_are_readable() {
        // Needs no privileges: read-only queries.
        let mut nl = Netlink::open().unwrap();
        assert_eq!(
            nl.next_hop(Ipv4Addr::LOCALHOST).unwrap(),
            Ipv4Addr::LOCALHOST
        );
        nl.neighbors().unwrap();
    }
}
