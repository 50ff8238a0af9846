//! Stateful flow setup: security groups, connection tracking and NAT for
//! an IPv4 packet that missed, compiled into a forward and a reverse flow.
//!
//! Traffic between VMs that are not filtered and do not leave through NAT
//! stays stateless (one flow per direction, compiled when its first packet
//! comes). Everything else becomes a tracked connection: the first packet
//! is checked against the egress rules of a filtered sender and the
//! ingress rules of a filtered local receiver, and both directions' flows
//! are installed at once, so replies pass without a rule and without a
//! punt.

use std::net::Ipv4Addr;

use flowtable::{Action, FlowKey, Ingress, Mac, Nat, NatSide, Output, PortId};

use crate::conntrack::thread_bit;

use crate::acl::{Direction, RuleRef};
use crate::compile;
use crate::conntrack::{Admission, Conn, ConnState, CtRefused, Side, TcpState};
use crate::forward::{self, Next};
use crate::nat::NatRefused;
use crate::related;
use crate::shared::{guard, Shared};
use crate::topology::{LocalVm, Topology};
use dpif::{DropCause, PuntMsg, PuntReason, Update};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The TCP flags of the (inner) Ethernet frame `f`, if it is a TCP
/// segment long enough to have them.
pub fn tcp_flags(f: &[u8]) -> Option<u8> {
    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
    f.get(14 + ihl + 13).copied()
}

/// An ICMP error message (its key's "port" is type << 8 | code).
pub fn is_icmp_error(key: &FlowKey) -> bool {
    key.proto == ICMP && related::is_error(key.dst_port.to_be_bytes()[0])
}

/// What a rule's port range is matched against: the destination port, or
/// the ICMP type.
fn rule_port(key: &FlowKey) -> u16 {
    if key.proto == ICMP {
        key.dst_port >> 8
    } else {
        key.dst_port
    }
}

/// The key replies of `key` carry at `ingress`, from `src` (port
/// `sport`) to `dst` (port `dport`) after any NAT. For ICMP echo the
/// reply keeps the identifier and has type 0.
fn reply_key(
    key: &FlowKey,
    ingress: Ingress,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
) -> FlowKey {
    if key.proto == ICMP {
        FlowKey::new(ingress, ICMP, src, dst, dport, 0)
    } else {
        FlowKey::new(ingress, key.proto, src, dst, sport, dport)
    }
}

/// The state a new connection starts in, or `None` for traffic that is
/// filtered but not tracked (ICMP other than echo, other protocols).
pub(crate) fn opening(key: &FlowKey, frame: &[u8]) -> Result<Option<ConnState>, DropCause> {
    if key.flags & flowtable::KeyFlags::FRAGMENT != 0 {
        return Err(DropCause::CtFragment);
    }
    Ok(match key.proto {
        TCP => match tcp_flags(frame) {
            Some(f) if f & (SYN | ACK | RST | FIN) == SYN => {
                Some(ConnState::Tcp(TcpState::SynSent))
            }
            // Not the start of a connection we know: invalid.
            _ => return Err(DropCause::CtInvalid),
        },
        UDP => Some(ConnState::Udp { replied: false }),
        ICMP if key.dst_port >> 8 == 8 => Some(ConnState::Icmp { replied: false }),
        _ => None,
    })
}

/// One setup: the topology, the shared state (locked), the packet.
pub(crate) struct Setup<'a> {
    pub topo: &'a Topology,
    pub sh: &'a Shared,
    pub p: &'a PuntMsg,
    /// The (inner) Ethernet frame.
    pub frame: &'a [u8],
    pub key: FlowKey,
    pub out: &'a mut Update,
}

/// The flow this packet now hits, for the caller's first-packet handling.
pub(crate) type Flow = Option<Action>;

