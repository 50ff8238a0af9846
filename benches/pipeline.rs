//! Criterion benchmarks of the fast-path pipeline, in ns per packet:
//! batches of 32 frames of 64 bytes (`Throughput::Elements(32)`).
//! Run through `benches/ns-per-packet`, which prints the table.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

// Shared with the callgrind driver, which uses parts this bench does not.
#[allow(dead_code)]
mod workload;
use workload::{Scenario, Workload, GROUP};

fn bench_scenario(c: &mut Criterion, name: &str, scenario: Scenario, flows: u32) {
    let mut w = Workload::new(scenario, flows);
    w.self_check();
    if flows >= 1_000_000 {
        let mib = w.table().memory_bytes() as f64 / (1024.0 * 1024.0);
        // What a flow costs: the table's memory over the flows it holds at
        // the configured load (an entry is `entry_bytes`, but at load ½
        // every flow also pays for an empty slot).
        let flows = w.table().len().max(1);
        println!(
            "FACT bytes_per_flow={} entry_bytes={} table_1m_mib={mib:.1} flows={} max_probe={} thp_kib={}",
            w.table().memory_bytes() / flows,
            flowtable::FlowTable::entry_size(),
            w.table().len(),
            w.table().max_probe_len(),
            fastpath::hugepage::anon_huge_kib().unwrap_or(0)
        );
    }
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(fastpath::BATCH as u64));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let k = usize::try_from((iters - done).min(GROUP as u64)).unwrap_or(GROUP);
                w.prepare();
                let t = Instant::now();
                std::hint::black_box(w.run(k));
                total += t.elapsed();
                w.drain();
                done += k as u64;
            }
            total
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let only = std::env::var("VSWITCH_BENCH_ONLY").unwrap_or_default();
    let all: [(&str, Scenario, u32); 5] = [
        ("encap_1k", Scenario::Encap, 1_000),
        ("decap_1k", Scenario::Decap, 1_000),
        ("encap_1m", Scenario::Encap, 1_000_000),
        ("decap_1m", Scenario::Decap, 1_000_000),
        ("miss", Scenario::Miss, 1_000),
    ];
    for (name, s, n) in all {
        if only.is_empty() || only.split(',').any(|o| o == name) {
            bench_scenario(c, name, s, n);
        }
    }
}

criterion_group! {
    name = pipeline;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(pipeline);
