use super::*;
use crate::offload::check;
use crate::offload::tests::{l4_checksum, l4_frame, partial};
use vxlan::checksum::ipv4_header_ok;

/// Cut `f` (metadata `off`) into segments.
fn cut(f: &[u8], off: &Offload) -> Vec<Vec<u8>> {
    let p = plan(f, off).unwrap();
    (0..p.segs)
        .map(|i| {
            let mut d = vec![0u8; 2048];
            let n = write_segment(f, &p, i, &mut d).unwrap();
            d.truncate(n);
            d
        })
        .collect()
}

fn be16_at(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn be32_at(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(f[at..at + 4].try_into().unwrap())
}

#[test]
fn tcp_segments_are_what_the_sender_would_have_sent() {
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
    // PSH, FIN, ACK and CWR on the super-frame.
    let mut f = l4_frame(true, &payload, 0xffff_f000, 0x80 | 0x18 | 0x01);
    let off = partial(&mut f, 1448);
    let off = check(&f, off).unwrap();
    let segs = cut(&f, &off);
    assert_eq!(segs.len(), 4);
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let last = i == 3;
        let plen = if last { 5000 - 3 * 1448 } else { 1448 };
        assert_eq!(s.len(), 54 + plen, "segment {i}");
        assert_eq!(usize::from(be16_at(s, 16)), 40 + plen);
        assert_eq!(be16_at(s, 18), 0x1000 + u16::try_from(i).unwrap(), "IP ID");
        assert!(ipv4_header_ok(s[14..34].try_into().unwrap()));
        // The sequence number wraps like TCP's.
        let seq = 0xffff_f000u32.wrapping_add(u32::try_from(i * 1448).unwrap());
        assert_eq!(be32_at(s, 38), seq);
        let flags = s[47];
        assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
        assert_eq!(flags & 0x09 != 0, last, "FIN and PSH on the last only");
        assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
        assert_eq!(be16_at(s, 50), l4_checksum(s, 14), "TCP checksum of {i}");
        joined.extend_from_slice(&s[54..]);
    }
    assert_eq!(joined, payload);
}

#[test]
fn an_encapsulated_super_frame_gets_each_outer_header_right() {
    let mut f = l4_frame(true, &vec![9u8; 3000], 5, 0x10);
    let off = partial(&mut f, 1000);
    let off = check(&f, off).unwrap();
    let t = vxlan::Template::new(&vxlan::TemplateSpec {
        src_mac: [2, 0, 0, 0, 0, 0x11],
        dst_mac: [2, 0, 0, 0, 0, 0x22],
        local_vtep: std::net::Ipv4Addr::new(192, 168, 0, 1),
        remote_vtep: std::net::Ipv4Addr::new(192, 168, 0, 2),
        vni: 42,
        ttl: 64,
    })
    .unwrap();
    let mut buf = vec![0u8; 64];
    buf.extend_from_slice(&f);
    let s = vxlan::encap_for_segmentation(&mut buf, 64, t.bytes(), 0x1234).unwrap();
    let whole = &buf[s..];
    let segs = cut(whole, &off.shifted(50).unwrap());
    assert_eq!(segs.len(), 3);
    for seg in &segs {
        assert!(
            ipv4_header_ok(seg[14..34].try_into().unwrap()),
            "outer IPv4"
        );
        assert_eq!(usize::from(be16_at(seg, 16)), seg.len() - 14);
        assert_eq!(usize::from(be16_at(seg, 38)), seg.len() - 34, "UDP length");
        assert_eq!(
            be16_at(seg, 34),
            vxlan::source_port(0x1234),
            "the flow's port"
        );
        let inner = &seg[50..];
        assert!(
            ipv4_header_ok(inner[14..34].try_into().unwrap()),
            "inner IPv4"
        );
        assert_eq!(be16_at(inner, 50), l4_checksum(inner, 14));
    }
}

#[test]
fn udp_segments_each_have_their_length_and_checksum() {
    let mut f = l4_frame(false, &vec![3u8; 2500], 0, 0);
    let off = partial(&mut f, 1200);
    let off = check(&f, off).unwrap();
    let segs = cut(&f, &off);
    assert_eq!(segs.len(), 3);
    for s in &segs {
        assert_eq!(usize::from(be16_at(s, 38)), s.len() - 34);
        assert_eq!(be16_at(s, 40), l4_checksum(s, 14));
    }
}

#[test]
fn a_segment_that_does_not_fit_its_buffer_is_refused() {
    let mut f = l4_frame(true, &vec![3u8; 3000], 0, 0x10);
    let off = partial(&mut f, 1448);
    let off = check(&f, off).unwrap();
    let p = plan(&f, &off).unwrap();
    assert_eq!(write_segment(&f, &p, 0, &mut [0u8; 1000]), None);
    // Headers changed under the metadata (the frame is the tenant's).
    let mut g = f.clone();
    g[46] = 0x20;
    assert!(plan(&g, &off).is_err());
}
