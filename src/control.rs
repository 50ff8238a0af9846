//! The control socket: a root-only Unix socket taking one request per
//! connection (a [`Command`] as a JSON line) and answering with one JSON
//! document; or, for a handover, handing the switch over on it (`give`).
//! This module reads and dispatches; the answers are `views` (read-only)
//! and `changes`; its client is `ctl`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coprocessor::read;
use fastpath::dataplane::Request;
use live_migrate::protocol;
use serde_json::{json, Value};
use tracing::warn;

use crate::command::Command;
use crate::links::Links;
use crate::{changes, views};

/// Largest request accepted (a bulk change of 100 000 endpoints is ~15 MiB).
const MAX_REQUEST: u64 = 64 << 20;
/// How long a client has to send its whole request (a per-read timeout
/// would let a client trickling a byte at a time hold the control thread).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

pub struct Server {
    listener: UnixListener,
    /// The switch was handed over to a new binary (which serves this
    /// socket now: do not remove its path on exit).
    handed_over: bool,
    /// The last top-talkers sample, for rates.
    talkers: views::TalkerSample,
    links: Links,
}

impl Server {
    /// Bind the control socket at `path` with mode 0600 (a stale socket
    /// file is replaced).
    pub fn bind(path: &Path, links: Links) -> Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is in use by a running vswitch",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        // Made 0600 from the start (umask), not chmod-ed after: nobody
        // else can connect in between.
        // SAFETY: umask only swaps the process's file-creation mask; it is
        // put back right after. A file another thread creates meanwhile
        // gets the stricter mask, never a looser one.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Server::inherit(listener, links)
    }

    /// Serve an already bound listener (handed over by the previous
    /// binary).
    pub fn inherit(listener: UnixListener, links: Links) -> Result<Server> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            handed_over: false,
            talkers: (Instant::now(), HashMap::new()),
            listener,
            links,
        })
    }

    /// True once this switch was handed over to a new binary.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Answer requests until `stop` is set. (Metrics are served on a
    /// thread of their own, `metrics_http`, so a slow scraper cannot hold
    /// this one.)
    pub fn serve(&mut self, stop: &AtomicBool) {
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        while !stop.load(Ordering::Relaxed) {
            // Sleep until a client connects (or a while, to see `stop`).
            fastpath::wake::wait_readable(&mut fds, 100);
            match self.listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.handle(s, stop) {
                        warn!("control request failed: {e:#}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!("control socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn handle(&mut self, s: UnixStream, stop: &AtomicBool) -> Result<()> {
        s.set_nonblocking(false)?;
        let mut line = String::new();
        // The whole request within REQUEST_DEADLINE, however it trickles in.
        let by = crate::deadline::Deadline::new(&s, REQUEST_DEADLINE);
        let n = BufReader::new(by.take(MAX_REQUEST)).read_line(&mut line);
        let reply = match n {
            Err(e) => json!({"error": format!("reading the request: {e}")}),
            Ok(n) if n as u64 >= MAX_REQUEST && !line.ends_with('\n') => {
                json!({"error": format!("request larger than {} MiB", MAX_REQUEST >> 20)})
            }
            Ok(_) => match self.answer(&line, &s, stop) {
                Some(reply) => reply,
                // The connection carried a handover.
                None => return Ok(()),
            },
        };
        let mut w = &s;
        w.write_all(serde_json::to_string(&reply)?.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(())
    }

    /// The answer to the request `line`, or `None` if the connection `s`
    /// was used for a handover.
    fn answer(&mut self, line: &str, s: &UnixStream, stop: &AtomicBool) -> Option<Value> {
        // A change batch is read into its types directly (it may hold
        // 100 000 endpoints); every other request into a `Command`.
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            cmd: Option<&'a str>,
        }
        if let Ok(Head {
            cmd: Some(Command::APPLY),
        }) = serde_json::from_str::<Head>(line)
        {
            let r = changes::apply(&mut self.links, line, stop);
            return Some(r.unwrap_or_else(|e| json!({"error": format!("{e:#}")})));
        }
        let cmd = match Command::parse(line) {
            Ok(Command::Handover(req)) => {
                self.handed_over =
                    crate::give::handover(&mut self.links, &self.listener, &req, s, stop);
                return None;
            }
            Ok(cmd) => cmd,
            Err(e) => return Some(json!({"error": format!("{e:#}")})),
        };
        Some(
            self.dispatch(cmd, stop)
                .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
        )
    }

    fn dispatch(&mut self, cmd: Command, stop: &AtomicBool) -> Result<Value> {
        let links = &mut self.links;
        let shared = links.coprocessor.shared().clone();
        Ok(match cmd {
            Command::Stats => {
                let each = links.fast.ask(Request::Stats)?;
                let mut v = views::stats(
                    &fastpath::totals::total(each.clone()).context("no fast-path thread")?,
                );
                v["threads"] = links.threads.view(&each);
                v["conntrack"] = views::conntrack_counters(&read(&shared));
                v["last_handover"] = links.last_handover.clone().unwrap_or(Value::Null);
                if !links.vhost.is_empty() {
                    let vu: Vec<Value> =
                        links.vhost.iter().map(crate::vhost::Link::status).collect();
                    v["vhost_user"] = json!(vu);
                }
                v
            }
            Command::Flows { filter } => {
                let now = links.now();
                let flows = links.fast.ask(Request::Flows)?.concat();
                views::flows(&flows, &filter, now)
            }
            Command::Conntrack => views::conntrack(&read(&shared), links.now()),
            Command::Nat => views::nat(&read(&shared)),
            Command::SecurityGroups => views::groups(&read(&shared)),
            Command::Services => views::services(&read(&shared)),
            Command::Topology => views::topology(&read(&shared)),
            Command::Remotes { network } => views::remotes(&read(&shared), network),
            Command::Leases => views::leases(&read(&shared), links.now()),
            Command::TopTalkers { limit } => {
                let mut talkers = fastpath::totals::talkers(links.fast.ask(Request::Talkers)?);
                talkers.sort_by_key(|t| std::cmp::Reverse(t.bytes));
                let now = Instant::now();
                let window = now.duration_since(self.talkers.0).as_secs_f64().max(1e-3);
                let v = views::top_talkers(
                    &talkers,
                    &self.talkers.1,
                    window,
                    &read(&shared),
                    limit.unwrap_or(20),
                );
                let sample = talkers.iter().map(|t| ((t.vni, t.dst, t.vtep), t.bytes));
                self.talkers = (now, sample.collect());
                v
            }
            Command::Trace { packet } => {
                crate::trace::trace(&packet, &shared, &links.ports, |key| {
                    let found = links.fast.ask(|tx| Request::Lookup(key, tx))?;
                    Ok(found.into_iter().flatten().next())
                })?
            }
            Command::SecurityGroupSet { name, rules } => {
                changes::set_group(links, &name, &rules, stop)?
            }
            // Read by `answer` straight into its types; here only if its
            // command was spelled with escapes.
            Command::Apply { ops } => {
                changes::apply(links, &Command::Apply { ops }.to_line(), stop)?
            }
            Command::PortAdd(p) => changes::port_add(links, &p)?,
            Command::PortRemove { name } => changes::port_remove(links, &name)?,
            Command::HandoverPrepare(req) => {
                protocol::check(&req)?;
                if let Some(why) = &links.handover_refused {
                    bail!("{why}");
                }
                if !req.tap_vnet_hdr {
                    let taps = links.fast.ask_first(Request::HeaderTaps)?;
                    if !taps.is_empty() {
                        bail!(
                            "the new binary predates tap offloads: it would read the virtio-net \
                             header before each frame of taps {taps:?} as the frame itself; \
                             hand over to a binary with offloads, or remove and re-add those \
                             ports first"
                        );
                    }
                }
                serde_json::to_value(protocol::PrepareAnswer {
                    protocol: protocol::PROTOCOL,
                    config: links.config_text.clone(),
                    epoch_mono_ns: links.epoch_mono_ns,
                })?
            }
            Command::Handover(_) => bail!("a handover needs the connection"),
        })
    }
}
