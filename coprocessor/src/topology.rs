//! What the coprocessor knows about the tenant world: networks, their
//! subnets and gateways, the VMs on this host, the endpoints on other
//! hosts, and the uplink. Every change is validated whole before it is
//! applied; an error names the object, the field and the problem.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;

use flowtable::{Mac, PortId, Vni};
use thiserror::Error;

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// A prefix; `None` if `len > 32` or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Cidr> {
        if len > 32 {
            return None;
        }
        let c = Cidr { addr, len };
        (u32::from(addr) & !c.mask() == 0).then_some(c)
    }

    pub fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, o: &Cidr) -> bool {
        let m = self.mask() & o.mask();
        u32::from(self.addr) & m == u32::from(o.addr) & m
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/LENGTH"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .map_err(|_| format!("{l:?} is not a prefix length"))?;
        Cidr::new(addr, len)
            .ok_or_else(|| format!("{s} is not a network address with a length ≤ 32"))
    }
}

/// A subnet of a tenant network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subnet {
    pub cidr: Cidr,
    /// The distributed router's address in this subnet (answered by the ARP proxy).
    pub gateway: Ipv4Addr,
}

/// Where a static route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Via {
    /// A VM of the network (an appliance: firewall, VPN, router VM).
    Vm(Ipv4Addr),
    /// The network's gateway VTEP.
    GatewayVtep,
}

/// A static route of a tenant network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub cidr: Cidr,
    pub via: Via,
}

/// A tenant network (one VNI).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Network {
    pub vni: Vni,
    pub subnets: Vec<Subnet>,
    /// The MAC the gateway addresses answer with.
    pub gateway_mac: Mac,
    /// DNS servers handed out by DHCP (at most 3 are sent).
    pub dns: Vec<Ipv4Addr>,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
    /// Static routes, longest prefix first when used.
    pub routes: Vec<Route>,
    /// Where traffic for addresses this host does not know goes (a
    /// gateway hypervisor that knows every endpoint: Hoverboard).
    pub gateway_vtep: Option<Ipv4Addr>,
    /// VMs of this network may reach the external network through SNAT.
    pub snat: bool,
}

/// A VM attached to a port of this switch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalVm {
    pub name: String,
    pub port: PortId,
    pub mac: Mac,
    pub ips: Vec<Ipv4Addr>,
    pub vni: Vni,
    /// Handed out by DHCP (option 12) if set.
    pub hostname: Option<String>,
    /// Security groups (ids in the switch's policy); empty: not filtered.
    pub groups: Vec<u16>,
    /// An external address mapped 1:1 to the VM's first address.
    pub floating_ip: Option<Ipv4Addr>,
}

/// A VM behind another hypervisor's VTEP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteVm {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub vni: Vni,
    pub vtep: Ipv4Addr,
    /// Its security groups (membership counts for remote-group rules).
    pub groups: Vec<u16>,
}

/// The external network: a port towards the outside world (the
/// provider network), the host's addresses on it, and how to reach the
/// rest of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct External {
    pub port: PortId,
    /// Our MAC on the external port.
    pub mac: Mac,
    /// The external subnet our addresses are in.
    pub cidr: Cidr,
    /// Next hop for destinations outside `cidr`.
    pub gateway: Option<Ipv4Addr>,
    /// SNAT pool (addresses inside `cidr`).
    pub snat: Vec<Ipv4Addr>,
    /// SNAT ports, inclusive.
    pub ports: (u16, u16),
    /// SNAT ports one VM may hold.
    pub per_vm_ports: u32,
}

impl External {
    /// The neighbour a packet to `dst` is sent to.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.cidr.contains(dst) {
            Some(dst)
        } else {
            self.gateway
        }
    }
}

/// What an external address of this switch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalAddr {
    Snat,
    /// A VM's floating IP: the VM's port.
    Floating(PortId),
}

/// The uplink: where VXLAN leaves and arrives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Uplink {
    pub port: PortId,
    pub mac: Mac,
    pub local_vtep: Ipv4Addr,
    /// Underlay MTU; inner frames longer than `mtu - 36` cannot be carried.
    pub mtu: u16,
    /// Outer IPv4 TTL.
    pub ttl: u8,
}

