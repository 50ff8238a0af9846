//! Simulated hosts ("model" mode): many agents in one process, each with
//! an in-memory switch (`model`), for scale tests and benchmarks — a
//! thousand hosts on two cores.
//!
//! Each simulated agent is a [`HostAgent`] like a real one's: the same
//! translation, planning, refusal handling and resync, up to
//! [`Switch::apply`](crate::switch::Switch::apply), which lands in its
//! model instead of a control socket. What the process shares is the
//! etcd side: one watch for all of them, the fleet's records decoded and
//! stored once and read by every agent from the one journal (a real agent
//! holds its own copy; a thousand copies of 100 000 endpoints would not
//! fit), and their host records dispatched by host name. Status is not
//! written per simulated host; [`Options::on_applied`] reports each
//! revision applied on every host.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::desired::{Fleet, HostRecords};
use crate::layout::{parse_record, Layout};
use crate::model::ModelSwitch;
use crate::store::{self, Watched};
use crate::switch::Switch;
use crate::sync::HostAgent;

pub struct Options {
    pub etcd: Vec<String>,
    pub prefix: String,
    pub hosts: usize,
    pub name: String,
    pub vtep_base: Ipv4Addr,
    pub threads: usize,
    /// Told (revision, when) each time every host has applied up to
    /// `revision`.
    pub on_applied: Option<mpsc::UnboundedSender<(i64, Instant)>>,
}

/// The simulated hosts.
pub struct Sim {
    pub fleet: Fleet,
    pub hosts: Vec<(HostAgent, ModelSwitch)>,
    layouts: Vec<Layout>,
    index: HashMap<String, usize>,
    prefix: String,
    pub seen: i64,
    /// Per watched prefix, the revision its watch resumes after.
    resume: Vec<i64>,
}

impl Sim {
    pub fn new(o: &Options) -> Sim {
        let fleet = Fleet::default();
        let mut hosts = Vec::with_capacity(o.hosts);
        let mut layouts = Vec::with_capacity(o.hosts);
        let mut index = HashMap::new();
        for i in 0..o.hosts {
            let name = format!("{}-{i}", o.name);
            let vtep = Ipv4Addr::from(
                u32::from(o.vtep_base).wrapping_add(u32::try_from(i).unwrap_or(u32::MAX)),
            );
            hosts.push((HostAgent::new(&name, vtep, &fleet), ModelSwitch::new(vtep)));
            layouts.push(Layout::new(&o.prefix, &name));
            index.insert(name, i);
        }
        Sim {
            fleet,
            hosts,
            layouts,
            index,
            prefix: o.prefix.trim_end_matches('/').to_string(),
            seen: 0,
            resume: vec![0; 5],
        }
    }

    /// The prefixes the process watches (all hosts' keys).
    pub fn watched(&self) -> Vec<String> {
        let p = &self.prefix;
        [
            "networks/",
            "security-groups/",
            "endpoints/",
            "hosts/",
            "direct/",
        ]
        .iter()
        .map(|s| format!("{p}/{s}"))
        .collect()
    }

