//! The `vswitch` binary. The daemon (`vswitch run --config FILE`), the
//! demo lab and `vswitch ctl` are not built yet; until they are, the
//! binary says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("vswitch {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "vswitch {}: the daemon and the demo lab are not built yet.\n\
         What exists today is the fast-path core (flow table, VXLAN, pipeline).\n\
         Measure it with:  benches/ns-per-packet   and   benches/instructions-per-packet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
