//! What goes from a coprocessor to the fast-path thread: its outcome in the
//! fast path's form, and the bounded queue it is sent on. Used by the
//! coprocessor threads and the control thread (policy revalidation).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use coprocessor::Outcome;
use crossbeam_queue::ArrayQueue;
use fastpath::dataplane::{CtCheck, Install, Invalidation};
use fastpath::wake::Wake;

/// The fast path's form of a coprocessor outcome.
pub fn install_of(out: Outcome, reinject: Option<fastpath::PuntMsg>) -> Install {
    Install {
        flows: out.flows,
        tx: out.tx,
        reinject,
        remove: out.remove,
        invalidation: out.invalidate.map(|inv| Invalidation {
            version: out.version,
            hits: Box::new(move |k, a| inv.hits(k, a)),
        }),
        version: out.version,
        checks: out
            .checks
            .iter()
            .map(|c| CtCheck {
                id: c.id,
                keys: c.keys,
            })
            .collect(),
    }
}

/// Queue `ins` for the fast path. The install queue is bounded; if the
/// fast path is this far behind, wait for it rather than lose decisions.
/// False if the switch stopped first.
pub fn send_install(
    installs: &ArrayQueue<Install>,
    mut ins: Install,
    wake: &Wake,
    stop: &AtomicBool,
) -> bool {
    while let Err(back) = installs.push(ins) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        ins = back;
        wake.notify();
        thread::yield_now();
    }
    wake.notify();
    true
}
