//! Changes through the control socket: change batches (`apply`, and a
//! group's rules as one), ports added and removed at run time. Each is
//! checked whole before anything changes, then applied under the shared
//! state's lock; the fast path drops exactly the flows a change affects.

use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use coprocessor::lock;
use fastpath::dataplane::Request;
use flowtable::PortId;
use serde_json::{json, Value};
use tracing::info;

use crate::command::PortAdd;
use crate::links::Links;

/// `{"cmd": "apply", "ops": [...]}`: a batch of changes (see `api`),
/// whole or not at all; the fast path drops exactly the flows it
/// affects.
pub fn apply(links: &mut Links, text: &str, stop: &AtomicBool) -> Result<Value> {
    let t = Instant::now();
    let ops = crate::api::ApplyRequest::parse(text)?.ops;
    let parsed = t.elapsed();
    let shared = std::sync::Arc::clone(links.coprocessor.shared());
    let ops = crate::api::build_ops(ops, &links.ports, &coprocessor::read(&shared).policy)?;
    let checked = t.elapsed();
    let resolved = resolve_vteps(links, &ops, &shared);
    let mut sh = lock(&shared);
    if !resolved.is_empty() {
        let topo = std::sync::Arc::make_mut(&mut sh.topo);
        for (vtep, mac) in resolved {
            topo.set_neighbor(vtep, mac);
        }
    }
    let mut out = coprocessor::Update::default();
    let applied = sh
        .apply(ops, &mut out)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let version = sh.version;
    drop(sh);
    let done = t.elapsed();
    let removed = out.remove.len();
    if !links.fast.send_update(None, out, stop) {
        bail!("the switch is stopping");
    }
    info!(
        ops = applied.ops,
        connections_ended = applied.connections_ended,
        version,
        "applied"
    );
    Ok(
        json!({"ok": true, "ops": applied.ops, "connections_ended": applied.connections_ended,
              "flows_removed": removed, "version": version,
              "applied_us": t.elapsed().as_secs_f64() * 1e6,
              "phases_us": {"parse": parsed.as_secs_f64() * 1e6,
                            "check": (checked - parsed).as_secs_f64() * 1e6,
                            "apply": (done - checked).as_secs_f64() * 1e6}}),
    )
}

/// `{"cmd": "security-group-set", "name": N, "rules": [...]}`: one
/// `set-rules` operation through [`Server::apply`].
pub fn set_group(
    links: &mut Links,
    name: &str,
    rules: &[Value],
    stop: &AtomicBool,
) -> Result<Value> {
    let req = crate::command::Command::Apply {
        ops: vec![json!({"op": "set-rules", "name": name, "rules": rules})],
    };
    apply(links, &req.to_line(), stop)
}

