//! An in-memory switch for simulated hosts: it keeps what a switch keeps
//! of the agent's records (networks, groups, VMs with their addresses,
//! endpoints as MAC and VTEP) and refuses what a switch refuses of them —
//! an unknown network or group, a taken name or address, a network or
//! group still in use — naming the operation and entry as the switch
//! does, all or nothing per batch. It does not check what only the
//! switch's own code can (a network's subnets, a VM's port): records that
//! a real switch would refuse for those are accepted here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::switch::{Held, Op, Switch, SwitchError};

#[derive(Debug, Clone)]
struct Vm {
    vni: u32,
    ips: Vec<Ipv4Addr>,
    groups: Vec<String>,
}

/// A switch's state, in memory.
#[derive(Debug)]
pub struct ModelSwitch {
    pub vtep: Ipv4Addr,
    networks: BTreeMap<u32, usize>,
    groups: BTreeMap<String, usize>,
    vms: BTreeMap<String, Vm>,
    /// (vni, address) → (MAC, VTEP). (hashbrown's default hasher: a
    /// thousand models of 100 000 endpoints are hashed 10⁸ times.)
    remotes: hashbrown::HashMap<(u32, u32), ([u8; 6], u32)>,
    /// Addresses of local VMs.
    local: BTreeSet<(u32, Ipv4Addr)>,
    pub batches: u64,
}

fn refused(op: usize, item: Option<usize>, what: String) -> SwitchError {
    let message = match item {
        Some(j) => format!("operation {op}: remotes[{j}]: {what}"),
        None => format!("operation {op}: {what}"),
    };
    SwitchError::Refused {
        op: Some(op),
        item,
        message,
    }
}

