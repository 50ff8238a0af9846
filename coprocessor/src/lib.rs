//! The coprocessor: vswitch's slow path.
//!
//! It receives every frame the fast path punts ([`PuntMsg`], the `dpif` contract) and decides
//! what happens to it and to the rest of its flow, returning an
//! [`Update`]: flows to install (keyed exactly as the fast path looked
//! them up), whether to run the frame through the pipeline again once they
//! are in, frames it made itself (ARP replies), or the cause of a drop.
//! It does no I/O, so it is tested and benchmarked without a kernel.
//!
//! Stages, each in its own module: [`antispoof`], the [`arp`] proxy, the
//! [`dhcp`] server, [`forward`]ing and the distributed router, [`icmp`]
//! answers, security groups ([`acl`]), connection tracking
//! ([`conntrack`], timers on a [`wheel`], [`related`] ICMP errors), SNAT
//! and floating IPs ([`nat`]), load-balanced [`services`] ([`lb`], on
//! [`maglev`] tables), and flow [`compile`]; `setup` joins them
//! for a packet that missed. All threads share one [`Shared`] state;
//! run-time changes are atomic batches of [`ops`].

pub mod acl;
pub mod antispoof;
pub mod arp;
pub mod compile;
pub mod conntrack;
pub mod dhcp;
pub mod ext_neighbors;
pub mod forward;
pub mod health;
pub mod icmp;
pub mod lb;
pub mod maglev;
pub mod nat;
pub mod ops;
pub mod related;
pub mod reply;
mod revalidate;
pub mod services;
mod setup;
pub mod shared;
pub mod topology;
pub mod wheel;

use std::net::Ipv4Addr;
use std::sync::Arc;

use flowtable::{Action, FlowKey, Ingress};
use smoltcp::wire::{EthernetFrame, EthernetProtocol};

pub use dpif::{CtCheck, DropCause, Invalidate, PuntMsg, PuntReason, Update};
pub use shared::{Shared, SharedLock};
pub use topology::Topology;

/// Coprocessor counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub handled: u64,
    pub flows_compiled: u64,
    pub arp_replies: u64,
    pub dhcp_replies: u64,
    pub icmp_replies: u64,
    pub drops: Vec<u64>,
}

impl Stats {
    /// Zero counters, one per drop cause.
    pub fn new() -> Stats {
        Stats {
            drops: vec![0; DropCause::ALL.len()],
            ..Stats::default()
        }
    }

    /// ARP, DHCP and ICMP replies made.
    pub fn replies(&self) -> [u64; 3] {
        [self.arp_replies, self.dhcp_replies, self.icmp_replies]
    }

    /// Add `o`'s counts to these.
    pub fn add(&mut self, o: &Stats) {
        self.handled += o.handled;
        self.flows_compiled += o.flows_compiled;
        self.arp_replies += o.arp_replies;
        self.dhcp_replies += o.dhcp_replies;
        self.icmp_replies += o.icmp_replies;
        if self.drops.len() < o.drops.len() {
            self.drops.resize(o.drops.len(), 0);
        }
        for (a, b) in self.drops.iter_mut().zip(&o.drops) {
            *a += b;
        }
    }

    pub fn drops_by_cause(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropCause::ALL
            .iter()
            .map(|c| (c.name(), self.drops.get(c.index()).copied().unwrap_or(0)))
    }
}

/// The slow path for one set of ports (see the crate documentation).
#[derive(Debug)]
pub struct Coprocessor {
    stats: Stats,
    /// Leases, policy, connections, NAT: shared by every coprocessor
    /// thread of the switch.
    shared: Arc<SharedLock>,
    /// This thread's slot of the shared decision counters.
    slot: usize,
}

/// Lock the shared state for a change.
pub fn lock(shared: &SharedLock) -> shared::WriteGuard<'_> {
    shared.write()
}

/// Lock the shared state for reading (a view; decisions read it on their
/// own threads' slots).
pub fn read(shared: &SharedLock) -> shared::ReadGuard<'_> {
    shared.read(0)
}

