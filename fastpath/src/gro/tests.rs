use super::*;
use crate::offload::check;
use crate::offload::tests::{l4_frame, partial};
use crate::port::copy_in;
use proptest::prelude::*;

/// The segments the sender's stack (GSO) makes of a super-frame of
/// `payload` bytes at `mss`, starting at sequence `seq`, source port
/// `sport`; PSH on the super-frame.
fn stream(payload: usize, mss: u16, seq: u32, sport: u16) -> (Vec<u8>, Vec<Vec<u8>>) {
    let data: Vec<u8> = (0..payload)
        .map(|i| (i * 31 % 256).to_le_bytes()[0])
        .collect();
    let mut f = l4_frame(true, &data, seq, ACK | PSH);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    let c = crate::offload::tests::l4_checksum(&f, 14);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    let whole = f.clone();
    let off = partial(&mut f, mss);
    let off = check(&f, off).unwrap();
    if !off.is_gso() {
        return (whole.clone(), vec![whole]);
    }
    let p = crate::gso::plan(&f, &off).unwrap();
    let segs = (0..p.segs)
        .map(|i| {
            let mut d = vec![0u8; 2048];
            let n = crate::gso::write_segment(&f, &p, i, &mut d).unwrap();
            d.truncate(n);
            d
        })
        .collect();
    (whole, segs)
}

/// Coalesce `frames` in a fresh pool: the results, with their metadata.
fn run(frames: &[Vec<u8>]) -> (Vec<(Vec<u8>, Offload)>, usize, FramePool) {
    let mut pool = FramePool::new(256, 2048, false).unwrap();
    let descs: Vec<Desc> = frames
        .iter()
        .map(|f| copy_in(&mut pool, f).unwrap())
        .collect();
    let mut out = Vec::new();
    let merged = coalesce(&mut pool, &descs, |pool, d| {
        let (c, o) = pool.chunk_ro(d.addr).unwrap();
        out.push((c[o..o + d.len as usize].to_vec(), Offload::before(c, o)));
        pool.release(d.addr);
    });
    (out, merged, pool)
}

fn cut(f: &[u8], off: &Offload) -> Vec<Vec<u8>> {
    let mut f = f.to_vec();
    let off = check(&f, *off).unwrap();
    let p = crate::gso::plan(&f, &off).unwrap();
    let r = (0..p.segs)
        .map(|i| {
            let mut d = vec![0u8; 2048];
            let n = crate::gso::write_segment(&f, &p, i, &mut d).unwrap();
            d.truncate(n);
            d
        })
        .collect();
    f.clear();
    r
}

#[test]
fn a_stream_s_segments_become_one_super_frame_like_the_sender_s() {
    let (whole, segs) = stream(20_000, 1448, 77, 40000);
    let (out, merged, pool) = run(&segs);
    assert_eq!((out.len(), merged), (1, segs.len() - 1));
    let (f, off) = &out[0];
    assert_eq!(f.len(), whole.len());
    assert_eq!(f[54..], whole[54..], "the payload in order");
    assert_eq!(f[47], ACK | PSH, "PSH from the last segment");
    assert!(off.needs_csum() && off.is_gso());
    assert_eq!(
        (
            off.gso_size,
            off.hdr_len(f).unwrap(),
            off.csum_start,
            off.csum_offset
        ),
        (1448, 54, 34, 16)
    );
    // Completing the partial checksum gives the sender's.
    let mut done = f.clone();
    crate::offload::complete_checksum(&mut done, off).unwrap();
    assert_eq!(done[50..52], whole[50..52]);
    assert!(vxlan::checksum::ipv4_header_ok(
        f[14..34].try_into().unwrap()
    ));
    assert_eq!(pool.free_count(), 256, "every segment's chunk back");
}

#[test]
fn flows_are_never_merged_together_and_each_keeps_its_order() {
    let (_, a) = stream(6000, 1448, 1, 1111);
    let (_, b) = stream(6000, 1448, 9, 2222);
    let mixed: Vec<Vec<u8>> = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    let (out, _, _) = run(&mixed);
    assert_eq!(out.len(), 2);
    let ports: Vec<u16> = out
        .iter()
        .map(|(f, _)| u16::from_be_bytes([f[34], f[35]]))
        .collect();
    assert_eq!(ports, vec![1111, 2222]);
}

#[test]
fn a_gap_a_bad_checksum_or_a_lone_segment_ends_a_super_frame() {
    let (_, s) = stream(6000, 1448, 1, 1111);
    // Segment 2 missing: 0-1 merge, 3-4 merge.
    let gap = vec![s[0].clone(), s[1].clone(), s[3].clone(), s[4].clone()];
    let (out, _, _) = run(&gap);
    assert_eq!(out.len(), 2);
    // A corrupted segment goes on alone, unchanged.
    let mut bad = s.clone();
    bad[2][60] ^= 0xff;
    let (out, _, _) = run(&bad);
    assert!(out
        .iter()
        .any(|(f, o)| *f == bad[2] && *o == Offload::PLAIN));
    // One segment: as it was.
    let (out, merged, _) = run(&s[..1]);
    assert_eq!((out, merged), (vec![(s[0].clone(), Offload::PLAIN)], 0));
    // Not TCP (a UDP frame): untouched.
    let udp = l4_frame(false, &[1; 100], 0, 0);
    let (out, merged, _) = run(&[udp.clone(), udp.clone()]);
    assert_eq!((out.len(), merged), (2, 0));
}

proptest! {
    /// Cutting a merged super-frame gives back the very segments merged.
    #[test]
    fn segmenting_a_merged_super_frame_gives_back_its_segments(
        payload in 1usize..40_000,
        mss in 500u16..1460,
        seq in any::<u32>(),
    ) {
        let (_, segs) = stream(payload, mss, seq, 3333);
        // As the loop hands them over: a batch at a time.
        let mut again = Vec::new();
        for batch in segs.chunks(BATCH) {
            let (out, merged, _) = run(batch);
            prop_assert_eq!(out.len(), 1);
            prop_assert_eq!(merged, batch.len() - 1);
            let (f, off) = &out[0];
            again.extend(if off.is_gso() { cut(f, off) } else { vec![f.clone()] });
        }
        prop_assert_eq!(again.len(), segs.len());
        for (x, y) in again.iter().zip(&segs) {
            prop_assert_eq!(x, y);
        }
    }
}
