//! Changes at run time: networks, VMs, remote endpoints (in bulk),
//! security groups and their rules, the external network, load-balanced
//! services, applied to the shared state as one atomic batch.
//!
//! Each operation is validated as it is applied; the first that fails
//! undoes the ones before it (each applied operation leaves its exact
//! inverse), so a batch applies whole or not at all. A successful batch
//! says which fast-path flows it affects ([`Invalidate`]: flows of whole
//! tenants or ports, flows from or to changed addresses, every stateless
//! security-group flow if the policy changed), ends the tracked
//! connections it affects, and bumps the state's version so that flows
//! decided under the old state and still on their way to the fast path
//! are not installed.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use flowtable::{Ingress, PortId, Vni};
use rustc_hash::FxHashSet;
use thiserror::Error;

use crate::acl::{PolicyError, Rule, SecurityGroup};
use crate::services::{ServiceSpec, VipKey};
use crate::shared::{inner, Shared};
use crate::topology::{External, LocalVm, Network, RemoteVm, TopologyError};
use dpif::{Invalidate, Update};

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddNetwork(Network),
    /// Replace a network's subnets, gateways, DHCP options, routes.
    ChangeNetwork(Network),
    RemoveNetwork(u32),
    AddVm(LocalVm),
    /// Replace the VM with this name (addresses, groups, floating IP...).
    ChangeVm(LocalVm),
    RemoveVm(String),
    /// Add remote endpoints, or move existing ones (new VTEP, MAC, groups).
    SetRemotes(Vec<RemoteVm>),
    RemoveRemotes(Vec<(u32, Ipv4Addr)>),
    AddGroup(SecurityGroup),
    RemoveGroup(String),
    SetRules(String, Vec<Rule>),
    /// Replace (or add, or remove) the external network. Connections
    /// through NAT end: their bindings and next hops belong to the old one.
    SetExternal(Option<External>),
    /// Add a load-balanced service.
    AddService(ServiceSpec),
    /// Replace the service of this name (its backends in bulk, weights,
    /// limit, or even its VIP). Connections to backends it no longer
    /// lists end; a drained backend (weight 0) keeps its own.
    ChangeService(ServiceSpec),
    /// Remove a service; its connections end.
    RemoveService(String),
}

/// Why a batch was refused (nothing of it was applied).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OpError {
    #[error("operation {index}: {source}")]
    Topology { index: usize, source: TopologyError },
    #[error("operation {index}: {source}")]
    Policy { index: usize, source: PolicyError },
    #[error("operation {index}: {object}: not found")]
    NotFound { index: usize, object: String },
    #[error("operation {index}: {what}")]
    Refused { index: usize, what: String },
}

/// What a successful batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    pub connections_ended: usize,
}

/// A backend by (address, port).
type Backend = (u32, u16);

/// What one operation touched, for invalidation.
#[derive(Default)]
struct Touched {
    networks: HashSet<u32>,
    ports: HashSet<PortId>,
    addrs: HashMap<u32, FxHashSet<u32>>,
    policy: bool,
    /// The external network changed: NATed connections end; these ports'
    /// flows go.
    external: Vec<PortId>,
    /// Load-balanced connections that end: all of a VIP's (`None`), or
    /// those pinned to these backends (address, port).
    lb_gone: Vec<(VipKey, Option<Vec<Backend>>)>,
}

impl Touched {
    fn addr(&mut self, vni: u32, ip: Ipv4Addr) {
        self.addrs.entry(vni).or_default().insert(u32::from(ip));
    }

    fn vm(&mut self, vm: &LocalVm) {
        self.ports.insert(vm.port);
        for ip in &vm.ips {
            self.addr(vm.vni.get(), *ip);
        }
        if !vm.groups.is_empty() {
            self.policy = true;
        }
    }
}

