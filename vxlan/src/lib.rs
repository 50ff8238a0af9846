//! VXLAN (RFC 7348) over IPv4 on byte buffers: no I/O, no allocation.
//!
//! * [`wire`]: the VXLAN header view and the outer header offsets.
//! * [`encap`]: prebuilt [`encap::Template`]s written into a frame's headroom.
//! * [`decap`]: validation of an outer frame, with one error per defect.
//! * [`checksum`]: the Internet checksum and its incremental update.

pub mod checksum;
pub mod decap;
pub mod encap;
pub mod wire;

pub use decap::{decap, DecapConfig, DecapError, Decapped};
pub use encap::{
    encap, encap_for_segmentation, source_port, EncapError, Template, TemplateError, TemplateSpec,
};
pub use wire::{HeaderError, OUTER_LEN, UDP_PORT};
