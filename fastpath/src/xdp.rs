//! The XDP programs of `bpf/vxlan_redirect.c`, loaded with aya:
//! `vxlan_redirect` on the uplink, told our VTEP address and the VXLAN
//! port (only VXLAN for our VTEP goes to vswitch; the host keeps
//! everything else), and `redirect_all` on a VM's veth end (a frame on a
//! queue without a socket is dropped: a VM's frames never reach the host's
//! stack). Each is given the AF_XDP socket of each queue.
//!
//! aya attaches through a bpf_link where the kernel has them, so the
//! program goes away with the process — also when it crashes — and a
//! restart never finds a stale program holding the interface busy.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use aya::maps::{Array, Map, MapData, XskMap};
use aya::programs::{ProgramError, Xdp, XdpFlags};
use aya::Ebpf;
use thiserror::Error;

/// The compiled program (built by build.rs with clang).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vxlan_redirect.o"));

/// Mirrors `struct vtep_config` in the C program.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct VtepConfig {
    vtep: u32,
    udp_port: u16,
    pad: u16,
}

// SAFETY: plain integers with no padding (4 + 2 + 2 bytes); any bit
// pattern is valid and it is copied to the kernel as bytes.
unsafe impl aya::Pod for VtepConfig {}

#[derive(Debug, Error)]
pub enum XdpError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP object lacks {0}")]
    Missing(&'static str),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("attaching XDP to {iface}: driver mode: {native}; generic mode: {generic}")]
    Attach {
        iface: String,
        native: String,
        generic: String,
    },
}

/// The attached program; detached when dropped (unless the next binary
/// holds its link, see [`XdpProgram::link_fd`]).
pub struct XdpProgram {
    bpf: Ebpf,
    /// "native" or "generic".
    pub mode: &'static str,
    /// The bpf_link keeping it attached, owned by `bpf`.
    link: Option<RawFd>,
    /// The interface it is attached to.
    pub iface: String,
}

impl XdpProgram {
    /// Load the program and attach it to `iface`, redirecting VXLAN to
    /// `vtep`:`udp_port`. Native (driver) mode is tried first, then generic.
    pub fn attach(iface: &str, vtep: Ipv4Addr, udp_port: u16) -> Result<XdpProgram, XdpError> {
        Self::load_and_attach(iface, "vxlan_redirect", Some((vtep, udp_port)))
    }

    /// Load the program that redirects every frame and attach it to `iface`
    /// (the switch's end of a VM's veth pair).
    pub fn attach_all(iface: &str) -> Result<XdpProgram, XdpError> {
        Self::load_and_attach(iface, "redirect_all", None)
    }

    fn load_and_attach(
        iface: &str,
        name: &'static str,
        vtep: Option<(Ipv4Addr, u16)>,
    ) -> Result<XdpProgram, XdpError> {
        let mut bpf = Ebpf::load(OBJECT)?;
        if let Some((vtep, udp_port)) = vtep {
            let map = bpf
                .map_mut("config")
                .ok_or(XdpError::Missing("map config"))?;
            let mut cfg: Array<_, VtepConfig> = Array::try_from(map)?;
            cfg.set(
                0,
                VtepConfig {
                    vtep: u32::from(vtep).to_be(),
                    udp_port: udp_port.to_be(),
                    pad: 0,
                },
                0,
            )?;
        }
        let prog: &mut Xdp = bpf
            .program_mut(name)
            .ok_or(XdpError::Missing(name))?
            .try_into()?;
        prog.load()?;
        let mode = match prog.attach(iface, XdpFlags::DRV_MODE) {
            Ok(_) => "native",
            Err(native) => match prog.attach(iface, XdpFlags::SKB_MODE) {
                Ok(_) => "generic",
                Err(generic) => {
                    return Err(XdpError::Attach {
                        iface: iface.into(),
                        native: native.to_string(),
                        generic: generic.to_string(),
                    })
                }
            },
        };
        let link = xdp_link_of(crate::xsk::ifindex(iface).unwrap_or(0));
        Ok(XdpProgram {
            bpf,
            mode,
            link,
            iface: iface.into(),
        })
    }

    /// The descriptor of the bpf_link that keeps the program attached, if
    /// it was attached through one (kernels ≥ 5.9). A live handover passes
    /// it to the next binary, whose copy keeps the program (and its socket
    /// map) attached after this process is gone; when the last copy
    /// closes, the program detaches.
    pub fn link_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the link is owned by `self.bpf`, which lives as long as
        // the borrow of `self`.
        self.link.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// The descriptor of the program's socket map (the queue → AF_XDP
    /// socket table). A live handover passes it on, so a next binary with
    /// more fast-path threads can add the sockets of the queues it opens.
    pub fn socket_map_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.bpf.map("xsks")? {
            Map::XskMap(m) => Some(m.fd().as_fd()),
            _ => None,
        }
    }

    /// Direct traffic of receive queue `queue` to the AF_XDP socket `fd`.
    pub fn register_socket(&mut self, queue: u32, fd: impl AsRawFd) -> Result<(), XdpError> {
        let map = self
            .bpf
            .map_mut("xsks")
            .ok_or(XdpError::Missing("map xsks"))?;
        let mut xsks = XskMap::try_from(map)?;
        xsks.set(queue, fd, 0)?;
        Ok(())
    }
}

/// A running program's socket map, from the descriptor a live handover
/// passed on ([`XdpProgram::socket_map_fd`]).
pub struct SocketMap(Map);

impl SocketMap {
    /// The map behind `fd`; an error if it is not an AF_XDP socket map.
    pub fn from_fd(fd: OwnedFd) -> Result<SocketMap, XdpError> {
        let map = Map::XskMap(MapData::from_fd(fd)?);
        // Checks the key and value sizes.
        XskMap::try_from(&map)?;
        Ok(SocketMap(map))
    }

    /// Direct traffic of receive queue `queue` to the AF_XDP socket `fd`.
    pub fn register_socket(&mut self, queue: u32, fd: impl AsRawFd) -> Result<(), XdpError> {
        XskMap::try_from(&mut self.0)?.set(queue, fd, 0)?;
        Ok(())
    }

    /// The map's descriptor (handed on in the next handover).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            Map::XskMap(m) => Some(m.fd().as_fd()),
            _ => None,
        }
    }
}

/// This process's XDP bpf_link on interface `ifindex`, found in
/// /proc/self/fdinfo (aya keeps the link's descriptor to itself; the
/// kernel lists `link_type: xdp` and `ifindex:` for each).
fn xdp_link_of(ifindex: u32) -> Option<RawFd> {
    let want = format!("ifindex:\t{ifindex}\n");
    std::fs::read_dir("/proc/self/fdinfo")
        .ok()?
        .flatten()
        .find_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            (info.contains("link_type:\txdp\n") && info.contains(&want)).then_some(fd)
        })
}
