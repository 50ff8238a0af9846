//! What a VMM set up on a vhost-user connection, kept so that another
//! request handler (the next binary's, after a live handover; this one's
//! again, if the handover fails) can be set up the same way without the
//! VMM noticing.
//!
//! `vhost-user-backend` keeps its per-connection state (features, memory
//! table, vring addresses, kick and call eventfds) private, so the state
//! cannot be read out of it; but all of it arrived as requests through
//! [`super::shim`], which notes the last request of each kind here (with
//! its own copies of the descriptors). Replaying them in a fixed order —
//! features, memory table, then per vring size, base, addresses, eventfds,
//! enable — into a fresh handler rebuilds the same device. The one thing
//! the VMM did not say is where each running ring is now: the base is
//! replaced by the ring's next available index when the connection is
//! handed over ([`Record::set_base`]); the used index is read from guest
//! memory by the handler when the addresses are set.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A vhost-user message header is 12 bytes: request, flags, size.
pub const HDR: usize = 12;

/// Largest payload a request carries (a memory table of 8 regions is
/// 8 + 8 × 32 bytes; config space up to 256).
pub const MAX_PAYLOAD: usize = 4096;

/// Requests (vhost-user specification, "front-end message types").
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const RESET_DEVICE: u32 = 34;
}

/// Header flags: protocol version 1, a reply, the sender wants a reply.
pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

/// Vrings a record keeps (the device's; more is a bad request).
const MAX_VRINGS: usize = 2 * super::port::MAX_PAIRS;

