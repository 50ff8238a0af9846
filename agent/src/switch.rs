//! What the agent does to a switch: the change operations it sends and
//! the [`Switch`] they go to — a real one through its control socket
//! ([`SocketSwitch`]) or an in-memory model (`model`). Everything before
//! [`Switch::apply`] is the same for both.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Value};

use crate::layout::{mac_str, parse_mac, Endpoint, Key};

/// A remote endpoint to set (a copy: a thousand simulated hosts taking
/// the same record do not share a counter).
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub vtep: Ipv4Addr,
    pub security_groups: Option<Arc<[String]>>,
}

impl Remote {
    pub fn new(vni: u32, ip: Ipv4Addr, ep: &Endpoint) -> Remote {
        Remote {
            vni,
            ip,
            mac: ep.mac,
            vtep: ep.vtep,
            security_groups: ep.security_groups.clone(),
        }
    }
}

/// One operation of a change batch (the switch's `apply` operations).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    AddGroup(String, Arc<Value>),
    SetRules(String, Arc<Value>),
    RemoveGroup(String),
    AddNetwork(u32, Arc<Value>),
    ChangeNetwork(u32, Arc<Value>),
    RemoveNetwork(u32),
    RemoveVm(String),
    AddVm(String, Arc<Value>),
    ChangeVm(String, Arc<Value>),
    SetRemotes(Vec<Remote>),
    RemoveRemotes(Vec<(u32, Ipv4Addr)>),
    SetExternal(Option<Arc<Value>>),
}

impl Op {
    /// The keys whose records the operation (or its item `item`) applies.
    pub fn keys(&self, item: Option<usize>) -> Vec<Key> {
        match self {
            Op::AddGroup(n, _) | Op::SetRules(n, _) | Op::RemoveGroup(n) => {
                vec![Key::Group(n.clone())]
            }
            Op::AddNetwork(v, _) | Op::ChangeNetwork(v, _) | Op::RemoveNetwork(v) => {
                vec![Key::Network(*v)]
            }
            Op::RemoveVm(n) | Op::AddVm(n, _) | Op::ChangeVm(n, _) => vec![Key::Vm(n.clone())],
            Op::SetExternal(_) => vec![Key::External],
            Op::SetRemotes(r) => match item {
                Some(i) => r
                    .get(i)
                    .map(|r| Key::Endpoint(r.vni, r.ip))
                    .into_iter()
                    .collect(),
                None => r.iter().map(|r| Key::Endpoint(r.vni, r.ip)).collect(),
            },
            Op::RemoveRemotes(r) => match item {
                Some(i) => r
                    .get(i)
                    .map(|r| Key::Endpoint(r.0, r.1))
                    .into_iter()
                    .collect(),
                None => r.iter().map(|r| Key::Endpoint(r.0, r.1)).collect(),
            },
        }
    }

    /// Drop item `item` of a bulk operation; false if it is not one (or
    /// has no such item).
    pub fn drop_item(&mut self, item: usize) -> bool {
        match self {
            Op::SetRemotes(r) if item < r.len() => {
                r.remove(item);
                true
            }
            Op::RemoveRemotes(r) if item < r.len() => {
                r.remove(item);
                true
            }
            _ => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Op::SetRemotes(r) if r.is_empty())
            || matches!(self, Op::RemoveRemotes(r) if r.is_empty())
    }

    /// The operation as the switch's control API spells it.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Written straight to the request (a batch of 100 000 endpoints as a
/// tree of JSON values would take ~60 MiB on the way).
impl Serialize for Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            Op::AddGroup(_, g) => {
                m.serialize_entry("op", "add-security-group")?;
                m.serialize_entry("security_group", g)?;
            }
            Op::SetRules(n, g) => {
                m.serialize_entry("op", "set-rules")?;
                m.serialize_entry("name", n)?;
                m.serialize_entry("rules", g.get("rule").unwrap_or(&json!([])))?;
            }
            Op::RemoveGroup(n) => {
                m.serialize_entry("op", "remove-security-group")?;
                m.serialize_entry("name", n)?;
            }
            Op::AddNetwork(_, n) | Op::ChangeNetwork(_, n) => {
                let op = match self {
                    Op::AddNetwork(..) => "add-network",
                    _ => "change-network",
                };
                m.serialize_entry("op", op)?;
                m.serialize_entry("network", n)?;
            }
            Op::RemoveNetwork(v) => {
                m.serialize_entry("op", "remove-network")?;
                m.serialize_entry("vni", v)?;
            }
            Op::RemoveVm(n) => {
                m.serialize_entry("op", "remove-vm")?;
                m.serialize_entry("name", n)?;
            }
            Op::AddVm(_, v) | Op::ChangeVm(_, v) => {
                let op = match self {
                    Op::AddVm(..) => "add-vm",
                    _ => "change-vm",
                };
                m.serialize_entry("op", op)?;
                m.serialize_entry("vm", v)?;
            }
            Op::SetRemotes(r) => {
                #[derive(Serialize)]
                struct Row<'a> {
                    network: u32,
                    ip: Ipv4Addr,
                    mac: String,
                    vtep: Ipv4Addr,
                    security_groups: &'a [String],
                }
                let rows = r.iter().map(|r| Row {
                    network: r.vni,
                    ip: r.ip,
                    mac: mac_str(&r.mac),
                    vtep: r.vtep,
                    security_groups: r.security_groups.as_deref().unwrap_or(&[]),
                });
                m.serialize_entry("op", "set-remotes")?;
                m.serialize_entry("remotes", &Seq(std::cell::Cell::new(Some(rows))))?;
            }
            Op::RemoveRemotes(r) => {
                #[derive(Serialize)]
                struct Row {
                    network: u32,
                    ip: Ipv4Addr,
                }
                let rows = r.iter().map(|(v, ip)| Row {
                    network: *v,
                    ip: *ip,
                });
                m.serialize_entry("op", "remove-remotes")?;
                m.serialize_entry("remotes", &Seq(std::cell::Cell::new(Some(rows))))?;
            }
            Op::SetExternal(e) => {
                m.serialize_entry("op", "set-external")?;
                m.serialize_entry("external", e)?;
            }
        }
        m.end()
    }
}

