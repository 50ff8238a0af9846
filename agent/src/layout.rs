//! The key layout in etcd (version 1) and its records.
//!
//! Everything lives under one prefix (default `/vswitch/v1`):
//!
//! | key | value | read by |
//! |---|---|---|
//! | `networks/<vni>` | the control API's network object (`vni` optional) | every agent |
//! | `security-groups/<name>` | `{"rule": [...]}` (the API's group, `name` optional) | every agent |
//! | `endpoints/<vni>/<ip>` | `{"mac", "vtep", "security_groups"?}` | every agent |
//! | `hosts/<host>/vms/<name>` | the API's VM object (`name` optional) | that host's agent |
//! | `hosts/<host>/external` | the API's external network object | that host's agent |
//! | `direct/<host>/<vni>/<ip>` | `{}`: Hoverboard promoted the pair | that host's agent |
//! | `status/<host>` | the agent's status, under its lease | operators, benches |
//! | `talkers/<host>` | the host's top talkers, under its lease | the controller |
//! | `controller` | the controllers' election | controllers |
//!
//! A VM is written twice by the orchestrator: under its host (the port it
//! plugs into) and as an endpoint (where the fleet reaches it). A host
//! takes the endpoints whose VTEP is not its own; in a network with a
//! `gateway_vtep`, only those Hoverboard promoted for it (the rest ride
//! the gateway). The JSON of each record is the switch's own (see its
//! README), so the switch checks and names the field at fault.

use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The layout's version, part of the default prefix.
pub const DEFAULT_PREFIX: &str = "/vswitch/v1";

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Network(u32),
    Group(String),
    Endpoint(u32, Ipv4Addr),
    Vm(String),
    External,
    Direct(u32, Ipv4Addr),
}

/// A remote endpoint as etcd holds it (checked here: the agent needs its
/// VTEP to know whether it is its own).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    #[serde(deserialize_with = "mac")]
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
    /// (None when empty: copies of it are free.)
    #[serde(default, deserialize_with = "groups")]
    pub security_groups: Option<Arc<[String]>>,
}

fn groups<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Arc<[String]>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    Ok((!v.is_empty()).then(|| v.into()))
}

/// "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

pub fn mac_str(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    parse_mac(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a MAC address")))
}

/// A record's value, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A network, group, VM or external network: the API's object, with
    /// its name or VNI filled in from the key.
    Object(Arc<Value>),
    /// (By value: a simulated fleet reads each one per host, in order.)
    Endpoint(Endpoint),
    Direct,
}

/// The layout under one prefix, for one host.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub host: String,
}

impl Layout {
    pub fn new(prefix: &str, host: &str) -> Layout {
        Layout {
            prefix: prefix.trim_end_matches('/').to_string(),
            host: host.to_string(),
        }
    }

    /// The prefixes this host's agent lists and watches.
    pub fn watched(&self) -> [String; 5] {
        let p = &self.prefix;
        [
            format!("{p}/networks/"),
            format!("{p}/security-groups/"),
            format!("{p}/endpoints/"),
            format!("{p}/hosts/{}/", self.host),
            format!("{p}/direct/{}/", self.host),
        ]
    }

    pub fn status_key(&self) -> String {
        format!("{}/status/{}", self.prefix, self.host)
    }

    pub fn talkers_key(&self) -> String {
        format!("{}/talkers/{}", self.prefix, self.host)
    }

    /// The etcd key of `k`.
    pub fn key_string(&self, k: &Key) -> String {
        let p = &self.prefix;
        match k {
            Key::Network(v) => format!("{p}/networks/{v}"),
            Key::Group(n) => format!("{p}/security-groups/{n}"),
            Key::Endpoint(v, ip) => format!("{p}/endpoints/{v}/{ip}"),
            Key::Vm(n) => format!("{p}/hosts/{}/vms/{n}", self.host),
            Key::External => format!("{p}/hosts/{}/external", self.host),
            Key::Direct(v, ip) => format!("{p}/direct/{}/{v}/{ip}", self.host),
        }
    }

