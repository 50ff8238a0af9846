//! State every coprocessor thread of a switch shares: the topology, DHCP leases, the
//! security-group policy, the connection table, the SNAT pool and the
//! external network's neighbours. One lock guards all of it, so a policy
//! change and its revalidation are atomic with respect to flow setup.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use flowtable::{Mac, PortId};

use crate::acl::Policy;
use crate::conntrack::{Conn, Conntrack, Limits, Timeouts};
use crate::dhcp::Leases;
use crate::nat::NatPool;
use crate::outcome::{DropCause, Outcome};
use crate::topology::Topology;

/// Per-VM refusals, for `ctl` (who is being denied what).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// External hosts (and the external gateway) learned from ARP.
    pub ext_neighbors: HashMap<Ipv4Addr, Mac>,
    /// When we last asked for each unresolved external neighbour.
    pub(crate) ext_asked: HashMap<Ipv4Addr, u64>,
    pub vm_drops: HashMap<PortId, VmDrops>,
    /// Bumped by every change of topology or policy; decisions carry the
    /// version they were made under.
    pub version: u64,
    /// Decisions and drops of all coprocessor threads.
    pub counters: crate::Stats,
}

impl Shared {
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
            ext_neighbors: HashMap::new(),
            ext_asked: HashMap::new(),
            vm_drops: HashMap::new(),
            version: 0,
            counters: crate::Stats::new(),
        }
    }

    /// Free what an ended connection held and remove its flows.
    pub fn end(&mut self, conn: &Conn, out: &mut Outcome) {
        if let (Some(b), Some(owner), Some(pool)) = (conn.nat, conn.owner, self.nat.as_mut()) {
            if b.pooled {
                pool.release(owner, conn.admission.proto, b.ip, b.port);
            }
        }
        out.remove.extend(conn.installed_keys());
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