/// An iterator serialized as a sequence (once).
struct Seq<I>(std::cell::Cell<Option<I>>);

impl<I: Iterator<Item = T>, T: Serialize> Serialize for Seq<I> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let it = self
            .0
            .take()
            .ok_or_else(|| serde::ser::Error::custom("serialized twice"))?;
        s.collect_seq(it)
    }
}

/// Why a batch was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum SwitchError {
    /// The switch refused it (and changed nothing); `op` and `item` say
    /// which operation and which of its entries, when the switch said.
    Refused {
        op: Option<usize>,
        item: Option<usize>,
        message: String,
    },
    /// It could not be asked (not running, restarting, upgrading).
    Unreachable(String),
}

/// What a switch holds, as far as the agent programs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    pub networks: BTreeSet<u32>,
    pub groups: BTreeSet<String>,
    pub vms: BTreeSet<String>,
    pub remotes: BTreeMap<(u32, Ipv4Addr), ([u8; 6], Ipv4Addr)>,
}

/// A switch the agent programs.
pub trait Switch {
    /// Apply `ops` as one batch: all of them or none.
    fn apply(&mut self, ops: &[Op]) -> Result<(), SwitchError>;
    /// What it holds now.
    fn held(&mut self) -> Result<Held, SwitchError>;
    /// This host's VTEP (the uplink's address).
    fn vtep(&mut self) -> Result<Ipv4Addr, SwitchError>;
}

/// Which operation and item a refusal names: `ops[3] …` (checking) or
/// `operation 3: …` (applying), then maybe `remotes[7]`.
pub fn blame(message: &str) -> (Option<usize>, Option<usize>) {
    let number_after = |s: &str, tag: &str| -> Option<(usize, usize)> {
        let at = s.find(tag)? + tag.len();
        let digits: String = s[at..].chars().take_while(char::is_ascii_digit).collect();
        Some((digits.parse().ok()?, at + digits.len()))
    };
    let (op, rest) =
        match number_after(message, "ops[").or_else(|| number_after(message, "operation ")) {
            Some((n, end)) => (Some(n), &message[end..]),
            None => (None, message),
        };
    let item = number_after(rest, "remotes[").map(|(n, _)| n);
    (op, item)
}

/// A switch reached through its control socket: one connection per
/// request, a JSON line each way.
pub struct SocketSwitch {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl SocketSwitch {
    pub fn new(path: PathBuf) -> SocketSwitch {
        SocketSwitch {
            path,
            timeout: Duration::from_secs(60),
        }
    }

    /// Send `request`, return the answer (an `{"error": …}` answer is an
    /// `Err`).
    pub fn ask(&self, request: &Value) -> Result<Value, SwitchError> {
        let line = serde_json::to_vec(request).map_err(|e| SwitchError::Refused {
            op: None,
            item: None,
            message: e.to_string(),
        })?;
        let answer = self.exchange(line)?;
        serde_json::from_str(&answer)
            .map_err(|e| SwitchError::Unreachable(format!("answer is not JSON: {e}")))
    }

    /// Send the request `line` (without its newline); the answer's text,
    /// or the switch's refusal.
    fn exchange(&self, mut line: Vec<u8>) -> Result<String, SwitchError> {
        let down = |e: std::io::Error| {
            SwitchError::Unreachable(format!("control socket {}: {e}", self.path.display()))
        };
        let mut s = UnixStream::connect(&self.path).map_err(down)?;
        s.set_read_timeout(Some(self.timeout)).map_err(down)?;
        s.set_write_timeout(Some(self.timeout)).map_err(down)?;
        line.push(b'\n');
        s.write_all(&line).map_err(down)?;
        drop(line);
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).map_err(down)?;
        if answer.is_empty() {
            return Err(SwitchError::Unreachable(
                "the switch closed the connection".into(),
            ));
        }
        #[derive(Deserialize)]
        struct Refusal {
            error: String,
        }
        if let Ok(Refusal { error: message }) = serde_json::from_str::<Refusal>(&answer) {
            let (op, item) = blame(&message);
            return Err(SwitchError::Refused { op, item, message });
        }
        Ok(answer)
    }
}

