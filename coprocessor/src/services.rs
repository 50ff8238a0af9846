//! Load-balanced services: a VIP (network, address, protocol, port) with a
//! weighted set of backends, and the [`maglev`] table each one picks
//! backends from. The table is built here, when a service is added or its
//! backends change (a control-plane step, never a packet's), and shared by
//! every coprocessor thread through an `Arc`.
//!
//! What the packet path asks of it is [`Services::get`] (is this a VIP,
//! and which backend takes this connection); what it reports back is
//! [`Services::opened`] and [`Services::closed`] for the per-VIP
//! connection count a limit is checked against. Connections are not
//! listed here: they live in conntrack, which knows the backend each one
//! was pinned to (its forward side's DNAT).
//!
//! A service's backends may be drained (weight 0: they keep their
//! connections and take no new ones) or down (an active health check
//! failed: out of the table until it recovers); either way the table is
//! rebuilt from the backends left, so only connections that would have
//! picked those backends pick another one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::maglev::{self, Backend, Table};
use crate::topology::{Endpoint, Topology};

/// Services one switch holds at most: each table is 128 KiB.
pub const MAX_SERVICES: usize = 4096;

/// One backend of a service, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendSpec {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Relative share of new connections; 0 drains it.
    pub weight: u32,
}

/// A service as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vni: u32,
    pub vip: Ipv4Addr,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub port: u16,
    pub backends: Vec<BackendSpec>,
    /// Connections the VIP holds at most (all clients); 0: no limit but
    /// conntrack's own.
    pub max_connections: u32,
    /// Active checks of its (local) backends, if any.
    pub health: Option<crate::health::HealthSpec>,
    /// An address on the external network where the same port is
    /// balanced too (north-south), to this host's backends.
    pub external_vip: Option<Ipv4Addr>,
}

impl ServiceSpec {
    pub fn key(&self) -> VipKey {
        VipKey {
            vni: self.vni,
            vip: u32::from(self.vip),
            proto: self.proto,
            port: self.port,
        }
    }

    /// The key of its external VIP, if it has one.
    pub fn external_key(&self) -> Option<VipKey> {
        self.external_vip.map(|ip| VipKey {
            vni: EXTERNAL,
            vip: u32::from(ip),
            proto: self.proto,
            port: self.port,
        })
    }
}

/// The "network" of external VIPs' keys (no VNI is 0).
pub const EXTERNAL: u32 = 0;

/// What a packet addresses a service by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub vni: u32,
    pub vip: u32,
    pub proto: u8,
    pub port: u16,
}

/// A service and what the switch keeps for it.
#[derive(Debug, Clone)]
pub struct Service {
    pub spec: ServiceSpec,
    /// `None`: no backend may take a connection (all drained or down).
    pub table: Option<Arc<Table>>,
    /// Backends an active check found down (indices into `spec.backends`).
    pub down: Vec<bool>,
    pub counters: ServiceCounters,
}

/// Per-service counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceCounters {
    /// Connections given a backend.
    pub picked: u64,
    /// New connections refused: the VIP held `max_connections`.
    pub refused_limit: u64,
    /// New connections refused: no backend could take them.
    pub refused_no_backend: u64,
    /// Packets of no known connection answered with a TCP reset.
    pub resets: u64,
}

/// Why a service was refused (the message names the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {name}: {what}")]
pub struct ServiceError {
    pub name: String,
    pub what: String,
}

/// The addresses of [`Services`]: VIPs by network, and external VIPs.
#[derive(Debug, Clone, Default)]
pub struct VipAddresses {
    vips: rustc_hash::FxHashSet<(u32, u32)>,
    external: rustc_hash::FxHashSet<u32>,
}

