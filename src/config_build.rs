//! Building the switch's objects from a parsed configuration: the
//! topology, the security-group policy, conntrack's limits and timeouts.
//! Every reference, overlap and duplicate is checked here, and an error
//! names the object and field at fault (`config` holds the types and the
//! parsing).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use coprocessor::acl::{Direction, Peer, Policy, Rule, SecurityGroup};
use coprocessor::conntrack::{Limits, Timeouts};
use coprocessor::health::HealthSpec;
use coprocessor::services::{BackendSpec, ServiceSpec, Services};
use coprocessor::topology::{
    Cidr, External, LocalVm, Network, RemoteVm, Route, Subnet, Topology, Uplink, Via,
};
use flowtable::{PortId, Vni};

use crate::config::*;

/// Fast-path threads at most (each a bit in a connection's "installed on"
/// set, and a table of `flow_capacity` each).
pub const MAX_FASTPATH_THREADS: usize = 32;

impl ConntrackConfig {
    /// Checked limits and timeouts.
    pub fn build(&self) -> Result<(Timeouts, Limits)> {
        if self.max == 0 || self.per_vm == 0 {
            bail!("conntrack: fields `max` and `per_vm` must be at least 1");
        }
        let mut t = Timeouts::default();
        for (name, v, slot) in [
            ("tcp_syn_s", self.tcp_syn_s, &mut t.tcp_syn),
            (
                "tcp_established_s",
                self.tcp_established_s,
                &mut t.tcp_established,
            ),
            ("tcp_closing_s", self.tcp_closing_s, &mut t.tcp_closing),
            ("tcp_closed_s", self.tcp_closed_s, &mut t.tcp_closed),
            ("udp_first_s", self.udp_first_s, &mut t.udp_first),
            ("udp_stream_s", self.udp_stream_s, &mut t.udp_stream),
            ("icmp_s", self.icmp_s, &mut t.icmp),
        ] {
            if v == 0 || v > 30 * 24 * 3600 {
                bail!("conntrack: field `{name}`: {v} is not in 1..=2592000 seconds");
            }
            *slot = v * 1_000_000_000;
        }
        Ok((
            t,
            Limits {
                max: self.max,
                per_vm: self.per_vm,
            },
        ))
    }
}

impl ServiceConfig {
    /// The service; checked against the topology where it is added.
    pub fn build(&self, at: &str) -> Result<ServiceSpec> {
        let proto = match self.protocol.as_str() {
            "tcp" => 6,
            "udp" => 17,
            other => bail!("{at}: field `protocol`: {other:?} is not tcp or udp"),
        };
        if self.backends.len() > coprocessor::maglev::MAX_BACKENDS {
            bail!(
                "{at}: field `backends`: {} backends, at most {}",
                self.backends.len(),
                coprocessor::maglev::MAX_BACKENDS
            );
        }
        Ok(ServiceSpec {
            name: self.name.clone(),
            vni: self.network,
            vip: self.vip,
            proto,
            port: self.port,
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    ip: b.ip,
                    port: b.port,
                    weight: b.weight,
                })
                .collect(),
            max_connections: self.max_connections,
            health: self
                .health
                .as_ref()
                .map(|h| -> Result<HealthSpec> {
                    let tcp = match h.protocol.as_str() {
                        "tcp" => true,
                        "icmp" => false,
                        other => {
                            bail!("{at}: field `health.protocol`: {other:?} is not tcp or icmp")
                        }
                    };
                    let spec = HealthSpec {
                        tcp,
                        interval_ms: h.interval_ms,
                        timeout_ms: h.timeout_ms,
                        rise: h.rise,
                        fall: h.fall,
                    };
                    spec.check().map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                    Ok(spec)
                })
                .transpose()?,
            external_vip: self.external_vip,
        })
    }
}

