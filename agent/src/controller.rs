//! Hoverboard's controller. Hosts of a network with a gateway VTEP send
//! what they do not know to the gateway; agents publish their top talkers
//! (`talkers/<host>`); the controller promotes a (host, destination) pair
//! whose rate passes the threshold to a direct endpoint for that host
//! (`direct/<host>/<vni>/<ip>`, which its agent turns into a remote
//! endpoint), and demotes a pair that stayed below it for `idle`.
//!
//! Several controllers may run; one leads, elected through etcd (its
//! campaign is held by a lease: a dead leader's successor takes over within
//! the lease's TTL). Promotions are plain keys, not leased: they outlive a
//! leader, and a new leader counts their idle time from its own start.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::Client;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::store;

#[derive(Debug, Clone)]
pub struct Options {
    pub etcd: Vec<String>,
    pub prefix: String,
    pub name: String,
    /// Promote above this many bytes per second.
    pub threshold_bps: f64,
    pub idle: Duration,
    pub interval: Duration,
    pub lease_ttl_s: i64,
}

/// A (host, network, destination) pair.
type Pair = (String, u32, Ipv4Addr);

/// Two hosts, in order.
type HostPair = (String, String);

/// The leader's decisions from one round of reports.
#[derive(Debug, Default, PartialEq)]
pub struct Decisions {
    pub promote: Vec<Pair>,
    pub demote: Vec<Pair>,
}

/// The leader's memory: when traffic between two hosts was last above
/// the threshold.
///
/// Promotion is by pair of hosts, both ways at once: a host checks that a
/// packet from an endpoint it knows comes from that endpoint's VTEP, and
/// takes unknown ones only from the gateway, so if host 1 sent to VM b on
/// host 2 directly while host 2 still sent b's replies through the gateway
/// (or the other way round) one side would drop the other's packets.
/// When the traffic between two hosts passes the threshold in either
/// direction, every destination each reports on the other is promoted —
/// but only once both report one (a one-way stream stays on the
/// gateway); they are demoted together after `idle`.
#[derive(Debug, Default)]
pub struct Hoverboard {
    hot: HashMap<HostPair, Instant>,
}

fn host_pair(a: &str, b: &str) -> HostPair {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Hoverboard {
    /// Decide from the hosts' reports (`talkers/<host>` values, each with
    /// the host's VTEP), the promotions in place and where each endpoint
    /// is (`endpoint(vni, ip)`: its VTEP).
    pub fn decide(
        &mut self,
        opts: &Options,
        now: Instant,
        reports: &[(String, Value)],
        promoted: &[Pair],
        endpoint: impl Fn(u32, Ipv4Addr) -> Option<Ipv4Addr>,
    ) -> Decisions {
        let host_at: HashMap<Ipv4Addr, &str> = reports
            .iter()
            .filter_map(|(h, r)| Some((r["vtep"].as_str()?.parse().ok()?, h.as_str())))
            .collect();
        // Where a pair's destination lives: the host at its VTEP.
        let peer_of =
            |vni: u32, ip: Ipv4Addr| endpoint(vni, ip).and_then(|v| host_at.get(&v).copied());
        // Each host pair's candidates, and whether it runs hot.
        let mut candidates: HashMap<HostPair, (Vec<Pair>, bool, bool)> = HashMap::new();
        for (host, r) in reports {
            for t in r["talkers"].as_array().into_iter().flatten() {
                let vni = t["vni"].as_u64().and_then(|v| u32::try_from(v).ok());
                let dst = t["dst"].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok());
                let rate = t["bytes_per_s"].as_f64().unwrap_or(0.0);
                let (Some(vni), Some(dst)) = (vni, dst) else {
                    continue;
                };
                let Some(peer) = peer_of(vni, dst) else {
                    continue;
                };
                if peer == host {
                    continue;
                }
                let hp = host_pair(host, peer);
                let first = hp.0 == *host;
                let c = candidates.entry(hp.clone()).or_default();
                c.0.push((host.clone(), vni, dst));
                // Which side reported it.
                if first {
                    c.1 = true;
                } else {
                    c.2 = true;
                }
                if rate >= opts.threshold_bps {
                    self.hot.insert(hp, now);
                }
            }
        }
        let active = |hot: &HashMap<HostPair, Instant>, hp: &HostPair| {
            hot.get(hp)
                .is_some_and(|t| now.duration_since(*t) < opts.idle)
        };
        let mut d = Decisions::default();
        for p in promoted {
            let Some(peer) = peer_of(p.1, p.2) else {
                // Its endpoint is gone or moved off the reporting hosts.
                d.demote.push(p.clone());
                continue;
            };
            let hp = host_pair(&p.0, peer);
            // A promotion this leader did not make starts its clock now.
            self.hot.entry(hp.clone()).or_insert(now);
            if !active(&self.hot, &hp) {
                d.demote.push(p.clone());
            }
        }
        for (hp, (pairs, one_way, other_way)) in candidates {
            if active(&self.hot, &hp) && one_way && other_way {
                d.promote
                    .extend(pairs.into_iter().filter(|p| !promoted.contains(p)));
            }
        }
        self.hot.retain(|_, t| now.duration_since(*t) < opts.idle);
        d.promote.sort();
        d.promote.dedup();
        d.demote.sort();
        d
    }
}

