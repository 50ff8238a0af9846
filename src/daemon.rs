//! `vswitch run`: open the ports, start the threads, serve the control
//! socket, stop cleanly on SIGTERM/SIGINT.
//!
//! Threads: one fast-path thread (the `Dataplane`, sole owner of its flow
//! table), a pool of coprocessor threads fed by the punt queue, and the
//! control thread. They share nothing but bounded queues and a stop flag.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coprocessor::{Coprocessor, Shared};
use crossbeam_queue::ArrayQueue;

use crate::install::send_update;
use fastpath::dataplane::{
    Dataplane, Links, LoopConfig, PollMode, Port, PortCounters, PortIo, Report, Update,
};
use fastpath::tap::Tap;
use fastpath::umem::FramePool;
use fastpath::wake::Wake;
use fastpath::xdp::XdpProgram;
use fastpath::xsk::{XskConfig, XskSocket};
use fastpath::{punt_path, Pipeline, PipelineConfig, PuntConfig, PuntReceiver};
use flowtable::{FlowTable, PortId};
use tracing::{info, warn};

use crate::config::{Config, Poll, PortType};
use crate::control;
use crate::neighbor;
use crate::take::TakenPort;

/// A takeover in progress: this binary prepares everything, then asks
/// the running one (on `socket`) for its state and ports.
pub struct Takeover {
    pub socket: std::path::PathBuf,
    /// CLOCK_MONOTONIC at the running switch's clock zero, which this one
    /// continues.
    pub epoch_mono_ns: u64,
    pub started: Instant,
}

