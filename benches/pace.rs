//! Pacing for the benchmark generators (udpgen, vhost_driver): a fixed
//! offered load, so every path under test gets the same one. Included
//! with `#[path]` by each generator.
//!
//! A generator that is itself held up (descheduled, a page fault) must not
//! make up for it with a burst that the path under test then drops: that
//! would be the generator's loss counted as the path's. So frames that fell
//! due while the generator was away (longer than a frame gap plus
//! [`STALL`] from the end of its last send, [`Pacer::sent`], to its next
//! question, [`Pacer::due`]) are skipped and reported as lag, never
//! offered. Time spent sending is the generator working, not a stall.

use std::time::{Duration, Instant};

/// Longer than this between two calls (beyond one frame gap) is a stall
/// of the generator, not of the path.
const STALL: Duration = Duration::from_micros(200);

/// Frames due at a fixed rate since `start`, until `deadline`.
pub struct Pacer {
    start: Instant,
    deadline: Instant,
    rate: Option<f64>,
    last: Instant,
    /// Frames that fell due while the generator stalled.
    skipped: u64,
}

impl Pacer {
    /// `rate` in frames per second; `None` is unpaced (always due).
    pub fn new(secs: f64, rate: Option<f64>) -> Pacer {
        let start = Instant::now();
        Pacer {
            start,
            deadline: start + Duration::from_secs_f64(secs),
            rate,
            last: start,
            skipped: 0,
        }
    }

    pub fn done(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// How many of the next `most` frames are due, given `sent` so far.
    /// When none is, waits a little (sleeps if the next frame is far,
    /// spins if near) and returns 0.
    pub fn due(&mut self, sent: u64, most: usize) -> usize {
        let Some(rate) = self.rate else { return most };
        let now = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / rate);
        let away = now.duration_since(self.last);
        if away > gap + STALL {
            self.skipped += frames(away.as_secs_f64(), rate);
        }
        let due =
            frames(now.duration_since(self.start).as_secs_f64(), rate).saturating_sub(self.skipped);
        let want = due.saturating_sub(sent);
        if want == 0 {
            if gap > Duration::from_micros(60) {
                std::thread::sleep(gap - Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
            // Waiting on purpose is not a stall.
            self.last = Instant::now();
            return 0;
        }
        usize::try_from(want).map_or(most, |w| w.min(most))
    }

    /// Call after each send: the time until the next [`Pacer::due`] is
    /// what counts as the generator being away.
    pub fn sent(&mut self) {
        self.last = Instant::now();
    }

    /// Frames due over the whole run that were never offered (skipped in
    /// the generator's stalls, or not sent by the end): 0 unpaced.
    pub fn lag(&self, sent: u64) -> u64 {
        let total = self.deadline.duration_since(self.start).as_secs_f64();
        self.rate
            .map_or(0, |r| frames(total, r).saturating_sub(sent))
    }
}

/// Whole frames due after `secs` at `rate`.
#[allow(clippy::cast_possible_truncation)] // non-negative, far below 2^53: the floor is meant
fn frames(secs: f64, rate: f64) -> u64 {
    (secs * rate).max(0.0) as u64
}
