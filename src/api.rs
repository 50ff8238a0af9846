//! The change requests of the control API: `{"cmd": "apply", "ops": [...]}`
//! where each operation names its kind in `op` and carries the same
//! objects as the TOML config (`network`, `vm`, `remotes`,
//! `security_group`, `rules`). Unknown fields and wrong types are
//! refused with the operation's index; objects are checked as the config
//! checks them; the batch then applies whole or not at all.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use coprocessor::acl::Policy;
use coprocessor::ops::Op;
use flowtable::PortId;
use serde::Deserialize;

use crate::config::{NetworkConfig, RemoteConfig, RuleConfig, SecurityGroupConfig, VmConfig};

/// One operation as the API takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
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
}

/// A remote endpoint by address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteKey {
    pub network: u32,
    pub ip: Ipv4Addr,
}

/// Parse and check `ops` (JSON array) against the current policy and the
/// switch's ports. Groups added earlier in the same batch may be named.
pub fn build_ops(
    ops: &serde_json::Value,
    ports: &HashMap<String, PortId>,
    policy: &Policy,
) -> Result<Vec<Op>> {
    let list = ops
        .as_array()
        .context("field `ops` is missing or not an array")?;
    // Groups this batch adds get the next ids, in order.
    let mut added: HashMap<String, u16> = HashMap::new();
    let mut next = policy.next_id();
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let at = format!("ops[{i}]");
        let req: OpRequest =
            serde_json::from_value(v.clone()).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
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
                    .map(|(j, r)| r.build(&format!("{at}: remotes[{j}] ({})", r.ip), &ids))
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
