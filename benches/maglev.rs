//! The Maglev table's two figures that need no switch (the first part of
//! issue 19's `benches/lb`, which will run this): the time to build a
//! table for 1,000 equally weighted backends (median of 21 builds), and
//! the share of 100,000 connections that change backend when one of 100
//! backends is removed (ideal: its own 1 %). Prints
//! `maglev_build_ms=<n> maglev_build_skewed_ms=<n> maglev_disruption_pct=<n>`
//! (skewed: 1,000 backends, one of weight 1,000 and the rest weight 1,
//! the fill's worst case: a round per entry of the heavy backend).

use std::net::Ipv4Addr;
use std::time::Instant;

use coprocessor::maglev::{flow_hash, Backend, Table};

fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<(Backend, u32)> {
    (0..n)
        .map(|i| {
            let b = Backend {
                ip: Ipv4Addr::from(0x0a00_0000 + i),
                port: 8080,
            };
            (b, weight(i))
        })
        .collect()
}

fn median_build_ms(set: &[(Backend, u32)]) -> f64 {
    let mut ms: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let table = Table::build(set).expect("valid set");
            std::hint::black_box(table);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    let even = median_build_ms(&backends(1000, |_| 1));
    let skewed = median_build_ms(&backends(1000, |i| if i == 0 { 1000 } else { 1 }));
    let set = backends(100, |_| 1);
    let before = Table::build(&set).unwrap().unwrap();
    let after = Table::build(&set[1..]).unwrap().unwrap();
    let n = 100_000u32;
    let moved = (0..n)
        .filter(|&i| {
            let src = Ipv4Addr::from(0xc0a8_0000 + i);
            let h = flow_hash(src, 40_000, Ipv4Addr::new(10, 9, 9, 9), 80, 6);
            before.pick(h) != after.pick(h)
        })
        .count();
    println!(
        "maglev_build_ms={even:.2} maglev_build_skewed_ms={skewed:.2} maglev_disruption_pct={:.2}",
        moved as f64 * 100.0 / f64::from(n)
    );
}
