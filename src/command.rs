//! The control socket's requests: one JSON object per line, its command
//! in `cmd`. One type for the client (`vswitch ctl`, the new binary of a
//! handover) and the server, so each command and each of its fields is
//! named once.
//!
//! A change batch (`apply`) is the exception on the server: it may carry
//! 100 000 endpoints, so the server reads it straight into its types
//! (`api::ApplyRequest::parse`) instead of through this enum; the client
//! builds it here like every other request.

use std::net::Ipv4Addr;

use live_migrate::protocol;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::trace::TracePacket;

/// A request to the control socket. On the wire the command's name is in
/// `cmd`, its fields beside it (`{"cmd": "flows", "filter": {...}}`); see
/// [`Command::to_line`] and [`Command::parse`]. (serde's own form for that,
/// an internally tagged enum, buffers the fields and so loses which one
/// an error is about.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Counters of the switch, its ports and threads.
    Stats,
    /// The fast path's flows, filtered.
    Flows {
        #[serde(default)]
        filter: FlowFilter,
    },
    /// Tracked connections.
    Conntrack,
    /// NAT bindings (SNAT ports, floating IPs).
    Nat,
    /// Security groups and their rules.
    SecurityGroups,
    /// Load-balanced services and their backends.
    Services,
    /// Replace a group's rules (one `set-rules` operation of `apply`).
    SecurityGroupSet { name: String, rules: Vec<Value> },
    /// A batch of changes, whole or not at all (see `api`).
    Apply { ops: Vec<Value> },
    /// Networks, VMs, remote endpoints.
    Topology,
    /// Every remote endpoint (of one network), for a machine to read.
    Remotes {
        #[serde(default)]
        network: Option<u32>,
    },
    /// DHCP leases.
    Leases,
    /// Every decision the switch would take for a packet.
    Trace { packet: TracePacket },
    /// Remote destinations by traffic.
    TopTalkers {
        #[serde(default)]
        limit: Option<usize>,
    },
    /// A new VM port.
    PortAdd(PortAdd),
    /// Close a port no VM uses.
    PortRemove { name: String },
    /// A new binary's first handover question (`live_migrate::protocol`).
    HandoverPrepare(protocol::PrepareRequest),
    /// A new binary asks for the switch (the connection then carries the
    /// handover).
    Handover(protocol::HandoverRequest),
}

impl Command {
    /// The name of [`Command::Apply`] (checked against the enum by a test).
    pub const APPLY: &'static str = "apply";

    /// The request as its line (without the newline).
    pub fn to_line(&self) -> String {
        // serde's form: "name" for a command without fields, else
        // {"name": {fields}}. Plain data: serde_json cannot fail on it.
        let mut wire = serde_json::Map::new();
        match serde_json::to_value(self).unwrap_or(Value::Null) {
            Value::String(name) => {
                wire.insert("cmd".into(), Value::String(name));
            }
            Value::Object(tagged) => {
                for (name, fields) in tagged {
                    wire.insert("cmd".into(), Value::String(name));
                    if let Value::Object(fields) = fields {
                        wire.extend(fields);
                    }
                }
            }
            _ => {}
        }
        Value::Object(wire).to_string()
    }

    /// Read a request; the error names the field.
    pub fn parse(line: &str) -> anyhow::Result<Command> {
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("request: {e}"))?;
        let Value::Object(mut fields) = v else {
            anyhow::bail!("request: not a JSON object");
        };
        let name = match fields.remove("cmd") {
            Some(Value::String(name)) => name,
            Some(_) => anyhow::bail!("request: field `cmd`: not a string"),
            None => anyhow::bail!("request: field `cmd` is missing"),
        };
        // A command without fields may be one that has only optional ones.
        let tagged = if fields.is_empty() {
            match serde_json::from_value(Value::String(name.clone())) {
                Ok(c) => return Ok(c),
                Err(_) => serde_json::json!({ name.clone(): {} }),
            }
        } else {
            serde_json::json!({ name.clone(): fields })
        };
        serde_path_to_error::deserialize(tagged).map_err(|e| {
            // The path starts with the command's name.
            let path = e.path().to_string();
            match path.split_once('.') {
                _ if path == "." => anyhow::anyhow!("request: field `cmd`: {}", e.inner()),
                Some((_, field)) => anyhow::anyhow!("request: field `{field}`: {}", e.inner()),
                None => anyhow::anyhow!("request: {}", e.inner()),
            }
        })
    }
}

