//! The external network's neighbours (its gateway and on-link hosts),
//! resolved by ARP, with the rules that keep anyone on that segment from
//! steering a tenant's traffic or growing the switch:
//!
//! - A MAC is learned only from a reply to a question of ours, from the
//!   address asked, within [`ANSWER_WINDOW`]: an unsolicited reply or a
//!   request cannot repoint the gateway.
//! - A learned MAC is confirmed again after [`REACHABLE`] (it is used
//!   meanwhile, as Linux uses a stale entry while it probes); an answer
//!   with another MAC is reported ([`Learned::Changed`]) so the caller moves
//!   the flows that use the old one.
//! - Questions are bounded: one per neighbour per [`ASK_EVERY`], and at
//!   most [`MAX_ASKED`] open at once, so a VM sending to every address of
//!   a large external subnet cannot make the switch ARP-scan it; learned
//!   entries are bounded by [`MAX_KNOWN`] (the least recently confirmed
//!   goes).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use flowtable::Mac;

const SEC: u64 = 1_000_000_000;
/// How long a learned MAC is used before it is confirmed again.
pub const REACHABLE: u64 = 300 * SEC;
/// How often one neighbour is asked at most.
pub const ASK_EVERY: u64 = SEC;
/// How long after a question its answer is taken.
pub const ANSWER_WINDOW: u64 = 3 * SEC;
/// Questions open at once, at most.
pub const MAX_ASKED: usize = 1024;
/// Neighbours known at once, at most.
pub const MAX_KNOWN: usize = 4096;

/// What an ARP reply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Not an answer to a question of ours (or a multicast MAC): ignored.
    Unsolicited,
    /// A new neighbour, or the MAC it had.
    Confirmed,
    /// The neighbour answered with another MAC than it had: this one.
    Changed { old: Mac },
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct ExtNeighbors {
    /// MAC and when it was last confirmed (`None`: carried over from a
    /// snapshot or set by hand; confirmed from its first use on).
    known: HashMap<Ipv4Addr, (Mac, Option<u64>)>,
    /// Open questions: when each was asked.
    asked: HashMap<Ipv4Addr, u64>,
}

impl ExtNeighbors {
    /// A neighbour's MAC, as given (not learned): a snapshot's, a test's.
    pub fn insert(&mut self, ip: Ipv4Addr, mac: Mac) {
        self.known.insert(ip, (mac, None));
    }

    pub fn get(&self, ip: &Ipv4Addr) -> Option<Mac> {
        self.known.get(ip).map(|(m, _)| *m)
    }

    /// Every known neighbour and its MAC (for a snapshot).
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Addr, Mac)> + '_ {
        self.known.iter().map(|(ip, (m, _))| (*ip, *m))
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Questions open now.
    pub fn asking(&self) -> usize {
        self.asked.len()
    }

    pub fn clear(&mut self) {
        self.known.clear();
        self.asked.clear();
    }

    /// The MAC to use for `hop` at `now` (if any), and whether to send it a
    /// question now.
    pub fn resolve(&mut self, hop: Ipv4Addr, now: u64) -> (Option<Mac>, bool) {
        let (mac, fresh) = match self.known.get_mut(&hop) {
            Some((mac, at)) => {
                let at = *at.get_or_insert(now);
                (Some(*mac), now.saturating_sub(at) < REACHABLE)
            }
            None => (None, false),
        };
        if fresh {
            return (mac, false);
        }
        (mac, self.may_ask(hop, now))
    }

    fn may_ask(&mut self, hop: Ipv4Addr, now: u64) -> bool {
        if self
            .asked
            .get(&hop)
            .is_some_and(|&t| now.saturating_sub(t) < ASK_EVERY)
        {
            return false;
        }
        if self.asked.len() >= MAX_ASKED && !self.asked.contains_key(&hop) {
            // Questions nobody answered in time are forgotten first.
            self.asked
                .retain(|_, t| now.saturating_sub(*t) <= ANSWER_WINDOW);
            if self.asked.len() >= MAX_ASKED {
                return false;
            }
        }
        self.asked.insert(hop, now);
        true
    }

    /// An ARP reply from `ip` saying it is at `mac`, at `now`.
    pub fn answer(&mut self, ip: Ipv4Addr, mac: Mac, now: u64) -> Learned {
        let Some(t) = self.asked.get(&ip).copied() else {
            return Learned::Unsolicited;
        };
        if now.saturating_sub(t) > ANSWER_WINDOW || mac[0] & 1 != 0 {
            return Learned::Unsolicited;
        }
        self.asked.remove(&ip);
        if !self.known.contains_key(&ip) && self.known.len() >= MAX_KNOWN {
            // The least recently confirmed makes room.
            if let Some(oldest) = self
                .known
                .iter()
                .min_by_key(|(_, (_, at))| at.unwrap_or(0))
                .map(|(ip, _)| *ip)
            {
                self.known.remove(&oldest);
            }
        }
        match self.known.insert(ip, (mac, Some(now))) {
            Some((old, _)) if old != mac => Learned::Changed { old },
            _ => Learned::Confirmed,
        }
    }
}

