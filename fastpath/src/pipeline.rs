//! The per-batch pipeline: classify, look up, apply, sort into outputs.
//!
//! No I/O. A port driver hands in up to [`BATCH`] received frames and gets
//! back, in a [`BatchOut`], the frames to transmit grouped by port, the
//! frames to punt, and the frames it dropped (whose buffers it recycles).
//!
//! Pass 1 classifies every frame, hashes its key once and prefetches the
//! key's home slot; pass 2 probes the table and applies actions in place,
//! so the table's cache misses for a batch overlap instead of queueing.
//! Counters for the common case stay in locals until the batch ends.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use arrayvec::ArrayVec;
use flowtable::{Action, FlowKey, FlowTable, Output, PortId};
use vxlan::DecapConfig;

use crate::classify::{Classifier, Kind};
use crate::drop::{DropCounters, DropReason};
use crate::frame::{Desc, FrameMem, BATCH};
use crate::offload::Offload;
use crate::packet::{Ipv4, ETH_LEN, IPPROTO_TCP};
use crate::punt::PuntReason;
use crate::rewrite;
use crate::tx::TxLists;

/// What the pipeline needs to know about the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// The uplink port (VXLAN arrives and leaves here).
    pub uplink: PortId,
    /// Our VTEP address.
    pub local_vtep: Ipv4Addr,
    /// VXLAN UDP port (4789).
    pub udp_port: u16,
    /// Number of ports (ids `0..ports`).
    pub ports: u16,
}

/// A frame the coprocessor must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PuntItem {
    pub desc: Desc,
    pub reason: PuntReason,
    /// Offset of the inner Ethernet header from `desc.addr`.
    pub inner_start: u16,
    /// The key that was looked up (absent for frames punted unkeyed, ARP).
    pub key: Option<FlowKey>,
}

/// Everything one batch produced.
#[derive(Debug)]
pub struct BatchOut {
    pub tx: TxLists,
    pub punt: ArrayVec<PuntItem, BATCH>,
    pub dropped: ArrayVec<Desc, BATCH>,
}

impl BatchOut {
    pub fn new(ports: u16) -> BatchOut {
        BatchOut {
            tx: TxLists::new(ports),
            punt: ArrayVec::new(),
            dropped: ArrayVec::new(),
        }
    }

    pub fn clear(&mut self) {
        self.tx.clear();
        self.punt.clear();
        self.dropped.clear();
    }
}

/// Per-thread pipeline counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineCounters {
    /// Drops by reason for each ingress port (index = port id).
    pub port_drops: Vec<DropCounters>,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub tx_packets: u64,
    pub punts: [u64; PuntReason::COUNT],
    pub drops: DropCounters,
}

/// [`PipelineCounters`] with reasons by their stable names, as a handover
/// carries them: a newer binary with other reasons keeps the ones it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub tx_packets: u64,
    pub punts: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub port_drops: Vec<BTreeMap<String, u64>>,
}

impl NamedCounters {
    /// Add `o`'s counts (a thread whose part another takes over).
    pub fn add(&mut self, o: &NamedCounters) {
        let sum = |a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            b.iter()
                .for_each(|(k, v)| *a.entry(k.clone()).or_default() += v)
        };
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.hits += o.hits;
        self.misses += o.misses;
        self.tx_packets += o.tx_packets;
        sum(&mut self.punts, &o.punts);
        sum(&mut self.drops, &o.drops);
        if self.port_drops.len() < o.port_drops.len() {
            self.port_drops.resize(o.port_drops.len(), BTreeMap::new());
        }
        for (a, b) in self.port_drops.iter_mut().zip(&o.port_drops) {
            sum(a, b);
        }
    }
}

fn drops_by_name(d: &DropCounters) -> BTreeMap<String, u64> {
    d.nonzero().map(|(n, v)| (n.to_string(), v)).collect()
}

