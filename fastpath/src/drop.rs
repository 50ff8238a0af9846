//! Drop reasons: one counter each, one name each, no strings on the path.

use vxlan::{DecapError, HeaderError};

use dpif::counted_enum;

counted_enum! {
    /// Why the fast path dropped a frame. Parser errors convert into it.
    pub enum DropReason {
        BadDescriptor => "bad_descriptor",
        TooShort => "too_short",
        VlanTagged => "vlan_tagged",
        Ipv6 => "ipv6_unsupported",
        UnsupportedEthertype => "unsupported_ethertype",
        BadIpVersion => "bad_ip_version",
        BadIpHeaderLen => "bad_ip_header_len",
        BadIpTotalLen => "bad_ip_total_len",
        L4TooShort => "l4_too_short",
        OuterTooShort => "outer_too_short",
        OuterNotIpv4 => "outer_not_ipv4",
        OuterBadIpVersion => "outer_bad_ip_version",
        OuterBadIpHeaderLen => "outer_bad_ip_header_len",
        OuterIpOptions => "outer_ip_options",
        OuterBadIpTotalLen => "outer_bad_ip_total_len",
        OuterFragment => "outer_fragment",
        OuterBadChecksum => "outer_bad_checksum",
        OuterNotUdp => "outer_not_udp",
        NotLocalVtep => "not_local_vtep",
        NotVxlanPort => "not_vxlan_port",
        BadUdpLen => "bad_udp_len",
        VxlanNoIFlag => "vxlan_no_i_flag",
        VxlanReservedBits => "vxlan_reserved_bits",
        FlowDrop => "flow_drop",
        NoHeadroom => "no_headroom",
        BadOutputPort => "bad_output_port",
        PuntOverBudget => "punt_over_budget",
        PuntQueueFull => "punt_queue_full",
        PuntPoolEmpty => "punt_pool_empty",
        TxOverflow => "tx_overflow",
        NatFragment => "nat_fragment",
        NatTooShort => "nat_too_short",
        VtepMismatch => "vtep_mismatch",
        PuntSenderOverBudget => "punt_sender_over_budget",
        /// A frame or offset too large for its field (no pool chunk holds
        /// one; counted rather than truncated to a wrong value).
        FrameTooLong => "frame_too_long",
        /// Offload metadata from a tap or guest: checksum start or offset
        /// outside the frame.
        OffloadBadCsumOffsets => "offload_bad_csum_offsets",
        /// A GSO type the switch does not take (UFO) or does not know.
        OffloadBadGsoType => "offload_bad_gso_type",
        /// A GSO frame with a segment size of zero.
        OffloadBadGsoSize => "offload_bad_gso_size",
        /// A GSO frame whose headers are not what its type says (not
        /// IPv4 TCP/UDP, checksum not at the L4 header, a fragment, cut
        /// short).
        OffloadBadHeaders => "offload_bad_headers",
        /// A GSO frame that would become more segments than one
        /// super-frame may (`offload::MAX_SEGS`).
        OffloadTooManySegments => "offload_too_many_segments",
        /// A segment or a completed frame did not fit a pool chunk, or no
        /// chunk was free for it.
        OffloadNoRoom => "offload_no_room",
    }
}

impl From<DecapError> for DropReason {
    fn from(e: DecapError) -> DropReason {
        match e {
            DecapError::TooShort(_) => DropReason::OuterTooShort,
            DecapError::NotIpv4(_) => DropReason::OuterNotIpv4,
            DecapError::BadIpVersion(_) => DropReason::OuterBadIpVersion,
            DecapError::BadIpHeaderLen(_) => DropReason::OuterBadIpHeaderLen,
            DecapError::IpOptions(_) => DropReason::OuterIpOptions,
            DecapError::BadIpTotalLen { .. } => DropReason::OuterBadIpTotalLen,
            DecapError::Fragment(_) => DropReason::OuterFragment,
            DecapError::BadIpChecksum => DropReason::OuterBadChecksum,
            DecapError::NotUdp(_) => DropReason::OuterNotUdp,
            DecapError::NotLocalVtep(_) => DropReason::NotLocalVtep,
            DecapError::NotVxlanPort(_) => DropReason::NotVxlanPort,
            DecapError::BadUdpLen { .. } => DropReason::BadUdpLen,
            DecapError::Header(HeaderError::Truncated(_)) => DropReason::OuterTooShort,
            DecapError::Header(HeaderError::MissingIFlag(_)) => DropReason::VxlanNoIFlag,
            DecapError::Header(HeaderError::ReservedBits { .. }) => DropReason::VxlanReservedBits,
        }
    }
}

/// Per-thread drop counters, indexed by reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropCounters(pub [u64; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters([0; DropReason::COUNT])
    }
}

impl DropCounters {
    #[inline(always)]
    pub fn bump(&mut self, r: DropReason) {
        if let Some(c) = self.0.get_mut(r.index()) {
            *c += 1;
        }
    }

    pub fn get(&self, r: DropReason) -> u64 {
        self.0.get(r.index()).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counters with their names.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), self.get(*r)))
            .filter(|(_, n)| *n != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_indices_dense() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn counters_count_by_reason() {
        let mut c = DropCounters::default();
        c.bump(DropReason::TooShort);
        c.bump(DropReason::TooShort);
        c.bump(DropReason::FlowDrop);
        assert_eq!(c.get(DropReason::TooShort), 2);
        assert_eq!(c.total(), 3);
        assert_eq!(
            c.nonzero().collect::<Vec<_>>(),
            vec![("too_short", 2), ("flow_drop", 1)]
        );
    }
}
