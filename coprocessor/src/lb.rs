//! The load-balancing stage: a new connection from a local VM to a
//! service VIP picks its backend from the service's Maglev table by the
//! hash of its 5-tuple, is tracked (conntrack pins it to that backend for
//! its life), and compiles into two flows the fast path runs on its own:
//! forward, client → VIP rewritten to the backend (DNAT of address and
//! port, then the backend's way: a local port or its VTEP); reverse,
//! backend → client with the VIP restored as the source (SNAT of address
//! and port). Every host holding the same backend set picks the same
//! backend for the same 5-tuple (see [`crate::maglev`]).
//!
//! Security groups see the connection as it is delivered, client →
//! backend address and port (as Kubernetes network policies see a
//! service's traffic after its DNAT): the client's egress rules and a
//! local backend's ingress rules are checked against that.
//!
//! A backend that connects to its own VIP (hairpin) is given another
//! backend, never itself (see [`pick_other_than`]).
//!
//! A TCP segment to a VIP that belongs to no connection (the backend it
//! was pinned to was removed, or the switch never saw its SYN) is answered
//! with a reset from the VIP, as a host answers a segment of a connection
//! it does not have (RFC 9293 §3.10.7.1: sequence number from the
//! segment's acknowledgment); the client's stack accepts exactly that one,
//! so a removed backend's clients learn it with their next segment.

use std::net::Ipv4Addr;

use flowtable::{FlowKey, Nat, NatSide};

use crate::acl::Direction;
use crate::conntrack::{Admission, Conn};
use crate::forward::{self, Next};
use crate::maglev;
use crate::services::VipKey;
use crate::setup::{self, Flow, Setup};
use crate::topology::LocalVm;
use dpif::DropCause;

const TCP: u8 = 6;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The VIP (or external VIP) a tracked connection goes through, if it is
/// one the LB stage made (its forward side rewrites the destination's
/// address and port).
pub fn vip_of(c: &Conn) -> Option<VipKey> {
    let s = &c.sides[0];
    match s.action.nat {
        Some(Nat {
            side: NatSide::Dst,
            port: Some(_),
            ..
        }) => Some(VipKey {
            // From the external network (the connection holds its external
            // VIP as a binding), or inside the tenant network.
            vni: if c.nat.is_some() {
                crate::services::EXTERNAL
            } else {
                c.admission.vni
            },
            vip: s.key.dst_ip,
            proto: s.key.proto,
            port: s.key.dst_port,
        }),
        _ => None,
    }
}

/// The backend (address, port) a load-balanced connection is pinned to.
pub fn backend_of(c: &Conn) -> Option<(u32, u16)> {
    vip_of(c)?;
    let n = c.sides[0].action.nat?;
    Some((n.ip, n.port?))
}

/// Count on service `vk`'s counters.
fn count(sh: &crate::shared::Shared, vk: &VipKey, f: fn(&mut crate::services::ServiceCounters)) {
    if let Some(s) = sh.services().get_mut(vk) {
        f(&mut s.counters);
    }
}

/// The hash a connection's key picks its backend by (the same on every
/// host: see [`maglev::flow_hash`]).
fn hash_of(key: &FlowKey) -> u64 {
    maglev::flow_hash(
        Ipv4Addr::from(key.src_ip),
        key.src_port,
        Ipv4Addr::from(key.dst_ip),
        key.dst_port,
        key.proto,
    )
}

/// The backend for hash `h`, never the client itself: a backend that
/// connects to its own VIP and picked itself would get its own packets
/// with its own address as the source, which its stack drops (a martian)
/// — answering that needs a second address rewrite (the source to the
/// VIP) that a flow's one NAT cannot do. So it takes the next entry of
/// the table that is another backend (the same on every host); `None` if
/// it is the only backend taking connections.
fn pick_other_than(t: &maglev::Table, h: u64, client: Ipv4Addr) -> Option<maglev::Backend> {
    let b = t.pick(h);
    if b.ip != client {
        return Some(b);
    }
    t.pick_where(h, |b| b.ip != client)
}

