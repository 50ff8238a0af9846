//! The handover protocol: one type per message, each carrying the
//! protocol version, read back with every field checked.
//!
//! The conversation (`shared/DESIGN.md` §7) over the control socket:
//!
//! | new binary sends | old binary answers |
//! |---|---|
//! | [`PrepareRequest`] (a control request's line) | [`PrepareAnswer`] or an [`ErrorAnswer`] (a JSON line) |
//! | [`HandoverRequest`] (a control request's line) | [`Offer`] (framed, with descriptors) or an [`ErrorAnswer`] |
//! | [`READY`] | [`PauseHeader`] (framed, with the vhost-user descriptors), the free list |
//! | [`CONFIRM`] | [`ACK`] |
//!
//! A framed message is its length (u64 LE, the descriptors ride on
//! these 8 bytes) followed by that many bytes of JSON. JSON and not
//! bincode because these headers are small and a human debugging a failed
//! upgrade at 3 a.m. can read them (`strace -s`); the bulk of the state
//! goes in the snapshot file, which is bincode.
//!
//! Versions: protocol 1 is the conversation as vswitch has spoken it
//! since the handover existed; binaries before this module sent no
//! `protocol` field, which therefore reads as 1. A message of a version
//! this binary does not speak is refused before its body is looked at
//! (a later version may have another shape), with an error naming both;
//! a malformed one is refused naming the message and the field. Either
//! refusal ends the handover on the new side before it polls, so the
//! old binary resumes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::memfd::FlowSection;

/// The protocol this binary speaks (and writes).
pub const PROTOCOL: u32 = 1;
/// The protocols this binary reads.
pub const SPEAKS: &[u32] = &[1];
/// The largest framed header either side accepts.
pub const MAX_HEADER: u64 = 1 << 20;
/// The new side: the pre-copy is restored, pause.
pub const READY: &[u8] = b"ready\n";
/// The new side: committed; the old one must stop.
pub const CONFIRM: &[u8] = b"confirm\n";
/// The old side: it will not poll again.
pub const ACK: &[u8] = b"ack\n";
/// The longest line either side reads from the other.
pub const MAX_LINE: u64 = 64;

fn v1() -> u32 {
    1
}

/// Why a message was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("{message}: handover protocol {found}, this binary speaks {SPEAKS:?}")]
    Version { message: &'static str, found: u32 },
    #[error("{message}: {len} bytes, more than the {MAX_HEADER} a handover header may have")]
    TooLarge { message: &'static str, len: u64 },
    #[error("{message}: {why}")]
    Malformed { message: &'static str, why: String },
    #[error("{message}: refers to descriptor {index}, which is missing or used twice")]
    MissingDescriptor { message: &'static str, index: usize },
}

/// A message of the protocol: its name (for errors) and its version.
pub trait Message: Serialize + DeserializeOwned {
    const NAME: &'static str;
    fn protocol(&self) -> u32;
}

/// `m` as the bytes of its frame (without the length).
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    // Plain data (strings, numbers, maps with string keys): serde_json
    // cannot fail on it.
    serde_json::to_vec(m).unwrap_or_default()
}

/// The message in `bytes`: its version checked first, then every field.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default = "v1")]
        protocol: u32,
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        message: M::NAME,
        why: e.to_string(),
    };
    if bytes.len() as u64 > MAX_HEADER {
        return Err(ProtocolError::TooLarge {
            message: M::NAME,
            len: bytes.len() as u64,
        });
    }
    let v: Version = serde_json::from_slice(bytes).map_err(malformed)?;
    if !SPEAKS.contains(&v.protocol) {
        return Err(ProtocolError::Version {
            message: M::NAME,
            found: v.protocol,
        });
    }
    serde_json::from_slice(bytes).map_err(malformed)
}

/// A message already read (as part of another, such as a control
/// request): refused if of a version this binary does not speak.
pub fn check<M: Message>(m: &M) -> Result<(), ProtocolError> {
    if SPEAKS.contains(&m.protocol()) {
        Ok(())
    } else {
        Err(ProtocolError::Version {
            message: M::NAME,
            found: m.protocol(),
        })
    }
}

/// `line` (as read, with or without its newline) is `expected`.
pub fn is_line(line: &str, expected: &[u8]) -> bool {
    line.as_bytes().trim_ascii_end() == expected.trim_ascii_end()
}

/// Check a frame's length (its first 8 bytes) before reading the frame.
pub fn frame_len<M: Message>(len: [u8; 8]) -> Result<usize, ProtocolError> {
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(ProtocolError::TooLarge {
            message: M::NAME,
            len,
        });
    }
    usize::try_from(len).map_err(|_| ProtocolError::TooLarge {
        message: M::NAME,
        len,
    })
}

macro_rules! message {
    ($t:ty, $name:literal) => {
        impl Message for $t {
            const NAME: &'static str = $name;
            fn protocol(&self) -> u32 {
                self.protocol
            }
        }
    };
}

