//! A hashed timing wheel: deadlines fall into slots by tick; advancing
//! the clock visits only the slots whose tick passed, so the cost of
//! expiry follows the number of timers due, not the number of timers.
//!
//! Each id has at most one timer: scheduling an id again moves its timer,
//! and [`Wheel::cancel`] removes it, so the wheel holds no more entries
//! than the owner has live ids, however often their deadlines move (a
//! tenant that keeps moving one connection's deadline cannot grow it).
//! An index from id to its place in its slot makes both O(1). Deadlines
//! further away than one turn of the wheel wait in their slot for the
//! turns to pass.

use rustc_hash::FxHashMap;

/// Timers identified by `u64` ids.
#[derive(Debug, Clone)]
pub struct Wheel {
    tick_ns: u64,
    slots: Vec<Vec<(u64, u64)>>,
    /// Each scheduled id's slot and index in it.
    at: FxHashMap<u64, (usize, usize)>,
    /// The first tick the next advance visits.
    next_tick: u64,
}

impl Wheel {
    /// `n_slots` slots of `tick_ns` each, starting at time `now`.
    pub fn new(tick_ns: u64, n_slots: usize, now: u64) -> Wheel {
        let tick_ns = tick_ns.max(1);
        Wheel {
            tick_ns,
            slots: vec![Vec::new(); n_slots.max(1)],
            at: FxHashMap::default(),
            next_tick: now / tick_ns,
        }
    }

    fn slot(&self, tick: u64) -> usize {
        // The remainder is below the slot count, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let i = (tick % self.slots.len() as u64) as usize;
        i
    }

    /// Fire `id` at `deadline` (or on the next advance, if it has passed),
    /// instead of whenever it was to fire before.
    pub fn schedule(&mut self, id: u64, deadline: u64) {
        self.cancel(id);
        let tick = (deadline / self.tick_ns).max(self.next_tick);
        let s = self.slot(tick);
        self.at.insert(id, (s, self.slots[s].len()));
        self.slots[s].push((id, deadline));
    }

    /// Forget `id`'s timer; false if it had none.
    pub fn cancel(&mut self, id: u64) -> bool {
        let Some((s, i)) = self.at.remove(&id) else {
            return false;
        };
        let slot = &mut self.slots[s];
        slot.swap_remove(i);
        if let Some(&(moved, _)) = slot.get(i) {
            self.at.insert(moved, (s, i));
        }
        true
    }

    /// Entries in the wheel's slots: its memory. One per id scheduled and
    /// not yet fired or cancelled (counted from the slots, so a stale
    /// entry would show).
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
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
            let s = self.slot(self.next_tick + t);
            let slot = &mut self.slots[s];
            let before = slot.len();
            slot.retain(|&(id, deadline)| {
                if deadline <= now {
                    due.push((id, deadline));
                    false
                } else {
                    true
                }
            });
            if slot.len() != before {
                // What stayed moved up: its places change.
                for (i, &(id, _)) in slot.iter().enumerate() {
                    self.at.insert(id, (s, i));
                }
            }
        }
        for &(id, _) in &due {
            self.at.remove(&id);
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

    #[test]
    fn moving_a_deadline_keeps_one_timer_per_id() {
        let mut w = Wheel::new(10, 8, 0);
        // A deadline moved 10 000 times, back and forth, near and far.
        for n in 0..10_000u64 {
            let d = if n % 2 == 0 {
                1_000_000 + n
            } else {
                50 + n % 7
            };
            w.schedule(1, d);
            w.schedule(2, d + 3);
        }
        assert_eq!(w.len(), 2, "one timer per id");
        let total: usize = w.slots.iter().map(Vec::len).sum();
        assert_eq!(total, 2, "no stale entries left in the slots");
        let mut fired = Vec::new();
        w.advance(2_000_000, |id, d| fired.push((id, d)));
        fired.sort_unstable();
        assert_eq!(
            fired,
            [(1, 50 + 9_999 % 7), (2, 53 + 9_999 % 7)],
            "each fires once, at its last deadline"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_cancelled_timer_never_fires_and_others_keep_their_place() {
        let mut w = Wheel::new(10, 4, 0);
        // Many ids in few slots: cancels move others within a slot.
        for id in 0..64 {
            w.schedule(id, 5 + id % 3);
        }
        for id in (0..64).step_by(2) {
            assert!(w.cancel(id));
        }
        assert!(!w.cancel(0), "already cancelled");
        assert_eq!(w.len(), 32);
        // Rescheduling after the cancels finds every remaining place right.
        for id in (1..64).step_by(4) {
            w.schedule(id, 100);
        }
        let mut fired = Vec::new();
        w.advance(50, |id, _| fired.push(id));
        fired.sort_unstable();
        let early: Vec<u64> = (1..64).step_by(2).filter(|id| id % 4 != 1).collect();
        assert_eq!(fired, early);
        w.advance(100, |id, _| fired.push(id));
        assert_eq!(fired.len(), 32);
        assert!(w.is_empty());
    }
}