/// Where an address of a tenant network lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Local { port: PortId, mac: Mac },
    Remote { mac: Mac, vtep: Ipv4Addr },
    Gateway { mac: Mac },
}

/// A rejected change. Nothing was applied.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("network {vni}: already exists")]
    DuplicateNetwork { vni: u32 },
    #[error("network {vni}: subnets {a} and {b} overlap")]
    OverlappingSubnets { vni: u32, a: Cidr, b: Cidr },
    #[error("network {vni}: subnet {cidr}: gateway {gateway} is not inside the subnet")]
    GatewayOutsideSubnet {
        vni: u32,
        cidr: Cidr,
        gateway: Ipv4Addr,
    },
    #[error("{object}: network {vni} does not exist")]
    UnknownNetwork { object: String, vni: u32 },
    #[error("vm {name}: port {port} is already used by vm {other}")]
    PortInUse {
        name: String,
        port: u16,
        other: String,
    },
    #[error("vm {name}: field `ips`: {ip} is not inside any subnet of network {vni}")]
    IpOutsideSubnets {
        name: String,
        ip: Ipv4Addr,
        vni: u32,
    },
    #[error("{object}: address {ip} in network {vni} is already used by {other}")]
    DuplicateIp {
        object: String,
        ip: Ipv4Addr,
        vni: u32,
        other: String,
    },
    #[error("{object}: field `mac`: {mac} is not a unicast MAC")]
    BadMac { object: String, mac: String },
    #[error("vm {name}: field `ips` is empty")]
    NoIps { name: String },
    #[error("vm {name}: port {port} is the uplink")]
    UplinkPort { name: String, port: u16 },
    #[error("{object}: not found")]
    NotFound { object: String },
    #[error("vm {name}: field `floating_ip`: {problem}")]
    BadFloatingIp { name: String, problem: String },
    #[error("vm {name}: field `mac`: {mac} is already the MAC of vm {other}")]
    DuplicateMac {
        name: String,
        mac: String,
        other: String,
    },
    #[error("external: field `port`: port {port} is vm {vm}'s")]
    ExternalPort { port: u16, vm: String },
    #[error("network {vni}: still in use by {user}")]
    NetworkInUse { vni: u32, user: String },
    #[error("network {vni}: field `subnets`: {ip} ({user}) would be outside every subnet")]
    WouldStrand {
        vni: u32,
        ip: Ipv4Addr,
        user: String,
    },
}

/// "aa:bb:cc:dd:ee:ff".
pub fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn unicast(m: &Mac) -> bool {
    m[0] & 1 == 0 && *m != [0; 6]
}

/// The whole tenant world as this switch sees it.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The uplink; `None` on a switch with VM ports only.
    pub uplink: Option<Uplink>,
    networks: HashMap<u32, Network>,
    vms: HashMap<PortId, LocalVm>,
    remotes: FxHashMap<(u32, Ipv4Addr), RemoteVm>,
    /// (VNI, address) → where it lives; rebuilt from the above on change.
    /// (Fx hashing: keys come from the control plane; packets only look up.)
    index: FxHashMap<(u32, Ipv4Addr), Endpoint>,
    /// Next-hop MAC towards each remote VTEP (learned from the kernel).
    neighbors: HashMap<Ipv4Addr, Mac>,
    /// The external network, if this switch has one.
    pub external: Option<External>,
    /// Floating IPs → the VM's port.
    floating: HashMap<Ipv4Addr, PortId>,
    /// Remote VTEPs → how many endpoints live behind each.
    vteps: FxHashMap<Ipv4Addr, usize>,
}

/// A topology as plain lists (for snapshots): rebuilt with the same
/// checks as any change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopologyParts {
    pub uplink: Option<Uplink>,
    pub external: Option<External>,
    pub networks: Vec<Network>,
    pub vms: Vec<LocalVm>,
    pub remotes: Vec<RemoteVm>,
    pub neighbors: Vec<(Ipv4Addr, Mac)>,
}