fn vm_of(v: &Value) -> Result<Vm, String> {
    let vni = v["network"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or("field `network`: missing or not a VNI")?;
    let ips = v["ips"]
        .as_array()
        .ok_or("field `ips`: missing")?
        .iter()
        .map(|i| {
            i.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or("field `ips`: not an address")
        })
        .collect::<Result<Vec<Ipv4Addr>, _>>()?;
    let groups = v["security_groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(Vm { vni, ips, groups })
}

impl ModelSwitch {
    pub fn new(vtep: Ipv4Addr) -> ModelSwitch {
        ModelSwitch {
            vtep,
            networks: BTreeMap::new(),
            groups: BTreeMap::new(),
            vms: BTreeMap::new(),
            remotes: hashbrown::HashMap::new(),
            local: BTreeSet::new(),
            batches: 0,
        }
    }

    pub fn remote_count(&self) -> usize {
        self.remotes.len()
    }

    /// The endpoint (vni, ip) as held: (MAC, VTEP).
    pub fn remote(&self, vni: u32, ip: Ipv4Addr) -> Option<([u8; 6], Ipv4Addr)> {
        self.remotes
            .get(&(vni, u32::from(ip)))
            .map(|(m, v)| (*m, Ipv4Addr::from(*v)))
    }

    pub fn has_vm(&self, name: &str) -> bool {
        self.vms.contains_key(name)
    }

    fn check_vm(
        &self,
        i: usize,
        name: &str,
        vm: &Vm,
        replacing: Option<&Vm>,
    ) -> Result<(), SwitchError> {
        if !self.networks.contains_key(&vm.vni) {
            return Err(refused(
                i,
                None,
                format!("vm {name}: unknown network {}", vm.vni),
            ));
        }
        if let Some(g) = vm.groups.iter().find(|g| !self.groups.contains_key(*g)) {
            return Err(refused(
                i,
                None,
                format!("vm {name}: unknown security group {g}"),
            ));
        }
        for ip in &vm.ips {
            let own = replacing.is_some_and(|r| r.vni == vm.vni && r.ips.contains(ip));
            if !own
                && (self.local.contains(&(vm.vni, *ip))
                    || self.remotes.contains_key(&(vm.vni, u32::from(*ip))))
            {
                return Err(refused(
                    i,
                    None,
                    format!("vm {name}: address {ip} is taken"),
                ));
            }
        }
        Ok(())
    }

    fn add_vm(&mut self, name: &str, vm: Vm) {
        for ip in &vm.ips {
            self.local.insert((vm.vni, *ip));
        }
        *self.networks.entry(vm.vni).or_default() += 1;
        for g in &vm.groups {
            *self.groups.entry(g.clone()).or_default() += 1;
        }
        self.vms.insert(name.to_string(), vm);
    }

    fn remove_vm(&mut self, name: &str) -> Option<Vm> {
        let vm = self.vms.remove(name)?;
        for ip in &vm.ips {
            self.local.remove(&(vm.vni, *ip));
        }
        if let Some(n) = self.networks.get_mut(&vm.vni) {
            *n -= 1;
        }
        for g in &vm.groups {
            if let Some(n) = self.groups.get_mut(g) {
                *n -= 1;
            }
        }
        Some(vm)
    }

    /// One operation; on error, nothing of it is applied. Pushes what
    /// undoes it.
    fn apply_one(&mut self, i: usize, op: &Op, undo: &mut Vec<Undo>) -> Result<(), SwitchError> {
        match op {
            Op::AddGroup(n, _) => {
                if self.groups.contains_key(n) {
                    return Err(refused(i, None, format!("security group {n} exists")));
                }
                self.groups.insert(n.clone(), 0);
                undo.push(Undo::Group(n.clone(), None));
            }
            Op::SetRules(n, _) => {
                if !self.groups.contains_key(n) {
                    return Err(refused(i, None, format!("security group {n}: not found")));
                }
            }
            Op::RemoveGroup(n) => match self.groups.get(n) {
                None => return Err(refused(i, None, format!("security group {n}: not found"))),
                Some(&users) if users > 0 => {
                    return Err(refused(i, None, format!("security group {n} is in use")));
                }
                Some(_) => {
                    self.groups.remove(n);
                    undo.push(Undo::Group(n.clone(), Some(0)));
                }
            },
            Op::AddNetwork(v, _) => {
                if self.networks.contains_key(v) {
                    return Err(refused(i, None, format!("network {v} exists")));
                }
                self.networks.insert(*v, 0);
                undo.push(Undo::Network(*v, None));
            }
            Op::ChangeNetwork(v, _) => {
                if !self.networks.contains_key(v) {
                    return Err(refused(i, None, format!("network {v}: not found")));
                }
            }
            Op::RemoveNetwork(v) => match self.networks.get(v) {
                None => return Err(refused(i, None, format!("network {v}: not found"))),
                Some(&users) if users > 0 => {
                    return Err(refused(i, None, format!("network {v} is in use")));
                }
                Some(_) => {
                    self.networks.remove(v);
                    undo.push(Undo::Network(*v, Some(0)));
                }
            },
            Op::AddVm(n, v) | Op::ChangeVm(n, v) => {
                let adding = matches!(op, Op::AddVm(..));
                if adding == self.vms.contains_key(n) {
                    let why = if adding { "exists" } else { "not found" };
                    return Err(refused(i, None, format!("vm {n}: {why}")));
                }
                let vm = vm_of(v).map_err(|e| refused(i, None, format!("vm {n}: {e}")))?;
                let old = self.vms.get(n).cloned();
                self.check_vm(i, n, &vm, old.as_ref())?;
                if let Some(old) = self.remove_vm(n) {
                    undo.push(Undo::Vm(n.clone(), Some(Box::new(old))));
                }
                self.add_vm(n, vm);
                undo.push(Undo::Vm(n.clone(), None));
            }
            Op::RemoveVm(n) => match self.remove_vm(n) {
                Some(old) => undo.push(Undo::Vm(n.clone(), Some(Box::new(old)))),
                None => return Err(refused(i, None, format!("vm {n}: not found"))),
            },
            Op::SetRemotes(list) => {
                for (j, r) in list.iter().enumerate() {
                    if !self.networks.contains_key(&r.vni) {
                        return Err(refused(i, Some(j), format!("unknown network {}", r.vni)));
                    }
                    if self.local.contains(&(r.vni, r.ip)) {
                        return Err(refused(i, Some(j), format!("{} is a local VM", r.ip)));
                    }
                    let key = (r.vni, u32::from(r.ip));
                    let old = self.remotes.insert(key, (r.mac, u32::from(r.vtep)));
                    if old.is_none() {
                        *self.networks.entry(r.vni).or_default() += 1;
                    }
                    undo.push(Undo::Remote(key, old));
                }
            }
            Op::RemoveRemotes(list) => {
                for (v, ip) in list {
                    let key = (*v, u32::from(*ip));
                    if let Some(old) = self.remotes.remove(&key) {
                        if let Some(n) = self.networks.get_mut(v) {
                            *n -= 1;
                        }
                        undo.push(Undo::Unremote(key, old));
                    }
                }
            }
            Op::SetExternal(_) => {}
        }
        Ok(())
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::Group(n, None) => {
                self.groups.remove(&n);
            }
            Undo::Group(n, Some(users)) => {
                self.groups.insert(n, users);
            }
            Undo::Network(v, None) => {
                self.networks.remove(&v);
            }
            Undo::Network(v, Some(users)) => {
                self.networks.insert(v, users);
            }
            Undo::Vm(n, None) => {
                self.remove_vm(&n);
            }
            Undo::Vm(n, Some(old)) => self.add_vm(&n, *old),
            Undo::Remote(key, None) => {
                self.remotes.remove(&key);
                if let Some(n) = self.networks.get_mut(&key.0) {
                    *n -= 1;
                }
            }
            Undo::Remote(key, Some(old)) => {
                self.remotes.insert(key, old);
            }
            Undo::Unremote(key, old) => {
                self.remotes.insert(key, old);
                *self.networks.entry(key.0).or_default() += 1;
            }
        }
    }
}

/// What undoes one step of a batch.
enum Undo {
    Group(String, Option<usize>),
    Network(u32, Option<usize>),
    Vm(String, Option<Box<Vm>>),
    Remote((u32, u32), Option<([u8; 6], u32)>),
    Unremote((u32, u32), ([u8; 6], u32)),
}

impl Switch for ModelSwitch {
    fn apply(&mut self, ops: &[Op]) -> Result<(), SwitchError> {
        // The table grows once for the whole batch, not op by op.
        let adds: usize = ops
            .iter()
            .map(|o| match o {
                Op::SetRemotes(l) => l.len(),
                _ => 0,
            })
            .sum();
        self.remotes.reserve(adds);
        let mut undo = Vec::with_capacity(adds);
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.apply_one(i, op, &mut undo) {
                while let Some(u) = undo.pop() {
                    self.undo(u);
                }
                return Err(e);
            }
        }
        self.batches += 1;
        Ok(())
    }

    fn held(&mut self) -> Result<Held, SwitchError> {
        Ok(Held {
            networks: self.networks.keys().copied().collect(),
            groups: self.groups.keys().cloned().collect(),
            vms: self.vms.keys().cloned().collect(),
            remotes: self
                .remotes
                .iter()
                .map(|(k, (m, v))| ((k.0, Ipv4Addr::from(k.1)), (*m, Ipv4Addr::from(*v))))
                .collect(),
        })
    }

    fn vtep(&mut self) -> Result<Ipv4Addr, SwitchError> {
        Ok(self.vtep)
    }
}
