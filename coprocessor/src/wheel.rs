//! A hashed timing wheel: deadlines fall into slots by tick; advancing
//! the clock visits only the slots whose tick passed, so the cost of
//! expiry follows the number of timers due, not the number of timers.
//!
//! Timers cannot be cancelled; the owner keeps each object's current
//! deadline and ignores a firing whose deadline is no longer current
//! (rescheduling is a new insert). Deadlines further away than one turn
//! of the wheel wait in their slot for the turns to pass.

/// Timers identified by `u64` ids.
#[derive(Debug, Clone)]
pub struct Wheel {
    tick_ns: u64,
    slots: Vec<Vec<(u64, u64)>>,
    /// The first tick the next advance visits.
    next_tick: u64,
    len: usize,
}

impl Wheel {
    /// `n_slots` slots of `tick_ns` each, starting at time `now`.
    pub fn new(tick_ns: u64, n_slots: usize, now: u64) -> Wheel {
        let tick_ns = tick_ns.max(1);
        Wheel {
            tick_ns,
            slots: vec![Vec::new(); n_slots.max(1)],
            next_tick: now / tick_ns,
            len: 0,
        }
    }

    fn slot(&self, tick: u64) -> usize {
        // The remainder is below the slot count, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let i = (tick % self.slots.len() as u64) as usize;
        i
    }

    /// Fire `id` at `deadline` (or on the next advance, if it has passed).
    pub fn schedule(&mut self, id: u64, deadline: u64) {
        let tick = (deadline / self.tick_ns).max(self.next_tick);
        let i = self.slot(tick);
        self.slots[i].push((id, deadline));
        self.len += 1;
    }

    /// Timers waiting, current or stale.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Advance to `now`, calling `fire(id, deadline)` for every timer due.
    /// Visits at most one turn of slots however far the clock jumped.
    pub fn advance(&mut self, now: u64, mut fire: impl FnMut(u64, u64)) {
        let target = now / self.tick_ns;
        if target < self.next_tick {
            return;
        }
        let turns = (target - self.next_tick + 1).min(self.slots.len() as u64);
        let mut due = Vec::new();
        for t in 0..turns {
            let i = self.slot(self.next_tick + t);
            let slot = &mut self.slots[i];
            let before = slot.len();
            slot.retain(|&(id, deadline)| {
                if deadline <= now {
                    due.push((id, deadline));
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        // The current tick's slot may hold timers due later in this tick:
        // it is visited again next time.
        self.next_tick = target;
        for (id, deadline) in due {
            fire(id, deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_each_timer_once_when_due() {
        let mut w = Wheel::new(10, 8, 0);
        w.schedule(1, 25);
        w.schedule(2, 5);
        w.schedule(3, 1000); // many turns away
        let mut fired = Vec::new();
        w.advance(9, |id, _| fired.push(id));
        assert_eq!(fired, [2]);
        w.advance(24, |id, _| fired.push(id));
        assert_eq!(fired, [2], "not due before its deadline");
        w.advance(30, |id, _| fired.push(id));
        assert_eq!(fired, [2, 1]);
        for t in (40..1000).step_by(10) {
            w.advance(t, |id, _| fired.push(id));
        }
        assert_eq!(fired, [2, 1], "a far timer waits out the turns");
        w.advance(1000, |id, _| fired.push(id));
        assert_eq!(fired, [2, 1, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_long_jump_visits_one_turn_and_misses_nothing() {
        let mut w = Wheel::new(10, 4, 0);
        for id in 0..100 {
            w.schedule(id, id * 7);
        }
        let mut fired = Vec::new();
        w.advance(10_000, |id, _| fired.push(id));
        fired.sort_unstable();
        assert_eq!(fired, (0..100).collect::<Vec<_>>());
        // A deadline in the past fires on the next advance.
        w.schedule(7, 3);
        w.advance(10_010, |id, _| fired.push(id));
        assert_eq!(fired.last(), Some(&7));
    }
}