/// The new side's first request: the running switch's configuration and
/// clock, so it can start everything before anything pauses. (The
/// control socket's command names it: `handover-prepare`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    #[serde(default = "v1")]
    pub protocol: u32,
    /// The new binary reads a virtio-net header before each frame of a
    /// tap queue opened with one (tap offloads). Absent from binaries
    /// before offloads, which the running switch must then not hand such
    /// taps: they would take every header for the frame's first bytes.
    #[serde(default)]
    pub tap_vnet_hdr: bool,
}

impl Default for PrepareRequest {
    fn default() -> Self {
        PrepareRequest {
            protocol: PROTOCOL,
            tap_vnet_hdr: true,
        }
    }
}
message!(PrepareRequest, "handover-prepare request");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareAnswer {
    #[serde(default = "v1")]
    pub protocol: u32,
    /// The configuration the running switch started from (TOML text).
    pub config: String,
    /// Its clock's zero (CLOCK_MONOTONIC ns).
    pub epoch_mono_ns: u64,
}
message!(PrepareAnswer, "handover-prepare answer");

/// The new side's second request: hand over (command `handover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRequest {
    #[serde(default = "v1")]
    pub protocol: u32,
    /// The fast-path threads the new binary runs (thread `i` takes the
    /// old one's thread `i`; more or fewer than the old one has are
    /// fine). Absent from binaries of one thread, which could take only
    /// thread 0's part.
    #[serde(default)]
    pub fastpath_threads: Option<u32>,
}

impl HandoverRequest {
    /// This binary's request, for `fastpath_threads` threads.
    pub fn for_threads(fastpath_threads: u32) -> HandoverRequest {
        HandoverRequest {
            protocol: PROTOCOL,
            fastpath_threads: Some(fastpath_threads),
        }
    }
}

impl Default for HandoverRequest {
    fn default() -> Self {
        HandoverRequest::for_threads(1)
    }
}
message!(HandoverRequest, "handover request");

/// The old side's refusal of either request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

/// A port in the offer, by id (its index), with the descriptor it
/// comes with (an index into the message's descriptors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PortEntry {
    Tap {
        name: String,
        fd: usize,
    },
    AfXdp {
        name: String,
        fd: usize,
        ring_size: u32,
        /// Bound with multi-buffer (`XDP_USE_SG`); absent from a binary
        /// that never binds so.
        #[serde(default)]
        sg: bool,
    },
    /// vhost-user: its connection comes with the pause.
    VhostUser {
        name: String,
    },
    /// Removed at run time (its id stays taken).
    Closed {
        name: String,
    },
}

impl PortEntry {
    pub fn name(&self) -> &str {
        match self {
            PortEntry::Tap { name, .. }
            | PortEntry::AfXdp { name, .. }
            | PortEntry::VhostUser { name }
            | PortEntry::Closed { name } => name,
        }
    }
}

/// The frame pool: a memfd (which frames are free comes with the pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub fd: usize,
    pub len: usize,
    #[serde(default)]
    pub huge: bool,
    pub chunk_size: u32,
}

/// The old side's pre-copy: the snapshot and every descriptor, sent while
/// it forwards on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    #[serde(default = "v1")]
    pub protocol: u32,
    pub ports: Vec<PortEntry>,
    pub listener_fd: usize,
    pub pool: PoolEntry,
    pub xdp_links: Vec<usize>,
    pub snapshot_fd: usize,
    /// The snapshot's length in its file.
    pub snapshot: usize,
    /// Where the flow records are in the snapshot file.
    pub flows: FlowSection,
    /// The flow table's hash seed (flows keep their hashes).
    pub hash_seed: u64,
    /// CLOCK_MONOTONIC of the old side's holding its coprocessors (absent
    /// from binaries before it was sent: its start of the pre-copy then).
    #[serde(default)]
    pub held_mono_ns: Option<u64>,
    #[serde(default)]
    pub started_mono_ns: u64,
    #[serde(default)]
    pub packed_mono_ns: u64,
    /// The old side answers a confirm with [`ACK`] (binaries before it did
    /// not: the new side then does not wait for one).
    #[serde(default)]
    pub confirm_ack: bool,
    /// Fast-path threads 1, 2, … (thread 0's are the fields above); empty
    /// from a switch of one thread.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadOffer>,
    /// Each XDP program's socket map, by interface: a new binary with
    /// more threads adds the sockets of the queues it opens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub socket_maps: Vec<SocketMapEntry>,
}
message!(Offer, "handover offer");

/// An XDP program's socket map (queue → AF_XDP socket) on `interface`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketMapEntry {
    pub interface: String,
    pub fd: usize,
}

/// Another fast-path thread's part of the offer: its queue of each port,
/// its frame pool, its table's hash seed, and how many of the flow
/// section's records are its (the threads' records follow each other in
/// thread order; thread 0's are the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadOffer {
    pub ports: Vec<PortEntry>,
    pub pool: PoolEntry,
    pub hash_seed: u64,
    pub flows: usize,
}