impl Topology {
    /// The topology as plain lists.
    pub fn to_parts(&self) -> TopologyParts {
        let mut networks: Vec<Network> = self.networks.values().cloned().collect();
        networks.sort_by_key(|n| n.vni);
        let mut vms: Vec<LocalVm> = self.vms.values().cloned().collect();
        vms.sort_by_key(|v| v.port);
        let mut remotes: Vec<RemoteVm> = self.remotes.values().cloned().collect();
        remotes.sort_by_key(|r| (r.vni, r.ip));
        let mut neighbors: Vec<(Ipv4Addr, Mac)> =
            self.neighbors.iter().map(|(k, v)| (*k, *v)).collect();
        neighbors.sort();
        TopologyParts {
            uplink: self.uplink.clone(),
            external: self.external.clone(),
            networks,
            vms,
            remotes,
            neighbors,
        }
    }

    /// Rebuild a topology from its parts, checking everything again.
    pub fn from_parts(p: TopologyParts) -> Result<Topology, TopologyError> {
        let mut t = Topology::new(p.uplink);
        t.external = p.external;
        for n in p.networks {
            t.add_network(n)?;
        }
        for v in p.vms {
            t.add_vm(v)?;
        }
        for r in p.remotes {
            t.add_remote(r)?;
        }
        for (vtep, mac) in p.neighbors {
            t.set_neighbor(vtep, mac);
        }
        Ok(t)
    }

    pub fn new(uplink: Option<Uplink>) -> Topology {
        Topology {
            uplink,
            networks: HashMap::new(),
            vms: HashMap::new(),
            remotes: FxHashMap::default(),
            index: FxHashMap::default(),
            neighbors: HashMap::new(),
            external: None,
            floating: HashMap::new(),
            vteps: FxHashMap::default(),
        }
    }

    /// What `ip` is on the external network, if it is ours.
    pub fn external_addr(&self, ip: Ipv4Addr) -> Option<ExternalAddr> {
        if let Some(p) = self.floating.get(&ip) {
            return Some(ExternalAddr::Floating(*p));
        }
        self.external
            .as_ref()
            .filter(|e| e.snat.contains(&ip))
            .map(|_| ExternalAddr::Snat)
    }

    pub fn add_network(&mut self, n: Network) -> Result<(), TopologyError> {
        let vni = n.vni.get();
        if self.networks.contains_key(&vni) {
            return Err(TopologyError::DuplicateNetwork { vni });
        }
        for (i, a) in n.subnets.iter().enumerate() {
            if !a.cidr.contains(a.gateway) {
                return Err(TopologyError::GatewayOutsideSubnet {
                    vni,
                    cidr: a.cidr,
                    gateway: a.gateway,
                });
            }
            if let Some(b) = n.subnets[i + 1..].iter().find(|b| a.cidr.overlaps(&b.cidr)) {
                return Err(TopologyError::OverlappingSubnets {
                    vni,
                    a: a.cidr,
                    b: b.cidr,
                });
            }
        }
        if !unicast(&n.gateway_mac) {
            return Err(TopologyError::BadMac {
                object: format!("network {vni}"),
                mac: mac_str(&n.gateway_mac),
            });
        }
        for s in &n.subnets {
            self.index
                .insert((vni, s.gateway), Endpoint::Gateway { mac: n.gateway_mac });
        }
        self.networks.insert(vni, n);
        Ok(())
    }

    fn owner(&self, vni: u32, ip: Ipv4Addr) -> Option<String> {
        match self.index.get(&(vni, ip))? {
            Endpoint::Gateway { .. } => Some("the gateway".into()),
            Endpoint::Local { port, .. } => Some(
                self.vms
                    .get(port)
                    .map_or("a vm".into(), |v| format!("vm {}", v.name)),
            ),
            Endpoint::Remote { vtep, .. } => Some(format!("a remote endpoint behind {vtep}")),
        }
    }

