//! benches/fleet's driver: simulated hosts (model mode) in this process
//! plus the real agents `benches/fleet` started, one network of N
//! endpoints written to etcd, then endpoint moves; each figure is the time
//! from the write to its application on every host (the simulated ones
//! report when all of them applied a revision; a real agent's status says
//! which revision its switch has, seen here through a watch).
//!
//! `--offline`: no etcd, no real hosts — the simulated hosts fed the same
//! records in-process, to count the per-host cost of translation and
//! application alone.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use etcd_client::{DeleteOptions, Txn, TxnOp, WatchOptions};
use serde_json::{json, Value};
use tokio::sync::watch;
use vswitch_agent::{sim, store};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    #[arg(long, default_value = "/vswitch/v1")]
    prefix: String,
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    #[arg(long, default_value_t = 100_000)]
    endpoints: u32,
    #[arg(long, default_value_t = 50)]
    moves: usize,
    /// Real hosts (their agents' names), comma-separated.
    #[arg(long, value_delimiter = ',')]
    real: Vec<String>,
    /// Their agents' process ids, for their memory.
    #[arg(long, value_delimiter = ',')]
    real_pids: Vec<u32>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    offline: bool,
}

const VTEP_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);

fn endpoint(i: u32, hosts: usize, shift: u32) -> (String, Value) {
    let ip = Ipv4Addr::from(0x0a01_0000 + i);
    let host = (i + shift) % u32::try_from(hosts).unwrap_or(1);
    let vtep = Ipv4Addr::from(u32::from(VTEP_BASE) + host);
    let b = i.to_be_bytes();
    let mac = format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        shift & 0xff,
        b[0],
        b[1],
        b[2],
        b[3]
    );
    (
        ip.to_string(),
        json!({"mac": mac, "vtep": vtep.to_string()}),
    )
}

fn network() -> Value {
    json!({"gateway_mac": "02:00:00:00:00:fe", "subnet": [{"cidr": "10.0.0.0/8", "gateway": "10.0.0.1"}]})
}

fn rss_mib(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: the smallest value with at least q of them at or
    // below it.
    let n = sorted.len();
    let rank = (1..=n).find(|r| *r as f64 >= q * n as f64).unwrap_or(n);
    sorted[rank - 1]
}

