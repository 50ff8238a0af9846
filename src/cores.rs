//! Which cores the switch's threads run on — OVS's `pmd-cpu-mask`, VPP's
//! `corelist-workers`: `[switch] fastpath_cores` and `coprocessor_cores`,
//! applied with `sched_setaffinity(2)` by each thread before it is
//! confined, and each thread's load for `ctl stats`.
//!
//! The default, from the cores the process may use (its affinity at
//! start, e.g. what systemd's `CPUAffinity=` or `taskset` gave it): with
//! two or more, the fast path gets the last ones to itself — one per
//! fast-path thread, leaving at least one — and everything else
//! (coprocessors, control, metrics, vhost-user protocol threads) the
//! rest, so the busy-polling threads never share a core with the slow
//! path; with one, nothing is pinned. Fast-path thread `i` runs on the
//! `i`-th fast-path core alone when there is one per thread, else on all
//! of them.
//!
//! Written against libc rather than a crate: `core_affinity` pins to one
//! core only and has no way to read a thread's mask back.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{bail, Result};

/// Where each kind of thread may run (CPU numbers, sorted); empty: not
/// pinned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub fastpath: Vec<usize>,
    pub coprocessors: Vec<usize>,
    /// Every other thread (control, metrics, neighbours, vhost-user).
    pub housekeeping: Vec<usize>,
}

impl Placement {
    /// The cores of fast-path thread `i` of `threads`.
    pub fn fastpath_thread(&self, i: usize, threads: usize) -> Vec<usize> {
        match self.fastpath.get(i) {
            Some(&c) if self.fastpath.len() >= threads => vec![c],
            _ => self.fastpath.clone(),
        }
    }
}

/// The placement for `allowed` (the process's cores) and the configured
/// sets; errors name the field.
pub fn plan(
    fastpath: Option<&[usize]>,
    coprocessors: Option<&[usize]>,
    allowed: &[usize],
    threads: usize,
) -> Result<Placement> {
    for (field, set) in [
        ("fastpath_cores", fastpath),
        ("coprocessor_cores", coprocessors),
    ] {
        if let Some(&c) = set.into_iter().flatten().find(|c| !allowed.contains(c)) {
            bail!(
                "switch: field `{field}`: core {c} is not one this process may use ({})",
                list(allowed)
            );
        }
    }
    let sorted = |s: &[usize]| {
        let mut v = s.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let minus = |a: &[usize], b: &[usize]| -> Vec<usize> {
        a.iter().copied().filter(|c| !b.contains(c)).collect()
    };
    let fast = match fastpath {
        Some(f) => sorted(f),
        // The last cores the coprocessors were not given, one per
        // thread, leaving one.
        None if allowed.len() >= 2 => {
            let free = minus(allowed, coprocessors.unwrap_or(&[]));
            let n = threads.clamp(1, allowed.len() - 1).min(free.len());
            free[free.len() - n..].to_vec()
        }
        None => Vec::new(),
    };
    let rest = minus(allowed, &fast);
    let coprocessors = match coprocessors {
        Some(c) => sorted(c),
        None if fast.is_empty() => Vec::new(),
        None => rest.clone(),
    };
    Ok(Placement {
        housekeeping: if fast.is_empty() { Vec::new() } else { rest },
        fastpath: fast,
        coprocessors,
    })
}

/// The cores the calling thread may run on.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of` bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` < CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restrict the calling thread to `cores` (nothing if empty).
pub fn pin(cores: &[usize]) -> io::Result<()> {
    if cores.is_empty() {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("core {c} is beyond CPU_SETSIZE")));
        }
        // SAFETY: `c` < CPU_SETSIZE (checked above), inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: passes a live cpu_set_t of its exact size; pid 0 is the
    // calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The core the calling thread runs on now.