    pub fn add_vm(&mut self, vm: LocalVm) -> Result<(), TopologyError> {
        let vni = vm.vni.get();
        let Some(net) = self.networks.get(&vni) else {
            return Err(TopologyError::UnknownNetwork {
                object: format!("vm {}", vm.name),
                vni,
            });
        };
        if self.uplink.as_ref().is_some_and(|u| u.port == vm.port) {
            return Err(TopologyError::UplinkPort {
                name: vm.name,
                port: vm.port.0,
            });
        }
        if let Some(other) = self.vms.get(&vm.port) {
            return Err(TopologyError::PortInUse {
                name: vm.name,
                port: vm.port.0,
                other: other.name.clone(),
            });
        }
        if !unicast(&vm.mac) {
            return Err(TopologyError::BadMac {
                object: format!("vm {}", vm.name),
                mac: mac_str(&vm.mac),
            });
        }
        if vm.ips.is_empty() {
            return Err(TopologyError::NoIps { name: vm.name });
        }
        if let Some(other) = self.vms.values().find(|o| o.mac == vm.mac) {
            return Err(TopologyError::DuplicateMac {
                name: vm.name,
                mac: mac_str(&vm.mac),
                other: other.name.clone(),
            });
        }
        for ip in &vm.ips {
            if !net.subnets.iter().any(|s| s.cidr.contains(*ip)) {
                return Err(TopologyError::IpOutsideSubnets {
                    name: vm.name.clone(),
                    ip: *ip,
                    vni,
                });
            }
            if let Some(other) = self.owner(vni, *ip) {
                return Err(TopologyError::DuplicateIp {
                    object: format!("vm {}", vm.name),
                    ip: *ip,
                    vni,
                    other,
                });
            }
        }
        if let Some(fip) = vm.floating_ip {
            let problem = match &self.external {
                None => Some("the switch has no [external] network".to_string()),
                Some(e) if !e.cidr.contains(fip) => Some(format!(
                    "{fip} is not inside the external subnet {}",
                    e.cidr
                )),
                Some(e) if e.snat.contains(&fip) => Some(format!("{fip} is an SNAT address")),
                Some(e) if e.port == vm.port => Some("the VM is on the external port".into()),
                _ => self
                    .floating
                    .get(&fip)
                    .map(|p| format!("{fip} is already the floating IP of port {}", p.0)),
            };
            if let Some(problem) = problem {
                return Err(TopologyError::BadFloatingIp {
                    name: vm.name,
                    problem,
                });
            }
            self.floating.insert(fip, vm.port);
        }
        for ip in &vm.ips {
            self.index.insert(
                (vni, *ip),
                Endpoint::Local {
                    port: vm.port,
                    mac: vm.mac,
                },
            );
        }
        self.vms.insert(vm.port, vm);
        Ok(())
    }

    pub fn add_remote(&mut self, r: RemoteVm) -> Result<(), TopologyError> {
        let vni = r.vni.get();
        // (Named only on error: bulk changes add many.)
        let object = || format!("remote {} in network {vni}", r.ip);
        if !self.networks.contains_key(&vni) {
            return Err(TopologyError::UnknownNetwork {
                object: object(),
                vni,
            });
        }
        if !unicast(&r.mac) {
            return Err(TopologyError::BadMac {
                object: object(),
                mac: mac_str(&r.mac),
            });
        }
        if let Some(other) = self.owner(vni, r.ip) {
            return Err(TopologyError::DuplicateIp {
                object: object(),
                ip: r.ip,
                vni,
                other,
            });
        }
        self.index.insert(
            (vni, r.ip),
            Endpoint::Remote {
                mac: r.mac,
                vtep: r.vtep,
            },
        );
        *self.vteps.entry(r.vtep).or_default() += 1;
        self.remotes.insert((vni, r.ip), r);
        Ok(())
    }