/// The way from a client of network `vni` (its packet `key`) to backend
/// `ip`: through the router, never the external network.
fn backend_next(
    topo: &crate::topology::Topology,
    vni: u32,
    key: &FlowKey,
    ip: Ipv4Addr,
) -> Result<Next, DropCause> {
    match forward::decide(topo, vni, Ipv4Addr::from(key.src_ip), ip)? {
        Next::External => Err(DropCause::NoRoute),
        n => Ok(routed(n)),
    }
}

/// Both sides of a connection from local VM `vm` (`key`, to the VIP) to
/// `backend` by `next`: the DNAT forward flow, and the replies' with the
/// VIP restored.
fn sides(
    topo: &crate::topology::Topology,
    vm: &LocalVm,
    key: &FlowKey,
    backend: (Ipv4Addr, u16),
    next: Next,
) -> Result<[crate::conntrack::Side; 2], DropCause> {
    let to_backend = FlowKey {
        dst_ip: u32::from(backend.0),
        dst_port: backend.1,
        ..*key
    };
    let mut sides = setup::vm_sides(topo, vm, &to_backend, next)?;
    sides[0].key = *key;
    sides[0].action.nat = Some(Nat {
        side: NatSide::Dst,
        ip: u32::from(backend.0),
        port: Some(backend.1),
    });
    sides[1].action.nat = Some(Nat {
        side: NatSide::Src,
        ip: key.dst_ip,
        port: Some(key.dst_port),
    });
    Ok(sides)
}

/// The sides of load-balanced connection `c` from local VM `vm`
/// recompiled on today's topology (its backend moved to another host):
/// the same backend, its new way. `None` if it has none.
pub(crate) fn recompiled(
    topo: &crate::topology::Topology,
    vm: &LocalVm,
    c: &Conn,
) -> Option<[crate::conntrack::Side; 2]> {
    let (ip, port) = backend_of(c)?;
    let key = c.sides[0].key;
    let next = backend_next(topo, vm.vni.get(), &key, Ipv4Addr::from(ip)).ok()?;
    sides(topo, vm, &key, (Ipv4Addr::from(ip), port), next).ok()
}

/// The next hop a load-balanced packet takes: always through the router
/// (the client addressed the VIP at the gateway's MAC).
fn routed(n: Next) -> Next {
    match n {
        Next::Local { port, mac, .. } => Next::Local {
            port,
            mac,
            routed: true,
        },
        Next::Remote { mac, vtep, .. } => Next::Remote {
            mac,
            vtep,
            routed: true,
        },
        Next::GatewayVtep { vtep, .. } => Next::GatewayVtep { vtep, routed: true },
        Next::External => Next::External,
    }
}