impl Shared {
    /// Apply `ops` atomically (see the module documentation); `out` gets
    /// the flows to invalidate and the new version.
    pub fn apply(&mut self, ops: Vec<Op>, out: &mut Update) -> Result<Applied, OpError> {
        // Per applied operation, the operations that undo it (in order).
        let mut undo: Vec<Vec<Op>> = Vec::new();
        let mut touched = Touched::default();
        let n = ops.len();
        for (index, op) in ops.into_iter().enumerate() {
            match self.apply_one(op, index, &mut touched) {
                Ok(inverse) => undo.push(inverse),
                Err(e) => {
                    let mut scratch = Touched::default();
                    for inv in undo.into_iter().rev().flatten() {
                        // An inverse restores what its operation replaced,
                        // so it cannot fail.
                        let _ = self.apply_one(inv, index, &mut scratch);
                    }
                    return Err(e);
                }
            }
        }
        self.version += 1;
        self.services_changed();
        let ended = self.end_touched(&touched, out);
        if !touched.external.is_empty() {
            // NATed connections ended above, into the old pool; the new
            // external network starts with a fresh one.
            *inner(&mut self.nat) = self
                .topo
                .external
                .as_ref()
                .filter(|e| !e.snat.is_empty())
                .map(|e| {
                    crate::nat::NatPool::new(e.snat.clone(), e.ports.0, e.ports.1, e.per_vm_ports)
                });
            inner(&mut self.ext_neighbors).clear();
        }
        out.version = self.version;
        out.invalidate = Some(self.invalidation(&touched));
        Ok(Applied {
            ops: n,
            connections_ended: ended,
        })
    }

