//! The DHCP server (RFC 2131) on every VM port.
//!
//! A VM gets exactly its configured binding: its first address, the
//! subnet's mask and gateway (router), the network's DNS servers and lease
//! time, its hostname if configured, and an interface MTU (option 26) that
//! leaves room for VXLAN's 50 bytes. A port with no VM gets no offer, and a
//! VM can only ask for itself (the client hardware address must be its
//! MAC). Leases are kept in a table shared by the coprocessor threads: it
//! is state a live handover carries.
//!
//! Replies come from the gateway address and MAC (the server identifier),
//! broadcast unless the client already has its address (renewal, INFORM),
//! as RFC 2131 §4.1 allows.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use flowtable::Mac;
use smoltcp::wire::{DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr};

use crate::topology::{LocalVm, Topology};
use dpif::DropCause;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const OPT_HOSTNAME: u8 = 12;
const OPT_MTU: u8 = 26;

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// Caller's clock (ns) when the lease ends.
    pub expires: u64,
}

/// The leases handed out, by client MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leases {
    by_mac: HashMap<Mac, Lease>,
}

impl Leases {
    /// Drop the lease of `mac` (its VM is gone).
    pub fn forget(&mut self, mac: &Mac) {
        self.by_mac.remove(mac);
    }

    pub fn get(&self, mac: &Mac) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_mac.values()
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }
}

/// What the server did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this frame back to the client's port.
    Reply(Vec<u8>),
    /// Handled, nothing to send (RELEASE, DECLINE, a REQUEST for another server).
    Silent,
}