impl Offer {
    /// Each thread's ports, pool and hash seed (thread 0 first).
    pub fn thread_parts(&self) -> impl Iterator<Item = (&[PortEntry], &PoolEntry, u64)> {
        std::iter::once((self.ports.as_slice(), &self.pool, self.hash_seed)).chain(
            self.threads
                .iter()
                .map(|t| (t.ports.as_slice(), &t.pool, t.hash_seed)),
        )
    }

    /// How many flow records each thread has (thread 0 first); an error if
    /// the other threads claim more than the section holds.
    pub fn thread_flows(&self) -> Result<Vec<usize>, ProtocolError> {
        let others: usize = self.threads.iter().map(|t| t.flows).sum();
        let first =
            self.flows
                .count
                .checked_sub(others)
                .ok_or_else(|| ProtocolError::Malformed {
                    message: Self::NAME,
                    why: format!(
                        "the threads claim {others} flows of a section of {}",
                        self.flows.count
                    ),
                })?;
        Ok(std::iter::once(first)
            .chain(self.threads.iter().map(|t| t.flows))
            .collect())
    }
}

impl Offer {
    /// Every descriptor index the offer names, each once, all below `n`
    /// (the number that came with it).
    pub fn check_descriptors(&self, n: usize) -> Result<(), ProtocolError> {
        let mut seen = vec![false; n];
        let ports = self
            .thread_parts()
            .flat_map(|(ports, pool, _)| {
                ports
                    .iter()
                    .filter_map(|p| match p {
                        PortEntry::Tap { fd, .. } | PortEntry::AfXdp { fd, .. } => Some(*fd),
                        _ => None,
                    })
                    .chain([pool.fd])
            })
            .collect::<Vec<_>>();
        let all = ports
            .into_iter()
            .chain([self.listener_fd, self.snapshot_fd])
            .chain(self.xdp_links.iter().copied())
            .chain(self.socket_maps.iter().map(|m| m.fd));
        for index in all {
            match seen.get_mut(index) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(ProtocolError::MissingDescriptor {
                        message: Self::NAME,
                        index,
                    })
                }
            }
        }
        Ok(())
    }
}

/// A vhost-user port's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VhostMode {
    Server,
    Client,
}

/// One request of a vhost-user connection's replay record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostMessage {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    /// Indices into the pause's descriptors.
    pub fds: Vec<usize>,
}

/// A vhost-user port's live connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostConn {
    pub fd: usize,
    pub record: Vec<VhostMessage>,
}

/// A vhost-user port's protocol state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostPort {
    pub name: String,
    pub socket: PathBuf,
    pub mode: VhostMode,
    pub mac: [u8; 6],
    #[serde(default)]
    pub listener: Option<usize>,
    #[serde(default)]
    pub conn: Option<VhostConn>,
}

/// The fast path's totals, by name (a counter this binary does not know
/// is kept by name; one it knows and the message lacks is 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub tx_packets: u64,
    pub punts: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub port_drops: Vec<BTreeMap<String, u64>>,
}

/// The old side's pause: what only the stopped fast path knows. The free
/// list (`free` u64 LE frame addresses) follows the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseHeader {
    #[serde(default = "v1")]
    pub protocol: u32,
    /// CLOCK_MONOTONIC of the old side's last poll.
    #[serde(default)]
    pub paused_mono_ns: u64,
    #[serde(default)]
    pub packed_mono_ns: u64,
    /// How many frame addresses follow.
    pub free: u64,
    /// Each port's counters by name, by port id.
    pub counters: Vec<BTreeMap<String, u64>>,
    pub pipeline: PipelineCounters,
    #[serde(default)]
    pub vhost: Vec<VhostPort>,
    /// Fast-path threads 1, 2, … (thread 0's are the fields above); their
    /// free lists follow thread 0's, in thread order. Empty from a switch
    /// of one thread.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadPause>,
}
message!(PauseHeader, "handover pause");

/// Another fast-path thread's part of the pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadPause {
    /// How many frame addresses of the free list are its.
    pub free: u64,
    pub counters: Vec<BTreeMap<String, u64>>,
    pub pipeline: PipelineCounters,
}

/// The most frames a pool may have (a longer free list is not a vswitch).
pub const MAX_FREE: u64 = 1 << 24;

impl PauseHeader {
    /// Bytes of the free lists that follow (every thread's), refused if
    /// a thread's is beyond [`MAX_FREE`].
    pub fn free_bytes(&self) -> Result<usize, ProtocolError> {
        let lists = std::iter::once(self.free).chain(self.threads.iter().map(|t| t.free));
        let mut total = 0u64;
        for free in lists {
            if free > MAX_FREE {
                return Err(ProtocolError::Malformed {
                    message: Self::NAME,
                    why: format!("{free} free frames, more than a pool has"),
                });
            }
            total += free;
        }
        usize::try_from(total * 8).map_err(|e| ProtocolError::Malformed {
            message: Self::NAME,
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
