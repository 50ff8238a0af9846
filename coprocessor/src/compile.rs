//! Flow compile: a forwarding decision becomes the action the fast path
//! applies to every later packet of the flow.
//!
//! Both MACs are always rewritten (source to the sender's bound MAC,
//! destination to the receiver's), so a flow installed for a well-behaved
//! packet cannot be reused with forged Ethernet addresses, which are not
//! part of the key.

use std::net::Ipv4Addr;

use flowtable::{Action, EncapTemplate, Mac, Output, PortId};
use vxlan::{Template, TemplateSpec};

use crate::topology::{Topology, Uplink};
use dpif::DropCause;

/// Outer headers added by VXLAN encapsulation beyond the inner frame
/// (IPv4 20 + UDP 8 + VXLAN 8); the outer Ethernet header does not count
/// against the underlay MTU.
const ENCAP_IP_OVERHEAD: u16 = 36;

/// Outer headers from our uplink to `vtep` through `next_hop`.
fn template(up: &Uplink, vni: u32, vtep: Ipv4Addr, next_hop: Mac) -> Option<Template> {
    Template::new(&TemplateSpec {
        src_mac: up.mac,
        dst_mac: next_hop,
        local_vtep: up.local_vtep,
        remote_vtep: vtep,
        vni,
        ttl: up.ttl,
    })
    .ok()
}

/// A routed hop: the packet leaves with the gateway's MAC and one TTL less.
pub fn routed(a: Action, gateway_mac: Mac) -> Action {
    Action {
        set_eth_src: Some(gateway_mac),
        dec_ttl: true,
        ..a
    }
}

/// Deliver to a VM port on this host.
pub fn to_local(src_mac: Mac, dst_mac: Mac, port: PortId) -> Action {
    Action {
        set_eth_src: Some(src_mac),
        set_eth_dst: Some(dst_mac),
        ..Action::output(port)
    }
}

/// Encapsulate towards `vtep` in network `vni`.
pub fn to_remote(
    topo: &Topology,
    vni: u32,
    src_mac: Mac,
    dst_mac: Mac,
    vtep: Ipv4Addr,
) -> Result<Action, DropCause> {
    let up = topo.uplink.as_ref().ok_or(DropCause::NoUplink)?;
    let next_hop = topo.neighbor(vtep).ok_or(DropCause::NoNeighbor)?;
    let t = template(up, vni, vtep, next_hop).ok_or(DropCause::UnknownVni)?;
    Ok(Action {
        output: Output::Port(up.port),
        set_eth_src: Some(src_mac),
        set_eth_dst: Some(dst_mac),
        encap: Some(EncapTemplate(*t.bytes())),
        max_len: up.mtu.saturating_sub(ENCAP_IP_OVERHEAD),
        ..Action::output(up.port)
    })
}

/// The action for a packet from local VM `vm` that goes to `next` (the
/// external network is not a stateless destination: see `setup`).
pub fn next_action(
    topo: &Topology,
    vni: u32,
    vm: &crate::topology::LocalVm,
    next: crate::forward::Next,
) -> Result<Action, DropCause> {
    use crate::forward::Next;
    let gw_mac = topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
    let (a, is_routed) = match next {
        Next::Local { port, mac, routed } => (to_local(vm.mac, mac, port), routed),
        Next::Remote { mac, vtep, routed } => (to_remote(topo, vni, vm.mac, mac, vtep)?, routed),
        // The gateway hypervisor routes it on: address its router.
        Next::GatewayVtep { vtep, routed } => (to_remote(topo, vni, vm.mac, gw_mac, vtep)?, routed),
        Next::External => return Err(DropCause::NoExternal),
    };
    Ok(if is_routed { routed(a, gw_mac) } else { a })
}

/// Decapsulate traffic from `vtep` and deliver it to a local VM.
pub fn from_remote(vtep: Ipv4Addr, src_mac: Mac, dst_mac: Mac, port: PortId) -> Action {
    Action {
        decap: Some(u32::from(vtep)),
        ..to_local(src_mac, dst_mac, port)
    }
}

/// An encapsulated frame for the uplink (replies the coprocessor makes).
pub fn encapsulate(
    topo: &Topology,
    vni: u32,
    inner: &[u8],
    vtep: Ipv4Addr,
    next_hop: Mac,
) -> Option<Vec<u8>> {
    let t = template(topo.uplink.as_ref()?, vni, vtep, next_hop)?;
    let mut buf = vec![0u8; vxlan::OUTER_LEN + inner.len()];
    buf[vxlan::OUTER_LEN..].copy_from_slice(inner);
    // Outer UDP source port entropy from the inner headers (FNV-1a of the
    // Ethernet and IPv4/ARP header bytes), as for flows.
    let entropy = inner
        .iter()
        .take(42)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    vxlan::encap(&mut buf, vxlan::OUTER_LEN, inner.len(), t.bytes(), entropy).ok()?;
    Some(buf)
}
