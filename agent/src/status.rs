//! `vswitch-agent status`: what each host's agent last wrote under
//! `status/<host>` (gone when its lease expired: the agent is down), as a
//! table for people or as stored.

use anyhow::Result;
use serde_json::Value;

use crate::store;

/// One line of the table.
pub fn line(host: &str, s: &Value) -> String {
    let n = |k: &str| s[k].as_i64().unwrap_or(0);
    let mut out = format!(
        "{host:<20} applied {:>10}  seen {:>10}  switch {:<12} errors {:>5}  sessions {:>4}  compactions {:>3}",
        n("applied_revision"),
        n("seen_revision"),
        s["switch"].as_str().unwrap_or("?"),
        n("errors_total"),
        n("sessions"),
        n("compactions"),
    );
    for e in s["errors"].as_array().into_iter().flatten() {
        out += &format!(
            "\n    {}: {}",
            e["key"].as_str().unwrap_or("?"),
            e["error"].as_str().unwrap_or("?")
        );
    }
    out
}

pub async fn print(etcd: &[String], prefix: &str, host: Option<&str>, json: bool) -> Result<()> {
    let mut client = store::connect(etcd, 0).await?;
    let p = format!("{}/status/", prefix.trim_end_matches('/'));
    let (_, kvs) = store::list(&mut client, std::slice::from_ref(&p), 0).await?;
    let mut shown = 0;
    for (key, value) in kvs {
        let h = key.strip_prefix(&p).unwrap_or(&key);
        if host.is_some_and(|want| want != h) {
            continue;
        }
        shown += 1;
        let v: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
        if json {
            println!("{v}");
        } else {
            println!("{}", line(h, &v));
        }
    }
    if shown == 0 {
        anyhow::bail!(
            "no status under {p}{}: no agent is running (or its lease expired)",
            host.unwrap_or("")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_where_the_host_is_and_what_it_refused() {
        let s = serde_json::json!({"applied_revision": 41, "seen_revision": 42, "switch": "up",
            "errors_total": 1, "sessions": 2, "compactions": 0,
            "errors": [{"key": "/vswitch/v1/hosts/hv1/vms/c", "error": "no port"}]});
        let l = line("hv1", &s);
        assert!(l.starts_with("hv1 "), "{l}");
        assert!(
            l.contains("applied         41") && l.contains("seen         42"),
            "{l}"
        );
        assert!(
            l.contains("\n    /vswitch/v1/hosts/hv1/vms/c: no port"),
            "{l}"
        );
    }
}
