//! A frame the fast path hands to the coprocessor.

use flowtable::{FlowKey, PortId};

counted_enum! {
    /// Why a frame goes to the coprocessor.
    pub enum PuntReason {
        /// No flow for the key: decide and install one.
        Miss => "miss",
        /// Always punted (ARP).
        Arp => "arp",
        /// The flow's action punts every packet.
        Action => "punt_action",
        /// The flow exists but the TTL would reach zero.
        TtlExpired => "ttl_expired",
        /// The flow exists but the frame is longer than its path carries.
        TooBig => "too_big",
        /// The flow exists but the frame came from another VTEP.
        VtepMismatch => "vtep_mismatch",
        /// A TCP segment of a tracked connection with SYN, FIN or RST.
        CtEvent => "conntrack_event",
    }
}

/// A punted frame. The fast path's messages come from a fixed pool and go
/// back to it (see `fastpath::punt`), so punting allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PuntMsg {
    pub ingress: PortId,
    pub reason: PuntReason,
    /// Offset of the (inner) Ethernet header in `data`: non-zero for
    /// frames from the uplink, whose outer headers are kept.
    pub inner_start: u16,
    /// Length of the frame as received; more than `data.len()` if the
    /// frame was longer than a message holds (the headers are enough for
    /// the "too big" answer).
    pub orig_len: u32,
    /// The key the fast path looked up, if it made one (absent for frames
    /// it punts without a lookup, such as ARP). Flows are installed under
    /// exactly this key.
    pub key: Option<FlowKey>,
    /// The fast path's clock (ns) when the frame was punted.
    pub punted_at: u64,
    /// The fast-path thread that punted it: its flows go to that thread's
    /// table (each thread has its own), and the frame runs again there.
    pub origin: u16,
    /// The frame as received: for uplink frames, outer headers included.
    pub data: Vec<u8>,
}

impl PuntMsg {
    /// An empty message whose buffer holds `cap` bytes (a pool's).
    pub fn with_capacity(cap: usize) -> PuntMsg {
        PuntMsg {
            ingress: PortId(0),
            reason: PuntReason::Miss,
            inner_start: 0,
            orig_len: 0,
            key: None,
            punted_at: 0,
            origin: 0,
            data: Vec::with_capacity(cap),
        }
    }

    /// A message holding all of `frame` (tests, `ctl trace`, benchmarks).
    pub fn of(
        ingress: PortId,
        reason: PuntReason,
        now: u64,
        frame: &[u8],
        key: Option<FlowKey>,
    ) -> PuntMsg {
        PuntMsg {
            ingress,
            reason,
            inner_start: 0,
            orig_len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            key,
            punted_at: now,
            origin: 0,
            data: frame.to_vec(),
        }
    }

    /// The inner Ethernet frame (empty if the message was truncated before it).
    pub fn inner(&self) -> &[u8] {
        self.data
            .get(usize::from(self.inner_start)..)
            .unwrap_or(&[])
    }

    /// The message holds the whole frame (it can be run again).
    pub fn is_whole(&self) -> bool {
        usize::try_from(self.orig_len).is_ok_and(|l| l == self.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_enums_index_densely_by_declaration_with_distinct_names() {
        for (i, r) in PuntReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(PuntReason::COUNT, 7);
        let mut names: Vec<_> = PuntReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PuntReason::COUNT);
    }

    #[test]
    fn a_truncated_message_is_not_whole_and_its_inner_frame_may_be_empty() {
        let mut m = PuntMsg::of(PortId(1), PuntReason::Miss, 5, &[1, 2, 3, 4], None);
        assert!(m.is_whole());
        m.inner_start = 2;
        assert_eq!(m.inner(), &[3, 4]);
        m.inner_start = 9;
        assert_eq!(m.inner(), &[] as &[u8]);
        m.orig_len = 9000;
        assert!(!m.is_whole());
    }
}
