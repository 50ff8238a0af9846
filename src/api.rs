//! The change requests of the control API: `{"cmd": "apply", "ops": [...]}`
//! where each operation names its kind in `op` and carries the same
//! objects as the TOML config (`network`, `vm`, `remotes`,
//! `security_group`, `rules`, `external`, `service`). Unknown fields and wrong types are
//! refused with the operation's index; objects are checked as the config
//! checks them; the batch then applies whole or not at all.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::Result;
use coprocessor::acl::Policy;
use coprocessor::ops::Op;
use flowtable::PortId;
use serde::Deserialize;

use crate::config::{
    ExternalConfig, NetworkConfig, RemoteConfig, RuleConfig, SecurityGroupConfig, ServiceConfig,
    VmConfig,
};

/// One operation as the API takes it: `{"op": "add-vm", "vm": {...}}`.
#[derive(Debug, Clone)]
pub enum OpRequest {
    AddNetwork {
        network: NetworkConfig,
    },
    ChangeNetwork {
        network: NetworkConfig,
    },
    RemoveNetwork {
        vni: u32,
    },
    AddVm {
        vm: VmConfig,
    },
    ChangeVm {
        vm: VmConfig,
    },
    RemoveVm {
        name: String,
    },
    /// Add remote endpoints or move existing ones, in bulk.
    SetRemotes {
        remotes: Vec<RemoteConfig>,
    },
    RemoveRemotes {
        remotes: Vec<RemoteKey>,
    },
    AddSecurityGroup {
        security_group: SecurityGroupConfig,
    },
    RemoveSecurityGroup {
        name: String,
    },
    SetRules {
        name: String,
        rules: Vec<RuleConfig>,
    },
    /// Replace the external network (`null`: remove it).
    SetExternal {
        external: Option<ExternalConfig>,
    },
    AddService {
        service: ServiceConfig,
    },
    /// Replace a service (its backends in bulk, weights, limit).
    ChangeService {
        service: ServiceConfig,
    },
    RemoveService {
        name: String,
    },
}

/// A remote endpoint by address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteKey {
    pub network: u32,
    pub ip: Ipv4Addr,
}

/// `{"cmd": "apply", "ops": [...]}`, read straight from the request text
/// (a bulk change can be large).
#[derive(Debug)]
pub struct ApplyRequest {
    pub ops: Vec<OpRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApply<'a> {
    #[allow(dead_code)]
    cmd: &'a str,
    #[serde(borrow)]
    ops: Vec<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct OpName<'a> {
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
}

/// The operations' fields, after their `op` (the same shapes as
/// [`OpRequest`]'s variants).
mod args {
    use super::*;

    macro_rules! args {
        ($name:ident { $($field:ident: $ty:ty),* }) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $name {
                #[allow(dead_code)]
                op: serde::de::IgnoredAny,
                $(pub $field: $ty),*
            }
        };
    }
    args!(Network {
        network: NetworkConfig
    });
    args!(Vni { vni: u32 });
    args!(Vm { vm: VmConfig });
    args!(Name { name: String });
    args!(Remotes { remotes: Vec<RemoteConfig> });
    args!(Keys { remotes: Vec<RemoteKey> });
    args!(Group {
        security_group: SecurityGroupConfig
    });
    args!(Rules { name: String, rules: Vec<RuleConfig> });
    args!(External { external: Option<ExternalConfig> });
    args!(Service {
        service: ServiceConfig
    });
}

/// The operation's name when `op` is the object's first field (as
/// clients write it), without reading the rest of it; `None` otherwise.
fn leading_op(t: &str) -> Option<&str> {
    let rest = t.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix("\"op\"")?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    let name = &rest[..end];
    // Plain names only (no escapes).
    (!name.contains('\\')).then_some(name)
}

/// `text` as `T`; an error names the path to the field at fault.
fn typed<T: serde::de::DeserializeOwned>(text: &str, at: &str) -> Result<T> {
    // The fast way first; only a refused request pays for the path.
    serde_json::from_str(text).or_else(|_| {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("{at}.{path}: {}", e.into_inner())
        })
    })
}

