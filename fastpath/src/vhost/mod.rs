//! vhost-user VM ports: virtio-net devices whose virtqueues the fast path
//! serves in the guest's memory.
//!
//! - [`virtq`]: the device side of the split virtqueues (`virtio-queue`
//!   walks descriptor chains, `vm-memory` checks every guest address):
//!   guest frames out in batches, frames in (merged over several buffers
//!   with `VIRTIO_NET_F_MRG_RXBUF`), one notification per batch if the
//!   guest asked (`VIRTIO_RING_F_EVENT_IDX`); every defect is a counted
//!   drop.
//! - [`port`]: the virtio-net device for `vhost-user-backend` (up to
//!   [`port::MAX_PAIRS`] queue pairs) and the fast path's handle on it.
//! - [`endpoint`]: the protocol thread per port (server or client mode,
//!   reconnects, handover of a live connection).
//! - [`shim`]: the pump between the VMM and the request handler, which
//!   mends QEMU's early ring enable and records the set-up.
//! - [`record`]: that set-up, replayed into the next handler.
//! - `vmm` (tests and benches, feature `test-vmm`): a VMM's side of a
//!   connection.

pub mod endpoint;
pub mod port;
pub mod record;
pub mod shim;
pub mod virtq;
#[cfg(any(test, feature = "test-vmm"))]
pub mod vmm;