impl VipAddresses {
    /// No VIP: no service (each has one).
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }

    pub fn is_vip(&self, vni: u32, ip: Ipv4Addr) -> bool {
        !self.vips.is_empty() && self.vips.contains(&(vni, u32::from(ip)))
    }

    pub fn is_external_vip(&self, ip: Ipv4Addr) -> bool {
        !self.external.is_empty() && self.external.contains(&u32::from(ip))
    }
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Services {
    by_key: FxHashMap<VipKey, Service>,
    names: BTreeMap<String, VipKey>,
    /// (VNI, VIP) → services on it (an address may serve several ports).
    vips: FxHashMap<(u32, u32), u32>,
    /// Live connections per VIP, kept apart from the services: a
    /// connection counts until it ends, whatever happens to the service's
    /// definition meanwhile (a change that is undone, a removal whose
    /// connections end after it).
    conns: FxHashMap<VipKey, u32>,
    /// External VIP keys → the service's own key.
    external: FxHashMap<VipKey, VipKey>,
    /// External VIPs (answered by ARP on the external port).
    external_ips: FxHashMap<u32, u32>,
    /// Active health checks' state ([`crate::health`]).
    pub health: crate::health::Health,
    /// Passive checks: per backend (network, address, port), connections
    /// it refused and connections it never answered.
    passive: FxHashMap<(u32, u32, u16), PassiveCounts>,
}

/// What a backend did with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passive {
    /// It answered the SYN with a reset.
    Refused,
    /// The handshake timed out.
    TimedOut,
    /// It answered the SYN (a SYN-ACK).
    Answered,
}

/// Per backend: connections it refused or let time out, and its passive
/// ejection (see [`Services::passive`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassiveCounts {
    pub refused: u64,
    pub timed_out: u64,
    /// Failures since its last answered SYN.
    pub streak: u32,
    /// Out of the tables until then (ns), if ejected.
    pub ejected_until: Option<u64>,
    pub ejections: u64,
}

/// How long a passively ejected backend stays out, in health-check
/// intervals (then it is given connections again: if they fail, `fall`
/// of them eject it again).
pub const EJECTION_INTERVALS: u64 = 10;

impl Services {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The service a packet to `key` is for.
    pub fn get(&self, key: &VipKey) -> Option<&Service> {
        self.by_key.get(key)
    }

    pub fn get_mut(&mut self, key: &VipKey) -> Option<&mut Service> {
        self.by_key.get_mut(key)
    }

    pub fn named(&self, name: &str) -> Option<&Service> {
        self.names.get(name).and_then(|k| self.by_key.get(k))
    }

    /// The VIPs and external VIPs, as plain sets (what a decision asks
    /// of every packet, without locking the services).
    pub fn addresses(&self) -> VipAddresses {
        VipAddresses {
            vips: self.vips.keys().copied().collect(),
            external: self.external_ips.keys().copied().collect(),
        }
    }

    /// Is `ip` a VIP of network `vni` (answered by the ARP proxy)?
    pub fn is_vip(&self, vni: u32, ip: Ipv4Addr) -> bool {
        !self.vips.is_empty() && self.vips.contains_key(&(vni, u32::from(ip)))
    }

    /// The service an external VIP's key is for.
    pub fn external(&self, key: &VipKey) -> Option<&Service> {
        self.external.get(key).and_then(|k| self.by_key.get(k))
    }

    /// Is `ip` an external VIP (answered by ARP on the external port)?
    pub fn is_external_vip(&self, ip: Ipv4Addr) -> bool {
        !self.external_ips.is_empty() && self.external_ips.contains_key(&u32::from(ip))
    }