    /// What `key` names, if it is one of this host's keys.
    pub fn parse_key(&self, key: &str) -> Result<Key, String> {
        let rest = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or("not under the prefix")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let vni = |s: &str| s.parse::<u32>().map_err(|_| format!("bad VNI {s:?}"));
        let ip = |s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("bad address {s:?}"))
        };
        let name = |s: &str| {
            if s.is_empty() {
                Err("empty name".to_string())
            } else {
                Ok(s.to_string())
            }
        };
        match parts.as_slice() {
            ["networks", v] => Ok(Key::Network(vni(v)?)),
            ["security-groups", n] => Ok(Key::Group(name(n)?)),
            ["endpoints", v, a] => Ok(Key::Endpoint(vni(v)?, ip(a)?)),
            ["hosts", h, "vms", n] if *h == self.host => Ok(Key::Vm(name(n)?)),
            ["hosts", h, "external"] if *h == self.host => Ok(Key::External),
            ["direct", h, v, a] if *h == self.host => Ok(Key::Direct(vni(v)?, ip(a)?)),
            _ => Err("not a key of the layout".into()),
        }
    }
}

/// The record `value` stored at `key`. Errors name the field.
pub fn parse_record(key: &Key, value: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(value).map_err(|_| "value is not UTF-8".to_string())?;
    match key {
        Key::Endpoint(..) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let e: Endpoint = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                format!("field `{path}`: {}", e.into_inner())
            })?;
            Ok(Record::Endpoint(e))
        }
        Key::Direct(..) => Ok(Record::Direct),
        Key::Network(vni) => object(text, "vni", Value::from(*vni)),
        Key::Group(n) | Key::Vm(n) => object(text, "name", Value::from(n.as_str())),
        Key::External => object(text, "", Value::Null),
    }
}

/// A JSON object with `field` set to `want` (checked if present).
fn object(text: &str, field: &str, want: Value) -> Result<Record, String> {
    let mut m: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if !field.is_empty() {
        match m.get(field) {
            Some(v) if *v != want => {
                return Err(format!("field `{field}`: {v} is not the key's {want}"));
            }
            _ => {
                m.insert(field.to_string(), want);
            }
        }
    }
    Ok(Record::Object(Arc::new(Value::Object(m))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_this_host_and_of_everyone() {
        let l = Layout::new("/vswitch/v1/", "hv1");
        assert_eq!(
            l.parse_key("/vswitch/v1/networks/100"),
            Ok(Key::Network(100))
        );
        assert_eq!(
            l.parse_key("/vswitch/v1/endpoints/100/10.0.0.5"),
            Ok(Key::Endpoint(100, Ipv4Addr::new(10, 0, 0, 5)))
        );
        assert_eq!(
            l.parse_key("/vswitch/v1/hosts/hv1/vms/web"),
            Ok(Key::Vm("web".into()))
        );
        assert!(l.parse_key("/vswitch/v1/hosts/hv2/vms/web").is_err());
        assert!(l.parse_key("/vswitch/v1/networks/x").is_err());
        assert!(l.parse_key("/vswitch/v1/endpoints/100/10.0.0").is_err());
        assert!(l.parse_key("/other/networks/1").is_err());
        assert!(l.parse_key("/vswitch/v1/security-groups/").is_err());
        for k in [
            Key::Network(1),
            Key::Group("g".into()),
            Key::Endpoint(2, Ipv4Addr::new(10, 0, 0, 9)),
            Key::Vm("v".into()),
            Key::External,
            Key::Direct(3, Ipv4Addr::new(10, 1, 0, 9)),
        ] {
            assert_eq!(l.parse_key(&l.key_string(&k)), Ok(k));
        }
    }

    #[test]
    fn records_get_their_key_and_refuse_a_contradiction() {
        let r = parse_record(&Key::Network(7), br#"{"gateway_mac": "02:00:00:00:00:01"}"#);
        let Ok(Record::Object(v)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(v["vni"], 7);
        let e = parse_record(&Key::Network(7), br#"{"vni": 8}"#).unwrap_err();
        assert!(e.contains("field `vni`"), "{e}");
        let e = parse_record(
            &Key::Endpoint(7, Ipv4Addr::LOCALHOST),
            br#"{"mac": "02:00:00:00:00", "vtep": "192.168.0.1"}"#,
        )
        .unwrap_err();
        assert!(e.contains("field `mac`"), "{e}");
        let e = parse_record(&Key::Endpoint(7, Ipv4Addr::LOCALHOST), b"{\"mac\": 1").unwrap_err();
        assert!(!e.is_empty());
        assert!(parse_record(&Key::Vm("a".into()), &[0xff, 0xfe]).is_err());
        assert!(parse_record(&Key::Vm("a".into()), b"[1]").is_err());
    }
}
