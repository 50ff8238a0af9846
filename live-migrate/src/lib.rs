//! Live handover between two vswitch binaries: the versioned state
//! snapshot (this module), the typed handover protocol (`protocol`) and
//! descriptor passing with SCM_RIGHTS (`fdpass`), `shared/DESIGN.md` §7.
//!
//! A snapshot is a 24-byte header — magic `VSWSNAP\0`, format version
//! (u32 LE), body length (u64 LE), CRC-32 of the body (u32 LE) — and a
//! bincode body ([`SwitchState`]). A snapshot that is not one, is cut
//! short, fails its checksum, or has a format this binary does not read
//! is refused with an error that says which; nothing is half-restored.
//! Each released format is frozen with a checked-in fixture
//! (`fixtures/vN.snap`) that the tests load, so a newer binary keeps
//! reading what the previous one wrote.

pub mod fdpass;
pub mod format;
pub mod memfd;
pub mod protocol;

use coprocessor::shared::SharedState;
use flowtable::{Action, FlowKey, FlowStats};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"VSWSNAP\0";
/// The format this binary writes.
pub const FORMAT: u32 = 2;
/// Formats this binary reads.
pub const READS: &[u32] = &[1, 2];
const HEADER: usize = 24;

/// One fast-path flow; its action is an index into
/// [`SwitchState::actions`] (many flows share one action, as in the flow
/// table: a million flows carry a few thousand actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub action: u32,
    pub stats: FlowStats,
}

/// Bytes of one packed [`FlowRecord`]: key 20, action 4, packets,
/// bytes, last use 8 each, little-endian.
pub const FLOW_BYTES: usize = 48;

/// Flows packed as fixed-size records (a million flows encode and decode
/// as one block of bytes, not field by field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows(#[serde(with = "serde_bytes")] Vec<u8>);

impl Flows {
    pub fn with_capacity(n: usize) -> Flows {
        Flows(Vec::with_capacity(n * FLOW_BYTES))
    }

    pub fn push(&mut self, f: &FlowRecord) {
        self.0.extend_from_slice(&f.to_bytes());
    }

    /// The records, owning the bytes (to hand them to another thread).
    pub fn into_records(self) -> impl Iterator<Item = FlowRecord> + Send {
        let n = self.len();
        (0..n).map(move |i| record(&self.0[i * FLOW_BYTES..(i + 1) * FLOW_BYTES]))
    }

    pub fn len(&self) -> usize {
        self.0.len() / FLOW_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() < FLOW_BYTES
    }

    /// The records (a trailing partial record is ignored).
    pub fn iter(&self) -> impl Iterator<Item = FlowRecord> + '_ {
        self.0.chunks_exact(FLOW_BYTES).map(record)
    }
}

impl SwitchState {
    /// The flows with their actions (records naming no action are skipped).
    pub fn flows(&self) -> impl Iterator<Item = (FlowKey, Action)> + '_ {
        self.flows.iter().filter_map(|f| {
            self.actions
                .get(usize::try_from(f.action).ok()?)
                .map(|a| (f.key, *a))
        })
    }
}

impl FlowRecord {
    /// The record's 48 bytes (little-endian fields, as `Flows` stores them).
    pub fn to_bytes(&self) -> [u8; FLOW_BYTES] {
        let k = &self.key;
        let mut r = [0u8; FLOW_BYTES];
        r[0..4].copy_from_slice(&k.ctx.to_le_bytes());
        r[4..8].copy_from_slice(&k.src_ip.to_le_bytes());
        r[8..12].copy_from_slice(&k.dst_ip.to_le_bytes());
        r[12..14].copy_from_slice(&k.src_port.to_le_bytes());
        r[14..16].copy_from_slice(&k.dst_port.to_le_bytes());
        r[16] = k.proto;
        r[17] = k.flags;
        r[20..24].copy_from_slice(&self.action.to_le_bytes());
        r[24..32].copy_from_slice(&self.stats.packets.to_le_bytes());
        r[32..40].copy_from_slice(&self.stats.bytes.to_le_bytes());
        r[40..48].copy_from_slice(&self.stats.last_used.to_le_bytes());
        r
    }
}