    /// Replace the external network (or add one, or remove it with
    /// `None`): refused if a VM's floating IP would not fit the new one, or
    /// its port is a VM's. Returns the old one.
    pub fn set_external(
        &mut self,
        ext: Option<External>,
    ) -> Result<Option<External>, TopologyError> {
        if let Some(e) = &ext {
            if let Some(vm) = self.vms.get(&e.port) {
                return Err(TopologyError::ExternalPort {
                    port: e.port.0,
                    vm: vm.name.clone(),
                });
            }
        }
        for vm in self.vms.values() {
            let Some(fip) = vm.floating_ip else { continue };
            let problem = match &ext {
                None => Some("the external network would be gone".to_string()),
                Some(e) if !e.cidr.contains(fip) => Some(format!(
                    "{fip} would be outside the external subnet {}",
                    e.cidr
                )),
                Some(e) if e.snat.contains(&fip) => Some(format!("{fip} would be an SNAT address")),
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(TopologyError::BadFloatingIp {
                    name: vm.name.clone(),
                    problem,
                });
            }
        }
        Ok(std::mem::replace(&mut self.external, ext))
    }

    /// Remove the VM on `port`.
    pub fn remove_vm(&mut self, port: PortId) -> Option<LocalVm> {
        let vm = self.vms.remove(&port)?;
        for ip in &vm.ips {
            self.index.remove(&(vm.vni.get(), *ip));
        }
        if let Some(fip) = vm.floating_ip {
            self.floating.remove(&fip);
        }
        Some(vm)
    }

    /// The VM called `name`.
    pub fn vm_named(&self, name: &str) -> Option<&LocalVm> {
        self.vms.values().find(|v| v.name == name)
    }

    /// Remove the remote endpoint `ip` of network `vni`.
    pub fn remove_remote(&mut self, vni: u32, ip: Ipv4Addr) -> Option<RemoteVm> {
        let r = self.remotes.remove(&(vni, ip))?;
        self.index.remove(&(vni, ip));
        if let Some(n) = self.vteps.get_mut(&r.vtep) {
            *n -= 1;
            if *n == 0 {
                self.vteps.remove(&r.vtep);
            }
        }
        Some(r)
    }

    pub fn remote(&self, vni: u32, ip: Ipv4Addr) -> Option<&RemoteVm> {
        self.remotes.get(&(vni, ip))
    }

    /// Remove network `vni`; refused while a VM or remote endpoint is in it.
    pub fn remove_network(&mut self, vni: u32) -> Result<Network, TopologyError> {
        if let Some(v) = self.vms.values().find(|v| v.vni.get() == vni) {
            return Err(TopologyError::NetworkInUse {
                vni,
                user: format!("vm {}", v.name),
            });
        }
        if let Some(r) = self.remotes.values().find(|r| r.vni.get() == vni) {
            return Err(TopologyError::NetworkInUse {
                vni,
                user: format!("remote {}", r.ip),
            });
        }
        let n = self.networks.remove(&vni).ok_or(TopologyError::NotFound {
            object: format!("network {vni}"),
        })?;
        self.index.retain(|(v, _), _| *v != vni);
        Ok(n)
    }

    /// Replace network `n.vni` (subnets, gateways, DHCP options, routes):
    /// refused if an address in use would fall outside every subnet.
    /// Returns the old definition.
    pub fn change_network(&mut self, n: Network) -> Result<Network, TopologyError> {
        let vni = n.vni.get();
        let old = self.networks.remove(&vni).ok_or(TopologyError::NotFound {
            object: format!("network {vni}"),
        })?;
        let inside = |ip: &Ipv4Addr| n.subnets.iter().any(|s| s.cidr.contains(*ip));
        let stranded = self
            .vms
            .values()
            .filter(|v| v.vni.get() == vni)
            .flat_map(|v| v.ips.iter().map(move |ip| (*ip, format!("vm {}", v.name))))
            .chain(
                self.remotes
                    .values()
                    .filter(|r| r.vni.get() == vni)
                    .map(|r| (r.ip, "a remote endpoint".to_string())),
            )
            .find(|(ip, _)| !inside(ip));
        let gateways: Vec<Ipv4Addr> = old.subnets.iter().map(|s| s.gateway).collect();
        for g in &gateways {
            self.index.remove(&(vni, *g));
        }
        let taken = n.subnets.iter().find_map(|s| {
            self.owner(vni, s.gateway)
                .map(|other| TopologyError::DuplicateIp {
                    object: format!("network {vni}: gateway"),
                    ip: s.gateway,
                    vni,
                    other,
                })
        });
        let refused = match (stranded, taken) {
            (Some((ip, user)), _) => Err(TopologyError::WouldStrand { vni, ip, user }),
            (None, Some(e)) => Err(e),
            (None, None) => self.add_network(n),
        };
        if let Err(e) = refused {
            // Put the old one back exactly.
            for s in &old.subnets {
                self.index.insert(
                    (vni, s.gateway),
                    Endpoint::Gateway {
                        mac: old.gateway_mac,
                    },
                );
            }
            self.networks.insert(vni, old);
            return Err(e);
        }
        Ok(old)
    }