fn drops_from_names(m: &BTreeMap<String, u64>) -> DropCounters {
    let mut d = DropCounters::default();
    for r in DropReason::ALL {
        if let (Some(v), Some(c)) = (m.get(r.name()), d.0.get_mut(r.index())) {
            *c = *v;
        }
    }
    d
}

impl PipelineCounters {
    pub fn to_named(&self) -> NamedCounters {
        NamedCounters {
            rx_packets: self.rx_packets,
            rx_bytes: self.rx_bytes,
            hits: self.hits,
            misses: self.misses,
            tx_packets: self.tx_packets,
            punts: PuntReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), self.punts[r.index()]))
                .filter(|(_, v)| *v != 0)
                .collect(),
            drops: drops_by_name(&self.drops),
            port_drops: self.port_drops.iter().map(drops_by_name).collect(),
        }
    }

    /// Counters from `n`, for `ports` ports (reasons this binary does not
    /// know are left out).
    pub fn from_named(n: &NamedCounters, ports: usize) -> PipelineCounters {
        let mut punts = [0; PuntReason::COUNT];
        for r in PuntReason::ALL {
            punts[r.index()] = n.punts.get(r.name()).copied().unwrap_or(0);
        }
        let mut port_drops: Vec<DropCounters> = n.port_drops.iter().map(drops_from_names).collect();
        port_drops.resize(ports, DropCounters::default());
        PipelineCounters {
            port_drops,
            rx_packets: n.rx_packets,
            rx_bytes: n.rx_bytes,
            hits: n.hits,
            misses: n.misses,
            tx_packets: n.tx_packets,
            punts,
            drops: drops_from_names(&n.drops),
        }
    }

    /// One drop, counted per thread and against its ingress port.
    #[inline(always)]
    pub fn count_drop(&mut self, ingress: PortId, r: DropReason) {
        self.drops.bump(r);
        if let Some(p) = self.port_drops.get_mut(usize::from(ingress.0)) {
            p.bump(r);
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Meta {
    desc: Desc,
    inner_start: u16,
    inner_len: u32,
    outer_src: u32,
    /// Offload work to do (a checksum to complete, segments to cut).
    offloaded: bool,
}

/// A frame's offload metadata, as `apply` needs to know it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Offloaded {
    /// None (a batch from a port without offloads).
    No,
    /// Metadata that says there is nothing to do: it is kept right (in
    /// front of the outer headers, if encapsulated).
    Plain,
    /// A checksum to complete or segments to cut.
    Work,
}

/// What happens to one frame after its action.
enum Verdict {
    Tx(PortId, Desc),
    Punt(PuntReason),
    Drop(DropReason),
}

/// The fast path's packet pipeline, owner of its flow table.
pub struct Pipeline {
    classifier: Classifier,
    table: FlowTable,
    counters: PipelineCounters,
    keys: [FlowKey; BATCH],
    hashes: [u64; BATCH],
    meta: [Meta; BATCH],
    /// Frames the coprocessor reinjects after seeing them: their
    /// connection events were already followed, so they are not punted
    /// for that again.
    reinjecting: bool,
    /// The frames of the next batches have offload metadata (they came
    /// from a port with offloads; see `offload`).
    offloaded: bool,
}

impl Pipeline {
    /// The uplink port.
    pub fn uplink(&self) -> PortId {
        self.classifier.uplink
    }

    pub fn new(cfg: &PipelineConfig, table: FlowTable) -> Pipeline {
        Pipeline {
            classifier: Classifier {
                uplink: cfg.uplink,
                decap: DecapConfig {
                    local_vtep: u32::from(cfg.local_vtep),
                    udp_port: cfg.udp_port,
                },
            },
            table,
            counters: PipelineCounters {
                port_drops: vec![DropCounters::default(); usize::from(cfg.ports)],
                ..PipelineCounters::default()
            },
            keys: [FlowKey::default(); BATCH],
            hashes: [0; BATCH],
            meta: [Meta::default(); BATCH],
            reinjecting: false,
            offloaded: false,
        }
    }

    /// The flow table (installs, expiry and dumps go through the owner).
    pub fn table(&self) -> &FlowTable {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut FlowTable {
        &mut self.table
    }

    pub fn counters(&self) -> &PipelineCounters {
        &self.counters
    }

    /// Continue from `c` (a handover); its per-port drops are cut or padded
    /// to this pipeline's ports.
    pub fn set_counters(&mut self, mut c: PipelineCounters) {
        c.port_drops
            .resize(self.counters.port_drops.len(), DropCounters::default());
        self.counters = c;
    }

    /// Count a drop that happened after the pipeline (on the punt path, in
    /// a port driver) against the port the frame came in on.
    pub fn count_drop(&mut self, ingress: PortId, r: DropReason) {
        self.counters.count_drop(ingress, r);
    }

    /// Counters for one more port (id = the current count).
    pub fn add_port(&mut self) {
        self.counters.port_drops.push(DropCounters::default());
    }

    /// Mark the next batches as reinjected by the coprocessor (see
    /// [`Action::conntrack`]): connection events are not punted again.
    pub fn set_reinjecting(&mut self, on: bool) {
        self.reinjecting = on;
    }

    /// Say whether the next batches' frames have offload metadata (a port
    /// with offloads received them).
    pub fn set_offloaded(&mut self, on: bool) {
        self.offloaded = on;
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Process up to [`BATCH`] frames that arrived on `ingress`; returns how
    /// many of `frames` were consumed (the caller passes the rest again).
    /// `out` is cleared first. `now` is the caller's clock in nanoseconds.
    pub fn process<M: FrameMem + ?Sized>(
        &mut self,
        ingress: PortId,
        mem: &mut M,
        frames: &[Desc],
        now: u64,
        out: &mut BatchOut,
    ) -> usize {
        // Two copies of the loop: frames without offload metadata (the
        // uplink's, 64-byte traffic) pay nothing for it.
        if self.offloaded {
            self.process_offloaded(ingress, mem, frames, now, out)
        } else {
            self.run::<M, false>(ingress, mem, frames, now, out)
        }
    }

    /// [`Pipeline::process`] for frames with offload metadata: a function
    /// of its own, so the common loop is not laid out around it.
    #[inline(never)]
    fn process_offloaded<M: FrameMem + ?Sized>(
        &mut self,
        ingress: PortId,
        mem: &mut M,
        frames: &[Desc],
        now: u64,
        out: &mut BatchOut,
    ) -> usize {
        self.run::<M, true>(ingress, mem, frames, now, out)
    }

    /// [`Pipeline::process`], for frames with offload metadata or not.
    #[inline(always)]
    fn run<M: FrameMem + ?Sized, const OFFLOADED: bool>(
        &mut self,
        ingress: PortId,
        mem: &mut M,
        frames: &[Desc],
        now: u64,
        out: &mut BatchOut,
    ) -> usize {
        out.clear();
        let frames = &frames[..frames.len().min(BATCH)];
        let mut rx_bytes = 0u64;
        let mut n = 0usize;

        // Pass 1: classify, hash, prefetch.
        for &d in frames {
            rx_bytes += u64::from(d.len);
            // The descriptor must lie inside one chunk of the region. (Two
            // branches, not an and_then chain: that costs 11 instructions
            // per packet under callgrind.)
            let Some((chunk, off)) = mem.chunk_mut(d.addr) else {
                drop_into(
                    &mut self.counters,
                    ingress,
                    out,
                    d,
                    DropReason::BadDescriptor,
                );
                continue;
            };
            // Offload metadata is the tenant's: checked before anything
            // trusts it.
            let mut offloaded = false;
            if OFFLOADED {
                match check_kept(chunk, off, d.len as usize) {
                    Ok(o) => offloaded = o,
                    Err(r) => {
                        drop_into(&mut self.counters, ingress, out, d, r);
                        continue;
                    }
                }
            }
            let Some(frame) = chunk.get(off..off + d.len as usize) else {
                drop_into(
                    &mut self.counters,
                    ingress,
                    out,
                    d,
                    DropReason::BadDescriptor,
                );
                continue;
            };
            let key = &mut self.keys[n];
            let c = self.classifier.classify(ingress, frame, key);
            match c.kind {
                Kind::Flow => {
                    let h = self.table.hash(key);
                    self.table.prefetch(h);
                    self.hashes[n] = h;
                    let m = Meta {
                        desc: d,
                        inner_start: c.inner_start,
                        inner_len: c.inner_len,
                        outer_src: c.outer_src,
                        offloaded,
                    };
                    self.meta[n] = m;
                    n += 1;
                }
                Kind::Punt(reason) => {
                    punt_into(&mut self.counters, out, d, reason, c.inner_start, None)
                }
                Kind::Drop(r) => drop_into(&mut self.counters, ingress, out, d, r),
            }
        }

        // Pass 2: probe and apply. The pipeline is split into disjoint
        // borrows so the per-packet arrays are walked without index checks.
        let (mut hits, mut misses, mut tx) = (0u64, 0u64, 0u64);
        let n = n.min(BATCH);
        let Pipeline {
            table,
            counters,
            keys,
            hashes,
            meta,
            reinjecting,
            ..
        } = self;
        let ct_events = !*reinjecting;
        for ((key, &h), m) in keys[..n].iter().zip(&hashes[..n]).zip(&meta[..n]) {
            let d = m.desc;
            let inner_start = m.inner_start;
            let hit = match table.lookup_hashed(key, h, m.inner_len, now) {
                Some(hit) => hit,
                // A miss may still be covered at address granularity (the
                // coprocessor pins such drops where the ports do not
                // matter): looked up only when the table holds any.
                None => match table
                    .has_l3()
                    .then(|| table.lookup(&key.to_l3(), m.inner_len, now))
                {
                    Some(Some(hit)) => hit,
                    _ => {
                        misses += 1;
                        punt_into(counters, out, d, PuntReason::Miss, inner_start, Some(*key));
                        continue;
                    }
                },
            };
            hits += 1;
            let verdict = match (table.action(hit.action), mem.chunk_mut(d.addr)) {
                (Some(a), Some((chunk, off))) => {
                    let offload = match (OFFLOADED, m.offloaded) {
                        (false, _) => Offloaded::No,
                        (true, false) => Offloaded::Plain,
                        (true, true) => Offloaded::Work,
                    };
                    apply(a, chunk, off, d, m, h, key, ct_events, offload)
                }
                _ => Verdict::Drop(DropReason::BadDescriptor),
            };
            match verdict {
                Verdict::Tx(port, nd) => match out.tx.push(port, nd) {
                    Ok(()) => tx += 1,
                    Err(false) => drop_into(counters, ingress, out, d, DropReason::BadOutputPort),
                    Err(true) => drop_into(counters, ingress, out, d, DropReason::TxOverflow),
                },
                Verdict::Punt(r) => punt_into(counters, out, d, r, inner_start, Some(*key)),
                Verdict::Drop(r) => drop_into(counters, ingress, out, d, r),
            }
        }

        let c = &mut self.counters;
        c.rx_packets += frames.len() as u64;
        c.rx_bytes += rx_bytes;
        c.hits += hits;
        c.misses += misses;
        c.tx_packets += tx;
        frames.len()
    }
}

#[inline(always)]
fn drop_into(
    c: &mut PipelineCounters,
    ingress: PortId,
    out: &mut BatchOut,
    d: Desc,
    r: DropReason,
) {
    c.count_drop(ingress, r);
    // `dropped` holds a batch; process() consumes at most one.
    let _ = out.dropped.try_push(d);
}

#[inline(always)]
fn punt_into(
    c: &mut PipelineCounters,
    out: &mut BatchOut,
    d: Desc,
    reason: PuntReason,
    inner_start: u16,
    key: Option<FlowKey>,
) {
    c.punts[reason.index()] += 1;
    let _ = out.punt.try_push(PuntItem {
        desc: d,
        reason,
        inner_start,
        key,
    });
}

/// The part of an action that only tracked connections have, out of the
/// common path: punt a TCP state change (unless the coprocessor already
/// saw it), punt an expiring TTL before anything is rewritten, then NAT.
///
/// The rewrites see the IP packet at `ip` and nothing past it (nor past
/// the frame's end, `frame_end`): bytes beyond its total length (padding,
/// or what an earlier frame left in the chunk) are not its TCP flags or
/// checksum.
///
/// `offload`: the frame has offload metadata, which may say its L4
/// checksum is still to be completed (its field holds the pseudo-header's
/// sum, which NAT keeps right).
#[inline(never)]
fn tracked(
    a: &Action,
    chunk: &mut [u8],
    ip: usize,
    frame_end: usize,
    key: &FlowKey,
    ct_events: bool,
    offload: bool,
) -> Result<(), Verdict> {
    let partial = offload && Offload::before(chunk, ip - ETH_LEN).needs_csum();
    let tot_len = Ipv4::new(&*chunk, ip).total_len().unwrap_or(0);
    let end = (ip + usize::from(tot_len)).min(frame_end);
    let Some(chunk) = chunk.get_mut(..end) else {
        return Err(Verdict::Drop(DropReason::TooShort));
    };
    if ct_events && key.proto == IPPROTO_TCP && rewrite::tcp_event(chunk, ip) {
        return Err(Verdict::Punt(PuntReason::CtEvent));
    }
    if a.dec_ttl && Ipv4::new(&*chunk, ip).ttl().is_some_and(|t| t <= 1) {
        return Err(Verdict::Punt(PuntReason::TtlExpired));
    }
    if let Some(n) = &a.nat {
        rewrite::nat(chunk, ip, key, n, partial).map_err(Verdict::Drop)?;
    }
    Ok(())
}

/// Apply `a` to the frame at `chunk[off..]`. Checks come first, so a frame
/// that is punted is unmodified. `offload`: what the frame's offload
/// metadata says (a super-frame's segments must fit the path, a partial
/// checksum is kept right, an encapsulation shifts the offsets).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply(
    a: &Action,
    chunk: &mut [u8],
    off: usize,
    d: Desc,
    m: &Meta,
    hash: u64,
    key: &FlowKey,
    ct_events: bool,
    offload: Offloaded,
) -> Verdict {
    let mut start = off;
    let mut len = d.len as usize;
    if let Some(vtep) = a.decap {
        if m.inner_start == 0 || m.outer_src != vtep {
            // Another VTEP than the flow's (forged, or a stale sender):
            // dropped here, never punted, so a forger varying its outer
            // source is no punt source (the coprocessor drops it too).
            return Verdict::Drop(DropReason::VtepMismatch);
        }
        start += usize::from(m.inner_start);
        len = m.inner_len as usize;
    }
    // A super-frame's segments are what must fit the path.
    let seg_len = if offload == Offloaded::Work {
        segment_len_kept(chunk, start, len)
    } else {
        len
    };
    if seg_len > usize::from(a.max_len) {
        return Verdict::Punt(PuntReason::TooBig);
    }
    // Flow frames are IPv4 with a whole 20-byte header after Ethernet
    // (the classifier checked), so these offsets are inside the frame.
    let ip = start + ETH_LEN;
    if a.conntrack {
        let work = offload == Offloaded::Work;
        if let Err(v) = tracked(a, chunk, ip, start + len, key, ct_events, work) {
            return v;
        }
    }
    if a.dec_ttl {
        let mut ip = Ipv4::new(&mut *chunk, ip);
        match ip.ttl() {
            None => return Verdict::Drop(DropReason::TooShort),
            Some(t) if t <= 1 => return Verdict::Punt(PuntReason::TtlExpired),
            Some(_) => {
                // In the frame (the TTL was): the checksum after it too.
                let _ = ip.dec_ttl();
            }
        }
    }
    if let Some(eth) = chunk
        .get_mut(start..)
        .and_then(|c| c.first_chunk_mut::<12>())
    {
        if let Some(mac) = &a.set_eth_dst {
            eth[..6].copy_from_slice(mac);
        }
        if let Some(mac) = &a.set_eth_src {
            eth[6..].copy_from_slice(mac);
        }
    }
    if let Some(t) = &a.encap {
        let r = match offload {
            Offloaded::No => vxlan::encap(chunk, start, len, &t.0, hash),
            _ => encap_offloaded(chunk, start, len, &t.0, hash),
        };
        match r {
            Ok(s) => {
                start = s;
                len += vxlan::OUTER_LEN;
            }
            Err(_) => return Verdict::Drop(DropReason::NoHeadroom),
        }
    }
    match a.output {
        Output::Port(p) => {
            let base = d.addr - off as u64;
            // len ≤ chunk size, far below u32::MAX.
            #[allow(clippy::cast_possible_truncation)]
            let nd = Desc::new(base + start as u64, len as u32);
            Verdict::Tx(p, nd)
        }
        Output::Punt => Verdict::Punt(PuntReason::Action),
        Output::Drop => Verdict::Drop(DropReason::FlowDrop),
    }
}

/// Check the offload metadata kept before the frame `chunk[off..off +
/// len]` against it and keep what the switch goes by; whether there is
/// work to do (a checksum to complete, segments to cut).
#[cold]
#[inline(never)]
fn check_kept(chunk: &mut [u8], off: usize, len: usize) -> Result<bool, DropReason> {
    let frame = chunk.get(off..off + len).ok_or(DropReason::BadDescriptor)?;
    let o = crate::offload::check(frame, Offload::before(chunk, off))?;
    o.put_before(chunk, off);
    Ok(!o.is_plain())
}

/// The length of the segments of the frame `chunk[start..start + len]`
/// (its own for a frame that is not cut).
#[cold]
#[inline(never)]
fn segment_len_kept(chunk: &[u8], start: usize, len: usize) -> usize {
    Offload::before(chunk, start).segment_len(chunk.get(start..start + len).unwrap_or_default())
}

/// Encapsulate a frame with offload metadata, which then goes before the
/// outer headers: if there is work (a partial checksum, segments to cut)
/// its offsets count the outer headers, and a super-frame's outer lengths
/// are left to the segmenter.
#[cold]
#[inline(never)]
fn encap_offloaded(
    chunk: &mut [u8],
    start: usize,
    len: usize,
    t: &[u8; vxlan::OUTER_LEN],
    hash: u64,
) -> Result<usize, vxlan::EncapError> {
    let off = Offload::before(chunk, start);
    if off.is_plain() {
        let s = vxlan::encap(chunk, start, len, t, hash)?;
        Offload::PLAIN.put_before(chunk, s);
        return Ok(s);
    }
    // OUTER_LEN is 50.
    #[allow(clippy::cast_possible_truncation)]
    let shifted = off
        .shifted(vxlan::OUTER_LEN as u16)
        .ok_or(vxlan::EncapError::TooLong { len })?;
    let s = if off.is_gso() {
        vxlan::encap_for_segmentation(chunk, start, t, hash)?
    } else {
        vxlan::encap(chunk, start, len, t, hash)?
    };
    shifted.put_before(chunk, s);
    Ok(s)
}

#[cfg(test)]
mod tests;
