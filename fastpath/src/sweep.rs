//! How fast the fast path sweeps its flow table for idle flows: the whole
//! table once per sweep period (a quarter of the idle timeout, at least
//! 100 ms), in steps sized by the time that passed — not a fixed number of
//! slots per loop iteration, which a busy-polling loop turns into reading
//! the whole table every few milliseconds (measured: 77 % of the fast
//! path's own time on a 1M-flow table whose memory is in use, halving a
//! TCP stream). An idle flow goes within its timeout plus a period.

/// Fewer slots than this are left for the next iteration (amortised).
const MIN_STEP: u64 = 64;

#[derive(Debug, Clone, Default)]
pub struct SweepPace {
    /// The time up to which the sweep has been credited (ns).
    at: u64,
    /// Nothing is due before this (ns): most loop iterations stop at this
    /// one comparison, not a 128-bit division.
    not_before: u64,
}

impl SweepPace {
    /// The sweep period for flows idle `idle_ns` long.
    pub fn period(idle_ns: u64) -> u64 {
        (idle_ns / 4).max(100_000_000)
    }

    /// Slots to examine now (`now` in ns) for a table of `slots`, at most
    /// `max`: those due since the last call at one sweep per `period`.
    pub fn due(&mut self, now: u64, slots: usize, period: u64, max: usize) -> usize {
        if now < self.not_before {
            return 0;
        }
        if self.at == 0 || now < self.at {
            self.at = now;
            return 0;
        }
        let slots = slots as u64;
        let elapsed = now - self.at;
        let due = u128::from(slots) * u128::from(elapsed) / u128::from(period.max(1));
        let due = u64::try_from(due).unwrap_or(u64::MAX);
        if due < MIN_STEP.min(slots) || slots == 0 {
            // When the next step will be due.
            let wait = u128::from(MIN_STEP) * u128::from(period) / u128::from(slots.max(1));
            self.not_before = self
                .at
                .saturating_add(u64::try_from(wait).unwrap_or(u64::MAX));
            return 0;
        }
        let n = due.min(max as u64);
        // Credit the time those slots stand for; the rest carries over.
        let credit = u128::from(n) * u128::from(period) / u128::from(slots);
        self.at += u64::try_from(credit).unwrap_or(elapsed).min(elapsed);
        usize::try_from(n).unwrap_or(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_swept_once_per_period_whatever_the_loop_rate() {
        let (slots, period) = (1 << 21, 1_000_000_000u64);
        for step_ns in [1_000u64, 50_000, 20_000_000] {
            let mut p = SweepPace::default();
            let mut swept = 0usize;
            let mut now = 1;
            p.due(now, slots, period, 4096);
            while now < 1 + 2 * period {
                now += step_ns;
                swept += p.due(now, slots, period, 1 << 20);
            }
            // Two periods: twice the table, give or take a step.
            let want = 2 * slots;
            assert!(
                swept.abs_diff(want) <= 4096,
                "{step_ns} ns steps: {swept} of {want}"
            );
        }
    }

    #[test]
    fn a_long_sleep_is_caught_up_in_bounded_steps() {
        let mut p = SweepPace::default();
        p.due(1, 1 << 20, 1_000_000_000, 1024);
        // Asleep half a period: half the table due, 1 024 at a time.
        let now = 1 + 500_000_000;
        let mut total = 0;
        for _ in 0..1000 {
            let n = p.due(now, 1 << 20, 1_000_000_000, 1024);
            assert!(n <= 1024);
            total += n;
        }
        assert!(total.abs_diff(1 << 19) <= 1024, "{total}");
        assert_eq!(SweepPace::period(30_000_000_000), 7_500_000_000);
        assert_eq!(SweepPace::period(1_000_000), 100_000_000);
    }
}
