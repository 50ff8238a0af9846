//! What each snapshot format is, frozen.
//!
//! A snapshot's body is bincode, so its meaning is the exact shape of the
//! types it was written from: every field in order, every enum's variants
//! in order. Format 1 is written from the live types (`SwitchState` and
//! the coprocessor's `SharedState` under it). To keep "format 1" from
//! changing meaning silently when somebody adds a field to a connection,
//! its shape is checked in as data: `format/v1.json`, a serde-reflection
//! registry of every type a format-1 snapshot holds (tracing the types
//! by (de)serialization, which is exactly what bincode sees). A test
//! traces the live types again and fails when they no longer match.
//!
//! Then the next format is a deliberate step: freeze format 1's types as
//! Rust types of their own in a `v1` module (`serde-generate` writes them
//! from `format/v1.json`), convert them to the live types in `decode`, add
//! 2 to `READS`, set `FORMAT` to 2 and check in `format/v2.json`. The
//! checked-in fixture `fixtures/v1.snap` must keep loading throughout.
//!
//! Own Rust types for format 1 are not written today, while they would be
//! field for field the live ones: the registry is the frozen copy, and it
//! cannot drift, which a hand-kept duplicate could.

#[cfg(test)]
mod tests;
