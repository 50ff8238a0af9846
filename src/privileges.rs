//! Least privilege: the switch keeps only the capabilities it uses, from
//! its first instruction, so every thread it starts has no more.
//! (Capabilities are per thread on Linux and inherited by the threads a
//! thread starts; dropping them before any thread exists is the way to
//! have none left with more.)
//!
//! What is kept, and why:
//! - `CAP_NET_ADMIN`: tap devices (at start and `port-add`), attaching XDP
//!   programs and their bpf_links;
//! - `CAP_NET_RAW`: AF_XDP sockets, and the ICMP echo that makes the
//!   kernel resolve a VTEP's next hop;
//! - `CAP_BPF`: loading the XDP programs and updating their socket maps;
//! - `CAP_PERFMON`: the verifier allows the programs' packet pointer
//!   arithmetic only to a loader that has it;
//! - `CAP_IPC_LOCK`: AF_XDP memory is locked (beyond `RLIMIT_MEMLOCK`).
//!
//! Everything else goes from the effective, permitted, inheritable and
//! bounding sets; a capability the process never had is not asked for.
//! The systemd unit bounds the same set from outside
//! (`CapabilityBoundingSet=`).

use anyhow::{Context, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the switch runs with.
pub const KEEP: [Capability; 5] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_IPC_LOCK,
];

/// Drop every capability but [`KEEP`] (those of them this process has).
/// Call before starting any thread.
pub fn drop_to_needed() -> Result<CapsHashSet> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let keep: CapsHashSet = KEEP
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // goes with the rest below.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for c in caps::all().difference(&keep) {
            caps::drop(None, CapSet::Bounding, *c)
                .with_context(|| format!("dropping {c} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
    Ok(keep)
}
