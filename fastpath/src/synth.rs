//! Synthetic frames for tests, benchmarks and fuzz seeds: valid Ethernet /
//! IPv4 / UDP packets with correct checksums, and their VXLAN
//! encapsulations. Not used on the packet path.

use std::net::Ipv4Addr;

use vxlan::{Template, TemplateSpec};

/// A UDP flow's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Offsets inside a frame built by [`udp_frame`] (Ethernet, an IPv4
/// header without options, UDP: the `packet` module's plain frame).
pub mod at {
    use crate::packet::{ipv4, plain};
    pub const IP_TTL: usize = plain::IP + ipv4::TTL;
    pub const IP_CSUM: usize = plain::IP + ipv4::CSUM;
    pub const IP_SRC: usize = plain::IP_SRC;
    pub const IP_DST: usize = plain::IP_DST;
    pub const UDP_SRC: usize = plain::SRC_PORT;
    pub const UDP_DST: usize = plain::DST_PORT;
}

/// Write an Ethernet/IPv4/UDP frame of exactly `len` bytes (at least 42)
/// into `buf[..len]`, TTL 64, UDP checksum 0.
pub fn write_udp_frame(buf: &mut [u8], f: &UdpFlow, len: usize) {
    let len = len.max(42);
    let b = &mut buf[..len];
    b.fill(0);
    b[0..6].copy_from_slice(&f.dst_mac);
    b[6..12].copy_from_slice(&f.src_mac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(len - 14).unwrap_or(u16::MAX);
    b[14] = 0x45;
    b[16..18].copy_from_slice(&ip_len.to_be_bytes());
    b[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
    b[at::IP_TTL] = 64;
    b[23] = 17;
    b[at::IP_SRC..at::IP_SRC + 4].copy_from_slice(&f.src_ip.octets());
    b[at::IP_DST..at::IP_DST + 4].copy_from_slice(&f.dst_ip.octets());
    let c = vxlan::checksum::checksum(&b[14..34]);
    b[at::IP_CSUM..at::IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
    b[at::UDP_SRC..at::UDP_SRC + 2].copy_from_slice(&f.src_port.to_be_bytes());
    b[at::UDP_DST..at::UDP_DST + 2].copy_from_slice(&f.dst_port.to_be_bytes());
    b[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
}

/// Rewrite the addresses and ports of a frame made by [`write_udp_frame`],
/// keeping its IPv4 checksum correct.
pub fn retarget_udp_frame(b: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) {
    b[at::IP_SRC..at::IP_SRC + 4].copy_from_slice(&src.octets());
    b[at::IP_DST..at::IP_DST + 4].copy_from_slice(&dst.octets());
    b[at::IP_CSUM..at::IP_CSUM + 2].fill(0);
    let c = vxlan::checksum::checksum(&b[14..34]);
    b[at::IP_CSUM..at::IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
    b[at::UDP_SRC..at::UDP_SRC + 2].copy_from_slice(&sport.to_be_bytes());
    b[at::UDP_DST..at::UDP_DST + 2].copy_from_slice(&dport.to_be_bytes());
}

/// A UDP frame of `len` bytes as a vector.
pub fn udp_frame(f: &UdpFlow, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(42)];
    write_udp_frame(&mut v, f, len);
    v
}

/// `inner` encapsulated with `spec`'s outer headers (flow hash `hash`).
pub fn vxlan_frame(inner: &[u8], spec: &TemplateSpec, hash: u64) -> Vec<u8> {
    let t = Template::new(spec).unwrap_or_else(|e| panic!("bad template spec {spec:?}: {e}"));
    let mut v = vec![0u8; vxlan::OUTER_LEN + inner.len()];
    v[vxlan::OUTER_LEN..].copy_from_slice(inner);
    let s = vxlan::encap(&mut v, vxlan::OUTER_LEN, inner.len(), t.bytes(), hash)
        .unwrap_or_else(|e| panic!("encap of a synthetic frame failed: {e}"));
    debug_assert_eq!(s, 0);
    v
}

/// An Ethernet/IPv4/TCP frame (20-byte TCP header, then `payload`) with
/// TCP control flags `flags` and correct IPv4 and TCP checksums.
pub fn tcp_frame(f: &UdpFlow, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = 14 + 20 + 20 + payload.len();
    let mut b = udp_frame(f, len);
    b[23] = 6;
    b[24..26].fill(0);
    let c = vxlan::checksum::checksum(&b[14..34]);
    b[24..26].copy_from_slice(&c.to_be_bytes());
    b[38..46].fill(0); // sequence and acknowledgement numbers
    b[38..42].copy_from_slice(&1000u32.to_be_bytes());
    b[46] = 0x50;
    b[47] = flags;
    b[48..50].copy_from_slice(&64240u16.to_be_bytes());
    b[54..].copy_from_slice(payload);
    let c = l4_checksum(&b);
    b[50..52].copy_from_slice(&c.to_be_bytes());
    b
}

/// The bulk-TCP flow of the benchmarks: VM A (10.0.0.10:40000, MAC
/// 02:…:0a) to VM B (10.0.0.11:5201, MAC 02:…:0b).
pub const BULK_A_TO_B: UdpFlow = UdpFlow {
    src_mac: [2, 0, 0, 0, 0, 0x0a],
    dst_mac: [2, 0, 0, 0, 0, 0x0b],
    src_ip: Ipv4Addr::new(10, 0, 0, 10),
    dst_ip: Ipv4Addr::new(10, 0, 0, 11),
    src_port: 40000,
    dst_port: 5201,
};

/// A TCP super-frame of flow `f` with `payload` bytes (ACK, a byte
/// pattern) as a stack with TSO hands it over: the IPv4 header complete,
/// the TCP checksum field holding the pseudo-header's sum (to be
/// completed per segment: virtio's "needs checksum", at 34 + 16).
pub fn tso_frame(f: &UdpFlow, payload: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..payload).map(|i| i.to_le_bytes()[0]).collect();
    let mut b = tcp_frame(f, 0x10, &data);
    let l4_len = u32::try_from(b.len() - 34).unwrap_or(0);
    let pseudo = vxlan::checksum::sum(&b[26..34]) + 6 + l4_len;
    b[50..52].copy_from_slice(&vxlan::checksum::fold(pseudo).to_be_bytes());
    b
}

/// The TCP or UDP checksum of the IPv4 packet in frame `b` (options-free
/// header), computed from scratch with the checksum field taken as zero.
pub fn l4_checksum(b: &[u8]) -> u16 {
    let proto = b[23];
    let at = if proto == 6 { 34 + 16 } else { 34 + 6 };
    let mut l4 = b[34..].to_vec();
    l4[at - 34..at - 34 + 2].fill(0);
    let mut pseudo = b[26..34].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap_or(0).to_be_bytes());
    let c = !vxlan::checksum::fold(vxlan::checksum::sum(&pseudo) + vxlan::checksum::sum(&l4));
    if proto == 17 && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The action the `classify` fuzz target (and the corpus replay test)
/// installs for a frame: the selector bytes pick decap (`sel` bit 1), TTL
/// decrement (bit 2), encap (bit 3), a 100-byte length limit (bit 4) and
/// the output port (bits 6–7); connection tracking (`sel2` bit 0) and NAT
/// (bit 2; bit 3 SNAT, bit 4 with a port). `outer_src` is the frame's
/// outer source VTEP (for decap).
pub fn fuzz_action(sel: u8, sel2: u8, outer_src: u32) -> flowtable::Action {
    let tpl = Template::new(&TemplateSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        remote_vtep: Ipv4Addr::new(192, 168, 0, 2),
        vni: 1,
        ttl: 64,
    });
    flowtable::Action {
        decap: (sel & 2 != 0).then_some(outer_src),
        dec_ttl: sel & 4 != 0,
        set_eth_dst: Some([2, 0, 0, 0, 0, 3]),
        set_eth_src: Some([2, 0, 0, 0, 0, 4]),
        encap: if sel & 8 != 0 {
            tpl.ok().map(|t| flowtable::EncapTemplate(*t.bytes()))
        } else {
            None
        },
        max_len: if sel & 16 != 0 { 100 } else { u16::MAX },
        conntrack: sel2 & 1 != 0,
        nat: (sel2 & 4 != 0).then_some(flowtable::Nat {
            side: if sel2 & 8 != 0 {
                flowtable::NatSide::Src
            } else {
                flowtable::NatSide::Dst
            },
            ip: 0xcb00_710a,
            port: (sel2 & 16 != 0).then_some(40000),
        }),
        ..flowtable::Action::output(flowtable::PortId(u16::from(sel >> 6)))
    }
}
