//! Callgrind and clock driver for the per-segment cost of offloads:
//! `offload_cost gso|gro ROUNDS`.
#![allow(clippy::cast_precision_loss)]
//!
//! - `gso`: a 64,000-byte TCP super-frame behind VXLAN outer headers (as
//!   the pipeline leaves one for the uplink) cut into its 45 MSS-sized
//!   segments, ROUNDS times, in `cut_all` (the segmenter: the copy, the
//!   inner IPv4 and TCP checksums, the outer lengths and checksum).
//! - `gro`: 32 in-order 1,448-byte segments of one flow merged into one
//!   super-frame (in a pool, as the fast path does it), ROUNDS times, in
//!   `merge_all` (each segment's checksums verified, the copy).
//!
//! Collect only those functions (`--toggle-collect=*cut_all*`,
//! `*merge_all*`) and divide by ROUNDS × segments; without valgrind the
//! program prints the nanoseconds per segment it measured itself:
//! `segments=<n> ns_per_segment=<x>`.

use std::time::Instant;

use fastpath::frame::Desc;
use fastpath::offload::Offload;
use fastpath::umem::FramePool;

const PAYLOAD: usize = 64_000;
const MSS: u16 = 1448;

#[inline(never)]
fn cut_all(src: &[u8], plan: &fastpath::gso::Plan, dst: &mut [u8]) -> usize {
    let mut bytes = 0;
    for i in 0..plan.segs {
        bytes += fastpath::gso::write_segment(src, plan, i, dst).unwrap_or(0);
    }
    bytes
}

#[inline(never)]
fn merge_all(pool: &mut FramePool, descs: &[Desc]) -> usize {
    let mut merged = 0;
    fastpath::gro::coalesce(pool, descs, |pool, d| {
        merged += 1;
        pool.release(d.addr);
    });
    merged
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: offload_cost gso|gro ROUNDS";
    let rounds: usize = a.get(2).and_then(|s| s.parse().ok()).expect(usage);
    // The super-frame behind the outer headers the pipeline writes.
    let inner = fastpath::synth::tso_frame(&fastpath::synth::BULK_A_TO_B, PAYLOAD);
    let t = vxlan::Template::new(&vxlan::TemplateSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        local_vtep: std::net::Ipv4Addr::new(192, 168, 0, 1),
        remote_vtep: std::net::Ipv4Addr::new(192, 168, 0, 2),
        vni: 100,
        ttl: 64,
    })
    .unwrap();
    let mut buf = vec![0u8; 64];
    buf.extend_from_slice(&inner);
    let s = vxlan::encap_for_segmentation(&mut buf, 64, t.bytes(), 7).unwrap();
    let whole = &buf[s..];
    let off = Offload {
        flags: Offload::NEEDS_CSUM | Offload::ENCAPSULATED,
        gso_type: Offload::GSO_TCPV4,
        gso_size: MSS,
        csum_start: 50 + 34,
        csum_offset: 16,
    };
    let plan = fastpath::gso::plan(whole, &off).expect("a valid super-frame");
    let start = Instant::now();
    let segments = match a.get(1).map(String::as_str) {
        Some("gso") => {
            let mut dst = vec![0u8; 2048];
            for _ in 0..rounds {
                std::hint::black_box(cut_all(whole, &plan, &mut dst));
            }
            rounds * plan.segs
        }
        Some("gro") => {
            // The first 32 segments of the stream, without the outer
            // headers, as decap leaves them.
            let segs: Vec<Vec<u8>> = (0..32)
                .map(|i| {
                    let mut d = vec![0u8; 2048];
                    let n = fastpath::gso::write_segment(whole, &plan, i, &mut d).unwrap();
                    d[50..n].to_vec()
                })
                .collect();
            let mut pool = FramePool::new(256, 2048, false).unwrap();
            let mut descs = Vec::with_capacity(32);
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..rounds {
                // Received into the pool (not measured), then merged.
                descs.clear();
                descs.extend(
                    segs.iter()
                        .filter_map(|s| fastpath::port::copy_in(&mut pool, s)),
                );
                let t = Instant::now();
                assert_eq!(merge_all(&mut pool, &descs), 1, "one super-frame");
                spent += t.elapsed();
            }
            let n = rounds * segs.len();
            println!(
                "segments={n} ns_per_segment={:.1}",
                spent.as_nanos() as f64 / n as f64
            );
            return;
        }
        _ => panic!("{usage}"),
    };
    let ns = start.elapsed().as_nanos() as f64 / segments as f64;
    println!("segments={segments} ns_per_segment={ns:.1}");
}