    /// The services, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Service> + '_ {
        self.names.values().filter_map(|k| self.by_key.get(k))
    }

    /// The configured services (what a snapshot carries).
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.iter().map(|s| s.spec.clone()).collect()
    }

    /// Check `spec` against `topo` and this set (`replacing`: the name of
    /// the service it replaces, whose VIP it may keep).
    pub fn check(
        &self,
        spec: &ServiceSpec,
        topo: &Topology,
        replacing: Option<&str>,
    ) -> Result<(), ServiceError> {
        let err = |what: String| ServiceError {
            name: spec.name.clone(),
            what,
        };
        if spec.name.is_empty() || spec.name.len() > 64 {
            return Err(err("field `name`: 1 to 64 characters".into()));
        }
        if !matches!(spec.proto, 6 | 17) {
            return Err(err(format!(
                "field `protocol`: {} is not tcp or udp",
                spec.proto
            )));
        }
        if spec.port == 0 {
            return Err(err("field `port`: 0 is not a port".into()));
        }
        if let Some(h) = &spec.health {
            h.check().map_err(err)?;
        }
        if let Some(ip) = spec.external_vip {
            let Some(ext) = topo.external.as_ref() else {
                return Err(err(
                    "field `external_vip`: the switch has no external network".into(),
                ));
            };
            if !ext.cidr.contains(ip) || topo.external_addr(ip).is_some() || ext.gateway == Some(ip)
            {
                return Err(err(format!(
                    "field `external_vip`: {ip} is not a free address of the external network {}",
                    ext.cidr
                )));
            }
            if let Some(other) = spec
                .external_key()
                .and_then(|k| self.external.get(&k))
                .and_then(|k| self.by_key.get(k))
                .filter(|s| Some(s.spec.name.as_str()) != replacing)
            {
                return Err(err(format!(
                    "field `external_vip`: service {} already has it",
                    other.spec.name
                )));
            }
        }
        if topo.network(spec.vni).is_none() {
            return Err(err(format!("field `network`: no network {}", spec.vni)));
        }
        if topo.subnet_of(spec.vni, spec.vip).is_none() {
            return Err(err(format!(
                "field `vip`: {} is in no subnet of network {}",
                spec.vip, spec.vni
            )));
        }
        match topo.lookup(spec.vni, spec.vip) {
            None => {}
            Some(Endpoint::Gateway { .. }) => {
                return Err(err(format!("field `vip`: {} is a gateway", spec.vip)))
            }
            Some(_) => return Err(err(format!("field `vip`: {} is a VM's address", spec.vip))),
        }
        if let Some((i, b)) = spec
            .backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.port == 0 || b.ip == spec.vip || b.ip.is_broadcast())
        {
            return Err(err(format!(
                "field `backends[{i}]`: {}:{} is not a backend address",
                b.ip, b.port
            )));
        }
        let same_key = self.by_key.get(&spec.key());
        if let Some(other) = same_key.filter(|s| Some(s.spec.name.as_str()) != replacing) {
            return Err(err(format!(
                "fields `vip`, `protocol`, `port`: service {} already has them",
                other.spec.name
            )));
        }
        if replacing.is_none() && self.names.contains_key(&spec.name) {
            return Err(err("already exists".into()));
        }
        if replacing.is_none() && self.by_key.len() >= MAX_SERVICES {
            return Err(err(format!("at most {MAX_SERVICES} services")));
        }
        Ok(())
    }

    /// Add `spec` (checked with [`Services::check`]), or replace the
    /// service of the same name; returns what it replaced. The table is
    /// built before anything changes, so a refused set leaves the old one.
    pub fn insert(&mut self, spec: ServiceSpec) -> Result<Option<Service>, ServiceError> {
        let down = vec![false; spec.backends.len()];
        let table = build(&spec, &down)?;
        let old = self.remove(&spec.name);
        let mut svc = Service {
            spec,
            table,
            down,
            counters: ServiceCounters::default(),
        };
        if let Some(o) = &old {
            // A backend keeps its health and the service its counters
            // across a change of the set (a service that no longer checks
            // its backends takes them all as up).
            let checked = svc.spec.health.is_some();
            for (i, b) in svc.spec.backends.iter().enumerate().filter(|_| checked) {
                if let Some(j) = o
                    .spec
                    .backends
                    .iter()
                    .position(|x| (x.ip, x.port) == (b.ip, b.port))
                {
                    svc.down[i] = o.down.get(j).copied().unwrap_or(false);
                }
            }
            if svc.down.iter().any(|d| *d) {
                svc.table = build(&svc.spec, &svc.down)?;
            }
            svc.counters = o.counters;
        }
        self.index(svc);
        Ok(old)
    }

    /// Add `svc` to the indices and the set.
    fn index(&mut self, svc: Service) {
        let key = svc.spec.key();
        self.names.insert(svc.spec.name.clone(), key);
        *self.vips.entry((key.vni, key.vip)).or_default() += 1;
        if let Some(ext) = svc.spec.external_key() {
            self.external.insert(ext, key);
            *self.external_ips.entry(ext.vip).or_default() += 1;
        }
        self.by_key.insert(key, svc);
    }

    /// Remove the service `name`.
    pub fn remove(&mut self, name: &str) -> Option<Service> {
        let key = self.names.remove(name)?;
        if let Some(n) = self.vips.get_mut(&(key.vni, key.vip)) {
            *n -= 1;
            if *n == 0 {
                self.vips.remove(&(key.vni, key.vip));
            }
        }
        let svc = self.by_key.remove(&key)?;
        if let Some(ext) = svc.spec.external_key() {
            self.external.remove(&ext);
            if let Some(n) = self.external_ips.get_mut(&ext.vip) {
                *n -= 1;
                if *n == 0 {
                    self.external_ips.remove(&ext.vip);
                }
            }
        }
        Some(svc)
    }

    /// Put back a service [`Services::insert`] or [`Services::remove`]
    /// returned (undoing a change): exactly as it was.
    pub fn restore(&mut self, svc: Service) {
        self.remove(&svc.spec.name);
        self.index(svc);
    }

    /// Mark backend `ip:port` of service `name` up or down; the table is
    /// rebuilt if that changed. True if it did.
    pub fn set_down(&mut self, name: &str, ip: Ipv4Addr, port: u16, down: bool) -> bool {
        let Some(svc) = self.names.get(name).and_then(|k| self.by_key.get_mut(k)) else {
            return false;
        };
        let Some(i) = svc
            .spec
            .backends
            .iter()
            .position(|b| (b.ip, b.port) == (ip, port))
        else {
            return false;
        };
        if svc.down[i] == down {
            return false;
        }
        svc.down[i] = down;
        // The set was accepted when it was added; a subset builds too.
        svc.table = build(&svc.spec, &svc.down).unwrap_or(None);
        true
    }

    /// Count what the backend of load-balanced connection `c` did with
    /// it at `now` (nothing if `c` is not one). A backend that active
    /// checks do not reach (on another host) and that fails `fall` new
    /// connections in a row, of a service with a health check, is ejected
    /// from the tables for [`EJECTION_INTERVALS`] check intervals (what
    /// Envoy calls outlier detection); [`Services::health_tick`] lets it
    /// back in.
    pub fn passive(&mut self, c: &crate::conntrack::Conn, what: Passive, now: u64) {
        let (Some(vk), Some((ip, port))) = (crate::lb::vip_of(c), crate::lb::backend_of(c)) else {
            return;
        };
        let vni = c.admission.vni;
        if what == Passive::Answered {
            // Every load-balanced connection's SYN-ACK: one lookup.
            if let Some(p) = self.passive.get_mut(&(vni, ip, port)) {
                p.streak = 0;
            }
            return;
        }
        // The connection's service must still list the backend (so only
        // listed backends are counted: the map stays bounded); its check.
        let Some(svc) = self.get(&vk).or_else(|| self.external(&vk)) else {
            return;
        };
        if !svc
            .spec
            .backends
            .iter()
            .any(|b| (u32::from(b.ip), b.port) == (ip, port))
        {
            return;
        }
        let check = svc.spec.health;
        let probed = check.is_some_and(|h| {
            self.health.targets.contains_key(&crate::health::Target {
                vni,
                ip,
                port: if h.tcp { port } else { 0 },
            })
        });
        let p = self.passive.entry((vni, ip, port)).or_default();
        match what {
            Passive::Refused => p.refused += 1,
            Passive::TimedOut => p.timed_out += 1,
            Passive::Answered => return,
        }
        p.streak = p.streak.saturating_add(1);
        let Some(h) = check.filter(|_| !probed && p.ejected_until.is_none()) else {
            return;
        };
        if p.streak < u32::from(h.fall) {
            return;
        }
        p.ejected_until = Some(now + EJECTION_INTERVALS * u64::from(h.interval_ms) * 1_000_000);
        p.ejections += 1;
        p.streak = 0;
        self.set_backend_down(vni, ip, port, true);
    }

    /// Forget the passive counts of backends no service lists any more
    /// (backends come and go: the map must not keep them all).
    pub(crate) fn forget_unlisted(&mut self) {
        if self.passive.is_empty() {
            return;
        }
        let listed: rustc_hash::FxHashSet<(u32, u32, u16)> = self
            .iter()
            .flat_map(|s| {
                s.spec
                    .backends
                    .iter()
                    .map(|b| (s.spec.vni, u32::from(b.ip), b.port))
            })
            .collect();
        self.passive.retain(|k, _| listed.contains(k));
    }

    /// Let passively ejected backends whose time is up back in.
    pub(crate) fn end_ejections(&mut self, now: u64) {
        let due: Vec<(u32, u32, u16)> = self
            .passive
            .iter_mut()
            .filter(|(_, p)| p.ejected_until.is_some_and(|t| t <= now))
            .map(|(k, p)| {
                p.ejected_until = None;
                *k
            })
            .collect();
        for (vni, ip, port) in due {
            self.set_backend_down(vni, ip, port, false);
        }
    }

    /// Mark backend `ip:port` of network `vni` down (or up) in every
    /// service that lists it.
    fn set_backend_down(&mut self, vni: u32, ip: u32, port: u16, down: bool) {
        let names: Vec<String> = self
            .iter()
            .filter(|s| {
                s.spec.vni == vni
                    && s.spec
                        .backends
                        .iter()
                        .any(|b| (u32::from(b.ip), b.port) == (ip, port))
            })
            .map(|s| s.spec.name.clone())
            .collect();
        for name in names {
            self.set_down(&name, Ipv4Addr::from(ip), port, down);
        }
    }

    /// A backend's passive counts.
    pub fn passive_counts(&self, vni: u32, ip: Ipv4Addr, port: u16) -> PassiveCounts {
        self.passive
            .get(&(vni, u32::from(ip), port))
            .copied()
            .unwrap_or_default()
    }

    /// Live connections through `key` (a VIP, or an external VIP).
    pub fn conns(&self, key: &VipKey) -> u32 {
        self.conns.get(key).copied().unwrap_or(0)
    }

    /// A connection through `key` opened.
    pub fn opened(&mut self, key: &VipKey) {
        let n = self.conns.entry(*key).or_default();
        *n = n.saturating_add(1);
    }

    /// A connection through `key` ended.
    pub fn closed(&mut self, key: &VipKey) {
        if let Some(n) = self.conns.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.conns.remove(key);
            }
        }
    }

    /// Live connections of service `svc`: through its VIP and its
    /// external VIP.
    pub fn service_conns(&self, spec: &ServiceSpec) -> u32 {
        self.conns(&spec.key())
            .saturating_add(spec.external_key().map_or(0, |k| self.conns(&k)))
    }
}

/// The table for `spec`'s backends that are neither drained nor down.
fn build(spec: &ServiceSpec, down: &[bool]) -> Result<Option<Arc<Table>>, ServiceError> {
    let set: Vec<(Backend, u32)> = spec
        .backends
        .iter()
        .zip(down)
        .map(|(b, d)| {
            (
                Backend {
                    ip: b.ip,
                    port: b.port,
                },
                if *d { 0 } else { b.weight },
            )
        })
        .collect();
    maglev::Table::build(&set)
        .map(|t| t.map(Arc::new))
        .map_err(|e| ServiceError {
            name: spec.name.clone(),
            what: format!("field `backends`: {e}"),
        })
}

#[cfg(test)]
mod tests;
