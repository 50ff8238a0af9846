//! Active health checks of load-balanced backends: the coprocessor's
//! timekeeping thread probes each backend of a service that asks for it,
//! from the gateway address of the backend's subnet (a router's address,
//! which the backend already knows how to reach), at the service's
//! interval: a TCP SYN to the backend's port (answered by a SYN-ACK: up,
//! then reset by us so the server keeps nothing; a reset or nothing within
//! the timeout: a failure) or an ICMP echo request. `rise` successes in a
//! row bring a down backend back, `fall` failures in a row take it out
//! of its services' tables ([`Services::set_down`]); its established
//! connections stay.
//!
//! Only backends on this host are probed: a probe from this host's
//! gateway address to another host's VM would be refused there (the
//! gateway is no remote endpoint). A remote backend is checked by its own
//! hypervisor; here it is judged passively: connections it refused or let
//! time out are counted per backend, and `fall` of them in a row eject it
//! from the tables for a while ([`Services::passive`]). State is per (network, address, port)
//! target, shared by every service that lists it, and not carried by a
//! live handover (a new binary starts with every backend up and probes
//! again).

use std::net::Ipv4Addr;

use flowtable::{Mac, PortId};
use rustc_hash::FxHashMap;

use crate::services::Services;
use crate::topology::{Endpoint, Topology};

/// The probes' ICMP identifier and the first of their TCP source ports.
pub const PROBE_ID: u16 = 0x5653;
const PROBE_PORTS: u16 = 61_000;

/// How a service checks its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthSpec {
    /// TCP connect to the backend's port, or ICMP echo.
    pub tcp: bool,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u8,
    pub fall: u8,
}

impl HealthSpec {
    /// What is wrong with it, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !(250..=3_600_000).contains(&self.interval_ms) {
            return Err(format!(
                "field `health.interval_ms`: {} is not in 250..=3600000 (probes go at the timers' 250 ms tick)",
                self.interval_ms
            ));
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "field `health.timeout_ms`: {} is not in 10..=interval_ms",
                self.timeout_ms
            ));
        }
        for (name, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=10).contains(&v) {
                return Err(format!("field `health.{name}`: {v} is not in 1..=10"));
            }
        }
        Ok(())
    }
}

/// A probed backend: network, address, port (0: ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub vni: u32,
    pub ip: u32,
    pub port: u16,
}

/// One target's checks.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub up: bool,
    /// Results in a row that disagree with `up`.
    pub streak: u8,
    /// When the outstanding probe went (ns), if one did.
    pub pending: Option<u64>,
    pub next_at: u64,
    pub seq: u16,
    pub probes: u64,
    pub failures: u64,
    /// The thresholds of the check it was last probed by.
    pub rise: u8,
    pub fall: u8,
}

/// Every target's state.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub targets: FxHashMap<Target, State>,
}

/// What a tick sends: frames and the port each leaves by.
pub type Probes = Vec<(PortId, Vec<u8>)>;

impl Services {
    /// Probe what is due at `now` (ns) and count the probes that timed
    /// out; the frames to send.
    pub fn health_tick(&mut self, topo: &Topology, now: u64) -> Probes {
        let mut out = Vec::new();
        let mut results = Vec::new();
        let mut checked = self.checked_targets();
        // Only this host's backends are probed (a target that moved away
        // is forgotten: passive checks judge it now).
        checked.retain(|t, _| {
            matches!(
                topo.lookup(t.vni, Ipv4Addr::from(t.ip)),
                Some(Endpoint::Local { .. })
            )
        });
        for (target, h) in &checked {
            let Some(Endpoint::Local { port, mac }) =
                topo.lookup(target.vni, Ipv4Addr::from(target.ip))
            else {
                continue;
            };
            let st = self.health.targets.entry(*target).or_insert(State {
                up: true,
                ..State::default()
            });
            if let Some(sent) = st.pending {
                if now.saturating_sub(sent) >= u64::from(h.timeout_ms) * 1_000_000 {
                    st.pending = None;
                    results.push(*target);
                }
            }
            if st.pending.is_some() || now < st.next_at {
                continue;
            }
            let Some(f) = probe(topo, *target, mac, st.seq, h.tcp) else {
                continue;
            };
            (st.rise, st.fall) = (h.rise, h.fall);
            st.seq = st.seq.wrapping_add(1);
            st.pending = Some(now);
            st.next_at = now + u64::from(h.interval_ms) * 1_000_000;
            st.probes += 1;
            out.push((port, f));
        }
        self.end_ejections(now);
        self.forget_unlisted();
        // Targets no service checks here any more are forgotten.
        self.health.targets.retain(|t, _| checked.contains_key(t));
        for t in results {
            self.health_result(t, false);
        }
        out
    }

