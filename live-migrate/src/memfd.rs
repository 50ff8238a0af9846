//! A snapshot in a sealed memfd: the old binary serializes straight into
//! shared memory and passes the descriptor, the new one maps it and
//! decodes in place — no copy through a socket, no intermediate buffer.
//!
//! The file: the snapshot (header and bincode body, as [`crate::encode`]
//! makes it), then, at the next page boundary, a *flow section*: the fast
//! path's flows as 48-byte records (the layout of [`crate::Flows`]),
//! written straight from the dump and read in place by the next binary's
//! fast path — a million flows are never copied into a buffer on either
//! side. Where the section starts, how many records it holds and its
//! CRC-32 travel with the descriptor ([`FlowSection`]).
//! The memfd is sealed against writes, growing and shrinking before it is
//! passed, and the receiver checks the seals before mapping it, so the
//! bytes it decodes cannot change under it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::{
    decode, record, seal_header, FlowRecord, SnapshotError, SwitchState, FLOW_BYTES, HEADER,
};

/// Largest snapshot written (the memfd is sparse: only what is written
/// takes memory).
const RESERVE: usize = 4 << 30;

const SEALS: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

fn os(what: &str) -> SnapshotError {
    SnapshotError::Memory(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// A mapping unmapped on drop.
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Map, SnapshotError> {
        let (prot, flags) = if writable {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        } else {
            (libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_POPULATE)
        };
        Map::mmap(fd, 0, len, prot, flags)
    }

    /// `len` bytes at `offset` (page-aligned), read-only.
    fn at(fd: BorrowedFd<'_>, offset: usize, len: usize) -> Result<Map, SnapshotError> {
        let flags = libc::MAP_PRIVATE | libc::MAP_POPULATE;
        Map::mmap(fd, offset, len, libc::PROT_READ, flags)
    }

    fn mmap(
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
    ) -> Result<Map, SnapshotError> {
        let off =
            libc::off_t::try_from(offset).map_err(|e| SnapshotError::Memory(e.to_string()))?;
        // SAFETY: maps `len` bytes of a memfd we hold at a kernel-chosen
        // address; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), off) };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| os("mmap"))?;
        Ok(Map { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the whole mapping, alive as long as `self`; for a read
        // mapping the memfd is sealed against writes (checked), for a
        // write mapping this process is its only writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, borrowed exclusively (only made writable).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no slice of it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `state` as a snapshot in a new sealed memfd; returns it and the
/// snapshot's length.
pub fn encode(state: &SwitchState) -> Result<(OwnedFd, usize), SnapshotError> {
    let w = SnapshotFile::create(0)?.write(state, std::iter::empty())?;
    Ok((w.fd, w.snapshot_len))
}

/// Where the flow records are in a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowSection {
    /// Byte offset (page-aligned).
    pub offset: usize,
    pub count: usize,
    /// CRC-32 of the section's bytes.
    pub crc: u32,
}

/// A written, sealed snapshot file.
pub struct Written {
    pub fd: OwnedFd,
    pub snapshot_len: usize,
    pub flows: FlowSection,
}

const PAGE: usize = 4096;

/// A memfd being made ready for a snapshot: created, mapped and faulted in
/// for the expected size ahead of the moment the state is written (the
/// old binary does it before holding its coprocessors, so the page faults
/// are not part of the time new connections wait).
pub struct SnapshotFile {
    fd: OwnedFd,
    map: Map,
}

impl SnapshotFile {
    /// A memfd with room for `expected` bytes faulted in (best effort:
    /// the rest faults in as it is written).
    pub fn create(expected: usize) -> Result<SnapshotFile, SnapshotError> {
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create with a static NUL-terminated name; checked.
        let raw = unsafe { libc::memfd_create(c"vswitch-snapshot".as_ptr(), flags) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        truncate(&fd, RESERVE)?;
        let map = Map::new(fd.as_fd(), RESERVE, true)?;
        let ahead = expected.min(RESERVE) / 4096 * 4096;
        if ahead > 0 {
            // MADV_POPULATE_WRITE (Linux 5.14); older kernels fault lazily.
            const MADV_POPULATE_WRITE: libc::c_int = 23;
            // SAFETY: populating pages of our own shared mapping changes no
            // contents; the range is inside it.
            unsafe { libc::madvise(map.ptr.as_ptr().cast(), ahead, MADV_POPULATE_WRITE) };
        }
        Ok(SnapshotFile { fd, map })
    }

    /// Write `state`, then `flows` as the flow section; seal the memfd.
    pub fn write(
        self,
        state: &SwitchState,
        flows: impl ExactSizeIterator<Item = FlowRecord>,
    ) -> Result<Written, SnapshotError> {
        let SnapshotFile { fd, mut map } = self;
        let buf = map.bytes_mut();
        let mut body = &mut buf[HEADER..];
        crate::write_body(&mut body, state).map_err(|e| {
            SnapshotError::Body(format!("{e} (snapshots are at most {} GiB)", RESERVE >> 30))
        })?;
        let snapshot_len = RESERVE - body.len();
        seal_header(&mut buf[..snapshot_len]);
        let offset = snapshot_len.div_ceil(PAGE) * PAGE;
        let count = flows.len();
        let end = count
            .checked_mul(FLOW_BYTES)
            .and_then(|n| n.checked_add(offset))
            .filter(|&e| e <= RESERVE)
            .ok_or_else(|| {
                SnapshotError::Body(format!("{count} flows do not fit a snapshot file"))
            })?;
        let section = &mut buf[offset..end];
        for (f, out) in flows.zip(section.chunks_exact_mut(FLOW_BYTES)) {
            out.copy_from_slice(&f.to_bytes());
        }
        let crc = crc32fast::hash(section);
        drop(map);
        truncate(&fd, end)?;
        // SAFETY: F_ADD_SEALS on our memfd; no writable mapping is left.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(os("sealing the snapshot"));
        }
        Ok(Written {
            fd,
            snapshot_len,
            flows: FlowSection { offset, count, crc },
        })
    }
}

/// The flow section of a sealed snapshot file, mapped read-only.
pub struct MappedFlows {
    map: Option<Map>,
    count: usize,
}

// SAFETY: a read-only mapping of a memfd sealed against writes, owned by
// this value; reading it from another thread is reading immutable memory.
unsafe impl Send for MappedFlows {}
// SAFETY: as for Send: nothing writes the mapping, so threads sharing it
// (each fast-path thread reading its records) read immutable memory.
unsafe impl Sync for MappedFlows {}

impl MappedFlows {
    /// Map `section` of the snapshot file `fd`, checking the seals, the
    /// file's size and the section's checksum.
    pub fn map(fd: BorrowedFd<'_>, section: FlowSection) -> Result<MappedFlows, SnapshotError> {
        let FlowSection { offset, count, crc } = section;
        let len = count
            .checked_mul(FLOW_BYTES)
            .ok_or_else(|| SnapshotError::Body(format!("{count} flows")))?;
        let size = sealed_size(fd)?;
        if offset % PAGE != 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(SnapshotError::Truncated {
                expected: (offset + len) as u64,
                got: size as u64,
            });
        }
        if count == 0 {
            return Ok(MappedFlows { map: None, count });
        }
        let map = Map::at(fd, offset, len)?;
        let found = crc32fast::hash(map.bytes());
        if found != crc {
            return Err(SnapshotError::Corrupt {
                expected: crc,
                found,
            });
        }
        Ok(MappedFlows {
            map: Some(map),
            count,
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records, read in place; the mapping goes with the iterator.
    pub fn into_records(self) -> impl Iterator<Item = FlowRecord> + Send {
        let this = self;
        (0..this.count).filter_map(move |i| this.record_at(i))
    }

    /// Records `range` (clamped to the section), read in place from a
    /// mapping shared with other readers (each fast-path thread takes its
    /// own records); it goes with the last of them.
    pub fn records_in(
        self: std::sync::Arc<Self>,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = FlowRecord> + Send {
        let end = range.end.min(self.count);
        (range.start.min(end)..end).filter_map(move |i| self.record_at(i))
    }

    fn record_at(&self, i: usize) -> Option<FlowRecord> {
        let m = self.map.as_ref()?;
        m.bytes()
            .get(i * FLOW_BYTES..(i + 1) * FLOW_BYTES)
            .map(record)
    }
}

fn truncate(fd: &OwnedFd, len: usize) -> Result<(), SnapshotError> {
    let len = libc::off_t::try_from(len).map_err(|e| SnapshotError::Memory(e.to_string()))?;
    // SAFETY: ftruncate on our memfd; checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(os("ftruncate"));
    }
    Ok(())
}

/// The state in the snapshot memfd `fd` of `len` bytes, every check of
/// [`crate::decode`] passed; refused unless the memfd is sealed.
pub fn decode_fd(fd: BorrowedFd<'_>, len: usize) -> Result<SwitchState, SnapshotError> {
    let size = sealed_size(fd)?;
    if size < len || len < HEADER {
        return Err(SnapshotError::Truncated {
            expected: len as u64,
            got: size as u64,
        });
    }
    let map = Map::new(fd, len, false)?;
    decode(map.bytes())
}

/// The size of memfd `fd`, refused unless it is sealed against changes.
fn sealed_size(fd: BorrowedFd<'_>) -> Result<usize, SnapshotError> {
    // SAFETY: F_GET_SEALS on a descriptor we hold; checked.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(SnapshotError::Memory(
            "the snapshot memfd is not sealed against changes".into(),
        ));
    }
    // SAFETY: fstat into a zeroed stat; checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(os("fstat"));
    }
    usize::try_from(st.st_size)
        .map_err(|_| SnapshotError::Memory(format!("a size of {} bytes", st.st_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_goes_through_a_sealed_memfd_and_an_unsealed_one_is_refused() {
        let state = crate::tests::state();
        let (fd, len) = encode(&state).unwrap();
        // The flow section: records read back in place, damage detected.
        let recs: Vec<FlowRecord> = state.flows.iter().collect();
        assert!(!recs.is_empty());
        let w = SnapshotFile::create(1 << 20)
            .unwrap()
            .write(&state, recs.iter().copied())
            .unwrap();
        assert_eq!(w.flows.offset % PAGE, 0);
        assert_eq!(decode_fd(w.fd.as_fd(), w.snapshot_len).unwrap(), state);
        let m = MappedFlows::map(w.fd.as_fd(), w.flows).unwrap();
        assert_eq!(m.into_records().collect::<Vec<_>>(), recs);
        let bad = FlowSection {
            crc: w.flows.crc ^ 1,
            ..w.flows
        };
        assert!(matches!(
            MappedFlows::map(w.fd.as_fd(), bad),
            Err(SnapshotError::Corrupt { .. })
        ));
        let long = FlowSection {
            count: w.flows.count + 100,
            ..w.flows
        };
        assert!(matches!(
            MappedFlows::map(w.fd.as_fd(), long),
            Err(SnapshotError::Truncated { .. })
        ));
        assert_eq!(len, crate::encode(&state).unwrap().len());
        assert_eq!(decode_fd(fd.as_fd(), len).unwrap(), state);
        // Claiming more than there is.
        assert!(matches!(
            decode_fd(fd.as_fd(), len + 2 * PAGE),
            Err(SnapshotError::Truncated { .. })
        ));
        // Writes are sealed off.
        // SAFETY: a write(2) of one byte from a live buffer.
        let w = unsafe { libc::pwrite(fd.as_raw_fd(), b"x".as_ptr().cast(), 1, 30) };
        assert_eq!(w, -1);
        // A memfd without seals is not trusted.
        // SAFETY: memfd_create with a static name; checked below.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        let bytes = crate::encode(&state).unwrap();
        // SAFETY: write(2) from a live buffer of that length.
        let n = unsafe { libc::write(raw, bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n as usize, bytes.len());
        assert!(matches!(
            decode_fd(plain.as_fd(), bytes.len()),
            Err(SnapshotError::Memory(_))
        ));
    }
}
