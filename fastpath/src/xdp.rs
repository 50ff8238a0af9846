//! The XDP programs of `bpf/vxlan_redirect.c`, loaded with aya:
//! `vxlan_redirect` on the uplink, told our VTEP address and the VXLAN
//! port (only VXLAN for our VTEP goes to vswitch; the host keeps
//! everything else), and `redirect_all` on a VM's veth end. Each is given
//! the AF_XDP socket of each queue.
//!
//! aya attaches through a bpf_link where the kernel has them, so the
//! program goes away with the process — also when it crashes — and a
//! restart never finds a stale program holding the interface busy.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use aya::maps::{Array, XskMap};
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

/// The attached program; detached when dropped.
pub struct XdpProgram {
    bpf: Ebpf,
    /// "native" or "generic".
    pub mode: &'static str,
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
        Ok(XdpProgram { bpf, mode })
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