/// Everything the coprocessors start from.
#[derive(Debug, Clone)]
pub struct Built {
    pub topo: Topology,
    pub policy: Policy,
    /// Checked against `topo`.
    pub services: Services,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

/// "80" or "1000-2000".
fn parse_range(s: &str) -> Option<(u16, u16)> {
    match s.split_once('-') {
        Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        None => {
            let p = s.trim().parse().ok()?;
            Some((p, p))
        }
    }
}

fn parse_proto(s: &str) -> Option<Option<u8>> {
    match s {
        "any" => Some(None),
        "tcp" => Some(Some(6)),
        "udp" => Some(Some(17)),
        "icmp" => Some(Some(1)),
        n => n.parse().ok().map(Some),
    }
}

/// Group name → id, for resolving `security_groups`.
pub type GroupIds<'a> = &'a dyn Fn(&str) -> Option<u16>;

fn resolve_groups(at: &str, names: &[String], ids: GroupIds) -> Result<Vec<u16>> {
    names
        .iter()
        .map(|n| {
            ids(n).with_context(|| format!("{at}: field `security_groups`: no group named {n}"))
        })
        .collect()
}

impl ExternalConfig {
    /// The external network, or an error naming the field.
    pub fn build(&self, ids: &HashMap<String, PortId>) -> Result<External> {
        let e = self;
        let port = *ids.get(&e.port).with_context(|| {
            format!(
                "external: field `port`: {:?} is not a configured port",
                e.port
            )
        })?;
        let cidr: Cidr = e
            .cidr
            .parse()
            .map_err(|err| anyhow::anyhow!("external: field `cidr`: {err}"))?;
        for a in &e.snat {
            if !cidr.contains(*a) || *a == cidr.addr || *a == cidr.broadcast() {
                bail!("external: field `snat`: {a} is not a host address of {cidr}");
            }
        }
        if let Some(g) = e.gateway {
            if !cidr.contains(g) {
                bail!("external: field `gateway`: {g} is not inside {cidr}");
            }
        }
        let ports = parse_range(&e.snat_ports)
            .filter(|(a, b)| a <= b && *a > 0)
            .with_context(|| {
                format!(
                    "external: field `snat_ports`: {:?} is not LOW-HIGH within 1..=65535",
                    e.snat_ports
                )
            })?;
        if e.per_vm_ports == 0 {
            bail!("external: field `per_vm_ports`: must be at least 1");
        }
        let mac = match &e.mac {
            Some(m) => parse_mac(m)
                .filter(|m| m[0] & 1 == 0)
                .with_context(|| format!("external: field `mac`: {m:?} is not a unicast MAC"))?,
            None => {
                let a = e.snat.first().copied().unwrap_or(cidr.addr).octets();
                [0x02, 0xee, a[0], a[1], a[2], a[3]]
            }
        };
        Ok(External {
            port,
            mac,
            cidr,
            gateway: e.gateway,
            snat: e.snat.clone(),
            ports,
            per_vm_ports: e.per_vm_ports,
        })
    }
}

impl NetworkConfig {
    /// The network, or an error naming `at` and the field.
    pub fn build(&self, at: &str) -> Result<Network> {
        let n = self;
        let vni = Vni::new(n.vni)
            .with_context(|| format!("{at}: field `vni`: {} does not fit in 24 bits", n.vni))?;
        let at = format!("{at} (vni {})", n.vni);
        let gateway_mac = parse_mac(&n.gateway_mac).with_context(|| {
            format!(
                "{at}: field `gateway_mac`: {:?} is not a MAC address",
                n.gateway_mac
            )
        })?;
        let mut subnets = Vec::new();
        for (j, sn) in n.subnets.iter().enumerate() {
            let cidr: Cidr = sn
                .cidr
                .parse()
                .map_err(|e| anyhow::anyhow!("{at}: subnet[{j}]: field `cidr`: {e}"))?;
            subnets.push(Subnet {
                cidr,
                gateway: sn.gateway,
            });
        }
        if n.lease_s < 60 {
            bail!("{at}: field `lease_s`: {} is below 60 seconds", n.lease_s);
        }
        let mut routes = Vec::new();
        for (j, r) in n.routes.iter().enumerate() {
            let at = || format!("{at}: route[{j}]");
            let cidr: Cidr = r
                .cidr
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: field `cidr`: {e}", at()))?;
            let via = match r.via.as_str() {
                "gateway-vtep" if n.gateway_vtep.is_some() => Via::GatewayVtep,
                "gateway-vtep" => bail!(
                    "{}: field `via`: \"gateway-vtep\" but the network has no `gateway_vtep`",
                    at()
                ),
                ip => {
                    let ip: Ipv4Addr = ip.parse().map_err(|_| {
                        anyhow::anyhow!(
                            "{}: field `via`: {ip:?} is neither a VM address nor \"gateway-vtep\"",
                            at()
                        )
                    })?;
                    if !subnets.iter().any(|s: &Subnet| s.cidr.contains(ip)) {
                        bail!(
                            "{}: field `via`: {ip} is not inside the network's subnets",
                            at()
                        );
                    }
                    Via::Vm(ip)
                }
            };
            routes.push(Route { cidr, via });
        }
        Ok(Network {
            vni,
            subnets,
            gateway_mac,
            dns: n.dns.clone(),
            lease_secs: n.lease_s,
            routes,
            gateway_vtep: n.gateway_vtep,
            snat: n.snat,
        })
    }
}

impl VmConfig {
    /// The VM, its port and groups resolved, or an error naming `at`
    /// and the field.
    pub fn build(
        &self,
        at: &str,
        ports: &HashMap<String, PortId>,
        groups: GroupIds,
    ) -> Result<LocalVm> {
        let v = self;
        let port = *ports.get(&v.port).with_context(|| {
            format!("{at}: field `port`: {:?} is not a configured port", v.port)
        })?;
        let mac = parse_mac(&v.mac)
            .with_context(|| format!("{at}: field `mac`: {:?} is not a MAC address", v.mac))?;
        let vni = Vni::new(v.network)
            .with_context(|| format!("{at}: field `network`: {} is not a VNI", v.network))?;
        Ok(LocalVm {
            name: v.name.clone(),
            port,
            mac,
            ips: v.ips.clone(),
            vni,
            hostname: v.hostname.clone(),
            groups: resolve_groups(at, &v.security_groups, groups)?,
            floating_ip: v.floating_ip,
        })
    }
}

impl RemoteConfig {
    /// The remote endpoint, or an error naming `at()` and the field (the
    /// name is made only on error: bulk requests carry many).
    pub fn build(&self, at: &dyn Fn() -> String, groups: GroupIds) -> Result<RemoteVm> {
        let r = self;
        let mac = parse_mac(&r.mac)
            .with_context(|| format!("{}: field `mac`: {:?} is not a MAC address", at(), r.mac))?;
        let vni = Vni::new(r.network)
            .with_context(|| format!("{}: field `network`: {} is not a VNI", at(), r.network))?;
        let groups = if r.security_groups.is_empty() {
            Vec::new()
        } else {
            resolve_groups(&at(), &r.security_groups, groups)?
        };
        Ok(RemoteVm {
            ip: r.ip,
            mac,
            vni,
            vtep: r.vtep,
            groups,
        })
    }
}

impl SecurityGroupConfig {
    /// The group, or an error naming `at`, the rule and the field.
    pub fn build(&self, at: &str) -> Result<SecurityGroup> {
        let mut rules = Vec::new();
        for (j, r) in self.rules.iter().enumerate() {
            let at = || format!("{at} ({}): rule[{j}]", self.name);
            rules.push(r.build().map_err(|e| anyhow::anyhow!("{}: {e}", at()))?);
        }
        Ok(SecurityGroup {
            name: self.name.clone(),
            rules,
        })
    }
}

impl RuleConfig {
    /// The rule, or an error naming the field.
    pub fn build(&self) -> Result<Rule, String> {
        let proto = parse_proto(&self.protocol).ok_or_else(|| {
            format!(
                "field `protocol`: {:?} is not tcp, udp, icmp, any or a number",
                self.protocol
            )
        })?;
        let ports = match &self.ports {
            None => (0, u16::MAX),
            Some(PortsConfig::One(p)) => (*p, *p),
            Some(PortsConfig::Text(p)) => parse_range(p)
                .filter(|(a, b)| a <= b)
                .ok_or_else(|| format!("field `ports`: {p:?} is not PORT or LOW-HIGH"))?,
        };
        let peer = match (&self.cidr, &self.remote_group) {
            (Some(_), Some(_)) => {
                return Err("fields `cidr` and `remote_group`: give one, not both".into())
            }
            (Some(c), None) => Peer::Cidr(c.parse().map_err(|e| format!("field `cidr`: {e}"))?),
            (None, Some(g)) => Peer::Group(g.clone()),
            (None, None) => Peer::Cidr(Cidr::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or(Cidr {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            })),
        };
        Ok(Rule {
            direction: match self.direction {
                DirectionConfig::Ingress => Direction::Ingress,
                DirectionConfig::Egress => Direction::Egress,
            },
            proto,
            ports,
            peer,
        })
    }
}

impl Config {
    /// Check the whole configuration and build the coprocessor's view of it.
    pub fn topology(&self) -> Result<Topology> {
        Ok(self.build()?.topo)
    }