    /// Apply one operation; on success, the operations that undo it.
    fn apply_one(&mut self, op: Op, index: usize, t: &mut Touched) -> Result<Vec<Op>, OpError> {
        let topo_err = |source| OpError::Topology { index, source };
        let pol_err = |source| OpError::Policy { index, source };
        match op {
            Op::AddNetwork(net) => {
                let vni = net.vni.get();
                Arc::make_mut(&mut self.topo)
                    .add_network(net)
                    .map_err(topo_err)?;
                t.networks.insert(vni);
                Ok(vec![Op::RemoveNetwork(vni)])
            }
            Op::ChangeNetwork(net) => {
                let vni = net.vni.get();
                let old = Arc::make_mut(&mut self.topo)
                    .change_network(net)
                    .map_err(topo_err)?;
                t.networks.insert(vni);
                Ok(vec![Op::ChangeNetwork(old)])
            }
            Op::RemoveNetwork(vni) => {
                if let Some(svc) = self.services_mut().iter().find(|s| s.spec.vni == vni) {
                    return Err(OpError::Refused {
                        index,
                        what: format!("network {vni}: service {} uses it", svc.spec.name),
                    });
                }
                let old = Arc::make_mut(&mut self.topo)
                    .remove_network(vni)
                    .map_err(topo_err)?;
                t.networks.insert(vni);
                Ok(vec![Op::AddNetwork(old)])
            }
            Op::AddVm(vm) => {
                self.check_groups(&vm.groups, index)?;
                self.check_not_vip(vm.vni.get(), &vm.ips, index)?;
                let name = vm.name.clone();
                if self.topo.vm_named(&name).is_some() {
                    return Err(OpError::Refused {
                        index,
                        what: format!("vm {name}: already exists"),
                    });
                }
                if self
                    .topo
                    .external
                    .as_ref()
                    .is_some_and(|e| e.port == vm.port)
                {
                    return Err(OpError::Refused {
                        index,
                        what: format!("vm {name}: field `port`: the external network's port"),
                    });
                }
                Arc::make_mut(&mut self.topo)
                    .add_vm(vm.clone())
                    .map_err(topo_err)?;
                for g in &vm.groups {
                    for ip in &vm.ips {
                        self.policy.add_member(*g, vm.vni.get(), *ip);
                    }
                }
                t.vm(&vm);
                Ok(vec![Op::RemoveVm(name)])
            }
            Op::RemoveVm(name) => {
                let port =
                    self.topo
                        .vm_named(&name)
                        .map(|v| v.port)
                        .ok_or_else(|| OpError::NotFound {
                            index,
                            object: format!("vm {name}"),
                        })?;
                let vm = Arc::make_mut(&mut self.topo)
                    .remove_vm(port)
                    .ok_or_else(|| OpError::NotFound {
                        index,
                        object: format!("vm {name}"),
                    })?;
                for g in &vm.groups {
                    for ip in &vm.ips {
                        self.policy.remove_member(*g, vm.vni.get(), *ip);
                    }
                }
                // Its leases go with it.
                inner(&mut self.leases).forget(&vm.mac);
                t.vm(&vm);
                Ok(vec![Op::AddVm(vm)])
            }
            Op::ChangeVm(vm) => {
                let old =
                    self.topo
                        .vm_named(&vm.name)
                        .cloned()
                        .ok_or_else(|| OpError::NotFound {
                            index,
                            object: format!("vm {}", vm.name),
                        })?;
                self.apply_one(Op::RemoveVm(old.name.clone()), index, t)?;
                if let Err(e) = self.apply_one(Op::AddVm(vm.clone()), index, t) {
                    let _ = self.apply_one(Op::AddVm(old), index, t);
                    return Err(e);
                }
                Ok(vec![Op::RemoveVm(vm.name), Op::AddVm(old)])
            }
            Op::SetRemotes(list) => {
                let mut inverse_add = Vec::new();
                let mut inverse_remove = Vec::new();
                for (i, r) in list.into_iter().enumerate() {
                    let res = self.set_remote(r, index, t);
                    match res {
                        Ok((old, key)) => {
                            inverse_remove.push(key);
                            inverse_add.extend(old);
                        }
                        Err(e) => {
                            // Undo this operation's own earlier entries.
                            let mut scratch = Touched::default();
                            let _ = self.apply_one(
                                Op::RemoveRemotes(inverse_remove),
                                index,
                                &mut scratch,
                            );
                            // (then restore what the earlier entries replaced)
                            let _ =
                                self.apply_one(Op::SetRemotes(inverse_add), index, &mut scratch);
                            return Err(match e {
                                OpError::Topology { source, .. } => OpError::Refused {
                                    index,
                                    what: format!("remotes[{i}]: {source}"),
                                },
                                other => other,
                            });
                        }
                    }
                }
                // Undo: drop what was set, then put back what it replaced.
                Ok(vec![
                    Op::RemoveRemotes(inverse_remove),
                    Op::SetRemotes(inverse_add),
                ])
            }
            Op::RemoveRemotes(keys) => {
                let mut removed = Vec::new();
                for (vni, ip) in keys {
                    if let Some(r) = Arc::make_mut(&mut self.topo).remove_remote(vni, ip) {
                        for g in &r.groups {
                            self.policy.remove_member(*g, vni, ip);
                        }
                        if !r.groups.is_empty() {
                            t.policy = true;
                        }
                        t.addr(vni, ip);
                        removed.push(r);
                    }
                }
                Ok(vec![Op::SetRemotes(removed)])
            }
            Op::AddGroup(g) => {
                let name = g.name.clone();
                self.policy.add_group(g).map_err(pol_err)?;
                Ok(vec![Op::RemoveGroup(name)])
            }
            Op::RemoveGroup(name) => {
                let id = self.policy.id(&name);
                let user = self
                    .topo
                    .vms()
                    .find(|v| id.is_some_and(|id| v.groups.contains(&id)))
                    .map(|v| format!("vm {}", v.name))
                    .or_else(|| {
                        self.topo
                            .remotes()
                            .find(|r| id.is_some_and(|id| r.groups.contains(&id)))
                            .map(|r| format!("remote {}", r.ip))
                    });
                if let Some(user) = user {
                    return Err(pol_err(PolicyError::InUse { name, user }));
                }
                let g = self.policy.remove_group(&name).map_err(pol_err)?;
                t.policy = true;
                Ok(vec![Op::AddGroup(g)])
            }
            Op::SetExternal(ext) => {
                let new_port = ext.as_ref().map(|e| e.port);
                let old = Arc::make_mut(&mut self.topo)
                    .set_external(ext)
                    .map_err(topo_err)?;
                t.external.extend(old.as_ref().map(|e| e.port));
                t.external.extend(new_port);
                Ok(vec![Op::SetExternal(old)])
            }
            Op::SetRules(name, rules) => {
                let old = self
                    .policy
                    .groups()
                    .find(|g| g.name == name)
                    .map(|g| g.rules.clone())
                    .ok_or_else(|| OpError::NotFound {
                        index,
                        object: format!("security group {name}"),
                    })?;
                self.policy.set_rules(&name, rules).map_err(pol_err)?;
                t.policy = true;
                Ok(vec![Op::SetRules(name, old)])
            }
            Op::AddService(spec) => {
                let refused = |e: crate::services::ServiceError| OpError::Refused {
                    index,
                    what: e.to_string(),
                };
                self.services()
                    .check(&spec, &self.topo, None)
                    .map_err(refused)?;
                let name = spec.name.clone();
                self.services_mut().insert(spec).map_err(refused)?;
                Ok(vec![Op::RemoveService(name)])
            }
            Op::ChangeService(spec) => {
                let refused = |e: crate::services::ServiceError| OpError::Refused {
                    index,
                    what: e.to_string(),
                };
                if self.services().named(&spec.name).is_none() {
                    return Err(OpError::NotFound {
                        index,
                        object: format!("service {}", spec.name),
                    });
                }
                self.services()
                    .check(&spec, &self.topo, Some(&spec.name))
                    .map_err(refused)?;
                let new_key = spec.key();
                let new_external = spec.external_key();
                let kept: Vec<(u32, u16)> = spec
                    .backends
                    .iter()
                    .map(|b| (u32::from(b.ip), b.port))
                    .collect();
                let old = self
                    .services_mut()
                    .insert(spec)
                    .map_err(refused)?
                    .map(|o| o.spec)
                    .ok_or_else(|| OpError::NotFound {
                        index,
                        object: "service".into(),
                    })?;
                let gone: Vec<(u32, u16)> = old
                    .backends
                    .iter()
                    .map(|b| (u32::from(b.ip), b.port))
                    .filter(|b| !kept.contains(b))
                    .collect();
                // A VIP (or external VIP) that changed loses all its
                // connections; one that stayed, those of the backends
                // that went.
                for (before, after) in [
                    (Some(old.key()), Some(new_key)),
                    (old.external_key(), new_external),
                ] {
                    match before {
                        Some(k) if Some(k) != after => t.lb_gone.push((k, None)),
                        Some(k) if !gone.is_empty() => t.lb_gone.push((k, Some(gone.clone()))),
                        _ => {}
                    }
                }
                Ok(vec![Op::ChangeService(old)])
            }
            Op::RemoveService(name) => {
                let old = self
                    .services_mut()
                    .remove(&name)
                    .ok_or_else(|| OpError::NotFound {
                        index,
                        object: format!("service {name}"),
                    })?;
                t.lb_gone.push((old.spec.key(), None));
                t.lb_gone.extend(old.spec.external_key().map(|k| (k, None)));
                Ok(vec![Op::AddService(old.spec)])
            }
        }
    }

