//! A thread's busy share, measured from the clock reads its loop already
//! makes: the time from one iteration's start to the next counts as busy
//! if that iteration did work, idle if not (spinning or asleep). Reported
//! per full second, so `ctl stats` shows the load now, not since start.

/// One second, in the loop's clock (ns).
const WINDOW_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Default)]
pub struct BusyMeter {
    last: u64,
    worked: bool,
    window_start: u64,
    window_busy: u64,
    permille: u32,
}

impl BusyMeter {
    /// The iteration that started at `now` (ns, monotonic) did work if
    /// `worked`; called at its end. (The time since the previous
    /// iteration's start is that one's.)
    /// True when a second ended and [`BusyMeter::permille`] changed.
    #[inline]
    pub fn iteration(&mut self, now: u64, worked: bool) -> bool {
        if self.worked {
            self.window_busy += now.saturating_sub(self.last);
        }
        self.last = now;
        self.worked = worked;
        let span = now.saturating_sub(self.window_start);
        if span >= WINDOW_NS {
            self.permille = u32::try_from(self.window_busy.min(span) * 1000 / span).unwrap_or(1000);
            self.window_start = now;
            self.window_busy = 0;
            return true;
        }
        false
    }

    /// The busy share of the last full second, per mille.
    pub fn permille(&self) -> u32 {
        self.permille
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_is_the_time_after_iterations_that_worked() {
        let mut m = BusyMeter::default();
        // 0.25 s of work in each second: worked at t, idle from t + 0.25 s.
        for s in 0..3u64 {
            let t = s * WINDOW_NS;
            m.iteration(t, true);
            m.iteration(t + WINDOW_NS / 4, false);
        }
        m.iteration(3 * WINDOW_NS, false);
        assert_eq!(m.permille(), 250);
        // A second asleep: zero.
        m.iteration(4 * WINDOW_NS + 1, false);
        assert_eq!(m.permille(), 0);
    }
}
