//! vhost-user VM ports (issue 8, in progress): the virtio-net data path
//! served from the fast-path thread.
//!
//! Built so far: [`virtq`], the device side of a virtio-net port's split
//! virtqueues over guest memory, on the rust-vmm crates (`virtio-queue`
//! walks descriptor chains, direct and indirect, with its loop bound;
//! `vm-memory` checks every guest address): frames the guest sends (TX
//! queue) are copied out in batches; frames for the guest (RX queue) are
//! written into its buffers, merged over several when it negotiated
//! `VIRTIO_NET_F_MRG_RXBUF`; the guest is notified once per batch, and only
//! if it asked (`VIRTIO_RING_F_EVENT_IDX`). Every defect of guest input is
//! a counted drop. Not built yet: the vhost-user protocol endpoint
//! (`vhost-user-backend`), the port type in the poll loop and the config,
//! the handover of these ports.

pub mod port;
pub mod shim;
pub mod virtq;
