//! ICMP answers from the gateway (RFC 792, RFC 1191): echo replies to pings
//! of a gateway address, "time exceeded" when routing would take a TTL to
//! zero, and "fragmentation needed" with the overlay's MTU when a packet
//! with DF set is too big for the tunnel, so path MTU discovery works.
//!
//! Every input is a whole Ethernet frame from a VM; everything is bounds
//! checked, and a frame we cannot answer is a counted drop.

use std::net::Ipv4Addr;

use flowtable::Mac;
use vxlan::checksum;

use dpif::DropCause;

const ETH: usize = 14;
const PROTO_ICMP: u8 = 1;
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
const DEST_UNREACHABLE: u8 = 3;
const FRAG_NEEDED: u8 = 4;
const TIME_EXCEEDED: u8 = 11;

/// The IPv4 header of `f` (after Ethernet): (header length, total length).
fn ipv4(f: &[u8]) -> Option<(usize, usize)> {
    let ihl = usize::from(*f.get(ETH)? & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([*f.get(ETH + 2)?, *f.get(ETH + 3)?]));
    (ihl >= 20 && tot >= ihl && ETH + tot <= f.len()).then_some((ihl, tot))
}

fn src_ip(f: &[u8]) -> Option<Ipv4Addr> {
    let b = f.get(ETH + 12..ETH + 16)?;
    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// Ethernet + IPv4 (protocol ICMP) around `icmp`, checksums set.
fn frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp: &[u8],
) -> Result<Vec<u8>, DropCause> {
    let mut f = crate::reply::ipv4_frame(src_mac, dst_mac, src, dst, PROTO_ICMP, icmp)?;
    let body = &mut f[ETH + 20..];
    body[2..4].fill(0);
    let c = checksum::checksum(body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(f)
}

/// An error message quoting the offending packet's header and first 8
/// bytes of payload (RFC 792), sent from the gateway to its source.
fn error(
    req: &[u8],
    gw: Ipv4Addr,
    gw_mac: Mac,
    kind: u8,
    code: u8,
    rest: [u8; 4],
) -> Result<Vec<u8>, DropCause> {
    let (ihl, tot) = ipv4(req).ok_or(DropCause::Malformed)?;
    let quoted = req
        .get(ETH..ETH + (ihl + 8).min(tot))
        .ok_or(DropCause::Malformed)?;
    let src_mac: Mac = req
        .get(6..12)
        .and_then(|m| m.try_into().ok())
        .ok_or(DropCause::Malformed)?;
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    frame(
        gw_mac,
        src_mac,
        gw,
        src_ip(req).ok_or(DropCause::Malformed)?,
        &icmp,
    )
}

/// "Time exceeded in transit" for a packet whose TTL routing would end.
pub fn time_exceeded(req: &[u8], gw: Ipv4Addr, gw_mac: Mac) -> Result<Vec<u8>, DropCause> {
    error(req, gw, gw_mac, TIME_EXCEEDED, 0, [0; 4])
}

/// "Fragmentation needed and DF set" with the next-hop MTU. Packets without
/// DF are not answered (they are dropped and counted: the overlay does not
/// fragment).
pub fn frag_needed(req: &[u8], gw: Ipv4Addr, gw_mac: Mac, mtu: u16) -> Result<Vec<u8>, DropCause> {
    let frag = u16::from_be_bytes([
        *req.get(ETH + 6).ok_or(DropCause::Malformed)?,
        *req.get(ETH + 7).ok_or(DropCause::Malformed)?,
    ]);
    if frag & 0x4000 == 0 {
        return Err(DropCause::TooBig);
    }
    let m = mtu.to_be_bytes();
    error(
        req,
        gw,
        gw_mac,
        DEST_UNREACHABLE,
        FRAG_NEEDED,
        [0, 0, m[0], m[1]],
    )
}

/// An echo request (8 bytes of data) from `src` to `dst` with identifier
/// `id` and sequence number `seq` (a health check's probe).
pub fn echo_request(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
) -> Result<Vec<u8>, DropCause> {
    let mut m = [0u8; 16];
    m[0] = ECHO_REQUEST;
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    m[8..].copy_from_slice(b"vswitch\0");
    frame(src_mac, dst_mac, src, dst, &m)
}

/// The identifier of an echo reply addressed to us (Ethernet frame `f`).
pub fn echo_reply_id(f: &[u8]) -> Option<u16> {
    let (ihl, tot) = ipv4(f)?;
    let icmp = f.get(ETH + ihl..ETH + tot)?;
    (f.get(ETH + 9) == Some(&PROTO_ICMP) && icmp.len() >= 8 && icmp[0] == ECHO_REPLY)
        .then(|| u16::from_be_bytes([icmp[4], icmp[5]]))
}

/// The echo reply to an echo request addressed to the gateway `gw`.
pub fn echo_reply(req: &[u8], gw: Ipv4Addr, gw_mac: Mac) -> Result<Vec<u8>, DropCause> {
    let (ihl, tot) = ipv4(req).ok_or(DropCause::Malformed)?;
    let icmp = req.get(ETH + ihl..ETH + tot).ok_or(DropCause::Malformed)?;
    if icmp.len() < 8 || icmp[0] != ECHO_REQUEST || req.get(ETH + 9) != Some(&PROTO_ICMP) {
        return Err(DropCause::ToGateway);
    }
    if checksum::fold(checksum::sum(icmp)) != 0xffff {
        return Err(DropCause::Malformed);
    }
    let mut reply = icmp.to_vec();
    reply[0] = ECHO_REPLY;
    let src_mac: Mac = req
        .get(6..12)
        .and_then(|m| m.try_into().ok())
        .ok_or(DropCause::Malformed)?;
    frame(
        gw_mac,
        src_mac,
        gw,
        src_ip(req).ok_or(DropCause::Malformed)?,
        &reply,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const GW_MAC: Mac = [2, 0, 0, 0, 0, 0xfe];
    const VM_MAC: Mac = [2, 0, 0, 0, 0, 0x0a];

    /// An IPv4 packet from 10.0.0.10 to `dst` with `proto` and `l4`.
    fn packet(dst: [u8; 4], proto: u8, df: bool, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH + 20];
        f[0..6].copy_from_slice(&GW_MAC);
        f[6..12].copy_from_slice(&VM_MAC);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&u16::try_from(20 + l4.len()).unwrap().to_be_bytes());
        if df {
            f[20] = 0x40;
        }
        f[22] = 1;
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 0, 0, 10]);
        f[30..34].copy_from_slice(&dst);
        let c = checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(l4);
        f
    }

    fn valid(f: &[u8]) {
        assert_eq!(
            checksum::fold(checksum::sum(&f[14..34])),
            0xffff,
            "IPv4 checksum"
        );
        assert_eq!(
            checksum::fold(checksum::sum(&f[34..])),
            0xffff,
            "ICMP checksum"
        );
        assert_eq!(f[..6], VM_MAC);
        assert_eq!(f[6..12], GW_MAC);
        assert_eq!(f[26..30], [10, 0, 0, 1]);
        assert_eq!(f[30..34], [10, 0, 0, 10]);
    }

    #[test]
    fn the_gateway_answers_ping() {
        let mut echo = vec![ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
        let c = checksum::checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let r = echo_reply(&packet([10, 0, 0, 1], PROTO_ICMP, false, &echo), GW, GW_MAC).unwrap();
        valid(&r);
        assert_eq!(r[34], ECHO_REPLY);
        assert_eq!(r[38..], echo[4..], "identifier, sequence and data echoed");
        // Not an echo request, or a bad checksum: no answer.
        assert!(echo_reply(&packet([10, 0, 0, 1], 17, false, &[0; 8]), GW, GW_MAC).is_err());
        let mut bad = echo.clone();
        bad[9] ^= 1;
        assert_eq!(
            echo_reply(&packet([10, 0, 0, 1], PROTO_ICMP, false, &bad), GW, GW_MAC),
            Err(DropCause::Malformed)
        );
    }

    #[test]
    fn errors_quote_the_header_and_eight_bytes() {
        let p = packet([10, 0, 1, 5], 17, true, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let t = time_exceeded(&p, GW, GW_MAC).unwrap();
        valid(&t);
        assert_eq!((t[34], t[35]), (TIME_EXCEEDED, 0));
        assert_eq!(t[42..], p[14..14 + 28], "IP header + 8 bytes");
        let f = frag_needed(&p, GW, GW_MAC, 1450).unwrap();
        valid(&f);
        assert_eq!((f[34], f[35]), (DEST_UNREACHABLE, FRAG_NEEDED));
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1450);
        // Without DF there is nothing to tell the sender.
        let p = packet([10, 0, 1, 5], 17, false, &[0; 8]);
        assert_eq!(frag_needed(&p, GW, GW_MAC, 1450), Err(DropCause::TooBig));
        // Truncated frames are refused, never read past.
        assert!(time_exceeded(&p[..30], GW, GW_MAC).is_err());
    }
}