/// One request as the VMM sent it.
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    fn new(request: u32, payload: Vec<u8>) -> Message {
        Message {
            request,
            flags: VERSION,
            payload,
            fds: Vec::new(),
        }
    }

    /// Header (with `flags`) and payload, as on the wire.
    fn bytes(&self, flags: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(HDR + self.payload.len());
        m.extend_from_slice(&self.request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        // Payloads are at most `MAX_PAYLOAD` bytes.
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&self.payload);
        m
    }

    /// Send on `s` with header flags `flags`, and the descriptors.
    pub fn send(&self, s: &UnixStream, flags: u32) -> io::Result<()> {
        let msg = self.bytes(flags);
        if self.fds.is_empty() {
            return (&*s).write_all(&msg);
        }
        let raw: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let n = s
            .send_with_fds(&[&msg[..]], &raw)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if n < msg.len() {
            (&*s).write_all(&msg[n..])?;
        }
        Ok(())
    }

    fn word(&self, i: usize) -> Option<u32> {
        let b = self.payload.get(i..i + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[derive(Default)]
struct Vring {
    num: Option<Message>,
    base: Option<Message>,
    addr: Option<Message>,
    err: Option<Message>,
    call: Option<Message>,
    kick: Option<Message>,
    enable: Option<Message>,
}

impl Vring {
    fn all(&self) -> impl Iterator<Item = &Message> {
        [
            &self.num,
            &self.base,
            &self.addr,
            &self.err,
            &self.call,
            &self.kick,
            &self.enable,
        ]
        .into_iter()
        .flatten()
    }
}

/// The last request of each kind a connection's handler took.
#[derive(Default)]
pub struct Record {
    owner: Option<Message>,
    features: Option<Message>,
    protocol: Option<Message>,
    mem: Option<Message>,
    vrings: Vec<Vring>,
}

impl Record {
    /// Note a request passed to the handler (`fds` are copied).
    pub fn note(&mut self, request: u32, payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        let mut m = Message::new(request, payload.to_vec());
        m.fds = fds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<io::Result<_>>()?;
        self.keep(m);
        Ok(())
    }

    fn keep(&mut self, m: Message) {
        use req::*;
        // The vring a per-vring request is for: a u32 first in the
        // payload, or (for the eventfd requests) the low byte of a u64.
        let index = match m.request {
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => m.word(0).map(|w| w & 0xff),
            _ => m.word(0),
        }
        .and_then(|i| usize::try_from(i).ok())
        .filter(|&i| i < MAX_VRINGS);
        let slot: Option<fn(&mut Vring) -> &mut Option<Message>> = match m.request {
            SET_VRING_NUM => Some(|v| &mut v.num),
            SET_VRING_BASE => Some(|v| &mut v.base),
            SET_VRING_ADDR => Some(|v| &mut v.addr),
            SET_VRING_ERR => Some(|v| &mut v.err),
            SET_VRING_CALL => Some(|v| &mut v.call),
            SET_VRING_KICK => Some(|v| &mut v.kick),
            SET_VRING_ENABLE => Some(|v| &mut v.enable),
            _ => None,
        };
        match m.request {
            SET_OWNER => self.owner = Some(m),
            RESET_OWNER => *self = Record::default(),
            RESET_DEVICE => self.vrings.clear(),
            SET_FEATURES => self.features = Some(m),
            SET_PROTOCOL_FEATURES => self.protocol = Some(m),
            SET_MEM_TABLE => self.mem = Some(m),
            GET_VRING_BASE => {
                // The ring stops (the handler drops its eventfds); the VMM
                // sends base, kick and call again to start it.
                if let Some(v) = self.vring(index) {
                    v.base = None;
                    v.kick = None;
                    v.call = None;
                }
            }
            _ => {
                if let (Some(slot), Some(v)) = (slot, self.vring(index)) {
                    *slot(v) = Some(m);
                }
            }
        }
    }

    fn vring(&mut self, index: Option<usize>) -> Option<&mut Vring> {
        let i = index?;
        if self.vrings.len() <= i {
            self.vrings.resize_with(i + 1, Vring::default);
        }
        self.vrings.get_mut(i)
    }

    /// True if the VMM set anything up.
    pub fn is_empty(&self) -> bool {
        self.messages().next().is_none()
    }

    /// The rings started (a kick eventfd set, not stopped since).
    pub fn started(&self) -> impl Iterator<Item = usize> + '_ {
        self.vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.kick.is_some())
            .map(|(i, _)| i)
    }

    /// Ring `index` goes on from available index `base`.
    pub fn set_base(&mut self, index: usize, base: u16) {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let payload = [index.to_le_bytes(), u32::from(base).to_le_bytes()].concat();
        self.keep(Message::new(req::SET_VRING_BASE, payload));
    }

    /// The requests that set a handler up the same way, in order.
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        [&self.owner, &self.features, &self.protocol, &self.mem]
            .into_iter()
            .flatten()
            .chain(self.vrings.iter().flat_map(Vring::all))
    }

    /// The record as data (descriptors as indices into `fds`, which they
    /// are appended to).
    pub fn to_wire(&self, fds: &mut Vec<RawFd>) -> Vec<WireMessage> {
        self.messages()
            .map(|m| WireMessage {
                request: m.request,
                flags: m.flags,
                payload: m.payload.clone(),
                fds: m
                    .fds
                    .iter()
                    .map(|f| {
                        fds.push(f.as_raw_fd());
                        fds.len() - 1
                    })
                    .collect(),
            })
            .collect()
    }

    /// A record from its data; `fd(i)` gives descriptor `i` (each once).
    pub fn from_wire(
        wire: Vec<WireMessage>,
        mut fd: impl FnMut(usize) -> Option<OwnedFd>,
    ) -> io::Result<Record> {
        let mut r = Record::default();
        for w in wire {
            if w.payload.len() > MAX_PAYLOAD {
                return Err(io::Error::other(format!(
                    "vhost-user request {} with a {}-byte payload",
                    w.request,
                    w.payload.len()
                )));
            }
            let fds = w
                .fds
                .iter()
                .map(|&i| fd(i).ok_or_else(|| io::Error::other(format!("descriptor {i} missing"))))
                .collect::<io::Result<_>>()?;
            r.keep(Message {
                request: w.request,
                flags: w.flags,
                payload: w.payload,
                fds,
            });
        }
        Ok(r)
    }

    /// Set up the handler on `backend` as this record says, and kick the
    /// started rings once (so the device publishes them). The handler
    /// answers nothing but the two feature queries that open and close
    /// the replay; a refused request ends its connection, which the
    /// closing query finds.
    pub fn replay(&self, backend: &UnixStream) -> io::Result<()> {
        backend.set_read_timeout(Some(Duration::from_secs(2)))?;
        query_features(backend)?;
        for m in self.messages() {
            m.send(backend, m.flags & !NEED_REPLY)?;
        }
        query_features(backend).map_err(|e| {
            io::Error::other(format!("the handler refused the replayed set-up: {e}"))
        })?;
        backend.set_read_timeout(None)?;
        for i in self.started() {
            if let Some(kick) = self.vrings[i].kick.as_ref().and_then(|k| k.fds.first()) {
                let one = 1u64;
                // SAFETY: writes 8 bytes from a live u64 to a descriptor
                // this record owns; an eventfd takes exactly that.
                unsafe { libc::write(kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
        }
        Ok(())
    }
}

/// GET_FEATURES, and its answer.
fn query_features(s: &UnixStream) -> io::Result<u64> {
    Message::new(req::GET_FEATURES, Vec::new()).send(s, VERSION)?;
    let mut hdr = [0u8; HDR + 8];
    (&*s).read_exact(&mut hdr)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    if word(0) != req::GET_FEATURES || word(4) & REPLY == 0 || word(8) != 8 {
        return Err(io::Error::other("unexpected answer to GET_FEATURES"));
    }
    Ok(u64::from_le_bytes(hdr[HDR..].try_into().unwrap_or([0; 8])))
}

/// A recorded request as data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireMessage {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<usize>,
}

#[cfg(test)]
mod tests;
