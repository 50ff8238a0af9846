//! The `vswitch` binary: the daemon (`vswitch run`) and its control client
//! (`vswitch ctl`).

mod api;
mod changes;
mod command;
mod config;
mod config_build;
mod control;
mod coproc;
mod cores;
mod ctl;
mod daemon;
mod deadline;
mod fastpaths;
mod give;
mod links;
mod metrics;
mod metrics_http;
mod neighbor;
mod ports;
mod privileges;
mod ratelog;
mod seccomp;
mod systemd;
mod take;
mod trace;
mod upgrade;
mod vhost;
mod views;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use command::Command;

#[derive(Parser)]
#[command(
    name = "vswitch",
    version,
    about = "Userspace virtual switch and router"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the switch described by a TOML config.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Take over the switch running with this config's control socket
        /// (live upgrade): its state, tap ports and control socket move
        /// here without closing, then it exits.
        #[arg(long)]
        takeover: bool,
        /// Taking over: run this many fast-path threads instead of the
        /// running switch's count (its configuration, changed so, is
        /// handed on).
        #[arg(long, requires = "takeover")]
        fastpath_threads: Option<usize>,
    },
    /// Upgrade the running switch to the binary at PATH: it is started
    /// with `run --takeover` (detached, logging to LOG), takes the switch
    /// over, and this command reports the handover.
    Upgrade {
        #[arg(long)]
        binary: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// Where the new binary logs (default: beside its config; `-`: here).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Run this many fast-path threads from now on (see `run
        /// --fastpath-threads`).
        #[arg(long)]
        fastpath_threads: Option<usize>,
    },
    /// Check a config file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Query a running switch.
    Ctl {
        /// Control socket of the switch.
        #[arg(long, default_value = "/run/vswitch/vswitch.sock")]
        socket: PathBuf,
        /// The switch's config: its control socket is the one asked.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCmd,
    },
    /// Print shell completions (for packaging).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff, for packaging).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand, Clone)]
enum CtlCmd {
    /// Per-port counters, pipeline counters, punts and drops by reason.
    Stats,
    /// Installed flows with their hit counts and idle time.
    Flows(command::FlowFilter),
    /// Per-port counters and drops by reason.
    Ports,
    /// Networks, VMs and remote endpoints as the switch knows them now.
    Topology,
    /// Every remote endpoint, of one network with `--network` (JSON:
    /// for machines; `topology` shows people the first 10,000).
    Remotes {
        #[arg(long)]
        network: Option<u32>,
    },
    /// DHCP leases.
    Leases,
    /// Add a VM port at run time (attach a VM to it with `apply`): a tap
    /// device, or a vhost-user socket (`--socket`, `--mac`).
    #[command(name = "port-add")]
    PortAdd(command::PortAdd),
    /// Close a port no VM uses.
    #[command(name = "port-remove")]
    PortRemove { name: String },
    /// Remote destinations by traffic, with rates since the previous
    /// query, and whether they go through the gateway VTEP.
    #[command(name = "top-talkers")]
    TopTalkers {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Every decision the switch would take for a packet, without
    /// sending it: e.g. `trace --port tap-a --src 10.0.0.10 --dst
    /// 10.0.0.11 --proto tcp --dport 80`.
    Trace(trace::TracePacket),
    /// Apply a batch of changes (JSON: an array of operations, or an
    /// object with `ops`) from FILE, or standard input; all or nothing.
    Apply { file: Option<PathBuf> },
    /// Tracked connections: state, NAT, the rule that admitted them.
    Conntrack,
    /// Per VM: connections and NAT ports held, refusals; heaviest first.
    Nat,
    /// Security groups and their rules.
    #[command(name = "security-groups", alias = "sg")]
    SecurityGroups,
    /// Load-balanced services: VIPs, backends with weight, state, table
    /// share and live connections.
    Services,
    /// Replace a security group's rules at run time; connections the new
    /// rules refuse are cut at once.
    #[command(name = "security-group-set", alias = "sg-set")]
    SecurityGroupSet {
        name: String,
        /// A rule as FIELD=VALUE pairs, e.g.
        /// "direction=ingress,protocol=tcp,ports=80,cidr=0.0.0.0/0"
        /// (repeat for more; none: deny everything new).
        #[arg(long = "rule")]
        rules: Vec<String>,
    },
}

/// Logs to the journal, with their fields, when systemd connected stderr
/// to it; to stderr as text otherwise.
fn init_logs(filter: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::new(filter);
    if systemd::logs_to_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journal)
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => {
            eprintln!(
                "vswitch: a userspace virtual switch and router.\n\
                 The demo lab (two hypervisors, VMs, VXLAN):  scripts/run   (as root)\n\
                 Run a switch:                               vswitch run --config FILE   (see README)\n\
                 Program and query it:                       vswitch ctl --help\n\
                 Upgrade it live:                            vswitch upgrade --binary NEW --config FILE"
            );
            return ExitCode::from(2);
        }
        Some(Cmd::Run {
            config,
            takeover,
            fastpath_threads,
        }) => config::Config::load_text(&config).and_then(|(c, text)| {
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| c.switch.log.clone());
            init_logs(&filter);
            if takeover {
                daemon::takeover(&config, fastpath_threads)
            } else {
                daemon::run(c, text, None)
            }
        }),
        Some(Cmd::Upgrade {
            binary,
            config,
            log,
            fastpath_threads,
        }) => upgrade::upgrade(&binary, &config, log.as_deref(), fastpath_threads),
        Some(Cmd::Check { config }) => {
            config::Config::load(&config).and_then(|c| c.topology().map(|_| println!("config ok")))
        }
        Some(Cmd::Completions { shell }) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into memory first: the crate panics on a write error (a
            // closed pipe); this way it is an error.
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vswitch", &mut out);
            std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(anyhow::Error::from)
        }
        Some(Cmd::Man) => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(anyhow::Error::from)
        }
        Some(Cmd::Ctl {
            socket,
            config,
            json,
            what,
        }) => {
            let socket = match config {
                Some(c) => match config::Config::load(&c) {
                    Ok(c) => c.switch.control_socket,
                    Err(e) => {
                        eprintln!("vswitch: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
                None => socket,
            };
            let ports_only = matches!(what, CtlCmd::Ports);
            let req = match what {
                CtlCmd::Stats | CtlCmd::Ports => Ok(Command::Stats),
                CtlCmd::Flows(filter) => Ok(Command::Flows { filter }),
                CtlCmd::Topology => Ok(Command::Topology),
                CtlCmd::Remotes { network } => Ok(Command::Remotes { network }),
                CtlCmd::Leases => Ok(Command::Leases),
                CtlCmd::PortAdd(p) => Ok(Command::PortAdd(p)),
                CtlCmd::PortRemove { name } => Ok(Command::PortRemove { name }),
                CtlCmd::TopTalkers { limit } => Ok(Command::TopTalkers { limit: Some(limit) }),
                CtlCmd::Apply { file } => ctl::apply_request(file.as_deref()),
                CtlCmd::Trace(packet) => Ok(Command::Trace { packet }),
                CtlCmd::Conntrack => Ok(Command::Conntrack),
                CtlCmd::Nat => Ok(Command::Nat),
                CtlCmd::SecurityGroups => Ok(Command::SecurityGroups),
                CtlCmd::Services => Ok(Command::Services),
                CtlCmd::SecurityGroupSet { name, rules } => rules
                    .iter()
                    .map(|r| ctl::parse_rule_arg(r))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map(|rules| Command::SecurityGroupSet { name, rules }),
            };
            req.and_then(|r| ctl::ctl(&socket, &r, json, ports_only))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