impl Switch for SocketSwitch {
    fn apply(&mut self, ops: &[Op]) -> Result<(), SwitchError> {
        #[derive(Serialize)]
        struct Apply<'a> {
            cmd: &'static str,
            ops: &'a [Op],
        }
        let line =
            serde_json::to_vec(&Apply { cmd: "apply", ops }).map_err(|e| SwitchError::Refused {
                op: None,
                item: None,
                message: e.to_string(),
            })?;
        self.exchange(line).map(|_| ())
    }

    fn held(&mut self) -> Result<Held, SwitchError> {
        let bad = |what: &str| SwitchError::Unreachable(format!("unexpected answer to {what}"));
        let topo = self.ask(&json!({"cmd": "topology"}))?;
        let groups = self.ask(&json!({"cmd": "security-groups"}))?;
        let mut h = Held::default();
        for n in topo["networks"].as_array().ok_or_else(|| bad("topology"))? {
            let vni = n["vni"].as_u64().and_then(|v| u32::try_from(v).ok());
            h.networks.insert(vni.ok_or_else(|| bad("topology"))?);
        }
        for v in topo["vms"].as_array().ok_or_else(|| bad("topology"))? {
            let name = v["name"].as_str().ok_or_else(|| bad("topology"))?;
            h.vms.insert(name.to_string());
        }
        for g in groups["groups"]
            .as_array()
            .ok_or_else(|| bad("security-groups"))?
        {
            let name = g["name"].as_str().ok_or_else(|| bad("security-groups"))?;
            h.groups.insert(name.to_string());
        }
        // Typed straight from the text: 100 000 endpoints.
        #[derive(Deserialize)]
        struct Row<'a> {
            network: u32,
            ip: Ipv4Addr,
            #[serde(borrow)]
            mac: &'a str,
            vtep: Ipv4Addr,
        }
        #[derive(Deserialize)]
        struct Remotes<'a> {
            #[serde(borrow)]
            remotes: Vec<Row<'a>>,
        }
        let text = match self.exchange(br#"{"cmd": "remotes"}"#.to_vec()) {
            Ok(t) => t,
            // A switch older than `remotes`: what `topology` shows (the
            // first 10,000; what it does not show is set again, not
            // removed).
            Err(SwitchError::Refused { message, .. }) if message.contains("remotes") => {
                serde_json::to_string(&json!({"remotes": topo["remotes"]}))
                    .map_err(|_| bad("topology"))?
            }
            Err(e) => return Err(e),
        };
        let r: Remotes = serde_json::from_str(&text).map_err(|_| bad("remotes"))?;
        for row in r.remotes {
            let mac = parse_mac(row.mac).ok_or_else(|| bad("remotes"))?;
            h.remotes.insert((row.network, row.ip), (mac, row.vtep));
        }
        Ok(h)
    }

    fn vtep(&mut self) -> Result<Ipv4Addr, SwitchError> {
        let s = self.ask(&json!({"cmd": "topology"}))?;
        s["vtep"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SwitchError::Unreachable("the switch has no uplink VTEP".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_operation_and_entry() {
        assert_eq!(blame("ops[3] (vm web): field `mac`: bad"), (Some(3), None));
        assert_eq!(
            blame("operation 2: remotes[17]: 10.0.0.1 is a local VM"),
            (Some(2), Some(17))
        );
        assert_eq!(
            blame("ops[0]: remotes[5] (10.0.0.9): unknown network"),
            (Some(0), Some(5))
        );
        assert_eq!(blame("request larger than 64 MiB"), (None, None));
    }

    #[test]
    fn operations_are_spelt_as_the_api_reads_them() {
        let ep = Endpoint {
            mac: [2, 0, 0, 0, 0, 5],
            vtep: Ipv4Addr::new(192, 168, 0, 2),
            security_groups: Some(vec!["web".to_string()].into()),
        };
        let op = Op::SetRemotes(vec![Remote::new(100, Ipv4Addr::new(10, 0, 0, 5), &ep)]);
        assert_eq!(
            op.to_json(),
            json!({"op": "set-remotes", "remotes": [{"network": 100, "ip": "10.0.0.5",
                   "mac": "02:00:00:00:00:05", "vtep": "192.168.0.2", "security_groups": ["web"]}]})
        );
        let g = Arc::new(json!({"name": "web", "rule": [{"direction": "ingress"}]}));
        assert_eq!(
            Op::SetRules("web".into(), g).to_json(),
            json!({"op": "set-rules", "name": "web", "rules": [{"direction": "ingress"}]})
        );
        assert_eq!(
            Op::SetExternal(None).to_json(),
            json!({"op": "set-external", "external": null})
        );
    }
}
