//! Header rewrites beyond MACs and TTL: NAT and the TCP control-flag test
//! of tracked connections. Offsets come from the frame's own IHL; every
//! access is bounds-checked, so a lying header is a drop, not a panic.

use flowtable::{FlowKey, KeyFlags, Nat, NatSide};
use vxlan::checksum::update;

use crate::drop::DropReason;
use crate::packet::{be16 as get16, ipv4, l4, put_be16 as put16, Ipv4};
use crate::packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// TCP flags that change a connection's state.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The TCP flags byte of the segment whose IPv4 header is at `ip`; `None`
/// if the TCP header is cut short.
#[inline]
pub fn tcp_flags(b: &[u8], ip: usize) -> Option<u8> {
    Ipv4::new(b, ip).tcp_flags()
}

/// A TCP segment that changes its connection's state: SYN, FIN or RST
/// (or one too short to say, which is the coprocessor's to judge).
pub fn tcp_event(b: &[u8], ip: usize) -> bool {
    tcp_flags(b, ip).is_none_or(|f| f & (TCP_SYN | TCP_FIN | TCP_RST) != 0)
}

/// Where a protocol keeps its checksum and whether the pseudo-header
/// (addresses) is covered.
fn l4_checksum(proto: u8) -> Option<(usize, bool)> {
    match proto {
        IPPROTO_TCP => Some((l4::TCP_CSUM, true)),
        IPPROTO_UDP => Some((l4::UDP_CSUM, true)),
        IPPROTO_ICMP => Some((l4::ICMP_CSUM, false)),
        _ => None,
    }
}

/// Apply `nat` to the IPv4 packet at `ip` of a frame keyed `key`.
/// `partial`: the L4 checksum is still to be completed by whoever sends
/// the frame on (offloads): its field holds the sum of the pseudo-header,
/// so only the address change is folded into it, uncomplemented (the
/// ports are summed with the data when it is completed).
pub fn nat(
    b: &mut [u8],
    ip: usize,
    key: &FlowKey,
    nat: &Nat,
    partial: bool,
) -> Result<(), DropReason> {
    // Only the first fragment has ports: the coprocessor never NATs
    // fragments, and a frame that claims otherwise is not rewritten.
    if key.flags & KeyFlags::FRAGMENT != 0 {
        return Err(DropReason::NatFragment);
    }
    apply_nat(b, ip, key.proto, nat, partial).ok_or(DropReason::NatTooShort)
}