pub fn current() -> Option<usize> {
    // SAFETY: no arguments; -1 on failure.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// `0-3,6`-style list of `cores` (sorted), as the kernel writes
/// `Cpus_allowed_list`; "any" when empty.
pub fn list(cores: &[usize]) -> String {
    if cores.is_empty() {
        return "any".into();
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// What `ctl stats` shows of the threads: where each may run, and the
/// coprocessors' loads (the fast path's come with its snapshot).
#[derive(Debug, Clone)]
pub struct Threads {
    pub placement: Placement,
    pub coprocessors: std::sync::Arc<Vec<Load>>,
}

impl Threads {
    /// The threads, for `ctl stats`: each fast-path thread's busy share,
    /// core, packets and flows from its snapshot, and the ports whose
    /// queue it polls (queue `i` of each for thread `i`).
    pub fn view(&self, fast: &[fastpath::dataplane::Snapshot]) -> serde_json::Value {
        use serde_json::json;
        let mut v: Vec<_> = fast
            .iter()
            .map(|s| {
                let i = usize::from(s.thread);
                let queues: Vec<&str> = s.ports.iter().map(|(_, n, _)| n.as_str()).collect();
                let queue_rx: Vec<u64> = s.ports.iter().map(|(_, _, c)| c.rx_packets).collect();
                json!({
                    "name": format!("fastpath-{i}"), "role": "fast path",
                    "cores": list(&self.placement.fastpath_thread(i, fast.len())), "cpu": s.cpu,
                    "busy_pct": f64::from(s.busy_permille) / 10.0, "queue": i, "queues": queues,
                    "queue_rx_packets": queue_rx,
                    "rx_packets": s.pipeline.rx_packets, "tx_packets": s.pipeline.tx_packets,
                    "misses": s.pipeline.misses, "flows": s.table_len,
                    "flows_expired": s.table.expired, "flows_invalidated": s.invalidated,
                    "installs": s.installs,
                })
            })
            .collect();
        for (i, l) in self.coprocessors.iter().enumerate() {
            v.push(json!({
                "name": format!("coproc-{i}"), "role": "coprocessor",
                "cores": list(&self.placement.coprocessors), "cpu": l.cpu(),
                "busy_pct": l.busy_pct(), "decisions": l.decisions(),
            }));
        }
        v.push(
            json!({"name": "others", "role": "control, metrics, vhost-user, neighbours",
                      "cores": list(&self.placement.housekeeping)}),
        );
        json!(v)
    }
}

/// A thread's load as the thread itself measures it: its share of the
/// last full second spent working, and the core it was on then.
#[derive(Debug, Default)]
pub struct Load {
    busy_permille: AtomicU32,
    cpu: AtomicU32,
    /// Punted frames decided (a coprocessor thread's).
    decisions: AtomicU64,
}

impl Load {
    pub fn set(&self, busy_permille: u32) {
        self.busy_permille.store(busy_permille, Ordering::Relaxed);
        let cpu = current().and_then(|c| u32::try_from(c).ok());
        self.cpu
            .store(cpu.map_or(u32::MAX, |c| c + 1), Ordering::Relaxed);
    }

    /// Frames decided so far (as of the last measure).
    pub fn set_decisions(&self, n: u64) {
        self.decisions.store(n, Ordering::Relaxed);
    }

    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }

    /// Busy share of the last second, in percent.
    pub fn busy_pct(&self) -> f64 {
        f64::from(self.busy_permille.load(Ordering::Relaxed)) / 10.0
    }

    /// The core it ran on at the last measure.
    pub fn cpu(&self) -> Option<u32> {
        self.cpu.load(Ordering::Relaxed).checked_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_the_fast_path_gets_the_last_core_to_itself() {
        let p = plan(None, None, &[0, 1, 2, 3], 1).unwrap();
        assert_eq!(p.fastpath, vec![3]);
        assert_eq!(p.coprocessors, vec![0, 1, 2]);
        assert_eq!(p.housekeeping, vec![0, 1, 2]);
        // One core: nothing pinned.
        assert_eq!(plan(None, None, &[5], 1).unwrap(), Placement::default());
        // Coprocessors placed by hand: the fast path avoids them.
        let p = plan(None, Some(&[3]), &[0, 1, 2, 3], 1).unwrap();
        assert_eq!((p.fastpath, p.coprocessors), (vec![2], vec![3]));
    }

    #[test]
    fn configured_cores_are_taken_and_checked_against_the_allowed_ones() {
        let p = plan(Some(&[1]), Some(&[0, 0]), &[0, 1], 1).unwrap();
        assert_eq!(
            p,
            Placement {
                fastpath: vec![1],
                coprocessors: vec![0],
                housekeeping: vec![0]
            }
        );
        let e = plan(Some(&[4]), None, &[0, 1], 1).unwrap_err().to_string();
        assert!(
            e.contains(
                "switch: field `fastpath_cores`: core 4 is not one this process may use (0-1)"
            ),
            "{e}"
        );
        let e = plan(None, Some(&[0, 7]), &[0, 1], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `coprocessor_cores`: core 7"), "{e}");
    }

    #[test]
    fn lists_read_as_the_kernel_writes_them() {
        assert_eq!(list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(list(&[]), "any");
    }

    #[test]
    fn a_thread_pins_itself_and_reads_its_mask_back() {
        let all = allowed().unwrap();
        let last = *all.last().unwrap();
        std::thread::spawn(move || {
            pin(&[last]).unwrap();
            assert_eq!(allowed().unwrap(), vec![last]);
            assert_eq!(current(), Some(last));
        })
        .join()
        .unwrap();
        assert!(pin(&[libc::CPU_SETSIZE as usize]).is_err());
    }
}
