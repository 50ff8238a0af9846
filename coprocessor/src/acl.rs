//! Security groups: stateful ACLs per VM.
//!
//! A VM that belongs to at least one group is filtered: a new connection
//! it opens must match an egress rule of one of its groups, and a new
//! connection towards it must match an ingress rule (default deny
//! ingress; egress too is denied unless a rule allows it, so a group
//! meant to allow all egress says so with one rule). Replies of an allowed
//! connection need no rule: connection tracking lets them through. A VM in
//! no group is not filtered (port security off).
//!
//! A rule matches a protocol (or any), a destination port range (for ICMP:
//! a type range), and a peer: a CIDR, or the members of a group (remote
//! group rules follow membership, wherever the members live). Rules are
//! checked in order; the first match admits, and is remembered so an
//! operator can see which rule admitted a connection.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use thiserror::Error;

use crate::topology::Cidr;

/// Which way a new connection goes, seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Whom a rule admits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Peer {
    Cidr(Cidr),
    /// Members of this group (by name).
    Group(String),
}

/// One rule of a security group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub direction: Direction,
    /// IP protocol number; `None` for any.
    pub proto: Option<u8>,
    /// Destination ports (TCP/UDP) or ICMP types, inclusive.
    pub ports: (u16, u16),
    pub peer: Peer,
}

/// A named set of rules.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecurityGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// Which rule admitted a connection: group index and rule index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleRef {
    pub group: u16,
    pub rule: u16,
}

/// A rejected policy.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("security group {name}: defined twice")]
    Duplicate { name: String },
    #[error("security group {group}: rule {rule}: field `remote_group`: no group named {peer}")]
    UnknownPeerGroup {
        group: String,
        rule: usize,
        peer: String,
    },
    #[error("security group {group}: rule {rule}: field `ports`: {lo}-{hi} is an empty range")]
    EmptyPorts {
        group: String,
        rule: usize,
        lo: u16,
        hi: u16,
    },
    #[error("{object}: field `security_groups`: no group named {name}")]
    UnknownGroup { object: String, name: String },
    #[error("too many security groups (at most {max})")]
    TooMany { max: usize },
    #[error("security group {group}: field `rules`: more than {max} rules")]
    TooManyRules { group: String, max: usize },
    #[error("security group {name}: still used by {user}")]
    InUse { name: String, user: String },
}

#[derive(Debug, Clone)]
enum CompiledPeer {
    Net { addr: u32, mask: u32 },
    Group(usize),
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// 0 = any.
    proto: u8,
    lo: u16,
    hi: u16,
    peer: CompiledPeer,
}

/// Rules of one group split by direction, peers resolved.
#[derive(Debug, Clone, Default)]
struct Compiled {
    ingress: Vec<(u16, CompiledRule)>,
    egress: Vec<(u16, CompiledRule)>,
}

/// Every security group, compiled, and who belongs to each.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    groups: Vec<SecurityGroup>,
    compiled: Vec<Compiled>,
    by_name: HashMap<String, u16>,
    /// Members of each group: (VNI, address).
    members: Vec<HashSet<(u32, u32)>>,
    /// Bumped by every change; connections remember the version that
    /// admitted them.
    pub version: u64,
}

