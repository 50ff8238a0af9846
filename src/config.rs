//! The TOML configuration: what the switch is at start.
//!
//! Parsing refuses unknown fields and wrong types (serde names the field,
//! line and column); [`Config::topology`] then checks meaning — references,
//! overlaps, duplicates — and names the object and field at fault. The
//! daemon refuses to start on any error rather than run half-configured.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use coprocessor::acl::{Direction, Peer, Policy, Rule, SecurityGroup};
use coprocessor::conntrack::{Limits, Timeouts};
use coprocessor::topology::{
    Cidr, External, LocalVm, Network, RemoteVm, Route, Subnet, Topology, Uplink, Via,
};
use flowtable::{Mac, PortId, Vni};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub switch: SwitchConfig,
    pub uplink: Option<UplinkConfig>,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkConfig>,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    #[serde(default, rename = "remote")]
    pub remotes: Vec<RemoteConfig>,
    #[serde(default, rename = "security_group")]
    pub security_groups: Vec<SecurityGroupConfig>,
    pub external: Option<ExternalConfig>,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
}

/// A security group: rules, checked in order, first match admits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupConfig {
    pub name: String,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectionConfig {
    Ingress,
    Egress,
}

/// One rule. The peer is `cidr` or `remote_group` (neither: anywhere).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub direction: DirectionConfig,
    /// "tcp", "udp", "icmp", "any" or a protocol number.
    #[serde(default = "any")]
    pub protocol: String,
    /// 80, "80", "1000-2000" (ICMP: types); all if absent.
    #[serde(default)]
    pub ports: Option<PortsConfig>,
    #[serde(default)]
    pub cidr: Option<String>,
    #[serde(default)]
    pub remote_group: Option<String>,
}

/// A port as a number, or a range as text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortsConfig {
    One(u16),
    Text(String),
}

fn any() -> String {
    "any".into()
}

/// The external (provider) network: SNAT and floating IPs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// A `[[port]]` facing the external network.
    pub port: String,
    /// Our MAC on it (default: derived from the first address).
    #[serde(default)]
    pub mac: Option<String>,
    /// The external subnet.
    pub cidr: String,
    /// Next hop for destinations outside `cidr`.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// SNAT addresses.
    #[serde(default)]
    pub snat: Vec<Ipv4Addr>,
    /// SNAT port range, "lo-hi".
    #[serde(default = "default_snat_ports")]
    pub snat_ports: String,
    /// SNAT ports one VM may hold.
    #[serde(default = "default_per_vm_ports")]
    pub per_vm_ports: u32,
}

fn default_snat_ports() -> String {
    "1024-65535".into()
}

fn default_per_vm_ports() -> u32 {
    8192
}

/// Connection tracking limits and timeouts (seconds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    pub max: usize,
    pub per_vm: u32,
    pub tcp_syn_s: u64,
    pub tcp_established_s: u64,
    pub tcp_closing_s: u64,
    pub tcp_closed_s: u64,
    pub udp_first_s: u64,
    pub udp_stream_s: u64,
    pub icmp_s: u64,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        let t = Timeouts::default();
        let l = Limits::default();
        let s = |ns: u64| ns / 1_000_000_000;
        ConntrackConfig {
            max: l.max,
            per_vm: l.per_vm,
            tcp_syn_s: s(t.tcp_syn),
            tcp_established_s: s(t.tcp_established),
            tcp_closing_s: s(t.tcp_closing),
            tcp_closed_s: s(t.tcp_closed),
            udp_first_s: s(t.udp_first),
            udp_stream_s: s(t.udp_stream),
            icmp_s: s(t.icmp),
        }
    }
}

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