impl Setup<'_> {
    /// A packet of a connection we track: reinstall its side after the
    /// fast path dropped it, or follow a TCP state change. `Ok(None)` from
    /// the outer option: not a known connection (or one being reopened).
    pub fn existing(&mut self) -> Result<Option<Flow>, DropCause> {
        // The connection's shard stays locked while its state changes.
        let Some(mut found) = self.sh.ct.find(&self.key) else {
            if self.p.reason == PuntReason::CtEvent {
                // The flow outlived its connection: recompile from scratch.
                self.out.remove.push(self.key);
            }
            return self.related();
        };
        let side = found.side;
        let now = self.p.punted_at;
        let flags = if self.key.proto == TCP {
            tcp_flags(self.frame).unwrap_or(0)
        } else {
            0
        };
        let state = found.conn().map(|c| c.state);
        // A new SYN on a closed connection's tuple opens a new connection,
        // checked against today's rules.
        if flags & (SYN | ACK) == SYN
            && side == 0
            && matches!(
                state,
                Some(ConnState::Tcp(TcpState::Closed | TcpState::Closing))
            )
        {
            if let Some(c) = self.sh.ct.remove_found(found) {
                self.sh.end(&c, self.out);
            }
            return Ok(None);
        }
        let services = self.sh.any_services();
        if services
            && flags & RST != 0
            && side == 1
            && matches!(state, Some(ConnState::Tcp(TcpState::SynSent)))
        {
            if let Some(c) = found.conn() {
                self.sh
                    .services()
                    .passive(c, crate::services::Passive::Refused, now);
            }
        }
        if flags & (SYN | FIN | RST) != 0 {
            found.tcp_event(flags, now);
        } else {
            found.seen(now);
        }
        let syn_recv =
            |s: Option<ConnState>| matches!(s, Some(ConnState::Tcp(TcpState::SynRecv { .. })));
        if !syn_recv(state) && syn_recv(found.conn().map(|c| c.state)) {
            // The SYN-ACK: until the originator's ACK is seen, its packets
            // come here (its flow leaves the fast path; the fast path
            // punts no plain ACK of a tracked flow).
            if services {
                if let Some(c) = found.conn() {
                    self.sh
                        .services()
                        .passive(c, crate::services::Passive::Answered, now);
                }
            }
            if let Some(c) = found.conn_mut() {
                let s0 = &mut c.sides[0];
                if s0.installed != 0 {
                    s0.installed = 0;
                    self.out.remove.push(s0.key);
                }
            }
        }
        if self.p.reason == PuntReason::CtEvent {
            // The flow is in place; the fast path forwards the segment.
            self.out.reinject = true;
            return Ok(Some(None));
        }
        let Some(c) = found.conn_mut() else {
            return Ok(None);
        };
        let s = &mut c.sides[side];
        s.installed |= thread_bit(self.p.origin);
        self.out.flows.push((s.key, s.action));
        Ok(Some(Some(s.action)))
    }

    /// An ICMP error quoting a packet of a tracked connection goes where
    /// that connection's replies go (see [`crate::related`]). `Ok(None)`:
    /// not such an error.
    fn related(&mut self) -> Result<Option<Flow>, DropCause> {
        let key = self.key;
        if !is_icmp_error(&key) {
            return Ok(None);
        }
        let Some(q) = related::quoted(self.frame) else {
            return Ok(None);
        };
        // An error goes to the sender of the packet it quotes (Linux's
        // conntrack checks the same): one addressed elsewhere is not
        // related to that connection, whatever it quotes, and is judged
        // as a packet of its own.
        if key.dst_ip != q.src {
            return Ok(None);
        }
        let Some(mut found) = self.sh.ct.find(&related::reply_key(&key, &q)) else {
            return Ok(None);
        };
        let side = found.side;
        let Some(action) = found.conn().map(|c| c.sides[side].action) else {
            return Ok(None);
        };
        found.counters().related += 1;
        drop(found);
        match action.nat {
            None => {
                // The same path, stateless, removed when the policy changes.
                let a = Action {
                    conntrack: false,
                    acl: true,
                    ..action
                };
                self.out.flows.push((key, a));
                Ok(Some(Some(a)))
            }
            Some(nat) => {
                let Output::Port(port) = action.output else {
                    return Err(DropCause::CtInvalid);
                };
                let f = related::translate(self.frame, &q, &nat, &action)
                    .ok_or(DropCause::CtInvalid)?;
                self.out.tx.push((port, f));
                Ok(Some(None))
            }
        }
    }

    /// [`Setup::existing`] where the flow has no TTL or size limit
    /// (overlay and external ingress): a known connection's packet is
    /// reinjected. True if it was one.
    pub fn known(&mut self) -> Result<bool, DropCause> {
        match self.existing()? {
            Some(flow) => {
                self.out.reinject |= flow.is_some();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// What admitted a new connection (original direction `src` → `dst`).
    fn admission(
        &self,
        vni: u32,
        dst: u32,
        egress: Option<PortId>,
        ingress: Option<PortId>,
        rule: Option<RuleRef>,
    ) -> Admission {
        Admission {
            vni,
            src: self.key.src_ip,
            dst,
            proto: self.key.proto,
            port: rule_port(&self.key),
            egress,
            ingress,
            rule,
        }
    }

    /// Deny: a drop flow keeps the repeats out of the slow path until
    /// the policy changes.
    pub(crate) fn deny(&mut self, charged: PortId) -> DropCause {
        let drop = Action {
            acl: true,
            ..Action::drop()
        };
        // ICMP errors stay punted: a later one may be related to a
        // connection (path MTU discovery must not be pinned shut).
        if !is_icmp_error(&self.key) {
            self.out.flows.push((self.key, drop));
        }
        self.sh.vm_drop(charged, DropCause::AclDenied);
        DropCause::AclDenied
    }

    fn admits(&self, vm: &LocalVm, dir: Direction, peer: u32) -> Option<Option<RuleRef>> {
        self.admits_at(vm, dir, peer, rule_port(&self.key))
    }

    /// Do `vm`'s rules admit this packet's protocol to or from `peer` at
    /// `port`? `Some(rule)` if so (`Some(None)`: `vm` is not filtered).
    pub(crate) fn admits_at(
        &self,
        vm: &LocalVm,
        dir: Direction,
        peer: u32,
        port: u16,
    ) -> Option<Option<RuleRef>> {
        if vm.groups.is_empty() {
            return Some(None);
        }
        let r = self
            .sh
            .policy
            .admits(&vm.groups, dir, vm.vni.get(), peer, self.key.proto, port);
        r.map(Some)
    }

    /// Add the connection and install both flows.
    pub(crate) fn track(
        &mut self,
        mut sides: [Side; 2],
        state: ConnState,
        admission: Admission,
        owner: PortId,
        nat: Option<crate::conntrack::NatBinding>,
    ) -> Result<Flow, DropCause> {
        for s in &mut sides {
            s.action.conntrack = true;
            s.installed = thread_bit(self.p.origin);
        }
        let mut conn = Conn::new(sides, state, admission, self.p.punted_at);
        conn.nat = nat;
        match self.sh.ct.insert(conn, Some(owner), self.p.punted_at) {
            Ok(_) => {
                self.out.flows.push((sides[0].key, sides[0].action));
                self.out.flows.push((sides[1].key, sides[1].action));
                Ok(Some(sides[0].action))
            }
            Err(e) => {
                if let (Some(b), Some(pool)) = (nat, guard(&self.sh.nat).as_mut()) {
                    if b.pooled {
                        pool.release(owner, admission.proto, b.ip, b.port);
                    }
                }
                let cause = match e {
                    CtRefused::Full => DropCause::CtFull,
                    CtRefused::Quota => DropCause::CtQuota,
                    CtRefused::Clash => DropCause::CtClash,
                };
                self.sh.vm_drop(owner, cause);
                Err(cause)
            }
        }
    }

    pub(crate) fn refuse_early(&mut self, owner: PortId) -> Result<(), DropCause> {
        self.sh.ct.admit(Some(owner)).map_err(|e| {
            let cause = if e == CtRefused::Full {
                DropCause::CtFull
            } else {
                DropCause::CtQuota
            };
            self.sh.vm_drop(owner, cause);
            cause
        })
    }

    /// A new packet from local VM `vm` going to `next`, whose stateless
    /// flow would be `fwd` (`None` for the external network).
    pub fn vm_new(
        &mut self,
        vm: &LocalVm,
        next: Next,
        fwd: Option<Action>,
    ) -> Result<Flow, DropCause> {
        let topo = self.topo;
        let key = self.key;
        let vni = vm.vni.get();
        let dst_vm = match next {
            Next::Local { port, .. } => topo.vm_on(port),
            _ => None,
        };
        let external = matches!(next, Next::External);
        let filtered = !vm.groups.is_empty() || dst_vm.is_some_and(|d| !d.groups.is_empty());
        if !filtered && !external {
            let a = fwd.ok_or(DropCause::NoRoute)?;
            self.out.flows.push((key, a));
            return Ok(Some(a));
        }
        let state = opening(&key, self.frame)?;
        if self.admits(vm, Direction::Egress, key.dst_ip).is_none() {
            return Err(self.deny(vm.port));
        }
        let mut rule = None;
        if let Some(d) = dst_vm {
            match self.admits(d, Direction::Ingress, key.src_ip) {
                Some(r) => rule = r,
                None => return Err(self.deny(d.port)),
            }
        }
        let Some(state) = state else {
            // Filtered but not tracked: the rules were checked, the flow
            // is removed when they change.
            let a = Action {
                acl: true,
                ..fwd.ok_or(DropCause::NoRoute)?
            };
            self.out.flows.push((key, a));
            return Ok(Some(a));
        };
        self.refuse_early(vm.port)?;
        let admission = self.admission(
            vni,
            key.dst_ip,
            (!vm.groups.is_empty()).then_some(vm.port),
            dst_vm.filter(|d| !d.groups.is_empty()).map(|d| d.port),
            rule,
        );
        if external {
            return self.out_external(vm, state, admission);
        }
        let sides = vm_sides(topo, vm, &key, next)?;
        self.track(sides, state, admission, vm.port, None)
    }

    /// Out to the external network: SNAT (pool, or the VM's floating IP).
    fn out_external(
        &mut self,
        vm: &LocalVm,
        state: ConnState,
        admission: Admission,
    ) -> Result<Flow, DropCause> {
        let topo = self.topo;
        let ext = topo.external.as_ref().ok_or(DropCause::NoExternal)?;
        let key = self.key;
        let src = vm
            .floating_ip
            .or_else(|| ext.snat.first().copied())
            .ok_or(DropCause::NoExternal)?;
        let hop_mac = self.resolve(Ipv4Addr::from(key.dst_ip), src)?;
        let gw_mac = topo
            .network(vm.vni.get())
            .ok_or(DropCause::UnknownVni)?
            .gateway_mac;
        let (nat_ip, nat_port, pooled) = match vm.floating_ip {
            Some(fip) => (u32::from(fip), key.src_port, false),
            None => {
                // A port whose reply key steers to this connection's
                // shard (`dpif::steer`): its replies' misses come to this
                // thread, and its keys sit in one shard.
                let home = dpif::steer::shard(&key);
                let same_shard = |ip: u32, port: u16| {
                    let rk = FlowKey::new(
                        Ingress::Port(ext.port),
                        key.proto,
                        key.dst_ip,
                        ip,
                        key.dst_port,
                        port,
                    );
                    dpif::steer::shard(&rk) == home
                };
                let ported = key.proto == TCP || key.proto == UDP;
                let allocated = guard(&self.sh.nat)
                    .as_mut()
                    .ok_or(DropCause::NoExternal)?
                    .allocate_where(vm.port, key.proto, &|ip, port| {
                        !ported || same_shard(ip, port)
                    });
                match allocated {
                    Ok((ip, port)) => (ip, port, true),
                    Err(e) => {
                        let cause = match e {
                            NatRefused::Quota => DropCause::NatQuota,
                            NatRefused::Exhausted => DropCause::NatExhausted,
                        };
                        self.sh.vm_drop(vm.port, cause);
                        return Err(cause);
                    }
                }
            }
        };
        let fwd = Action {
            nat: Some(Nat {
                side: NatSide::Src,
                ip: nat_ip,
                port: pooled.then_some(nat_port),
            }),
            set_eth_src: Some(ext.mac),
            set_eth_dst: Some(hop_mac),
            dec_ttl: true,
            ..Action::output(ext.port)
        };
        let rev = Action {
            nat: Some(Nat {
                side: NatSide::Dst,
                ip: key.src_ip,
                port: pooled.then_some(key.src_port),
            }),
            ..compile::routed(compile::to_local(gw_mac, vm.mac, vm.port), gw_mac)
        };
        let rk = reply_key(
            &key,
            Ingress::Port(ext.port),
            key.dst_ip,
            nat_ip,
            key.dst_port,
            nat_port,
        );
        let binding = crate::conntrack::NatBinding {
            ip: nat_ip,
            port: nat_port,
            pooled,
        };
        self.track(
            [side(key, fwd), side(rk, rev)],
            state,
            admission,
            vm.port,
            Some(binding),
        )
    }

    /// The MAC of the external neighbour towards `dst`; if unknown, refuse
    /// this packet. Asks (from our address `src`) when
    /// [`crate::ext_neighbors`] says to: unknown, or due to be confirmed.
    fn resolve(&mut self, dst: Ipv4Addr, src: Ipv4Addr) -> Result<Mac, DropCause> {
        let ext = self.topo.external.as_ref().ok_or(DropCause::NoExternal)?;
        let hop = ext.next_hop(dst).ok_or(DropCause::NoRoute)?;
        let (mac, ask) = guard(&self.sh.ext_neighbors).resolve(hop, self.p.punted_at);
        if ask {
            self.out
                .tx
                .push((ext.port, crate::arp::request(ext.mac, src, hop)));
        }
        mac.ok_or(DropCause::ExtNeighborPending)
    }

    /// A new packet from the overlay to local VM `dst` (flow `fwd`), from
    /// a remote endpoint of network `vni`.
    pub fn overlay_new(&mut self, vni: u32, dst: &LocalVm, fwd: Action) -> Result<Flow, DropCause> {
        let key = self.key;
        if dst.groups.is_empty() {
            self.out.flows.push((key, fwd));
            return Ok(Some(fwd));
        }
        let state = opening(&key, self.frame)?;
        let rule = match self.admits(dst, Direction::Ingress, key.src_ip) {
            Some(r) => r,
            None => return Err(self.deny(dst.port)),
        };
        let Some(state) = state else {
            let a = Action { acl: true, ..fwd };
            self.out.flows.push((key, a));
            return Ok(Some(a));
        };
        self.refuse_early(dst.port)?;
        // Replies leave the way a packet from `dst` to the sender would.
        let (src, to) = (Ipv4Addr::from(key.dst_ip), Ipv4Addr::from(key.src_ip));
        let next = forward::decide(self.topo, vni, src, to)?;
        let rev = compile::next_action(self.topo, vni, dst, next)?;
        let rk = reply_key(
            &key,
            Ingress::Port(dst.port),
            key.dst_ip,
            key.src_ip,
            key.dst_port,
            key.src_port,
        );
        let admission = self.admission(vni, key.dst_ip, None, Some(dst.port), rule);
        self.track(
            [side(key, fwd), side(rk, rev)],
            state,
            admission,
            dst.port,
            None,
        )
    }

    /// A new packet from the external network to a floating IP of local
    /// VM `vm` (DNAT), whose Ethernet source `hop_mac` is where replies go.
    pub fn external_new(&mut self, vm: &LocalVm, hop_mac: Mac) -> Result<Flow, DropCause> {
        let topo = self.topo;
        let ext = topo.external.as_ref().ok_or(DropCause::NoExternal)?;
        let key = self.key;
        let fip = key.dst_ip;
        let vm_ip = u32::from(*vm.ips.first().ok_or(DropCause::UnknownDestination)?);
        let state = opening(&key, self.frame)?;
        let rule = match self.admits(vm, Direction::Ingress, key.src_ip) {
            Some(r) => r,
            None => return Err(self.deny(vm.port)),
        };
        let state = state.ok_or(DropCause::CtInvalid)?;
        self.refuse_early(vm.port)?;
        let gw_mac = topo
            .network(vm.vni.get())
            .ok_or(DropCause::UnknownVni)?
            .gateway_mac;
        let fwd = Action {
            nat: Some(Nat {
                side: NatSide::Dst,
                ip: vm_ip,
                port: None,
            }),
            ..compile::routed(compile::to_local(gw_mac, vm.mac, vm.port), gw_mac)
        };
        let rev = Action {
            nat: Some(Nat {
                side: NatSide::Src,
                ip: fip,
                port: None,
            }),
            set_eth_src: Some(ext.mac),
            set_eth_dst: Some(hop_mac),
            dec_ttl: true,
            ..Action::output(ext.port)
        };
        let rk = reply_key(
            &key,
            Ingress::Port(vm.port),
            vm_ip,
            key.src_ip,
            key.dst_port,
            key.src_port,
        );
        let admission = self.admission(
            vm.vni.get(),
            vm_ip,
            None,
            (!vm.groups.is_empty()).then_some(vm.port),
            rule,
        );
        let binding = crate::conntrack::NatBinding {
            ip: fip,
            port: key.dst_port,
            pooled: false,
        };
        self.track(
            [side(key, fwd), side(rk, rev)],
            state,
            admission,
            vm.port,
            Some(binding),
        )
    }
}

/// Both sides of a connection from local VM `vm` (key `key`) to `next`
/// (not the external network): the flow there, and the replies' way back.
pub(crate) fn vm_sides(
    topo: &Topology,
    vm: &LocalVm,
    key: &FlowKey,
    next: Next,
) -> Result<[Side; 2], DropCause> {
    let vni = vm.vni.get();
    let fwd = compile::next_action(topo, vni, vm, next)?;
    let gw_mac = topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
    let (ingress, rev) = match next {
        Next::Local { port, mac, routed } => {
            let a = compile::to_local(mac, vm.mac, vm.port);
            (
                Ingress::Port(port),
                if routed {
                    compile::routed(a, gw_mac)
                } else {
                    a
                },
            )
        }
        Next::Remote { mac, vtep, routed } => {
            let src_mac = if routed { gw_mac } else { mac };
            (
                vni_ingress(vni)?,
                compile::from_remote(vtep, src_mac, vm.mac, vm.port),
            )
        }
        Next::GatewayVtep { vtep, .. } => (
            vni_ingress(vni)?,
            compile::from_remote(vtep, gw_mac, vm.mac, vm.port),
        ),
        Next::External => return Err(DropCause::NoExternal),
    };
    let rk = reply_key(
        key,
        ingress,
        key.dst_ip,
        key.src_ip,
        key.dst_port,
        key.src_port,
    );
    Ok([side(*key, fwd), side(rk, rev)])
}

/// The sides of a tracked connection recompiled on today's topology
/// (an endpoint it uses moved; a load-balanced one keeps its backend):
/// `None` if it cannot be (it leaves through NAT, or its originator is
/// not a local VM any more); the connection then ends.
pub(crate) fn recompiled(topo: &Topology, c: &crate::conntrack::Conn) -> Option<[Side; 2]> {
    if c.nat.is_some() {
        return None;
    }
    let key = c.sides[0].key;
    let Some(Ingress::Port(p)) = key.ingress() else {
        return None;
    };
    let vm = topo.vm_on(p)?;
    let mut sides = match crate::lb::vip_of(c) {
        // Load-balanced: the same backend, wherever it is now.
        Some(_) => crate::lb::recompiled(topo, vm, c)?,
        None => {
            let vni = vm.vni.get();
            let next = forward::decide(
                topo,
                vni,
                std::net::Ipv4Addr::from(key.src_ip),
                std::net::Ipv4Addr::from(key.dst_ip),
            )
            .ok()?;
            vm_sides(topo, vm, &key, next).ok()?
        }
    };
    for s in &mut sides {
        s.action.conntrack = true;
        s.installed = 0;
    }
    Some(sides)
}

fn side(key: FlowKey, action: Action) -> Side {
    Side {
        key,
        action,
        installed: 1,
    }
}

fn vni_ingress(vni: u32) -> Result<Ingress, DropCause> {
    flowtable::Vni::new(vni)
        .map(Ingress::Vni)
        .ok_or(DropCause::UnknownVni)
}
