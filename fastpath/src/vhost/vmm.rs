//! The VMM's side of a vhost-user connection, for tests and benchmarks
//! (feature `test-vmm`): guest memory in a memfd, the set-up QEMU does
//! before the guest's driver runs, and a ring started at given guest
//! addresses. `vhost`'s frontend speaks the protocol.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
pub use vhost::vhost_user::Frontend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// A device set up by [`attach`].
pub struct Attached {
    pub fe: Frontend,
    /// The guest's memory (guest address 0 up).
    pub mem: GuestMemoryMmap,
    /// The features the device offered.
    pub offered: u64,
}

/// Guest memory of `len` bytes in a memfd named `name`, and the device
/// on `fe` set up as QEMU does: owner, the offered features within
/// `features`, the offered protocol features within `protocol`, the
/// memory table. Panics on any failure (a test's or a bench's).
pub fn attach(
    fe: Frontend,
    name: &std::ffi::CStr,
    len: usize,
    features: u64,
    protocol: VhostUserProtocolFeatures,
) -> Attached {
    // SAFETY: memfd_create with a NUL-terminated name; checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor owned by nothing else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len as u64).expect("sizing the guest memory");
    let raw = file.as_raw_fd();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("mapping the guest memory");
    let mut fe = fe;
    fe.set_owner().expect("SET_OWNER");
    let offered = fe.get_features().expect("GET_FEATURES");
    fe.set_features(offered & features).expect("SET_FEATURES");
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(pf & protocol)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: host(&mem),
        mmap_offset: 0,
        mmap_handle: raw,
    }])
    .expect("SET_MEM_TABLE");
    Attached { fe, mem, offered }
}

/// Where guest address 0 is mapped in this process (the VMM's addresses
/// are what vring addresses are given in).
pub fn host(mem: &GuestMemoryMmap) -> u64 {
    mem.get_host_address(GuestAddress(0))
        .expect("guest address 0") as u64
}

/// A split ring's guest addresses.
#[derive(Clone, Copy, Debug)]
pub struct RingAt {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Set ring `index` up at `at` (from available index 0) with its
/// eventfds, and start and enable it.
pub fn start_ring(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    index: usize,
    at: RingAt,
    call: &EventFd,
    kick: &EventFd,
) {
    let host = host(mem);
    fe.set_vring_num(index, at.size).expect("SET_VRING_NUM");
    fe.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: at.size,
            queue_size: at.size,
            flags: 0,
            desc_table_addr: host + at.desc,
            used_ring_addr: host + at.used,
            avail_ring_addr: host + at.avail,
            log_addr: None,
        },
    )
    .expect("SET_VRING_ADDR");
    fe.set_vring_base(index, 0).expect("SET_VRING_BASE");
    fe.set_vring_call(index, call).expect("SET_VRING_CALL");
    fe.set_vring_kick(index, kick).expect("SET_VRING_KICK");
    fe.set_vring_enable(index, true).expect("SET_VRING_ENABLE");
}
