//! Forwarding inside a tenant subnet: where an IPv4 packet goes.
//!
//! Same subnet → straight to the destination VM, local or behind a remote
//! VTEP. Routing between subnets, the gateway's own services and external
//! traffic come with the distributed router; until then they are refused
//! with their own causes, never flooded.

use std::net::Ipv4Addr;

use flowtable::{Mac, PortId};

use crate::outcome::DropCause;
use crate::topology::{Endpoint, Topology};

/// Where a packet from a local VM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A VM on this host.
    Local { port: PortId, mac: Mac },
    /// A VM behind another VTEP.
    Remote { mac: Mac, vtep: Ipv4Addr },
}

/// Decide for a packet from `src` to `dst` in network `vni`.
pub fn decide(topo: &Topology, vni: u32, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Next, DropCause> {
    if dst.is_broadcast() || dst.is_multicast() || dst.is_unspecified() {
        return Err(DropCause::BroadcastIp);
    }
    let subnet = topo.subnet_of(vni, src).ok_or(DropCause::SpoofedIp)?;
    if dst == subnet.cidr.broadcast() {
        return Err(DropCause::BroadcastIp);
    }
    if !subnet.cidr.contains(dst) {
        return Err(DropCause::NoRoute);
    }
    match topo.lookup(vni, dst) {
        Some(Endpoint::Local { port, mac }) => Ok(Next::Local { port, mac }),
        Some(Endpoint::Remote { mac, vtep }) => Ok(Next::Remote { mac, vtep }),
        Some(Endpoint::Gateway { .. }) => Err(DropCause::ToGateway),
        None => Err(DropCause::UnknownDestination),
    }
}
