//! `vswitch-agent`: see the crate's documentation and the README's
//! "Fleet" section.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vswitch_agent::{agent, controller, layout::DEFAULT_PREFIX, sim, status};

#[derive(Parser)]
#[command(
    name = "vswitch-agent",
    version,
    about = "Programs vswitch hosts from etcd"
)]
struct Cli {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// The key layout's prefix.
    #[arg(long, global = true, default_value = DEFAULT_PREFIX)]
    prefix: String,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Program this host's switch from etcd.
    Run {
        /// This host's name in the layout (`hosts/<host>/…`).
        #[arg(long)]
        host: String,
        /// The switch's control socket.
        #[arg(long, default_value = "/run/vswitch/vswitch.sock")]
        socket: PathBuf,
        /// Seconds the status outlives the agent.
        #[arg(long, default_value_t = 10)]
        lease_ttl_s: i64,
        #[arg(long, default_value_t = 200)]
        status_interval_ms: u64,
        /// How often the host's top talkers are published (Hoverboard).
        #[arg(long, default_value_t = 5000)]
        talkers_interval_ms: u64,
        /// How long changes are gathered into one batch.
        #[arg(long, default_value_t = 2)]
        coalesce_ms: u64,
    },
    /// Hoverboard's controller: promote hot (host, destination) pairs to
    /// direct endpoints, demote idle ones. Several may run; one leads.
    Controller {
        /// This controller's name in the election.
        #[arg(long, default_value = "controller")]
        name: String,
        /// Promote above this rate (kbit/s).
        #[arg(long, default_value_t = 20.0)]
        threshold_kbps: f64,
        /// Demote after this long below the threshold.
        #[arg(long, default_value_t = 30_000)]
        idle_ms: u64,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5)]
        lease_ttl_s: i64,
    },
    /// The agents' status, one line per host (`--json`: as stored).
    Status {
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Simulated hosts: agents applying to in-memory switches, in this
    /// process (for scale tests and benchmarks).
    Model {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// Host i is named `<name>-<i>` with VTEP `<vtep_base> + i`.
        #[arg(long, default_value = "model")]
        name: String,
        #[arg(long, default_value = "10.128.0.1")]
        vtep_base: std::net::Ipv4Addr,
        /// Worker threads stepping the agents.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The agent is one thread (see `agent`); the controller and the
    // simulated hosts use two.
    let rt = match &cli.what {
        What::Run { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vswitch-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.what {
            What::Run {
                host,
                socket,
                lease_ttl_s,
                status_interval_ms,
                talkers_interval_ms,
                coalesce_ms,
            } => {
                agent::run(agent::Options {
                    etcd: cli.etcd,
                    prefix: cli.prefix,
                    host,
                    socket,
                    lease_ttl_s,
                    status_interval: Duration::from_millis(status_interval_ms),
                    talkers_interval: Duration::from_millis(talkers_interval_ms),
                    coalesce: Duration::from_millis(coalesce_ms),
                })
                .await
            }
            What::Controller {
                name,
                threshold_kbps,
                idle_ms,
                interval_ms,
                lease_ttl_s,
            } => {
                controller::run(controller::Options {
                    etcd: cli.etcd,
                    prefix: cli.prefix,
                    name,
                    threshold_bps: threshold_kbps * 1000.0 / 8.0,
                    idle: Duration::from_millis(idle_ms),
                    interval: Duration::from_millis(interval_ms),
                    lease_ttl_s,
                })
                .await
            }
            What::Status { host, json } => {
                status::print(&cli.etcd, &cli.prefix, host.as_deref(), json).await
            }
            What::Model {
                hosts,
                name,
                vtep_base,
                threads,
            } => {
                sim::run(sim::Options {
                    etcd: cli.etcd,
                    prefix: cli.prefix,
                    hosts,
                    name,
                    vtep_base,
                    threads,
                    on_applied: None,
                })
                .await
            }
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
