//! `vswitch run`: open the ports, start the threads, serve the control
//! socket, stop cleanly on SIGTERM/SIGINT.
//!
//! Threads: the fast-path threads (each a `Dataplane`, sole owner of its
//! flow table, its frame pool and its queue of every port), a pool of
//! coprocessor threads fed by the punt queues (`coproc`), the neighbour
//! follower (`neighbor`), the metrics thread and the control thread
//! (`control`). They share nothing but bounded queues, the coprocessors'
//! state and a stop flag. Ports are opened by `ports`, or taken from the
//! running switch by `take`.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coprocessor::{Coprocessor, Shared};
use crossbeam_queue::ArrayQueue;
use fastpath::dataplane::{Dataplane, Links, LoopConfig, PollMode};
use fastpath::wake::Wake;
use fastpath::xdp::XdpProgram;
use fastpath::{Pipeline, PipelineConfig, PuntConfig, PuntReceiver};
use flowtable::{FlowTable, PortId};
use tracing::{info, warn};

use crate::config::{Config, Poll};
use crate::take::{self, Takeover};
use crate::{control, coproc, neighbor, ports};

/// Take the switch over from the binary running with `config`'s control
/// socket, then run (see `take`) — with `fastpath_threads` fast-path
/// threads if given, else as many as the running switch has.
pub fn takeover(config: &std::path::Path, fastpath_threads: Option<usize>) -> Result<()> {
    let started = Instant::now();
    let own = Config::load(config)?;
    let socket = own.switch.control_socket.clone();
    let (mut text, epoch_mono_ns) = take::prepare(&socket)?;
    if let Some(n) = fastpath_threads {
        text = crate::config::with_fastpath_threads(&text, n)
            .context("the running switch's configuration")?;
    }
    let cfg = Config::parse(&text).context("the running switch's configuration")?;
    run(
        cfg,
        text,
        Some(take::Takeover {
            socket,
            epoch_mono_ns,
            started,
        }),
    )
}

