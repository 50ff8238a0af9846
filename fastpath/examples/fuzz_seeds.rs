//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/*`): valid
//! frames of each kind the classifier and decap handle. Run from the
//! repository root: `cargo run -p fastpath --example fuzz_seeds`.

use std::net::Ipv4Addr;
use std::path::Path;

use fastpath::synth::{self, UdpFlow};

fn main() -> std::io::Result<()> {
    let flow = UdpFlow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: Ipv4Addr::new(10, 0, 0, 1),
        dst_ip: Ipv4Addr::new(10, 0, 0, 2),
        src_port: 1234,
        dst_port: 53,
    };
    let udp = synth::udp_frame(&flow, 64);
    let mut tcp = udp.clone();
    tcp[23] = 6;
    let mut icmp = udp.clone();
    icmp[23] = 1;
    icmp[34] = 8;
    let mut frag = udp.clone();
    frag[20] = 0x20;
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    let spec = vxlan::TemplateSpec {
        src_mac: [2, 0xaa, 0, 0, 0, 2],
        dst_mac: [2, 0xaa, 0, 0, 0, 1],
        local_vtep: Ipv4Addr::new(192, 168, 0, 2),
        remote_vtep: Ipv4Addr::new(192, 168, 0, 1),
        vni: 1,
        ttl: 64,
    };
    let vx_udp = synth::vxlan_frame(&udp, &spec, 1);
    let vx_arp = synth::vxlan_frame(&arp, &spec, 2);

    let classify = Path::new("fuzz/corpus/classify");
    let decap = Path::new("fuzz/corpus/vxlan_decap");
    std::fs::create_dir_all(classify)?;
    std::fs::create_dir_all(decap)?;
    // Two selector bytes: the first picks the ingress (bit 0: 0 = uplink,
    // 1 = VM port) and the rewrites of the installed flow, the second its
    // connection tracking and NAT (see `fastpath::synth::fuzz_action`).
    for (name, sel, sel2, frame) in [
        ("vm_udp", 0x01u8, 0u8, &udp),
        ("vm_tcp_ttl", 0x05, 0, &tcp),
        ("vm_icmp_encap", 0x09, 0, &icmp),
        ("vm_fragment", 0x01, 0, &frag),
        ("vm_arp", 0x01, 0, &arp),
        ("uplink_udp_decap", 0x02, 0, &vx_udp),
        ("uplink_arp", 0x00, 0, &vx_arp),
        ("uplink_small_mtu", 0x12, 0, &vx_udp),
        ("vm_tcp_tracked", 0x01, 0x01, &tcp),
        ("vm_udp_snat", 0x05, 0x1d, &udp),
        ("vm_icmp_dnat", 0x01, 0x05, &icmp),
        ("uplink_tcp_tracked_decap", 0x02, 0x03, &vx_udp),
    ] {
        let mut v = vec![sel, sel2];
        v.extend_from_slice(frame);
        std::fs::write(classify.join(name), v)?;
    }
    std::fs::write(decap.join("udp"), &vx_udp)?;
    std::fs::write(decap.join("arp"), &vx_arp)?;
    Ok(())
}