impl Setup<'_> {
    /// A packet from local VM `vm` to a VIP of its network that belongs
    /// to no tracked connection.
    pub fn new_to_vip(&mut self, vm: &LocalVm) -> Result<Flow, DropCause> {
        let key = self.key;
        let vk = VipKey {
            vni: vm.vni.get(),
            vip: key.dst_ip,
            proto: key.proto,
            port: key.dst_port,
        };
        let found = {
            let svcs = self.sh.services();
            svcs.get(&vk).map(|s| {
                (
                    s.table.clone(),
                    s.spec.max_connections,
                    svcs.service_conns(&s.spec),
                )
            })
        };
        // (The limit is checked here and counted once the connection is
        // in: threads deciding at once may pass it by one each.)
        let (table, limit, open) = match found {
            Some(f) => f,
            // The address serves other ports: a closed port.
            None if key.proto == TCP => return self.reset(vm, None),
            None => return Err(DropCause::UnknownDestination),
        };
        let state = match setup::opening(&key, self.frame) {
            Err(DropCause::CtInvalid) if key.proto == TCP => return self.reset(vm, Some(vk)),
            r => r?.ok_or(DropCause::CtInvalid)?,
        };
        let Some(table) = table else {
            count(self.sh, &vk, |c| c.refused_no_backend += 1);
            return Err(DropCause::LbNoBackend);
        };
        if limit != 0 && open >= limit {
            count(self.sh, &vk, |c| c.refused_limit += 1);
            return Err(DropCause::LbConnLimit);
        }
        let h = hash_of(&key);
        let Some(b) = pick_other_than(&table, h, Ipv4Addr::from(key.src_ip)) else {
            count(self.sh, &vk, |c| c.refused_no_backend += 1);
            return Err(DropCause::LbNoBackend);
        };
        let vni = vk.vni;
        let next = backend_next(self.topo, vni, &key, b.ip)?;
        let dst_vm = match next {
            Next::Local { port, .. } => self.topo.vm_on(port),
            _ => None,
        };
        if self
            .admits_at(vm, Direction::Egress, u32::from(b.ip), b.port)
            .is_none()
        {
            return Err(self.deny(vm.port));
        }
        let mut rule = None;
        if let Some(d) = dst_vm {
            match self.admits_at(d, Direction::Ingress, key.src_ip, b.port) {
                Some(r) => rule = r,
                None => return Err(self.deny(d.port)),
            }
        }
        self.refuse_early(vm.port)?;
        let sides = sides(self.topo, vm, &key, (b.ip, b.port), next)?;
        let admission = Admission {
            vni,
            src: key.src_ip,
            dst: u32::from(b.ip),
            proto: key.proto,
            port: b.port,
            egress: (!vm.groups.is_empty()).then_some(vm.port),
            ingress: dst_vm.filter(|d| !d.groups.is_empty()).map(|d| d.port),
            rule,
        };
        let flow = self.track(sides, state, admission, vm.port, None)?;
        self.sh.services().opened(&vk);
        count(self.sh, &vk, |c| c.picked += 1);
        Ok(flow)
    }

    /// A packet from the external network (its Ethernet source
    /// `hop_mac`, where replies go) of no tracked connection: if it is for
    /// an external VIP, balanced to one of the service's backends on this
    /// host (replies leave by the external port with the external VIP
    /// restored). `Ok(None)`: not for an external VIP.
    ///
    /// Only this host's backends: a remote one would answer the client
    /// from its own host, which knows nothing of this connection (keeping
    /// replies on this path needs the client's address rewritten as well —
    /// a second NAT a flow does not have). So each host behind an ECMP
    /// route to the external VIP balances to its own backends, as
    /// Kubernetes' `externalTrafficPolicy: Local` does, keeping the
    /// client's address.
    pub fn external_to_vip(&mut self, hop_mac: flowtable::Mac) -> Result<Option<Flow>, DropCause> {
        let key = self.key;
        let ek = VipKey {
            vni: crate::services::EXTERNAL,
            vip: key.dst_ip,
            proto: key.proto,
            port: key.dst_port,
        };
        let found = {
            let svcs = self.sh.services();
            svcs.external(&ek).map(|svc| {
                (
                    svc.table.clone(),
                    svc.spec.max_connections,
                    svcs.service_conns(&svc.spec),
                    svc.spec.vni,
                    svc.spec.key(),
                )
            })
        };
        let Some((table, limit, open, vni, vk)) = found else {
            return Ok(None);
        };
        let state = setup::opening(&key, self.frame)?.ok_or(DropCause::CtInvalid)?;
        let topo = self.topo;
        let ext = topo.external.as_ref().ok_or(DropCause::NoExternal)?;
        let local = |b: &maglev::Backend| {
            matches!(
                topo.lookup(vni, b.ip),
                Some(crate::topology::Endpoint::Local { .. })
            )
        };
        let h = hash_of(&key);
        let Some(b) = table.and_then(|t| t.pick_where(h, local)) else {
            count(self.sh, &vk, |c| c.refused_no_backend += 1);
            return Err(DropCause::LbNoBackend);
        };
        if limit != 0 && open >= limit {
            count(self.sh, &vk, |c| c.refused_limit += 1);
            return Err(DropCause::LbConnLimit);
        }
        let Some(crate::topology::Endpoint::Local { port, .. }) = topo.lookup(vni, b.ip) else {
            return Err(DropCause::LbNoBackend);
        };
        let vm = topo.vm_on(port).ok_or(DropCause::UnknownPort)?;
        let rule = match self.admits_at(vm, Direction::Ingress, key.src_ip, b.port) {
            Some(r) => r,
            None => return Err(self.deny(vm.port)),
        };
        self.refuse_early(vm.port)?;
        let gw_mac = topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
        let fwd = flowtable::Action {
            nat: Some(Nat {
                side: NatSide::Dst,
                ip: u32::from(b.ip),
                port: Some(b.port),
            }),
            ..crate::compile::routed(crate::compile::to_local(gw_mac, vm.mac, vm.port), gw_mac)
        };
        let rev = flowtable::Action {
            nat: Some(Nat {
                side: NatSide::Src,
                ip: key.dst_ip,
                port: Some(key.dst_port),
            }),
            set_eth_src: Some(ext.mac),
            set_eth_dst: Some(hop_mac),
            dec_ttl: true,
            ..flowtable::Action::output(ext.port)
        };
        let rk = FlowKey::new(
            flowtable::Ingress::Port(vm.port),
            key.proto,
            u32::from(b.ip),
            key.src_ip,
            b.port,
            key.src_port,
        );
        let admission = Admission {
            vni,
            src: key.src_ip,
            dst: u32::from(b.ip),
            proto: key.proto,
            port: b.port,
            egress: None,
            ingress: (!vm.groups.is_empty()).then_some(vm.port),
            rule,
        };
        let binding = crate::conntrack::NatBinding {
            ip: key.dst_ip,
            port: key.dst_port,
            pooled: false,
        };
        let sides = [
            crate::conntrack::Side {
                key,
                action: fwd,
                installed: 0,
            },
            crate::conntrack::Side {
                key: rk,
                action: rev,
                installed: 0,
            },
        ];
        let flow = self.track(sides, state, admission, vm.port, Some(binding))?;
        self.sh.services().opened(&ek);
        count(self.sh, &vk, |c| c.picked += 1);
        Ok(Some(flow))
    }

    /// Answer a TCP segment to a VIP of no connection with a reset from
    /// the VIP (none to a reset).
    fn reset(&mut self, vm: &LocalVm, vk: Option<VipKey>) -> Result<Flow, DropCause> {
        let gw_mac = self
            .topo
            .network(vm.vni.get())
            .ok_or(DropCause::UnknownVni)?
            .gateway_mac;
        if let Some(f) = tcp_reset(self.frame, gw_mac)? {
            self.out.tx.push((vm.port, f));
            if let Some(k) = vk {
                count(self.sh, &k, |c| c.resets += 1);
            }
        }
        Err(DropCause::LbReset)
    }
}

