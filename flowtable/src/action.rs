//! Pre-compiled actions and the interning table that holds them.
//!
//! Many flows share one action (every flow towards one remote VM uses the
//! same encapsulation template), so a flow entry stores a 32-bit
//! [`ActionId`] and the actions live here, deduplicated and reference
//! counted. The action table stays small and cache-resident even when the
//! flow table does not.

use std::collections::HashMap;

use crate::key::PortId;

/// Length of a VXLAN encapsulation over IPv4 without options: outer
/// Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8). The `vxlan` crate
/// builds templates of exactly this size; this crate stores them opaquely.
pub const ENCAP_LEN: usize = 50;

/// A MAC address.
pub type Mac = [u8; 6];

/// Where a frame goes after its rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Output {
    /// Transmit on this port.
    Port(PortId),
    /// Hand the frame to the coprocessor every time (e.g. traffic that a
    /// stage wants to see per packet).
    Punt,
    /// Drop and count it (e.g. traffic a security group denies), so
    /// repeated denied packets do not reach the coprocessor.
    Drop,
}

/// Prebuilt outer headers for VXLAN encapsulation (see the `vxlan` crate:
/// `vxlan::encap::Template`). Everything but the lengths, the checksum and
/// the UDP source port is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EncapTemplate(pub [u8; ENCAP_LEN]);

impl EncapTemplate {
    /// Where the remote VTEP (outer IPv4 destination) is: after the outer
    /// Ethernet header (14) at offset 16 of the IPv4 header.
    const REMOTE_VTEP: usize = 14 + 16;
    /// Where the VNI is: after Ethernet, IPv4 and UDP (42), at offset 4 of
    /// the VXLAN header, 24 bits.
    const VNI: usize = 42 + 4;

    /// The remote VTEP the template sends to (host order).
    pub fn remote_vtep(&self) -> u32 {
        let b = &self.0;
        let at = Self::REMOTE_VTEP;
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// The VNI the template carries.
    pub fn vni(&self) -> u32 {
        let b = &self.0;
        let at = Self::VNI;
        u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
    }

    /// The next hop's MAC (the outer Ethernet destination).
    pub fn next_hop_mac(&self) -> Mac {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.0[..6]);
        m
    }
}

impl serde::Serialize for EncapTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for EncapTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = EncapTemplate;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{ENCAP_LEN} bytes of encapsulation template")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<EncapTemplate, E> {
                v.try_into()
                    .map(EncapTemplate)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<EncapTemplate, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// Which end of a packet a NAT rewrite changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum NatSide {
    /// Source address (and port): SNAT.
    Src,
    /// Destination address (and port): DNAT.
    Dst,
}

/// An address (and optionally port) rewrite with incremental checksum
/// updates of the IPv4 header and the TCP/UDP/ICMP checksum. For ICMP
/// echo the "port" is the echo identifier, on either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Nat {
    pub side: NatSide,
    /// New address (host order).
    pub ip: u32,
    /// New port (or echo identifier); `None` keeps it (1:1 NAT).
    pub port: Option<u16>,
}

/// What the fast path does with a frame that hits a flow. Applied in this
/// order: decap, connection-event check, length check, TTL decrement, NAT,
/// MAC rewrite, encap, output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Action {
    pub output: Output,
    /// Strip the outer VXLAN headers (uplink flows) of frames sent by this
    /// remote VTEP (host-order IPv4). A frame of the flow arriving from any
    /// other VTEP is punted, so nobody on the underlay can inject traffic
    /// into a tenant flow by forging the outer source.
    pub decap: Option<u32>,
    /// Frames (after decap) longer than this are punted instead, so the
    /// coprocessor can answer "fragmentation needed" or fragment.
    pub max_len: u16,
    pub set_eth_src: Option<Mac>,
    pub set_eth_dst: Option<Mac>,
    /// Decrement the inner IPv4 TTL (routed flows). A frame whose TTL
    /// would reach zero is punted for the ICMP time-exceeded answer.
    pub dec_ttl: bool,
    /// Encapsulate towards a remote VTEP with this template.
    pub encap: Option<EncapTemplate>,
    /// Rewrite an address (and port) first: NAT.
    pub nat: Option<Nat>,
    /// A flow of a tracked connection: TCP segments with SYN, FIN or RST
    /// are punted (the coprocessor follows the connection's state, then
    /// reinjects them), and the owner reports the flow's removal so the
    /// connection's timers know when it was last used.
    pub conntrack: bool,
    /// A stateless flow admitted by security-group rules (or a denial's
    /// drop flow): removed whenever the policy changes, so it is compiled
    /// again under the new rules.
    pub acl: bool,
}

