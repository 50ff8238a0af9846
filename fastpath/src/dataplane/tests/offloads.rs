//! Offloads through the loop: super-frames and partial checksums from a
//! port that gives them, to ports that take them or do not.

use super::*;
use crate::offload::tests::{l4_checksum, l4_frame, partial};
use crate::offload::Offload;
use crate::DropReason;

/// A 64 KiB-class TCP super-frame (`payload` bytes, MSS 1448) as a tap
/// with offloads hands it over, on the flow of `frame(4000)`'s addresses.
fn super_frame(payload: usize) -> (Vec<u8>, Offload) {
    let data: Vec<u8> = (0..payload).map(|i| (i % 253).to_le_bytes()[0]).collect();
    let mut f = l4_frame(true, &data, 1_000_000, 0x18);
    f[26..30].copy_from_slice(&[10, 0, 0, 10]);
    f[30..34].copy_from_slice(&[10, 0, 0, 11]);
    let c = !vxlan::checksum::fold(vxlan::checksum::sum(&{
        let mut h = f[14..34].to_vec();
        h[10..12].fill(0);
        h
    }));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let off = partial(&mut f, 1448);
    (f, off)
}

impl Rig {
    fn set_offloads(&mut self, port: usize, on: bool) {
        match &mut self.dp.ports[port].io {
            PortIo::Memory(m) => m.offloads = on,
            other => panic!("{other:?}"),
        }
    }

    fn receive_offloaded(&mut self, port: usize, f: Vec<u8>, off: Offload) {
        match &mut self.dp.ports[port].io {
            PortIo::Memory(m) => m.offloaded.push_back((f, off)),
            other => panic!("{other:?}"),
        }
        self.dp.poll_once();
    }

    /// The key of the flow of super-frame `f` (received, punted as
    /// segments, the punts put back).
    fn key_of(&mut self, f: Vec<u8>, off: Offload) -> FlowKey {
        self.receive_offloaded(0, f, off);
        let msg = self.punts.recv().expect("punted");
        let key = msg.key.unwrap();
        self.dp.links.recycler.recycle(msg);
        while let Some(m) = self.punts.recv() {
            self.dp.links.recycler.recycle(m);
        }
        key
    }

    fn sent_with_off(&mut self, port: usize) -> Vec<(Vec<u8>, Offload)> {
        match &mut self.dp.ports[port].io {
            PortIo::Memory(m) => std::mem::take(&mut m.sent)
                .into_iter()
                .zip(std::mem::take(&mut m.sent_off))
                .collect(),
            other => panic!("{other:?}"),
        }
    }
}

/// The segments of a TCP stream: each checksum right, payloads in order.
fn assert_segments(segs: &[(Vec<u8>, Offload)], inner: usize, payload: usize) {
    let mut joined = 0;
    for (s, off) in segs {
        assert_eq!(*off, Offload::PLAIN, "a plain frame for a plain port");
        assert!(s.len() <= inner + 14 + 20 + 20 + 1448);
        assert_eq!(
            u16::from_be_bytes([s[inner + 50], s[inner + 51]]),
            l4_checksum(s, inner + 14)
        );
        joined += s.len() - inner - 54;
    }
    assert_eq!(joined, payload);
}

#[test]
fn a_super_frame_is_cut_into_checksummed_segments_for_a_port_without_offloads() {
    let mut r = rig();
    r.set_offloads(0, true);
    let (f, off) = super_frame(60_000);
    r.receive_offloaded(0, f.clone(), off);
    let msg = r.punts.recv().expect("the first segment is punted");
    assert!(
        msg.data.len() <= 14 + 40 + 1448,
        "a segment, not the super-frame"
    );
    assert!(msg.is_whole(), "whole");
    r.apply(answer(msg, 0));
    let mut out = r.sent_with_off(1);
    // Segments after the first missed too, before the flow was in; the
    // next super-frame goes straight through.
    while let Some(m) = r.punts.recv() {
        r.dp.links.recycler.recycle(m);
    }
    out.clear();
    r.receive_offloaded(0, f, off);
    let out = r.sent_with_off(1);
    assert_eq!(out.len(), 60_000usize.div_ceil(1448));
    assert_segments(&out, 0, 60_000);
    let s = r.stats();
    // (The first super-frame's segments were cut on the punt path.)
    assert_eq!(s.ports[1].2.tx_segments, 42);
    assert_eq!(s.ports[1].2.tx_offload_dropped, 0);
    assert_eq!(
        r.dp.pool.big_free_count(),
        crate::umem::BIG_CHUNKS,
        "every big chunk back"
    );
}

#[test]
fn a_super_frame_goes_whole_to_a_port_that_takes_offloads() {
    let mut r = rig();
    r.set_offloads(0, true);
    r.set_offloads(1, true);
    let (f, off) = super_frame(30_000);
    let msg = {
        r.receive_offloaded(0, f.clone(), off);
        r.punts.recv().expect("punted")
    };
    r.apply(answer(msg, 0));
    while let Some(m) = r.punts.recv() {
        r.dp.links.recycler.recycle(m);
    }
    let _ = r.sent_with_off(1);
    r.receive_offloaded(0, f.clone(), off);
    let out = r.sent_with_off(1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, f, "unchanged");
    assert!(out[0].1.is_gso() && out[0].1.needs_csum());
    assert_eq!(out[0].1.gso_size, 1448);
    assert_eq!(out[0].1.hdr_len(&out[0].0), Some(54));
}

