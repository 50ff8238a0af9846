//! The TOML configuration: what the switch is at start.
//!
//! Parsing refuses unknown fields and wrong types (serde names the field,
//! line and column); [`Config::topology`] (`config_build`) then checks
//! meaning — references, overlaps, duplicates — and names the object and
//! field at fault. The daemon refuses to start on any error rather than
//! run half-configured.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use coprocessor::conntrack::{Limits, Timeouts};
use flowtable::{Mac, PortId};
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
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// A load-balanced service: a VIP of a tenant network whose connections
/// are spread over `backends` by Maglev hashing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// The tenant network (VNI) the VIP is in.
    pub network: u32,
    pub vip: Ipv4Addr,
    /// "tcp" or "udp".
    pub protocol: String,
    pub port: u16,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Connections through the VIP at most (0: no limit but conntrack's).
    #[serde(default)]
    pub max_connections: u32,
    /// Active checks of the backends on this host.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// An address of the external network balanced the same way
    /// (north-south), to the backends on this host.
    #[serde(default)]
    pub external_vip: Option<Ipv4Addr>,
}

/// A service's active health check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// "tcp" (connect to the backend's port) or "icmp" (echo).
    pub protocol: String,
    #[serde(default = "health_interval")]
    pub interval_ms: u32,
    #[serde(default = "health_timeout")]
    pub timeout_ms: u32,
    /// Successes in a row that bring a backend back.
    #[serde(default = "two")]
    pub rise: u8,
    /// Failures in a row that take it out.
    #[serde(default = "two")]
    pub fall: u8,
}

fn health_interval() -> u32 {
    1000
}

fn health_timeout() -> u32 {
    500
}

fn two() -> u8 {
    2
}

/// One backend of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Relative share of new connections (0: drained).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
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
    /// Fast-path threads. Each polls its own queue of every port (queue
    /// `i` for thread `i`: the uplink's and af-xdp ports' NIC queues, a
    /// queue of each multi-queue tap, vhost-user pairs `p` with
    /// `p mod threads = i`) and keeps its own flow table of
    /// `flow_capacity` flows.
    pub fastpath_threads: usize,
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
    /// Confine the fast-path and coprocessor threads to the system calls
    /// they make (see `seccomp`); on by default.
    pub seccomp: bool,
    /// The fast-path threads' cores: one each, or fewer that they share.
    /// Default: the last cores the process may use, one per thread and
    /// leaving one, if it may use two or more (see `cores`).
    pub fastpath_cores: Option<Vec<usize>>,
    /// The coprocessor threads' cores. Default: every core the process may
    /// use but the fast path's.
    pub coprocessor_cores: Option<Vec<usize>>,
    /// How long an idle coprocessor thread keeps looking for work before
    /// it sleeps: a punt that comes within it is taken at once, not after
    /// a wakeup.
    pub coprocessor_spin_us: u64,
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
            fastpath_threads: 1,
            coprocessor_threads: 1,
            flow_capacity: 1 << 20,
            flow_share_per_port: None,
            idle_timeout_s: 30,
            control_socket: PathBuf::from("/run/vswitch/vswitch.sock"),
            punt_rate: 10_000,
            punt_burst: 256,
            log: "info".into(),
            metrics: None,
            seccomp: true,
            fastpath_cores: None,
            coprocessor_cores: None,
            coprocessor_spin_us: 50,
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
}