/// The reset answering TCP segment `req` (an Ethernet frame; only its
/// headers are read), from its destination, with `src_mac`; `None` if
/// `req` is itself a reset.
pub fn tcp_reset(req: &[u8], src_mac: flowtable::Mac) -> Result<Option<Vec<u8>>, DropCause> {
    let bad = DropCause::Malformed;
    let ip = req.get(14..34).ok_or(bad)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = req.get(14 + ihl..14 + ihl + 20).ok_or(bad)?;
    if ihl < 20 || ip[9] != TCP {
        return Err(bad);
    }
    let flags = tcp[13];
    if flags & RST != 0 {
        return Ok(None);
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    // What the segment occupies of sequence space: its data, SYN and FIN.
    let data = tot.checked_sub(ihl + doff).ok_or(bad)?;
    let seg_len = u32::try_from(data).map_err(|_| bad)?
        + u32::from(flags & 0x02 != 0)
        + u32::from(flags & 0x01 != 0);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let (src, dst) = (
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
    );
    let sport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let dport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dst_mac: flowtable::Mac = req.get(6..12).and_then(|m| m.try_into().ok()).ok_or(bad)?;
    let (seq, ack, flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        (0, seq.wrapping_add(seg_len), RST | ACK)
    };
    crate::reply::tcp_segment(
        src_mac,
        dst_mac,
        (src, sport),
        (dst, dport),
        seq,
        ack,
        flags,
    )
    .map(Some)
}

#[cfg(test)]
mod tests;