/// Which flows `flows` shows (also `vswitch ctl flows`'s options).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    /// Only flows entering on this port id.
    #[serde(default)]
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows entering from the overlay with this VNI.
    #[serde(default)]
    #[arg(long)]
    pub vni: Option<u32>,
    /// Only flows from or to this address.
    #[serde(default)]
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    /// Only this IP protocol (6 tcp, 17 udp, 1 icmp).
    #[serde(default)]
    #[arg(long)]
    pub proto: Option<u8>,
    /// At most this many (default 10 000).
    #[serde(default)]
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `port-add`'s fields (also `vswitch ctl port-add`'s arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PortAdd {
    /// The interface (tap) or port name, 1 to 15 bytes.
    pub name: String,
    /// `tap` or `vhost-user`.
    #[serde(rename = "type", default = "tap")]
    #[arg(long = "type", default_value = "tap")]
    pub kind: String,
    /// vhost-user: the socket's path.
    #[serde(default)]
    #[arg(long)]
    pub socket: Option<String>,
    /// vhost-user: `server` (the switch listens; default) or `client`.
    #[serde(default)]
    #[arg(long)]
    pub mode: Option<String>,
    /// vhost-user: the device's MAC (the VM's on this port).
    #[serde(default)]
    #[arg(long)]
    pub mac: Option<String>,
}

fn tap() -> String {
    "tap".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_reads_back_as_written() {
        let all = [
            Command::Stats,
            Command::Flows {
                filter: FlowFilter {
                    port: Some(3),
                    ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    ..Default::default()
                },
            },
            Command::Conntrack,
            Command::Nat,
            Command::SecurityGroups,
            Command::Services,
            Command::SecurityGroupSet {
                name: "web".into(),
                rules: vec![serde_json::json!({"direction": "ingress"})],
            },
            Command::Apply { ops: vec![] },
            Command::Topology,
            Command::Remotes { network: Some(100) },
            Command::Leases,
            Command::TopTalkers { limit: Some(5) },
            Command::PortAdd(PortAdd {
                name: "tap-x".into(),
                kind: "vhost-user".into(),
                socket: Some("/run/x.sock".into()),
                mode: None,
                mac: Some("02:00:00:00:00:01".into()),
            }),
            Command::PortRemove {
                name: "tap-x".into(),
            },
            Command::HandoverPrepare(Default::default()),
            Command::Handover(Default::default()),
        ];
        for c in all {
            assert_eq!(Command::parse(&c.to_line()).unwrap(), c);
        }
    }

    #[test]
    fn the_wire_names_are_the_ones_clients_send() {
        let name =
            |c: &Command| serde_json::from_str::<Value>(&c.to_line()).unwrap()["cmd"].clone();
        assert_eq!(name(&Command::Apply { ops: vec![] }), Command::APPLY);
        assert_eq!(name(&Command::TopTalkers { limit: None }), "top-talkers");
        assert_eq!(
            name(&Command::HandoverPrepare(Default::default())),
            "handover-prepare"
        );
        // What every binary so far sends to begin a handover.
        assert!(matches!(
            Command::parse(r#"{"cmd": "handover"}"#),
            Ok(Command::Handover(r)) if r.protocol == 1
        ));
        assert!(matches!(
            Command::parse(r#"{"cmd": "port-add", "name": "t1"}"#),
            Ok(Command::PortAdd(PortAdd { kind, .. })) if kind == "tap"
        ));
    }

    #[test]
    fn a_bad_request_is_refused_naming_what_is_wrong() {
        let e = |l: &str| Command::parse(l).unwrap_err().to_string();
        let unknown = e(r#"{"cmd": "frobnicate"}"#);
        assert!(
            unknown.contains("field `cmd`: unknown variant `frobnicate`"),
            "{unknown}"
        );
        assert!(unknown.contains("`stats`"), "{unknown}");
        assert_eq!(e(r#"{"stats": 1}"#), "request: field `cmd` is missing");
        assert_eq!(e(r#"{"cmd": 7}"#), "request: field `cmd`: not a string");
        assert!(e("not json").starts_with("request: "));
        assert_eq!(
            e(r#"{"cmd": "flows", "filter": {"port": 70000}}"#),
            "request: field `filter.port`: invalid value: integer `70000`, expected u16"
        );
        let ip = e(r#"{"cmd": "flows", "filter": {"ip": "10.0.0"}}"#);
        assert!(ip.starts_with("request: field `filter.ip`: "), "{ip}");
        let colour = e(r#"{"cmd": "flows", "filter": {"colour": 1}}"#);
        assert!(colour.contains("unknown field `colour`"), "{colour}");
        let name = e(r#"{"cmd": "port-remove"}"#);
        assert!(name.contains("missing field `name`"), "{name}");
        let packet = e(r#"{"cmd": "trace", "packet": {"src": "10.0.0.1", "dst": "x"}}"#);
        assert!(
            packet.starts_with("request: field `packet.dst`: "),
            "{packet}"
        );
    }
}