/// `{"cmd": "port-add", "name": N, "type": "tap"}`: a new VM port
/// (VMs are then attached to it with `apply`).
pub fn port_add(links: &mut Links, v: &PortAdd) -> Result<Value> {
    let name = v.name.as_str();
    let kind = v.kind.as_str();
    match kind {
        "tap" | "vhost-user" => {}
        "af-xdp" => bail!(
            "field `type`: af-xdp ports are opened at start (they join the frame pool's UMEM); add them to the config"
        ),
        other => bail!("field `type`: {other:?} is neither tap nor vhost-user"),
    }
    if name.is_empty() || name.len() > 15 {
        bail!("field `name`: {name:?} is not an interface name (1 to 15 bytes)");
    }
    if links.ports.contains_key(name) {
        bail!("field `name`: port {name:?} already exists");
    }
    let id = PortId(links.next_port);
    let mut link = None;
    let io = if kind == "vhost-user" {
        let spec = vhost_spec(name, v)?;
        if links.vhost.iter().any(|l| l.spec.socket == spec.socket) {
            bail!(
                "field `socket`: {} is already another port's",
                spec.socket.display()
            );
        }
        let (l, io) = crate::vhost::open(spec, links.fast.len())?;
        l.wake_on_kick(&links.fast.wakes());
        link = Some(l);
        io
    } else {
        if let Some(f) = [("socket", &v.socket), ("mode", &v.mode), ("mac", &v.mac)]
            .into_iter()
            .find_map(|(f, x)| x.is_some().then_some(f))
        {
            bail!("field `{f}`: only vhost-user ports have one");
        }
        // A queue of the (multi-queue) tap for each fast-path thread.
        (0..links.fast.len())
            .map(|q| {
                fastpath::tap::Tap::open(name)
                    .map(fastpath::dataplane::PortIo::Tap)
                    .with_context(|| format!("port {name}: queue {q}"))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let ports = io
        .into_iter()
        .map(|io| {
            Box::new(fastpath::dataplane::Port {
                id,
                name: name.to_string(),
                io,
                counters: Default::default(),
            })
        })
        .collect();
    let added = links.fast.ask_each(ports, Request::AddPort).and_then(|r| {
        r.into_iter()
            .try_for_each(|r| r.map_err(|e| anyhow::anyhow!("{e}")))
    });
    if let Err(e) = added {
        // The endpoint's thread ends with it; its socket goes too.
        if let Some(l) = link {
            if l.spec.mode == crate::config::VhostMode::Server {
                let _ = std::fs::remove_file(&l.spec.socket);
            }
        }
        return Err(e);
    }
    links.next_port += 1;
    links.ports.insert(name.to_string(), id);
    links.vhost.extend(link);
    info!(port = name, id = id.0, "port added");
    Ok(json!({"ok": true, "id": id.0}))
}

/// `{"cmd": "port-remove", "name": N}`: close a port no VM uses.
pub fn port_remove(links: &mut Links, name: &str) -> Result<Value> {
    let id = *links
        .ports
        .get(name)
        .with_context(|| format!("field `name`: no port {name:?}"))?;
    {
        let sh = coprocessor::read(links.coprocessor.shared());
        if let Some(vm) = sh.topo.vm_on(id) {
            bail!(
                "port {name}: vm {} is attached to it (remove the VM first)",
                vm.name
            );
        }
        if sh.topo.external.as_ref().is_some_and(|e| e.port == id) {
            bail!("port {name}: it is the external network's port");
        }
    }
    for r in links.fast.ask(|tx| Request::RemovePort(id, tx))? {
        r.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    links.ports.remove(name);
    if let Some(i) = links.vhost.iter().position(|l| l.spec.name == name) {
        // Its thread gives the connection out and ends; dropping it
        // closes the VMM's connection and the listener.
        let link = links.vhost.remove(i);
        drop(link.endpoint.detach());
        if link.spec.mode == crate::config::VhostMode::Server {
            let _ = std::fs::remove_file(&link.spec.socket);
        }
    }
    info!(port = name, id = id.0, "port removed");
    Ok(json!({"ok": true}))
}

/// Next-hop MACs of the VTEPs `ops` introduce that the switch does not
/// know yet, from the kernel's tables (those it has).
fn resolve_vteps(
    links: &mut Links,
    ops: &[coprocessor::ops::Op],
    shared: &coprocessor::SharedLock,
) -> Vec<(Ipv4Addr, flowtable::Mac)> {
    use coprocessor::ops::Op;
    let mut want: Vec<Ipv4Addr> = ops
        .iter()
        .flat_map(|op| match op {
            Op::SetRemotes(list) => list.iter().map(|r| r.vtep).collect::<Vec<_>>(),
            Op::AddNetwork(n) | Op::ChangeNetwork(n) => n.gateway_vtep.into_iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    want.sort();
    want.dedup();
    {
        let sh = coprocessor::read(shared);
        if sh.topo.uplink.is_none() {
            return Vec::new();
        }
        want.retain(|v| sh.topo.neighbor(*v).is_none());
    }
    let Some(nl) = links.netlink.as_mut() else {
        return Vec::new();
    };
    if want.is_empty() {
        return Vec::new();
    }
    let table = nl.neighbors().unwrap_or_default();
    want.into_iter()
        .filter_map(|v| {
            let hop = nl.next_hop(v).unwrap_or(v);
            table.get(&hop).map(|m| (v, *m))
        })
        .collect()
}

/// A vhost-user port's `port-add` fields: `socket` (a path), `mode`
/// (`server`, the default, or `client`), `mac` (the device's).
fn vhost_spec(name: &str, v: &PortAdd) -> Result<crate::vhost::Spec> {
    let socket = v
        .socket
        .as_deref()
        .filter(|s| !s.is_empty())
        .context("field `socket`: a vhost-user port needs the path of its socket")?;
    let mode = match v.mode.as_deref() {
        None | Some("server") => crate::config::VhostMode::Server,
        Some("client") => crate::config::VhostMode::Client,
        Some(other) => bail!("field `mode`: {other:?} is neither server nor client"),
    };
    let mac = v
        .mac
        .as_deref()
        .context("field `mac`: the device's MAC (the VM's on this port) is missing")?;
    let mac = crate::config::parse_mac(mac)
        .with_context(|| format!("field `mac`: {mac:?} is not a MAC address"))?;
    Ok(crate::vhost::Spec {
        name: name.to_string(),
        socket: socket.into(),
        mode,
        mac,
    })
}