    /// Every target some service checks, with the first such service's
    /// check (a target listed by several is probed once).
    fn checked_targets(&self) -> FxHashMap<Target, HealthSpec> {
        let mut v = FxHashMap::default();
        for svc in self.iter() {
            let Some(h) = svc.spec.health else { continue };
            for b in &svc.spec.backends {
                let t = Target {
                    vni: svc.spec.vni,
                    ip: u32::from(b.ip),
                    port: if h.tcp { b.port } else { 0 },
                };
                v.entry(t).or_insert(h);
            }
        }
        v
    }

    /// An answer from `target` (`ok`: a SYN-ACK or echo reply; else a
    /// reset). False if no probe of it was outstanding (not ours).
    pub fn health_answer(&mut self, target: Target, ok: bool) -> bool {
        match self.health.targets.get_mut(&target) {
            Some(st) if st.pending.is_some() => {
                st.pending = None;
                self.health_result(target, ok);
                true
            }
            _ => false,
        }
    }

    fn health_result(&mut self, target: Target, ok: bool) {
        let Some(st) = self.health.targets.get_mut(&target) else {
            return;
        };
        if !ok {
            st.failures += 1;
        }
        if ok == st.up {
            st.streak = 0;
            return;
        }
        st.streak += 1;
        if st.streak < if ok { st.rise } else { st.fall } {
            return;
        }
        st.up = ok;
        st.streak = 0;
        let names: Vec<(String, u16)> = self
            .iter()
            .filter(|s| s.spec.vni == target.vni && s.spec.health.is_some())
            .flat_map(|s| {
                s.spec
                    .backends
                    .iter()
                    .filter(|b| {
                        u32::from(b.ip) == target.ip && (target.port == 0 || b.port == target.port)
                    })
                    .map(|b| (s.spec.name.clone(), b.port))
            })
            .collect();
        for (name, port) in names {
            self.set_down(&name, Ipv4Addr::from(target.ip), port, !ok);
        }
    }
}

/// A packet from a local VM to a gateway address: if it answers one of
/// our probes (a SYN-ACK or reset from the probed port, an echo reply
/// with our identifier), count it — and reset the connection a SYN-ACK
/// offers — and say so.
pub(crate) fn answered(
    s: &mut crate::setup::Setup<'_>,
    vni: u32,
    gw_mac: Mac,
) -> Result<bool, dpif::DropCause> {
    if !s.sh.any_services() || s.sh.services().health.targets.is_empty() {
        return Ok(false);
    }
    let key = s.key;
    let (target, ok) = match key.proto {
        6 => {
            let flags = crate::setup::tcp_flags(s.frame).unwrap_or(0);
            if !(PROBE_PORTS..PROBE_PORTS + 1000).contains(&key.dst_port) {
                return Ok(false);
            }
            let ok = match flags & 0x16 {
                0x12 => true,
                f if f & 0x04 != 0 => false,
                _ => return Ok(false),
            };
            (
                Target {
                    vni,
                    ip: key.src_ip,
                    port: key.src_port,
                },
                ok,
            )
        }
        1 if crate::icmp::echo_reply_id(s.frame) == Some(PROBE_ID) => (
            Target {
                vni,
                ip: key.src_ip,
                port: 0,
            },
            true,
        ),
        _ => return Ok(false),
    };
    if !s.sh.services().health_answer(target, ok) {
        return Ok(false);
    }
    if key.proto == 6 && ok {
        if let Some(rst) = crate::lb::tcp_reset(s.frame, gw_mac)? {
            s.out.tx.push((s.p.ingress, rst));
        }
    }
    Ok(true)
}

/// A probe of `target` (local, MAC `mac`) from its subnet's gateway.
fn probe(topo: &Topology, t: Target, mac: Mac, seq: u16, tcp: bool) -> Option<Vec<u8>> {
    let ip = Ipv4Addr::from(t.ip);
    let gw = topo.subnet_of(t.vni, ip)?.gateway;
    let gw_mac = topo.network(t.vni)?.gateway_mac;
    if tcp {
        let sport = PROBE_PORTS + seq % 1000;
        let isn = u32::from(seq).wrapping_mul(0x9e37_79b9);
        crate::reply::tcp_segment(gw_mac, mac, (gw, sport), (ip, t.port), isn, 0, 0x02).ok()
    } else {
        crate::icmp::echo_request(gw_mac, mac, gw, ip, PROBE_ID, seq).ok()
    }
}

#[cfg(test)]
mod tests;
