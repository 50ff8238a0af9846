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
use coprocessor::topology::{
    Cidr, LocalVm, Network, RemoteVm, Route, Subnet, Topology, Uplink, Via,
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
    pub idle_timeout_s: u64,
    pub control_socket: PathBuf,
    pub punt_rate: u64,
    pub punt_burst: u64,
    pub log: String,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            poll: Poll::Busy,
            coprocessor_threads: 1,
            flow_capacity: 1 << 20,
            idle_timeout_s: 30,
            control_socket: PathBuf::from("/run/vswitch/vswitch.sock"),
            punt_rate: 10_000,
            punt_burst: 256,
            log: "info".into(),
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PortType,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub network: u32,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub vtep: Ipv4Addr,
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
        }
        Ok(ids)
    }

    /// Check the whole configuration and build the coprocessor's view of it.
    pub fn topology(&self) -> Result<Topology> {
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
        if s.idle_timeout_s == 0 {
            bail!("switch: field `idle_timeout_s`: must be at least 1");
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
        let uplink = self.uplink.as_ref().map(|u| Uplink {
            port: PortId(u16::try_from(self.ports.len()).unwrap_or(u16::MAX)),
            mac: [0; 6],
            local_vtep: u.vtep,
            mtu: u.mtu,
            ttl: 64,
        });
        let mut topo = Topology::new(uplink);
        for (i, n) in self.networks.iter().enumerate() {
            let vni = Vni::new(n.vni).with_context(|| {
                format!(
                    "network[{i}]: field `vni`: {} does not fit in 24 bits",
                    n.vni
                )
            })?;
            let gateway_mac = parse_mac(&n.gateway_mac).with_context(|| {
                format!(
                    "network[{i}] (vni {}): field `gateway_mac`: {:?} is not a MAC address",
                    n.vni, n.gateway_mac
                )
            })?;
            let mut subnets = Vec::new();
            for (j, sn) in n.subnets.iter().enumerate() {
                let cidr: Cidr = sn.cidr.parse().map_err(|e| {
                    anyhow::anyhow!(
                        "network[{i}] (vni {}): subnet[{j}]: field `cidr`: {e}",
                        n.vni
                    )
                })?;
                subnets.push(Subnet {
                    cidr,
                    gateway: sn.gateway,
                });
            }
            if n.lease_s < 60 {
                bail!(
                    "network[{i}] (vni {}): field `lease_s`: {} is below 60 seconds",
                    n.vni,
                    n.lease_s
                );
            }
            let mut routes = Vec::new();
            for (j, r) in n.routes.iter().enumerate() {
                let at = || format!("network[{i}] (vni {}): route[{j}]", n.vni);
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
                        let ip: Ipv4Addr = ip
                            .parse()
                            .map_err(|_| anyhow::anyhow!("{}: field `via`: {ip:?} is neither a VM address nor \"gateway-vtep\"", at()))?;
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
            topo.add_network(Network {
                vni,
                subnets,
                gateway_mac,
                dns: n.dns.clone(),
                lease_secs: n.lease_s,
                routes,
                gateway_vtep: n.gateway_vtep,
            })
            .with_context(|| format!("network[{i}]"))?;
        }
        for (i, v) in self.vms.iter().enumerate() {
            let port = *ids.get(&v.port).with_context(|| {
                format!(
                    "vm[{i}] ({}): field `port`: {:?} is not a configured port",
                    v.name, v.port
                )
            })?;
            let mac = parse_mac(&v.mac).with_context(|| {
                format!(
                    "vm[{i}] ({}): field `mac`: {:?} is not a MAC address",
                    v.name, v.mac
                )
            })?;
            let vni = Vni::new(v.network).with_context(|| {
                format!(
                    "vm[{i}] ({}): field `network`: {} is not a VNI",
                    v.name, v.network
                )
            })?;
            topo.add_vm(LocalVm {
                name: v.name.clone(),
                port,
                mac,
                ips: v.ips.clone(),
                vni,
                hostname: v.hostname.clone(),
            })
            .with_context(|| format!("vm[{i}]"))?;
        }
        for (i, r) in self.remotes.iter().enumerate() {
            let mac = parse_mac(&r.mac).with_context(|| {
                format!(
                    "remote[{i}] ({}): field `mac`: {:?} is not a MAC address",
                    r.ip, r.mac
                )
            })?;
            let vni = Vni::new(r.network).with_context(|| {
                format!(
                    "remote[{i}] ({}): field `network`: {} is not a VNI",
                    r.ip, r.network
                )
            })?;
            topo.add_remote(RemoteVm {
                ip: r.ip,
                mac,
                vni,
                vtep: r.vtep,
            })
            .with_context(|| format!("remote[{i}]"))?;
        }
        Ok(topo)
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
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:0a"), None);
    }
}
