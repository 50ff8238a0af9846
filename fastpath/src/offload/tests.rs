use super::*;
use vxlan::checksum::{fold, sum};

/// An Ethernet + IPv4 + TCP frame (`tcp` false: UDP) with `payload`,
/// every checksum complete; TCP sequence `seq`, flags `flags`, IP ID 0x1000.
pub(crate) fn l4_frame(tcp: bool, payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
    let l4_len = if tcp { 20 } else { 8 };
    let tot = 20 + l4_len + payload.len();
    let mut f = vec![0u8; 14 + tot];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&u16::try_from(tot).unwrap().to_be_bytes());
    f[18..20].copy_from_slice(&0x1000u16.to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64;
    f[23] = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&5201u16.to_be_bytes());
    if tcp {
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[42..46].copy_from_slice(&7u32.to_be_bytes());
        f[46] = 0x50;
        f[47] = flags;
        f[48..50].copy_from_slice(&0xffffu16.to_be_bytes());
    } else {
        f[38..40].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    }
    f[14 + 20 + l4_len..].copy_from_slice(payload);
    let c = !fold(sum(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let at = if tcp { 50 } else { 40 };
    let c = l4_checksum(&f, 14);
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// The L4 checksum of the IPv4 packet at `ip`, from scratch (field
/// taken as zero).
pub(crate) fn l4_checksum(f: &[u8], ip: usize) -> u16 {
    let ihl = usize::from(f[ip] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    let proto = f[ip + 9];
    let mut l4 = f[ip + ihl..ip + tot].to_vec();
    let at = if proto == IPPROTO_TCP { 16 } else { 6 };
    l4[at..at + 2].fill(0);
    let mut pseudo = f[ip + 12..ip + 20].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    let c = !fold(sum(&pseudo) + sum(&l4));
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// `f` as a stack with offloads hands it over: the L4 checksum field
/// holding the pseudo-header's sum, with the metadata that says so.
pub(crate) fn partial(f: &mut [u8], gso_size: u16) -> Offload {
    let tcp = f[23] == IPPROTO_TCP;
    let at = if tcp { 50 } else { 40 };
    let l4_len = u16::try_from(f.len() - 34).unwrap();
    let src = u32::from_be_bytes(f[26..30].try_into().unwrap());
    let dst = u32::from_be_bytes(f[30..34].try_into().unwrap());
    let p = fold(pseudo_sum(src, dst, f[23], l4_len));
    f[at..at + 2].copy_from_slice(&p.to_be_bytes());
    Offload {
        flags: Offload::NEEDS_CSUM,
        gso_type: match (gso_size, tcp) {
            (0, _) => Offload::GSO_NONE,
            (_, true) => Offload::GSO_TCPV4,
            (_, false) => Offload::GSO_UDP_L4,
        },
        gso_size,
        csum_start: 34,
        csum_offset: if tcp { 16 } else { 6 },
    }
}

#[test]
fn the_constants_are_virtio_s() {
    use virtio_bindings::bindings::virtio_net as v;
    assert_eq!(
        u32::from(Offload::NEEDS_CSUM),
        v::VIRTIO_NET_HDR_F_NEEDS_CSUM
    );
    assert_eq!(
        u32::from(Offload::DATA_VALID),
        v::VIRTIO_NET_HDR_F_DATA_VALID
    );
    assert_eq!(u32::from(Offload::GSO_TCPV4), v::VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(u32::from(Offload::GSO_TCPV6), v::VIRTIO_NET_HDR_GSO_TCPV6);
    assert_eq!(u32::from(Offload::GSO_UDP), v::VIRTIO_NET_HDR_GSO_UDP);
    assert_eq!(u32::from(Offload::GSO_UDP_L4), v::VIRTIO_NET_HDR_GSO_UDP_L4);
    assert_eq!(u32::from(Offload::GSO_ECN), v::VIRTIO_NET_HDR_GSO_ECN);
    assert_eq!(VNET_HDR_LEN, std::mem::size_of::<v::virtio_net_hdr_v1>());
}

#[test]
fn the_header_round_trips_without_the_switch_s_own_flag() {
    let o = Offload {
        flags: Offload::NEEDS_CSUM | Offload::ENCAPSULATED,
        gso_type: Offload::GSO_TCPV4,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let mut f = l4_frame(true, &[0; 3000], 1, 0x10);
    partial(&mut f, 1448);
    let h = o.to_vnet(&f);
    assert_eq!(u16::from_le_bytes([h[2], h[3]]), 54, "hdr_len, measured");
    let back = Offload::from_vnet(&h);
    assert_eq!(
        back,
        Offload {
            flags: Offload::NEEDS_CSUM,
            ..o
        }
    );
}

#[test]
fn a_valid_super_frame_is_kept_and_measured() {
    let mut f = l4_frame(true, &[7u8; 4000], 1, 0x18);
    let off = partial(&mut f, 1448);
    let o = check(
        &f,
        Offload {
            flags: off.flags | Offload::ENCAPSULATED | 0x40,
            ..off
        },
    )
    .unwrap();
    assert_eq!(
        o.flags,
        Offload::NEEDS_CSUM,
        "only virtio's flags are taken"
    );
    assert_eq!((o.gso_size, o.hdr_len(&f)), (1448, Some(54)));
    assert_eq!(o.segment_len(&f), 54 + 1448);
}

#[test]
fn one_segment_s_worth_is_an_ordinary_frame_that_needs_its_checksum() {
    let mut f = l4_frame(true, &[7u8; 1000], 1, 0x18);
    let off = partial(&mut f, 1448);
    let o = check(&f, off).unwrap();
    assert!(!o.is_gso() && o.needs_csum());
}

#[test]
fn hostile_metadata_is_a_drop_with_its_reason() {
    let mut f = l4_frame(true, &[7u8; 3000], 1, 0x18);
    let good = partial(&mut f, 1000);
    let bad = |o: Offload| check(&f, o);
    use DropReason::*;
    let cases = [
        (
            Offload {
                csum_start: 3000 + 54,
                ..good
            },
            OffloadBadCsumOffsets,
        ),
        (
            Offload {
                csum_offset: u16::MAX,
                ..good
            },
            OffloadBadCsumOffsets,
        ),
        (
            Offload {
                csum_start: 2,
                ..good
            },
            OffloadBadCsumOffsets,
        ),
        (
            Offload {
                gso_size: 0,
                ..good
            },
            OffloadBadGsoSize,
        ),
        (
            Offload {
                gso_type: Offload::GSO_UDP,
                ..good
            },
            OffloadBadGsoType,
        ),
        (
            Offload {
                gso_type: 9,
                ..good
            },
            OffloadBadGsoType,
        ),
        (
            Offload {
                gso_type: Offload::GSO_UDP_L4,
                ..good
            },
            OffloadBadHeaders,
        ),
        (Offload { flags: 0, ..good }, OffloadBadHeaders),
        (
            Offload {
                csum_start: 40,
                ..good
            },
            OffloadBadHeaders,
        ),
        (
            Offload {
                csum_offset: 6,
                ..good
            },
            OffloadBadHeaders,
        ),
        (
            Offload {
                gso_size: 1,
                ..good
            },
            OffloadTooManySegments,
        ),
    ];
    for (o, want) in cases {
        assert_eq!(bad(o), Err(want), "{o:?}");
    }
    // Headers that lie: a TCP data offset past the frame, an IP total
    // length past it, a fragment, not IPv4 at all.
    let mut g = f.clone();
    g[46] = 0xf0;
    g.truncate(80);
    assert_eq!(
        check(
            &g,
            Offload {
                csum_start: 34,
                ..good
            }
        ),
        Err(OffloadBadHeaders)
    );
    let mut g = f.clone();
    g[16..18].copy_from_slice(&60000u16.to_be_bytes());
    assert_eq!(check(&g, good), Err(OffloadBadHeaders));
    let mut g = f.clone();
    g[20] = 0x20;
    assert_eq!(check(&g, good), Err(OffloadBadHeaders));
    let mut g = f.clone();
    g[12] = 0x86;
    assert_eq!(check(&g, good), Err(OffloadBadHeaders));
    // Every truncation of the frame is refused or checked in bounds.
    for n in 0..f.len() {
        let _ = check(&f[..n], good);
    }
}

#[test]
fn a_completed_checksum_is_the_one_computed_from_scratch() {
    for tcp in [true, false] {
        for len in [0usize, 1, 2, 3, 100, 1001, 1448] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
            let mut f = l4_frame(tcp, &payload, 99, 0x18);
            let want = f.clone();
            let off = partial(&mut f, 0);
            assert_ne!(f, want);
            let off = check(&f, off).unwrap();
            complete_checksum(&mut f, &off).unwrap();
            assert_eq!(f, want, "tcp {tcp} len {len}");
        }
    }
}
