//! Keeping decisions current: connection timers (the fast path's reports
//! and checks), and policy changes that must reach existing flows.

use flowtable::FlowKey;

use crate::acl::Rule;
use crate::conntrack::Expiry;
use crate::ops::{Applied, Op, OpError};
use crate::{lock, Coprocessor};
use dpif::{CheckAnswer, CtCheck, FlowUse, Update};

impl Coprocessor {
    /// Advance connection timers to `now` (the fast path's clock): checks
    /// to send to the fast path, flows of ended connections to remove;
    /// and send the health checks that are due.
    pub fn tick(&mut self, now: u64) -> Update {
        let mut out = Update::default();
        let mut sh = lock(&self.shared);
        for e in sh.ct.tick(now) {
            match e {
                Expiry::Check { id, keys } => out.checks.push(CtCheck { id, keys }),
                Expiry::Ended(c) => sh.expired(&c, &mut out, now),
            }
        }
        if sh.any_services() {
            let topo = std::sync::Arc::clone(&sh.topo);
            out.tx.extend(sh.services_mut().health_tick(&topo, now));
        }
        out
    }

    /// Fast-path thread `thread` removed an idle flow of a tracked
    /// connection.
    pub fn flow_gone(&mut self, key: &FlowKey, used: FlowUse, thread: u16) {
        self.shared
            .read(self.slot)
            .ct
            .flow_gone(key, (used.last_used, used.packets), thread);
    }

    /// The fast path's answer to a [`CtCheck`] (every thread's, gathered).
    pub fn checked(&mut self, a: &CheckAnswer, now: u64) -> Update {
        let mut out = Update::default();
        let sh = self.shared.read(self.slot);
        let used = a.used.map(|u| u.map(|u| (u.last_used, u.packets)));
        if let Some(c) = sh.ct.checked(a.id, a.keys, used, a.on, now) {
            sh.expired(&c, &mut out, now);
        }
        out
    }

    /// Replace the rules of security group `name` and revalidate: every
    /// tracked connection the new rules would not admit ends (its flows
    /// are removed), and every stateless flow compiled under the policy is
    /// removed to be compiled again. All or nothing: bad rules change
    /// nothing.
    pub fn set_rules(&mut self, name: &str, rules: Vec<Rule>) -> Result<Update, OpError> {
        self.apply(vec![Op::SetRules(name.into(), rules)])
            .map(|(out, _)| out)
    }

    /// Apply a batch of changes atomically (see [`crate::ops`]).
    pub fn apply(&mut self, ops: Vec<Op>) -> Result<(Update, Applied), OpError> {
        let mut out = Update::default();
        let applied = lock(&self.shared).apply(ops, &mut out)?;
        Ok((out, applied))
    }
}
