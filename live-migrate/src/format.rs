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
//! **Format 2** (load-balanced services) is format 1's body unchanged,
//! then a second bincode value, `Since2`, whose shape is frozen the same
//! way in `format/since2.json`. So a format-1 snapshot is read by the
//! same types (its `Since2` is empty), and the live types of format 1
//! still need no frozen Rust copy: the registry test holds them to
//! `format/v1.json`. Both fixtures, `fixtures/v1.snap` (written by the
//! previous release) and `fixtures/v2.snap`, are loaded by the tests.
//!
//! The next format is again a deliberate step. Adding state: a `Since3`
//! after `Since2`. Changing a type format 1 or 2 holds: freeze the old
//! shape as Rust types of its own in a `v1` module (`serde-generate`
//! writes them from the JSON registry) and convert in `decode`; a
//! hand-kept duplicate is only worth having then, when it would differ
//! from the live one.

#[cfg(test)]
mod tests;
