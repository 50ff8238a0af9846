//! Logs on the packet path, rate-limited: a flood of bad packets must not
//! become a flood of log lines. Per-packet refusals are `debug` lines, at
//! most `per_second` of them; refusals an operator must act on (a VM out
//! of connections or NAT ports) are `warn` lines, at most one per VM and
//! cause every ten seconds. What was held back is counted and said with
//! the next line.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use coprocessor::DropCause;
use flowtable::PortId;
use tracing::{debug, warn};

pub struct RateLog {
    per_second: u32,
    window: Instant,
    in_window: u32,
    suppressed: u64,
    warned: HashMap<(PortId, DropCause), (Instant, u64)>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

impl RateLog {
    pub fn new(per_second: u32) -> RateLog {
        RateLog {
            per_second,
            window: Instant::now(),
            in_window: 0,
            suppressed: 0,
            warned: HashMap::new(),
        }
    }

    /// A frame from `port` was refused for `cause`.
    pub fn drop(&mut self, port: PortId, cause: DropCause) {
        let now = Instant::now();
        if matches!(
            cause,
            DropCause::CtQuota | DropCause::CtFull | DropCause::NatQuota | DropCause::NatExhausted
        ) {
            let e = self
                .warned
                .entry((port, cause))
                .or_insert((now - WARN_EVERY, 0));
            if now.duration_since(e.0) >= WARN_EVERY {
                warn!(
                    port = port.0,
                    cause = cause.name(),
                    since_last = e.1,
                    "new connections refused"
                );
                *e = (now, 0);
            } else {
                e.1 += 1;
            }
            return;
        }
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < self.per_second {
            self.in_window += 1;
            debug!(
                port = port.0,
                cause = cause.name(),
                held_back = self.suppressed,
                "dropped"
            );
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_held_to_the_rate_and_counted() {
        let mut l = RateLog::new(5);
        for _ in 0..1000 {
            l.drop(PortId(1), DropCause::SpoofedIp);
        }
        assert_eq!(l.in_window, 5);
        assert_eq!(l.suppressed, 995);
        for _ in 0..100 {
            l.drop(PortId(1), DropCause::NatExhausted);
        }
        assert_eq!(l.warned[&(PortId(1), DropCause::NatExhausted)].1, 99);
    }
}