impl FromIterator<(Ipv4Addr, Mac)> for ExtNeighbors {
    fn from_iter<I: IntoIterator<Item = (Ipv4Addr, Mac)>>(it: I) -> Self {
        let mut n = ExtNeighbors::default();
        for (ip, mac) in it {
            n.insert(ip, mac);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    const M1: Mac = [2, 0xee, 0, 0, 0, 1];
    const M2: Mac = [2, 0xee, 0, 0, 0, 2];

    #[test]
    fn only_answers_to_our_questions_are_learned() {
        let mut n = ExtNeighbors::default();
        assert_eq!(n.answer(GW, M1, 0), Learned::Unsolicited, "nobody asked");
        assert_eq!(n.resolve(GW, 0), (None, true), "unknown: ask");
        assert_eq!(n.resolve(GW, 1), (None, false), "once a second");
        assert_eq!(
            n.answer(GW, [1, 0, 0, 0, 0, 1], 2),
            Learned::Unsolicited,
            "multicast"
        );
        assert_eq!(n.answer(GW, M1, 3), Learned::Confirmed);
        assert_eq!(n.get(&GW), Some(M1));
        // The question is answered: another reply changes nothing.
        assert_eq!(n.answer(GW, M2, 4), Learned::Unsolicited);
        assert_eq!(n.get(&GW), Some(M1));
        // Too late an answer is no answer.
        let other = Ipv4Addr::new(203, 0, 113, 7);
        assert_eq!(n.resolve(other, 10), (None, true));
        assert_eq!(
            n.answer(other, M2, 10 + ANSWER_WINDOW + 1),
            Learned::Unsolicited
        );
        assert_eq!(n.get(&other), None);
    }

    #[test]
    fn a_learned_mac_is_confirmed_again_and_a_change_is_reported() {
        let mut n = ExtNeighbors::default();
        n.resolve(GW, 0);
        n.answer(GW, M1, 1);
        assert_eq!(n.resolve(GW, REACHABLE / 2), (Some(M1), false));
        // Past REACHABLE: still used, and asked again.
        let later = REACHABLE + 10;
        assert_eq!(n.resolve(GW, later), (Some(M1), true));
        assert_eq!(n.answer(GW, M2, later + 1), Learned::Changed { old: M1 });
        assert_eq!(n.resolve(GW, later + 2), (Some(M2), false));
        // One given (a snapshot's) counts from its first use.
        let mut n: ExtNeighbors = [(GW, M1)].into_iter().collect();
        assert_eq!(n.resolve(GW, 5 * REACHABLE), (Some(M1), false));
        assert_eq!(n.resolve(GW, 6 * REACHABLE + 1), (Some(M1), true));
    }

    #[test]
    fn questions_and_neighbours_are_bounded() {
        let mut n = ExtNeighbors::default();
        // A VM sending to every address of a large subnet: a bounded
        // number of questions at a time.
        let asked = (0..8192u32)
            .filter(|i| n.resolve(Ipv4Addr::from(0xc633_0000 + i), 0).1)
            .count();
        assert_eq!(asked, MAX_ASKED);
        assert_eq!(n.asking(), MAX_ASKED);
        // Once those questions are stale, new ones may go.
        assert!(
            n.resolve(Ipv4Addr::new(198, 51, 200, 1), ANSWER_WINDOW + 1)
                .1
        );
        assert!(n.asking() <= MAX_ASKED);
        // Answers fill the known table up to its bound.
        let mut n = ExtNeighbors::default();
        for i in 0..(u32::try_from(MAX_KNOWN).unwrap() + 100) {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            let t = u64::from(i) * 2 * ANSWER_WINDOW;
            assert!(n.resolve(ip, t).1);
            n.answer(ip, M1, t);
        }
        assert_eq!(n.len(), MAX_KNOWN);
        assert_eq!(n.get(&Ipv4Addr::from(0x0a00_0000)), None, "the oldest went");
    }
}
