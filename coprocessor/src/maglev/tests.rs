use super::*;

fn backend(i: u32) -> Backend {
    Backend {
        ip: Ipv4Addr::from(0x0a00_0000 + i),
        port: 8080,
    }
}

fn set(n: u32, weight: impl Fn(u32) -> u32) -> Vec<(Backend, u32)> {
    (0..n).map(|i| (backend(i), weight(i))).collect()
}

/// Each backend's share is within 1 % (relative) of its weight's share.
fn assert_shares_follow_weights(s: &[(Backend, u32)], t: &Table) {
    let total_w: u32 = s.iter().map(|(_, w)| w).sum();
    let counts = t.counts();
    for (b, c) in t.backends().iter().zip(counts) {
        let w = s.iter().find(|(x, _)| x == b).unwrap().1;
        let want = f64::from(w) / f64::from(total_w) * TABLE_SIZE as f64;
        assert!(
            (c as f64 - want).abs() <= want * 0.01,
            "{b:?} weight {w}: {c} entries, {want:.0} wanted"
        );
    }
}

#[test]
fn equal_weights_share_the_table_as_the_paper_says() {
    let s = set(100, |_| 1);
    let t = Table::build(&s).unwrap().unwrap();
    // Round robin: each backend ⌊M/N⌋ or ⌈M/N⌉ entries.
    let (lo, hi) = (TABLE_SIZE / 100, TABLE_SIZE.div_ceil(100));
    assert!(
        t.counts().iter().all(|&c| c == lo || c == hi),
        "{:?}",
        t.counts()
    );
    assert_shares_follow_weights(&s, &t);
}

#[test]
fn weighted_backends_get_their_weights_share_and_drained_ones_none() {
    let s = set(50, |i| [1, 2, 3, 5, 8][i as usize % 5]);
    let t = Table::build(&s).unwrap().unwrap();
    assert_shares_follow_weights(&s, &t);
    // Weight 0: drained, no new connections.
    let mut d = s.clone();
    d[7].1 = 0;
    let t = Table::build(&d).unwrap().unwrap();
    let i = t.backends().iter().position(|b| *b == backend(7)).unwrap();
    assert_eq!(t.counts()[i], 0);
    assert_shares_follow_weights(&d, &t);
}

#[test]
fn the_order_backends_are_listed_in_does_not_matter() {
    let s = set(30, |i| 1 + i % 3);
    let mut r = s.clone();
    r.reverse();
    r.swap(3, 17);
    assert_eq!(Table::build(&s).unwrap(), Table::build(&r).unwrap());
}

#[test]
fn removing_one_of_100_backends_moves_little_more_than_its_own_connections() {
    let s = set(100, |_| 1);
    let before = Table::build(&s).unwrap().unwrap();
    let gone = backend(42);
    let after = Table::build(
        &s.iter()
            .copied()
            .filter(|(b, _)| *b != gone)
            .collect::<Vec<_>>(),
    )
    .unwrap()
    .unwrap();
    let mut moved = 0;
    let mut others_moved = 0;
    let n = 100_000u32;
    for i in 0..n {
        let h = flow_hash(
            Ipv4Addr::from(0xc0a8_0000 + i),
            40_000 + (i % 20_000) as u16,
            Ipv4Addr::new(10, 9, 9, 9),
            80,
            6,
        );
        let (a, b) = (before.pick(h), after.pick(h));
        if a != b {
            moved += 1;
            if a != gone {
                others_moved += 1;
            }
        }
    }
    let pct = f64::from(moved) * 100.0 / f64::from(n);
    // Ideal: only the removed backend's ~1 %.
    assert!(pct <= 2.0, "{pct:.2} % of connections changed backend");
    assert!(
        f64::from(others_moved) * 100.0 / f64::from(n) <= 1.0,
        "{others_moved} connections of remaining backends moved"
    );
}

#[test]
fn hostile_or_empty_sets_give_no_table_or_an_error() {
    assert_eq!(Table::build(&[]), Ok(None));
    assert_eq!(Table::build(&set(3, |_| 0)), Ok(None), "all drained");
    let mut dup = set(3, |_| 1);
    dup.push((backend(1), 5));
    assert_eq!(
        Table::build(&dup),
        Err(MaglevError::Duplicate(backend(1).ip, 8080))
    );
    assert_eq!(
        Table::build(&set(u32::try_from(MAX_BACKENDS).unwrap() + 1, |_| 1)),
        Err(MaglevError::TooMany(MAX_BACKENDS + 1))
    );
    assert_eq!(
        Table::build_sized(&set(3, |_| 1), 65_536),
        Err(MaglevError::BadSize(65_536))
    );
    assert_eq!(
        Table::build_sized(&set(3, |_| 1), 3),
        Err(MaglevError::BadSize(3))
    );
    // Extreme weights still fill the table and give the light one a turn.
    let t = Table::build_sized(&[(backend(0), u32::MAX), (backend(1), 1)], 7)
        .unwrap()
        .unwrap();
    assert_eq!(t.entries().len(), 7);
    assert!(t.entries().iter().all(|&e| e < 2));
}

/// The hash is part of the contract between hosts and versions: a change
/// here moves every connection of every service. These values were
/// computed by this implementation; they must never change.
#[test]
fn the_hash_is_frozen() {
    assert_eq!(hash64(b"", 0), hash64(b"", 0));
    let golden = [
        hash64(&[10, 0, 0, 1, 0x1f, 0x90], 0),
        hash64(&[10, 0, 0, 1, 0x1f, 0x90], 1),
        flow_hash(
            Ipv4Addr::new(192, 168, 0, 1),
            40000,
            Ipv4Addr::new(10, 0, 0, 100),
            80,
            6,
        ),
    ];
    assert_eq!(golden, GOLDEN);
    let t = Table::build_sized(&set(3, |i| i + 1), 13).unwrap().unwrap();
    assert_eq!(t.entries(), GOLDEN_TABLE);
}

const GOLDEN: [u64; 3] = [
    14202478336201347767,
    12676369898468416580,
    9845475481227495974,
];
const GOLDEN_TABLE: &[u16] = &[1, 1, 0, 1, 2, 2, 2, 2, 2, 0, 2, 2, 1];
