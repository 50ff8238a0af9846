//! Anti-spoofing: a VM port may only send from its bound MAC and IPs.

use std::net::Ipv4Addr;

use flowtable::Mac;

use crate::topology::LocalVm;
use dpif::DropCause;

/// The Ethernet source of a frame from `vm`.
pub fn check_mac(vm: &LocalVm, src: Mac) -> Result<(), DropCause> {
    if src == vm.mac {
        Ok(())
    } else {
        Err(DropCause::SpoofedMac)
    }
}

/// The IPv4 source of a packet from `vm`.
pub fn check_ip(vm: &LocalVm, src: Ipv4Addr) -> Result<(), DropCause> {
    if vm.ips.contains(&src) {
        Ok(())
    } else {
        Err(DropCause::SpoofedIp)
    }
}

/// The sender fields of an ARP packet from `vm`. A sender address of
/// 0.0.0.0 is an address probe (RFC 5227) and allowed.
pub fn check_arp(vm: &LocalVm, sender_mac: Mac, sender_ip: Ipv4Addr) -> Result<(), DropCause> {
    check_mac(vm, sender_mac)?;
    if sender_ip.is_unspecified() {
        return Ok(());
    }
    check_ip(vm, sender_ip)
}
