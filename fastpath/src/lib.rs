//! The vswitch fast path.
//!
//! The I/O-free per-batch pipeline ([`pipeline::Pipeline`]) —
//! classification ([`classify`]), batched flow lookup, in-place actions
//! (MAC rewrite, TTL, NAT and connection events ([`rewrite`]), VXLAN
//! encap/decap), transmit lists ([`tx`]) — the punt path to the
//! coprocessor ([`punt`]), and the port drivers (tap, AF_XDP on the uplink
//! and on veth) with the poll loop ([`dataplane`]): this is the only crate
//! that touches packet I/O.

pub mod busy;
pub mod classify;
pub mod dataplane;
pub mod drop;
pub mod frame;
pub mod gro;
pub mod gso;
pub mod handoff;
pub mod hugepage;
pub mod offload;
pub mod packet;
pub mod pipeline;
pub mod port;
pub mod punt;
pub mod report;
pub mod request;
pub mod rewrite;
pub mod sweep;
pub mod synth;
pub mod tap;
pub mod totals;
pub mod tx;
pub mod umem;
pub mod vhost;
pub mod wake;
pub mod xdp;
pub mod xsk;

pub use classify::{Class, Classified, Classifier, Kind};
pub use drop::{DropCounters, DropReason};
pub use frame::{Desc, FrameMem, SliceMem, BATCH, MIN_HEADROOM};
pub use offload::Offload;
pub use pipeline::{BatchOut, Pipeline, PipelineConfig, PipelineCounters, PuntItem};
pub use punt::{punt_path, Budget, PuntConfig, PuntMsg, PuntReason, PuntReceiver, Punter};
pub use tx::TxLists;

// The flow table stores encap templates opaquely; they must be the size
// the vxlan crate builds.
const _: () = assert!(flowtable::ENCAP_LEN == vxlan::OUTER_LEN);