    /// The host a key belongs to, if any (`hosts/<h>/…`, `direct/<h>/…`).
    fn host_of(&self, key: &str) -> Option<Option<usize>> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let mut parts = rest.splitn(3, '/');
        match parts.next()? {
            "hosts" | "direct" => Some(parts.next().and_then(|h| self.index.get(h).copied())),
            _ => Some(None),
        }
    }

    /// Where each prefix's watch starts.
    fn resume_from(&self) -> Vec<i64> {
        self.resume.iter().map(|r| r + 1).collect()
    }

    /// Store what the watch of prefix `which` delivered, up to `rev`.
    fn changes(&mut self, which: usize, rev: i64, changes: &[store::Change]) {
        for c in changes {
            self.record(&c.key, c.value.as_deref());
        }
        self.seen = self.seen.max(rev);
        if let Some(r) = self.resume.get_mut(which) {
            *r = (*r).max(rev);
        }
    }

    /// Store one change.
    pub fn record(&mut self, key: &str, value: Option<&[u8]>) {
        match self.host_of(key) {
            Some(Some(i)) => {
                let Ok(k) = self.layouts[i].parse_key(key) else {
                    return;
                };
                let agent = &mut self.hosts[i].0;
                match value.map(|v| parse_record(&k, v)).transpose() {
                    Ok(rec) => {
                        if agent.records.set(&k, rec) {
                            agent.touch(k);
                        }
                    }
                    Err(why) => agent.unparsed(k, why),
                }
            }
            Some(None) if !self.layouts.is_empty() => {
                let Ok(k) = self.layouts[0].parse_key(key) else {
                    return;
                };
                match value.map(|v| parse_record(&k, v)).transpose() {
                    Ok(rec) => {
                        self.fleet.set(&k, rec);
                    }
                    Err(why) => {
                        for (a, _) in &mut self.hosts {
                            a.unparsed(k.clone(), why.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Replace everything with a listing and resync every host.
    pub fn load(&mut self, rev: i64, kvs: &[(String, Vec<u8>)], threads: usize) {
        let mut records = Vec::new();
        let mut host_records: Vec<HostRecords> = vec![HostRecords::default(); self.hosts.len()];
        for (key, value) in kvs {
            match self.host_of(key) {
                Some(Some(i)) => {
                    if let Ok(k) = self.layouts[i].parse_key(key) {
                        if let Ok(r) = parse_record(&k, value) {
                            host_records[i].set(&k, Some(r));
                        }
                    }
                }
                Some(None) if !self.layouts.is_empty() => {
                    if let Ok(k) = self.layouts[0].parse_key(key) {
                        if let Ok(r) = parse_record(&k, value) {
                            records.push((k, r));
                        }
                    }
                }
                _ => {}
            }
        }
        self.fleet.replace(records);
        for ((a, _), r) in self.hosts.iter_mut().zip(host_records) {
            for k in r.changed_keys(&a.records) {
                a.touch(k);
            }
            a.records = r;
        }
        self.seen = rev;
        self.resume = vec![rev; self.watched().len()];
        self.each(threads, |a, sw, f| a.resync(f, sw).is_ok());
    }

    /// Apply what is pending on every host, `threads` at a time.
    pub fn step(&mut self, threads: usize) {
        self.each(threads, |a, sw, f| a.step(f, sw).is_ok());
    }

    fn each(
        &mut self,
        threads: usize,
        f: impl Fn(&mut HostAgent, &mut dyn Switch, &Fleet) -> bool + Sync,
    ) {
        let fleet = &self.fleet;
        let per = self.hosts.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            for chunk in self.hosts.chunks_mut(per) {
                let f = &f;
                s.spawn(move || {
                    for (a, sw) in chunk {
                        // (A model switch is always reachable.)
                        let _ = f(a, sw, fleet);
                    }
                });
            }
        });
        let low = self
            .hosts
            .iter()
            .map(|(a, _)| a.cursor())
            .min()
            .unwrap_or(u64::MAX);
        self.fleet.journal.trim(low.min(self.fleet.journal.end()));
    }
}

pub async fn run(o: Options) -> Result<()> {
    let mut sim = Sim::new(&o);
    info!(hosts = o.hosts, "simulated hosts ready");
    let mut backoff = Duration::from_millis(100);
    for attempt in 0u64.. {
        if let Err(e) = session(&o, &mut sim, attempt).await {
            warn!(
                "etcd session ended: {e:#}; again in {} ms",
                backoff.as_millis()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

async fn session(o: &Options, sim: &mut Sim, attempt: u64) -> Result<()> {
    let mut client = store::connect(&o.etcd, attempt).await?;
    let watched = sim.watched();
    if sim.seen == 0 {
        let (rev, kvs) = store::list(&mut client, &watched, 0).await?;
        tokio::task::block_in_place(|| sim.load(rev, &kvs, o.threads));
        info!(
            revision = rev,
            keys = kvs.len(),
            "listed and applied on every host"
        );
        report(o, sim.seen);
    }
    let mut rx = store::watch(&mut client, &watched, &sim.resume_from()).await?;
    loop {
        let mut next = Some(
            rx.recv()
                .await
                .unwrap_or(Watched::Lost("watch task ended".into())),
        );
        while let Some(m) = next.take() {
            match m {
                Watched::Changes(which, rev, changes) => {
                    sim.changes(which, rev, &changes);
                    // Whatever else has arrived goes in the same round
                    // (anything but changes, after it).
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            Watched::Changes(which, rev, more) => sim.changes(which, rev, &more),
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    tokio::task::block_in_place(|| sim.step(o.threads));
                    report(o, sim.seen);
                }
                Watched::Compacted(_) => {
                    let (rev, kvs) = store::list(&mut client, &watched, 0).await?;
                    tokio::task::block_in_place(|| sim.load(rev, &kvs, o.threads));
                    rx = store::watch(&mut client, &watched, &sim.resume_from()).await?;
                }
                Watched::Lost(why) => anyhow::bail!(why),
            }
        }
    }
}

fn report(o: &Options, rev: i64) {
    if let Some(tx) = &o.on_applied {
        let _ = tx.send((rev, Instant::now()));
    }
}