pub async fn run(opts: Options) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    for attempt in 0u64.. {
        if let Err(e) = session(&opts, attempt).await {
            warn!(
                "controller session ended: {e:#}; again in {} ms",
                backoff.as_millis()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

async fn session(opts: &Options, attempt: u64) -> Result<()> {
    let mut client = store::connect(&opts.etcd, attempt).await?;
    let lease = client.lease_grant(opts.lease_ttl_s, None).await?.id();
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
    // The lease is kept alive while campaigning (which blocks until this
    // controller leads) and while leading.
    let ttl = Duration::from_secs((opts.lease_ttl_s / 3).max(1) as u64);
    let keep = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match keep_stream.message().await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                _ => return,
            }
            tokio::time::sleep(ttl).await;
        }
    });
    let election = format!("{}/controller", opts.prefix);
    info!(name = %opts.name, "campaigning");
    let r = tokio::select! {
        r = client.campaign(election.as_str(), opts.name.as_str(), lease) => r.context("campaigning")?,
        _ = wait_finished(&keep) => anyhow::bail!("lease lost while campaigning"),
    };
    let leader = r.leader().cloned();
    info!(name = %opts.name, "leading");
    let mut hb = Hoverboard::default();
    let mut tick = tokio::time::interval(opts.interval);
    let out = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = round(&mut client, opts, &mut hb).await {
                    break Err(e);
                }
            }
            _ = wait_finished(&keep) => break Err(anyhow::anyhow!("lease lost: no longer leading")),
        }
    };
    if let Some(l) = leader {
        let _ = client
            .resign(Some(etcd_client::ResignOptions::new().with_leader(l)))
            .await;
    }
    keep.abort();
    out
}

