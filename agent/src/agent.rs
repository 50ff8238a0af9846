//! The agent of one host: etcd in, the switch's control socket out, status
//! back to etcd.
//!
//! A session connects to etcd, takes a lease for its status, lists what
//! the host needs at one revision (the first time, or after the history it
//! needed was compacted) and brings the switch to it (`sync`'s resync:
//! only the difference), then watches from the next revision. Changes
//! arriving together are applied as one batch. A lost session (etcd
//! restarted, its leader changed, the network failed) is started again
//! with backoff and resumes the watch after the last revision seen, so
//! nothing is listed again. A switch that cannot be reached (restarting,
//! upgrading) keeps the changes pending; when it answers again — and
//! whenever its process changed — the agent reads what it holds and sends
//! the difference.
//!
//! The agent is one thread (a current-thread runtime): the switch is
//! asked in place, and while a batch is applied etcd's messages wait in
//! their bounded channel. (One thread also keeps the allocator to one
//! arena: the memory of a 100,000-endpoint batch is reused by the next,
//! not kept per worker thread.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{Client, PutOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::desired::Fleet;
use crate::layout::{parse_record, Layout};
use crate::store::{self, Watched};
use crate::switch::{SocketSwitch, Switch, SwitchError};
use crate::sync::HostAgent;

/// Most errors listed in the status (the count is always whole).
const MAX_STATUS_ERRORS: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub etcd: Vec<String>,
    pub prefix: String,
    pub host: String,
    pub socket: PathBuf,
    pub lease_ttl_s: i64,
    pub status_interval: Duration,
    pub talkers_interval: Duration,
    /// How long to wait for more changes before applying.
    pub coalesce: Duration,
}

/// What outlives a session.
struct State {
    layout: Layout,
    fleet: Fleet,
    agent: Option<HostAgent>,
    /// The last revision whose changes are in `fleet` and the agent's
    /// records (0: list first).
    seen: i64,
    /// Per watched prefix, the revision its watch resumes after.
    resume: Vec<i64>,
    /// The last revision fully applied to the switch.
    applied: i64,
    switch: SocketSwitch,
    switch_error: Option<String>,
    /// The switch process last talked to (a new one may hold other state).
    switch_pid: Option<u64>,
    compactions: u64,
    sessions: u64,
}

