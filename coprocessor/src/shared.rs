//! State every coprocessor thread of a switch shares: the topology, DHCP
//! leases, the security-group policy, the connection table, the SNAT pool,
//! the external network's neighbours and the load-balanced services. One
//! lock guards all of it, so a policy change and its revalidation are
//! atomic with respect to flow setup.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use flowtable::{Mac, PortId};

use crate::acl::Policy;
use crate::conntrack::{Conn, Conntrack, Limits, Timeouts};
use crate::dhcp::Leases;
use crate::nat::NatPool;
use crate::topology::Topology;
use dpif::{DropCause, Update};

/// Per-VM refusals, for `ctl` (who is being denied what).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmDrops {
    pub acl_denied: u64,
    pub ct_refused: u64,
    pub nat_refused: u64,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The tenant world. Copy on write: a decision holds a snapshot for
    /// its duration; a change made while nobody holds one is in place.
    pub topo: Arc<Topology>,
    pub leases: Leases,
    pub policy: Policy,
    pub ct: Conntrack,
    pub nat: Option<NatPool>,
    /// External hosts (and the external gateway) resolved by ARP.
    pub ext_neighbors: crate::ext_neighbors::ExtNeighbors,
    pub vm_drops: HashMap<PortId, VmDrops>,
    /// Load-balanced services (VIPs and their Maglev tables).
    pub services: crate::services::Services,
    /// Bumped by every change of topology or policy; decisions carry the
    /// version they were made under.
    pub version: u64,
    /// Decisions and drops of all coprocessor threads.
    pub counters: crate::Stats,
}

/// Everything [`Shared`] holds, as plain data (what a live handover
/// carries to the next binary).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedState {
    pub topology: crate::topology::TopologyParts,
    pub leases: Leases,
    pub groups: Vec<crate::acl::SecurityGroup>,
    pub members: Vec<Vec<(u32, u32)>>,
    pub policy_version: u64,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub conns: Vec<Conn>,
    pub ct_counters: crate::conntrack::CtCounters,
    pub ext_neighbors: Vec<(Ipv4Addr, Mac)>,
    pub vm_drops: Vec<(PortId, VmDrops)>,
    pub version: u64,
    pub counters: crate::Stats,
}

impl Shared {
    /// The state as plain data.
    pub fn save(&self) -> SharedState {
        let (groups, members) = self.policy.to_parts();
        let mut ext_neighbors: Vec<(Ipv4Addr, Mac)> = self.ext_neighbors.iter().collect();
        ext_neighbors.sort();
        let mut vm_drops: Vec<(PortId, VmDrops)> =
            self.vm_drops.iter().map(|(k, v)| (*k, *v)).collect();
        vm_drops.sort_by_key(|(p, _)| *p);
        SharedState {
            topology: self.topo.to_parts(),
            leases: self.leases.clone(),
            groups,
            members,
            policy_version: self.policy.version,
            timeouts: self.ct.timeouts,
            limits: self.ct.limits,
            conns: self.ct.to_parts(),
            ct_counters: self.ct.counters,
            ext_neighbors,
            vm_drops,
            version: self.version,
            counters: self.counters.clone(),
        }
    }

    /// The services (what a snapshot of format 2 adds to [`SharedState`]).
    pub fn save_services(&self) -> Vec<crate::services::ServiceSpec> {
        self.services.specs()
    }

    /// Rebuild from [`Shared::save`] and [`Shared::save_services`] at time
    /// `now` of the same clock: everything is checked again as it is
    /// rebuilt; NAT bindings are claimed back from the connections that
    /// hold them, and services count their connections again.
    pub fn restore(
        s: SharedState,
        services: Vec<crate::services::ServiceSpec>,
        now: u64,
    ) -> Result<Shared, String> {
        let topo = Topology::from_parts(s.topology).map_err(|e| format!("topology: {e}"))?;
        let policy = Policy::from_parts(s.groups, s.members, s.policy_version)
            .map_err(|e| format!("security groups: {e}"))?;
        let mut sh = Shared::new(topo, policy, s.timeouts, s.limits);
        sh.ct = Conntrack::from_parts(s.timeouts, s.limits, s.ct_counters, s.conns, now);
        if let Some(pool) = sh.nat.as_mut() {
            for (_, c) in sh.ct.iter() {
                if let (Some(b), Some(owner)) = (c.nat, c.owner) {
                    if b.pooled {
                        pool.claim(owner, c.admission.proto, b.ip, b.port);
                    }
                }
            }
        }
        for spec in services {
            sh.services
                .check(&spec, &sh.topo, None)
                .and_then(|()| sh.services.insert(spec))
                .map_err(|e| e.to_string())?;
        }
        for (_, c) in sh.ct.iter() {
            if let Some(k) = crate::lb::vip_of(c) {
                sh.services.opened(&k);
            }
        }
        sh.leases = s.leases;
        sh.ext_neighbors = s.ext_neighbors.into_iter().collect();
        sh.vm_drops = s.vm_drops.into_iter().collect();
        sh.version = s.version;
        sh.counters = s.counters;
        // A previous release counted fewer drop causes.
        sh.counters.drops.resize(DropCause::ALL.len(), 0);
        Ok(sh)
    }

    /// State for `topo` (the SNAT pool comes from its external network).
    pub fn new(topo: Topology, policy: Policy, timeouts: Timeouts, limits: Limits) -> Shared {
        let nat = topo
            .external
            .as_ref()
            .filter(|e| !e.snat.is_empty())
            .map(|e| NatPool::new(e.snat.clone(), e.ports.0, e.ports.1, e.per_vm_ports));
        Shared {
            topo: Arc::new(topo),
            leases: Leases::default(),
            policy,
            ct: Conntrack::new(timeouts, limits, 0),
            nat,
            ext_neighbors: Default::default(),
            vm_drops: HashMap::new(),
            services: Default::default(),
            version: 0,
            counters: crate::Stats::new(),
        }
    }

    /// Free what an ended connection held and remove its flows.
    pub fn end(&mut self, conn: &Conn, out: &mut Update) {
        if let (Some(b), Some(owner), Some(pool)) = (conn.nat, conn.owner, self.nat.as_mut()) {
            if b.pooled {
                pool.release(owner, conn.admission.proto, b.ip, b.port);
            }
        }
        if let Some(k) = crate::lb::vip_of(conn) {
            self.services.closed(&k);
        }
        out.remove.extend(conn.installed_keys());
    }

    /// A connection's timer ran out: end it; one whose handshake never
    /// completed counts against its backend, if load-balanced.
    pub fn expired(&mut self, conn: &Conn, out: &mut Update, now: u64) {
        if crate::conntrack::half_open(&conn.state) {
            self.services
                .passive(conn, crate::services::Passive::TimedOut, now);
        }
        self.end(conn, out);
    }

    /// Count a refusal against the VM on `port`.
    pub fn vm_drop(&mut self, port: PortId, cause: DropCause) {
        let d = self.vm_drops.entry(port).or_default();
        match cause {
            DropCause::AclDenied => d.acl_denied += 1,
            DropCause::CtFull | DropCause::CtQuota | DropCause::CtClash => d.ct_refused += 1,
            DropCause::NatQuota | DropCause::NatExhausted => d.nat_refused += 1,
            _ => {}
        }
    }
}