/// One 48-byte record (`c` holds at least 48 bytes).
pub(crate) fn record(c: &[u8]) -> FlowRecord {
    let u16_at = |i: usize| u16::from_le_bytes([c[i], c[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&c[i..i + 8]);
        u64::from_le_bytes(b)
    };
    FlowRecord {
        key: FlowKey {
            ctx: u32_at(0),
            src_ip: u32_at(4),
            dst_ip: u32_at(8),
            src_port: u16_at(12),
            dst_port: u16_at(14),
            proto: c[16],
            flags: c[17],
            pad: 0,
        },
        action: u32_at(20),
        stats: FlowStats {
            packets: u64_at(24),
            bytes: u64_at(32),
            last_used: u64_at(40),
        },
    }
}

/// Everything a running switch hands to the next binary: format 1's body
/// is this struct; format 2's is the same, then [`Since2`] (see
/// [`format`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchState {
    /// The fast path's clock when the snapshot was taken (ns since its
    /// start); the next binary continues this clock, so every stored time
    /// (flow use, connection timers, leases) stays meaningful.
    pub clock_ns: u64,
    /// The configuration the switch started from (TOML text).
    pub config: String,
    /// Topology, policy, connections with their NAT bindings, leases.
    pub shared: SharedState,
    /// The distinct actions of the flows.
    pub actions: Vec<Action>,
    /// The fast path's flows, so the next binary starts warm.
    pub flows: Flows,
    /// What format 2 added (`None` when read from format 1: the previous
    /// release had none of it). Not part of format 1's body: written after
    /// it.
    #[serde(skip)]
    pub since2: Option<Since2>,
}

/// The state format 2 adds after format 1's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since2 {
    /// Load-balanced services (their live connections are in
    /// `shared.conns`).
    pub services: Vec<coprocessor::services::ServiceSpec>,
}

/// Why a snapshot was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a vswitch snapshot (bad magic)")]
    NotASnapshot,
    #[error("snapshot format {found} is not one this binary reads ({READS:?})")]
    UnsupportedFormat { found: u32 },
    #[error("snapshot truncated: {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("snapshot corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Corrupt { expected: u32, found: u32 },
    #[error("snapshot body: {0}")]
    Body(String),
    #[error("snapshot memory: {0}")]
    Memory(String),
}

/// `state` as a snapshot.
pub fn encode(state: &SwitchState) -> Result<Vec<u8>, SnapshotError> {
    let mut out = vec![0u8; HEADER];
    write_body(&mut out, state).map_err(|e| SnapshotError::Body(e.to_string()))?;
    seal_header(&mut out);
    Ok(out)
}

/// The body of a snapshot of [`FORMAT`]: format 1's, then [`Since2`].
pub(crate) fn write_body(mut w: impl std::io::Write, state: &SwitchState) -> bincode::Result<()> {
    bincode::serialize_into(&mut w, state)?;
    let empty = Since2::default();
    bincode::serialize_into(&mut w, state.since2.as_ref().unwrap_or(&empty))
}

/// Fill in the header of `snap` (24 header bytes, then the body).
fn seal_header(snap: &mut [u8]) {
    let (h, body) = snap.split_at_mut(HEADER);
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[12..20].copy_from_slice(&(body.len() as u64).to_le_bytes());
    h[20..24].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
}

/// The state in snapshot `bytes`, every check passed.
pub fn decode(bytes: &[u8]) -> Result<SwitchState, SnapshotError> {
    let (Some(magic), Some(format), Some(len), Some(crc)) = (
        bytes.get(..8),
        bytes.get(8..12),
        bytes.get(12..20),
        bytes.get(20..24),
    ) else {
        return Err(if bytes.len() >= 8 && bytes[..8] != MAGIC {
            SnapshotError::NotASnapshot
        } else {
            SnapshotError::Truncated {
                expected: HEADER as u64,
                got: bytes.len() as u64,
            }
        });
    };
    if magic != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let format = u32::from_le_bytes(format.try_into().unwrap_or([0; 4]));
    if !READS.contains(&format) {
        return Err(SnapshotError::UnsupportedFormat { found: format });
    }
    let len = u64::from_le_bytes(len.try_into().unwrap_or([0; 8]));
    let body = &bytes[HEADER..];
    if (body.len() as u64) < len {
        return Err(SnapshotError::Truncated {
            expected: HEADER as u64 + len,
            got: bytes.len() as u64,
        });
    }
    let body = &body[..usize::try_from(len).unwrap_or(usize::MAX).min(body.len())];
    let expected = u32::from_le_bytes(crc.try_into().unwrap_or([0; 4]));
    let found = crc32fast::hash(body);
    if found != expected {
        return Err(SnapshotError::Corrupt { expected, found });
    }
    // Format 2 is format 1's body, then what format 2 added. Read from
    // the slice (not a reader), so a hostile length is checked against
    // the bytes there are before anything is allocated for it. These
    // options are those of `bincode::serialize`.
    use bincode::Options;
    let err = |e: bincode::Error| SnapshotError::Body(e.to_string());
    let opts = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes();
    let mut de = bincode::Deserializer::from_slice(body, opts);
    let mut state = SwitchState::deserialize(&mut de).map_err(err)?;
    if format >= 2 {
        state.since2 = Some(Since2::deserialize(&mut de).map_err(err)?);
    }
    Ok(state)
}

#[cfg(test)]
mod tests;