pub async fn run(opts: Options) -> Result<()> {
    let mut st = State {
        layout: Layout::new(&opts.prefix, &opts.host),
        fleet: Fleet::default(),
        agent: None,
        seen: 0,
        resume: Vec::new(),
        applied: 0,
        switch: SocketSwitch::new(opts.socket.clone()),
        switch_error: None,
        switch_pid: None,
        compactions: 0,
        sessions: 0,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        st.sessions += 1;
        if let Err(e) = session(&opts, &mut st).await {
            warn!(
                "etcd session ended: {e:#}; again in {} ms",
                backoff.as_millis()
            );
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Apply what is pending; on an unreachable switch, remember why.
fn step(st: &mut State) {
    let Some(agent) = st.agent.as_mut() else {
        return;
    };
    let r = if st.switch_error.is_some() {
        // It answers again: it may be another process, with other state.
        agent.resync(&st.fleet, &mut st.switch)
    } else {
        agent.step(&st.fleet, &mut st.switch)
    };
    match r {
        Ok(()) => {
            if st.switch_error.take().is_some() {
                info!("switch reachable again; resynced");
            }
            st.applied = st.seen;
            let end = st.fleet.journal.end();
            st.fleet.journal.trim(end);
        }
        Err(SwitchError::Unreachable(e)) => {
            if st.switch_error.is_none() {
                warn!("switch unreachable: {e}; changes kept until it answers");
            }
            st.switch_error = Some(e);
        }
        Err(SwitchError::Refused { message, .. }) => {
            warn!("switch refused a read: {message}");
            st.switch_error = Some(message);
        }
    }
}

/// Store a watched or listed change; a record that does not parse is set
/// aside with why.
fn record(st: &mut State, key: &str, value: Option<&[u8]>) {
    let Some(agent) = st.agent.as_mut() else {
        return;
    };
    let k = match st.layout.parse_key(key) {
        Ok(k) => k,
        Err(_) => return,
    };
    let rec = match value.map(|v| parse_record(&k, v)).transpose() {
        Ok(r) => r,
        Err(why) => {
            agent.unparsed(k, why);
            return;
        }
    };
    // A fleet key is journaled (the agent reads it from there); a host
    // key is the agent's own.
    if !st.fleet.set(&k, rec.clone()) && agent.records.set(&k, rec) {
        agent.touch(k);
    }
}

/// List everything at one revision and bring the switch to it.
async fn full_sync(client: &mut Client, st: &mut State) -> Result<()> {
    let (rev, kvs) = store::list(client, &st.layout.watched(), 0).await?;
    let vtep = st
        .switch
        .vtep()
        .map_err(|e| anyhow::anyhow!("asking the switch its VTEP: {e:?}"))?;
    let mut records = Vec::new();
    let mut host = crate::desired::HostRecords::default();
    let agent = st
        .agent
        .get_or_insert_with(|| HostAgent::new(&st.layout.host, vtep, &st.fleet));
    agent.vtep = vtep;
    let mut bad = Vec::new();
    for (key, value) in &kvs {
        let Ok(k) = st.layout.parse_key(key) else {
            continue;
        };
        match parse_record(&k, value) {
            Ok(r) => {
                if !host.set(&k, Some(r.clone())) {
                    records.push((k, r));
                }
            }
            Err(why) => bad.push((k, why)),
        }
    }
    st.fleet.replace(records);
    for k in host.changed_keys(&agent.records) {
        agent.touch(k);
    }
    agent.records = host;
    for (k, why) in bad {
        agent.unparsed(k, why);
    }
    st.seen = rev;
    st.resume = vec![rev; st.layout.watched().len()];
    // Compare with what the switch holds, not only with the last listing.
    st.switch_error = Some("listing".into());
    step(st);
    info!(revision = rev, keys = kvs.len(), "listed");
    Ok(())
}

/// The status as it stands.
fn status(st: &State) -> Value {
    let (errors, counters) = match &st.agent {
        Some(a) => {
            let first: Vec<Value> = a
                .errors()
                .take(MAX_STATUS_ERRORS)
                .map(|(k, e)| json!({"key": st.layout.key_string(k), "error": e}))
                .collect();
            ((first, a.errors().count()), json!(a.counters))
        }
        None => ((vec![], 0), Value::Null),
    };
    let (errors, errors_total) = errors;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    json!({"host": st.layout.host, "applied_revision": st.applied, "seen_revision": st.seen,
           "switch": st.switch_error.as_deref().map_or("up".to_string(), |e| format!("unreachable: {e}")),
           "errors_total": errors_total, "errors": errors,
           "counters": counters, "compactions": st.compactions, "sessions": st.sessions,
           "updated_unix_ms": now})
}

/// The switch's process id, if it answers.
fn switch_pid(sw: &SocketSwitch) -> Option<u64> {
    sw.ask(&json!({"cmd": "stats"}))
        .ok()
        .and_then(|s| s["pid"].as_u64())
}

async fn session(opts: &Options, st: &mut State) -> Result<()> {
    let mut client = store::connect(&opts.etcd, st.sessions).await?;
    let lease = client
        .lease_grant(opts.lease_ttl_s, None)
        .await
        .context("granting the status lease")?
        .id();
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
    if st.seen > 0 {
        // A store that went back in time (restored from a backup, or a new
        // cluster) would never send the revisions after ours: list again.
        let now = client
            .get(
                st.layout.prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_count_only()),
            )
            .await
            .context("reading the store's revision")?
            .header()
            .map_or(0, |h| h.revision());
        if now < st.seen {
            warn!(
                store = now,
                seen = st.seen,
                "the store's revision went back: listing again"
            );
            st.seen = 0;
        }
    }
    if st.seen == 0 {
        full_sync(&mut client, st).await?;
    }
    let mut rx: mpsc::Receiver<Watched> = watch(&mut client, st).await?;
    info!(from = st.seen + 1, "watching");
    let mut last_status = Value::Null;
    let mut status_tick = tokio::time::interval(opts.status_interval);
    let mut keep_tick =
        tokio::time::interval(Duration::from_secs((opts.lease_ttl_s / 3).max(1) as u64));
    let mut talk_tick = tokio::time::interval(opts.talkers_interval);
    let mut check_tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            m = rx.recv() => {
                let mut next = Some(m.unwrap_or(Watched::Lost("watch task ended".into())));
                while let Some(m) = next.take() {
                    match m {
                        Watched::Changes(which, rev, changes) => {
                            apply_changes(st, which, rev, changes);
                            // More arriving together go in the same batch
                            // (anything else, after it).
                            let until = tokio::time::Instant::now() + opts.coalesce;
                            while let Ok(Some(m)) = tokio::time::timeout_at(until, rx.recv()).await {
                                match m {
                                    Watched::Changes(which, rev, more) => {
                                        apply_changes(st, which, rev, more)
                                    }
                                    other => {
                                        next = Some(other);
                                        break;
                                    }
                                }
                            }
                            step(st);
                        }
                        Watched::Compacted(at) => {
                            warn!(compacted = at, seen = st.seen, "history compacted past our revision: listing again");
                            st.compactions += 1;
                            full_sync(&mut client, st).await?;
                            rx = watch(&mut client, st).await?;
                        }
                        Watched::Lost(why) => anyhow::bail!(why),
                    }
                }
            }
            _ = status_tick.tick() => {
                let mut s = status(st);
                let changed = {
                    let mut a = s.clone();
                    let mut b = last_status.clone();
                    a["updated_unix_ms"] = Value::Null;
                    b["updated_unix_ms"] = Value::Null;
                    a != b
                };
                if changed {
                    client.put(st.layout.status_key(), s.to_string(), Some(PutOptions::new().with_lease(lease))).await
                        .context("writing the status")?;
                    s["updated_unix_ms"] = Value::Null;
                    last_status = s;
                }
            }
            _ = keep_tick.tick() => {
                keeper.keep_alive().await.context("keeping the lease")?;
            }
            k = keep_stream.message() => {
                match k {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(Some(_)) => anyhow::bail!("the status lease expired"),
                    Ok(None) => anyhow::bail!("lease stream ended"),
                    Err(e) => anyhow::bail!("lease: {e}"),
                }
            }
            _ = talk_tick.tick() => {
                let top = st.switch.ask(&json!({"cmd": "top-talkers", "limit": 1000}));
                if let Ok(top) = top {
                    let vtep = st.agent.as_ref().map(|a| a.vtep.to_string());
                    let v = json!({"host": st.layout.host, "vtep": vtep, "window_s": top["window_s"], "talkers": top["talkers"]});
                    client.put(st.layout.talkers_key(), v.to_string(), Some(PutOptions::new().with_lease(lease))).await
                        .context("publishing top talkers")?;
                }
            }
            _ = check_tick.tick() => {
                // A switch that went away, or was replaced by another
                // process (restart, upgrade): compare with what it holds.
                let pid = switch_pid(&st.switch);
                if pid.is_some() && pid != st.switch_pid {
                    if st.switch_pid.is_some() {
                        info!(pid, "the switch is a new process; resyncing");
                        st.switch_error.get_or_insert_with(|| "a new process".into());
                    }
                    st.switch_pid = pid;
                }
                if st.switch_error.is_some() && pid.is_some() {
                    step(st);
                }
            }
        }
    }
}

/// Watch every prefix from where it stopped.
async fn watch(client: &mut Client, st: &State) -> Result<mpsc::Receiver<Watched>> {
    let from: Vec<i64> = st.resume.iter().map(|r| r + 1).collect();
    store::watch(client, &st.layout.watched(), &from).await
}

fn apply_changes(st: &mut State, which: usize, rev: i64, changes: Vec<store::Change>) {
    for c in changes {
        record(st, &c.key, c.value.as_deref());
    }
    st.seen = st.seen.max(rev);
    if let Some(r) = st.resume.get_mut(which) {
        *r = (*r).max(rev);
    }
    // While the switch cannot be reached, the journal need not be kept:
    // when it answers the agent compares everything with what it holds.
    // So a flood of changes to an unreachable switch costs the records,
    // not a log of every change.
    if st.switch_error.is_some() {
        if let Some(a) = st.agent.as_mut() {
            a.skip_journal(&st.fleet);
        }
        let end = st.fleet.journal.end();
        st.fleet.journal.trim(end);
    }
}
