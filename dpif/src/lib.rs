//! The contract between the fast path and the coprocessor (the name is
//! OVS's: the datapath interface). One definition of everything that
//! crosses between them, used as-is on both sides; the binary passes it
//! through without translating:
//!
//! - [`PuntMsg`]: a frame the fast path could not handle, with why
//!   ([`PuntReason`]) and the key it looked up;
//! - [`Update`]: what the coprocessor gives back — flows to install (or
//!   not, if decided under a stale [`Update::version`]), removals,
//!   invalidations, questions about connections' flows ([`CtCheck`]),
//!   frames to send, and the punted frame to run again;
//! - [`Report`]: what the fast path tells the coprocessor about flows of
//!   tracked connections ([`FlowUse`]);
//! - [`steer`]: which coprocessor thread, and which shard of the
//!   connection table, a key belongs to;
//! - [`counted_enum!`]: reasons with stable names and dense counter
//!   indices ([`PuntReason`], [`DropCause`], the fast path's drop reasons).
//!
//! A leaf: data only, no threads, no I/O (`shared/DESIGN.md` §1).

#[macro_use]
mod counted;
pub mod punt;
pub mod report;
pub mod steer;
pub mod update;

pub use punt::{PuntMsg, PuntReason};
pub use report::{CheckAnswer, FlowUse, Report};
pub use update::{CtCheck, DropCause, Invalidate, Update};