/// Run until a signal (or `stop`) ends it. With `takeover`, the ports,
/// state and control socket come from the running binary once this one
/// is ready.
pub fn run(cfg: Config, config_text: String, takeover: Option<Takeover>) -> Result<()> {
    let n_fast = cfg.switch.fastpath_threads;
    let kept = crate::privileges::drop_to_needed()?;
    crate::seccomp::prepare_allocator();
    info!(capabilities = ?kept, "running with only these capabilities");
    let built = cfg.build()?;
    let mut topo = built.topo;
    let s = &cfg.switch;
    // Before any port is opened: a second switch on the same config must
    // not take over tap devices or rebind a running one's vhost-user
    // sockets before it finds out.
    if takeover.is_none() && std::os::unix::net::UnixStream::connect(&s.control_socket).is_ok() {
        bail!(
            "control socket {} is in use by a running vswitch",
            s.control_socket.display()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing a signal handler")?;
    }
    if let (Some(u), Some(up)) = (&cfg.uplink, topo.uplink.as_mut()) {
        up.mac = ports::read_mac(&u.interface)?;
    }
    // Cores: this thread, and every thread it starts but the fast path and
    // the coprocessors, keeps off the fast path's core (see `cores`).
    let allowed = crate::cores::allowed().context("reading the process's CPU affinity")?;
    let placement = crate::cores::plan(
        s.fastpath_cores.as_deref(),
        s.coprocessor_cores.as_deref(),
        &allowed,
        n_fast,
    )?;
    if placement
        .fastpath
        .iter()
        .any(|c| placement.coprocessors.contains(c))
    {
        warn!(cores = %crate::cores::list(&placement.fastpath), "switch: fields `fastpath_cores` and `coprocessor_cores` share a core: the busy-polling fast path and the slow path take turns on it");
    }
    crate::cores::pin(&placement.housekeeping).context("pinning the control threads")?;
    info!(
        fastpath = %crate::cores::list(&placement.fastpath),
        coprocessors = %crate::cores::list(&placement.coprocessors),
        others = %crate::cores::list(&placement.housekeeping),
        "cores"
    );

    // The ports (taking over, they come from the running binary once it
    // pauses): each fast-path thread's queues, on its frame pool.
    let pools = ports::frame_pools(&cfg, takeover.is_some())?;
    let (opened, mut port_names) = match &takeover {
        None => (
            ports::open(&cfg, &pools, topo.uplink.as_ref())?,
            cfg.port_ids()?,
        ),
        Some(_) => (ports::Opened::default(), HashMap::new()),
    };
    let ports::Opened {
        ports: mut thread_ports,
        programs,
        vhost: mut vhost_links,
    } = opened;
    thread_ports.resize_with(n_fast, Vec::new);
    let n_ports = u16::try_from(thread_ports[0].len()).context("too many ports")?;

    // The threads' connections: the punt path, the update and report
    // queues, the fast paths' wakeups and request channels, the shared
    // state.
    let (pipelines, punters, punt_rx) = fast_path_parts(&cfg, &topo, n_ports, takeover.is_some())?;
    let mut inboxes = Vec::new();
    let mut request_rxs = Vec::new();
    for _ in 0..n_fast {
        let (requests, rx) = mpsc::channel();
        request_rxs.push(rx);
        inboxes.push(crate::fastpaths::FastPath {
            requests,
            installs: Arc::new(ArrayQueue::new(4096)),
            wake: Arc::new(Wake::new().context("creating the wakeup eventfd")?),
        });
    }
    let fast = crate::fastpaths::FastPaths::new(inboxes);
    for link in &vhost_links {
        link.wake_on_kick(&fast.wakes());
    }
    let mut initial = Shared::new(topo.clone(), built.policy, built.timeouts, built.limits);
    initial.set_services(built.services);
    let shared = Arc::new(coprocessor::SharedLock::new(initial));
    let reports = Arc::new(fastpath::report::Reports::new(
        s.coprocessor_threads,
        coproc::REPORT_QUEUE,
    ));
    let (epoch, epoch_mono_ns) = clock_zero(takeover.as_ref());

    let coproc_loads: Arc<Vec<crate::cores::Load>> = Arc::new(
        (0..s.coprocessor_threads)
            .map(|_| Default::default())
            .collect(),
    );
    let coproc_threads = coproc::spawn(
        &coproc_loads,
        &placement.coprocessors,
        s.seccomp,
        &shared,
        &coproc::CoprocLinks {
            punts: punt_rx.clone(),
            reports: reports.clone(),
            fast: fast.clone(),
            gather: Arc::new(fastpath::report::Gather::new(n_fast)),
            epoch,
            timekeeper: true,
            thread: 0,
            spin: Duration::from_micros(s.coprocessor_spin_us),
        },
        &stop,
    )?;
    let depth_rx = punt_rx.clone();
    let loop_cfg = LoopConfig {
        mode: match s.poll {
            Poll::Busy => PollMode::Busy,
            Poll::Adaptive => PollMode::Adaptive,
        },
        idle_timeout_ns: s.idle_timeout_s.saturating_mul(1_000_000_000),
        ..LoopConfig::default()
    };
    let coprocessors: Vec<thread::Thread> =
        coproc_threads.iter().map(|h| h.thread().clone()).collect();
    let parts = thread_ports
        .into_iter()
        .zip(pipelines)
        .zip(punters)
        .zip(pools)
        .zip(request_rxs);
    let mut fast_threads = Vec::new();
    for (t, ((((ports, pipeline), punter), pool), requests)) in parts.enumerate() {
        let inbox = &fast.iter().nth(t).context("a fast-path thread's inbox")?;
        let links = Links {
            punter,
            recycler: punt_rx.clone(),
            installs: inbox.installs.clone(),
            requests,
            wake: inbox.wake.clone(),
            coprocessors: coprocessors.clone(),
            reports: reports.clone(),
            epoch,
            thread: u16::try_from(t).context("too many fast-path threads")?,
        };
        let mut dp = Dataplane::new(ports, pipeline, links, loop_cfg, pool);
        let dp_stop = stop.clone();
        let confined = s.seccomp;
        let cores = placement.fastpath_thread(t, n_fast);
        fast_threads.push(
            thread::Builder::new()
                .name(format!("fastpath-{t}"))
                .spawn(move || {
                    if let Err(e) = crate::cores::pin(&cores) {
                        tracing::error!(cores = %crate::cores::list(&cores), "switch: field `fastpath_cores`: pinning fast-path thread {t}: {e}");
                        dp_stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    let role = crate::seccomp::Role::FastPath;
                    if crate::seccomp::confine_or_stop(confined, role, &dp_stop) {
                        dp.run(&dp_stop)
                    }
                })
                .context("spawning a fast-path thread")?,
        );
    }
    let neigh = match topo.uplink {
        None => None,
        Some(_) => {
            let (stop, fast, shared) = (stop.clone(), fast.clone(), shared.clone());
            Some(
                thread::Builder::new()
                    .name("neighbors".into())
                    .spawn(move || neighbor::follow(&shared, &fast, &stop))
                    .context("spawning the neighbour thread")?,
            )
        }
    };

    // Taking over: everything is running; now the old binary pauses and
    // hands over its state, ports and control socket.
    let adopted = match &takeover {
        Some(t) => Some(take::adopt(
            t,
            &fast,
            &shared,
            cfg.uplink.as_ref().map(|u| u.interface.as_str()),
            &mut port_names,
            &mut vhost_links,
        )?),
        None => None,
    };
    let (xdp_links, handover_refused) = xdp_links(&programs, adopted.as_ref());
    let socket_maps = socket_maps(&programs, adopted.as_ref());
    let punt_depth: Arc<dyn Fn() -> usize + Send + Sync> = Arc::new(move || depth_rx.depth());
    let metrics_shared = shared.clone();
    let (last_handover, listener, inherited_links, inherited_maps, next_port) = match adopted {
        Some(a) => (
            Some(a.report),
            Some(a.listener),
            a.xdp_links,
            a.socket_maps,
            a.next_port,
        ),
        None => (None, None, Vec::new(), Vec::new(), n_ports),
    };
    let links = crate::links::Links {
        config_text,
        handover_refused,
        xdp_links,
        socket_maps,
        last_handover,
        netlink: neighbor::Netlink::open().ok(),
        next_port,
        epoch_mono_ns,
        fast: fast.clone(),
        coprocessor: Coprocessor::with_shared(shared),
        epoch,
        ports: port_names,
        vhost: vhost_links,
        threads: crate::cores::Threads {
            placement,
            coprocessors: coproc_loads.clone(),
        },
    };
    let taking_over = listener.is_some();
    let mut server = match listener {
        Some(l) => control::Server::inherit(l, links)?,
        None => control::Server::bind(&s.control_socket, links)?,
    };
    if let Some(addr) = s.metrics {
        // Taking over, the address is free once the previous binary exits:
        // the metrics thread binds it then.
        let listener = if taking_over {
            None
        } else {
            Some(crate::metrics_http::bind(addr)?)
        };
        let source = crate::metrics_http::Source {
            fast: fast.clone(),
            shared: metrics_shared,
            punt_depth,
            coprocessor_loads: coproc_loads.clone(),
        };
        crate::metrics_http::spawn(listener, addr, source, stop.clone())
            .context("starting the metrics thread")?;
    }
    info!(socket = %s.control_socket.display(), "vswitch running");
    if polling(&fast) {
        crate::systemd::ready();
    } else {
        warn!("the fast path has not polled within 2 s; not telling systemd the switch is ready");
    }
    server.serve(&stop);

    info!("stopping");
    stop.store(true, Ordering::Relaxed);
    fast.notify();
    for h in fast_threads {
        let _ = h.join();
    }
    if let Some(h) = neigh {
        let _ = h.join();
    }
    // Detach XDP only after the fast path stopped using the socket.
    drop(programs);
    drop(inherited_links);
    drop(inherited_maps);
    for h in coproc_threads {
        h.thread().unpark();
        let _ = h.join();
    }
    // After a handover the socket is the new binary's.
    if !server.handed_over() {
        let _ = std::fs::remove_file(&s.control_socket);
    }
    info!("stopped");
    Ok(())
}

/// Whether every fast-path thread has polled its ports (asked for up to
/// 2 s).
fn polling(fast: &crate::fastpaths::FastPaths) -> bool {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match fast.ask(fastpath::dataplane::Request::Stats) {
            Ok(s) if s.iter().all(|s| s.first_poll_mono_ns.is_some()) => return true,
            Ok(_) => thread::sleep(Duration::from_millis(10)),
            Err(_) => return false,
        }
    }
    false
}

/// Each fast-path thread's pipeline (see [`pipeline`]) and punter, and
/// the punt path's receiving end (see [`punt_path`]). A port's punt budget
/// is shared out between the threads, which receive from it.
#[allow(clippy::type_complexity)]
fn fast_path_parts(
    cfg: &Config,
    topo: &coprocessor::Topology,
    n_ports: u16,
    taking_over: bool,
) -> Result<(Vec<Pipeline>, Vec<fastpath::Punter>, PuntReceiver)> {
    let n = cfg.switch.fastpath_threads.max(1);
    let mut pipelines = Vec::new();
    for _ in 0..n {
        pipelines.push(pipeline(cfg, topo, n_ports, taking_over)?);
    }
    let (punter, rx) = punt_path(cfg, topo, n_ports, n);
    let punters = (0..n)
        .map(|t| punter.for_thread(u16::try_from(t).unwrap_or(u16::MAX)))
        .collect();
    Ok((pipelines, punters, rx))
}

/// A fast-path thread's pipeline, its flow table made ready.
fn pipeline(
    cfg: &Config,
    topo: &coprocessor::Topology,
    n_ports: u16,
    taking_over: bool,
) -> Result<Pipeline> {
    let s = &cfg.switch;
    let mut table = FlowTable::new(s.flow_capacity)?;
    table.set_port_share(s.flow_share());
    if let Err(e) = fastpath::hugepage::advise_flow_table(&table) {
        warn!("flow table on normal pages: {e}");
    }
    // Faulted in now, not by the first insert into each (huge) page: a
    // first packet must not wait for the kernel to zero 2 MiB (measured:
    // the first ~30 flows after a start took 2–30 ms each on a 1M-flow
    // table), and handed-over flows go in without a fault each.
    let started = std::time::Instant::now();
    match fastpath::hugepage::populate_flow_table(&table) {
        Ok(()) => info!(
            mib = table.memory_region().1 >> 20,
            ms = started.elapsed().as_millis(),
            taking_over,
            "flow table memory faulted in"
        ),
        Err(e) => warn!("flow table memory not faulted in ahead: {e}"),
    }
    let uplink_port = topo.uplink.as_ref().map_or(PortId(u16::MAX), |u| u.port);
    let pipeline = Pipeline::new(
        &PipelineConfig {
            // Without an uplink: an id no port has.
            uplink: uplink_port,
            local_vtep: topo
                .uplink
                .as_ref()
                .map_or(std::net::Ipv4Addr::UNSPECIFIED, |u| u.local_vtep),
            udp_port: vxlan::UDP_PORT,
            ports: n_ports,
        },
        table,
    );
    Ok(pipeline)
}

/// The punt path: budgets per port (shared out between `threads`
/// fast-path threads), and per sender behind the uplink and the external
/// port, whose many senders each get a budget of their own (an external
/// network added at run time shares its port's budget).
fn punt_path(
    cfg: &Config,
    topo: &coprocessor::Topology,
    n_ports: u16,
    threads: usize,
) -> (fastpath::Punter, PuntReceiver) {
    let s = &cfg.switch;
    let uplink_port = topo.uplink.as_ref().map_or(PortId(u16::MAX), |u| u.port);
    let share = |v: u64| v.div_ceil(threads as u64);
    let (mut punter, punt_rx) = fastpath::punt_path(
        &PuntConfig {
            rate: share(s.punt_rate),
            burst: share(s.punt_burst),
            // A message holds a whole frame of the underlay's MTU with its
            // outer Ethernet header (a jumbo first packet is run again
            // after its flow is made, not truncated and lost).
            msg_bytes: topo
                .uplink
                .as_ref()
                .map_or(0, |u| usize::from(u.mtu) + 14)
                .max(PuntConfig::default().msg_bytes),
            // A queue per coprocessor thread (`dpif::steer`).
            queues: s.coprocessor_threads,
            ..PuntConfig::default()
        },
        n_ports,
    );
    if topo.uplink.is_some() {
        punter.share_by_sender(uplink_port, true);
    }
    if let Some(e) = &topo.external {
        punter.share_by_sender(e.port, false);
    }
    (punter, punt_rx)
}

/// The fast path's clock zero, and it as CLOCK_MONOTONIC ns. A handed-over
/// switch continues its predecessor's clock, so every stored time (flow
/// use, timers, leases) keeps its meaning.
fn clock_zero(takeover: Option<&Takeover>) -> (Instant, u64) {
    let epoch = match takeover {
        Some(t) => Instant::now()
            .checked_sub(Duration::from_nanos(
                fastpath::dataplane::monotonic_ns().saturating_sub(t.epoch_mono_ns),
            ))
            .unwrap_or_else(Instant::now),
        None => Instant::now(),
    };
    let since = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    (
        epoch,
        fastpath::dataplane::monotonic_ns().saturating_sub(since),
    )
}

/// The bpf_links keeping the XDP programs attached (this binary's and
/// those handed over), passed on in a handover; and why the switch cannot
/// be handed over, if a program is attached without one (old kernels: it
/// would detach with this process).
fn xdp_links(
    programs: &[XdpProgram],
    adopted: Option<&take::Adopted>,
) -> (Vec<i32>, Option<String>) {
    let mut links = Vec::new();
    let mut refused = None;
    for p in programs {
        match p.link_fd() {
            Some(fd) => links.push(fd.as_raw_fd()),
            None => {
                refused = Some(
                    "an XDP program is attached without a bpf_link (kernel < 5.9): it cannot \
                     outlive this process, so the switch cannot be handed over"
                        .to_string(),
                )
            }
        }
    }
    if let Some(a) = adopted {
        links.extend(a.xdp_links.iter().map(|fd| fd.as_raw_fd()));
    }
    (links, refused)
}

/// The XDP programs' socket maps by interface (this binary's and those
/// handed over), passed on in a handover.
fn socket_maps(programs: &[XdpProgram], adopted: Option<&take::Adopted>) -> Vec<(String, i32)> {
    let own = programs
        .iter()
        .filter_map(|p| Some((p.iface.clone(), p.socket_map_fd()?.as_raw_fd())));
    let inherited = adopted.into_iter().flat_map(|a| {
        a.socket_maps
            .iter()
            .filter_map(|(i, m)| Some((i.clone(), m.fd()?.as_raw_fd())))
    });
    own.chain(inherited).collect()
}
