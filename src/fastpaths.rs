//! Reaching the fast-path threads from the others: each thread's request
//! channel, update queue and wakeup. Questions go to every thread (each
//! keeps its own table and counters) and come back one answer per
//! thread; a coprocessor's update goes whole to the thread that punted
//! (its flows, the frame to run again) and its common part — removals,
//! invalidations, checks — to every other thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use crossbeam_queue::ArrayQueue;
use dpif::Update;
use fastpath::dataplane::Request;
use fastpath::wake::Wake;

/// One fast-path thread's inboxes.
pub struct FastPath {
    pub requests: Sender<Request>,
    pub installs: Arc<ArrayQueue<Update>>,
    pub wake: Arc<Wake>,
}

/// Every fast-path thread's, in thread order.
#[derive(Clone)]
pub struct FastPaths(Arc<[FastPath]>);

impl FastPaths {
    /// At least one thread.
    pub fn new(threads: Vec<FastPath>) -> FastPaths {
        assert!(!threads.is_empty(), "a switch has a fast-path thread");
        FastPaths(threads.into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Thread 0 (the one a handover pauses and resumes, with one thread).
    pub fn first(&self) -> &FastPath {
        &self.0[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &FastPath> {
        self.0.iter()
    }

    /// Every thread's wakeup.
    pub fn wakes(&self) -> Vec<Arc<Wake>> {
        self.0.iter().map(|f| f.wake.clone()).collect()
    }

    /// Wake every thread.
    pub fn notify(&self) {
        self.0.iter().for_each(|f| f.wake.notify());
    }

    /// Queue `update` (nothing if it is empty): whole for thread `origin`
    /// (thread 0 for an update no punt asked for), its common part for the
    /// others. The queues are bounded; if a thread is this far behind,
    /// wait for it rather than lose decisions. False if the switch
    /// stopped first.
    pub fn send_update(&self, origin: Option<u16>, update: Update, stop: &AtomicBool) -> bool {
        if update.is_empty() {
            return true;
        }
        let origin = origin.map_or(0, usize::from).min(self.0.len() - 1);
        if self.0.len() > 1 {
            let common = update.common();
            if !common.is_empty() {
                for (i, f) in self.0.iter().enumerate() {
                    if i != origin && !push(f, common.clone(), stop) {
                        return false;
                    }
                }
            }
        }
        push(&self.0[origin], update, stop)
    }

    /// Ask every thread; their answers in thread order, each within 2 s
    /// of asking.
    pub fn ask<T>(&self, make: impl Fn(Sender<T>) -> Request) -> Result<Vec<T>> {
        self.ask_each(vec![(); self.0.len()], |(), tx| make(tx))
    }

    /// Ask thread `i` with `items[i]` (one item per thread); their answers
    /// in thread order, each within 2 s of asking.
    pub fn ask_each<I, T>(
        &self,
        items: Vec<I>,
        make: impl Fn(I, Sender<T>) -> Request,
    ) -> Result<Vec<T>> {
        self.ask_each_within(Duration::from_secs(2), items, make)
    }

    /// Ask every thread and return at once; [`Asked::answers`] waits.
    pub fn send<T>(&self, make: impl Fn(Sender<T>) -> Request) -> Result<Asked<T>> {
        self.send_each(vec![(); self.0.len()], |(), tx| make(tx))
    }

    fn ask_each_within<I, T>(
        &self,
        limit: Duration,
        items: Vec<I>,
        make: impl Fn(I, Sender<T>) -> Request,
    ) -> Result<Vec<T>> {
        self.send_each(items, make)?.answers(limit)
    }

    /// Ask thread `i` with `items[i]` and return at once;
    /// [`Asked::answers`] waits.
    pub fn send_each<I, T>(
        &self,
        items: Vec<I>,
        make: impl Fn(I, Sender<T>) -> Request,
    ) -> Result<Asked<T>> {
        if items.len() != self.0.len() {
            bail!(
                "{} items for {} fast-path threads",
                items.len(),
                self.0.len()
            );
        }
        let mut asked = Vec::new();
        for ((i, f), item) in self.0.iter().enumerate().zip(items) {
            let (one_tx, one_rx) = mpsc::channel();
            f.requests
                .send(make(item, one_tx))
                .map_err(|_| anyhow!("fast-path thread {i} is gone"))?;
            f.wake.notify();
            asked.push(one_rx);
        }
        Ok(Asked(asked))
    }

    /// Ask thread 0 only; its answer within 2 s.
    pub fn ask_first<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        let f = self.first();
        f.requests
            .send(make(tx))
            .map_err(|_| anyhow!("the fast-path thread is gone"))?;
        f.wake.notify();
        rx.recv_timeout(Duration::from_secs(2))
            .map_err(|_| anyhow!("the fast-path thread did not answer within 2 s"))
    }

    /// Send every thread a request that has no answer.
    pub fn tell(&self, make: impl Fn() -> Request) {
        for f in self.0.iter() {
            let _ = f.requests.send(make());
            f.wake.notify();
        }
    }
}

/// Questions sent to every thread, their answers still to come.
pub struct Asked<T>(Vec<mpsc::Receiver<T>>);

impl<T> Asked<T> {
    /// Every thread's answer, in thread order, all within `limit`.
    pub fn answers(self, limit: Duration) -> Result<Vec<T>> {
        let until = Instant::now() + limit;
        self.0
            .into_iter()
            .enumerate()
            .map(|(i, one)| {
                one.recv_timeout(until.saturating_duration_since(Instant::now()))
                    .map_err(|_| anyhow!("fast-path thread {i} did not answer within {limit:?}"))
            })
            .collect()
    }
}

fn push(f: &FastPath, mut update: Update, stop: &AtomicBool) -> bool {
    while let Err(back) = f.installs.push(update) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        update = back;
        f.wake.notify();
        thread::yield_now();
    }
    f.wake.notify();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(n: usize) -> (FastPaths, Vec<mpsc::Receiver<Request>>) {
        let mut rx = Vec::new();
        let fast = (0..n)
            .map(|_| {
                let (requests, r) = mpsc::channel();
                rx.push(r);
                FastPath {
                    requests,
                    installs: Arc::new(ArrayQueue::new(8)),
                    wake: Arc::new(Wake::new().unwrap()),
                }
            })
            .collect();
        (FastPaths::new(fast), rx)
    }

    #[test]
    fn an_update_goes_whole_to_the_punting_thread_and_its_common_part_to_the_others() {
        // (Imported here: a benchmark includes this file without its tests.)
        use flowtable::{Action, FlowKey, Ingress, PortId};
        let (fast, _rx) = threads(3);
        let stop = AtomicBool::new(false);
        let key = FlowKey::new(Ingress::Port(PortId(1)), 17, 10, 20, 1000, 53);
        let gone = FlowKey::new(Ingress::Port(PortId(1)), 17, 10, 20, 1001, 53);
        let decided = Update {
            flows: vec![(key, Action::drop())],
            reinject: true,
            tx: vec![(PortId(1), vec![1, 2, 3])],
            remove: vec![gone],
            version: 7,
            ..Update::default()
        };
        assert!(fast.send_update(Some(2), decided.clone(), &stop));
        let got: Vec<Option<Update>> = fast.iter().map(|f| f.installs.pop()).collect();
        assert_eq!(got[2].as_ref(), Some(&decided));
        for other in &got[..2] {
            let u = other.as_ref().expect("the removal reaches every thread");
            assert_eq!((u.remove.as_slice(), u.version), ([gone].as_slice(), 7));
            assert!(u.flows.is_empty() && u.tx.is_empty() && u.frame.is_none());
        }
        // Nothing common: the other threads get nothing; no origin: thread 0.
        let flows_only = Update {
            flows: vec![(key, Action::drop())],
            ..Update::default()
        };
        assert!(fast.send_update(None, flows_only.clone(), &stop));
        let got: Vec<Option<Update>> = fast.iter().map(|f| f.installs.pop()).collect();
        assert_eq!(got, vec![Some(flows_only), None, None]);
    }

    #[test]
    fn every_thread_is_asked_and_a_silent_one_is_named() {
        let (fast, rx) = threads(2);
        let answer = |r: &mpsc::Receiver<Request>, n: usize| {
            if let Ok(Request::HeaderTaps(tx)) = r.recv() {
                let _ = tx.send(vec![n.to_string()]);
            }
        };
        let (fast2, rx0) = (fast.clone(), rx);
        let t = std::thread::spawn(move || {
            answer(&rx0[0], 0);
            answer(&rx0[1], 1);
            rx0
        });
        let got = fast2.ask(Request::HeaderTaps).unwrap();
        assert_eq!(got, vec![vec!["0".to_string()], vec!["1".to_string()]]);
        let rx = t.join().unwrap();
        // Thread 1 does not answer.
        let t = std::thread::spawn(move || {
            answer(&rx[0], 0);
            rx
        });
        let e = fast.ask(Request::HeaderTaps).unwrap_err().to_string();
        assert!(e.contains("fast-path thread 1 did not answer"), "{e}");
        drop(t.join());
    }
}