impl ApplyRequest {
    /// Parse: each operation's `op` first, then its fields straight into
    /// their types (no intermediate tree, which would cost as much again
    /// for 100 000 endpoints).
    pub fn parse(text: &str) -> Result<ApplyRequest> {
        let raw: RawApply = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut ops = Vec::with_capacity(raw.ops.len());
        for (i, r) in raw.ops.iter().enumerate() {
            let at = format!("ops[{i}]");
            let t = r.get();
            let name = match leading_op(t) {
                Some(n) => std::borrow::Cow::Borrowed(n),
                None => {
                    serde_json::from_str::<OpName>(t)
                        .map_err(|e| anyhow::anyhow!("{at}: field `op`: {e}"))?
                        .op
                }
            };
            let op = match name.as_ref() {
                "add-network" => OpRequest::AddNetwork {
                    network: typed::<args::Network>(t, &at)?.network,
                },
                "change-network" => OpRequest::ChangeNetwork {
                    network: typed::<args::Network>(t, &at)?.network,
                },
                "remove-network" => OpRequest::RemoveNetwork {
                    vni: typed::<args::Vni>(t, &at)?.vni,
                },
                "add-vm" => OpRequest::AddVm {
                    vm: typed::<args::Vm>(t, &at)?.vm,
                },
                "change-vm" => OpRequest::ChangeVm {
                    vm: typed::<args::Vm>(t, &at)?.vm,
                },
                "remove-vm" => OpRequest::RemoveVm {
                    name: typed::<args::Name>(t, &at)?.name,
                },
                "set-remotes" => OpRequest::SetRemotes {
                    remotes: typed::<args::Remotes>(t, &at)?.remotes,
                },
                "remove-remotes" => OpRequest::RemoveRemotes {
                    remotes: typed::<args::Keys>(t, &at)?.remotes,
                },
                "add-security-group" => OpRequest::AddSecurityGroup {
                    security_group: typed::<args::Group>(t, &at)?.security_group,
                },
                "remove-security-group" => OpRequest::RemoveSecurityGroup {
                    name: typed::<args::Name>(t, &at)?.name,
                },
                "set-rules" => {
                    let a = typed::<args::Rules>(t, &at)?;
                    OpRequest::SetRules {
                        name: a.name,
                        rules: a.rules,
                    }
                }
                "set-external" => OpRequest::SetExternal {
                    external: typed::<args::External>(t, &at)?.external,
                },
                "add-service" => OpRequest::AddService {
                    service: typed::<args::Service>(t, &at)?.service,
                },
                "change-service" => OpRequest::ChangeService {
                    service: typed::<args::Service>(t, &at)?.service,
                },
                "remove-service" => OpRequest::RemoveService {
                    name: typed::<args::Name>(t, &at)?.name,
                },
                other => anyhow::bail!(
                    "{at}: field `op`: unknown variant `{other}`, expected one of {}",
                    OP_NAMES.join(", ")
                ),
            };
            ops.push(op);
        }
        Ok(ApplyRequest { ops })
    }
}

/// Every `op`.
const OP_NAMES: [&str; 15] = [
    "add-network",
    "change-network",
    "remove-network",
    "add-vm",
    "change-vm",
    "remove-vm",
    "set-remotes",
    "remove-remotes",
    "add-security-group",
    "remove-security-group",
    "set-rules",
    "set-external",
    "add-service",
    "change-service",
    "remove-service",
];

/// Check `ops` against the current policy and the switch's ports. Groups
/// added earlier in the same batch may be named.
pub fn build_ops(
    list: Vec<OpRequest>,
    ports: &HashMap<String, PortId>,
    policy: &Policy,
) -> Result<Vec<Op>> {
    // Groups this batch adds get the next ids, in order.
    let mut added: HashMap<String, u16> = HashMap::new();
    let mut next = policy.next_id();
    let mut out = Vec::with_capacity(list.len());
    for (i, req) in list.into_iter().enumerate() {
        let at = format!("ops[{i}]");
        let ids = |name: &str| policy.id(name).or_else(|| added.get(name).copied());
        let op = match req {
            OpRequest::AddNetwork { network } => Op::AddNetwork(network.build(&at)?),
            OpRequest::ChangeNetwork { network } => Op::ChangeNetwork(network.build(&at)?),
            OpRequest::RemoveNetwork { vni } => Op::RemoveNetwork(vni),
            OpRequest::AddVm { vm } => {
                Op::AddVm(vm.build(&format!("{at} (vm {})", vm.name), ports, &ids)?)
            }
            OpRequest::ChangeVm { vm } => {
                Op::ChangeVm(vm.build(&format!("{at} (vm {})", vm.name), ports, &ids)?)
            }
            OpRequest::RemoveVm { name } => Op::RemoveVm(name),
            OpRequest::SetRemotes { remotes } => Op::SetRemotes(
                remotes
                    .iter()
                    .enumerate()
                    .map(|(j, r)| r.build(&|| format!("{at}: remotes[{j}] ({})", r.ip), &ids))
                    .collect::<Result<_>>()?,
            ),
            OpRequest::RemoveRemotes { remotes } => {
                Op::RemoveRemotes(remotes.iter().map(|k| (k.network, k.ip)).collect())
            }
            OpRequest::AddSecurityGroup { security_group } => {
                added.insert(security_group.name.clone(), next);
                next = next.saturating_add(1);
                Op::AddGroup(security_group.build(&at)?)
            }
            OpRequest::RemoveSecurityGroup { name } => Op::RemoveGroup(name),
            OpRequest::SetExternal { external } => Op::SetExternal(
                external
                    .map(|e| e.build(ports))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("{at}: {e:#}"))?,
            ),
            OpRequest::AddService { service } => {
                Op::AddService(service.build(&format!("{at} (service {})", service.name))?)
            }
            OpRequest::ChangeService { service } => {
                Op::ChangeService(service.build(&format!("{at} (service {})", service.name))?)
            }
            OpRequest::RemoveService { name } => Op::RemoveService(name),
            OpRequest::SetRules { name, rules } => Op::SetRules(
                name,
                rules
                    .iter()
                    .enumerate()
                    .map(|(j, r)| {
                        r.build()
                            .map_err(|e| anyhow::anyhow!("{at}: rules[{j}]: {e}"))
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        out.push(op);
    }
    Ok(out)
}
