//! The ARP proxy: answers requests for every address the switch knows in
//! the asker's network (its VMs, remote endpoints, the gateway), so no ARP
//! broadcast ever leaves the host. Unknown addresses get no answer.

use std::net::Ipv4Addr;

use flowtable::Mac;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

use dpif::DropCause;

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
    match parse(payload)? {
        (true, r) => Ok(r),
        (false, _) => Err(DropCause::ArpNotRequest),
    }
}

/// Parse an Ethernet/IPv4 request or reply: (is a request, its fields).
/// Used where the switch also learns from ARP (the external network).
pub fn parse(payload: &[u8]) -> Result<(bool, Request), DropCause> {
    let pkt = ArpPacket::new_checked(payload).map_err(|_| DropCause::Malformed)?;
    match ArpRepr::parse(&pkt).map_err(|_| DropCause::Malformed)? {
        ArpRepr::EthernetIpv4 {
            operation: op @ (ArpOperation::Request | ArpOperation::Reply),
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => Ok((
            op == ArpOperation::Request,
            Request {
                sender_mac: source_hardware_addr.0,
                sender_ip: source_protocol_addr,
                target_ip: target_protocol_addr,
            },
        )),
        _ => Err(DropCause::ArpNotRequest),
    }
}

/// A broadcast request from `mac`/`ip` asking who has `target`.
pub fn request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = reply(
        &Request {
            sender_mac: [0xff; 6],
            sender_ip: target,
            target_ip: ip,
        },
        mac,
    );
    // The same layout with the operation and target fields of a request.
    f[21] = 1;
    f[32..38].fill(0);
    f
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
    fn requests_we_send_parse_back() {
        let f = request(
            [2, 0, 0, 0, 0, 7],
            Ipv4Addr::new(203, 0, 113, 2),
            Ipv4Addr::new(203, 0, 113, 1),
        );
        assert_eq!(f[..6], [0xff; 6]);
        let (is_req, r) = parse(&f[14..]).unwrap();
        assert!(is_req);
        assert_eq!(r.sender_mac, [2, 0, 0, 0, 0, 7]);
        assert_eq!(r.sender_ip, Ipv4Addr::new(203, 0, 113, 2));
        assert_eq!(r.target_ip, Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(f[32..38], [0; 6]);
        let mut rep = REQUEST;
        rep[7] = 2;
        assert!(!parse(&rep).unwrap().0);
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