    /// Record (or replace) the next-hop MAC towards `vtep`.
    pub fn set_neighbor(&mut self, vtep: Ipv4Addr, mac: Mac) {
        self.neighbors.insert(vtep, mac);
    }

    /// Forget the next hop towards `vtep` (the kernel lost it).
    pub fn remove_neighbor(&mut self, vtep: Ipv4Addr) {
        self.neighbors.remove(&vtep);
    }

    pub fn neighbor(&self, vtep: Ipv4Addr) -> Option<Mac> {
        self.neighbors.get(&vtep).copied()
    }

    pub fn vm_on(&self, port: PortId) -> Option<&LocalVm> {
        self.vms.get(&port)
    }

    pub fn network(&self, vni: u32) -> Option<&Network> {
        self.networks.get(&vni)
    }

    pub fn lookup(&self, vni: u32, ip: Ipv4Addr) -> Option<Endpoint> {
        self.index.get(&(vni, ip)).copied()
    }

    /// The subnet of network `vni` that holds `ip`.
    pub fn subnet_of(&self, vni: u32, ip: Ipv4Addr) -> Option<&Subnet> {
        self.networks
            .get(&vni)?
            .subnets
            .iter()
            .find(|s| s.cidr.contains(ip))
    }

    /// The longest static route of network `vni` containing `dst`.
    pub fn route(&self, vni: u32, dst: Ipv4Addr) -> Option<Route> {
        self.networks
            .get(&vni)?
            .routes
            .iter()
            .filter(|r| r.cidr.contains(dst))
            .max_by_key(|r| r.cidr.len)
            .copied()
    }

    pub fn vms(&self) -> impl Iterator<Item = &LocalVm> {
        self.vms.values()
    }

