use super::*;
use req::*;

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// A copy of descriptor `fd`, owned.
fn dup(fd: RawFd) -> OwnedFd {
    // SAFETY: dup of a live descriptor; checked below.
    let fd = unsafe { libc::dup(fd) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

fn vring_msg(index: u32, value: u32) -> Vec<u8> {
    [index.to_le_bytes(), value.to_le_bytes()].concat()
}

fn kick(index: u64) -> Vec<u8> {
    index.to_le_bytes().to_vec()
}

/// A record as QEMU's start of a device leaves it.
fn started() -> Record {
    let mut r = Record::default();
    let fd = eventfd();
    r.note(SET_OWNER, &[], &[]).unwrap();
    r.note(SET_FEATURES, &[1; 8], &[]).unwrap();
    r.note(SET_PROTOCOL_FEATURES, &[2; 8], &[]).unwrap();
    r.note(SET_MEM_TABLE, &[3; 40], std::slice::from_ref(&fd))
        .unwrap();
    for q in 0..2u32 {
        r.note(SET_VRING_NUM, &vring_msg(q, 256), &[]).unwrap();
        r.note(SET_VRING_BASE, &vring_msg(q, 0), &[]).unwrap();
        let mut addr = vring_msg(q, 0);
        addr.resize(40, 0xaa);
        r.note(SET_VRING_ADDR, &addr, &[]).unwrap();
        r.note(SET_VRING_KICK, &kick(q.into()), std::slice::from_ref(&fd))
            .unwrap();
        r.note(SET_VRING_CALL, &kick(q.into()), std::slice::from_ref(&fd))
            .unwrap();
        r.note(SET_VRING_ENABLE, &vring_msg(q, 1), &[]).unwrap();
    }
    r
}

fn requests(r: &Record) -> Vec<u32> {
    r.messages().map(|m| m.request).collect()
}

#[test]
fn the_replay_order_is_fixed_whatever_order_the_vmm_used() {
    let r = started();
    let ring = [
        SET_VRING_NUM,
        SET_VRING_BASE,
        SET_VRING_ADDR,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut want = vec![
        SET_OWNER,
        SET_FEATURES,
        SET_PROTOCOL_FEATURES,
        SET_MEM_TABLE,
    ];
    want.extend(ring);
    want.extend(ring);
    assert_eq!(requests(&r), want);
    assert_eq!(r.started().collect::<Vec<_>>(), vec![0, 1]);
    // Each kept message has its own descriptors.
    let fds: Vec<usize> = r.messages().map(|m| m.fds.len()).collect();
    assert_eq!(fds.iter().sum::<usize>(), 5);
}

#[test]
fn a_later_request_replaces_the_earlier_one_and_a_stopped_ring_is_not_restarted() {
    let mut r = started();
    r.note(SET_VRING_ENABLE, &vring_msg(1, 0), &[]).unwrap();
    let enables: Vec<Vec<u8>> = r
        .messages()
        .filter(|m| m.request == SET_VRING_ENABLE)
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(enables, vec![vring_msg(0, 1), vring_msg(1, 0)]);
    // GET_VRING_BASE stops ring 0: no base, kick or call is replayed.
    r.note(GET_VRING_BASE, &vring_msg(0, 0), &[]).unwrap();
    assert_eq!(r.started().collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        r.messages().filter(|m| m.request == SET_VRING_KICK).count(),
        1
    );
    // The base of a running ring is where the fast path stopped.
    r.set_base(1, 4711);
    let base: Vec<Vec<u8>> = r
        .messages()
        .filter(|m| m.request == SET_VRING_BASE)
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(base, vec![vring_msg(1, 4711)]);
    // RESET_OWNER forgets everything.
    r.note(RESET_OWNER, &[], &[]).unwrap();
    assert!(r.is_empty());
}

#[test]
fn requests_for_rings_out_of_range_or_too_short_are_not_kept() {
    let mut r = Record::default();
    r.note(SET_VRING_NUM, &vring_msg(200, 256), &[]).unwrap();
    r.note(SET_VRING_NUM, &[1, 0], &[]).unwrap();
    r.note(SET_VRING_KICK, &kick(0x1ff), &[]).unwrap();
    assert!(r.is_empty());
    // Bit 8 of a kick says "no eventfd"; the ring is the low byte.
    let mut r = Record::default();
    r.note(SET_VRING_KICK, &kick(0x103), &[]).unwrap();
    assert_eq!(r.started().collect::<Vec<_>>(), vec![3]);
}

#[test]
fn a_record_goes_through_its_wire_form_with_its_descriptors() {
    let r = started();
    let mut fds = Vec::new();
    let wire = r.to_wire(&mut fds);
    assert_eq!(fds.len(), 5);
    let json = serde_json::to_string(&wire).unwrap();
    let back: Vec<WireMessage> = serde_json::from_str(&json).unwrap();
    let mut given: Vec<Option<OwnedFd>> = fds.iter().map(|&fd| Some(dup(fd))).collect();
    let r2 = Record::from_wire(back.clone(), |i| given.get_mut(i)?.take()).unwrap();
    assert_eq!(requests(&r2), requests(&r));
    // A descriptor named twice, or missing, is refused.
    let mut none: Vec<Option<OwnedFd>> = Vec::new();
    assert!(Record::from_wire(back.clone(), |i| none.get_mut(i)?.take()).is_err());
    let mut big = back;
    big[0].payload = vec![0; crate::vhost::record::MAX_PAYLOAD + 1];
    big.iter_mut().for_each(|m| m.fds.clear());
    assert!(Record::from_wire(big, |_| None).is_err());
}
