//! The ARP proxy: answers requests for every address the switch knows in
//! the asker's network (its VMs, remote endpoints, the gateway), so no ARP
//! broadcast ever leaves the host. Unknown addresses get no answer.

use std::net::Ipv4Addr;

use flowtable::Mac;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

use crate::outcome::DropCause;

/// A parsed ARP request (Ethernet/IPv4 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

/// Parse the ARP payload of an Ethernet frame; anything but an
/// Ethernet/IPv4 request is refused with its cause.
pub fn parse_request(payload: &[u8]) -> Result<Request, DropCause> {
    let pkt = ArpPacket::new_checked(payload).map_err(|_| DropCause::Malformed)?;
    match ArpRepr::parse(&pkt).map_err(|_| DropCause::Malformed)? {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => Ok(Request {
            sender_mac: source_hardware_addr.0,
            sender_ip: source_protocol_addr,
            target_ip: target_protocol_addr,
        }),
        _ => Err(DropCause::ArpNotRequest),
    }
}

/// Minimum Ethernet frame length without FCS; replies are padded to it.
const MIN_FRAME: usize = 60;

/// The reply frame telling `req`'s sender that `req.target_ip` is at `mac`.
pub fn reply(req: &Request, mac: Mac) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: req.target_ip,
        target_hardware_addr: EthernetAddress(req.sender_mac),
        target_protocol_addr: req.sender_ip,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress(req.sender_mac),
        ethertype: EthernetProtocol::Arp,
    };
    let len = (eth.buffer_len() + arp.buffer_len()).max(MIN_FRAME);
    let mut buf = vec![0u8; len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request from 02:00:00:00:00:01 / 10.0.0.5 for 10.0.0.9, as bytes.
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, // Ethernet/IPv4, request
        0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 5, // sender
        0, 0, 0, 0, 0, 0, 10, 0, 0, 9, // target
    ];

    #[test]
    fn parses_a_request() {
        let r = parse_request(&REQUEST).unwrap();
        assert_eq!(r.sender_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(r.sender_ip, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(r.target_ip, Ipv4Addr::new(10, 0, 0, 9));
    }

    #[test]
    fn refuses_replies_and_garbage() {
        let mut rep = REQUEST;
        rep[7] = 2;
        assert_eq!(parse_request(&rep), Err(DropCause::ArpNotRequest));
        assert_eq!(parse_request(&REQUEST[..20]), Err(DropCause::Malformed));
        let mut ipv6 = REQUEST;
        ipv6[2] = 0x86;
        ipv6[3] = 0xdd;
        assert!(parse_request(&ipv6).is_err());
    }

    #[test]
    fn reply_bytes() {
        let r = parse_request(&REQUEST).unwrap();
        let f = reply(&r, [2, 0, 0, 0, 0, 9]);
        assert_eq!(f.len(), 60);
        let expect: [u8; 42] = [
            0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x09, 0x08, 0x06, // Ethernet
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x02, // reply
            0x02, 0, 0, 0, 0, 0x09, 10, 0, 0, 9, // sender: the answer
            0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 5, // target: the asker
        ];
        assert_eq!(f[..42], expect);
        assert!(f[42..].iter().all(|&b| b == 0));
    }
}
