//! ICMP errors about tracked connections ("related" traffic): a
//! destination-unreachable, fragmentation-needed, time-exceeded or
//! parameter-problem message quoting a packet of a connection passes the
//! way that connection's replies go, without an ingress rule. Path MTU
//! discovery depends on it.
//!
//! Through NAT the quoted packet carries the translated address, which the
//! VM would not recognise: the message is translated back (outer
//! destination, quoted source address and port, with all three checksums
//! updated incrementally), as Linux's NAT does.

use flowtable::{Action, FlowKey, Nat, NatSide, Output};
use vxlan::checksum::update;

/// ICMP types that quote the packet they are about.
pub fn is_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 11 | 12)
}

/// The packet an ICMP error quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    /// Ports, or for an ICMP echo the identifier (and 0).
    pub sport: u16,
    pub dport: u16,
    /// Offset of the quoted IPv4 header in the frame.
    at: usize,
    /// Offset of the quoted L4 header.
    l4: usize,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn be32(f: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?))
}

/// Parse the quoted packet of the ICMP error in Ethernet frame `f`.
pub fn quoted(f: &[u8]) -> Option<Quoted> {
    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
    let at = 14 + ihl + 8;
    let qihl = usize::from(f.get(at)? & 0x0f) * 4;
    if qihl < 20 || f.get(at)? >> 4 != 4 {
        return None;
    }
    let proto = *f.get(at + 9)?;
    let l4 = at + qihl;
    let (sport, dport) = match proto {
        6 | 17 => (be16(f, l4)?, be16(f, l4 + 2)?),
        // An echo request: the identifier.
        1 if *f.get(l4)? == 8 => (be16(f, l4 + 4)?, 8 << 8),
        _ => return None,
    };
    Some(Quoted {
        proto,
        src: be32(f, at + 12)?,
        dst: be32(f, at + 16)?,
        sport,
        dport,
        at,
        l4,
    })
}

/// The key the replies of the quoted packet's connection carry at
/// `error_key`'s ingress: where the error is found in conntrack.
pub fn reply_key(error_key: &FlowKey, q: &Quoted) -> FlowKey {
    // An echo's reply keeps the identifier and has type 0.
    let (src_port, dst_port) = if q.proto == 1 {
        (q.sport, 0)
    } else {
        (q.dport, q.sport)
    };
    FlowKey {
        ctx: error_key.ctx,
        src_ip: q.dst,
        dst_ip: q.src,
        src_port,
        dst_port,
        proto: q.proto,
        flags: 0,
        pad: 0,
    }
}

/// Replace the 16-bit word at `at` in `f`, folding the change into the
/// checksum at `csum` (if given).
fn set16(f: &mut [u8], at: usize, new: u16, csum: Option<usize>) -> Option<()> {
    let old = be16(f, at)?;
    f.get_mut(at..at + 2)?.copy_from_slice(&new.to_be_bytes());
    if let Some(c) = csum {
        let hc = be16(f, c)?;
        f.get_mut(c..c + 2)?
            .copy_from_slice(&update(hc, old, new).to_be_bytes());
    }
    Some(())
}