/// `text` (a configuration) with `switch.fastpath_threads` set to `n`,
/// and `fastpath_cores` cut to its first `n` if it lists more (one core
/// per thread at most). The result is written from the parsed document
/// (comments are not kept): it is the configuration the switch runs and
/// hands on.
pub fn with_fastpath_threads(text: &str, n: usize) -> anyhow::Result<String> {
    let mut doc: toml::Table = text.parse().context("parsing the configuration")?;
    let switch = doc
        .entry("switch")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    let Some(switch) = switch.as_table_mut() else {
        anyhow::bail!("switch: not a table");
    };
    let n64 = i64::try_from(n).context("fast-path threads")?;
    switch.insert("fastpath_threads".into(), toml::Value::Integer(n64));
    if let Some(toml::Value::Array(cores)) = switch.get_mut("fastpath_cores") {
        cores.truncate(n);
    }
    Ok(toml::to_string(&doc)?)
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
        let e = err(&GOOD.replace("poll = \"adaptive\"", "fastpath_cores = [0, 1]"));
        assert!(
            e.contains("switch: field `fastpath_cores`: 2 cores for 1 fast-path thread"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"adaptive\"", "fastpath_threads = 0"));
        assert!(
            e.contains("switch: field `fastpath_threads`: 0 is not in 1..=32"),
            "{e}"
        );
        assert!(Config::parse(&GOOD.replace(
            "poll = \"adaptive\"",
            "fastpath_threads = 2\nfastpath_cores = [0, 1]"
        ))
        .is_ok());
        let e = err(&GOOD.replace("poll = \"adaptive\"", "coprocessor_cores = []"));
        assert!(
            e.contains("switch: field `coprocessor_cores`: empty"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"adaptive\"", "coprocessor_spin_us = 20000"));
        assert!(e.contains("switch: field `coprocessor_spin_us`"), "{e}");
        assert!(Config::parse(&GOOD.replace(
            "poll = \"adaptive\"",
            "fastpath_cores = [1]\ncoprocessor_cores = [0]\ncoprocessor_spin_us = 100"
        ))
        .is_ok());
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

    /// A load-balanced service over VM b (config `GOOD`, network 100).
    fn lb(edit: impl Fn(String) -> String) -> String {
        let svc = r#"
        [[service]]
        name = "web"
        network = 100
        vip = "10.0.0.100"
        protocol = "tcp"
        port = 80
        health = { protocol = "tcp" }
        backends = [{ ip = "10.0.0.11", port = 8080 }]
        "#;
        edit(format!("{GOOD}{svc}"))
    }

    #[test]
    fn a_load_balanced_service_builds_and_its_errors_name_the_field() {
        let b = Config::parse(&lb(|s| s)).unwrap().build().unwrap();
        let svc = b.services.named("web").expect("built");
        assert_eq!(svc.spec.backends[0].weight, 1, "weight defaults to 1");
        let h = svc.spec.health.expect("health");
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.rise, h.fall),
            (1000, 500, 2, 2)
        );
        for (edit, field) in [
            (
                (
                    "protocol = \"tcp\"\n        port",
                    "protocol = \"sctp\"\n        port",
                ),
                "service[0] (web): field `protocol`",
            ),
            (
                ("10.0.0.100", "10.9.0.100"),
                "service[0] (web): field `vip`",
            ),
            (("10.0.0.100", "10.0.0.11"), "service[0] (web): field `vip`"),
            (
                (
                    "{ protocol = \"tcp\" }",
                    "{ protocol = \"tcp\", interval_ms = 10 }",
                ),
                "service[0] (web): field `health.interval_ms`",
            ),
            (
                ("{ protocol = \"tcp\" }", "{ protocol = \"udp\" }"),
                "service[0] (web): field `health.protocol`",
            ),
            (
                (
                    "port = 80\n",
                    "port = 80\n        external_vip = \"203.0.113.80\"\n",
                ),
                "service[0] (web): field `external_vip`",
            ),
        ] {
            let e = err(&lb(|s| s.replacen(edit.0, edit.1, 1)));
            assert!(e.contains(field), "{e}");
        }
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

    #[test]
    fn a_takeover_may_set_another_thread_count_and_cuts_the_cores_to_it() {
        let two = GOOD.replace(
            "poll = \"adaptive\"",
            "poll = \"adaptive\"\nfastpath_threads = 2\nfastpath_cores = [0, 1]",
        );
        let one = with_fastpath_threads(&two, 1).unwrap();
        let c = Config::parse(&one).unwrap();
        assert_eq!(c.switch.fastpath_threads, 1);
        assert_eq!(c.switch.fastpath_cores, Some(vec![0]));
        assert_eq!(c.ports.len(), Config::parse(&two).unwrap().ports.len());
        let three = with_fastpath_threads(GOOD, 3).unwrap();
        let c = Config::parse(&three).unwrap();
        assert_eq!(
            (c.switch.fastpath_threads, c.switch.fastpath_cores),
            (3, None)
        );
        assert!(with_fastpath_threads("[switch", 2).is_err());
    }
}