    /// Refuse a VM or endpoint address that is a service's VIP.
    fn check_not_vip(&self, vni: u32, ips: &[Ipv4Addr], index: usize) -> Result<(), OpError> {
        match ips.iter().find(|ip| self.services().is_vip(vni, **ip)) {
            Some(ip) => Err(OpError::Refused {
                index,
                what: format!("{ip} is a service's VIP in network {vni}"),
            }),
            None => Ok(()),
        }
    }

    /// Add or move one remote endpoint; returns what it replaced and its key.
    fn set_remote(
        &mut self,
        r: RemoteVm,
        index: usize,
        t: &mut Touched,
    ) -> Result<(Option<RemoteVm>, (u32, Ipv4Addr)), OpError> {
        self.check_groups(&r.groups, index)?;
        let (vni, ip) = (r.vni.get(), r.ip);
        self.check_not_vip(vni, &[ip], index)?;
        let topo = Arc::make_mut(&mut self.topo);
        let old = topo.remove_remote(vni, ip);
        if let Err(source) = topo.add_remote(r.clone()) {
            if let Some(o) = old {
                let _ = topo.add_remote(o);
            }
            return Err(OpError::Topology { index, source });
        }
        if let Some(o) = &old {
            for g in &o.groups {
                self.policy.remove_member(*g, vni, ip);
            }
        }
        for g in &r.groups {
            self.policy.add_member(*g, vni, ip);
        }
        if !r.groups.is_empty() || old.as_ref().is_some_and(|o| !o.groups.is_empty()) {
            t.policy = true;
        }
        t.addr(vni, ip);
        Ok((old, (vni, ip)))
    }