async fn wait_finished(h: &tokio::task::JoinHandle<()>) {
    while !h.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One round: read reports and promotions, write the decisions.
async fn round(client: &mut Client, opts: &Options, hb: &mut Hoverboard) -> Result<()> {
    let p = &opts.prefix;
    let (rev, talkers) = store::list(client, &[format!("{p}/talkers/")], 0).await?;
    let (_, direct) = store::list(client, &[format!("{p}/direct/")], rev).await?;
    let reports: Vec<(String, Value)> = talkers
        .iter()
        .filter_map(|(k, v)| {
            let host = k.rsplit('/').next()?.to_string();
            Some((host, serde_json::from_slice(v).ok()?))
        })
        .collect();
    let promoted: Vec<Pair> = direct
        .iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&format!("{p}/direct/"))?;
            let mut parts = rest.split('/');
            let host = parts.next()?.to_string();
            let vni = parts.next()?.parse().ok()?;
            let ip = parts.next()?.parse().ok()?;
            Some((host, vni, ip))
        })
        .collect();
    // Where the reported and promoted destinations are (their VTEPs).
    let mut at: HashMap<(u32, Ipv4Addr), Option<Ipv4Addr>> = HashMap::new();
    let wanted = reports
        .iter()
        .flat_map(|(_, r)| r["talkers"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| {
            Some((
                u32::try_from(t["vni"].as_u64()?).ok()?,
                t["dst"].as_str()?.parse().ok()?,
            ))
        })
        .chain(promoted.iter().map(|p| (p.1, p.2)))
        .collect::<Vec<(u32, Ipv4Addr)>>();
    for (vni, dst) in wanted {
        if at.contains_key(&(vni, dst)) {
            continue;
        }
        let got = client
            .get(format!("{p}/endpoints/{vni}/{dst}"), None)
            .await?;
        let vtep = got
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<Value>(kv.value()).ok())
            .and_then(|v| v["vtep"].as_str()?.parse().ok());
        at.insert((vni, dst), vtep);
    }
    let d = hb.decide(opts, Instant::now(), &reports, &promoted, |vni, ip| {
        at.get(&(vni, ip)).copied().flatten()
    });
    for (host, vni, ip) in &d.promote {
        client
            .put(
                format!("{p}/direct/{host}/{vni}/{ip}"),
                json!({}).to_string(),
                None,
            )
            .await?;
        info!(%host, vni, %ip, "promoted to a direct endpoint");
    }
    for (host, vni, ip) in &d.demote {
        client
            .delete(format!("{p}/direct/{host}/{vni}/{ip}"), None)
            .await?;
        info!(%host, vni, %ip, "idle: back to the gateway");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            etcd: vec![],
            prefix: "/p".into(),
            name: "c".into(),
            threshold_bps: 2500.0,
            idle: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            lease_ttl_s: 5,
        }
    }

    const V1: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
    const V2: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);

    /// hv1 (VM a) sends to b at `ab`; hv2 (VM b) to a at `ba`.
    fn reports(ab: Option<f64>, ba: Option<f64>) -> Vec<(String, Value)> {
        let row = |dst: Ipv4Addr, rate: f64| json!({"vni": 100, "dst": dst.to_string(), "vtep": "192.168.0.254", "bytes_per_s": rate});
        vec![
            (
                "hv1".into(),
                json!({"vtep": V1.to_string(), "talkers": ab.map(|r| vec![row(B, r)]).unwrap_or_default()}),
            ),
            (
                "hv2".into(),
                json!({"vtep": V2.to_string(), "talkers": ba.map(|r| vec![row(A, r)]).unwrap_or_default()}),
            ),
        ]
    }

    fn at(_: u32, ip: Ipv4Addr) -> Option<Ipv4Addr> {
        match ip {
            A => Some(V1),
            B => Some(V2),
            _ => None,
        }
    }

    #[test]
    fn hot_host_pairs_are_promoted_both_ways_and_demoted_together() {
        let o = opts();
        let mut hb = Hoverboard::default();
        let t0 = Instant::now();
        let ab = ("hv1".to_string(), 100, B);
        let ba = ("hv2".to_string(), 100, A);
        // a → b is hot, b → a (its replies) slow: both promoted.
        let d = hb.decide(&o, t0, &reports(Some(5000.0), Some(100.0)), &[], at);
        assert_eq!(d.promote, vec![ab.clone(), ba.clone()]);
        let both = [ab.clone(), ba.clone()];
        // Promoted and still hot: nothing to do.
        let t1 = t0 + Duration::from_secs(5);
        let d = hb.decide(&o, t1, &reports(Some(5000.0), Some(100.0)), &both, at);
        assert_eq!(d, Decisions::default());
        // Quiet for less than `idle`: kept; longer: both demoted at once.
        let d = hb.decide(
            &o,
            t1 + Duration::from_secs(9),
            &reports(Some(1.0), Some(1.0)),
            &both,
            at,
        );
        assert_eq!(d, Decisions::default());
        let d = hb.decide(
            &o,
            t1 + Duration::from_secs(11),
            &reports(Some(1.0), None),
            &both,
            at,
        );
        assert_eq!(d.demote, vec![ab, ba]);
    }

    #[test]
    fn a_one_way_stream_or_an_unknown_destination_stays_on_the_gateway() {
        let o = opts();
        let mut hb = Hoverboard::default();
        let t0 = Instant::now();
        let d = hb.decide(&o, t0, &reports(Some(9000.0), None), &[], at);
        assert!(d.promote.is_empty(), "{d:?}");
        let d = hb.decide(&o, t0, &reports(Some(9000.0), Some(9000.0)), &[], |_, _| {
            None
        });
        assert!(d.promote.is_empty(), "{d:?}");
        // A promoted endpoint that is gone is demoted.
        let gone = ("hv1".to_string(), 100, Ipv4Addr::new(10, 0, 0, 99));
        let d = hb.decide(
            &o,
            t0,
            &reports(None, None),
            std::slice::from_ref(&gone),
            at,
        );
        assert_eq!(d.demote, vec![gone]);
    }

    #[test]
    fn a_new_leader_gives_inherited_promotions_a_full_idle_period() {
        let o = opts();
        let mut hb = Hoverboard::default();
        let t0 = Instant::now();
        let pair = ("hv1".to_string(), 100, B);
        let d = hb.decide(
            &o,
            t0,
            &reports(None, None),
            std::slice::from_ref(&pair),
            at,
        );
        assert_eq!(d, Decisions::default());
        let d = hb.decide(
            &o,
            t0 + Duration::from_secs(11),
            &reports(None, None),
            std::slice::from_ref(&pair),
            at,
        );
        assert_eq!(d.demote, vec![pair]);
    }
}