/// Take the switch over from the binary running with `config`'s control
/// socket, then run (see `handover`).
pub fn takeover(config: &std::path::Path) -> Result<()> {
    let started = Instant::now();
    let own = Config::load(config)?;
    let socket = own.switch.control_socket.clone();
    let (text, epoch_mono_ns) = crate::take::prepare(&socket)?;
    let cfg = Config::parse(&text).context("the running switch's configuration")?;
    run(
        cfg,
        text,
        Some(Takeover {
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
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())
        .context("installing SIGTERM handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("installing SIGINT handler")?;

    // Frames of every port live in one pool; AF_XDP sockets (uplink and
    // VM ports) register it as their UMEM, so frames cross ports uncopied.
    // Taking over, the previous binary's pool is adopted: a placeholder
    // until then (dropping a populated 16 MiB one would cost the blackout
    // milliseconds).
    // 8 192 chunks for the uplink and the tap and vhost-user ports, and
    // for each af-xdp VM port its fill share and as much again in flight.
    let vm_xsk = cfg
        .ports
        .iter()
        .filter(|p| p.kind == crate::config::PortType::AfXdp)
        .count();
    let chunks = 8192 + 2 * fastpath::dataplane::VM_FILL_SHARE * vm_xsk;
    let pool = match &takeover {
        None => FramePool::new(
            u32::try_from(chunks).context("field `port`: too many af-xdp ports")?,
            2048,
            true,
        ),
        Some(_) => FramePool::new(1, 2048, false),
    }
    .context("allocating the frame pool")?;
    info!(
        huge_pages = pool.region().huge(),
        mib = pool.region().len() >> 20,
        "frame pool"
    );
    // XDP programs stay attached while they (or, after a handover, their
    // links) are held.
    let mut ports = Vec::new();
    let mut port_names = cfg.port_ids()?;
    if takeover.is_some() {
        // The ports come from the running binary, added once it pauses.
        port_names.clear();
    }
    let mut programs: Vec<XdpProgram> = Vec::new();
    let mut vhost_links = Vec::new();
    for (i, p) in cfg.ports.iter().enumerate().filter(|_| takeover.is_none()) {
        let what = || format!("port[{i}] ({})", p.name);
        let io = match p.kind {
            PortType::Tap => PortIo::Tap(Tap::open(&p.name).with_context(what)?),
            PortType::VhostUser => {
                let (link, io) = crate::vhost::open(vhost_spec(&cfg, p)?).with_context(what)?;
                info!(port = %p.name, socket = %link.spec.socket.display(), mode = ?link.spec.mode, "vhost-user port");
                vhost_links.push(link);
                io
            }
            PortType::AfXdp => {
                let ifindex = fastpath::xsk::ifindex(&p.name).with_context(what)?;
                let sock =
                    XskSocket::open(ifindex, 0, &pool, XskConfig::default()).with_context(what)?;
                let mut prog = XdpProgram::attach_all(&p.name).with_context(what)?;
                prog.register_socket(0, sock.fd()).with_context(what)?;
                programs.push(prog);
                PortIo::Xsk(sock)
            }
        };
        ports.push(Port {
            id: PortId(u16::try_from(i).context("too many ports")?),
            name: p.name.clone(),
            io,
            counters: PortCounters::default(),
        });
        info!(port = %p.name, id = i, kind = ?p.kind, "port open");
    }
    if let (Some(u), Some(up)) = (&cfg.uplink, topo.uplink.as_mut()) {
        up.mac = read_mac(&u.interface)?;
    }
    if let (Some(u), Some(up), None) = (&cfg.uplink, topo.uplink.as_ref(), &takeover) {
        let ifindex = fastpath::xsk::ifindex(&u.interface)
            .with_context(|| format!("uplink: interface {:?}", u.interface))?;
        let sock = XskSocket::open(ifindex, 0, &pool, XskConfig::default())
            .with_context(|| format!("uplink: AF_XDP socket on {} queue 0", u.interface))?;
        let mut prog = XdpProgram::attach(&u.interface, u.vtep, vxlan::UDP_PORT)
            .with_context(|| format!("uplink: XDP on {}", u.interface))?;
        prog.register_socket(0, sock.fd())?;
        info!(interface = %u.interface, vtep = %u.vtep, mode = prog.mode, "uplink attached");
        ports.push(Port {
            id: up.port,
            name: u.interface.clone(),
            io: PortIo::Xsk(sock),
            counters: PortCounters::default(),
        });
        programs.push(prog);
    }
    let n_ports = u16::try_from(ports.len()).context("too many ports")?;
    let uplink_port = topo.uplink.as_ref().map_or(PortId(u16::MAX), |u| u.port);
    let local_vtep = topo
        .uplink
        .as_ref()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED, |u| u.local_vtep);

    let mut table = FlowTable::new(s.flow_capacity)?;
    table.set_port_share(s.flow_share());
    if let Err(e) = fastpath::hugepage::advise_flow_table(&table) {
        warn!("flow table on normal pages: {e}");
    }
    if takeover.is_some() {
        // Handed-over flows go in without a page fault each.
        if let Err(e) = fastpath::hugepage::populate_flow_table(&table) {
            warn!("flow table memory not faulted in ahead: {e}");
        }
    }
    let pipeline = Pipeline::new(
        &PipelineConfig {
            // Without an uplink: an id no port has.
            uplink: uplink_port,
            local_vtep,
            udp_port: vxlan::UDP_PORT,
            ports: n_ports,
        },
        table,
    );
    let (mut punter, punt_rx) = punt_path(
        &PuntConfig {
            rate: s.punt_rate,
            burst: s.punt_burst,
            ..PuntConfig::default()
        },
        n_ports,
    );
    // Many senders share the uplink and the external port: each has a
    // budget of its own there (an external network added at run time
    // shares its port's budget).
    if topo.uplink.is_some() {
        punter.share_by_sender(uplink_port, true);
    }
    if let Some(e) = &topo.external {
        punter.share_by_sender(e.port, false);
    }
    let installs = Arc::new(ArrayQueue::new(4096));
    let installs_for_control = installs.clone();
    let wake = Arc::new(Wake::new().context("creating the wakeup eventfd")?);
    for link in &vhost_links {
        link.wake_on_kick(&wake);
    }
    let (req_tx, req_rx) = mpsc::channel();

    // Leases, policy, connections, NAT: one state for all coprocessor
    // threads (and the control thread's policy changes).
    let shared = Arc::new(std::sync::Mutex::new(Shared::new(
        topo.clone(),
        built.policy,
        built.timeouts,
        built.limits,
    )));
    let reports = Arc::new(ArrayQueue::new(REPORT_QUEUE));
    // A handed-over switch continues its predecessor's clock, so every
    // stored time (flow use, timers, leases) keeps its meaning.
    let epoch = match &takeover {
        Some(t) => Instant::now()
            .checked_sub(Duration::from_nanos(
                fastpath::dataplane::monotonic_ns().saturating_sub(t.epoch_mono_ns),
            ))
            .unwrap_or_else(Instant::now),
        None => Instant::now(),
    };
    let epoch_mono_ns = fastpath::dataplane::monotonic_ns()
        .saturating_sub(u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(0));
    let mut coproc_threads = Vec::new();
    for i in 0..s.coprocessor_threads {
        let mut cp = Coprocessor::with_shared(shared.clone());
        let links = CoprocLinks {
            punts: punt_rx.clone(),
            reports: reports.clone(),
            installs: installs.clone(),
            wake: wake.clone(),
            epoch,
            // One thread keeps the connection timers.
            timekeeper: i == 0,
        };
        let stop = stop.clone();
        let h = thread::Builder::new()
            .name(format!("coproc-{i}"))
            .spawn(move || coprocessor_loop(&mut cp, &links, &stop))
            .context("spawning a coprocessor thread")?;
        coproc_threads.push(h);
    }

    let depth_rx = punt_rx.clone();
    let links = Links {
        punter,
        recycler: punt_rx,
        installs,
        requests: req_rx,
        wake: wake.clone(),
        coprocessors: coproc_threads.iter().map(|h| h.thread().clone()).collect(),
        reports,
        epoch,
    };
    let loop_cfg = LoopConfig {
        mode: match s.poll {
            Poll::Busy => PollMode::Busy,
            Poll::Adaptive => PollMode::Adaptive,
        },
        idle_timeout_ns: s.idle_timeout_s.saturating_mul(1_000_000_000),
        ..LoopConfig::default()
    };
    let mut dp = Dataplane::new(ports, pipeline, links, loop_cfg, pool);
    let dp_stop = stop.clone();
    let fast = thread::Builder::new()
        .name("fastpath-0".into())
        .spawn(move || dp.run(&dp_stop))
        .context("spawning the fast-path thread")?;

    let neigh = if topo.uplink.is_none() {
        None
    } else {
        let (stop, req, wake) = (stop.clone(), req_tx.clone(), wake.clone());
        let nshared = shared.clone();
        Some(
            thread::Builder::new()
                .name("neighbors".into())
                .spawn(move || neighbor_loop(&nshared, &req, &wake, &stop))
                .context("spawning the neighbour thread")?,
        )
    };

    let ctl_cp = Coprocessor::with_shared(shared);
    let depth_rx = depth_rx;
    // Taking over: everything is running; now the old binary pauses and
    // hands over its state, ports and control socket.
    let mut last_handover = None;
    let mut inherited_listener = None;
    let mut inherited_links: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut next_port = n_ports;
    if let Some(t) = &takeover {
        let taken = crate::take::take(&t.socket)?;
        // Pre-copy (the old binary still forwards): the state, the flows
        // in the held fast path, the pool and the sockets' rings mapped.
        send_request(&req_tx, &wake, fastpath::dataplane::Request::Hold)?;
        let carried = taken.state.shared.conns.len();
        let flows = taken.state.flows.len() + taken.flows.len();
        let state = taken.state;
        let warm = fastpath::dataplane::Warm {
            hash_seed: taken.hash_seed,
            actions: state.actions,
            flows: Box::new(
                state
                    .flows
                    .into_records()
                    .chain(taken.flows.into_records())
                    .map(|r| (r.key, r.action, r.stats)),
            ),
        };
        let (warm_tx, warm_rx) = mpsc::channel();
        send_request(
            &req_tx,
            &wake,
            fastpath::dataplane::Request::Restore(Box::new(warm), warm_tx),
        )?;
        // The shared state meanwhile, on this thread.
        let restored = Shared::restore(state.shared, state.clock_ns)
            .map_err(|e| anyhow::anyhow!("restoring the handed-over state: {e}"))?;
        *coprocessor::lock(ctl_cp.shared()) = restored;
        let region = fastpath::umem::Region::from_fd(
            taken.pool.fd.try_clone()?,
            taken.pool.len,
            taken.pool.huge,
        )
        .context("mapping the handed-over frame pool")?;
        let uplink_name = cfg.uplink.as_ref().map(|u| u.interface.as_str());
        let mut adopted = Vec::new();
        for (id, (name, taken_port)) in taken.ports.into_iter().enumerate() {
            let id = PortId(u16::try_from(id).context("too many ports")?);
            let closed = matches!(taken_port, TakenPort::Closed);
            let io = match taken_port {
                TakenPort::Tap(fd) => PortIo::Tap(Tap::from_fd(fd, &name)),
                TakenPort::Xsk { fd, ring_size } => PortIo::Xsk(
                    XskSocket::from_fd(fd, ring_size)
                        .with_context(|| format!("port {name}: the handed-over AF_XDP socket"))?,
                ),
                // Its connection comes with the pause.
                TakenPort::VhostUser | TakenPort::Closed => PortIo::Closed,
            };
            if uplink_name != Some(name.as_str()) && !closed {
                port_names.insert(name.clone(), id);
            }
            adopted.push(Port {
                id,
                name,
                io,
                counters: PortCounters::default(),
            });
            next_port = id.0 + 1;
        }
        // The flows are in before the pause, so it does not wait for them.
        let (_, refused, same_hash) = warm_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the fast path did not take the flows in within 30 s")?;
        if refused > 0 {
            warn!(refused, "handed-over flows that did not fit the flow table");
        }
        if !same_hash {
            warn!("the flow table was not empty: flows get new VXLAN source ports");
        }
        let precopy_done = fastpath::dataplane::monotonic_ns();
        // The pause: the old binary stops polling and says which frames
        // are free; the ports and the pool go to the fast path at once.
        let pause = crate::take::ready(&taken.conn)?;
        for (p, c) in adopted.iter_mut().zip(pause.counters) {
            p.counters = c;
        }
        // The vhost-user connections: each set up again in a fresh
        // request handler (the VMM notices nothing), its rings published
        // before the fast path gets the port.
        for given in pause.vhost {
            let port = adopted
                .iter_mut()
                .find(|p| p.name == given.spec.name)
                .with_context(|| {
                    format!(
                        "vhost-user port {} is not among the handed-over ports",
                        given.spec.name
                    )
                })?;
            let (link, io) = crate::vhost::adopt(given)?;
            link.wake_on_kick(&wake);
            port.io = io;
            vhost_links.push(link);
        }
        let pool = FramePool::adopt(region, taken.pool.chunk_size, pause.free)
            .context("adopting the handed-over frame pool")?;
        ask_fast_path(&req_tx, &wake, |tx| {
            fastpath::dataplane::Request::Adopt(
                Box::new(fastpath::dataplane::Adoption {
                    pool,
                    ports: adopted,
                    counters: Some(pause.pipeline),
                }),
                tx,
            )
        })?;
        let adopted_mono_ns = fastpath::dataplane::monotonic_ns();
        inherited_links = taken.xdp_links;
        crate::take::confirm(&taken.conn, taken.confirm_ack)?;
        let (tx, rx) = mpsc::channel();
        send_request(
            &req_tx,
            &wake,
            fastpath::dataplane::Request::Resume(Some(tx)),
        )?;
        let first = rx
            .recv_timeout(Duration::from_secs(2))
            .context("the fast path did not poll within 2 s of the handover")?;
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
        let blackout_us = us(pause.paused_mono_ns, first);
        let v = serde_json::json!({"blackout_us": blackout_us,
            "phases_us": {
                "pause_and_pack": us(pause.paused_mono_ns, pause.packed_mono_ns),
                "transfer": us(pause.packed_mono_ns, pause.received_mono_ns),
                "adopt": us(pause.received_mono_ns, adopted_mono_ns),
                "confirm_and_first_poll": us(adopted_mono_ns, first)},
            "precopy_us": {
                "dump_and_save": us(taken.held_mono_ns, taken.started_mono_ns),
                "save_and_encode": us(taken.started_mono_ns, taken.packed_mono_ns),
                "transfer": us(taken.packed_mono_ns, taken.received_mono_ns),
                "restore": us(taken.received_mono_ns, precopy_done),
                "held_to_restored": us(taken.held_mono_ns, precopy_done)},
            "snapshot_bytes": taken.snapshot_bytes,
            "takeover_ms": t.started.elapsed().as_secs_f64() * 1e3,
            "flows": flows, "connections": carried});
        info!(%v, "took the switch over");
        last_handover = Some(v);
        inherited_listener = Some(taken.listener);
    }
    // A program attached without a bpf_link (old kernels) would detach with
    // this process: such a switch cannot be handed over.
    let mut xdp_links = Vec::new();
    let mut handover_refused = None;
    for p in &programs {
        match p.link_fd() {
            Some(fd) => xdp_links.push(fd.as_raw_fd()),
            None => {
                handover_refused = Some(
                    "an XDP program is attached without a bpf_link (kernel < 5.9): it cannot \
                     outlive this process, so the switch cannot be handed over"
                        .to_string(),
                )
            }
        }
    }
    xdp_links.extend(inherited_links.iter().map(|fd| fd.as_raw_fd()));
    let punt_depth: Arc<dyn Fn() -> usize + Send + Sync> = Arc::new(move || depth_rx.depth());
    let (metrics_req_tx, metrics_shared) = (req_tx.clone(), ctl_cp.shared().clone());
    let links = crate::links::Links {
        config_text,
        handover_refused,
        xdp_links,
        last_handover,
        netlink: neighbor::Netlink::open().ok(),
        next_port,
        epoch_mono_ns,
        requests: req_tx,
        wake: wake.clone(),
        installs: installs_for_control,
        coprocessor: ctl_cp,
        epoch,
        ports: port_names,
        vhost: vhost_links,
    };
    let taking_over = inherited_listener.is_some();
    let mut server = match inherited_listener {
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
            requests: metrics_req_tx,
            wake: wake.clone(),
            shared: metrics_shared,
            punt_depth,
        };
        crate::metrics_http::spawn(listener, addr, source, stop.clone())
            .context("starting the metrics thread")?;
    }
    info!(socket = %s.control_socket.display(), "vswitch running");
    server.serve(&stop);

    info!("stopping");
    stop.store(true, Ordering::Relaxed);
    wake.notify();
    let _ = fast.join();
    if let Some(h) = neigh {
        let _ = h.join();
    }
    // Detach XDP only after the fast path stopped using the socket.
    drop(programs);
    drop(inherited_links);
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

/// A configured vhost-user port's spec; its device MAC is the VM's on the
/// port (a fixed local one if none is set yet).
fn vhost_spec(cfg: &Config, p: &crate::config::PortConfig) -> Result<crate::vhost::Spec> {
    let mac = cfg
        .vms
        .iter()
        .find(|v| v.port == p.name)
        .and_then(|v| crate::config::parse_mac(&v.mac))
        .unwrap_or([2, 0, 0, 0, 0, 1]);
    Ok(crate::vhost::Spec {
        name: p.name.clone(),
        socket: p
            .socket
            .clone()
            .context("vhost-user port without a socket")?,
        mode: p.mode.unwrap_or_default(),
        mac,
    })
}

/// Send the fast path a request that needs no answer.
fn send_request(
    req: &mpsc::Sender<fastpath::dataplane::Request>,
    wake: &Wake,
    r: fastpath::dataplane::Request,
) -> Result<()> {
    req.send(r)
        .map_err(|_| anyhow::anyhow!("the fast path is gone"))?;
    wake.notify();
    Ok(())
}

/// Ask the fast path something that succeeds or names what is wrong.
fn ask_fast_path(
    req: &mpsc::Sender<fastpath::dataplane::Request>,
    wake: &Wake,
    make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> fastpath::dataplane::Request,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    send_request(req, wake, make(tx))?;
    rx.recv_timeout(Duration::from_secs(2))
        .context("the fast path did not answer")?
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Fast-path reports waiting for the coprocessors.
const REPORT_QUEUE: usize = 65_536;

/// How often the timekeeping coprocessor thread advances connection timers.
const TICK: Duration = Duration::from_millis(250);

/// What a coprocessor thread is connected to.
struct CoprocLinks {
    punts: PuntReceiver,
    reports: Arc<ArrayQueue<Report>>,
    installs: Arc<ArrayQueue<Update>>,
    wake: Arc<Wake>,
    epoch: Instant,
    timekeeper: bool,
}

/// One coprocessor thread: decide for punted frames, follow the fast
/// path's reports on tracked connections, keep their timers (one thread),
/// send the results back to the fast path, sleep when there is nothing
/// to do.
fn coprocessor_loop(cp: &mut Coprocessor, l: &CoprocLinks, stop: &AtomicBool) {
    let now = || u64::try_from(l.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut log = crate::ratelog::RateLog::new(20);
    let mut next_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut worked = false;
        if l.timekeeper && Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            if !send_update(&l.installs, cp.tick(now()), &l.wake, stop) {
                return;
            }
        }
        // Reports first: they are few and keep connection state exact.
        for _ in 0..64 {
            let Some(r) = l.reports.pop() else { break };
            worked = true;
            let out = match r {
                Report::FlowGone { key, used } => {
                    cp.flow_gone(&key, used.last_used, used.packets);
                    continue;
                }
                Report::Checked { id, keys, used } => cp.checked(
                    id,
                    keys,
                    used.map(|u| u.map(|u| (u.last_used, u.packets))),
                    now(),
                ),
            };
            if !send_update(&l.installs, out, &l.wake, stop) {
                return;
            }
        }
        let Some(msg) = l.punts.recv() else {
            if !worked {
                thread::park_timeout(Duration::from_millis(20));
            }
            continue;
        };
        let mut out = cp.handle(&msg);
        if let Some(cause) = out.drop {
            log.drop(msg.ingress, cause);
        }
        // The frame runs again once its flows are in, if the message holds
        // all of it; otherwise its buffer goes back to the pool now.
        if out.reinject && msg.is_whole() {
            out.frame = Some(msg);
        } else {
            l.punts.recycle(msg);
        }
        if !send_update(&l.installs, out, &l.wake, stop) {
            return;
        }
    }
}

/// Follow the kernel's next hop and its MAC for every remote VTEP; tell
/// the coprocessors, and have the fast path drop flows through a next hop
/// whose MAC changed.
fn neighbor_loop(
    shared: &Mutex<Shared>,
    requests: &mpsc::Sender<fastpath::dataplane::Request>,
    wake: &Wake,
    stop: &AtomicBool,
) {
    let mut nl = match neighbor::Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            warn!("rtnetlink unavailable, remote VTEPs unreachable: {e}");
            return;
        }
    };
    let mut known: std::collections::HashMap<std::net::Ipv4Addr, flowtable::Mac> =
        Default::default();
    let mut last_provoke = std::time::Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let table = nl.neighbors().unwrap_or_default();
        let mut missing = Vec::new();
        // The VTEPs in use now (remote endpoints change at run time).
        let vteps = coprocessor::lock(shared).topo.remote_vteps();
        known.retain(|v, _| vteps.binary_search(v).is_ok());
        for &vtep in &vteps {
            let hop = nl.next_hop(vtep).unwrap_or(vtep);
            let now = table.get(&hop).copied();
            let before = known.get(&vtep).copied();
            if now != before {
                match now {
                    Some(m) => {
                        known.insert(vtep, m);
                        info!(%vtep, next_hop = %hop, mac = %coprocessor::topology::mac_str(&m), "next hop resolved");
                    }
                    None => {
                        known.remove(&vtep);
                        warn!(%vtep, next_hop = %hop, "next hop lost");
                    }
                }
                let mut sh = coprocessor::lock(shared);
                let topo = Arc::make_mut(&mut sh.topo);
                match now {
                    Some(m) => topo.set_neighbor(vtep, m),
                    None => topo.remove_neighbor(vtep),
                }
                drop(sh);
                if let Some(old) = before {
                    let _ = requests.send(fastpath::dataplane::Request::InvalidateNextHop(old));
                    wake.notify();
                }
            }
            if now.is_none() {
                missing.push(hop);
            }
        }
        if !missing.is_empty() && last_provoke.elapsed() >= Duration::from_secs(1) {
            missing
                .iter()
                .for_each(|h| neighbor::provoke_resolution(*h));
            last_provoke = std::time::Instant::now();
        }
        thread::sleep(Duration::from_millis(if missing.is_empty() {
            500
        } else {
            100
        }));
    }
}

/// The MAC of interface `name` (from sysfs).
fn read_mac(name: &str) -> Result<flowtable::Mac> {
    let path = format!("/sys/class/net/{name}/address");
    let s = std::fs::read_to_string(&path)
        .with_context(|| format!("uplink: interface {name:?}: reading {path}"))?;
    crate::config::parse_mac(s.trim())
        .with_context(|| format!("uplink: interface {name:?}: bad MAC {s:?}"))
}
