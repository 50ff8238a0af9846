//! Where an IPv4 packet from a VM goes: the distributed router.
//!
//! Same subnet → straight to the destination VM, local or behind a remote
//! VTEP. Another subnet of the same tenant network → routed on this host
//! (the packet leaves with the gateway's MAC as source and its TTL
//! decremented). Gateway addresses are answered by the coprocessor itself.
//! Destinations outside the network follow static routes, else leave
//! through NAT if the network may, else are refused with their own cause,
//! never flooded.

use std::net::Ipv4Addr;

use flowtable::{Mac, PortId};

use crate::topology::{Endpoint, Topology, Via};
use dpif::DropCause;

/// Where a packet from a local VM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A VM on this host.
    Local {
        port: PortId,
        mac: Mac,
        routed: bool,
    },
    /// A VM behind another VTEP.
    Remote {
        mac: Mac,
        vtep: Ipv4Addr,
        routed: bool,
    },
    /// The network's gateway VTEP, for a destination this host does not know.
    GatewayVtep { vtep: Ipv4Addr, routed: bool },
    /// Outside the tenant network, through NAT on the external network.
    External,
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
    let routed = !subnet.cidr.contains(dst);
    let gateway_vtep = topo.network(vni).and_then(|n| n.gateway_vtep);
    let target = if routed {
        match topo.subnet_of(vni, dst) {
            Some(other) if dst == other.cidr.broadcast() => return Err(DropCause::BroadcastIp),
            Some(_) => dst,
            // Outside the network's subnets: static routes, longest first.
            None => match topo.route(vni, dst).map(|r| r.via) {
                Some(Via::Vm(hop)) => hop,
                Some(Via::GatewayVtep) => {
                    let vtep = gateway_vtep.ok_or(DropCause::NoRoute)?;
                    return Ok(Next::GatewayVtep { vtep, routed });
                }
                None if topo.network(vni).is_some_and(|n| n.snat) => {
                    return match topo.external {
                        Some(_) => Ok(Next::External),
                        None => Err(DropCause::NoExternal),
                    };
                }
                None => return Err(DropCause::NoRoute),
            },
        }
    } else {
        dst
    };
    match topo.lookup(vni, target) {
        Some(Endpoint::Local { port, mac }) => Ok(Next::Local { port, mac, routed }),
        Some(Endpoint::Remote { mac, vtep }) => Ok(Next::Remote { mac, vtep, routed }),
        Some(Endpoint::Gateway { .. }) => Err(DropCause::ToGateway),
        // Unknown here: the gateway hypervisor knows every endpoint.
        None => match gateway_vtep {
            Some(vtep) => Ok(Next::GatewayVtep { vtep, routed }),
            None => Err(DropCause::UnknownDestination),
        },
    }
}
