//! Huge pages for large fast-path memory (flow tables; UMEM later).
//!
//! A 1M-flow table is ~92 MiB: on 4 KiB pages every random lookup also
//! misses the TLB. Where transparent huge pages are in `madvise` mode (the
//! common default), asking for them before the memory is first touched
//! gives 2 MiB pages.

use flowtable::FlowTable;

/// Ask the kernel to back `[ptr, ptr + len)` with transparent huge pages.
/// Only the 2 MiB-aligned part inside the range is advised. Returns the
/// OS error if the kernel refuses (THP disabled, old kernel): the memory
/// stays usable on normal pages, so callers log and go on.
pub fn advise(ptr: *const u8, len: usize) -> std::io::Result<()> {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).div_ceil(HUGE) * HUGE;
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end <= start {
        return Ok(());
    }
    // SAFETY: madvise(MADV_HUGEPAGE) changes no memory contents and no
    // mapping's validity; the range lies inside an allocation we own.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`advise`] for a flow table's slot array. Call it right after building
/// the table, before inserting.
pub fn advise_flow_table(t: &FlowTable) -> std::io::Result<()> {
    let (p, len) = t.memory_region();
    advise(p, len)
}

/// Fault in (zero) a flow table's whole slot array now, rather than on the
/// first insert into each page. A binary that takes a switch over does it
/// while it prepares, so putting a million handed-over flows back does not
/// pay a page fault every 64 slots. Kernels before 5.14 lack the advice;
/// the error says so and the table faults lazily as before.
pub fn populate_flow_table(t: &FlowTable) -> std::io::Result<()> {
    const PAGE: usize = 4096;
    // MADV_POPULATE_WRITE (Linux 5.14): not in every libc crate version.
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let (p, len) = t.memory_region();
    // Whole pages inside the array only.
    let start = (p as usize).div_ceil(PAGE) * PAGE;
    let end = (p as usize + len) / PAGE * PAGE;
    if end <= start {
        return Ok(());
    }
    // SAFETY: populating pages changes no contents (the slots are zero
    // either way) and no mapping's validity; the range lies inside the
    // table's own allocation.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Kilobytes of this process's memory on transparent huge pages (from
/// /proc/self/smaps_rollup), for reports.
pub fn anon_huge_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags of the mapping of this process that contains `addr`.
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    return Some(f.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn a_table_is_advised_for_huge_pages_and_small_ranges_are_skipped() {
        let t = FlowTable::new(100_000).unwrap();
        let (p, len) = t.memory_region();
        const HUGE: usize = 2 << 20;
        let aligned = (p as usize).div_ceil(HUGE) * HUGE;
        assert!(
            aligned + HUGE <= p as usize + len,
            "a 100k table spans a huge page"
        );
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            advise_flow_table(&t).unwrap();
            // The kernel recorded the advice on the table's memory ("hg").
            let flags = vm_flags_at(aligned).expect("the table's mapping is in smaps");
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "no huge-page advice on the table: VmFlags {flags}"
            );
        } else {
            eprintln!(
                "cannot check the advice: this kernel has no transparent huge pages; \
                 checking only that advising reports it"
            );
            assert!(advise_flow_table(&t).is_err());
        }
        // A range with no whole huge page in it is not advised at all.
        assert!(advise(std::ptr::null(), 100).is_ok());
    }
}