/// The UDP payload of a DHCP request from `vm`, already known to be IPv4
/// UDP 68 → 67 (`frame` is the whole Ethernet frame).
pub fn handle(
    topo: &Topology,
    vm: &LocalVm,
    leases: &mut Leases,
    frame: &[u8],
    now: u64,
) -> Result<Answer, DropCause> {
    let udp_payload = udp_payload(frame).ok_or(DropCause::Malformed)?;
    let pkt = DhcpPacket::new_checked(udp_payload).map_err(|_| DropCause::Malformed)?;
    let req = DhcpRepr::parse(&pkt).map_err(|_| DropCause::Malformed)?;
    if req.client_hardware_address.0 != vm.mac {
        return Err(DropCause::SpoofedMac);
    }
    let vni = vm.vni.get();
    let ip = *vm.ips.first().ok_or(DropCause::UnknownDestination)?;
    let subnet = topo
        .subnet_of(vni, ip)
        .ok_or(DropCause::UnknownDestination)?
        .clone();
    let net = topo.network(vni).ok_or(DropCause::UnknownVni)?;
    let server = subnet.gateway;
    let lease_ns = u64::from(net.lease_secs) * 1_000_000_000;
    let kind = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            if req.server_identifier.is_some_and(|s| s != server) {
                // The client chose another server's offer.
                return Ok(Answer::Silent);
            }
            let asked = req.requested_ip.unwrap_or(req.client_ip);
            if asked == ip {
                leases.by_mac.insert(
                    vm.mac,
                    Lease {
                        mac: vm.mac,
                        ip,
                        expires: now.saturating_add(lease_ns),
                    },
                );
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        DhcpMessageType::Inform => DhcpMessageType::Ack,
        DhcpMessageType::Release => {
            leases.by_mac.remove(&vm.mac);
            return Ok(Answer::Silent);
        }
        DhcpMessageType::Decline => return Ok(Answer::Silent),
        _ => return Err(DropCause::Malformed),
    };
    let inform = req.message_type == DhcpMessageType::Inform;
    let nak = kind == DhcpMessageType::Nak;
    let mtu = topo
        .uplink
        .as_ref()
        .map_or(1500, |u| u.mtu.saturating_sub(50))
        .to_be_bytes();
    let mut extra: Vec<DhcpOption<'_>> = Vec::new();
    if !nak {
        extra.push(DhcpOption {
            kind: OPT_MTU,
            data: &mtu,
        });
        if let Some(h) = &vm.hostname {
            extra.push(DhcpOption {
                kind: OPT_HOSTNAME,
                data: h.as_bytes(),
            });
        }
    }
    let mut dns = heapless::Vec::new();
    for d in net
        .dns
        .iter()
        .take(smoltcp::wire::DHCP_MAX_DNS_SERVER_COUNT)
    {
        let _ = dns.push(*d);
    }
    let reply = DhcpRepr {
        message_type: kind,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: if inform {
            req.client_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        your_ip: if inform || nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            ip
        },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: (!nak).then_some(subnet.gateway),
        subnet_mask: (!nak).then(|| Ipv4Addr::from(subnet.cidr.mask())),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(server),
        parameter_request_list: None,
        dns_servers: (!nak && !dns.is_empty()).then_some(dns),
        max_size: None,
        lease_duration: (!nak && !inform).then_some(net.lease_secs),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    let mut payload = vec![0u8; reply.buffer_len()];
    reply
        .emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .map_err(|_| DropCause::Malformed)?;
    // Unicast to a client that has its address; broadcast otherwise.
    let (dst_mac, dst_ip) = if !nak && !req.client_ip.is_unspecified() {
        (vm.mac, req.client_ip)
    } else {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    };
    Ok(Answer::Reply(udp_frame(
        net.gateway_mac,
        dst_mac,
        server,
        dst_ip,
        &payload,
    )?))
}

/// True if `key`-like fields describe a DHCP request (UDP 68 → 67).
pub fn is_request(proto: u8, src_port: u16, dst_port: u16) -> bool {
    proto == 17 && src_port == CLIENT_PORT && dst_port == SERVER_PORT
}

/// The UDP payload of an Ethernet/IPv4/UDP frame, bounds-checked.
fn udp_payload(f: &[u8]) -> Option<&[u8]> {
    let ihl = usize::from(*f.get(14)? & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([*f.get(16)?, *f.get(17)?]));
    let ip = f.get(14..14 + tot)?;
    let udp = ip.get(ihl..)?;
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    udp.get(8..ulen)
}

/// An Ethernet/IPv4/UDP(67 → 68) frame around `payload`, checksums set.
fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &[u8],
) -> Result<Vec<u8>, DropCause> {
    let udp_len16 = u16::try_from(8 + payload.len()).map_err(|_| DropCause::Malformed)?;
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    udp.extend_from_slice(&udp_len16.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // UDP checksum over the pseudo-header and the datagram.
    let sum = vxlan::checksum::sum(&src.octets())
        + vxlan::checksum::sum(&dst.octets())
        + 17
        + u32::from(udp_len16)
        + vxlan::checksum::sum(&udp);
    let c = match !vxlan::checksum::fold(sum) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    crate::reply::ipv4_frame(src_mac, dst_mac, src, dst, 17, &udp)
}

/// A reply as a client sees it (tests): type, yiaddr, options (kind, data).
#[cfg(test)]
pub(crate) type ParsedReply = (DhcpMessageType, Ipv4Addr, Vec<(u8, Vec<u8>)>);

#[cfg(test)]
pub(crate) fn parse_reply(frame: &[u8]) -> Option<ParsedReply> {
    let p = DhcpPacket::new_checked(udp_payload(frame)?).ok()?;
    let r = DhcpRepr::parse(&p).ok()?;
    let opts = p.options().map(|o| (o.kind, o.data.to_vec())).collect();
    Some((r.message_type, r.your_ip, opts))
}

/// A DHCP client message from `mac`, as a whole frame (tests).
#[cfg(test)]
pub(crate) fn client_message(
    mac: Mac,
    kind: DhcpMessageType,
    xid: u32,
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: xid,
        secs: 0,
        client_hardware_address: smoltcp::wire::EthernetAddress(mac),
        client_ip: ciaddr,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: requested,
        client_identifier: Some(smoltcp::wire::EthernetAddress(mac)),
        server_identifier: server,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut payload = vec![0u8; repr.buffer_len()];
    // A freshly sized buffer always fits.
    let _ = repr.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]));
    let mut f = udp_frame(mac, [0xff; 6], ciaddr, Ipv4Addr::BROADCAST, &payload)
        .expect("a client message fits a packet");
    // Client → server ports.
    f[34..36].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    f[36..38].copy_from_slice(&SERVER_PORT.to_be_bytes());
    f[40..42].fill(0);
    f
}
