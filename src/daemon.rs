//! `vswitch run`: open the ports, start the threads, serve the control
//! socket, stop cleanly on SIGTERM/SIGINT.
//!
//! Threads: one fast-path thread (the `Dataplane`, sole owner of its flow
//! table), a pool of coprocessor threads fed by the punt queue, and the
//! control thread. They share nothing but bounded queues and a stop flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use coprocessor::{Coprocessor, Punted};
use crossbeam_queue::ArrayQueue;
use fastpath::dataplane::{
    Dataplane, Install, Links, LoopConfig, PollMode, Port, PortCounters, PortIo,
};
use fastpath::tap::Tap;
use fastpath::wake::Wake;
use fastpath::{punt_path, Pipeline, PipelineConfig, PuntConfig, PuntReceiver};
use flowtable::{FlowTable, PortId};
use tracing::{info, warn};

use crate::config::{Config, Poll, PortType};
use crate::control;

/// Run until a signal (or `stop`) ends it.
pub fn run(cfg: Config) -> Result<()> {
    let topo = cfg.topology()?;
    let s = &cfg.switch;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())
        .context("installing SIGTERM handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("installing SIGINT handler")?;

    let mut ports = Vec::new();
    for (i, p) in cfg.ports.iter().enumerate() {
        let io = match p.kind {
            PortType::Tap => {
                PortIo::Tap(Tap::open(&p.name).with_context(|| format!("port[{i}] ({})", p.name))?)
            }
        };
        ports.push(Port {
            id: PortId(u16::try_from(i).context("too many ports")?),
            name: p.name.clone(),
            io,
            counters: PortCounters::default(),
        });
        info!(port = %p.name, id = i, "port open");
    }
    let n_ports = u16::try_from(ports.len()).context("too many ports")?;

    let table = FlowTable::new(s.flow_capacity)?;
    if let Err(e) = fastpath::hugepage::advise_flow_table(&table) {
        warn!("flow table on normal pages: {e}");
    }
    let pipeline = Pipeline::new(
        &PipelineConfig {
            // No uplink yet: an id no port has.
            uplink: PortId(u16::MAX),
            local_vtep: std::net::Ipv4Addr::UNSPECIFIED,
            udp_port: vxlan::UDP_PORT,
            ports: n_ports,
        },
        table,
    );
    let (punter, punt_rx) = punt_path(
        &PuntConfig {
            rate: s.punt_rate,
            burst: s.punt_burst,
            ..PuntConfig::default()
        },
        n_ports,
    );
    let installs = Arc::new(ArrayQueue::new(4096));
    let wake = Arc::new(Wake::new().context("creating the wakeup eventfd")?);
    let (req_tx, req_rx) = mpsc::channel();

    let mut coproc_threads = Vec::new();
    for i in 0..s.coprocessor_threads {
        let mut cp = Coprocessor::new(topo.clone());
        let (rx, installs, wake, stop) = (
            punt_rx.clone(),
            installs.clone(),
            wake.clone(),
            stop.clone(),
        );
        let h = thread::Builder::new()
            .name(format!("coproc-{i}"))
            .spawn(move || coprocessor_loop(&mut cp, &rx, &installs, &wake, &stop))
            .context("spawning a coprocessor thread")?;
        coproc_threads.push(h);
    }

    let links = Links {
        punter,
        recycler: punt_rx,
        installs,
        requests: req_rx,
        wake: wake.clone(),
        coprocessors: coproc_threads.iter().map(|h| h.thread().clone()).collect(),
    };
    let loop_cfg = LoopConfig {
        mode: match s.poll {
            Poll::Busy => PollMode::Busy,
            Poll::Adaptive => PollMode::Adaptive,
        },
        idle_timeout_ns: s.idle_timeout_s.saturating_mul(1_000_000_000),
        ..LoopConfig::default()
    };
    let mut dp = Dataplane::new(ports, pipeline, links, loop_cfg);
    let dp_stop = stop.clone();
    let fast = thread::Builder::new()
        .name("fastpath-0".into())
        .spawn(move || dp.run(&dp_stop))
        .context("spawning the fast-path thread")?;

    let server = control::Server::bind(&s.control_socket, req_tx, wake.clone())?;
    info!(socket = %s.control_socket.display(), "vswitch running");
    server.serve(&stop);

    info!("stopping");
    stop.store(true, Ordering::Relaxed);
    wake.notify();
    let _ = fast.join();
    for h in coproc_threads {
        h.thread().unpark();
        let _ = h.join();
    }
    let _ = std::fs::remove_file(&s.control_socket);
    info!("stopped");
    Ok(())
}

/// One coprocessor thread: decide for punted frames, send the results back
/// to the fast path, sleep when there is nothing to do.
fn coprocessor_loop(
    cp: &mut Coprocessor,
    rx: &PuntReceiver,
    installs: &ArrayQueue<Install>,
    wake: &Wake,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let Some(msg) = rx.recv() else {
            thread::park_timeout(Duration::from_millis(20));
            continue;
        };
        let out = cp.handle(&Punted {
            ingress: msg.ingress,
            frame: &msg.data,
            key: msg.key,
        });
        let whole = msg.orig_len as usize == msg.data.len();
        let reinject = if out.reinject && whole {
            Some(msg)
        } else {
            rx.recycle(msg);
            None
        };
        if out.flows.is_empty() && out.tx.is_empty() && reinject.is_none() {
            continue;
        }
        let mut ins = Install {
            flows: out.flows,
            tx: out.tx,
            reinject,
        };
        // The install queue is bounded; if the fast path is this far
        // behind, wait for it rather than lose decisions.
        while let Err(back) = installs.push(ins) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            ins = back;
            wake.notify();
            thread::yield_now();
        }
        wake.notify();
    }
}