fn offline(a: &Args) {
    let o = sim::Options {
        etcd: vec![],
        prefix: a.prefix.clone(),
        hosts: a.hosts,
        name: "model".into(),
        vtep_base: VTEP_BASE,
        threads: a.threads,
        on_applied: None,
    };
    let mut s = sim::Sim::new(&o);
    let p = &a.prefix;
    s.record(
        &format!("{p}/networks/100"),
        Some(network().to_string().as_bytes()),
    );
    s.step(a.threads);
    let t = Instant::now();
    for i in 0..a.endpoints {
        let (ip, v) = endpoint(i, a.hosts, 0);
        s.record(
            &format!("{p}/endpoints/100/{ip}"),
            Some(v.to_string().as_bytes()),
        );
    }
    let decoded = t.elapsed();
    s.step(a.threads);
    let bulk = t.elapsed();
    let mut lat = Vec::new();
    for m in 0..a.moves {
        let i = u32::try_from(m).unwrap_or(0).wrapping_mul(1997) % a.endpoints;
        let (ip, v) = endpoint(i, a.hosts, 1 + u32::try_from(m).unwrap_or(0));
        let t = Instant::now();
        s.record(
            &format!("{p}/endpoints/100/{ip}"),
            Some(v.to_string().as_bytes()),
        );
        s.step(a.threads);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let held: usize = s.hosts.iter().map(|(_, m)| m.remote_count()).sum();
    println!(
        "hosts={} endpoints={} remotes_held={held} decode_ms={:.1} bulk_all_hosts_ms={:.1} change_p50_ms={:.3} change_p99_ms={:.3} rss_mib={:.0}",
        a.hosts,
        a.endpoints,
        decoded.as_secs_f64() * 1e3,
        bulk.as_secs_f64() * 1e3,
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        rss_mib("self")
    );
}

/// The latest (revision, when seen) of each real host's status.
async fn watch_statuses(
    etcd: &str,
    prefix: &str,
    real: &[String],
) -> Result<HashMap<String, watch::Receiver<(i64, Instant)>>> {
    let mut client = store::connect(&[etcd.to_string()], 0).await?;
    let (mut _w, mut stream) = client
        .watch(
            format!("{prefix}/status/"),
            Some(WatchOptions::new().with_prefix()),
        )
        .await?;
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for h in real {
        let (tx, rx) = watch::channel((0i64, Instant::now()));
        senders.insert(format!("{prefix}/status/{h}"), tx);
        receivers.insert(h.clone(), rx);
    }
    tokio::spawn(async move {
        let _w = _w;
        while let Ok(Some(m)) = stream.message().await {
            let now = Instant::now();
            for e in m.events() {
                let Some(kv) = e.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let rev = serde_json::from_slice::<Value>(kv.value())
                    .ok()
                    .and_then(|v| v["applied_revision"].as_i64());
                if let (Some(tx), Some(rev)) = (senders.get(&key), rev) {
                    let _ = tx.send((rev, now));
                }
            }
        }
    });
    Ok(receivers)
}

/// The newest revision a plain watcher of `prefix` has seen, and when.
async fn watch_revisions(etcd: &str, prefix: &str) -> Result<watch::Receiver<(i64, Instant)>> {
    let mut client = store::connect(&[etcd.to_string()], 0).await?;
    let (w, mut stream) = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await?;
    let (tx, rx) = watch::channel((0i64, Instant::now()));
    tokio::spawn(async move {
        let _w = w;
        while let Ok(Some(m)) = stream.message().await {
            let now = Instant::now();
            if let Some(rev) = m
                .events()
                .iter()
                .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
                .max()
            {
                let _ = tx.send((rev, now));
            }
        }
    });
    Ok(rx)
}

/// When the simulated hosts, the real ones and all had applied `rev`.
async fn all_applied(
    sim: &mut watch::Receiver<(i64, Instant)>,
    real: &mut HashMap<String, watch::Receiver<(i64, Instant)>>,
    rev: i64,
    limit: Duration,
) -> Result<(Instant, Instant, Instant)> {
    let deadline = tokio::time::Instant::now() + limit;
    let wait = |rx: &mut watch::Receiver<(i64, Instant)>| {
        let mut rx = rx.clone();
        async move {
            let r = tokio::time::timeout_at(deadline, rx.wait_for(|(r, _)| *r >= rev)).await;
            match r {
                Ok(Ok(v)) => Ok(v.1),
                _ => bail!("revision {rev} not applied within {limit:?}"),
            }
        }
    };
    let model = wait(sim).await.context("simulated hosts")?;
    let mut reals = None::<Instant>;
    for (h, rx) in real.iter_mut() {
        let t = wait(rx).await.with_context(|| format!("real host {h}"))?;
        reals = Some(reals.map_or(t, |r| r.max(t)));
    }
    let reals = reals.unwrap_or(model);
    Ok((model, reals, model.max(reals)))
}

async fn online(a: Args) -> Result<()> {
    let p = a.prefix.clone();
    let mut client = store::connect(std::slice::from_ref(&a.etcd), 0).await?;
    client
        .delete(format!("{p}/"), Some(DeleteOptions::new().with_prefix()))
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let o = sim::Options {
        etcd: vec![a.etcd.clone()],
        prefix: p.clone(),
        hosts: a.hosts,
        name: "model".into(),
        vtep_base: VTEP_BASE,
        threads: a.threads,
        on_applied: Some(tx),
    };
    tokio::spawn(sim::run(o));
    let (sim_tx, mut sim_rx) = watch::channel((0i64, Instant::now()));
    tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            let _ = sim_tx.send(v);
        }
    });
    let mut real = watch_statuses(&a.etcd, &p, &a.real).await?;
    // The peer: etcd alone — a plain watcher of the endpoints.
    let mut plain = watch_revisions(&a.etcd, &format!("{p}/endpoints/")).await?;
    let rev = client
        .put(format!("{p}/networks/100"), network().to_string(), None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    all_applied(&mut sim_rx, &mut real, rev, Duration::from_secs(60)).await?;
    let pid0 = a.real_pids.first().map(|p| p.to_string());
    let rss_start = pid0.as_deref().map_or(0.0, rss_mib);
    // The bulk load: 1 000 puts a transaction, 8 in flight.
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut last = 0i64;
    let per_txn = 1000u32;
    let mut next = 0u32;
    while next < a.endpoints || !set.is_empty() {
        while set.len() < 8 && next < a.endpoints {
            let end = (next + per_txn).min(a.endpoints);
            let ops: Vec<TxnOp> = (next..end)
                .map(|i| {
                    let (ip, v) = endpoint(i, a.hosts, 0);
                    TxnOp::put(format!("{p}/endpoints/100/{ip}"), v.to_string(), None)
                })
                .collect();
            let mut c = client.clone();
            set.spawn(async move { c.txn(Txn::new().and_then(ops)).await });
            next = end;
        }
        if let Some(r) = set.join_next().await {
            let r = r??;
            last = last.max(r.header().map_or(0, |h| h.revision()));
        }
    }
    let written = t0.elapsed();
    let (model, reals, all) =
        all_applied(&mut sim_rx, &mut real, last, Duration::from_secs(300)).await?;
    let rss_bulk = pid0.as_deref().map_or(0.0, rss_mib);
    let bulk_model = model.duration_since(t0);
    let bulk_real = reals.duration_since(t0);
    let bulk_all = all.duration_since(t0);
    // Moves.
    let mut lat = Vec::new();
    let mut lat_model = Vec::new();
    let mut lat_etcd = Vec::new();
    for m in 0..a.moves {
        let i = u32::try_from(m).unwrap_or(0).wrapping_mul(1997) % a.endpoints;
        let (ip, v) = endpoint(i, a.hosts, 1 + u32::try_from(m).unwrap_or(0));
        let t = Instant::now();
        let rev = client
            .put(format!("{p}/endpoints/100/{ip}"), v.to_string(), None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let (model, _, all) =
            all_applied(&mut sim_rx, &mut real, rev, Duration::from_secs(30)).await?;
        let seen =
            tokio::time::timeout(Duration::from_secs(30), plain.wait_for(|(r, _)| *r >= rev))
                .await
                .context("the plain watcher")??
                .1;
        lat_etcd.push(seen.duration_since(t).as_secs_f64() * 1e3);
        lat.push(all.duration_since(t).as_secs_f64() * 1e3);
        lat_model.push(model.duration_since(t).as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort_by(f64::total_cmp);
    lat_model.sort_by(f64::total_cmp);
    lat_etcd.sort_by(f64::total_cmp);
    let rss_end = pid0.as_deref().map_or(0.0, rss_mib);
    println!(
        "hosts={} endpoints={} change_p50_ms={:.1} change_p99_ms={:.1} model_change_p99_ms={:.1} etcd_watch_p50_ms={:.2} etcd_watch_p99_ms={:.2} bulk_100k_all_hosts_ms={:.0} bulk_model_hosts_ms={:.0} bulk_real_hosts_ms={:.0} etcd_write_ms={:.0} agent_rss_mib={:.1} agent_rss_start_mib={:.1} agent_rss_bulk_mib={:.1} sim_rss_mib={:.0}",
        a.hosts + a.real.len(),
        a.endpoints,
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        quantile(&lat_model, 0.99),
        quantile(&lat_etcd, 0.5),
        quantile(&lat_etcd, 0.99),
        bulk_all.as_secs_f64() * 1e3,
        bulk_model.as_secs_f64() * 1e3,
        bulk_real.as_secs_f64() * 1e3,
        written.as_secs_f64() * 1e3,
        rss_end,
        rss_start,
        rss_bulk,
        rss_mib("self")
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.offline {
        offline(&a);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(online(a))
}
