//! What the coprocessor gives back for a punted frame, a tick, a report
//! or a change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use flowtable::{Action, FlowKey, Output, PortId};
use rustc_hash::FxHashSet;

use crate::PuntMsg;

counted_enum! {
    /// Why the coprocessor dropped (or did not answer) a frame. The order
    /// is the counters' (a handover carries them by index): add at the end.
    pub enum DropCause {
        UnknownPort => "unknown_port",
        Malformed => "malformed",
        UnsupportedEthertype => "unsupported_ethertype",
        SpoofedMac => "spoofed_mac",
        SpoofedIp => "spoofed_ip",
        ArpNotRequest => "arp_not_request",
        ArpUnknownTarget => "arp_unknown_target",
        ArpForSelf => "arp_for_self",
        BroadcastIp => "broadcast_ip",
        NoRoute => "no_route",
        UnknownDestination => "unknown_destination",
        ToGateway => "to_gateway",
        NoNeighbor => "no_neighbor",
        UnknownVni => "unknown_vni",
        UnknownRemoteSource => "unknown_remote_source",
        VtepMismatch => "vtep_mismatch",
        NotLocalVtep => "not_local_vtep",
        NoUplink => "no_uplink",
        TooBig => "too_big",
        TtlExpired => "ttl_expired",
        AclDenied => "acl_denied",
        CtInvalid => "ct_invalid",
        CtFull => "ct_full",
        CtQuota => "ct_quota",
        CtClash => "ct_clash",
        CtFragment => "ct_fragment",
        NatQuota => "nat_quota",
        NatExhausted => "nat_exhausted",
        NoExternal => "no_external",
        ExtNeighborPending => "ext_neighbor_pending",
        ExtUnsolicited => "ext_unsolicited",
        LbNoBackend => "lb_no_backend",
        LbConnLimit => "lb_conn_limit",
        LbReset => "lb_reset",
    }
}

/// The coprocessor's answer, which the fast-path thread applies as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// Flows to install in the fast-path thread's table.
    pub flows: Vec<(FlowKey, Action)>,
    /// Run the punted frame through the pipeline again once the flows are
    /// installed: it hits them, so actions have one implementation.
    pub reinject: bool,
    /// The punted frame, back to the fast path to run again (set by
    /// whoever holds it when `reinject` is asked and the message holds the
    /// whole frame).
    pub frame: Option<PuntMsg>,
    /// Frames the coprocessor made (ARP replies), with their output port.
    pub tx: Vec<(PortId, Vec<u8>)>,
    /// Set when the frame was dropped or left unanswered.
    pub drop: Option<DropCause>,
    /// Flows to remove from the fast path (connections that ended).
    pub remove: Vec<FlowKey>,
    /// Connections whose flows' last use the coprocessor needs.
    pub checks: Vec<CtCheck>,
    /// Flows a change of topology or policy affects; the change starts
    /// state version `version`.
    pub invalidate: Option<Invalidate>,
    /// The shared state's version this was decided under: flows decided
    /// under a version older than the fast path's last invalidation are
    /// not installed (the frame is decided again).
    pub version: u64,
}

impl Update {
    /// The part of `self` every fast-path thread applies, each to its own
    /// table: removals, the invalidation (with the version it starts) and
    /// the checks. The rest (flows, frames) is for the thread that punted.
    pub fn common(&self) -> Update {
        Update {
            remove: self.remove.clone(),
            invalidate: self.invalidate.clone(),
            checks: self.checks.clone(),
            version: self.version,
            ..Update::default()
        }
    }

    /// Nothing for the fast path to do.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
            && self.tx.is_empty()
            && self.frame.is_none()
            && self.remove.is_empty()
            && self.invalidate.is_none()
            && self.checks.is_empty()
    }
}

/// Which flows a change affects: a flow goes if its ingress context is in
/// `ctxs`, it outputs to a port in `outputs`, its source or destination
/// is in the address set of its ingress context, or it is a stateless
/// security-group flow (`acl`) and the policy changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidate {
    pub ctxs: HashSet<u32>,
    pub outputs: HashSet<PortId>,
    pub addrs: HashMap<u32, Arc<FxHashSet<u32>>>,
    pub acl: bool,
}

impl Invalidate {
    /// Does the flow (`key`, `action`) go?
    pub fn hits(&self, key: &FlowKey, action: &Action) -> bool {
        (self.acl && action.acl)
            || self.ctxs.contains(&key.ctx)
            || matches!(action.output, Output::Port(p) if self.outputs.contains(&p))
            || self
                .addrs
                .get(&key.ctx)
                .is_some_and(|s| s.contains(&key.src_ip) || s.contains(&key.dst_ip))
    }
}

/// A question to the fast path about a tracked connection's flows (one or
/// two keys); answered with a [`crate::Report::Checked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtCheck {
    pub id: u64,
    pub keys: [Option<FlowKey>; 2],
}
