//! What the coprocessor is given and what it gives back.

use flowtable::{Action, FlowKey, PortId};

/// Why the fast path punted a frame (mirrors the fast path's reasons; the
/// coprocessor does not depend on the fast path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PuntKind {
    /// No flow for the key: decide and install one.
    Miss,
    /// Always punted (ARP).
    Control,
    /// The flow exists but the frame is longer than its path can carry.
    TooBig,
    /// The flow exists but the TTL would reach zero.
    TtlExpired,
    /// The flow exists but the frame came from another VTEP.
    VtepMismatch,
    /// The flow's action punts every packet.
    Action,
    /// A TCP segment of a tracked connection with SYN, FIN or RST.
    CtEvent,
}

/// A frame the fast path punted.
#[derive(Debug, Clone, Copy)]
pub struct Punted<'a> {
    pub ingress: PortId,
    pub kind: PuntKind,
    /// The fast path's clock (ns) when the frame was punted.
    pub now: u64,
    /// The frame as received: for uplink frames, outer headers included.
    pub frame: &'a [u8],
    /// The key the fast path looked up (absent for frames it punts without
    /// a lookup, such as ARP). Flows are installed under exactly this key.
    pub key: Option<FlowKey>,
}

/// Why the coprocessor dropped (or did not answer) a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropCause {
    UnknownPort,
    Malformed,
    UnsupportedEthertype,
    SpoofedMac,
    SpoofedIp,
    ArpNotRequest,
    ArpUnknownTarget,
    ArpForSelf,
    BroadcastIp,
    NoRoute,
    UnknownDestination,
    ToGateway,
    NoNeighbor,
    UnknownVni,
    UnknownRemoteSource,
    VtepMismatch,
    NotLocalVtep,
    NoUplink,
    TooBig,
    TtlExpired,
    AclDenied,
    CtInvalid,
    CtFull,
    CtQuota,
    CtClash,
    CtFragment,
    NatQuota,
    NatExhausted,
    NoExternal,
    ExtNeighborPending,
    ExtUnsolicited,
}

impl DropCause {
    pub const ALL: &'static [DropCause] = &[
        DropCause::UnknownPort,
        DropCause::Malformed,
        DropCause::UnsupportedEthertype,
        DropCause::SpoofedMac,
        DropCause::SpoofedIp,
        DropCause::ArpNotRequest,
        DropCause::ArpUnknownTarget,
        DropCause::ArpForSelf,
        DropCause::BroadcastIp,
        DropCause::NoRoute,
        DropCause::UnknownDestination,
        DropCause::ToGateway,
        DropCause::NoNeighbor,
        DropCause::UnknownVni,
        DropCause::UnknownRemoteSource,
        DropCause::VtepMismatch,
        DropCause::NotLocalVtep,
        DropCause::NoUplink,
        DropCause::TooBig,
        DropCause::TtlExpired,
        DropCause::AclDenied,
        DropCause::CtInvalid,
        DropCause::CtFull,
        DropCause::CtQuota,
        DropCause::CtClash,
        DropCause::CtFragment,
        DropCause::NatQuota,
        DropCause::NatExhausted,
        DropCause::NoExternal,
        DropCause::ExtNeighborPending,
        DropCause::ExtUnsolicited,
    ];

    /// Stable snake_case name, for counters.
    pub const fn name(self) -> &'static str {
        match self {
            DropCause::UnknownPort => "unknown_port",
            DropCause::Malformed => "malformed",
            DropCause::UnsupportedEthertype => "unsupported_ethertype",
            DropCause::SpoofedMac => "spoofed_mac",
            DropCause::SpoofedIp => "spoofed_ip",
            DropCause::ArpNotRequest => "arp_not_request",
            DropCause::ArpUnknownTarget => "arp_unknown_target",
            DropCause::ArpForSelf => "arp_for_self",
            DropCause::BroadcastIp => "broadcast_ip",
            DropCause::NoRoute => "no_route",
            DropCause::UnknownDestination => "unknown_destination",
            DropCause::ToGateway => "to_gateway",
            DropCause::NoNeighbor => "no_neighbor",
            DropCause::UnknownVni => "unknown_vni",
            DropCause::UnknownRemoteSource => "unknown_remote_source",
            DropCause::VtepMismatch => "vtep_mismatch",
            DropCause::NotLocalVtep => "not_local_vtep",
            DropCause::NoUplink => "no_uplink",
            DropCause::TooBig => "too_big",
            DropCause::TtlExpired => "ttl_expired",
            DropCause::AclDenied => "acl_denied",
            DropCause::CtInvalid => "ct_invalid",
            DropCause::CtFull => "ct_full",
            DropCause::CtQuota => "ct_quota",
            DropCause::CtClash => "ct_clash",
            DropCause::CtFragment => "ct_fragment",
            DropCause::NatQuota => "nat_quota",
            DropCause::NatExhausted => "nat_exhausted",
            DropCause::NoExternal => "no_external",
            DropCause::ExtNeighborPending => "ext_neighbor_pending",
            DropCause::ExtUnsolicited => "ext_unsolicited",
        }
    }

    /// Index into a counter array.
    pub fn index(self) -> usize {
        DropCause::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// The coprocessor's answer to one punted frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Flows to install in the ingress fast-path thread's table.
    pub flows: Vec<(FlowKey, Action)>,
    /// Run the punted frame through the pipeline again once the flows are
    /// installed: it hits them, so actions have one implementation.
    pub reinject: bool,
    /// Frames the coprocessor made (ARP replies), with their output port.
    pub tx: Vec<(PortId, Vec<u8>)>,
    /// Set when the frame was dropped or left unanswered.
    pub drop: Option<DropCause>,
    /// Flows to remove from the fast path (connections that ended).
    pub remove: Vec<FlowKey>,
    /// Connections whose flows' last use the coprocessor needs.
    pub checks: Vec<CtCheck>,
    /// Flows a change of topology or policy affects.
    pub invalidate: Option<Invalidate>,
    /// The shared state's version this was decided under: flows decided
    /// under a version older than the fast path's last invalidation are
    /// not installed.
    pub version: u64,
}

/// Which flows a change affects: a flow goes if its ingress context is in
/// `ctxs`, it outputs to a port in `outputs`, its source or destination
/// is in the address set of its ingress context, or it is a stateless
/// security-group flow (`acl`) and the policy changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidate {
    pub ctxs: std::collections::HashSet<u32>,
    pub outputs: std::collections::HashSet<PortId>,
    pub addrs: std::collections::HashMap<u32, std::sync::Arc<rustc_hash::FxHashSet<u32>>>,
    pub acl: bool,
}

impl Invalidate {
    /// Does the flow (`key`, `action`) go?
    pub fn hits(&self, key: &FlowKey, action: &Action) -> bool {
        (self.acl && action.acl)
            || self.ctxs.contains(&key.ctx)
            || matches!(action.output, flowtable::Output::Port(p) if self.outputs.contains(&p))
            || self
                .addrs
                .get(&key.ctx)
                .is_some_and(|s| s.contains(&key.src_ip) || s.contains(&key.dst_ip))
    }
}

/// A question to the fast path about a connection's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtCheck {
    pub id: u64,
    pub keys: [Option<FlowKey>; 2],
}
