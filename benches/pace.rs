//! Pacing for the benchmark generators (udpgen, vhost_driver): a fixed
//! offered load, so every path under test gets the same one. Included
//! with `#[path]` by each generator.

use std::time::{Duration, Instant};

/// Frames due at a fixed rate since `start`, until `deadline`.
pub struct Pacer {
    start: Instant,
    deadline: Instant,
    rate: Option<f64>,
}

impl Pacer {
    /// `rate` in frames per second; `None` is unpaced (always due).
    pub fn new(secs: f64, rate: Option<f64>) -> Pacer {
        let start = Instant::now();
        Pacer {
            start,
            deadline: start + Duration::from_secs_f64(secs),
            rate,
        }
    }

    pub fn done(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// How many of the next `most` frames are due, given `sent` so far.
    /// When none is, waits a little (sleeps if the next frame is far,
    /// spins if near) and returns 0.
    pub fn due(&self, sent: u64, most: usize) -> usize {
        let Some(rate) = self.rate else { return most };
        let due = frames(self.start.elapsed().as_secs_f64(), rate);
        let want = due.saturating_sub(sent);
        if want == 0 {
            let gap = Duration::from_secs_f64(1.0 / rate);
            if gap > Duration::from_micros(60) {
                std::thread::sleep(gap - Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
            return 0;
        }
        usize::try_from(want).map_or(most, |w| w.min(most))
    }

    /// Frames due over the whole run that were never sent (the generator
    /// fell behind): 0 unpaced.
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
