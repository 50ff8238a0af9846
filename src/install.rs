//! Sending a coprocessor's update to the fast-path thread, on the bounded
//! queue between them. Used by the coprocessor threads and the control
//! thread (policy revalidation, changes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use crossbeam_queue::ArrayQueue;
use dpif::Update;
use fastpath::wake::Wake;

/// Queue `update` for the fast path (nothing if it is empty). The queue is
/// bounded; if the fast path is this far behind, wait for it rather than
/// lose decisions. False if the switch stopped first.
pub fn send_update(
    updates: &ArrayQueue<Update>,
    mut update: Update,
    wake: &Wake,
    stop: &AtomicBool,
) -> bool {
    if update.is_empty() {
        return true;
    }
    while let Err(back) = updates.push(update) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        update = back;
        wake.notify();
        thread::yield_now();
    }
    wake.notify();
    true
}