/// The ICMP error `f` translated for the VM behind `nat` (a DNAT towards
/// the VM) and rewritten as `action` would (MACs, TTL); `None` if it
/// cannot be (truncated, or not delivered to a local port).
pub fn translate(f: &[u8], q: &Quoted, nat: &Nat, action: &Action) -> Option<Vec<u8>> {
    if nat.side != NatSide::Dst || !matches!(action.output, Output::Port(_)) {
        return None;
    }
    if action.encap.is_some() || action.decap.is_some() {
        return None;
    }
    let tot = usize::from(be16(f, 16)?);
    let mut v = f.get(..14 + tot)?.to_vec();
    let icmp = 14 + usize::from(v.get(14)? & 0x0f) * 4;
    let icmp_csum = icmp + 2;
    let ip = nat.ip.to_be_bytes();
    let (hi, lo) = (
        u16::from_be_bytes([ip[0], ip[1]]),
        u16::from_be_bytes([ip[2], ip[3]]),
    );
    // Outer destination (outer IPv4 checksum).
    set16(&mut v, 30, hi, Some(24))?;
    set16(&mut v, 32, lo, Some(24))?;
    // Quoted source: its header checksum, and every changed word of the
    // ICMP message (the quoted checksum's own change included).
    let qcsum = q.at + 10;
    for (at, word) in [(q.at + 12, hi), (q.at + 14, lo)] {
        let old = be16(&v, at)?;
        set16(&mut v, at, word, Some(icmp_csum))?;
        let hc = update(be16(&v, qcsum)?, old, word);
        set16(&mut v, qcsum, hc, Some(icmp_csum))?;
    }
    if let Some(p) = nat.port {
        let at = if q.proto == 1 { q.l4 + 4 } else { q.l4 };
        set16(&mut v, at, p, Some(icmp_csum))?;
    }
    if action.dec_ttl {
        let ttl = *v.get(22)?;
        if ttl <= 1 {
            return None;
        }
        let old = be16(&v, 22)?;
        set16(&mut v, 22, old - 0x0100, Some(24))?;
    }
    if let Some(m) = action.set_eth_dst {
        v.get_mut(..6)?.copy_from_slice(&m);
    }
    if let Some(m) = action.set_eth_src {
        v.get_mut(6..12)?.copy_from_slice(&m);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::PortId;
    use vxlan::checksum::{checksum, fold, sum};

    /// "Fragmentation needed" from 198.51.100.1 to 203.0.113.10 quoting a
    /// UDP packet 203.0.113.10:40001 → 198.51.100.7:53.
    fn frag_needed() -> Vec<u8> {
        let mut q = vec![0u8; 28];
        q[0] = 0x45;
        q[2..4].copy_from_slice(&1500u16.to_be_bytes());
        q[8] = 63;
        q[9] = 17;
        q[12..16].copy_from_slice(&[203, 0, 113, 10]);
        q[16..20].copy_from_slice(&[198, 51, 100, 7]);
        let c = checksum(&q[..20]);
        q[10..12].copy_from_slice(&c.to_be_bytes());
        q[20..22].copy_from_slice(&40001u16.to_be_bytes());
        q[22..24].copy_from_slice(&53u16.to_be_bytes());
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        icmp.extend_from_slice(&q);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0u8; 34];
        f[12..14].copy_from_slice(&[8, 0]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&u16::try_from(20 + icmp.len()).unwrap().to_be_bytes());
        f[22] = 64;
        f[23] = 1;
        f[26..30].copy_from_slice(&[198, 51, 100, 1]);
        f[30..34].copy_from_slice(&[203, 0, 113, 10]);
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&icmp);
        f
    }

    #[test]
    fn the_quoted_packet_is_found_and_translated_back() {
        let f = frag_needed();
        let q = quoted(&f).unwrap();
        assert_eq!((q.proto, q.sport, q.dport), (17, 40001, 53));
        let ek = FlowKey::new(flowtable::Ingress::Port(PortId(4)), 1, 0, 0, 0, 0x0304);
        let rk = reply_key(&ek, &q);
        assert_eq!(rk.src_ip, u32::from_be_bytes([198, 51, 100, 7]));
        assert_eq!((rk.src_port, rk.dst_port), (53, 40001));
        assert_eq!(rk.ctx, ek.ctx);
        let nat = Nat {
            side: NatSide::Dst,
            ip: u32::from_be_bytes([10, 0, 0, 10]),
            port: Some(5555),
        };
        let action = Action {
            set_eth_dst: Some([2, 0, 0, 0, 0, 0x0a]),
            set_eth_src: Some([2, 0, 0, 0, 0, 0xfe]),
            dec_ttl: true,
            nat: Some(nat),
            ..Action::output(PortId(1))
        };
        let v = translate(&f, &q, &nat, &action).unwrap();
        assert_eq!(v[30..34], [10, 0, 0, 10], "outer destination");
        assert_eq!(v[22], 63);
        let t = quoted(&v).unwrap();
        assert_eq!(t.src, u32::from_be_bytes([10, 0, 0, 10]));
        assert_eq!(t.sport, 5555);
        let ip: &[u8; 20] = v[14..34].try_into().unwrap();
        assert!(vxlan::checksum::ipv4_header_ok(ip), "outer checksum");
        let qh: &[u8; 20] = v[42..62].try_into().unwrap();
        assert!(
            vxlan::checksum::ipv4_header_ok(qh),
            "quoted header checksum"
        );
        assert_eq!(fold(sum(&v[34..])), 0xffff, "ICMP checksum");
        assert_eq!(v[..6], [2, 0, 0, 0, 0, 0x0a]);
        // Truncated, or not towards a local port: not translated.
        assert!(translate(&f[..50], &q, &nat, &action).is_none());
        let encap = Action {
            encap: Some(flowtable::EncapTemplate([0; 50])),
            ..action
        };
        assert!(translate(&f, &q, &nat, &encap).is_none());
        // Garbage quotes are refused.
        for cut in 0..f.len() {
            let _ = quoted(&f[..cut]);
        }
        let mut bad = f.clone();
        bad[42] = 0x65;
        assert!(quoted(&bad).is_none());
    }
}