impl Policy {
    /// Compile `groups`. Membership is added with [`Policy::add_member`].
    pub fn new(groups: Vec<SecurityGroup>) -> Result<Policy, PolicyError> {
        let max = usize::from(u16::MAX);
        if groups.len() > max {
            return Err(PolicyError::TooMany { max });
        }
        let mut by_name = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            let i = u16::try_from(i).map_err(|_| PolicyError::TooMany { max })?;
            if by_name.insert(g.name.clone(), i).is_some() {
                return Err(PolicyError::Duplicate {
                    name: g.name.clone(),
                });
            }
        }
        let mut p = Policy {
            members: vec![HashSet::new(); groups.len()],
            compiled: Vec::new(),
            groups: Vec::new(),
            by_name,
            version: 0,
        };
        p.compiled = groups
            .iter()
            .map(|g| p.compile(g))
            .collect::<Result<_, _>>()?;
        p.groups = groups;
        Ok(p)
    }

    fn compile(&self, g: &SecurityGroup) -> Result<Compiled, PolicyError> {
        let mut c = Compiled::default();
        for (i, r) in g.rules.iter().enumerate() {
            if r.ports.0 > r.ports.1 {
                return Err(PolicyError::EmptyPorts {
                    group: g.name.clone(),
                    rule: i,
                    lo: r.ports.0,
                    hi: r.ports.1,
                });
            }
            let peer = match &r.peer {
                Peer::Cidr(c) => CompiledPeer::Net {
                    addr: u32::from(c.addr),
                    mask: c.mask(),
                },
                Peer::Group(name) => {
                    CompiledPeer::Group(usize::from(*self.by_name.get(name).ok_or_else(|| {
                        PolicyError::UnknownPeerGroup {
                            group: g.name.clone(),
                            rule: i,
                            peer: name.clone(),
                        }
                    })?))
                }
            };
            let rule = CompiledRule {
                proto: r.proto.unwrap_or(0),
                lo: r.ports.0,
                hi: r.ports.1,
                peer,
            };
            // Rules are named by their index in a u16 (a connection's
            // admitting rule, `ctl trace`).
            let idx = u16::try_from(i).map_err(|_| PolicyError::TooManyRules {
                group: g.name.clone(),
                max: usize::from(u16::MAX) + 1,
            })?;
            match r.direction {
                Direction::Ingress => c.ingress.push((idx, rule)),
                Direction::Egress => c.egress.push((idx, rule)),
            }
        }
        Ok(c)
    }

    /// The ids of groups named `names`, for an object called `object`.
    pub fn resolve(&self, object: &str, names: &[String]) -> Result<Vec<u16>, PolicyError> {
        names
            .iter()
            .map(|n| {
                self.by_name
                    .get(n)
                    .copied()
                    .ok_or_else(|| PolicyError::UnknownGroup {
                        object: object.into(),
                        name: n.clone(),
                    })
            })
            .collect()
    }

    /// The groups (removed ones included, with an empty name, so ids stay)
    /// and each group's members, for a snapshot.
    pub fn to_parts(&self) -> (Vec<SecurityGroup>, Vec<Vec<(u32, u32)>>) {
        let members = self
            .members
            .iter()
            .map(|m| {
                let mut v: Vec<(u32, u32)> = m.iter().copied().collect();
                v.sort_unstable();
                v
            })
            .collect();
        (self.groups.clone(), members)
    }

    /// Rebuild from [`Policy::to_parts`].
    pub fn from_parts(
        groups: Vec<SecurityGroup>,
        members: Vec<Vec<(u32, u32)>>,
        version: u64,
    ) -> Result<Policy, PolicyError> {
        let mut p = Policy {
            members: members
                .into_iter()
                .map(|m| m.into_iter().collect())
                .collect(),
            version,
            ..Policy::default()
        };
        p.members.resize(groups.len(), HashSet::new());
        for (i, g) in groups.iter().enumerate() {
            let id = u16::try_from(i).map_err(|_| PolicyError::TooMany {
                max: usize::from(u16::MAX) + 1,
            })?;
            if !g.name.is_empty() && p.by_name.insert(g.name.clone(), id).is_some() {
                return Err(PolicyError::Duplicate {
                    name: g.name.clone(),
                });
            }
        }
        p.compiled = groups
            .iter()
            .map(|g| {
                if g.name.is_empty() {
                    Ok(Compiled::default())
                } else {
                    p.compile(g)
                }
            })
            .collect::<Result<_, _>>()?;
        p.groups = groups;
        Ok(p)
    }

    /// `ip` in network `vni` is a member of group `id`.
    pub fn add_member(&mut self, id: u16, vni: u32, ip: Ipv4Addr) {
        if let Some(m) = self.members.get_mut(usize::from(id)) {
            m.insert((vni, u32::from(ip)));
        }
    }

    /// `ip` in network `vni` leaves group `id`.
    pub fn remove_member(&mut self, id: u16, vni: u32, ip: Ipv4Addr) {
        if let Some(m) = self.members.get_mut(usize::from(id)) {
            m.remove(&(vni, u32::from(ip)));
        }
    }

    /// Add a group.
    pub fn add_group(&mut self, g: SecurityGroup) -> Result<u16, PolicyError> {
        if self.by_name.contains_key(&g.name) {
            return Err(PolicyError::Duplicate { name: g.name });
        }
        let max = usize::from(u16::MAX);
        let id = u16::try_from(self.groups.len())
            .ok()
            .filter(|i| usize::from(*i) < max)
            .ok_or(PolicyError::TooMany { max })?;
        // Rules may name the group itself.
        self.by_name.insert(g.name.clone(), id);
        let c = match self.compile(&g) {
            Ok(c) => c,
            Err(e) => {
                self.by_name.remove(&g.name);
                return Err(e);
            }
        };
        self.groups.push(g);
        self.compiled.push(c);
        self.members.push(HashSet::new());
        self.version += 1;
        Ok(id)
    }

    /// Remove group `name`, refused while a rule of another group names
    /// it. (Members are the caller's to check.) Its id is not reused.
    pub fn remove_group(&mut self, name: &str) -> Result<SecurityGroup, PolicyError> {
        let id = self.existing(name)?;
        if let Some(user) = self.groups.iter().find(|g| {
            g.name != name
                && g.rules
                    .iter()
                    .any(|r| matches!(&r.peer, Peer::Group(p) if p == name))
        }) {
            return Err(PolicyError::InUse {
                name: name.into(),
                user: format!("a rule of security group {}", user.name),
            });
        }
        let i = usize::from(id);
        self.by_name.remove(name);
        let g = std::mem::replace(
            &mut self.groups[i],
            SecurityGroup {
                name: String::new(),
                rules: Vec::new(),
            },
        );
        self.compiled[i] = Compiled::default();
        self.members[i].clear();
        self.version += 1;
        Ok(g)
    }

    /// The id of group `name`, which must exist.
    fn existing(&self, name: &str) -> Result<u16, PolicyError> {
        self.id(name).ok_or_else(|| PolicyError::UnknownGroup {
            object: "request".into(),
            name: name.into(),
        })
    }

    /// The id the next added group gets.
    pub fn next_id(&self) -> u16 {
        u16::try_from(self.groups.len()).unwrap_or(u16::MAX)
    }

    /// The id of group `name`.
    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// Replace the rules of group `name`; all or nothing.
    pub fn set_rules(&mut self, name: &str, rules: Vec<Rule>) -> Result<(), PolicyError> {
        let id = self.existing(name)?;
        let g = SecurityGroup {
            name: name.into(),
            rules,
        };
        let c = self.compile(&g)?;
        let i = usize::from(id);
        self.compiled[i] = c;
        self.groups[i] = g;
        self.version += 1;
        Ok(())
    }

    /// The groups (removed ones have an empty name).
    pub fn groups(&self) -> impl Iterator<Item = &SecurityGroup> + '_ {
        self.groups.iter().filter(|g| !g.name.is_empty())
    }

    pub fn group_name(&self, id: u16) -> Option<&str> {
        self.groups.get(usize::from(id)).map(|g| g.name.as_str())
    }

    /// The first rule of `groups` that admits a new connection going
    /// `dir` with `peer` (in network `vni`), protocol `proto`, destination
    /// port (or ICMP type) `port`. `None`: denied.
    pub fn admits(
        &self,
        groups: &[u16],
        dir: Direction,
        vni: u32,
        peer: u32,
        proto: u8,
        port: u16,
    ) -> Option<RuleRef> {
        for &g in groups {
            let Some(c) = self.compiled.get(usize::from(g)) else {
                continue;
            };
            let rules = match dir {
                Direction::Ingress => &c.ingress,
                Direction::Egress => &c.egress,
            };
            for (idx, r) in rules {
                if (r.proto != 0 && r.proto != proto) || port < r.lo || port > r.hi {
                    continue;
                }
                let peer_ok = match r.peer {
                    CompiledPeer::Net { addr, mask } => peer & mask == addr,
                    CompiledPeer::Group(m) => self
                        .members
                        .get(m)
                        .is_some_and(|s| s.contains(&(vni, peer))),
                };
                if peer_ok {
                    return Some(RuleRef {
                        group: g,
                        rule: *idx,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(direction: Direction, proto: Option<u8>, ports: (u16, u16), peer: Peer) -> Rule {
        Rule {
            direction,
            proto,
            ports,
            peer,
        }
    }

    fn any() -> Peer {
        Peer::Cidr("0.0.0.0/0".parse().unwrap())
    }

    fn policy() -> Policy {
        let mut p = Policy::new(vec![
            SecurityGroup {
                name: "web".into(),
                rules: vec![
                    rule(Direction::Ingress, Some(6), (80, 80), any()),
                    rule(
                        Direction::Ingress,
                        Some(6),
                        (22, 22),
                        Peer::Cidr("10.9.0.0/16".parse().unwrap()),
                    ),
                    rule(
                        Direction::Ingress,
                        None,
                        (0, u16::MAX),
                        Peer::Group("db".into()),
                    ),
                    rule(Direction::Egress, None, (0, u16::MAX), any()),
                ],
            },
            SecurityGroup {
                name: "db".into(),
                rules: vec![],
            },
        ])
        .unwrap();
        p.add_member(1, 7, Ipv4Addr::new(10, 0, 0, 9));
        p
    }

    const PEER: u32 = 0x0a01_0203;

    #[test]
    fn rules_match_protocol_ports_and_peer() {
        let p = policy();
        let web = [0u16];
        let hit = |proto, port, peer| p.admits(&web, Direction::Ingress, 7, peer, proto, port);
        assert_eq!(hit(6, 80, PEER), Some(RuleRef { group: 0, rule: 0 }));
        assert_eq!(hit(17, 80, PEER), None, "protocol");
        assert_eq!(hit(6, 81, PEER), None, "port");
        assert_eq!(hit(6, 22, PEER), None, "peer outside the CIDR");
        assert_eq!(hit(6, 22, 0x0a09_0001), Some(RuleRef { group: 0, rule: 1 }));
        // Remote group: a member, in the right network only.
        let db = u32::from(Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(hit(17, 5432, db), Some(RuleRef { group: 0, rule: 2 }));
        assert_eq!(
            p.admits(&web, Direction::Ingress, 8, db, 17, 5432),
            None,
            "same address in another network is not a member"
        );
        assert!(p.admits(&web, Direction::Egress, 7, PEER, 17, 53).is_some());
        // A group with no rules denies both ways.
        assert_eq!(p.admits(&[1], Direction::Egress, 7, PEER, 6, 80), None);
        assert_eq!(p.admits(&[1], Direction::Ingress, 7, PEER, 6, 80), None);
    }

    #[test]
    fn a_group_with_more_rules_than_an_index_names_is_refused() {
        let group = |n| SecurityGroup {
            name: "huge".into(),
            rules: vec![rule(Direction::Egress, None, (0, u16::MAX), any()); n],
        };
        assert!(Policy::new(vec![group(65_536)]).is_ok());
        let Err(e) = Policy::new(vec![group(65_537)]) else {
            panic!("a rule without an index was accepted");
        };
        assert_eq!(
            e.to_string(),
            "security group huge: field `rules`: more than 65536 rules"
        );
    }

    #[test]
    fn bad_policies_name_the_group_rule_and_field() {
        let e = Policy::new(vec![SecurityGroup {
            name: "a".into(),
            rules: vec![rule(
                Direction::Ingress,
                None,
                (0, 1),
                Peer::Group("nope".into()),
            )],
        }])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "security group a: rule 0: field `remote_group`: no group named nope"
        );
        let e = Policy::new(vec![SecurityGroup {
            name: "a".into(),
            rules: vec![rule(Direction::Ingress, None, (9, 1), any())],
        }])
        .unwrap_err();
        assert!(e.to_string().contains("9-1 is an empty range"), "{e}");
        let g = SecurityGroup {
            name: "a".into(),
            rules: vec![],
        };
        assert!(matches!(
            Policy::new(vec![g.clone(), g]),
            Err(PolicyError::Duplicate { .. })
        ));
        let p = policy();
        assert!(p.resolve("vm x", &["web".into()]).is_ok());
        assert_eq!(
            p.resolve("vm x", &["nope".into()]).unwrap_err().to_string(),
            "vm x: field `security_groups`: no group named nope"
        );
    }

    #[test]
    fn set_rules_is_all_or_nothing() {
        let mut p = policy();
        let before: Vec<SecurityGroup> = p.groups().cloned().collect();
        let bad = vec![
            rule(Direction::Ingress, None, (0, 1), any()),
            rule(Direction::Ingress, None, (0, 1), Peer::Group("zz".into())),
        ];
        assert!(p.set_rules("web", bad).is_err());
        assert_eq!(p.groups().cloned().collect::<Vec<_>>(), before);
        assert_eq!(p.version, 0);
        p.set_rules("web", vec![]).unwrap();
        assert_eq!(p.version, 1);
        assert_eq!(
            p.admits(&[0], Direction::Ingress, 7, PEER, 6, 80),
            None,
            "the old rule no longer admits"
        );
    }
}