    /// Check the whole configuration and build everything the
    /// coprocessors start from.
    pub fn build(&self) -> Result<Built> {
        let s = &self.switch;
        if s.coprocessor_threads == 0 || s.coprocessor_threads > 64 {
            bail!(
                "switch: field `coprocessor_threads`: {} is not in 1..=64",
                s.coprocessor_threads
            );
        }
        if s.flow_capacity == 0 || s.flow_capacity > flowtable::MAX_CAPACITY {
            bail!(
                "switch: field `flow_capacity`: {} is not in 1..={}",
                s.flow_capacity,
                flowtable::MAX_CAPACITY
            );
        }
        if let Some(n) = s.flow_share_per_port {
            if n == 0 || n > s.flow_capacity {
                bail!(
                    "switch: field `flow_share_per_port`: {n} is not in 1..={} (flow_capacity)",
                    s.flow_capacity
                );
            }
        }
        if s.fastpath_threads == 0 || s.fastpath_threads > MAX_FASTPATH_THREADS {
            bail!(
                "switch: field `fastpath_threads`: {} is not in 1..={MAX_FASTPATH_THREADS}",
                s.fastpath_threads
            );
        }
        match &s.fastpath_cores {
            Some(c) if c.is_empty() => {
                bail!("switch: field `fastpath_cores`: empty (leave it out for the default)")
            }
            Some(c) if c.len() > s.fastpath_threads => bail!(
                "switch: field `fastpath_cores`: {} cores for {} fast-path thread{}: give one per thread at most (raise `fastpath_threads` to use them)",
                c.len(),
                s.fastpath_threads,
                if s.fastpath_threads == 1 { "" } else { "s" }
            ),
            _ => {}
        }
        if s.coprocessor_cores.as_ref().is_some_and(Vec::is_empty) {
            bail!("switch: field `coprocessor_cores`: empty (leave it out for the default)");
        }
        if s.coprocessor_spin_us > 10_000 {
            bail!(
                "switch: field `coprocessor_spin_us`: {} is above 10000 (a coprocessor spinning that long is a core lost)",
                s.coprocessor_spin_us
            );
        }
        if s.idle_timeout_s == 0 {
            bail!("switch: field `idle_timeout_s`: must be at least 1");
        }
        if let Some(m) = s.metrics {
            if !m.ip().is_loopback() {
                bail!("switch: field `metrics`: {m} is not a loopback address (metrics are served on localhost only)");
            }
        }
        if let Some(u) = &self.uplink {
            if u.mtu < 1280 || u.mtu > 9216 {
                bail!("uplink: field `mtu`: {} is not in 1280..=9216", u.mtu);
            }
            if u.vtep.is_unspecified() || u.vtep.is_multicast() || u.vtep.is_broadcast() {
                bail!("uplink: field `vtep`: {} is not a unicast address", u.vtep);
            }
            if self.ports.iter().any(|p| p.name == u.interface) {
                bail!(
                    "uplink: field `interface`: {:?} is also configured as a VM port",
                    u.interface
                );
            }
        }
        let ids = self.port_ids()?;
        // The uplink's MAC is the interface's; the daemon reads it.
        // The uplink's id follows the VM ports'; u16::MAX is "no port".
        let uplink_id = u16::try_from(self.ports.len())
            .ok()
            .filter(|&id| id < u16::MAX)
            .context("field `port`: too many ports (the uplink needs an id too)")?;
        let uplink = self.uplink.as_ref().map(|u| Uplink {
            port: PortId(uplink_id),
            mac: [0; 6],
            local_vtep: u.vtep,
            mtu: u.mtu,
            ttl: 64,
        });
        let mut topo = Topology::new(uplink);
        let groups = self
            .security_groups
            .iter()
            .enumerate()
            .map(|(i, g)| g.build(&format!("security_group[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let mut policy = Policy::new(groups).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (timeouts, limits) = self.conntrack.build()?;
        if let Some(e) = &self.external {
            topo.external = Some(e.build(&ids)?);
        }
        for (i, n) in self.networks.iter().enumerate() {
            let at = format!("network[{i}]");
            topo.add_network(n.build(&at)?)
                .with_context(|| at.clone())?;
        }
        for (i, v) in self.vms.iter().enumerate() {
            let at = format!("vm[{i}] ({})", v.name);
            let vm = v.build(&at, &ids, &|g| policy.id(g))?;
            if topo.external.as_ref().is_some_and(|e| e.port == vm.port) {
                bail!(
                    "{at}: field `port`: {:?} is the external network's port",
                    v.port
                );
            }
            for g in &vm.groups {
                for ip in &vm.ips {
                    policy.add_member(*g, v.network, *ip);
                }
            }
            topo.add_vm(vm).with_context(|| format!("vm[{i}]"))?;
        }
        for (i, r) in self.remotes.iter().enumerate() {
            let rv = r.build(&|| format!("remote[{i}] ({})", r.ip), &|g| policy.id(g))?;
            for g in &rv.groups {
                policy.add_member(*g, r.network, r.ip);
            }
            topo.add_remote(rv)
                .with_context(|| format!("remote[{i}]"))?;
        }
        let mut services = Services::default();
        for (i, c) in self.services.iter().enumerate() {
            let at = format!("service[{i}] ({})", c.name);
            let spec = c.build(&at)?;
            services
                .check(&spec, &topo, None)
                .and_then(|()| services.insert(spec).map(drop))
                .map_err(|e| anyhow::anyhow!("{at}: {}", e.what))?;
        }
        Ok(Built {
            topo,
            policy,
            services,
            timeouts,
            limits,
        })
    }
}
