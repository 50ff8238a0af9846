//! Pinning a benchmark's thread to one core (shared by the benchmarks
//! through `#[path]`).

/// Restrict the calling thread to `cpu`; panics if the kernel refuses.
pub fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is a plain bit set; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` (< CPU_SETSIZE) of the set above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}