impl Coprocessor {
    /// A coprocessor with its own state and no security groups.
    pub fn new(topo: Topology) -> Coprocessor {
        let shared = Shared::new(
            topo,
            acl::Policy::default(),
            conntrack::Timeouts::default(),
            conntrack::Limits::default(),
        );
        Coprocessor::with_shared(Arc::new(SharedLock::new(shared)))
    }

    /// A coprocessor sharing `shared` with others (one per thread).
    pub fn with_shared(shared: Arc<SharedLock>) -> Coprocessor {
        let slot = shared.read(0).counter_slot();
        Coprocessor {
            shared,
            stats: Stats::new(),
            slot,
        }
    }

    /// The topology as it is now (a snapshot: later changes make a new one).
    pub fn topology(&self) -> Arc<Topology> {
        Arc::clone(&read(&self.shared).topo)
    }

    /// Change the topology in place (under the shared lock).
    pub fn update_topology<R>(&self, f: impl FnOnce(&mut Topology) -> R) -> R {
        let mut sh = lock(&self.shared);
        f(Arc::make_mut(&mut sh.topo))
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The state shared by the switch's coprocessor threads.
    pub fn shared(&self) -> &Arc<SharedLock> {
        &self.shared
    }

    /// Decide for one punted frame.
    pub fn handle(&mut self, p: &PuntMsg) -> Update {
        let mut out = Update::default();
        let Coprocessor {
            stats,
            shared,
            slot,
        } = self;
        // The whole decision is made under the shared lock (read, this
        // thread's slot of it), on one topology: a concurrent change
        // applies before or after it.
        let sh = shared.read(*slot);
        let topo = &*sh.topo;
        let replies_before = stats.replies();
        let from_uplink = topo.uplink.as_ref().is_some_and(|u| u.port == p.ingress);
        let from_external = topo.external.as_ref().is_some_and(|e| e.port == p.ingress);
        let r = if let Some(cause) = icmp_error_of(p.reason) {
            // The flow exists and stays; this packet gets an ICMP answer.
            stats.icmp_error(topo, p, cause, from_uplink || from_external, &mut out)
        } else if from_uplink {
            stats.handle_uplink_frame(topo, &sh, p, &mut out)
        } else if from_external {
            stats.handle_external_frame(topo, &sh, p, &mut out)
        } else {
            stats.handle_vm_frame(topo, &sh, p, &mut out)
        };
        out.version = sh.version;
        // Into this thread's slot of the totals every thread shares (what
        // the metrics export).
        let [arp, dhcp, icmp] = stats.replies();
        sh.count(*slot, |all| {
            all.handled += 1;
            all.flows_compiled += out.flows.len() as u64;
            all.arp_replies += arp - replies_before[0];
            all.dhcp_replies += dhcp - replies_before[1];
            all.icmp_replies += icmp - replies_before[2];
            if let Some(c) = r.as_ref().err().and_then(|c| all.drops.get_mut(c.index())) {
                *c += 1;
            }
        });
        stats.handled += 1;
        stats.flows_compiled += out.flows.len() as u64;
        if let Err(cause) = r {
            out.drop = Some(cause);
            if let Some(c) = stats.drops.get_mut(cause.index()) {
                *c += 1;
            }
        }
        out
    }
}

/// The stages of a decision, each counting the replies it makes on the
/// deciding thread's counters.
impl Stats {
    fn handle_vm_frame(
        &mut self,
        topo: &Topology,
        sh: &Shared,
        p: &PuntMsg,
        out: &mut Update,
    ) -> Result<(), DropCause> {
        let vm = topo.vm_on(p.ingress).ok_or(DropCause::UnknownPort)?;
        let eth = EthernetFrame::new_checked(&p.data).map_err(|_| DropCause::Malformed)?;
        antispoof::check_mac(vm, eth.src_addr().0)?;
        let vni = vm.vni.get();
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let req = arp::parse_request(eth.payload())?;
                antispoof::check_arp(vm, req.sender_mac, req.sender_ip)?;
                if vm.ips.contains(&req.target_ip) {
                    return Err(DropCause::ArpForSelf);
                }
                let mac = match topo.lookup(vni, req.target_ip) {
                    Some(
                        topology::Endpoint::Local { mac, .. }
                        | topology::Endpoint::Remote { mac, .. }
                        | topology::Endpoint::Gateway { mac },
                    ) => mac,
                    // A VIP is behind the router.
                    None if sh.is_vip(vni, req.target_ip) => {
                        topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac
                    }
                    // Hoverboard: an address of the network this host does
                    // not know is reached through the gateway VTEP, which
                    // routes it on: the gateway's MAC.
                    None if topo.network(vni).is_some_and(|n| n.gateway_vtep.is_some())
                        && topo.subnet_of(vni, req.target_ip).is_some() =>
                    {
                        topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac
                    }
                    None => return Err(DropCause::ArpUnknownTarget),
                };
                out.tx.push((p.ingress, arp::reply(&req, mac)));
                self.arp_replies += 1;
                Ok(())
            }
            EthernetProtocol::Ipv4 => {
                let key = vm_key(p)?;
                // DHCP comes from 0.0.0.0 before the VM has its address, so
                // it is answered before the source-address check. No flow
                // is installed: every DHCP packet comes here, within the
                // port's punt budget.
                if dhcp::is_request(key.proto, key.src_port, key.dst_port) {
                    if let dhcp::Answer::Reply(f) = dhcp::handle(
                        topo,
                        vm,
                        &mut shared::guard(&sh.leases),
                        &p.data,
                        p.punted_at,
                    )? {
                        out.tx.push((p.ingress, f));
                        self.dhcp_replies += 1;
                    }
                    return Ok(());
                }
                let (src, dst) = (Ipv4Addr::from(key.src_ip), Ipv4Addr::from(key.dst_ip));
                if let Err(e) = antispoof::check_ip(vm, src) {
                    // Keep a spoofing VM's flood out of the slow path: one
                    // drop for the address pair, whatever the ports (the
                    // denial does not depend on them), so a flood over
                    // many ports takes one entry of the VM's flow share.
                    out.flows.push((key.to_l3(), Action::drop()));
                    return Err(e);
                }
                let mut setup = setup::Setup {
                    topo,
                    sh,
                    p,
                    frame: &p.data,
                    key,
                    out,
                };
                let flow = match setup.existing()? {
                    Some(flow) => flow,
                    None if setup.sh.is_vip(vni, dst) => {
                        if key.proto == 1 {
                            // A VIP answers pings (from the router, which
                            // holds it).
                            let gw_mac =
                                topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
                            let r = icmp::echo_reply(&p.data, dst, gw_mac)
                                .map_err(|_| DropCause::UnknownDestination)?;
                            setup.out.tx.push((p.ingress, r));
                            self.icmp_replies += 1;
                            return Ok(());
                        }
                        setup.new_to_vip(vm)?
                    }
                    None => {
                        let next = match forward::decide(topo, vni, src, dst) {
                            Err(DropCause::ToGateway) => {
                                let gw_mac =
                                    topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
                                if health::answered(&mut setup, vni, gw_mac)? {
                                    return Ok(());
                                }
                                // A gateway address: the router answers pings itself.
                                setup
                                    .out
                                    .tx
                                    .push((p.ingress, icmp::echo_reply(&p.data, dst, gw_mac)?));
                                self.icmp_replies += 1;
                                return Ok(());
                            }
                            r => r?,
                        };
                        let fwd = match next {
                            forward::Next::External => None,
                            n => Some(compile::next_action(topo, vni, vm, n)?),
                        };
                        setup.vm_new(vm, next, fwd)?
                    }
                };
                self.first_packet(topo, p, flow, out)
            }
            _ => Err(DropCause::UnsupportedEthertype),
        }
    }

    /// The first packet of a flow gets the answer the fast path would
    /// give the next ones: reinjected (it hits the new flow), or the ICMP
    /// error its TTL or size calls for (reinjected frames are not punted
    /// twice).
    fn first_packet(
        &mut self,
        topo: &Topology,
        p: &PuntMsg,
        flow: setup::Flow,
        out: &mut Update,
    ) -> Result<(), DropCause> {
        let Some(action) = flow else {
            return Ok(());
        };
        // The IPv4 TTL (the message may hold only the headers of a long
        // frame: read in place, not through a whole-packet check).
        let ttl = EthernetFrame::new_checked(&p.data[..])
            .ok()
            .filter(|e| e.payload().len() >= 20)
            .map_or(0, |e| {
                smoltcp::wire::Ipv4Packet::new_unchecked(e.payload()).hop_limit()
            });
        let too_big = p.data.len() > usize::from(action.max_len);
        let ttl_out = action.dec_ttl && ttl <= 1;
        if ttl_out || too_big {
            let cause = if ttl_out {
                DropCause::TtlExpired
            } else {
                DropCause::TooBig
            };
            return self.icmp_error(topo, p, cause, false, out);
        }
        out.reinject = true;
        Ok(())
    }

    fn handle_uplink_frame(
        &mut self,
        topo: &Topology,
        sh: &Shared,
        p: &PuntMsg,
        out: &mut Update,
    ) -> Result<(), DropCause> {
        let up = topo.uplink.as_ref().ok_or(DropCause::NoUplink)?;
        let cfg = vxlan::DecapConfig {
            local_vtep: u32::from(up.local_vtep),
            udp_port: vxlan::UDP_PORT,
        };
        let d = vxlan::decap(&p.data, &cfg).map_err(|_| DropCause::NotLocalVtep)?;
        let vni = d.vni;
        let outer_src = Ipv4Addr::from(d.outer_src);
        topo.network(vni).ok_or(DropCause::UnknownVni)?;
        let inner = p.data.get(d.inner()).ok_or(DropCause::Malformed)?;
        let eth = EthernetFrame::new_checked(inner).map_err(|_| DropCause::Malformed)?;
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let req = arp::parse_request(eth.payload())?;
                Self::check_remote(topo, vni, req.sender_ip, outer_src)?;
                // Answer only for what lives here: the remote side's own
                // switch answers for its VMs.
                let mac = match topo.lookup(vni, req.target_ip) {
                    Some(
                        topology::Endpoint::Local { mac, .. } | topology::Endpoint::Gateway { mac },
                    ) => mac,
                    _ => return Err(DropCause::ArpUnknownTarget),
                };
                // The reply goes back the way the request came: to the
                // sending VTEP, through the hop that delivered it.
                let outer_src_mac: [u8; 6] = p
                    .data
                    .get(6..12)
                    .and_then(|m| m.try_into().ok())
                    .ok_or(DropCause::Malformed)?;
                let frame = compile::encapsulate(
                    topo,
                    vni,
                    &arp::reply(&req, mac),
                    outer_src,
                    outer_src_mac,
                )
                .ok_or(DropCause::Malformed)?;
                out.tx
                    .push((topo.uplink.as_ref().map_or(p.ingress, |u| u.port), frame));
                self.arp_replies += 1;
                Ok(())
            }
            EthernetProtocol::Ipv4 => {
                let key = p.key.ok_or(DropCause::Malformed)?;
                if key.ingress() != flowtable::Vni::new(vni).map(Ingress::Vni) {
                    return Err(DropCause::Malformed);
                }
                // The flow exists, and this frame came from another VTEP
                // than its endpoint's: forged, or the endpoint moved and
                // the sender's view is stale. Never let it in.
                if p.reason == PuntReason::VtepMismatch {
                    return Err(DropCause::VtepMismatch);
                }
                // A packet of a known connection must come from the VTEP
                // its side was set up with, before it may change the
                // connection's state (a forged RST from any underlay
                // address must not close it).
                // The network's gateway VTEP relays for every endpoint
                // (Hoverboard): a pair promoted on one side only reaches
                // the other through it.
                let gateway_vtep = topo.network(vni).and_then(|n| n.gateway_vtep);
                let via_gateway = gateway_vtep == Some(outer_src);
                if let Some(f) = sh.ct.find(&key) {
                    let expected = f.conn().and_then(|c| c.sides[f.side].action.decap);
                    drop(f);
                    if expected.is_some_and(|v| v != u32::from(outer_src)) && !via_gateway {
                        return Err(DropCause::VtepMismatch);
                    }
                }
                let mut setup = setup::Setup {
                    topo,
                    sh,
                    p,
                    frame: inner,
                    key,
                    out,
                };
                if setup.known()? {
                    return Ok(());
                }
                let (src, dst) = (Ipv4Addr::from(key.src_ip), Ipv4Addr::from(key.dst_ip));
                let mut src_mac = match Self::check_remote(topo, vni, src, outer_src) {
                    // What this host does not know (or knows at another
                    // VTEP) reaches it through the network's gateway VTEP
                    // (Hoverboard): delivered as it came.
                    Err(DropCause::UnknownRemoteSource | DropCause::VtepMismatch)
                        if via_gateway =>
                    {
                        eth.src_addr().0
                    }
                    r => r?,
                };
                let Some(topology::Endpoint::Local { port, mac }) = topo.lookup(vni, dst) else {
                    return Err(DropCause::UnknownDestination);
                };
                let dst_vm = topo.vm_on(port).ok_or(DropCause::UnknownPort)?;
                // Routed on the sending host: to the receiver it comes from
                // its gateway.
                if topo.subnet_of(vni, src) != topo.subnet_of(vni, dst) {
                    src_mac = topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
                }
                let fwd = compile::from_remote(outer_src, src_mac, mac, port);
                if setup.overlay_new(vni, dst_vm, fwd)?.is_some() {
                    setup.out.reinject = true;
                }
                Ok(())
            }
            _ => Err(DropCause::UnsupportedEthertype),
        }
    }

    /// The external network's port: ARP for our addresses (and learning
    /// our neighbours from theirs), replies of NATed connections, and new
    /// connections to floating IPs.
    fn handle_external_frame(
        &mut self,
        topo: &Topology,
        sh: &Shared,
        p: &PuntMsg,
        out: &mut Update,
    ) -> Result<(), DropCause> {
        let ext = topo.external.as_ref().ok_or(DropCause::NoExternal)?;
        let eth = EthernetFrame::new_checked(&p.data).map_err(|_| DropCause::Malformed)?;
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let (is_request, req) = arp::parse(eth.payload())?;
                if !is_request {
                    // Only an answer to our own question teaches a MAC.
                    let learned = shared::guard(&sh.ext_neighbors).answer(
                        req.sender_ip,
                        req.sender_mac,
                        p.punted_at,
                    );
                    return match learned {
                        ext_neighbors::Learned::Unsolicited => Err(DropCause::ArpNotRequest),
                        ext_neighbors::Learned::Confirmed => Ok(()),
                        ext_neighbors::Learned::Changed { old } => {
                            Self::external_mac_changed(sh, ext.port, old, req.sender_mac, out);
                            Ok(())
                        }
                    };
                }
                if topo.external_addr(req.target_ip).is_none() && !sh.is_external_vip(req.target_ip)
                {
                    return Err(DropCause::ArpUnknownTarget);
                }
                out.tx.push((p.ingress, arp::reply(&req, ext.mac)));
                self.arp_replies += 1;
                Ok(())
            }
            EthernetProtocol::Ipv4 => {
                let key = vm_key(p)?;
                let hop_mac = eth.src_addr().0;
                let mut setup = setup::Setup {
                    topo,
                    sh,
                    p,
                    frame: &p.data,
                    key,
                    out,
                };
                if setup.known()? {
                    return Ok(());
                }
                if let Some(flow) = setup.external_to_vip(hop_mac)? {
                    setup.out.reinject |= flow.is_some();
                    return Ok(());
                }
                let target = topo.external_addr(Ipv4Addr::from(key.dst_ip));
                let Some(topology::ExternalAddr::Floating(port)) = target else {
                    // Nothing of ours opened it: keep the repeats out (but
                    // not ICMP errors: a later one may be related).
                    if !setup::is_icmp_error(&key) {
                        // Nothing of ours at that address wants it, whatever
                        // the ports: one drop for the address pair (not for
                        // ICMP, where an address-wide drop would also catch
                        // the errors a later connection may need).
                        let pin = if key.proto == 1 { key } else { key.to_l3() };
                        setup.out.flows.push((pin, Action::drop()));
                    }
                    return Err(DropCause::ExtUnsolicited);
                };
                let vm = topo.vm_on(port).ok_or(DropCause::UnknownPort)?;
                if setup.external_new(vm, hop_mac)?.is_some() {
                    setup.out.reinject = true;
                }
                Ok(())
            }
            _ => Err(DropCause::UnsupportedEthertype),
        }
    }

    /// "Time exceeded" or "fragmentation needed" for a packet a flow could
    /// not carry, from the gateway of the sender's subnet. Only VMs on this
    /// host are answered (routing, and so TTL and MTU, happen on the
    /// sending host).
    fn icmp_error(
        &mut self,
        topo: &Topology,
        p: &PuntMsg,
        cause: DropCause,
        from_uplink: bool,
        out: &mut Update,
    ) -> Result<(), DropCause> {
        if from_uplink {
            return Err(cause);
        }
        let vm = topo.vm_on(p.ingress).ok_or(DropCause::UnknownPort)?;
        let key = vm_key(p)?;
        let vni = vm.vni.get();
        let gw = topo
            .subnet_of(vni, Ipv4Addr::from(key.src_ip))
            .ok_or(DropCause::SpoofedIp)?
            .gateway;
        let gw_mac = topo.network(vni).ok_or(DropCause::UnknownVni)?.gateway_mac;
        let reply = match cause {
            DropCause::TooBig => {
                let mtu = topo
                    .uplink
                    .as_ref()
                    .map_or(1500, |u| u.mtu.saturating_sub(50));
                icmp::frag_needed(&p.data, gw, gw_mac, mtu)?
            }
            _ => icmp::time_exceeded(&p.data, gw, gw_mac)?,
        };
        out.tx.push((p.ingress, reply));
        self.icmp_replies += 1;
        Ok(())
    }

    /// A sender on the overlay must be a known remote endpoint of `vni`,
    /// behind the VTEP the packet came from. Returns its MAC.
    /// An external neighbour now answers with `new` instead of `old`: the
    /// tracked connections that leave through it are moved over, and
    /// their flows in the fast path removed (their next packet installs
    /// them again, with the new MAC).
    fn external_mac_changed(
        sh: &Shared,
        port: flowtable::PortId,
        old: flowtable::Mac,
        new: flowtable::Mac,
        out: &mut Update,
    ) {
        sh.ct.update_all(|c| {
            for s in &mut c.sides {
                if s.action.output == flowtable::Output::Port(port)
                    && s.action.set_eth_dst == Some(old)
                {
                    s.action.set_eth_dst = Some(new);
                    if s.installed != 0 {
                        s.installed = 0;
                        out.remove.push(s.key);
                    }
                }
            }
        });
    }

    fn check_remote(
        topo: &Topology,
        vni: u32,
        ip: Ipv4Addr,
        from: Ipv4Addr,
    ) -> Result<[u8; 6], DropCause> {
        match topo.lookup(vni, ip) {
            Some(topology::Endpoint::Remote { mac, vtep }) if vtep == from => Ok(mac),
            Some(topology::Endpoint::Remote { .. }) => Err(DropCause::VtepMismatch),
            _ => Err(DropCause::UnknownRemoteSource),
        }
    }
}

/// The key of an IPv4 frame from a VM port, checked against the port.
fn vm_key(p: &PuntMsg) -> Result<FlowKey, DropCause> {
    let key = p.key.ok_or(DropCause::Malformed)?;
    if key.ingress() != Some(Ingress::Port(p.ingress)) {
        return Err(DropCause::Malformed);
    }
    Ok(key)
}

/// The ICMP error a punt asks for, if it asks for one (the flow exists
/// and stays; this packet gets the answer).
fn icmp_error_of(reason: PuntReason) -> Option<DropCause> {
    match reason {
        PuntReason::TooBig => Some(DropCause::TooBig),
        PuntReason::TtlExpired => Some(DropCause::TtlExpired),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