fn apply_nat(b: &mut [u8], ip: usize, proto: u8, nat: &Nat, partial: bool) -> Option<()> {
    let l4 = Ipv4::new(&*b, ip).l4()?;
    let addr_at = ip
        + if nat.side == NatSide::Src {
            ipv4::SRC
        } else {
            ipv4::DST
        };
    let old_hi = get16(b, addr_at)?;
    let old_lo = get16(b, addr_at + 2)?;
    let new = nat.ip.to_be_bytes();
    let (new_hi, new_lo) = (
        u16::from_be_bytes([new[0], new[1]]),
        u16::from_be_bytes([new[2], new[3]]),
    );
    let port_at = l4
        + match (proto, nat.side) {
            (IPPROTO_ICMP, _) => l4::ICMP_ECHO_ID,
            (_, NatSide::Src) => l4::SRC_PORT,
            (_, NatSide::Dst) => l4::DST_PORT,
        };
    let port = match nat.port {
        Some(p) => Some((get16(b, port_at)?, p)),
        None => None,
    };
    // L4 checksum first (reads before any write, so a short packet is
    // left untouched).
    if let (Some((at, true)), true) = (l4_checksum(proto), partial) {
        // RFC 1624 on the uncomplemented sum: complement, update, back.
        let c = !get16(b, l4 + at)?;
        put16(
            b,
            l4 + at,
            !update(update(c, old_hi, new_hi), old_lo, new_lo),
        )?;
    } else if let Some((at, pseudo)) = l4_checksum(proto) {
        let mut c = get16(b, l4 + at)?;
        let udp_none = proto == IPPROTO_UDP && c == 0;
        if !udp_none {
            if pseudo {
                c = update(update(c, old_hi, new_hi), old_lo, new_lo);
            }
            if let Some((old, new)) = port {
                c = update(c, old, new);
            }
            if proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            put16(b, l4 + at, c)?;
        }
    }
    if let Some((_, p)) = port {
        put16(b, port_at, p)?;
    }
    let hc = get16(b, ip + ipv4::CSUM)?;
    put16(
        b,
        ip + ipv4::CSUM,
        update(update(hc, old_hi, new_hi), old_lo, new_lo),
    )?;
    b.get_mut(addr_at..addr_at + 4)?.copy_from_slice(&new);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vxlan::checksum::{checksum, sum};

    /// A TCP or UDP packet (IPv4 at 14) with correct checksums.
    fn packet(proto: u8, payload: &[u8]) -> Vec<u8> {
        let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 };
        let tot = 20 + l4_len + payload.len();
        let mut f = vec![0u8; 14 + tot];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&u16::try_from(tot).unwrap().to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 0, 0, 5]);
        ip[16..20].copy_from_slice(&[198, 51, 100, 7]);
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        if proto == IPPROTO_TCP {
            f[46] = 0x50;
            f[47] = TCP_SYN;
        } else {
            f[38..40]
                .copy_from_slice(&u16::try_from(l4_len + payload.len()).unwrap().to_be_bytes());
        }
        f[34 + l4_len..].copy_from_slice(payload);
        let c = l4_sum(&f);
        let at = if proto == IPPROTO_TCP { 50 } else { 40 };
        f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// The L4 checksum computed from scratch (field zeroed first).
    fn l4_sum(f: &[u8]) -> u16 {
        let proto = f[23];
        let mut l4 = f[34..].to_vec();
        let at = if proto == IPPROTO_TCP { 16 } else { 6 };
        l4[at..at + 2].fill(0);
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
        let s = sum(&pseudo) + sum(&l4);
        let c = !vxlan::checksum::fold(s);
        if proto == IPPROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        }
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..FlowKey::default()
        }
    }

    #[test]
    fn snat_and_dnat_keep_both_checksums_right() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            for side in [NatSide::Src, NatSide::Dst] {
                let mut f = packet(proto, b"hello, nat");
                let n = Nat {
                    side,
                    ip: u32::from_be_bytes([203, 0, 113, 10]),
                    port: Some(61000),
                };
                nat(&mut f, 14, &key(proto), &n, false).unwrap();
                let (addr, port) = if side == NatSide::Src {
                    (26, 34)
                } else {
                    (30, 36)
                };
                assert_eq!(f[addr..addr + 4], [203, 0, 113, 10]);
                assert_eq!(get16(&f, port), Some(61000));
                let ip: &[u8; 20] = f[14..34].try_into().unwrap();
                assert!(vxlan::checksum::ipv4_header_ok(ip), "{proto} {side:?}");
                let at = if proto == IPPROTO_TCP { 50 } else { 40 };
                assert_eq!(get16(&f, at), Some(l4_sum(&f)), "{proto} {side:?}");
            }
        }
    }

    #[test]
    fn nat_of_a_partial_checksum_leaves_what_completes_to_the_right_one() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            for side in [NatSide::Src, NatSide::Dst] {
                let mut f = packet(proto, b"hello, offloaded nat");
                let at = if proto == IPPROTO_TCP { 50 } else { 40 };
                // As a stack with checksum offload hands it over: the
                // field holds the pseudo-header's sum, uncomplemented.
                let l4_len = u16::try_from(f.len() - 34).unwrap();
                let src = u32::from_be_bytes(f[26..30].try_into().unwrap());
                let dst = u32::from_be_bytes(f[30..34].try_into().unwrap());
                let pseudo =
                    vxlan::checksum::fold(crate::offload::pseudo_sum(src, dst, proto, l4_len));
                f[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
                let n = Nat {
                    side,
                    ip: u32::from_be_bytes([198, 51, 100, 7]),
                    port: Some(40000),
                };
                nat(&mut f, 14, &key(proto), &n, true).unwrap();
                let off = crate::offload::Offload {
                    flags: crate::offload::Offload::NEEDS_CSUM,
                    csum_start: 34,
                    csum_offset: u16::try_from(at - 34).unwrap(),
                    ..Default::default()
                };
                crate::offload::complete_checksum(&mut f, &off).unwrap();
                assert_eq!(get16(&f, at), Some(l4_sum(&f)), "{proto} {side:?}");
            }
        }
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut f = packet(IPPROTO_UDP, b"x");
        f[40..42].fill(0);
        let n = Nat {
            side: NatSide::Src,
            ip: 1,
            port: None,
        };
        nat(&mut f, 14, &key(IPPROTO_UDP), &n, false).unwrap();
        assert_eq!(get16(&f, 40), Some(0));
        assert_eq!(f[26..30], [0, 0, 0, 1]);
    }

    #[test]
    fn icmp_echo_identifier_is_the_port() {
        let mut f = vec![0u8; 14 + 28];
        f[14] = 0x45;
        f[23] = IPPROTO_ICMP;
        f[34] = 8;
        f[38..40].copy_from_slice(&[0x12, 0x34]);
        let c = checksum(&f[34..]);
        f[36..38].copy_from_slice(&c.to_be_bytes());
        let n = Nat {
            side: NatSide::Src,
            ip: 7,
            port: Some(0x4321),
        };
        nat(&mut f, 14, &key(IPPROTO_ICMP), &n, false).unwrap();
        assert_eq!(f[38..40], [0x43, 0x21]);
        assert_eq!(vxlan::checksum::fold(sum(&f[34..])), 0xffff);
    }

    #[test]
    fn short_or_fragmented_packets_are_refused_untouched() {
        let n = Nat {
            side: NatSide::Dst,
            ip: 9,
            port: Some(1),
        };
        let full = packet(IPPROTO_TCP, b"");
        for cut in 0..full.len() {
            let mut f = full[..cut].to_vec();
            let before = f.clone();
            if nat(&mut f, 14, &key(IPPROTO_TCP), &n, false).is_err() {
                assert_eq!(f, before, "cut at {cut}");
            }
        }
        let mut f = full.clone();
        let k = FlowKey {
            flags: KeyFlags::FRAGMENT,
            ..key(IPPROTO_TCP)
        };
        assert!(nat(&mut f, 14, &k, &n, false).is_err());
        assert_eq!(f, full);
        assert_eq!(tcp_flags(&full, 14), Some(TCP_SYN));
        assert_eq!(tcp_flags(&full[..40], 14), None);
    }
}