#[test]
fn an_encapsulated_super_frame_leaves_as_vxlan_segments_with_the_flow_s_source_port() {
    let mut r = rig();
    r.set_offloads(0, true);
    let (f, off) = super_frame(20_000);
    let key = r.key_of(f.clone(), off);
    // Encap out of port 1, with source NAT on the way.
    let action = crate::synth::fuzz_action(8 | (1 << 6), 1 | 4 | 8 | 16, 0);
    r.apply(Update {
        flows: vec![(key, action)],
        ..Update::default()
    });
    r.receive_offloaded(0, f, off);
    let out = r.sent_with_off(1);
    assert_eq!(out.len(), 20_000usize.div_ceil(1448));
    assert_segments(&out, vxlan::OUTER_LEN, 20_000);
    let sport = u16::from_be_bytes([out[0].0[34], out[0].0[35]]);
    for (s, _) in &out {
        assert_eq!(u16::from_be_bytes([s[34], s[35]]), sport);
        assert_eq!(s[50 + 26..50 + 30], [203, 0, 113, 10], "source NATed");
        let ip: &[u8; 20] = s[14..34].try_into().unwrap();
        assert!(vxlan::checksum::ipv4_header_ok(ip));
    }
}

#[test]
fn a_partial_checksum_is_completed_for_a_port_without_offloads_and_on_the_punt_path() {
    let mut r = rig();
    r.set_offloads(0, true);
    let payload = [5u8; 300];
    let mut f = l4_frame(true, &payload, 1, 0x18);
    f[26..30].copy_from_slice(&[10, 0, 0, 10]);
    f[30..34].copy_from_slice(&[10, 0, 0, 11]);
    let mut h = f[14..34].to_vec();
    h[10..12].fill(0);
    let c = vxlan::checksum::checksum(&h);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let whole = {
        let mut w = f.clone();
        let c = l4_checksum(&w, 14);
        w[50..52].copy_from_slice(&c.to_be_bytes());
        w
    };
    let off = partial(&mut f, 0);
    r.receive_offloaded(0, f.clone(), off);
    let msg = r.punts.recv().expect("punted");
    assert_eq!(msg.data, whole, "the coprocessor sees the completed frame");
    r.apply(answer(msg, 0));
    assert_eq!(r.sent(1), vec![whole.clone()]);
    r.receive_offloaded(0, f, off);
    assert_eq!(r.sent(1), vec![whole]);
    assert_eq!(r.stats().ports[1].2.tx_csum_completed, 1);
}

#[test]
fn hostile_offload_metadata_is_dropped_and_counted_by_reason() {
    let mut r = rig();
    r.set_offloads(0, true);
    let (f, off) = super_frame(10_000);
    let cases = [
        (
            Offload { gso_size: 0, ..off },
            DropReason::OffloadBadGsoSize,
        ),
        (
            Offload { gso_type: 3, ..off },
            DropReason::OffloadBadGsoType,
        ),
        (
            Offload {
                csum_start: 60_000,
                ..off
            },
            DropReason::OffloadBadCsumOffsets,
        ),
        (
            Offload { gso_size: 8, ..off },
            DropReason::OffloadTooManySegments,
        ),
        (
            Offload {
                csum_offset: 6,
                ..off
            },
            DropReason::OffloadBadHeaders,
        ),
    ];
    for (o, reason) in cases {
        r.receive_offloaded(0, f.clone(), o);
        assert_eq!(r.dp.pipeline.counters().drops.get(reason), 1, "{reason:?}");
    }
    assert!(r.punts.recv().is_none());
    assert!(r.sent(1).is_empty());
    assert_eq!(r.dp.pool.big_free_count(), crate::umem::BIG_CHUNKS);
}

#[test]
fn a_super_frame_whose_segments_do_not_fit_the_path_is_punted_as_too_big() {
    let mut r = rig();
    r.set_offloads(0, true);
    let (f, off) = super_frame(20_000);
    let key = r.key_of(f.clone(), off);
    // The path takes 1,000-byte frames: 1,448-byte segments (1,502 with
    // their headers) do not fit, though the super-frame's first bytes would.
    r.apply(Update {
        flows: vec![(
            key,
            Action {
                max_len: 1000,
                ..Action::output(PortId(1))
            },
        )],
        ..Update::default()
    });
    r.receive_offloaded(0, f.clone(), off);
    let m = r.punts.recv().expect("punted for its size");
    assert_eq!(m.reason, PuntReason::TooBig);
    assert!(r.sent(1).is_empty());
    r.dp.links.recycler.recycle(m);
    // Segments that fit (MSS 900) go through, cut for the plain port.
    let mut g = f;
    let small = partial(&mut g, 900);
    r.receive_offloaded(0, g, small);
    let out = r.sent_with_off(1);
    assert_eq!(out.len(), 20_000usize.div_ceil(900));
    assert!(out.iter().all(|(s, _)| s.len() <= 1000));
    assert!(r.punts.recv().is_none());
}
