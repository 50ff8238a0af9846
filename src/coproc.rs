//! The coprocessor threads' loop: decide for punted frames, follow the
//! fast path's reports on tracked connections, keep the connection timers
//! (one thread), and send each update back to the fast path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use coprocessor::Coprocessor;
use fastpath::dataplane::Report;
use fastpath::report::Gather;
use fastpath::PuntReceiver;

use crate::cores::Load;
use crate::fastpaths::FastPaths;
use fastpath::busy::BusyMeter;

/// Fast-path reports waiting for the coprocessors.
pub const REPORT_QUEUE: usize = 65_536;

/// How often the timekeeping coprocessor thread advances connection timers.
const TICK: Duration = Duration::from_millis(250);

/// Start a coprocessor thread on `shared` for each of `loads` (where
/// each reports its load), connected as `links` says (the first keeps
/// the connection timers), each on `cores` (any, if empty) and confined
/// by its seccomp filter if `seccomp`.
pub fn spawn(
    loads: &Arc<Vec<Load>>,
    cores: &[usize],
    seccomp: bool,
    shared: &Arc<coprocessor::SharedLock>,
    links: &CoprocLinks,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<thread::JoinHandle<()>>> {
    use anyhow::Context;
    (0..loads.len())
        .map(|i| {
            let mut cp = Coprocessor::with_shared(shared.clone());
            let links = CoprocLinks {
                punts: links.punts.for_thread(i),
                reports: links.reports.clone(),
                fast: links.fast.clone(),
                gather: links.gather.clone(),
                epoch: links.epoch,
                timekeeper: links.timekeeper && i == 0,
                thread: i,
                spin: links.spin,
            };
            let (stop, cores, loads) = (stop.clone(), cores.to_vec(), loads.clone());
            thread::Builder::new()
                .name(format!("coproc-{i}"))
                .spawn(move || {
                    if let Err(e) = crate::cores::pin(&cores) {
                        tracing::error!(cores = %crate::cores::list(&cores), "switch: field `coprocessor_cores`: pinning a coprocessor thread: {e}");
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    let role = crate::seccomp::Role::Coprocessor;
                    if crate::seccomp::confine_or_stop(seccomp, role, &stop) {
                        run(&mut cp, &links, &loads[i], &stop)
                    }
                })
                .context("spawning a coprocessor thread")
        })
        .collect()
}

/// What a coprocessor thread is connected to.
pub struct CoprocLinks {
    pub punts: PuntReceiver,
    pub reports: Arc<fastpath::report::Reports>,
    /// The fast-path threads (their updates).
    pub fast: FastPaths,
    /// Their answers to checks, gathered (every thread answers each).
    pub gather: Arc<Gather>,
    pub epoch: Instant,
    pub timekeeper: bool,
    /// This thread's index (its punt and report queues).
    pub thread: usize,
    /// How long an idle thread looks for work before it parks.
    pub spin: Duration,
}

/// One coprocessor thread: decide for punted frames, follow the fast
/// path's reports on tracked connections, keep their timers (one thread),
/// send the results back to the fast path; with nothing to do, look again
/// for `l.spin`, then sleep until the fast path unparks it. Its busy share
/// goes to `load` each second.
pub fn run(cp: &mut Coprocessor, l: &CoprocLinks, load: &Load, stop: &AtomicBool) {
    let now = || u64::try_from(l.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut log = crate::ratelog::RateLog::new(20);
    let mut next_tick = Instant::now();
    let mut meter = BusyMeter::default();
    let mut idle_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = now();
        let mut worked = false;
        if l.timekeeper && Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            if !l.fast.send_update(None, cp.tick(now()), stop) {
                return;
            }
        }
        // Reports first: they are few and keep connection state exact.
        for _ in 0..64 {
            let Some(r) = l.reports.pop(l.thread) else {
                break;
            };
            worked = true;
            let out = match r {
                Report::FlowGone { key, used, thread } => {
                    cp.flow_gone(&key, used, thread);
                    continue;
                }
                Report::Checked {
                    id,
                    keys,
                    used,
                    thread,
                } => match l.gather.answer(id, keys, used, thread, now()) {
                    Some(a) => cp.checked(&a, now()),
                    None => continue,
                },
            };
            if !l.fast.send_update(None, out, stop) {
                return;
            }
        }
        let Some(msg) = l.punts.recv() else {
            if meter.iteration(started, worked) {
                load.set(meter.permille());
                load.set_decisions(cp.stats().handled);
            }
            if worked {
                idle_since = None;
            } else {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= l.spin {
                    thread::park_timeout(Duration::from_millis(20));
                    idle_since = None;
                } else {
                    std::hint::spin_loop();
                }
            }
            continue;
        };
        idle_since = None;
        let origin = msg.origin;
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
        if !l.fast.send_update(Some(origin), out, stop) {
            return;
        }
        if meter.iteration(started, true) {
            load.set(meter.permille());
            load.set_decisions(cp.stats().handled);
        }
    }
}
