//! Opening the switch's ports from the config: the frame pools, tap,
//! vhost-user and af-xdp VM ports, and the AF_XDP uplink with its XDP
//! program. Each fast-path thread gets a frame pool of its own and its own
//! queue of every port: queue `i` (an AF_XDP socket on NIC queue `i`, a
//! queue of the multi-queue tap) for thread `i`. (Taking over, the ports
//! come from the running switch instead: `take`.)

use anyhow::{Context, Result};
use coprocessor::topology::Uplink;
use fastpath::dataplane::{Port, PortCounters, PortIo, VM_FILL_SHARE};
use fastpath::tap::Tap;
use fastpath::umem::FramePool;
use fastpath::xdp::XdpProgram;
use fastpath::xsk::{XskConfig, XskSocket};
use flowtable::PortId;
use tracing::info;

use crate::config::{Config, PortType};

/// The frame pool of each fast-path thread: every frame of its queues
/// lives there, and its AF_XDP sockets (uplink and VM ports) register it
/// as their UMEM, so frames cross ports uncopied.
/// 8 192 chunks for the uplink and the tap and vhost-user ports, and for
/// each af-xdp VM port its fill share and as much again in flight.
/// Taking over, the previous binary's pool is adopted: a placeholder until
/// then (dropping a populated 16 MiB one would cost the blackout
/// milliseconds).
pub fn frame_pools(cfg: &Config, taking_over: bool) -> Result<Vec<FramePool>> {
    (0..cfg.switch.fastpath_threads)
        .map(|_| frame_pool(cfg, taking_over))
        .collect()
}

fn frame_pool(cfg: &Config, taking_over: bool) -> Result<FramePool> {
    let vm_xsk = cfg
        .ports
        .iter()
        .filter(|p| p.kind == PortType::AfXdp)
        .count();
    let chunks = 8192 + 2 * VM_FILL_SHARE * vm_xsk;
    let pool = if taking_over {
        FramePool::new(1, 2048, false)
    } else {
        FramePool::new(
            u32::try_from(chunks).context("field `port`: too many af-xdp ports")?,
            2048,
            true,
        )
    }
    .context("allocating the frame pool")?;
    info!(
        huge_pages = pool.region().huge(),
        mib = pool.region().len() >> 20,
        "frame pool"
    );
    Ok(pool)
}

/// The ports opened (each fast-path thread's queues of them, by thread),
/// the XDP programs attached for them (attached while held), the
/// vhost-user ports' protocol sides.
#[derive(Default)]
pub struct Opened {
    pub ports: Vec<Vec<Port>>,
    pub programs: Vec<XdpProgram>,
    pub vhost: Vec<crate::vhost::Link>,
}