impl Action {
    /// Forward unchanged to `port`.
    pub fn output(port: PortId) -> Action {
        Action {
            output: Output::Port(port),
            decap: None,
            max_len: u16::MAX,
            set_eth_src: None,
            set_eth_dst: None,
            dec_ttl: false,
            encap: None,
            nat: None,
            conntrack: false,
            acl: false,
        }
    }

    /// Drop every packet of the flow.
    pub fn drop() -> Action {
        Action {
            output: Output::Drop,
            ..Action::output(PortId(0))
        }
    }

    /// Punt every packet of the flow.
    pub fn punt() -> Action {
        Action {
            output: Output::Punt,
            ..Action::output(PortId(0))
        }
    }
}

/// Index of an action in an [`ActionTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActionId(pub u32);

/// Deduplicated, reference-counted actions.
#[derive(Debug, Default)]
pub struct ActionTable {
    actions: Vec<Action>,
    refs: Vec<u32>,
    free: Vec<u32>,
    index: HashMap<Action, u32>,
}

impl ActionTable {
    /// An empty table with room for `n` distinct actions before it grows.
    pub fn with_capacity(n: usize) -> ActionTable {
        ActionTable {
            actions: Vec::with_capacity(n),
            refs: Vec::with_capacity(n),
            free: Vec::new(),
            index: HashMap::with_capacity(n),
        }
    }

    /// Take a reference on `a`, adding it if it is new.
    ///
    /// The number of live actions never exceeds the number of live flows,
    /// so this is bounded by the flow table's capacity.
    pub fn acquire(&mut self, a: &Action) -> ActionId {
        if let Some(&id) = self.index.get(a) {
            self.refs[id as usize] += 1;
            return ActionId(id);
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.actions[id as usize] = *a;
                self.refs[id as usize] = 1;
                id
            }
            None => {
                // Ids stay below the flow capacity, itself a u32.
                let id = u32::try_from(self.actions.len()).unwrap_or(u32::MAX);
                self.actions.push(*a);
                self.refs.push(1);
                id
            }
        };
        self.index.insert(*a, id);
        ActionId(id)
    }

    /// One more reference to a live action (from [`ActionTable::acquire`]).
    pub fn add_ref(&mut self, id: ActionId) {
        if let Some(r) = self.refs.get_mut(id.0 as usize) {
            *r += 1;
        }
    }

    /// Drop a reference taken by [`ActionTable::acquire`].
    pub fn release(&mut self, id: ActionId) {
        let i = id.0 as usize;
        let Some(r) = self.refs.get_mut(i) else {
            return;
        };
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.index.remove(&self.actions[i]);
            self.free.push(id.0);
        }
    }

    /// The action behind `id`. Ids come from [`ActionTable::acquire`] and
    /// stay valid while a flow holds them.
    #[inline(always)]
    pub fn get(&self, id: ActionId) -> Option<&Action> {
        self.actions.get(id.0 as usize)
    }

    /// Number of distinct live actions.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no action is live.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// References held on `id` (0 for a free or unknown id).
    pub fn refs(&self, id: ActionId) -> u32 {
        self.refs.get(id.0 as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_actions_are_shared_and_freed_with_the_last_reference() {
        let mut t = ActionTable::default();
        let a = Action::output(PortId(3));
        let id1 = t.acquire(&a);
        let id2 = t.acquire(&{ a });
        assert_eq!(id1, id2);
        assert_eq!(t.refs(id1), 2);
        let other = t.acquire(&Action::drop());
        assert_ne!(other, id1);
        assert_eq!(t.len(), 2);
        t.release(id1);
        assert_eq!(t.len(), 2);
        t.release(id1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.refs(id1), 0);
        // Releasing again, or an unknown id, is harmless.
        t.release(id1);
        t.release(ActionId(999));
        // The freed slot is reused.
        let again = t.acquire(&Action::punt());
        assert_eq!(again, id1);
        assert_eq!(t.get(again), Some(&Action::punt()));
    }
}
