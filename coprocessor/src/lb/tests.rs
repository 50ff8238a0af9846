use super::*;

fn segment(flags: u8, seq: u32, ack: u32, data: usize) -> Vec<u8> {
    let f = fastpath::synth::UdpFlow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: Ipv4Addr::new(10, 0, 0, 1),
        dst_ip: Ipv4Addr::new(10, 0, 0, 100),
        src_port: 1234,
        dst_port: 80,
    };
    let mut b = fastpath::synth::tcp_frame(&f, flags, &vec![7; data]);
    b[38..42].copy_from_slice(&seq.to_be_bytes());
    b[42..46].copy_from_slice(&ack.to_be_bytes());
    b
}

fn tcp_sum_ok(f: &[u8]) -> bool {
    let pseudo = vxlan::checksum::sum(&f[26..34]) + 6 + u32::try_from(f.len() - 34).unwrap();
    vxlan::checksum::fold(pseudo + vxlan::checksum::sum(&f[34..])) == 0xffff
}

#[test]
fn a_reset_takes_the_acknowledged_number_or_acknowledges_the_segment() {
    let r = tcp_reset(&segment(ACK, 5, 900, 10), [2, 0, 0, 0, 0, 0xfe])
        .unwrap()
        .unwrap();
    assert_eq!(r[..6], [2, 0, 0, 0, 0, 1]);
    assert_eq!(r[26..30], [10, 0, 0, 100]);
    assert_eq!(r[30..34], [10, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([r[34], r[35]]), 80);
    assert_eq!(u16::from_be_bytes([r[36], r[37]]), 1234);
    assert_eq!(r[38..42], 900u32.to_be_bytes());
    assert_eq!(r[47], RST);
    assert!(tcp_sum_ok(&r));
    // A SYN of 10 bytes: RST|ACK acknowledging SYN and data.
    let r = tcp_reset(&segment(0x02, 5, 0, 10), [2; 6])
        .unwrap()
        .unwrap();
    assert_eq!(r[47], RST | ACK);
    assert_eq!(r[42..46], 16u32.to_be_bytes());
    assert!(tcp_sum_ok(&r));
    // Never a reset to a reset; garbage is refused, not read past.
    assert_eq!(tcp_reset(&segment(RST, 1, 1, 0), [2; 6]), Ok(None));
    for n in 0..54 {
        assert!(tcp_reset(&segment(ACK, 1, 1, 0)[..n], [2; 6]).is_err());
    }
    let mut lie = segment(ACK, 1, 1, 0);
    lie[16..18].copy_from_slice(&10u16.to_be_bytes());
    assert!(tcp_reset(&lie, [2; 6]).is_err());
}