/// Open every configured port (ids in config order) and the uplink (its
/// id is `uplink.port`): queue `t` of each on `pools[t]`, for each
/// fast-path thread `t`.
pub fn open(cfg: &Config, pools: &[FramePool], uplink: Option<&Uplink>) -> Result<Opened> {
    let mut o = Opened {
        ports: pools.iter().map(|_| Vec::new()).collect(),
        ..Opened::default()
    };
    for (i, p) in cfg.ports.iter().enumerate() {
        let what = || format!("port[{i}] ({})", p.name);
        let id = PortId(u16::try_from(i).context("too many ports")?);
        let mut prog = None;
        // A vhost-user port's sides, one per thread, on one protocol side.
        let mut vhost = Vec::new();
        if p.kind == PortType::VhostUser {
            let (link, ios) =
                crate::vhost::open(vhost_spec(cfg, p)?, pools.len()).with_context(what)?;
            info!(port = %p.name, socket = %link.spec.socket.display(), mode = ?link.spec.mode, "vhost-user port");
            o.vhost.push(link);
            vhost = ios;
        }
        let mut vhost = vhost.into_iter();
        for (t, pool) in pools.iter().enumerate() {
            let queue = u32::try_from(t).context("too many fast-path threads")?;
            let io = match p.kind {
                PortType::Tap => PortIo::Tap(
                    Tap::open(&p.name).with_context(|| format!("{}: queue {t}", what()))?,
                ),
                PortType::VhostUser => vhost.next().context("a vhost-user port's side")?,
                PortType::AfXdp => {
                    let ifindex = fastpath::xsk::ifindex(&p.name).with_context(what)?;
                    let sock = XskSocket::open(ifindex, queue, pool, XskConfig::default())
                        .with_context(|| format!("{}: AF_XDP socket on queue {t}", what()))?;
                    let prog = match &mut prog {
                        Some(p) => p,
                        None => prog.insert(XdpProgram::attach_all(&p.name).with_context(what)?),
                    };
                    prog.register_socket(queue, sock.fd()).with_context(what)?;
                    PortIo::Xsk(Box::new(sock))
                }
            };
            o.ports[t].push(Port {
                id,
                name: p.name.clone(),
                io,
                counters: PortCounters::default(),
            });
        }
        o.programs.extend(prog);
        info!(port = %p.name, id = i, kind = ?p.kind, queues = pools.len(), "port open");
    }
    if let (Some(u), Some(up)) = (&cfg.uplink, uplink) {
        let ifindex = fastpath::xsk::ifindex(&u.interface)
            .with_context(|| format!("uplink: interface {:?}", u.interface))?;
        let mut prog = XdpProgram::attach(&u.interface, u.vtep, vxlan::UDP_PORT)
            .with_context(|| format!("uplink: XDP on {}", u.interface))?;
        let mut socks = Vec::new();
        for (t, pool) in pools.iter().enumerate() {
            let queue = u32::try_from(t).context("too many fast-path threads")?;
            let sock = XskSocket::open(ifindex, queue, pool, XskConfig::default())
                .with_context(|| {
                    format!(
                        "uplink: AF_XDP socket on {} queue {t} (the interface needs a queue per fast-path thread)",
                        u.interface
                    )
                })?;
            prog.register_socket(queue, sock.fd())?;
            socks.push(sock);
        }
        let sg = socks.iter().all(XskSocket::sg);
        info!(interface = %u.interface, vtep = %u.vtep, mode = prog.mode, multi_buffer = sg, queues = socks.len(), "uplink attached");
        // A 2 KiB chunk after the kernel's 256-byte headroom holds an IP
        // packet of 2048 − 256 − 14 bytes; longer needs multi-buffer.
        // Warned, not refused: a running deployment's config must keep
        // starting (and its small packets keep flowing).
        const ONE_CHUNK_MTU: u16 = 2048 - 256 - 14;
        if !sg && u.mtu > ONE_CHUNK_MTU {
            tracing::warn!(
                mtu = u.mtu,
                carried = ONE_CHUNK_MTU,
                "uplink: field `mtu`: this kernel has no AF_XDP multi-buffer (6.6+), so packets longer than one AF_XDP frame are dropped by the kernel; VMs are told mtu − 50 by DHCP, so keep it at or below the carried size"
            );
        }
        for (t, sock) in socks.into_iter().enumerate() {
            o.ports[t].push(Port {
                id: up.port,
                name: u.interface.clone(),
                io: PortIo::Xsk(Box::new(sock)),
                counters: PortCounters::default(),
            });
        }
        o.programs.push(prog);
    }
    Ok(o)
}

/// The MAC of interface `name` (from sysfs).
pub fn read_mac(name: &str) -> Result<flowtable::Mac> {
    let path = format!("/sys/class/net/{name}/address");
    let s = std::fs::read_to_string(&path)
        .with_context(|| format!("uplink: interface {name:?}: reading {path}"))?;
    crate::config::parse_mac(s.trim())
        .with_context(|| format!("uplink: interface {name:?}: bad MAC {s:?}"))
}

/// A configured vhost-user port's spec; its device MAC is the VM's on the
/// port (a fixed local one if none is set yet).
fn vhost_spec(cfg: &Config, p: &crate::config::PortConfig) -> Result<crate::vhost::Spec> {
    let mac = cfg
        .vms
        .iter()
        .find(|v| v.port == p.name)
        .and_then(|v| crate::config::parse_mac(&v.mac))
        .unwrap_or([2, 0, 0, 0, 0, 1]);
    Ok(crate::vhost::Spec {
        name: p.name.clone(),
        socket: p
            .socket
            .clone()
            .context("vhost-user port without a socket")?,
        mode: p.mode.unwrap_or_default(),
        mac,
    })
}
