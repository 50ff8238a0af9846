//! Callgrind driver: `instr SCENARIO FLOWS BATCHES` builds a workload and
//! processes BATCHES batches; only `Workload::run` is meant to be
//! collected (`--toggle-collect=*Workload*run*`), so the instruction count
//! divided by BATCHES × 32 is the cost per packet of the pipeline alone.

mod workload;
use workload::{Scenario, Workload, GROUP};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: instr encap|decap|miss FLOWS BATCHES";
    let scenario = args.get(1).and_then(|s| Scenario::parse(s)).expect(usage);
    let flows: u32 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let batches: usize = args.get(3).and_then(|s| s.parse().ok()).expect(usage);
    let mut w = Workload::new(scenario, flows);
    w.self_check();
    let mut left = batches;
    let mut sent = 0;
    while left > 0 {
        let k = left.min(GROUP);
        w.prepare();
        sent += w.run(k);
        w.drain();
        left -= k;
    }
    println!(
        "batches={batches} packets={} sent={sent} flows={}",
        batches * fastpath::BATCH,
        w.table().len()
    );
}
