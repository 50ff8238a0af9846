//! Frames the coprocessor originates (DHCP, ICMP): an Ethernet and IPv4
//! header, with its checksum, around a transport payload.

use std::net::Ipv4Addr;

use flowtable::Mac;

/// Ethernet + IPv4 (no options, TTL 64, protocol `proto`) around `l4`.
/// The IPv4 header checksum is set; the transport checksum is the caller's.
pub fn ipv4_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let ip_len = 20 + l4.len();
    let mut f = vec![0u8; 14 + ip_len];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&u16::try_from(ip_len).unwrap_or(u16::MAX).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = vxlan::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34..].copy_from_slice(l4);
    f
}
