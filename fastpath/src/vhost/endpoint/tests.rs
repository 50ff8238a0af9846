//! A port's protocol thread against an in-process VMM (see
//! `port::tests`): a live connection handed to a new endpoint and back,
//! client mode with reconnects.

// Lengths and flags here are small constants.
#![allow(clippy::cast_possible_truncation)]

use vhost::vhost_user::Frontend;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::vhost::port::tests::{connect, desc, mac, setup, sock_path, until, Vmm, BUF, RXQ, TXQ};
use crate::vhost::port::{VhostPort, RX_QUEUE, TX_QUEUE};
use crate::vhost::virtq::{self, Collect, HDR_LEN};

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x44];

/// The guest's queues (made once per connection: making one clears it).
struct Queues<'a> {
    tx: MockSplitQueue<'a, vm_memory::GuestMemoryMmap>,
    rx: MockSplitQueue<'a, vm_memory::GuestMemoryMmap>,
    sent: u16,
}

impl<'a> Queues<'a> {
    fn new(mem: &'a vm_memory::GuestMemoryMmap) -> Queues<'a> {
        Queues {
            tx: MockSplitQueue::create(mem, GuestAddress(TXQ), 16),
            rx: MockSplitQueue::create(mem, GuestAddress(RXQ), 16),
            sent: 0,
        }
    }

    /// The guest sends `payload` (header and payload in one descriptor)
    /// and kicks.
    fn send(&mut self, vmm: &Vmm, payload: &[u8]) {
        let at = BUF + u64::from(self.sent) * 0x200;
        let mut frame = vec![0u8; HDR_LEN];
        frame.extend_from_slice(payload);
        vmm.mem.write_slice(&frame, GuestAddress(at)).unwrap();
        self.tx
            .add_desc_chains(&[desc(at, frame.len() as u32, 0, 0)], self.sent)
            .unwrap();
        self.sent += 1;
        vmm.kicks[TX_QUEUE].write(1).unwrap();
    }

    /// The guest posts `n` receive buffers (buffer i at BUF + 0x8000 +
    /// i × 0x800).
    fn post(&self, vmm: &Vmm, n: u16) {
        let descs: Vec<_> = (0..n)
            .map(|i| desc(rx_buf(i), 0x800, VRING_DESC_F_WRITE, 0))
            .collect();
        self.rx.add_desc_chains(&descs, 0).unwrap();
        vmm.kicks[RX_QUEUE].write(1).unwrap();
    }
}

fn rx_buf(i: u16) -> u64 {
    BUF + 0x8000 + u64::from(i) * 0x800
}

/// Frames the port takes from the guest (waiting for the first).
fn received(port: &mut VhostPort) -> Vec<Vec<u8>> {
    let mut got = Collect::default();
    until("a guest frame", || {
        port.recv(32, &mut got);
        !got.frames.is_empty()
    });
    got.frames
}

fn payload_in(vmm: &Vmm, buf: u16, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vmm.mem
        .read_slice(&mut b, GuestAddress(rx_buf(buf) + HDR_LEN as u64))
        .unwrap();
    b
}

#[test]
fn a_live_connection_is_handed_over_and_goes_on_where_it_stopped() {
    let sock = sock_path("handover");
    let old_shared = Shared::new(MAC);
    let old = Endpoint::listen(&sock, old_shared.clone()).unwrap();
    let mut old_port = VhostPort::new(old_shared.clone());
    let mut vmm = connect(&sock);
    let mut q = Queues::new(&vmm.mem);
    q.send(&vmm, b"one");
    assert_eq!(received(&mut old_port), vec![b"one".to_vec()]);
    q.post(&vmm, 4);
    assert_eq!(old_port.send(virtq::plain([&b"to the guest 1"[..]])).0, 1);

    // The handover (the old fast path paused: it does not poll).
    let h = old.detach().unwrap();
    assert!(h.conn.is_some() && h.listener.is_some());
    assert!(!old_port.connected(), "the old side let the guest go");
    // The guest goes on meanwhile.
    q.send(&vmm, b"two");
    let new_shared = Shared::new(MAC);
    let listener = UnixListener::from(h.listener.unwrap());
    let new = Endpoint::adopt(Mode::Server(listener), new_shared.clone(), h.conn).unwrap();
    let mut port = VhostPort::new(new_shared.clone());
    assert!(port.connected(), "the rings are published on adoption");
    // Exactly what the old side had not taken; used index and receive
    // buffers go on.
    assert_eq!(received(&mut port), vec![b"two".to_vec()]);
    assert_eq!(q.tx.used().idx().load(), 2);
    assert_eq!(port.send(virtq::plain([&b"to the guest 2"[..]])).0, 1);
    assert_eq!(q.rx.used().idx().load(), 2);
    assert_eq!(payload_in(&vmm, 1, 14), b"to the guest 2");
    assert_eq!(payload_in(&vmm, 0, 14), b"to the guest 1");
    // The VMM's requests now reach the new handler.
    assert_eq!(mac(&mut vmm.fe), MAC.to_vec());

    // A failed handover gives the connection back to the same side.
    let h = new.detach().unwrap();
    assert!(!port.connected());
    new.reattach(h).unwrap();
    until("the rings again", || port.connected());
    q.send(&vmm, b"three");
    assert_eq!(received(&mut port), vec![b"three".to_vec()]);

    // The VMM leaves; the handed-over listener takes the next one.
    drop(q);
    drop(vmm);
    until("the end of the connection", || !port.connected());
    assert_eq!(new_shared.connections.load(Ordering::Relaxed), 1);
    vmm = connect(&sock);
    let mut q = Queues::new(&vmm.mem);
    q.send(&vmm, b"four");
    assert_eq!(received(&mut port), vec![b"four".to_vec()]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_port_with_no_vmm_is_handed_over_with_its_listener() {
    let sock = sock_path("idle");
    let old = Endpoint::listen(&sock, Shared::new(MAC)).unwrap();
    let h = old.detach().unwrap();
    assert!(h.conn.is_none());
    let shared = Shared::new(MAC);
    let _new = Endpoint::adopt(
        Mode::Server(UnixListener::from(h.listener.unwrap())),
        shared.clone(),
        None,
    )
    .unwrap();
    let vmm = connect(&sock);
    let mut q = Queues::new(&vmm.mem);
    q.send(&vmm, b"hello");
    let mut port = VhostPort::new(shared);
    assert_eq!(received(&mut port), vec![b"hello".to_vec()]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn in_client_mode_the_port_connects_to_the_vmm_and_again_after_it_restarts() {
    let sock = sock_path("client");
    let _ = std::fs::remove_file(&sock);
    let shared = Shared::new(MAC);
    // The switch starts first: it keeps trying.
    let _ep = Endpoint::start(Mode::Client(sock.clone()), shared.clone()).unwrap();
    let mut port = VhostPort::new(shared.clone());
    std::thread::sleep(Duration::from_millis(50));
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let accept = || {
        let mut s = None;
        until("the switch to connect", || {
            s = listener.accept().ok().map(|(s, _)| s);
            s.is_some()
        });
        let s = s.unwrap();
        s.set_nonblocking(false).unwrap();
        s
    };
    for round in 0..2 {
        let vmm = setup(Frontend::from_stream(accept(), 2));
        let mut q = Queues::new(&vmm.mem);
        let msg = format!("round {round}");
        q.send(&vmm, msg.as_bytes());
        assert_eq!(received(&mut port), vec![msg.into_bytes()]);
        drop(q);
        drop(vmm);
        until("the end of the connection", || !port.connected());
    }
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn listening_replaces_only_a_stale_socket() {
    // A regular file where the socket should go: refused, and kept.
    let file = sock_path("file");
    std::fs::write(&file, b"precious").unwrap();
    let e = Endpoint::listen(&file, Shared::new(MAC))
        .err()
        .expect("refused");
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let _ = std::fs::remove_file(&file);
    // A socket someone listens on: refused, and still theirs.
    let busy = sock_path("busy");
    let theirs = UnixListener::bind(&busy).unwrap();
    let e = Endpoint::listen(&busy, Shared::new(MAC))
        .err()
        .expect("refused");
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert!(UnixStream::connect(&busy).is_ok());
    drop(theirs);
    // Now stale (nobody listens): replaced.
    let e = Endpoint::listen(&busy, Shared::new(MAC)).unwrap();
    assert!(UnixStream::connect(&busy).is_ok());
    drop(e);
    let _ = std::fs::remove_file(&busy);
}

#[test]
fn a_dropped_endpoint_leaves_no_thread_accepting_vmms() {
    // As when the fast path refuses a port added at run time.
    let sock = sock_path("dropped");
    let e = Endpoint::listen(&sock, Shared::new(MAC)).unwrap();
    assert!(UnixStream::connect(&sock).is_ok());
    drop(e);
    // The thread ends and closes its listener.
    until("the listener closes", || {
        UnixStream::connect(&sock).is_err()
    });
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_detach_that_times_out_is_called_off_and_the_port_serves_on() {
    use std::io::{Read, Write};
    let sock = sock_path("stalled");
    let e = Endpoint::listen(&sock, Shared::new(MAC)).unwrap();
    // A VMM that stalls in the middle of a request: the header of
    // SET_FEATURES (8-byte payload), and no payload yet.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    let header = |request: u32, size: u32| {
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1
        h[8..].copy_from_slice(&size.to_le_bytes());
        h
    };
    stalled.write_all(&header(2, 8)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let err = e.detach().err().expect("the thread is stuck mid-request");
    assert!(err.to_string().contains("called off"), "{err}");
    // The VMM goes on, then goes away.
    stalled.write_all(&0u64.to_le_bytes()).unwrap();
    drop(stalled);
    // The port serves a new VMM: its first request is answered.
    let mut vmm = UnixStream::connect(&sock).unwrap();
    vmm.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    vmm.write_all(&header(1, 0)).unwrap(); // GET_FEATURES
    let mut reply = [0u8; 20];
    vmm.read_exact(&mut reply)
        .expect("GET_FEATURES answered: the thread serves on");
    assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 1);
    // And a later detach is meant: it gives the connection out.
    let h = e.detach().expect("a detach after the one called off");
    assert!(h.conn.is_some());
    let _ = std::fs::remove_file(&sock);
}
