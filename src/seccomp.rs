//! System-call filters for the threads that handle tenant bytes: the fast
//! path (every frame) and the coprocessors (every punted frame). Each
//! thread installs its filter as it starts, before it touches a packet;
//! a system call outside its list kills the whole switch at once
//! (`SECCOMP_RET_KILL_PROCESS`), which the kernel logs (audit type 1326,
//! with the call's number) — a parser bug that a tenant turned into code
//! execution gets no further than that. Other threads (control, metrics,
//! vhost-user protocol, neighbours) open sockets and files at run time and
//! are not filtered.
//!
//! The lists are what the threads do: the fast path polls, reads and
//! writes taps and eventfds, wakes AF_XDP sockets (`sendto`), reads their
//! statistics (`getsockopt`), closes a removed port, allocates when it
//! answers a control request, waits on futexes; a coprocessor allocates,
//! waits and wakes. `[switch] seccomp = false` turns the filters off (for a
//! kernel or libc that needs a call not listed: say which, it belongs in
//! the list).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    FastPath,
    Coprocessor,
}

/// Calls every filtered thread makes: memory, futexes, time, its core,
/// signals and
/// the thread's own end (the standard library's), logging (to stderr, or
/// to the journal: a datagram, with a sealed memfd for a long entry), and
/// `restart_syscall`, which the kernel has a thread make when a stop
/// (SIGSTOP and SIGCONT, a debugger or strace attaching) interrupted a
/// sleep: without it, looking at a running switch would kill it.
const COMMON: &[libc::c_long] = &[
    libc::SYS_restart_syscall,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // sched_getcpu(3) for the threads' load reports, where glibc has no
    // rseq area or vDSO to read it from.
    libc::SYS_getcpu,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
];

/// The fast path's own: polling and port I/O.
const FAST_PATH: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_getsockopt,
];

/// The filter for `role`.
pub fn filter(role: Role) -> Result<BpfProgram> {
    let own: &[libc::c_long] = match role {
        Role::FastPath => FAST_PATH,
        Role::Coprocessor => &[],
    };
    let rules = COMMON
        .iter()
        .chain(own)
        .map(|&nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .context("building the seccomp filter")?;
    f.try_into().context("compiling the seccomp filter")
}

/// Confine the calling thread to `role`'s calls (sets no_new_privs).
/// Make the allocator safe for confined threads; call before any thread
/// starts. glibc's malloc reads `/proc/sys/vm/overcommit_memory` the
/// first time it would shrink a thread arena's heap (`shrink_heap`), and
/// a confined thread may not open files: a fast-path thread that freed a
/// grown vector while adopting 300 ports was killed so. Heaps are
/// therefore never trimmed (`M_TRIM_THRESHOLD` at its maximum): what a
/// thread frees stays in its arena for reuse. Also sets the threshold
/// for the main arena, which returns memory through `brk` no more.
pub fn prepare_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a malloc tunable; no allocation is in
    // progress in another thread (none has started).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

pub fn confine(role: Role) -> Result<()> {
    let prog = filter(role)?;
    seccompiler::apply_filter(&prog)
        .with_context(|| format!("installing the {role:?} seccomp filter"))
}

/// In a thread about to do `role`'s work: confine it if `enabled`. If the
/// filter cannot be installed, the switch is stopped (`stop`) rather than
/// run unconfined, and false returned: the thread must not go on.
pub fn confine_or_stop(enabled: bool, role: Role, stop: &std::sync::atomic::AtomicBool) -> bool {
    if !enabled {
        return true;
    }
    match confine(role) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("{e:#}; stopping the switch");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// Run this test binary's test `name` in a child process with
    /// `VSWITCH_SECCOMP_CHILD` set; its exit status.
    fn in_child(name: &str) -> std::process::ExitStatus {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("VSWITCH_SECCOMP_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    /// In the child: confined as the fast path, open a socket (a call no
    /// filtered thread makes).
    #[test]
    fn child_fast_path_opens_a_socket() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_none() {
            return;
        }
        confine(Role::FastPath).unwrap();
        // SAFETY: socket(2) with constant arguments; the result is unused.
        let _ = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        std::process::exit(0);
    }

    /// In the child: confined as a coprocessor, allocate, wait, write,
    /// and exit normally.
    #[test]
    fn child_coprocessor_does_its_work() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_none() {
            return;
        }
        confine(Role::Coprocessor).unwrap();
        let v: Vec<u64> = (0..1_000_000).collect();
        std::thread::park_timeout(std::time::Duration::from_millis(5));
        eprintln!("{}", v.len());
        std::process::exit(0);
    }

    /// In the child: confined as the fast path, sleep (the parent stops
    /// and continues it meanwhile, so the sleep is restarted), exit.
    #[test]
    fn child_fast_path_sleeps_through_a_stop() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_none() {
            return;
        }
        confine(Role::FastPath).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(600));
        std::process::exit(0);
    }

    /// In the child: confined as the fast path (in a thread, with an
    /// arena of its own), grow a vector far past a heap's trim threshold
    /// and free it, then exit. (`VSWITCH_SECCOMP_NO_PREPARE` skips
    /// `prepare_allocator`: the child is then killed, which is what the
    /// test guards against.)
    #[test]
    fn child_fast_path_allocates_and_frees() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_none() {
            return;
        }
        if std::env::var_os("VSWITCH_SECCOMP_NO_PREPARE").is_none() {
            prepare_allocator();
        }
        let t = std::thread::spawn(|| {
            confine(Role::FastPath).unwrap();
            for _ in 0..20 {
                let mut v: Vec<Vec<u8>> = Vec::new();
                for i in 0..2000 {
                    v.push(vec![1u8; 512 + i]);
                }
                drop(v);
            }
        });
        let ok = t.join().is_ok();
        std::process::exit(i32::from(!ok));
    }

    #[test]
    fn a_confined_thread_may_allocate_and_free() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_some() {
            return;
        }
        let st = in_child("seccomp::tests::child_fast_path_allocates_and_frees");
        assert!(st.success(), "{st:?}");
    }

    #[test]
    fn a_stopped_and_continued_switch_is_not_killed() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_some() {
            return;
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::child_fast_path_sleeps_through_a_stop",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VSWITCH_SECCOMP_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let st = child.wait().unwrap();
        assert!(st.success(), "stopped and continued: {st:?}");
    }

    #[test]
    fn a_forbidden_call_kills_the_process_and_allowed_work_goes_on() {
        if std::env::var_os("VSWITCH_SECCOMP_CHILD").is_some() {
            return;
        }
        let killed = in_child("seccomp::tests::child_fast_path_opens_a_socket");
        assert_eq!(killed.signal(), Some(libc::SIGSYS), "{killed:?}");
        let fine = in_child("seccomp::tests::child_coprocessor_does_its_work");
        assert!(fine.success(), "{fine:?}");
    }
}
