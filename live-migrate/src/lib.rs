//! Live handover between two vswitch binaries: the versioned state
//! snapshot (this module) and, to come, the handover protocol over the
//! control socket passing tap and listener fds with SCM_RIGHTS
//! (`shared/DESIGN.md` §7).
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

use coprocessor::shared::SharedState;
use flowtable::{Action, FlowKey, FlowStats};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"VSWSNAP\0";
/// The format this binary writes.
pub const FORMAT: u32 = 1;
/// Formats this binary reads.
pub const READS: &[u32] = &[1];
const HEADER: usize = 24;

/// One fast-path flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub action: Action,
    pub stats: FlowStats,
}

/// Everything a running switch hands to the next binary (format 1).
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
    /// The fast path's flows, so the next binary starts warm.
    pub flows: Vec<FlowRecord>,
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
}

/// `state` as a snapshot.
pub fn encode(state: &SwitchState) -> Result<Vec<u8>, SnapshotError> {
    let body = bincode::serialize(state).map_err(|e| SnapshotError::Body(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
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
    // Format 1 is the current one; an older format would be read through
    // its frozen types here and converted.
    bincode::deserialize(body).map_err(|e| SnapshotError::Body(e.to_string()))
}

#[cfg(test)]
mod tests;