    fn check_groups(&self, groups: &[u16], index: usize) -> Result<(), OpError> {
        match groups
            .iter()
            .find(|g| self.policy.group_name(**g).is_none_or(str::is_empty))
        {
            Some(g) => Err(OpError::Refused {
                index,
                what: format!("security group id {g} does not exist"),
            }),
            None => Ok(()),
        }
    }

    /// End the tracked connections a change touched, or that the policy
    /// no longer admits. A connection from a local VM that only used a
    /// moved address (a remote endpoint that migrated) is recompiled
    /// instead: its flows are removed with the others and come back, on
    /// the new path, with its next packet.
    fn end_touched(&mut self, t: &Touched, out: &mut Update) -> usize {
        let topo = Arc::clone(&self.topo);
        let hit = |vni: u32, ip: u32| t.addrs.get(&vni).is_some_and(|s| s.contains(&ip));
        let mut ended = Vec::new();
        let mut moved = Vec::new();
        for (id, c) in self.ct.iter() {
            let a = &c.admission;
            let lb_gone = !t.lb_gone.is_empty()
                && crate::lb::vip_of(c).is_some_and(|k| {
                    t.lb_gone.iter().any(|(g, backends)| {
                        *g == k
                            && backends.as_ref().is_none_or(|bs| {
                                crate::lb::backend_of(c).is_some_and(|b| bs.contains(&b))
                            })
                    })
                });
            let hard = lb_gone
                || t.networks.contains(&a.vni)
                || c.owner.is_some_and(|p| t.ports.contains(&p))
                || (!t.external.is_empty() && c.nat.is_some())
                || (t.policy && !a.still_admitted(&topo, &self.policy));
            if hard {
                ended.push(id);
            } else if hit(a.vni, a.src) || hit(a.vni, a.dst) {
                match crate::setup::recompiled(&topo, c) {
                    Some(sides) => moved.push((id, sides)),
                    None => ended.push(id),
                }
            }
        }
        for (id, sides) in moved {
            // Their flows go (the address invalidation misses a
            // load-balanced connection's forward flow: its key has the
            // VIP, not the moved backend).
            if let Some(c) = self.ct.get(id) {
                out.remove.extend(c.installed_keys());
            }
            if !self.ct.replace_sides(id, sides) {
                ended.push(id);
            }
        }
        for id in &ended {
            if let Some(c) = self.ct.remove(*id) {
                self.ct.count(|c| c.revoked += 1);
                self.end(&c, out);
            }
        }
        ended.len()
    }

    /// The fast-path flows a change affects.
    fn invalidation(&self, t: &Touched) -> Invalidate {
        let mut inv = Invalidate {
            acl: t.policy,
            ..Invalidate::default()
        };
        let tenant_ctxs = |vni: u32| {
            let mut v: Vec<u32> = self
                .topo
                .vms()
                .filter(|vm| vm.vni.get() == vni)
                .map(|vm| Ingress::Port(vm.port).ctx())
                .collect();
            v.extend(Vni::new(vni).map(|v| Ingress::Vni(v).ctx()));
            v
        };
        for vni in &t.networks {
            inv.ctxs.extend(tenant_ctxs(*vni));
        }
        for p in t.ports.iter().chain(&t.external) {
            inv.ctxs.insert(Ingress::Port(*p).ctx());
            inv.outputs.insert(*p);
        }
        for (vni, ips) in &t.addrs {
            let set = Arc::new(ips.clone());
            for ctx in tenant_ctxs(*vni) {
                inv.addrs.insert(ctx, Arc::clone(&set));
            }
        }
        // A changed VM may have had a floating IP: the external network's
        // flows go (tracked ones come back from conntrack on their next
        // packet).
        if let Some(e) = &self.topo.external {
            if !t.ports.is_empty() {
                inv.ctxs.insert(Ingress::Port(e.port).ctx());
            }
        }
        inv
    }
}
