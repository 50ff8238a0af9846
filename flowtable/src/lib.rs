//! The exact-match flow table of the vswitch fast path.
//!
//! A flow is a [`FlowKey`] (ingress context plus IPv4 header fields) bound
//! to a pre-compiled [`Action`] (output port, MAC rewrite, TTL decrement,
//! VXLAN encap template or decap, punt, drop). The coprocessor compiles
//! flows; the fast-path thread that owns a [`FlowTable`] installs them and
//! looks every packet up in it. The crate is pure data structure: no
//! threads, no I/O, no clock (callers pass `now`).

pub mod action;
pub mod key;
pub mod slots;
pub mod table;

pub use action::{
    Action, ActionId, ActionTable, EncapTemplate, Mac, Nat, NatSide, Output, ENCAP_LEN,
};
pub use key::{FlowHasher, FlowKey, Ingress, KeyFlags, PortId, Vni};
pub use table::{
    CapacityError, FlowEntry, FlowStats, FlowTable, Hit, InsertError, TableCounters, MAX_CAPACITY,
    MAX_PSL,
};