    pub fn remotes(&self) -> impl Iterator<Item = &RemoteVm> {
        self.remotes.values()
    }

    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values()
    }

    /// VTEPs that remote endpoints live behind (for neighbour resolution).
    pub fn remote_vteps(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<_> = self.vteps.keys().copied().collect();
        v.extend(self.networks.values().filter_map(|n| n.gateway_vtep));
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn vni(n: u32) -> Vni {
        Vni::new(n).unwrap()
    }

    fn net() -> Network {
        Network {
            vni: vni(100),
            subnets: vec![Subnet {
                cidr: "10.0.0.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            }],
            gateway_mac: [2, 0, 0, 0, 0, 0xfe],
            dns: vec![],
            lease_secs: 3600,
            routes: vec![],
            gateway_vtep: None,
            snat: false,
        }
    }

    fn topo() -> Topology {
        let mut t = Topology::new(Some(Uplink {
            port: PortId(0),
            mac: [2, 0, 0, 0, 0, 0xaa],
            local_vtep: Ipv4Addr::new(192, 168, 0, 1),
            mtu: 1500,
            ttl: 64,
        }));
        t.add_network(net()).unwrap();
        t
    }

    fn vm(name: &str, port: u16, ip: [u8; 4]) -> LocalVm {
        LocalVm {
            name: name.into(),
            port: PortId(port),
            mac: [2, 0, 0, 0, 0, u8::try_from(port).unwrap()],
            ips: vec![Ipv4Addr::from(ip)],
            vni: vni(100),
            hostname: None,
            groups: vec![],
            floating_ip: None,
        }
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 1, 255, 3)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 0)));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 1, 255, 255));
        assert!(c.overlaps(&"10.1.4.0/24".parse().unwrap()));
        assert!(!c.overlaps(&"10.2.0.0/16".parse().unwrap()));
        assert!("10.1.0.1/16".parse::<Cidr>().is_err(), "host bits set");
        assert!("10.1.0.0/33".parse::<Cidr>().is_err());
        assert!("10.1.0.0".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn errors_name_the_object_and_the_problem() {
        let mut t = topo();
        assert_eq!(
            t.add_network(net()),
            Err(TopologyError::DuplicateNetwork { vni: 100 })
        );
        let mut bad = net();
        bad.vni = vni(7);
        bad.subnets.push(Subnet {
            cidr: "10.0.0.128/25".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 129),
        });
        assert!(matches!(
            t.add_network(bad),
            Err(TopologyError::OverlappingSubnets { vni: 7, .. })
        ));
        t.add_vm(vm("a", 1, [10, 0, 0, 5])).unwrap();
        let e = t.add_vm(vm("b", 1, [10, 0, 0, 6])).unwrap_err();
        assert_eq!(e.to_string(), "vm b: port 1 is already used by vm a");
        let e = t.add_vm(vm("c", 2, [10, 0, 0, 5])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm c: address 10.0.0.5 in network 100 is already used by vm a"
        );
        let e = t.add_vm(vm("d", 3, [10, 9, 0, 5])).unwrap_err();
        assert!(
            e.to_string()
                .contains("field `ips`: 10.9.0.5 is not inside any subnet"),
            "{e}"
        );
        let e = t.add_vm(vm("e", 0, [10, 0, 0, 7])).unwrap_err();
        assert_eq!(
            e,
            TopologyError::UplinkPort {
                name: "e".into(),
                port: 0
            }
        );
        let e = t.add_vm(vm("f", 4, [10, 0, 0, 1])).unwrap_err();
        assert!(e.to_string().contains("already used by the gateway"), "{e}");
        let mut g = vm("g", 5, [10, 0, 0, 9]);
        g.mac = [1, 0, 0, 0, 0, 1];
        assert!(matches!(t.add_vm(g), Err(TopologyError::BadMac { .. })));
        let mut h = vm("h", 6, [10, 0, 0, 9]);
        h.vni = vni(5);
        assert!(matches!(
            t.add_vm(h),
            Err(TopologyError::UnknownNetwork { vni: 5, .. })
        ));
        // Failed adds changed nothing.
        assert_eq!(t.vms().count(), 1);
        assert_eq!(t.lookup(100, Ipv4Addr::new(10, 0, 0, 9)), None);
    }

    #[test]
    fn lookups_find_vms_remotes_and_gateways() {
        let mut t = topo();
        t.add_vm(vm("a", 1, [10, 0, 0, 5])).unwrap();
        t.add_remote(RemoteVm {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            mac: [2, 1, 0, 0, 0, 9],
            vni: vni(100),
            vtep: Ipv4Addr::new(192, 168, 0, 2),
            groups: vec![],
        })
        .unwrap();
        assert_eq!(
            t.lookup(100, Ipv4Addr::new(10, 0, 0, 5)),
            Some(Endpoint::Local {
                port: PortId(1),
                mac: [2, 0, 0, 0, 0, 1]
            })
        );
        assert!(matches!(
            t.lookup(100, Ipv4Addr::new(10, 0, 0, 9)),
            Some(Endpoint::Remote { .. })
        ));
        assert!(matches!(
            t.lookup(100, Ipv4Addr::new(10, 0, 0, 1)),
            Some(Endpoint::Gateway { .. })
        ));
        assert_eq!(
            t.lookup(101, Ipv4Addr::new(10, 0, 0, 5)),
            None,
            "networks are isolated"
        );
        assert_eq!(t.remote_vteps(), vec![Ipv4Addr::new(192, 168, 0, 2)]);
    }
}