/// Everything the coprocessors start from.
#[derive(Debug, Clone)]
pub struct Built {
    pub topo: Topology,
    pub policy: Policy,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Poll {
    Busy,
    Adaptive,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwitchConfig {
    pub poll: Poll,
    pub coprocessor_threads: usize,
    pub flow_capacity: usize,
    /// Flows one VM port may hold in the flow table; beyond it its new
    /// flows go packet by packet through the slow path (and its punt
    /// budget), never another tenant's. Default: a sixteenth of
    /// `flow_capacity`.
    pub flow_share_per_port: Option<usize>,
    pub idle_timeout_s: u64,
    pub control_socket: PathBuf,
    pub punt_rate: u64,
    pub punt_burst: u64,
    pub log: String,
    /// Prometheus metrics at http://ADDR/metrics (a loopback address).
    pub metrics: Option<std::net::SocketAddr>,
}

impl SwitchConfig {
    /// Flows one VM port may hold (see `flow_share_per_port`).
    pub fn flow_share(&self) -> usize {
        self.flow_share_per_port
            .unwrap_or((self.flow_capacity / 16).max(1))
    }
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            poll: Poll::Busy,
            coprocessor_threads: 1,
            flow_capacity: 1 << 20,
            flow_share_per_port: None,
            idle_timeout_s: 30,
            control_socket: PathBuf::from("/run/vswitch/vswitch.sock"),
            punt_rate: 10_000,
            punt_burst: 256,
            log: "info".into(),
            metrics: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    pub interface: String,
    pub vtep: Ipv4Addr,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

fn default_mtu() -> u16 {
    1500
}

fn default_lease() -> u32 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortType {
    /// A tap device (created, or attached if it exists).
    Tap,
    /// AF_XDP on the switch's end of a veth pair whose other end is the VM's.
    AfXdp,
    /// A virtio-net device served over a vhost-user socket (QEMU:
    /// `-chardev socket,path=…` and `-netdev vhost-user`).
    VhostUser,
}

/// Who listens on a vhost-user port's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VhostMode {
    /// The switch listens; the VMM connects (and must reconnect if the
    /// switch restarts).
    #[default]
    Server,
    /// The VMM listens (QEMU `-chardev socket,path=…,server=on`); the
    /// switch connects, and again whenever the connection ends, so a
    /// restarted switch finds its running VMs.
    Client,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PortType,
    /// vhost-user: the Unix socket between the switch and the VMM.
    #[serde(default)]
    pub socket: Option<std::path::PathBuf>,
    /// vhost-user: which side listens on `socket` (default: the switch).
    #[serde(default)]
    pub mode: Option<VhostMode>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    pub cidr: String,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub vni: u32,
    pub gateway_mac: String,
    /// DNS servers handed out by DHCP (at most 3).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// DHCP lease time in seconds.
    #[serde(default = "default_lease")]
    pub lease_s: u32,
    /// Where traffic for addresses this host does not know goes.
    #[serde(default)]
    pub gateway_vtep: Option<Ipv4Addr>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(rename = "subnet")]
    pub subnets: Vec<SubnetConfig>,
    /// VMs may reach the external network through SNAT.
    #[serde(default)]
    pub snat: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub cidr: String,
    /// A VM address of the network, or "gateway-vtep".
    pub via: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub port: String,
    pub mac: String,
    pub ips: Vec<Ipv4Addr>,
    pub network: u32,
    /// Handed out by DHCP if set.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Security groups; none: the VM is not filtered.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// An external address mapped 1:1 to the VM's first address.
    #[serde(default)]
    pub floating_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub network: u32,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub vtep: Ipv4Addr,
    /// Its security groups (for remote-group rules).
    #[serde(default)]
    pub security_groups: Vec<String>,
}

/// Parse "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

impl Config {
    pub fn parse(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The config at `path` and its text.
    pub fn load_text(path: &std::path::Path) -> Result<(Config, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let c = Config::parse(&text).with_context(|| format!("config {}", path.display()))?;
        Ok((c, text))
    }

    pub fn load(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Port ids: VM ports in config order from 0.
    pub fn port_ids(&self) -> Result<HashMap<String, PortId>> {
        let mut ids = HashMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            let id = PortId(u16::try_from(i).context("too many ports")?);
            if ids.insert(p.name.clone(), id).is_some() {
                bail!(
                    "port[{i}]: field `name`: {:?} is used by an earlier port",
                    p.name
                );
            }
            match (p.kind, &p.socket) {
                (PortType::VhostUser, None) => bail!(
                    "port[{i}] ({}): field `socket`: a vhost-user port needs the path of its socket",
                    p.name
                ),
                (PortType::Tap | PortType::AfXdp, Some(_)) => bail!(
                    "port[{i}] ({}): field `socket`: only vhost-user ports have one",
                    p.name
                ),
                _ => {}
            }
            if p.kind != PortType::VhostUser && p.mode.is_some() {
                bail!(
                    "port[{i}] ({}): field `mode`: only vhost-user ports have one",
                    p.name
                );
            }
        }
        Ok(ids)
    }

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
        Ok(Built {
            topo,
            policy,
            timeouts,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [switch]
        poll = "adaptive"
        control_socket = "/tmp/x.sock"

        [[port]]
        name = "tap-a"
        type = "tap"
        [[port]]
        name = "tap-b"
        type = "tap"

        [[network]]
        vni = 100
        gateway_mac = "02:00:00:00:00:fe"
        [[network.subnet]]
        cidr = "10.0.0.0/24"
        gateway = "10.0.0.1"

        [[vm]]
        name = "a"
        port = "tap-a"
        mac = "02:00:00:00:00:0a"
        ips = ["10.0.0.10"]
        network = 100
        [[vm]]
        name = "b"
        port = "tap-b"
        mac = "02:00:00:00:00:0b"
        ips = ["10.0.0.11"]
        network = 100
    "#;

    fn err(text: &str) -> String {
        match Config::parse(text).and_then(|c| c.topology().map(|_| ())) {
            Ok(()) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_good_config_builds_its_topology() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.switch.poll, Poll::Adaptive);
        let t = c.topology().unwrap();
        assert_eq!(t.vms().count(), 2);
        assert_eq!(c.port_ids().unwrap()["tap-b"], PortId(1));
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&GOOD.replace("poll = \"adaptive\"", "poll = \"adaptive\"\nspeed = 3"));
        assert!(e.contains("unknown field `speed`"), "{e}");
        let e = err(&GOOD.replace("vni = 100", "vni = \"x\""));
        assert!(e.contains("vni"), "{e}");
        let e = err(&GOOD.replace("port = \"tap-b\"", "port = \"tap-z\""));
        assert!(
            e.contains("vm[1] (b): field `port`: \"tap-z\" is not a configured port"),
            "{e}"
        );
        let e = err(&GOOD.replace("mac = \"02:00:00:00:00:0b\"", "mac = \"02:00:00\""));
        assert!(e.contains("vm[1] (b): field `mac`"), "{e}");
        let e = err(&GOOD.replace("ips = [\"10.0.0.11\"]", "ips = [\"10.0.0.10\"]"));
        assert!(e.contains("already used by vm a"), "{e}");
        let e = err(&GOOD.replace("cidr = \"10.0.0.0/24\"", "cidr = \"10.0.0.1/24\""));
        assert!(e.contains("subnet[0]: field `cidr`"), "{e}");
        let e = err(&GOOD.replace("vni = 100", "vni = 16777216"));
        assert!(e.contains("network[0]: field `vni`"), "{e}");
        let up = |extra: &str| {
            format!("{GOOD}\n[uplink]\ninterface = \"eth1\"\nvtep = \"192.168.0.1\"\n{extra}")
        };
        let e = err(&up("mtu = 100"));
        assert!(
            e.contains("uplink: field `mtu`: 100 is not in 1280..=9216"),
            "{e}"
        );
        let e = err(&up("").replace("interface = \"eth1\"", "interface = \"tap-a\""));
        assert!(
            e.contains("uplink: field `interface`: \"tap-a\" is also configured as a VM port"),
            "{e}"
        );
        let e = err(&up("").replace("vtep = \"192.168.0.1\"", "vtep = \"224.0.0.1\""));
        assert!(e.contains("uplink: field `vtep`"), "{e}");
        let route = |via: &str| {
            GOOD.replace("gateway = \"10.0.0.1\"", &format!("gateway = \"10.0.0.1\"\n[[network.route]]\ncidr = \"172.16.0.0/12\"\nvia = \"{via}\""))
        };
        let e = err(&route("gateway-vtep"));
        assert!(
            e.contains(
                "route[0]: field `via`: \"gateway-vtep\" but the network has no `gateway_vtep`"
            ),
            "{e}"
        );
        let e = err(&route("192.168.1.1"));
        assert!(
            e.contains("route[0]: field `via`: 192.168.1.1 is not inside"),
            "{e}"
        );
        let e = err(&route("router"));
        assert!(
            e.contains("route[0]: field `via`: \"router\" is neither"),
            "{e}"
        );
        assert!(Config::parse(&route("10.0.0.10"))
            .unwrap()
            .topology()
            .is_ok());
        // A valid uplink is accepted and becomes the port after the VM ports.
        let c = Config::parse(&up("")).unwrap();
        assert_eq!(c.topology().unwrap().uplink.unwrap().port, PortId(2));
        let e = err(&GOOD.replace("name = \"tap-b\"", "name = \"tap-a\""));
        assert!(e.contains("port[1]: field `name`"), "{e}");
        let e = err(&GOOD.replace("poll = \"adaptive\"", "coprocessor_threads = 0"));
        assert!(e.contains("coprocessor_threads"), "{e}");
        // vhost-user ports: a socket each, a mode only for them.
        let b = "name = \"tap-b\"\n        type = \"tap\"";
        let vu = |rest: &str| {
            GOOD.replace(
                b,
                &format!("name = \"tap-b\"\ntype = \"vhost-user\"\n{rest}"),
            )
        };
        let e = err(&vu(""));
        assert!(
            e.contains("port[1] (tap-b): field `socket`: a vhost-user port needs"),
            "{e}"
        );
        let e = err(&vu("socket = \"/tmp/b.sock\"\nmode = \"both\""));
        assert!(e.contains("mode"), "{e}");
        let c = Config::parse(&vu("socket = \"/tmp/b.sock\"\nmode = \"client\"")).unwrap();
        assert!(c.topology().is_ok());
        assert_eq!(c.ports[1].mode, Some(VhostMode::Client));
        let e = err(&GOOD.replace(b, &format!("{b}\nmode = \"client\"")));
        assert!(
            e.contains("port[1] (tap-b): field `mode`: only vhost-user ports"),
            "{e}"
        );
    }

    const SERVICES: &str = r#"
        [[port]]
        name = "ext0"
        type = "tap"

        [[security_group]]
        name = "web"
        [[security_group.rule]]
        direction = "ingress"
        protocol = "tcp"
        ports = 80
        [[security_group.rule]]
        direction = "ingress"
        protocol = "icmp"
        remote_group = "web"
        [[security_group.rule]]
        direction = "egress"

        [external]
        port = "ext0"
        cidr = "203.0.113.0/24"
        gateway = "203.0.113.1"
        snat = ["203.0.113.10"]
        snat_ports = "20000-29999"

        [conntrack]
        per_vm = 100
        udp_first_s = 10
    "#;

    fn services(edit: impl Fn(String) -> String) -> String {
        let vm_b = "ips = [\"10.0.0.11\"]\n        network = 100";
        let good = GOOD.replace(
            vm_b,
            &format!("{vm_b}\n        security_groups = [\"web\"]\n        floating_ip = \"203.0.113.50\""),
        );
        edit(format!("{good}{SERVICES}"))
    }

    #[test]
    fn security_groups_nat_and_conntrack_build() {
        let c = Config::parse(&services(|s| s)).unwrap();
        let b = c.build().unwrap();
        let ext = b.topo.external.as_ref().unwrap();
        assert_eq!(ext.port, PortId(2));
        assert_eq!(ext.ports, (20000, 29999));
        let web = b.policy.groups().next().unwrap();
        assert_eq!(web.rules.len(), 3);
        assert_eq!(web.rules[0].ports, (80, 80));
        assert_eq!(b.limits.per_vm, 100);
        assert_eq!(b.timeouts.udp_first, 10_000_000_000);
        let vm = b.topo.vm_on(PortId(1)).unwrap();
        assert_eq!(vm.groups, [0]);
        assert_eq!(
            b.topo.external_addr(Ipv4Addr::new(203, 0, 113, 50)),
            Some(coprocessor::topology::ExternalAddr::Floating(PortId(1)))
        );
    }

    #[test]
    fn service_errors_name_the_object_and_field() {
        let e = err(&services(|s| {
            s.replace("security_groups = [\"web\"]", "security_groups = [\"db\"]")
        }));
        assert!(
            e.contains("vm[1] (b): field `security_groups`: no group named db"),
            "{e}"
        );
        let e = err(&services(|s| s.replace("ports = 80", "ports = \"90-80\"")));
        assert!(
            e.contains("security_group[0] (web): rule[0]: field `ports`"),
            "{e}"
        );
        let e = err(&services(|s| {
            s.replace(
                "remote_group = \"web\"",
                "remote_group = \"web\"\n        cidr = \"10.0.0.0/8\"",
            )
        }));
        assert!(
            e.contains("rule[1]: fields `cidr` and `remote_group`"),
            "{e}"
        );
        let e = err(&services(|s| {
            s.replace("remote_group = \"web\"", "remote_group = \"nope\"")
        }));
        assert!(
            e.contains("security group web: rule 1: field `remote_group`: no group named nope"),
            "{e}"
        );
        let e = err(&services(|s| {
            s.replace("protocol = \"tcp\"", "protocol = \"tpc\"")
        }));
        assert!(e.contains("rule[0]: field `protocol`: \"tpc\""), "{e}");
        let e = err(&services(|s| {
            s.replace("snat = [\"203.0.113.10\"]", "snat = [\"198.51.100.1\"]")
        }));
        assert!(
            e.contains("external: field `snat`: 198.51.100.1 is not a host address"),
            "{e}"
        );
        let e = err(&services(|s| s.replace("203.0.113.50", "198.51.100.50")));
        assert!(
            e.contains("vm b: field `floating_ip`: 198.51.100.50 is not inside"),
            "{e}"
        );
        let e = err(&services(|s| s.replace("203.0.113.50", "203.0.113.10")));
        assert!(e.contains("is an SNAT address"), "{e}");
        let e = err(&services(|s| {
            s.replace("port = \"ext0\"", "port = \"tap-a\"")
        }));
        assert!(
            e.contains("vm[0] (a): field `port`: \"tap-a\" is the external network's port"),
            "{e}"
        );
        let e = err(&services(|s| {
            s.replace("snat_ports = \"20000-29999\"", "snat_ports = \"0-10\"")
        }));
        assert!(e.contains("external: field `snat_ports`"), "{e}");
        let e = err(&services(|s| {
            s.replace("udp_first_s = 10", "udp_first_s = 0")
        }));
        assert!(e.contains("conntrack: field `udp_first_s`"), "{e}");
        // A floating IP without an external network.
        let e = err(&GOOD.replace(
            "network = 100\n        [[vm]]",
            "network = 100\n        floating_ip = \"203.0.113.9\"\n        [[vm]]",
        ));
        assert!(
            e.contains("field `floating_ip`: the switch has no [external] network"),
            "{e}"
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:0a"), None);
    }
}
