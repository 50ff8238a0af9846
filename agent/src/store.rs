//! etcd, as the agent and the controller use it: connecting, listing a
//! prefix at one revision in pages, and watching several prefixes from a
//! revision as one stream of changes.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;

/// Keys per page of a listing (a page stays well under gRPC's 4 MiB).
const PAGE: i64 = 5_000;
/// Largest watch response accepted (one transaction's events).
const MAX_MESSAGE: usize = 64 << 20;

/// Connect to one member of `endpoints`, the `attempt`-th in turn: a
/// session that fails (a member down, cut off, or in a minority) is
/// started again on the next. (Handing the client every member at once
/// leaves requests going to a dead one: its balancing does not fail over.)
pub async fn connect(endpoints: &[String], attempt: u64) -> Result<Client> {
    let Some(n) = u64::try_from(endpoints.len()).ok().filter(|n| *n > 0) else {
        bail!("no etcd endpoint given");
    };
    let at = usize::try_from(attempt % n).unwrap_or(0);
    let endpoint = &endpoints[at];
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    Client::connect([endpoint], Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {endpoint}"))
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every (key, value) under each of `prefixes`, at one revision (the
/// first listing's, or `at` if not 0). Returns the revision.
pub async fn list(
    client: &mut Client,
    prefixes: &[String],
    at: i64,
) -> Result<(i64, Vec<(String, Vec<u8>)>)> {
    let mut revision = at;
    let mut out = Vec::new();
    for p in prefixes {
        let end = prefix_end(p);
        let mut from = p.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let r = client
                .get(from.clone(), Some(opts))
                .await
                .context("listing")?;
            if revision == 0 {
                revision = r.header().map_or(0, |h| h.revision());
            }
            for kv in r.kvs() {
                out.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
    }
    Ok((revision, out))
}

/// One change: a key put (with its value) or deleted.
#[derive(Debug, Clone)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// What a watch delivers.
#[derive(Debug)]
pub enum Watched {
    /// The changes of one response to the watch of prefix `.0`, and the
    /// revision of the last of them.
    Changes(usize, i64, Vec<Change>),
    /// The history from the asked revision is compacted: list again.
    Compacted(i64),
    /// The stream ended or failed.
    Lost(String),
}

/// Watch each of `prefixes` from its revision in `from`, on one stream;
/// responses arrive on the returned channel (bounded: a slow reader slows
/// the stream, it does not grow memory). Each watch resumes from its own
/// revision: watches catching up on a stream deliver their events
/// interleaved, so one prefix's newest revision says nothing of another's.
pub async fn watch(
    client: &mut Client,
    prefixes: &[String],
    from: &[i64],
) -> Result<mpsc::Receiver<Watched>> {
    if prefixes.is_empty() || prefixes.len() != from.len() {
        bail!("nothing to watch");
    }
    // Fragmented: a revision of very many events (a prefix of a million
    // keys deleted) comes in several responses, never one above
    // MAX_MESSAGE (which the stream could not decode, again and again).
    let opts = |i: usize| {
        WatchOptions::new()
            .with_range(prefix_end(&prefixes[i]))
            .with_start_revision(from[i])
            .with_fragment()
    };
    let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let (mut watcher, mut stream) = wc
        .watch(prefixes[0].as_str(), Some(opts(0)))
        .await
        .context("watching")?;
    for (i, p) in prefixes.iter().enumerate().skip(1) {
        watcher
            .watch(p.as_str(), Some(opts(i)))
            .await
            .context("watching")?;
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // The watcher lives as long as the stream is read.
        let _watcher = watcher;
        // The watches' ids, in the order they were made (the stream
        // confirms them in that order; the first was confirmed to
        // `watch` itself): which prefix an event is of.
        let mut ids: Vec<i64> = vec![_watcher.watch_id()];
        loop {
            let m = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    let _ = tx.send(Watched::Lost("watch stream ended".into())).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Watched::Lost(format!("watch: {e}"))).await;
                    return;
                }
            };
            if m.created() {
                ids.push(m.watch_id());
            }
            if m.compact_revision() > 0 {
                let _ = tx.send(Watched::Compacted(m.compact_revision())).await;
                return;
            }
            if m.canceled() {
                let _ = tx
                    .send(Watched::Lost(format!(
                        "watch canceled: {}",
                        m.cancel_reason()
                    )))
                    .await;
                return;
            }
            // The events' own revision, not the header's: a watcher
            // catching up gets the store's current revision in its headers
            // with older events.
            let rev = m
                .events()
                .iter()
                .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
                .max()
                .unwrap_or(0);
            let changes: Vec<Change> = m
                .events()
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match e.event_type() {
                        EventType::Put => Change {
                            key,
                            value: Some(kv.value().to_vec()),
                        },
                        EventType::Delete => Change { key, value: None },
                    })
                })
                .collect();
            if changes.is_empty() {
                continue;
            }
            let Some(which) = ids.iter().position(|id| *id == m.watch_id()) else {
                let _ = tx
                    .send(Watched::Lost(format!(
                        "events of an unknown watch {} (watches {ids:?}, created {})",
                        m.watch_id(),
                        m.created()
                    )))
                    .await;
                return;
            };
            if tx
                .send(Watched::Changes(which, rev, changes))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
