//! Frames the coprocessor originates (DHCP, ICMP, TCP resets and health
//! checks): an Ethernet and IPv4 header, with its checksum, around a
//! transport payload.

use std::net::Ipv4Addr;

use dpif::DropCause;
use flowtable::Mac;

/// Ethernet + IPv4 (no options, TTL 64, protocol `proto`) around `l4`.
/// The IPv4 header checksum is set; the transport checksum is the caller's.
/// A payload too long for one IPv4 packet is refused (`Malformed`: what
/// it answers could not have been a packet either).
pub fn ipv4_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Result<Vec<u8>, DropCause> {
    let ip_len = 20 + l4.len();
    let ip_len16 = u16::try_from(ip_len).map_err(|_| DropCause::Malformed)?;
    let mut f = vec![0u8; 14 + ip_len];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = vxlan::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34..].copy_from_slice(l4);
    Ok(f)
}

/// A TCP segment without options or data from `src`:`sport` to
/// `dst`:`dport`, its checksums set (a reset, a health check's SYN).
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    src_mac: Mac,
    dst_mac: Mac,
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
) -> Result<Vec<u8>, DropCause> {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = vxlan::checksum::sum(&src.octets())
        + vxlan::checksum::sum(&dst.octets())
        + u32::from(TCP)
        + 20;
    let c = !vxlan::checksum::fold(pseudo + vxlan::checksum::sum(&h));
    h[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src_mac, dst_mac, src, dst, TCP, &h)
}

const TCP: u8 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_too_long_for_one_packet_is_refused_not_cut() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let f = ipv4_frame([2; 6], [4; 6], a, a, 17, &[0; 100]).unwrap();
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 120);
        assert_eq!(vxlan::checksum::checksum(&f[14..34]), 0);
        assert_eq!(
            ipv4_frame([2; 6], [4; 6], a, a, 17, &[0; 65_516]),
            Err(DropCause::Malformed)
        );
        assert!(ipv4_frame([2; 6], [4; 6], a, a, 17, &[0; 65_515]).is_ok());
    }
}
